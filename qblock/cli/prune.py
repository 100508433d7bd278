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

from qblock._solutions import check_removed
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
    return check_removed(out, "--remove", num_blocks=len(labels))


def removed_from_solutions(path: str, rank: int) -> tuple[list[int], int | None]:
    """``(removed, num_blocks)`` of the solution with rank ``rank`` in a ``qblock solve --json`` file.

    Everything that can be checked without the model is checked here (so before it is loaded) by
    :func:`qblock._solutions.read_solutions_file`: the file's shape, whole-number indices, no
    repeats, none negative.
    """
    from qblock._solutions import SolutionsFileError, read_solutions_file

    try:
        sols = read_solutions_file(path)
    except SolutionsFileError as exc:
        raise CliError(str(exc)) from None
    if not 1 <= rank <= len(sols.removed):
        raise CliError(f"--rank {rank}: {path} holds {len(sols.removed)} solution(s)")
    return sols.removed[rank - 1], sols.num_blocks


def removed_from_recommended(report_dir: str, m: int | None) -> tuple[list[int], Any, int | None]:
    """``(removed, model, num_blocks)``: the recommended set for M in a report folder's summary.json,
    and the model and block count recorded there.

    The set is checked as a solutions file's are (:func:`qblock._solutions.check_removed`: whole
    numbers, no repeats, none negative, M of them), so a damaged summary is one line naming the file,
    before any model is loaded.
    """
    from qblock._solutions import _whole

    p = Path(report_dir) / "summary.json"
    if not p.is_file():
        raise CliError(f"--recommended {report_dir}: no summary.json there (expected a `qblock run` report folder)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        rec = data.get("recommended") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise CliError(f"{p} is not a summary written by qblock run/validate") from None
    if not isinstance(rec, dict):
        raise CliError(f'{p} is not a summary written by qblock run/validate ("recommended" is not an object)')
    if not rec:
        raise CliError(f"{p} holds no recommended sets (was the selection switched off with --no-select?)")
    if m is None:
        raise CliError(f"--recommended needs --remove-count M; {p} recommends sets for M = {', '.join(rec)}")
    if str(m) not in rec:
        raise CliError(f"--remove-count {m}: {p} recommends sets only for M = {', '.join(rec)}")
    entry = rec[str(m)]
    if not isinstance(entry, dict) or "removed" not in entry:
        raise CliError(f'{p}: the recommended entry for M = {m} has no "removed" list')
    removed = check_removed(entry["removed"], f"{p} M = {m}", num_remove=m)
    problem = data.get("problem") if isinstance(data.get("problem"), dict) else {}
    n = problem.get("num_blocks")
    return removed, problem.get("model"), n if _whole(n) else None


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


def _model_spec(args: argparse.Namespace, recorded: Any) -> str:
    """``--model``, else the model a ``--recommended`` report records, else ``default``."""
    if args.model is not None or recorded is None:
        return args.model or "default"
    from qblock._provenance import Provenance

    spec = Provenance.of({"model": recorded}).model_spec
    if spec is None:
        raise CliError(f"{args.recommended} does not record a loadable model; pass --model")
    return spec


def _fit(chosen: tuple, n: int, source: str) -> list[int]:
    """A set from a file, checked against the loaded model's ``n`` blocks.

    Args:
        chosen: ``(removed, blocks the file was made for or None, what the file says, what to do)``.
        n: the model's blocks.
        source: the file, for the message.
    """
    removed, made_for, made, hint = chosen
    if made_for is not None and made_for != n:
        raise CliError(f"{made} but this model has {n} blocks; {hint}")
    bad = [i for i in removed if i >= n]
    if bad:
        raise CliError(f"{source}: blocks {bad} out of range for this model ({n} blocks); {hint}")
    return check_removed(removed, source, num_blocks=n)


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
    from qblock.cli._common import check_fresh_folder, check_output
    from qblock.llm.blocks import find_blocks
    from qblock.llm.export import save_pruned

    if args.solutions and args.rank < 1:
        raise CliError("--rank must be at least 1")
    if args.remove_count is not None and not args.recommended:
        raise CliError("--remove-count goes with --recommended REPORT_DIR")
    # the chosen set, checked as far as it can be without the model (so before loading it)
    recorded, chosen = None, None
    if args.recommended:
        removed, recorded, n = removed_from_recommended(args.recommended, args.remove_count)
        chosen = (removed, n, f"{args.recommended} was made for a model of {n} blocks",
                  "pass the model of that report with --model")
    elif args.solutions:
        removed, n = removed_from_solutions(args.solutions, args.rank)
        chosen = (removed, n, f"{args.solutions} was solved for {n} variables",
                  "was it solved for another model or per sub-layer?")
    spec = _model_spec(args, recorded)
    # the one --out rule: never the model read (--model D -o D --overwrite replaced it), nor the solutions
    check_output(args.out, "--out", inputs=[spec, args.solutions], folder=True)
    check_fresh_folder(args.out, "--out", args.overwrite)
    out = Path(args.out)
    model, tok = _load(spec, args.quiet)
    labels = [name for name, _ in find_blocks(model)]
    source = args.recommended or args.solutions
    removed = _fit(chosen, len(labels), source) if chosen else parse_remove(args.remove, labels)
    before = sum(p.numel() for p in model.parameters())
    save_pruned(model, tok, removed, out, check=not args.no_check, provenance=_provenance(spec),
                quiet=args.quiet)
    if not args.quiet:
        blocks_per = [sum(p.numel() for p in find_blocks(model)[i][1].parameters()) for i in removed]
        after = before - sum(blocks_per)
        print(f"removed {len(removed)} of {len(labels)} blocks: {', '.join(map(str, removed))}")
        print(f"parameters: {before:,} -> {after:,} ({100.0 * (before - after) / before:.1f}% fewer)")
        print(f"saved to {out}  (AutoModelForCausalLM.from_pretrained({str(out)!r}))")
        if tok is None:
            print("note: no tokenizer was found next to the model; none was saved")
    return 0
