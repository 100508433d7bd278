"""Validation after healing: does the ranking of removal sets persist after a short distillation?

A step that runs after :func:`qblock.validate.runner.validate` (``qblock validate`` / ``qblock run``
with ``--heal-steps N``): per M it takes qblock's recommended set, the top ``K`` QUBO states and the
``K`` best baselines (by held-out loss), heals each pruned model with the same budget on the same
training samples (:func:`qblock.llm.heal.heal`, the full model as teacher, calibration passages
disjoint from the held-out ones) and evaluates it again on the same held-out samples. It adds the
columns ``heldout_loss_healed`` and ``perplexity_healed`` to the candidates table, a section "After
healing" to ``report.md`` and ``"healing"`` to ``summary.json``: per M the before/after table, the
Spearman and Kendall correlation between the losses before and after (with bootstrap intervals),
and whether the best candidate stayed the best. Like every other statistic, these are a pure
function of the table (:func:`heal_summary`).

Importing this module does not import torch.

Example:
    >>> rows = [{"num_remove": 2, "method": m, "rank": r, "removed": s, "heldout_loss": b,
    ...          "heldout_loss_healed": a}
    ...         for m, r, s, b, a in [("qblock", None, [1, 2], 3.0, 2.5), ("qubo", 1, [2, 3], 3.4, 2.7),
    ...                               ("sleb", None, [0, 3], 3.2, 2.6), ("angular", None, [0, 1], 3.9, 3.0)]]
    >>> s = heal_summary(rows, n_boot=100)["per_m"]["2"]
    >>> s["spearman"], s["best_before"]["method"], s["same_best"]
    (1.0, 'qblock', True)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from qblock.problems.block_removal import removal_key
from qblock.validate.stats import QUBO_METHOD, REFERENCE_METHOD, SELECT_METHOD, is_baseline, rank_correlation

__all__ = ["HEALED", "add_heal_options", "heal_options", "choose_candidates", "heal_after_validation",
           "heal_summary", "render_heal_section", "print_heal_summary"]

#: the table columns this step adds
HEALED = "heldout_loss_healed"
HEALED_PPL = "perplexity_healed"


def add_heal_options(p: argparse.ArgumentParser) -> None:
    """``--heal-steps``, ``--heal-tokens``, ``--heal-top``, ``--heal-mode``, ``--heal-batch-size``."""
    g = p.add_argument_group("validation after healing (see qblock heal)")
    g.add_argument("--heal-steps", type=int, default=0, metavar="N",
                   help="heal qblock's recommended set, the top --heal-top QUBO states and the --heal-top best "
                        "baselines of every M with N distillation steps each (the same data and budget for all) and "
                        "evaluate them again on the held-out samples: before/after columns, a report section and the "
                        "rank correlation between before and after (default 0: off)")
    g.add_argument("--heal-tokens", type=int, default=None, metavar="T",
                   help="the healing budget in tokens instead of steps (rounded up to whole steps)")
    g.add_argument("--heal-top", type=int, default=2, metavar="K",
                   help="QUBO states and baselines healed per M (default 2 each, plus the recommended set)")
    g.add_argument("--heal-mode", default="full", choices=("full", "lora", "last"),
                   help="what healing trains (default full; see qblock heal --help)")
    g.add_argument("--heal-batch-size", type=int, default=4, metavar="B", help="samples per healing step (default 4)")


def heal_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The healing options, checked (``None`` when healing is off); one-line ``CliError`` on a bad value."""
    from qblock.cli import CliError

    steps, tokens = int(args.heal_steps or 0), args.heal_tokens
    if steps < 0 or (tokens is not None and tokens < 1):
        raise CliError("--heal-steps must be >= 0 and --heal-tokens >= 1")
    if steps and tokens is not None:
        raise CliError("pass --heal-steps or --heal-tokens, not both")
    if not steps and tokens is None:
        return None
    if args.heal_top < 0 or args.heal_batch_size < 1:
        raise CliError("--heal-top must be >= 0 and --heal-batch-size >= 1")
    if args.heal_mode == "lora":
        from qblock._lazy import require

        require("peft", "heal")
    return {"steps": steps or None, "tokens": tokens, "top": int(args.heal_top), "mode": args.heal_mode,
            "batch_size": int(args.heal_batch_size)}


def choose_candidates(rows: Sequence[Mapping[str, Any]], top: int) -> dict[int, list[tuple[int, ...]]]:
    """Per M, the distinct removal sets to heal: the recommended set, QUBO ranks 1..top, the ``top`` best baselines.

    Example:
        >>> rows = [{"num_remove": 1, "method": "qubo", "rank": 1, "removed": [3], "heldout_loss": 2.0},
        ...         {"num_remove": 1, "method": "sleb", "removed": [3], "heldout_loss": 2.0},
        ...         {"num_remove": 1, "method": "angular", "removed": [0], "heldout_loss": 2.5}]
        >>> choose_candidates(rows, 1)
        {1: [(3,)]}
    """
    out: dict[int, list[tuple[int, ...]]] = {}
    for m in sorted({int(r["num_remove"]) for r in rows if r["method"] != REFERENCE_METHOD}):
        at = [r for r in rows if int(r["num_remove"]) == m and _finite(r.get("heldout_loss"))]
        rec = [r for r in at if r["method"] == SELECT_METHOD]
        qubo = sorted((r for r in at if r["method"] == QUBO_METHOD), key=lambda r: int(r.get("rank") or 0))[:top]
        bases = sorted((r for r in at if is_baseline(str(r["method"]))), key=lambda r: float(r["heldout_loss"]))
        seen: list[tuple[int, ...]] = []
        picked_bases = 0
        for r in rec + qubo:
            _add(seen, r)
        for r in bases:
            if picked_bases >= top:
                break
            key = removal_key(r["removed"])
            picked_bases += 1
            if key not in seen:
                seen.append(key)
        out[m] = seen
    return out


def _add(seen: list, r: Mapping[str, Any]) -> None:
    key = removal_key(r["removed"])
    if key not in seen:
        seen.append(key)


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))


def heal_after_validation(result: dict[str, Any], model, tokenizer, evals: Sequence[Any], data_provenance: Mapping,
                          out_dir: str | Path, options: Mapping[str, Any], *, n_boot: int = 2000, seed: int = 0,
                          batch_size: int = 8, progress: bool = True, write_summary: bool = True) -> dict[str, Any]:
    """Heal the chosen candidates of a finished validation and add the "after" columns, section and summary.

    Args:
        result: what :func:`qblock.validate.runner.validate` returned (its rows gain the healed columns).
        model, tokenizer: the full model (the teacher; never modified) and its tokenizer.
        evals: the held-out samples the validation used.
        data_provenance: the provenance :func:`qblock.validate.runner.data_for_problem` returned
            (calibration source and seq_len, held-out passages to keep out of the training data).
        out_dir: the validation's output folder (table, report.md and summary.json are updated).
        options: :func:`heal_options`.
        n_boot, seed: bootstrap of the correlation intervals.
        batch_size: evaluation batch size.
        progress: messages and a bar on stderr.
        write_summary: rewrite ``summary.json`` with the healing entry now (into ``result["summary_json"]``,
            or, for a result without one, into the ``summary.json`` already in ``out_dir``, which then becomes
            ``result["summary_json"]``); ``False`` only adds it to ``result["summary_json"]``, for a caller
            that writes the file once at the end (:func:`qblock.validate.runner.write_summary_json`).

    Returns:
        The ``"healing"`` summary (also in ``result["healing"]`` and ``result["summary_json"]``).
    """
    from qblock.llm.export import remove_blocks
    from qblock.llm.data import source_of
    from qblock.llm.heal import HealError, HealSettings, heal, heal_data
    from qblock.validate.evaluate import heldout_loss
    from qblock.validate.runner import ValidationError

    t0 = time.perf_counter()
    rows = result["rows"]
    cal = dict(data_provenance.get("calibration") or {})
    seq_len = int(cal.get("seq_len") or max(len(s) for s in evals))
    settings = HealSettings(mode=options["mode"], steps=options["steps"], batch_size=options["batch_size"],
                            seq_len=seq_len, seed=seed)
    if options.get("tokens") is not None:
        settings.tokens = int(options["tokens"])
    steps = settings.num_steps()
    source = source_of(cal)
    exclude = (data_provenance.get("evaluation") or {}).get("passages") or []
    try:
        train, _, dprov = heal_data(tokenizer, source, num_samples=steps * settings.batch_size, seq_len=seq_len,
                                    seed=seed, eval_samples=0, exclude=exclude)
    except (HealError, ValueError) as exc:
        raise ValidationError(f"healing data: {exc}") from None
    chosen = choose_candidates(rows, int(options["top"]))
    todo = [(m, key) for m, keys in chosen.items() for key in keys]
    _log(f"healing {len(todo)} candidates ({steps} steps x {settings.batch_size} x {seq_len} tokens each, "
         f"{settings.mode} fine-tuning, teacher: the full model)", progress)
    bar = _bar(len(todo), progress)
    healed: dict[tuple[int, tuple[int, ...]], dict[str, Any]] = {}
    was = model.training
    try:
        for m, key in todo:
            student = remove_blocks(model, key)
            res = heal(student, model, train, settings, progress=False)
            loss, _ = heldout_loss(res.model, evals, batch_size=batch_size)
            healed[(m, key)] = {"loss": loss, "first": res.history[0]["loss"], "last": res.history[-1]["loss"],
                                "seconds": res.seconds, "lr": res.lr, "mode": res.mode}
            del student, res
            if bar is not None:
                bar.update(1)
    except HealError as exc:
        raise ValidationError(f"healing: {exc}") from None
    finally:
        if bar is not None:
            bar.close()
        model.train(was)
    for r in rows:
        h = healed.get((int(r["num_remove"]), removal_key(r["removed"])))
        if h is not None:
            r[HEALED] = h["loss"]
            r[HEALED_PPL] = math.exp(h["loss"])
    summary = heal_summary(rows, n_boot=n_boot, seed=seed)
    first = next(iter(healed.values()), {})
    summary["settings"] = {"steps": steps, "tokens_per_candidate": steps * settings.batch_size * seq_len,
                           "batch_size": settings.batch_size, "seq_len": seq_len, "mode": first.get("mode"),
                           "peak_lr": first.get("lr"), "top": int(options["top"]),
                           "data": {k: dprov.get(k) for k in ("name", "file", "seed")},
                           "train_samples": dprov["train"]["num_samples"],
                           "excluded_heldout_passages": len(exclude)}
    summary["seconds"] = time.perf_counter() - t0
    _write(result, rows, summary, Path(out_dir), write_summary)
    result["healing"] = summary
    result.setdefault("timings", {})["healing"] = summary["seconds"]
    return summary


def heal_summary(rows: Sequence[Mapping[str, Any]], *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Per M: the healed candidates (before, after), their rank correlation and the best before and after.

    Computed from the table alone (``heldout_loss`` and ``heldout_loss_healed``), one point per
    distinct removal set; a correlation needs at least 3 of them.
    """
    per_m: dict[str, Any] = {}
    for m in sorted({int(r["num_remove"]) for r in rows if r["method"] != REFERENCE_METHOD}):
        seen: set[tuple[int, ...]] = set()
        pts = []
        for r in rows:
            key = removal_key(r["removed"])
            if int(r["num_remove"]) != m or key in seen or not (_finite(r.get(HEALED)) and _finite(r.get("heldout_loss"))):
                continue
            seen.add(key)
            pts.append({"method": str(r["method"]), "rank": r.get("rank"), "removed": list(key),
                        "before": float(r["heldout_loss"]), "after": float(r[HEALED])})
        if not pts:
            continue
        corr = rank_correlation([p["before"] for p in pts], [p["after"] for p in pts], n_boot=n_boot, seed=seed)
        best_b = min(pts, key=lambda p: p["before"])
        best_a = min(pts, key=lambda p: p["after"])
        per_m[str(m)] = {"n": len(pts), "spearman": corr["spearman"], "spearman_ci": corr["spearman_ci"],
                         "kendall": corr["kendall"], "kendall_ci": corr["kendall_ci"], "candidates": pts,
                         "best_before": best_b, "best_after": best_a, "same_best": best_b is best_a}
    return {"per_m": per_m, "n_boot": int(n_boot), "seed": int(seed)}


def _name(p: Mapping[str, Any]) -> str:
    if p["method"] == QUBO_METHOD and p.get("rank") is not None:
        return f"QUBO #{int(p['rank'])}"
    if p["method"] == SELECT_METHOD:
        return "qblock (recommended)"
    return str(p["method"])


def _corr_text(s: Mapping[str, Any]) -> str:
    if s.get("spearman") is None:
        return f"rank correlation n/a ({s['n']} candidate(s); needs 3 with distinct losses)"
    ci = s.get("spearman_ci")
    kci = s.get("kendall_ci")
    return (f"Spearman(before, after) = {s['spearman']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")
            + f", Kendall = {s['kendall']:+.3f}" + (f" [{kci[0]:+.3f}, {kci[1]:+.3f}]" if kci else "")
            + f" over {s['n']} candidates")


def render_heal_section(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """The "After healing" section of report.md: settings, per-M before/after tables, correlations."""
    st = summary.get("settings", {})
    full = [r for r in rows if r["method"] == REFERENCE_METHOD and _finite(r.get("heldout_loss"))]
    out = ["## After healing", "",
           f"Each candidate below was healed with the same budget ({st.get('steps')} steps x {st.get('batch_size')} x "
           f"{st.get('seq_len')} = {st.get('tokens_per_candidate', 0):,} tokens of distillation from the full model, "
           f"KL(teacher || student), {st.get('mode')} fine-tuning, peak lr {st.get('peak_lr')}, the same "
           f"{st.get('train_samples')} training samples for all, from calibration passages disjoint from the held-out "
           "ones) and evaluated again on the same held-out samples. Before: the pruned model as evaluated above.", ""]
    if full:
        out += [f"Full model held-out loss: {float(full[0]['heldout_loss']):.4f}.", ""]
    for m_key, s in summary.get("per_m", {}).items():
        out += [f"### M = {m_key}", "", "| candidate | removed | held-out loss before | after healing | change |",
                "|---|---|---|---|---|"]
        for p in sorted(s["candidates"], key=lambda p: p["before"]):
            out.append(f"| {_name(p)} | {','.join(map(str, p['removed']))} | {p['before']:.4f} | {p['after']:.4f} "
                       f"| {p['after'] - p['before']:+.4f} |")
        b, a = s["best_before"], s["best_after"]
        out += ["", f"{_corr_text(s)}. Best before healing: {_name(b)} [{','.join(map(str, b['removed']))}]; "
                    f"best after: {_name(a)} [{','.join(map(str, a['removed']))}]"
                    + (" (the same set)." if s["same_best"] else " (a different set)."), ""]
    out += ["These numbers are recomputable from `candidates.csv` (columns `heldout_loss`, `heldout_loss_healed`) with "
            "`qblock.validate.heal.heal_summary`.", ""]
    return "\n".join(out)


def _write(result: Mapping[str, Any], rows, summary: Mapping[str, Any], out: Path, write_summary: bool) -> None:
    """The healed columns into the table, the section into report.md and the entry into the summary."""
    from qblock._io import atomic_write_bytes
    from qblock.validate import report
    from qblock.validate.runner import write_summary_json

    paths = report.write_table(rows, out)
    md_path = out / "report.md"
    md = md_path.read_text() if md_path.is_file() else ""
    marker = "## After healing"
    if marker in md:  # a re-run into the same folder: replace the section, keep the rest
        head, _, tail = md.partition(marker)
        rest = tail.split("\n## ", 1)
        md = head + ("## " + rest[1] if len(rest) > 1 else "")
    atomic_write_bytes(md_path, (md.rstrip("\n") + "\n\n" + render_heal_section(rows, summary)).encode())
    data = result.get("summary_json")
    on_disk = out / "summary.json"
    if data is None and write_summary and on_disk.is_file():  # a result dict of the caller's own making
        try:
            loaded = json.loads(on_disk.read_text())
        except (OSError, ValueError):
            loaded = None  # not a summary this can extend: left as it is
        if isinstance(loaded, dict):
            data = result["summary_json"] = loaded
    if data is not None:  # what validate() returned; the file is written from it
        data["healing"] = summary
        data.setdefault("files", {}).setdefault("table", {}).update({k: str(v) for k, v in paths.items()})
        if write_summary:
            write_summary_json(out, data)


def print_heal_summary(result: Mapping[str, Any], file=None) -> None:
    """Print the before/after table per M and the correlation (nothing when healing was off)."""
    s = result.get("healing")
    if not s:
        return
    file = file or sys.stdout
    st = s.get("settings", {})
    print(f"\nafter healing ({st.get('steps')} steps, {st.get('tokens_per_candidate', 0):,} tokens per candidate, "
          f"{st.get('mode')}):", file=file)
    for m_key, v in s["per_m"].items():
        print(f"  M = {m_key}", file=file)
        for p in sorted(v["candidates"], key=lambda p: p["before"]):
            print(f"    {_name(p):<22} {','.join(map(str, p['removed'])):<24} {p['before']:8.4f} -> {p['after']:8.4f}",
                  file=file)
        print(f"    {_corr_text(v)}; best {'unchanged' if v['same_best'] else 'changed'} by healing", file=file)


def _log(msg: str, on: bool) -> None:
    if on:
        print(f"qblock: {msg}", file=sys.stderr, flush=True)


def _bar(total: int, on: bool):
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="healing candidates", unit="model")
