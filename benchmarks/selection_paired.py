"""How sure is a verdict of `selection_recheck.py`? Paired per-sample differences with standard errors.

For each M of a re-check, the loss of qblock's recommended set and of the best baseline's set is
measured on every held-out sample and on the calibration samples the confirmation used, one sample at a
time. The mean of the per-sample differences (qblock minus baseline; all samples have the same length,
so it equals the difference of the token-weighted losses up to batching noise), its standard error and
the number of samples on which qblock's set is better say whether a difference of 0.01 nats/token is
something these samples can resolve.

    python benchmarks/selection_paired.py --recheck benchmarks/results/selection_quality_default_recheck_confirm128.json \
        --heldout-samples 128

With ``--sleb-samples N`` the baseline is SLEB run here on the first N calibration samples (SLEB's usual
sample count is 128; the samples keep the study's length) instead of the study's best baseline, which
ran SLEB on fewer: qblock's set is then compared with SLEB choosing on as many calibration samples as
qblock's racing confirmation did, and SLEB's tokens are counted.

    python benchmarks/selection_paired.py --recheck benchmarks/results/selection_quality_default_recheck_race96.json \
        --calib-samples 128 --heldout-samples 128 --sleb-samples 128

Writes ``<recheck stem>_paired.{json,md}`` (``_paired_sleb<N>`` with ``--sleb-samples``, ``_paired_sleb<N>_reference``
with ``--sleb-from``; or ``--out STEM``).
Cost: two single-sample forward passes per sample and M where the sets differ (5 minutes for SmolLM2 with
128 calibration and 128 held-out samples, 4 for Gemma-3-270M with 64 and 64, one core), plus SLEB's
candidate passes with ``--sleb-samples`` (51 minutes for SmolLM2 up to M = 15 on 128 samples, 2 cores;
69 minutes for Gemma-3-270M up to M = 9 on 64 samples with ``--dtype fp32`` on 2 AVX2-only cores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _out import write_results  # noqa: E402, F401  (the benchmarks' one output rule; re-exported)


def paired(a: list[float], b: list[float]) -> dict:
    """Mean, standard error and wins of the per-sample differences ``a - b``, rounded
    (:func:`qblock.validate.stats.paired_difference`).

    Example:
        >>> paired([1.0, 2.0, 3.0], [1.5, 2.0, 2.0])
        {'diff': 0.1667, 'se': 0.441, 'wins': 1, 'n': 3}
    """
    from qblock.validate.stats import paired_difference

    r = paired_difference(a, b)
    return {"diff": round(r["diff"], 4), "se": round(r["se"], 4), "wins": r["wins"], "n": r["n"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recheck", required=True, help="a *_recheck.json written by selection_recheck.py")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-samples", type=int, default=None, metavar="N",
                    help="calibration samples to compare on (default: those of the re-check's confirmation; more "
                         "extend the study's calibration data from the same seeded stream)")
    ap.add_argument("--heldout-samples", type=int, default=None, metavar="N",
                    help="held-out samples to compare on (default: the study's; more extend its held-out data from "
                         "the same seeded stream, still disjoint from calibration)")
    ap.add_argument("--sleb-samples", type=int, default=None, metavar="N",
                    help="compare with SLEB run here on the first N calibration samples (from the same seeded stream) "
                         "instead of the study's best baseline")
    ap.add_argument("--sleb-from", default=None, metavar="JSON",
                    help="with --sleb-samples: take SLEB's sets and tokens from an earlier output of this script with "
                         "the same --sleb-samples on the same study, instead of running SLEB again (sets holding the "
                         "first or last block, from before SLEB kept them as its own code does: SLEB continues from "
                         "the largest set without one)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                    help="evaluate (and run SLEB) in this dtype instead of the study's (e.g. fp32 on a CPU without "
                         "native bf16, where bf16 is several times slower); recorded in the output")
    ap.add_argument("--out", default=None, help="output stem (default: the re-check's stem + _paired)")
    args = ap.parse_args(argv)
    if args.calib_samples is not None and args.calib_samples < 2:
        ap.error(f"--calib-samples must be at least 2, got {args.calib_samples}")
    if args.sleb_samples is not None and args.sleb_samples < 1:
        ap.error(f"--sleb-samples must be at least 1, got {args.sleb_samples}")
    if args.heldout_samples is not None and args.heldout_samples < 2:
        ap.error(f"--heldout-samples must be at least 2, got {args.heldout_samples}")
    path = Path(args.recheck)
    try:
        rc = json.loads(path.read_text())
        ok = (path.parent / rc["study"]).is_file() and "per_m" in rc
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        ap.error(f"{path} is not a re-check JSON next to its study (see selection_recheck.py)")
    study = json.loads((path.parent / rc["study"]).read_text())["settings"]

    import torch

    from qblock.llm.data import calibration_and_eval
    from qblock.llm.gates import mask_blocks
    from qblock.llm.models import load_model
    from qblock.validate.evaluate import heldout_loss

    torch.set_num_threads(args.threads)
    dtype = args.dtype or study["dtype"]
    model, tok = load_model(study["model"], quiet=True, dtype=dtype)
    n_cal = int(args.calib_samples or rc["settings"]["confirm_samples"])
    data = {"num_calib": max(n_cal, args.sleb_samples or 0), "seq_len": study["seq_len"], "seed": study["seed"]}
    calib, evals, _ = calibration_and_eval(tok, None, num_eval=args.heldout_samples or study["eval_samples"], **data)
    if args.heldout_samples:  # the samples the study and the re-check used (its num_eval) must be unchanged
        c0, e0, _ = calibration_and_eval(tok, None, num_eval=study["eval_samples"], **data)
        if not (_same(calib, c0) and _same(evals, e0)):
            raise SystemExit("--heldout-samples changed the study's calibration or held-out samples")
    theirs_by_m, continued = {}, None
    if args.sleb_samples and args.sleb_from:
        earlier = _sleb_from(args.sleb_from, args.sleb_samples, rc)
        theirs_by_m, continued = _sleb_on(model, calib[: args.sleb_samples], rc, earlier)
    elif args.sleb_samples:
        theirs_by_m = _sleb_sets(model, calib[: args.sleb_samples], rc)
    calib = calib[:n_cal]

    from tqdm.auto import tqdm

    def per_sample(removed, xs):
        with mask_blocks(model, removed):
            return [heldout_loss(model, [x])[0] for x in tqdm(xs, desc=f"removing {len(removed)}", leave=False)]

    out = {"recheck": path.name, "model": study["model"], "dtype": dtype, "study_dtype": study["dtype"],
           "calibration_samples": n_cal,
           "heldout_samples": len(evals), "sleb_samples": args.sleb_samples,
           # re-checks before the loop/confirmation split recorded no total; their confirmation began at sample 0
           "qblock_calibration_samples": rc["settings"].get("calibration_samples", rc["settings"].get("confirm_samples", 0)
                                                            + rc["settings"].get("race_samples", 0)),
           "per_m": {}}
    if args.sleb_samples:  # SLEB as qblock runs it (barriers as SLEB's code), or continued that way
        from qblock.validate.baselines import SLEB_BARRIERS

        out["sleb_barriers"] = list(SLEB_BARRIERS)
    if args.sleb_from:
        out["sleb_from"] = {"file": Path(args.sleb_from).name, "continued_from_m": continued}
    for m, r in rc["per_m"].items():
        if args.sleb_samples:
            best, (theirs, sleb_tokens) = f"on {args.sleb_samples} samples", theirs_by_m[int(m)]
        else:
            best = min(r["baselines"], key=lambda b: r["baselines"][b]["heldout"])
            theirs, sleb_tokens = r["baselines"][best]["removed"], None
        row = {"qblock": r["removed"], "baseline": best, "baseline_removed": theirs}
        if sleb_tokens is not None:
            row.update(qblock_tokens=r["fwd_tokens"], baseline_tokens=sleb_tokens)
        if sorted(theirs) != sorted(r["removed"]):
            for name, xs in (("heldout", evals), ("calibration", calib)):
                row[name] = paired(per_sample(r["removed"], xs), per_sample(theirs, xs))
        out["per_m"][m] = row
        print(m, row, flush=True)
    suffix = (f"_paired_sleb{args.sleb_samples}" + ("_reference" if args.sleb_from else "")
              if args.sleb_samples else "_paired")  # never over the --sleb-from file it reads
    stem = Path(args.out) if args.out else path.with_name(path.stem + suffix)
    write_results(stem, out, _markdown(out))
    return 0


def _same(xs, ys) -> bool:
    """Whether two sample lists agree over the shorter one's length."""
    return all(bool((a == b).all()) for a, b in zip(xs, ys))


def _sleb_sets(model, samples, rc: dict) -> dict[int, tuple[list[int], int]]:
    """``{M: (SLEB's set, its forward tokens)}`` for the re-check's M, SLEB run on ``samples``."""
    from qblock.validate.baselines import sleb
    from qblock.validate.evaluate import forward_tokens

    ms = [int(m) for m in rc["per_m"]]
    tokens = forward_tokens(samples)
    return {r.num_remove: (r.removed, r.forward_passes * tokens)
            for r in sleb(model, samples, max(ms), progress=True) if r.num_remove in ms}


def _sleb_on(model, samples, rc: dict, earlier: dict[int, tuple[list[int], int]]
             ) -> tuple[dict[int, tuple[list[int], int]], int | None]:
    """SLEB's sets from an earlier output, as its reference code would have them: outputs written before qblock's
    SLEB kept the first and last block (as SLEB's own code does) may hold sets with an end block. Every earlier set
    without one is on the reference's path (no step before it took an end block), so SLEB continues from the
    largest of those; all tokens are counted as the reference spends them. Returns the sets and the M it
    continued from (``None``: the earlier sets sufficed)."""
    from qblock.llm.blocks import find_blocks
    from qblock.validate.baselines import sleb, sleb_kept
    from qblock.validate.evaluate import forward_tokens
    from qblock.validate.runner import sleb_passes

    n, tokens = len(find_blocks(model)), forward_tokens(samples)
    clean = [m for m, (removed, _) in earlier.items() if not sleb_kept(n) & set(removed)]
    k = max(clean, default=0)
    sets = {m: sorted(removed) for m, (removed, _) in earlier.items() if m <= k}
    ms = [int(m) for m in rc["per_m"]]
    if max(ms) <= k:
        return {m: (sets[m], sleb_passes(n, m) * tokens) for m in ms}, None
    print(f"SLEB continues from its set at M = {k} (the earlier output's sets above it hold an end block)", flush=True)
    start = sets[k] if k else []
    sets.update({r.num_remove: r.removed for r in sleb(model, samples, max(ms), start=start, progress=True)})
    return {m: (sets[m], sleb_passes(n, m) * tokens) for m in ms}, k


def _sleb_from(path: str, n: int, rc: dict) -> dict[int, tuple[list[int], int]]:
    """SLEB's sets and tokens from an earlier ``--sleb-samples n`` output on the same study."""
    old = json.loads(Path(path).read_text())
    earlier = json.loads((Path(path).parent / old["recheck"]).read_text()).get("study")
    if old.get("sleb_samples") != n or earlier != rc["study"]:
        raise SystemExit(f"{path} is not SLEB on {n} samples of {rc['study']}")
    return {int(m): (r["baseline_removed"], r["baseline_tokens"]) for m, r in old["per_m"].items()}


def _cell(p: dict | None) -> str:
    if not p:
        return "same set"
    return f"{p['diff']:+.4f} ± {p['se']:.4f} (better on {p['wins']} of {p['n']})"


def _markdown(out: dict) -> str:
    n = out.get("sleb_samples")
    tok_head = " forward tokens to choose: qblock / SLEB |" if n else ""
    whose = f"SLEB's on the first {n} calibration samples" if n else "the best baseline's"
    lines = [f"# Paired per-sample differences, qblock's recommended set minus {whose} ({out['model']})", "",
             f"From `{out['recheck']}`: {out['heldout_samples']} held-out and {out['calibration_samples']} calibration "
             "samples, each measured alone; mean difference ± its standard error, nats/token (negative: qblock's "
             "set is better). A difference inside about two standard errors is not resolved by these samples."
             + (f" SLEB chose on the first {n} calibration samples, qblock's confirmation and race on the first "
                f"{out['qblock_calibration_samples']} (its loop on fewer)"
                + (", so the calibration column compares them on samples both chose on." if n >= out["calibration_samples"]
                   and out["qblock_calibration_samples"] >= out["calibration_samples"] else ".") if n else "")
             + (f" Measured in {out['dtype']}{' (SLEB chose in it too)' if n else ''}; the study, and qblock's choice, "
                f"ran in {out['study_dtype']}." if out.get("dtype", out.get("study_dtype")) != out.get("study_dtype")
                else "")
             + (" SLEB as its code runs it (never the first or the last block)" if out.get("sleb_barriers") == [1, 1]
                else "")
             + (f": its sets up to M = {out['sleb_from']['continued_from_m']} from `{out['sleb_from']['file']}` "
                "(none held either block), continued from there; tokens counted as its code spends them."
                if (out.get("sleb_from") or {}).get("continued_from_m") is not None
                else "." if out.get("sleb_barriers") == [1, 1] else ""), "",
             f"| M | qblock | {'SLEB' if n else 'best baseline'} | held-out difference | calibration difference |" + tok_head,
             "|---|---|---|---|---|" + "---|" * bool(tok_head)]
    for m, r in out["per_m"].items():
        toks = f" {r['qblock_tokens']:,} / {r['baseline_tokens']:,} |" if tok_head else ""
        lines.append(f"| {m} | {','.join(map(str, r['qblock']))} | {r['baseline']} ({','.join(map(str, r['baseline_removed']))}) "
                     f"| {_cell(r.get('heldout'))} | {_cell(r.get('calibration'))} |" + toks)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
