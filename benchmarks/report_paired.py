"""Does a `qblock run` verdict hold on more held-out text? Paired per-sample differences on fresh samples.

A report of ``qblock run --quick`` judges qblock's recommended set against the baselines on 12 held-out
samples, too few to resolve differences below about 0.02 nats/token. For each M of each report given,
this measures qblock's set and the report's best baseline (and SLEB's set, the reference, where it is
another) on every one of the report's held-out samples and ``--samples`` more drawn after them from the
same seeded split (passages disjoint from calibration, checked), one loss per sample. The report's own
samples are a check (each set's mean there must equal the report's held-out loss); the verdict is the
mean of the per-sample differences (qblock minus baseline) on the fresh samples only, with its standard
error: the best baseline was picked on the report's samples, so judging it there again would favour it.

    python benchmarks/report_paired.py benchmarks/results/quick_default_seed2 benchmarks/results/quick_default_seed3 \\
        --samples 64 --out benchmarks/results/quick_paired_default

With ``--sleb-reference`` SLEB is first run again as qblock runs it now, as its reference code (never the
first or the last block; reports written before that change let it remove them), on the report's own greedy
samples; only the M where its set changed are compared, with the new set as the report's SLEB (its held-out
loss measured on the report's samples) and the best baseline re-picked among them:

    python benchmarks/report_paired.py benchmarks/results/quick_gemma3-270m_seed* --sleb-reference \\
        --out benchmarks/results/quick_paired_sleb_reference

Writes ``STEM.json`` and ``STEM.md``. Cost: two or three sets x (12 + N) held-out samples and as many sets x
the calibration samples per M where qblock's set differs from a baseline's, measured with qblock's own
prefix-cached evaluators (at most about 0.3 s per sample and set for SmolLM2-135M, 0.6 s for Gemma-3-270M;
fp32, 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selection_paired import _cell, _same, paired, write_results  # noqa: E402  (one home for the paired statistics)

def read_report(folder: Path) -> dict:
    """Settings, and the full model's and every candidate's held-out losses (means, and per sample where
    the table has them), from a ``qblock run`` output folder; the M without a qblock row or a baseline
    are left out."""
    from qblock.validate.baselines import BASELINE_METHODS
    from qblock.validate.report import read_table

    summary = json.loads((folder / "summary.json").read_text())
    rows = read_table(folder / "candidates.csv")
    per_m: dict[int, dict] = {}
    for r in rows:
        m, entry = int(r["num_remove"]), (sorted(r["removed"]), r["heldout_loss"], r.get("heldout_sample_losses"))
        if r["method"] == "qblock":
            per_m.setdefault(m, {}).update(qblock=entry, calib_loss=r["calib_loss"])
        elif r["method"] in BASELINE_METHODS:
            per_m.setdefault(m, {}).setdefault("baselines", {})[r["method"]] = entry
    full = next(r for r in rows if r["method"] == "full")
    seq_len = int(summary["problem"]["seq_len"])
    n_rep, rest = divmod(int(full["eval_tokens"]), seq_len - 1)
    if rest:
        raise ValueError(f"held-out samples are not all {seq_len} tokens long")
    return {"summary": summary, "per_m": {m: e for m, e in per_m.items() if "qblock" in e and "baselines" in e},
            "full": (full["removed"], full["heldout_loss"], full.get("heldout_sample_losses")), "n_rep": n_rep}


def rivals(entry: dict) -> dict[str, list[int]]:
    """The report's best baseline (by its held-out loss) and SLEB, each with its set (one entry per set).

    Example:
        >>> e = {"qblock": ([1, 2], 4.0), "baselines": {"sleb": ([1, 2], 4.0), "angular": ([2, 3], 3.9)}}
        >>> rivals(e)
        {'angular': [2, 3], 'sleb': [1, 2]}
    """
    best = min(entry["baselines"], key=lambda b: entry["baselines"][b][1])
    out = {}
    for name in (best, "sleb"):
        theirs = entry["baselines"].get(name, (None,))[0]
        if theirs is not None and theirs not in out.values():
            out[name] = theirs
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", help="`qblock run` output folders (summary.json and candidates.csv)")
    ap.add_argument("--samples", type=int, default=64, help="fresh held-out samples after the report's (default 64)")
    ap.add_argument("--calib-samples", type=int, default=None, metavar="N",
                    help="also compare on the first N calibration samples (default: the report's calibration samples, "
                         "all the data the run could choose on; more extend them from the same seeded stream)")
    ap.add_argument("--sleb-reference", action="store_true",
                    help="run SLEB again as its reference code (never the first or last block) on the report's greedy "
                         "samples and compare only the M where its set changed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.md")
    args = ap.parse_args(argv)
    if args.samples < 2:
        ap.error(f"--samples must be at least 2, got {args.samples}")
    if args.calib_samples is not None and args.calib_samples < 2:
        ap.error(f"--calib-samples must be at least 2, got {args.calib_samples}")
    reports = []
    for folder in map(Path, args.reports):
        try:
            reports.append((folder, read_report(folder)))
        except (OSError, ValueError, KeyError, StopIteration) as exc:
            ap.error(f"{folder} is not a `qblock run` output folder ({exc})")

    import torch

    torch.set_num_threads(args.threads)
    out = {"samples": args.samples, "sleb_reference": args.sleb_reference, "reports": []}
    if args.sleb_reference:
        from qblock.validate.baselines import SLEB_BARRIERS

        out["sleb_barriers"] = list(SLEB_BARRIERS)
    for folder, rep in reports:
        out["reports"].append(_one(folder, rep, args.samples, args.calib_samples, args.sleb_reference))
    stem = Path(args.out)
    write_results(stem, out, _markdown(out))
    return 0


def _one(folder: Path, rep: dict, fresh: int, n_cal: int | None, sleb_reference: bool = False) -> dict:
    """Measure one report's comparisons; check the report's held-out losses are reproduced."""
    from qblock.llm.data import calibration_and_eval
    from qblock.llm.models import load_model
    from qblock.validate.evaluate import CandidateEvaluator
    from qblock.validate.oracle import CalibrationLoss

    s = rep["summary"]
    prob, cfg = s["problem"], s["settings"]
    dtype = s["report_settings"].get("evaluation dtype", "fp32")
    model, tok = load_model(prob["model"]["spec"], quiet=True, dtype=dtype)
    n_rep = rep["n_rep"]
    n_cal = int(n_cal or prob["num_samples"])
    data = {"seq_len": prob["seq_len"], "seed": cfg["solve_seed"]}
    calib, evals, _ = calibration_and_eval(tok, None, num_calib=n_cal, num_eval=n_rep + fresh, **data)
    c0, e0, _ = calibration_and_eval(tok, None, num_calib=prob["num_samples"], num_eval=n_rep, **data)
    if not (_same(calib, c0) and _same(evals, e0)) or len(evals) != n_rep + fresh:
        raise SystemExit(f"{folder}: more samples changed the report's calibration or held-out samples")
    held, cal = _Split(CandidateEvaluator, model, evals, n_rep), CalibrationLoss(model, calib)  # per sample, prefix-cached
    _check(folder, "the full model", held.sample_losses([])[:n_rep], rep["full"])
    res = {"report": str(folder), "model": prob["model"]["id"], "seed": cfg["solve_seed"], "dtype": dtype,
           "report_samples": n_rep, "fresh_samples": fresh, "calibration_samples": n_cal,
           "run_calibration_samples": prob["num_samples"], "per_m": {}}
    if sleb_reference:
        greedy = int(cfg["greedy_samples"] or prob["num_samples"])  # None: the run's calibration samples, all
        res["sleb_as_reported"] = _reference_sleb(folder, model, calib[:greedy], rep, held, n_rep)
        rep = dict(rep, per_m={m: e for m, e in rep["per_m"].items() if str(m) in res["sleb_as_reported"]})
    for m, entry in sorted(rep["per_m"].items()):
        if entry["calib_loss"] is None:
            print(f"{folder.name}: M = {m}: qblock's row has no calibration loss to check; skipped", flush=True)
            continue
        res["per_m"][str(m)] = _compare(folder, held, cal, m, entry, n_rep, cfg["select_samples"])
        print(folder.name, m, res["per_m"][str(m)]["rivals"], flush=True)
    return res


class _Split:
    """Per-sample held-out losses with the report's samples batched on their own, as the run batched them: in
    bf16 a sample's loss depends on the shape of its batch (by up to about 0.01), so evaluating them beside the
    fresh ones would not reproduce the report."""

    def __init__(self, evaluator, model, samples: list, n_rep: int) -> None:
        self.parts = [evaluator(model, samples[:n_rep]), evaluator(model, samples[n_rep:])]

    def sample_losses(self, removed) -> list[float]:
        return [x for part in self.parts for x in part.sample_losses(removed)]


def _reference_sleb(folder: Path, model, greedy: list, rep: dict, held, n_rep: int) -> dict[str, list[int]]:
    """SLEB run again (qblock's, as its reference code) on the report's greedy samples. Where its set differs
    from the report's, the report's SLEB entry becomes the new set with its mean on the report's held-out
    samples. Returns ``{M: the report's SLEB set}`` for the M that changed."""
    from qblock.llm.blocks import find_blocks
    from qblock.validate.baselines import sleb, sleb_kept

    ends = sleb_kept(len(find_blocks(model)))
    ms = sorted(m for m, e in rep["per_m"].items() if "sleb" in e["baselines"])
    path = sleb(model, greedy, max(ms), progress=True) if ms else []
    changed = {}
    for m in ms:
        new, old = sorted(path[m - 1].removed), rep["per_m"][m]["baselines"]["sleb"][0]
        if new == old:
            continue
        if not ends & set(old):  # the same greedy path until it first took an end block: not the run's data
            raise SystemExit(f"{folder}: M = {m}: SLEB chose {new}, the report {old}, though that has neither "
                             "end block")
        xs = held.sample_losses(new)[:n_rep]
        rep["per_m"][m]["baselines"]["sleb"] = (new, sum(xs) / len(xs), xs)
        changed[str(m)] = old
    print(f"{folder.name}: SLEB as its reference code changed the set at M = {sorted(map(int, changed))}", flush=True)
    return changed


def _compare(folder: Path, held, cal, m: int, entry: dict, n_rep: int, loop_samples: int) -> dict:
    """qblock's set against its rivals at one M, sample by sample on held-out data (``held``, a
    CandidateEvaluator: the report's samples first, checked against the report) and on calibration data
    (``cal``, a CalibrationLoss: qblock's loop loss checked)."""
    ours_set = entry["qblock"][0]
    sleb_set, rv = entry["baselines"].get("sleb", (None,))[0], rivals(entry)
    holder = next((k for k, v in rv.items() if v == sleb_set), None)  # the rival listed with SLEB's set
    if all(theirs == ours_set for theirs in rv.values()):  # nothing to measure
        return {"qblock": ours_set, "sleb_rival": holder, "rivals": {k: {"removed": v, "same": True} for k, v in rv.items()}}
    ours = held.sample_losses(ours_set)
    _check(folder, f"M = {m} qblock {ours_set}", ours[:n_rep], entry["qblock"])
    _check(folder, f"M = {m} qblock's loop calibration loss", cal.sample_losses(ours_set)[:loop_samples],
           (None, entry["calib_loss"], None))
    rows = {}
    for name, theirs in rv.items():
        if theirs == ours_set:
            rows[name] = {"removed": theirs, "same": True}
            continue
        b = held.sample_losses(theirs)
        _check(folder, f"M = {m} {name} {theirs}", b[:n_rep], entry["baselines"][name])
        rows[name] = {"removed": theirs, "report": paired(ours[:n_rep], b[:n_rep]), "fresh": paired(ours[n_rep:], b[n_rep:]),
                      "calibration": paired(cal.sample_losses(ours_set), cal.sample_losses(theirs))}
    return {"qblock": ours_set, "sleb_rival": holder, "rivals": rows}


def _check(folder: Path, what: str, xs: list[float], reported: tuple, tol: float = 2e-3) -> None:
    """The report's held-out loss reproduced: sample by sample where the table has per-sample losses,
    else the mean (runs on their own ``--calibration`` text, other gates or dtypes are not supported)."""
    mean, per = sum(xs) / len(xs), reported[2]
    off = max(abs(x - y) for x, y in zip(xs, per)) if per else abs(mean - reported[1])
    if off > tol or (per and len(per) != len(xs)):
        raise SystemExit(f"{folder}: {what}: {mean:.4f} on the report's held-out samples, the report says "
                         f"{reported[1]:.4f}: not the run's model, text, seed, gate or dtype (only `qblock run` on "
                         "its packaged text is supported)")


def _markdown(out: dict) -> str:
    lines = ["# qblock's recommended set against the report's best baseline and SLEB, on fresh held-out samples", "",
             f"Each set measured on the report's held-out samples and {out['samples']} more from the same seeded split "
             "(passages disjoint from calibration), one loss per sample; mean of qblock's minus the baseline's "
             "± standard error, nats/token (negative: qblock's set is better). The fresh column is the verdict: "
             "the best baseline was picked on the report's samples. A difference inside about two standard "
             "errors is not resolved. The calibration column compares the same two sets on the first "
             "calibration samples (the run chose on at most its own; qblock's set was picked as the lowest there, so "
             "that column is biased in its favour). The baselines are the report's own (with `--quick`, SLEB and iterative ShortGPT "
             "chose on 2 calibration samples).", ""]
    if out.get("sleb_reference"):
        lines += ["SLEB run again as its reference code (never the first or the last block; the reports' SLEB could "
                  "remove them) on each report's greedy samples; only the M where its set changed are here, with the "
                  "report's best baseline picked again among the report's baselines and the new SLEB set.", ""]
    lines += ["| model | seed | M | qblock | baseline | report's held-out samples | fresh held-out samples | calibration samples "
              "| verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in out["reports"]:
        for m, row in r["per_m"].items():
            ours = ",".join(map(str, row["qblock"]))
            for name, c in row["rivals"].items():
                theirs = "the same set" if c.get("same") else ",".join(map(str, c["removed"]))
                if name == "sleb" and m in r.get("sleb_as_reported", {}):
                    theirs += "; the report's: " + ",".join(map(str, r["sleb_as_reported"][m]))
                lines.append(f"| {r['model']} | {r['seed']} | {m} | {ours} | {name} ({theirs}) "
                             f"| {_cell(c.get('report'))} | {_cell(c.get('fresh'))} | {_cell(c.get('calibration'))} "
                             f"| {verdict(c)} |")
    lines += ["", "Verdicts on the fresh samples (better or worse: by more than twice the standard error), per (model, "
              "seed, M):", ""] + [f"- against {k}: {v}" for k, v in tally(out).items()]
    return "\n".join(lines) + "\n"


def verdict(c: dict) -> str:
    """One comparison's verdict on the fresh samples, by the rule of every "resolved" in qblock's reports.

    Example:
        >>> verdict({"same": True}), verdict({"fresh": {"diff": -0.03, "se": 0.01}})
        ('same set', 'better')
        >>> verdict({"fresh": {"diff": 0.01, "se": 0.01}})
        'not resolved'
    """
    from qblock.validate.stats import _resolved

    if c.get("same"):
        return "same set"
    d = c["fresh"]
    return ("better" if d["diff"] < 0 else "worse") if _resolved(d["diff"], d["se"]) else "not resolved"


def tally(out: dict) -> dict[str, str]:
    """Counts of the verdicts against the report's best baseline (its first rival) and against SLEB (rows
    written before ``sleb_rival`` was recorded count SLEB only where it is listed by name).

    Example:
        >>> worse = {"removed": [1], "fresh": {"diff": 0.05, "se": 0.01}}
        >>> rows = {"3": {"sleb_rival": "sleb", "rivals": {"sleb": {"same": True}}},       # SLEB is the best
        ...         "6": {"sleb_rival": "angular", "rivals": {"angular": worse}},       # SLEB's set under another name
        ...         "9": {"sleb_rival": None, "rivals": {"angular": {"same": True}}}}  # no SLEB at this M
        >>> tally({"reports": [{"per_m": rows}]})["SLEB"]
        '0 better, 1 same set, 0 not resolved, 1 worse of 2'
        >>> tally({"reports": [{"per_m": rows}]})["the report's best baseline"]
        '0 better, 2 same set, 0 not resolved, 1 worse of 3'
    """
    counts: dict[str, dict[str, int]] = {"the report's best baseline": {}, "SLEB": {}}
    for r in out["reports"]:
        for row in r["per_m"].values():
            first = next(iter(row["rivals"].values()))
            sleb_ = row["rivals"].get(row.get("sleb_rival") or "sleb")
            for who, c in (("the report's best baseline", first), ("SLEB", sleb_)):
                if c is not None:
                    v = verdict(c)
                    counts[who][v] = counts[who].get(v, 0) + 1
    order = ("better", "same set", "not resolved", "worse")
    return {k: ", ".join(f"{v.get(o, 0)} {o}" for o in order) + f" of {sum(v.values())}" for k, v in counts.items()}


if __name__ == "__main__":
    raise SystemExit(main())
