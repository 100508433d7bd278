"""``qblock prune``: write a pruned Hugging Face model with the chosen decoder blocks dropped.

Example::

    qblock prune --model default --remove 3,7,12 --out smollm2-pruned
    qblock prune --model default --solutions sols.json --rank 1 --out smollm2-pruned
    qblock prune --recommended qblock-report-quick --remove-count 6 --out smollm2-pruned
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qblock.cli import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="write a pruned model without the chosen blocks",
        description=(
            "Drop decoder blocks from MODEL and save the result as a Hugging Face model directory that reloads "
            "with AutoModelForCausalLM.from_pretrained (num_hidden_layers, per-layer config lists and KV-cache "
            "layer indices updated). Example: qblock prune --model default --remove 3,7,12 --out pruned/"
        ),
    )
    p.add_argument("--model", default=None,
                   help="'default' (SmolLM2-135M-Instruct; the default), 'gemma3-270m' (Gemma-3-270M), a local HF model "
                        "directory, a .gguf file or a hub id; with --recommended, the report's model unless given")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--remove", help="blocks to drop: 0-based indices and/or block labels, comma separated "
                                        "(e.g. 3,7,12 or model.layers.3)")
    which.add_argument("--solutions", metavar="FILE", help="solutions JSON written by `qblock solve --json`")
    which.add_argument("--recommended", metavar="REPORT_DIR",
                       help="a report folder of `qblock run` / `qblock validate`: prune its recommended set "
                            "for --remove-count M")
    p.add_argument("--rank", type=int, default=1, help="with --solutions: which ranked solution (default 1, the best)")
    p.add_argument("--remove-count", "-M", type=int, default=None, metavar="M",
                   help="with --recommended: how many blocks (one of the report's M values)")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out directory")
    p.add_argument("--no-check", action="store_true", help="skip the reload check of the saved config")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


def parse_remove(text: str, labels: list[str]) -> list[int]:
    """``"3,7,model.layers.12"`` -> block indices; labels are matched exactly, or by their last parts.

    Example:
        >>> parse_remove("3, 1,layers.2", ["model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3"])
        [1, 2, 3]
    """
    out: list[int] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            i = int(item)
        except ValueError:
            hits = [k for k, lab in enumerate(labels) if lab == item or lab.endswith("." + item)]
            if len(hits) != 1:
                raise CliError(f"--remove: {item!r} is not a block index or a unique block label "
                               f"(labels look like {labels[0]!r})") from None
            i = hits[0]
        out.append(i)
    if not out:
        raise CliError("--remove: no blocks given")
    return check_removed(out, len(labels), "--remove")


def check_removed(removed: list[int], n: int | None, where: str) -> list[int]:
    """Sorted block indices, each once and in ``0..n-1`` (``n=None``: range not known yet).

    A repeated block is an error rather than folded away: it would otherwise be counted twice in the
    report (issue 10: ``[1, 1, 2]`` was reported as 3 blocks and 34.5% fewer parameters).

    Example:
        >>> check_removed([3, 1], 4, "--remove")
        [1, 3]
    """
    seen = [i for k, i in enumerate(removed) if i in removed[:k]]
    if seen:
        raise CliError(f"{where}: block {seen[0]} is listed more than once")
    bad = [i for i in removed if i < 0 or (n is not None and i >= n)]
    if bad:
        span = f"; the model has {n} blocks (0..{n - 1})" if n is not None else ""
        raise CliError(f"{where}: block {bad[0]} out of range{span}")
    if n is not None and len(removed) >= n:
        raise CliError(f"{where}: cannot remove all {n} blocks")
    return sorted(removed)


def removed_from_solutions(path: str, rank: int) -> tuple[list[int], int | None]:
    """``(removed, num_blocks)`` of the solution with rank ``rank`` in a ``qblock solve --json`` file.

    Everything that can be checked without the model is checked here (so before it is loaded):
    the file's shape (:func:`qblock._solutions.read_solutions_file`), whole-number indices, no
    repeats, none negative.
    """
    from qblock._solutions import SolutionsFileError, read_solutions_file

    try:
        sols = read_solutions_file(path)
    except SolutionsFileError as exc:
        raise CliError(str(exc)) from None
    if not 1 <= rank <= len(sols.removed):
        raise CliError(f"--rank {rank}: {path} holds {len(sols.removed)} solution(s)")
    return check_removed(sols.removed[rank - 1], None, f"{path} solution {rank}"), sols.num_blocks


def removed_from_recommended(report_dir: str, m: int | None) -> tuple[list[int], Any]:
    """The recommended set for M from a report folder's summary.json, and the model recorded there."""
    p = Path(report_dir) / "summary.json"
    if not p.is_file():
        raise CliError(f"--recommended {report_dir}: no summary.json there (expected a `qblock run` report folder)")
    try:
        data = json.loads(p.read_text())
        rec = data.get("recommended") or {}
    except (json.JSONDecodeError, AttributeError):
        raise CliError(f"{p} is not a summary written by qblock run/validate") from None
    if not rec:
        raise CliError(f"{p} holds no recommended sets (was the selection switched off with --no-select?)")
    if m is None:
        raise CliError(f"--recommended needs --remove-count M; {p} recommends sets for M = {', '.join(rec)}")
    if str(m) not in rec:
        raise CliError(f"--remove-count {m}: {p} recommends sets only for M = {', '.join(rec)}")
    return [int(i) for i in rec[str(m)]["removed"]], (data.get("problem") or {}).get("model")


def _load(spec: str, quiet: bool):
    """(model, tokenizer) through qblock.llm.models; a plain local HF directory works without it."""
    try:
        from qblock.llm.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        try:
            return load_model(spec, quiet=quiet)
        except ValueError as exc:  # ModelLoadError: one-line reason
            raise CliError(str(exc)) from None
    import transformers

    if not Path(spec).is_dir():
        raise CliError(f"model {spec!r}: not a local model directory")
    model = transformers.AutoModelForCausalLM.from_pretrained(spec, local_files_only=True)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError):
        tok = None
    return model, tok


def _provenance(spec: str) -> dict[str, Any] | None:
    """What ``--model`` was (recorded for ``qblock heal``'s default teacher); ``None`` without the llm extra."""
    try:
        from qblock.llm.models import model_provenance
    except ImportError:
        return None
    return model_provenance(spec)


def run(args: argparse.Namespace) -> int:
    from qblock._lazy import require

    require("torch", "llm")
    require("transformers", "llm")
    from qblock.llm.blocks import find_blocks
    from qblock.llm.export import save_pruned

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise CliError(f"--out {out} exists and is not empty; pass --overwrite to write into it")
    if args.solutions and args.rank < 1:
        raise CliError("--rank must be at least 1")
    if args.remove_count is not None and not args.recommended:
        raise CliError("--remove-count goes with --recommended REPORT_DIR")
    recommended, recorded = (removed_from_recommended(args.recommended, args.remove_count) if args.recommended
                             else (None, None))
    if recommended is not None:  # repeats and negatives need no model: refuse them before loading it
        check_removed(recommended, None, args.recommended)
    if args.solutions:
        removed, solved_blocks = removed_from_solutions(args.solutions, args.rank)
    spec = args.model
    if spec is None and recorded is not None:
        from qblock._provenance import Provenance

        spec = Provenance.of({"model": recorded}).model_spec
        if spec is None:
            raise CliError(f"{args.recommended} does not record a loadable model; pass --model")
    spec = spec or "default"
    model, tok = _load(spec, args.quiet)
    labels = [name for name, _ in find_blocks(model)]
    if recommended is not None:
        removed = recommended
        bad = [i for i in removed if not 0 <= i < len(labels)]
        if bad:
            raise CliError(f"{args.recommended}: blocks {bad} out of range for this model ({len(labels)} blocks); "
                           "pass the model of that report with --model")
        removed = check_removed(removed, len(labels), args.recommended)
    elif args.solutions:
        if solved_blocks is not None and solved_blocks != len(labels):
            raise CliError(f"{args.solutions} was solved for {solved_blocks} variables but this model has "
                           f"{len(labels)} blocks; was it solved for another model or per sub-layer?")
        removed = check_removed(removed, len(labels), args.solutions)
    else:
        removed = parse_remove(args.remove, labels)
    before = sum(p.numel() for p in model.parameters())
    save_pruned(model, tok, removed, out, check=not args.no_check, provenance=_provenance(spec))
    if not args.quiet:
        blocks_per = [sum(p.numel() for p in find_blocks(model)[i][1].parameters()) for i in removed]
        after = before - sum(blocks_per)
        print(f"removed {len(removed)} of {len(labels)} blocks: {', '.join(map(str, removed))}")
        print(f"parameters: {before:,} -> {after:,} ({100.0 * (before - after) / before:.1f}% fewer)")
        print(f"saved to {out}  (AutoModelForCausalLM.from_pretrained({str(out)!r}))")
        if tok is None:
            print("note: no tokenizer was found next to the model; none was saved")
    return 0
