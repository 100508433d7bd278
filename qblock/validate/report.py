"""Writing and reading the per-candidate table (JSON, CSV, markdown) and the summary report.

The CSV is the ground truth a reader can recompute everything from: floats are written with
``repr`` (exact round trip), the removal set as space-separated block indices.

Example:
    >>> import tempfile, os
    >>> rows = [{"num_remove": 1, "method": "qubo", "rank": 1, "seed": None, "removed": [2],
    ...          "energy": 0.125, "heldout_loss": 2.0, "perplexity": 7.38905609893065}]
    >>> d = tempfile.mkdtemp()
    >>> _ = write_table(rows, d)
    >>> back = read_table(os.path.join(d, "candidates.csv"))
    >>> back[0]["removed"], back[0]["energy"], back[0]["rank"]
    ([2], 0.125, 1)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from qblock.validate.stats import MEASURED_METHOD, QUBO_METHOD, REFERENCE_METHOD, energy_columns, parse_removed

__all__ = ["BASE_COLUMNS", "columns", "write_table", "read_table", "markdown_table", "render_report", "runner_up_text"]

#: columns every table has, in this order; energy_<model>, acc_<task>, acc_norm_<task> columns follow
BASE_COLUMNS = (
    "num_remove", "method", "rank", "seed", "removed", "energy", "heldout_loss", "perplexity",
    "eval_tokens", "cost_forward_passes", "cost_backward_passes", "cost_calib_samples", "cost_seconds",
)
_INT_COLUMNS = {"num_remove", "rank", "seed", "eval_tokens", "cost_forward_passes", "cost_backward_passes",
                "cost_calib_samples", "num_items", "cost_forward_tokens", "cost_backward_tokens", "confirm_samples",
                "runner_up_samples"}
_STR_COLUMNS = {"method", "note"}
#: lists (space-separated in the CSV): each held-out sample's loss and token count, for paired comparisons;
#: the confirmation's runner-up set
_FLOAT_LIST_COLUMNS = {"heldout_sample_losses"}
_INT_LIST_COLUMNS = {"heldout_sample_tokens", "runner_up"}


def columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Base columns, then energy columns, then accuracy columns, then anything else, in stable order."""
    extra = []
    for r in rows:
        for k in r:
            if k not in BASE_COLUMNS and k not in extra:
                extra.append(k)
    en = [c for c in energy_columns(rows) if c != "energy"]
    acc = sorted(k for k in extra if k.startswith("acc_"))
    rest = [k for k in extra if k not in en and k not in acc]
    return list(BASE_COLUMNS) + en + acc + rest


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return " ".join(repr(float(i)) if isinstance(i, float) else str(int(i)) for i in v)
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _json_value(v: Any) -> Any:
    try:
        import numpy as np

        if isinstance(v, np.integer):
            return int(v)
        if isinstance(v, np.floating):
            return float(v)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]  # strict JSON: no NaN inside a list either
    return v


def write_table(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, stem: str = "candidates") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.md`` into ``out_dir`` (atomically)."""
    from qblock._io import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = columns(rows)
    clean = [{c: _json_value(r.get(c)) for c in cols} for r in rows]
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}
    atomic_write_bytes(paths["json"], (json.dumps({"columns": cols, "rows": clean}, indent=1) + "\n").encode())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in clean:
        w.writerow([_cell(r.get(c)) for c in cols])
    atomic_write_bytes(paths["csv"], buf.getvalue().encode())
    atomic_write_bytes(paths["md"], (markdown_table(rows) + "\n").encode())
    return paths


def _parse_cell(col: str, s: str) -> Any:
    if col == "removed":
        return parse_removed(s)
    if s == "":
        return None
    if col in _FLOAT_LIST_COLUMNS:
        return [float(t) for t in s.split()]
    if col in _INT_LIST_COLUMNS:
        return [int(t) for t in s.split()]
    if col in _STR_COLUMNS:
        return s
    if col in _INT_COLUMNS:
        return int(s)
    try:
        return float(s)
    except ValueError:
        return s


def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a table written by :func:`write_table` (``.csv`` or ``.json``) back into rows."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        rows = data["rows"] if isinstance(data, dict) else data
        return [dict(r, removed=parse_removed(r["removed"])) for r in rows]
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return [{c: _parse_cell(c, v) for c, v in r.items()} for r in reader]


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)):
        return ",".join(str(int(i)) for i in v)
    return str(v)


def _label(r: Mapping[str, Any]) -> str:
    m = str(r["method"])
    if m == QUBO_METHOD and r.get("rank") is not None:
        return f"QUBO #{int(r['rank'])}"
    if m == MEASURED_METHOD and r.get("rank") is not None:
        return f"measured #{int(r['rank'])}"
    if m == "random" and r.get("seed") is not None:
        return f"random s{int(r['seed'])}"
    return m


def markdown_table(rows: Sequence[Mapping[str, Any]], *, num_remove: int | None = None) -> str:
    """A markdown table of the candidates (optionally only those at one M), sorted by M then table order."""
    sel = [r for r in rows if num_remove is None or int(r["num_remove"]) == int(num_remove)]
    accs = sorted({k for r in sel for k in r if k.startswith("acc_") and r.get(k) is not None})
    ens = [c for c in energy_columns(sel) if c != "energy"]
    calib = any(r.get("calib_loss") is not None for r in sel)
    conf = any(r.get("confirm_loss") is not None for r in sel)
    healed = any(r.get("heldout_loss_healed") is not None for r in sel)  # qblock.validate.heal's column
    head = (["M", "candidate", "removed", "energy"] + ens + (["calib. loss"] if calib else [])
            + (["confirmed calib. loss (samples)"] if conf else []) + ["held-out loss", "ppl"]
            + (["healed loss"] if healed else []) + accs + ["cost (fwd/bwd passes)", "fwd tokens"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sel:
        cost = "-"
        if r.get("cost_forward_passes") is not None:
            cost = f"{int(r['cost_forward_passes'])}/{int(r.get('cost_backward_passes') or 0)}"
            if r.get("cost_calib_samples"):
                cost += f" x {int(r['cost_calib_samples'])} samples"
        cells = [str(r["num_remove"]), _label(r), _fmt(r.get("removed")), _fmt(r.get("energy"), 5)]
        cells += [_fmt(r.get(c), 5) for c in ens] + ([_fmt(r.get("calib_loss"))] if calib else [])
        cells += [_confirmed(r.get("confirm_loss"), r.get("confirm_samples"))] if conf else []
        cells += [_fmt(r.get("heldout_loss")), _fmt(r.get("perplexity"), 2)]
        cells += [_fmt(r.get("heldout_loss_healed"))] if healed else []
        toks = r.get("cost_forward_tokens")
        cells += [_fmt(r.get(a), 3) for a in accs] + [cost, f"{int(toks):,}" if toks is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _confirmed(loss: Any, samples: Any) -> str:
    """A confirmed loss with the number of samples it averages (racing measures the best on more)."""
    return _fmt(loss) + (f" ({int(samples)})" if loss is not None and samples else "")


def runner_up_text(up: Mapping[str, Any] | None) -> str:
    """``"4,7,8: +0.0364 ± 0.0281, not resolved (about 48 samples would)"``: the confirmation's second set,
    its margin and, where the margin is not resolved, about how many calibration samples would resolve one
    of that size (:func:`qblock.validate.stats.samples_to_resolve`; a margin within one standard error:
    "more than 4x the samples").

    Example:
        >>> runner_up_text({"removed": [4, 7], "calibration_margin": 0.05, "calibration_margin_se": 0.01,
        ...                 "resolved": True})
        '4,7: +0.0500 ± 0.0100'
        >>> runner_up_text({"removed": [4, 8], "calibration_margin": 0.01, "calibration_margin_se": 0.01,
        ...                 "resolved": False, "samples": 24, "samples_to_resolve": 96})
        '4,8: +0.0100 ± 0.0100, not resolved (about 96 samples would)'
        >>> runner_up_text({"removed": [4, 9], "calibration_margin": 0.001, "calibration_margin_se": 0.01,
        ...                 "resolved": False, "samples": 24, "samples_to_resolve": None})
        '4,9: +0.0010 ± 0.0100, not resolved (more than 4x the samples would be needed)'
    """
    if not up:
        return "-"
    se, need = up.get("calibration_margin_se"), up.get("samples_to_resolve")
    hint = ""
    if not up.get("resolved") and up.get("samples"):
        hint = f" (about {need:,} samples would)" if need else " (more than 4x the samples would be needed)"
    return (f"{_fmt(up['removed'])}: {up['calibration_margin']:+.4f}" + (f" ± {se:.4f}" if se is not None else "")
            + ("" if up.get("resolved") else ", not resolved") + hint)


def _ci(c: Mapping[str, Any], key: str) -> str:
    v = c.get(key)
    if v is None:
        return "n/a"
    ci = c.get(f"{key}_ci")
    s = f"{v:+.3f}"
    if ci:
        s += f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
    return s


def render_report(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], *, title: str = "qblock validation",
                  settings: Mapping[str, Any] | None = None, plots: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    """The markdown report: settings, per-M candidate tables (QUBO and baselines side by side),
    rank correlations with bootstrap intervals, and the best-candidate statements."""
    out = [f"# {title}", ""]
    rec = summary.get("recommended") or {}
    if rec:
        out += ["## What to remove", "",
                "qblock's recommended set per M: the lowest calibration loss it measured (with a confirmation, the "
                "lowest of its best few sets re-measured on more calibration samples, the closest raced on more "
                "still); held-out data only reports.",
                "", "| M | remove blocks | calibration loss | confirmed calib. loss (samples) | runner-up: its "
                "confirmed loss minus this one's | held-out loss | forward tokens to choose | method |",
                "|---|---|---|---|---|---|---|---|"]
        for m_key, v in rec.items():
            out.append(f"| {m_key} | {_fmt(v['removed'])} | {_fmt(v['calibration_loss'])} "
                       f"| {_confirmed(v.get('confirmation_loss'), v.get('confirmation_samples'))} "
                       f"| {runner_up_text(v.get('runner_up'))} | {_fmt(v['heldout_loss'])} "
                       f"| {v['selection_tokens']:,} | {v['method']} |")
        out += ["", "Prune with `qblock prune --recommended <this folder> --remove-count M`.", ""]
    if settings:
        out += ["## Settings", ""]
        out += [f"- **{k}**: {v}" for k, v in settings.items()]
        out.append("")
    ref = [r for r in rows if r["method"] == REFERENCE_METHOD]
    if ref:
        r = ref[0]
        out += [f"Full model (nothing removed): held-out loss {_fmt(r.get('heldout_loss'))}, "
                f"perplexity {_fmt(r.get('perplexity'), 2)}"
                + "".join(f", {k} {_fmt(r[k], 3)}" for k in sorted(r) if k.startswith("acc_") and r[k] is not None), ""]
    per_m = summary.get("per_m", {})
    for m_key in sorted(per_m, key=int):
        s = per_m[m_key]
        out += [f"## Remove M = {m_key} blocks", ""]
        out += [markdown_table([r for r in rows if r["method"] != REFERENCE_METHOD], num_remove=int(m_key)), ""]
        best = s.get("best", {})
        if best.get("statement"):
            out += [f"**{best['statement']}.**", ""]
        corr = s.get("correlations", {})
        if corr:
            n_boot = summary.get("n_boot")
            out += [f"Rank correlation with held-out loss over the {s.get('num_candidates')} distinct candidates "
                    f"(95% bootstrap interval, {n_boot} resamples):", "",
                    "| energy model | n | Spearman | Kendall |", "|---|---|---|---|"]
            for col, c in corr.items():
                name = "problem energy" if col == "energy" else col[len("energy_"):].replace("_grad", "+grad")
                out.append(f"| {name} | {c['n']} | {_ci(c, 'spearman')} | {_ci(c, 'kendall')} |")
            out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).with_suffix('').as_posix()}]({Path(p).as_posix()})"
                                   for p in plots] + [""]
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    out += ["All numbers above are recomputable from `candidates.csv` with "
            "`qblock.validate.stats.summarize(qblock.validate.report.read_table('candidates.csv'))`.", ""]
    return "\n".join(out)

