"""Selection quality: does qblock's recommended removal set beat the baselines on held-out text, and at what cost?

For one real model and M at fractions of its blocks, runs the validator (the same code as ``qblock run``)
with qblock's selection (measured QUBO refined per M), the paper's Fisher QUBO, every baseline and random
sets; adds the ground state of each other energy model (fisher+grad, and the measured QUBO before
refinement); and writes per M the held-out loss of each method's set, the calibration loss, the forward
and backward tokens each method spent to choose, and the rank correlations of every energy with
held-out loss over all evaluated sets. Choices use calibration data only; held-out data only reports.

    python benchmarks/selection_quality.py --model default          # SmolLM2-135M-Instruct (30 blocks)
    python benchmarks/selection_quality.py --model gemma3-270m      # Gemma-3-270M (18 blocks)

Writes ``benchmarks/results/selection_quality_<model>.{json,md}`` and the validator's report folder
``benchmarks/results/selection_quality_<model>/`` (report.md, candidates.csv, summary.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--fractions", default="0.1,0.2,0.3,0.4,0.5", help="M as fractions of the blocks")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration samples (Fisher, one-shot baselines)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-samples", type=int, default=32, help="held-out samples (disjoint passages)")
    ap.add_argument("--select-samples", type=int, default=8, help="calibration samples of qblock's measurements")
    ap.add_argument("--select-evaluations", type=int, default=24, help="refinement evaluations per M")
    ap.add_argument("--select-backend", default="exact")
    ap.add_argument("--select-confirm", type=int, default=6, help="finalists per M re-measured on the calibration set")
    ap.add_argument("--select-confirm-samples", type=int, default=32, help="calibration samples of the confirmation")
    ap.add_argument("--select-screen", type=int, default=2, help="calibration samples of the greedy chain (0: none)")
    ap.add_argument("--select-heldout", type=int, default=None,
                    help="measured sets per M also evaluated on held-out data (default all; fewer is faster, but "
                         "the correlations then cover fewer sets)")
    ap.add_argument("--greedy-samples", type=int, default=8, help="calibration samples of SLEB / iterative ShortGPT")
    ap.add_argument("--random", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", help="model dtype for every measurement (bf16: ~3x faster on CPUs "
                                                       "with AVX512-BF16; every method is measured the same way)")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/selection_quality_<model>)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from qblock.llm.blocks import find_blocks
    from qblock.llm.data import calibration_and_eval
    from qblock.llm.energy import build_problem
    from qblock.llm.gradients import gate_gradients
    from qblock.llm.models import load_model, model_provenance
    from qblock.validate.runner import SLEB_USUAL_TOKENS_PER_PASS, ValidationSettings, validate

    t_all = time.perf_counter()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", args.model)
    stem = Path(args.out) if args.out else RESULTS / f"selection_quality_{slug}"
    model, tok = load_model(args.model, quiet=True, dtype=args.dtype)
    n = len(find_blocks(model))
    ms = sorted({max(1, min(n - 1, round(float(f) * n))) for f in args.fractions.split(",")})
    calib, evals, prov = calibration_and_eval(tok, None, num_calib=args.calib_samples, num_eval=args.eval_samples,
                                              seq_len=args.seq_len, seed=args.seed)
    t0 = time.perf_counter()
    A = gate_gradients(model, calib, progress=False)
    t_extract = time.perf_counter() - t0
    problem = build_problem(A, "fisher", metadata={"model": model_provenance(args.model), "num_samples": len(calib),
                                                   "seq_len": args.seq_len, "gate": "layer"})
    settings = ValidationSettings(
        num_removes=ms, top_k=5, backend="auto", solve_seed=args.seed, num_random=args.random, random_seed=args.seed,
        greedy_samples=args.greedy_samples, energy_models=["fisher+grad"], n_boot=1000, stats_seed=args.seed,
        select_samples=args.select_samples, select_evaluations=args.select_evaluations,
        select_backend=args.select_backend, select_confirm=args.select_confirm,
        select_confirm_samples=args.select_confirm_samples, select_screen=args.select_screen, select_heldout=args.select_heldout or 10**6, progress=True)
    work = Path(tempfile.mkdtemp(prefix="qblock-selq-"))
    res = validate(problem, model, tok, calib, evals, settings, work, title=f"selection quality: {args.model}")
    rows = res["rows"]
    extra = _ground_states(problem, model, evals, rows, ms)
    report = _tables(rows, extra, res, ms, n, SLEB_USUAL_TOKENS_PER_PASS)
    out = {
        "model": model_provenance(args.model), "num_blocks": n, "M": ms,
        "settings": {k: v for k, v in vars(args).items()}, "data": {"calibration": prov["calibration"]["num_samples"],
                                                                    "evaluation": prov["evaluation"]["num_samples"]},
        "fisher_extraction_seconds": t_extract, "timings_seconds": res["timings"],
        "per_m": report["per_m"], "machine": {"python": platform.python_version(), "torch_threads": args.threads,
                                              "cores": __import__("os").cpu_count()},
        "total_seconds": time.perf_counter() - t_all,
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    Path(f"{stem}.md").write_text(report["markdown"] + "\n")
    folder = Path(str(stem))
    folder.mkdir(exist_ok=True)
    for name in ("report.md", "candidates.csv", "summary.json"):
        shutil.copy(work / name, folder / name)
    print(report["markdown"])
    print(f"\nwrote {stem}.json, {stem}.md and {folder}/ ({out['total_seconds']:.0f} s)", file=sys.stderr)
    return 0


def _ground_states(problem, model, evals, rows, ms):
    """Ground state per M of the fisher+grad and measured (unrefined) energies, with held-out loss."""
    import qblock
    from qblock.backends.exact import auto_backend
    from qblock.llm.energy import build_problem
    from qblock.validate.evaluate import CandidateEvaluator

    ev = CandidateEvaluator(model, evals)
    known = {(tuple(r["removed"])): r for r in rows if r.get("heldout_loss") is not None}
    out = {}
    fg = build_problem(problem.arrays["A"], "fisher+grad")
    measured = [r for r in rows if r["method"] == "qblock"]
    for m in ms:
        out[m] = {}
        for name, p in (("fisher+grad", fg),):
            ss = qblock.solve(p.with_num_remove(m), auto_backend(p.num_blocks, m),
                              num_solutions=1, seed=0)
            key = tuple(p.removed_blocks(ss.first.sample))
            out[m][name] = {"removed": list(key), "heldout_loss": (known.get(key) or ev.evaluate(key))["heldout_loss"]}
        # the measured QUBO's ground state: the first proposal of the refinement loop
        mrows = [r for r in rows if r["num_remove"] == m and r["method"] in ("qblock", "measured")]
        if measured and mrows:
            best = min(mrows, key=lambda r: (r["energy_measured"], r["removed"]))
            out[m]["measured (no refinement)"] = {"removed": best["removed"], "heldout_loss": best["heldout_loss"],
                                                 "calib_loss": best.get("calib_loss")}
    return out


def _tables(rows, extra, res, ms, n, usual):
    summ = res["summary"]["per_m"]
    per_m, lines = {}, []
    full = [r for r in rows if r["method"] == "full"][0]["heldout_loss"]
    lines += [f"Full model held-out loss: {full:.4f}", ""]
    for m in ms:
        at = [r for r in rows if r["num_remove"] == m]

        def one(method):
            sel = [r for r in at if r["method"] == method]
            return sel[0] if sel else None

        entries = []
        rec = one("qblock")
        entries.append(("qblock (measured QUBO, refined)", rec))
        q1 = [r for r in at if r["method"] == "qubo" and r.get("rank") == 1]
        entries.append(("fisher QUBO ground state (the paper)", q1[0] if q1 else None))
        table = []
        for label, r in entries:
            if r is not None:
                table.append(_row(label, r))
        for name, v in extra.get(m, {}).items():
            table.append({"method": f"{name} ground state", "removed": v["removed"], "heldout_loss": v["heldout_loss"],
                          "calib_loss": v.get("calib_loss"), "fwd_tokens": None, "bwd_tokens": None})
        for b in ("shortgpt", "shortgpt_iterative", "angular", "sleb", "norm_ratio"):
            r = one(b)
            if r is not None:
                table.append(_row(b, r))
        rnd = [r for r in at if r["method"] == "random"]
        if rnd:
            best_r = min(rnd, key=lambda r: r["heldout_loss"])
            table.append(_row(f"best of {len(rnd)} random sets", best_r))
        base = [t for t in table if t["method"] in ("shortgpt", "shortgpt_iterative", "angular", "sleb", "norm_ratio")]
        bb = min(base, key=lambda t: t["heldout_loss"]) if base else None
        sleb = one("sleb")
        corr = {k[len("energy_"):] if k != "energy" else "fisher": {"spearman": v["spearman"], "kendall": v["kendall"],
                                                                  "n": v["n"]}
                for k, v in summ[str(m)]["correlations"].items()}
        per_m[str(m)] = {
            "table": table, "correlations": corr,
            "qblock_minus_best_baseline": (rec["heldout_loss"] - bb["heldout_loss"]) if rec and bb else None,
            "best_baseline": bb["method"] if bb else None,
            "qblock_tokens": rec.get("cost_forward_tokens") if rec else None,
            "sleb_tokens_as_run": sleb.get("cost_forward_tokens") if sleb else None,
            "sleb_tokens_usual": (sleb["cost_forward_passes"] * usual) if sleb else None,
        }
        lines += [f"### M = {m} of {n} blocks ({100 * m / n:.0f}%)", "",
                  "| method | removed | calibration loss | confirmed calib. loss | held-out loss "
                  "| forward tokens to choose | backward tokens |",
                  "|---|---|---|---|---|---|---|"]
        for t in table:
            lines.append(f"| {t['method']} | {','.join(map(str, t['removed']))} | {_f(t.get('calib_loss'))} | "
                         f"{_f(t.get('confirm_loss'))} | "
                         f"{_f(t['heldout_loss'])} | {_i(t.get('fwd_tokens'))} | {_i(t.get('bwd_tokens'))} |")
        d = per_m[str(m)]
        if d["qblock_minus_best_baseline"] is not None:
            verdict = "wins" if d["qblock_minus_best_baseline"] < 0 else "loses" if d["qblock_minus_best_baseline"] > 0 else "ties"
            lines += ["", f"qblock {verdict}: held-out loss {d['qblock_minus_best_baseline']:+.4f} nats/token vs the best "
                          f"baseline ({d['best_baseline']}); qblock spent {_i(d['qblock_tokens'])} forward tokens, SLEB as "
                          f"run {_i(d['sleb_tokens_as_run'])}, SLEB at its usual 128 x 2048 tokens {_i(d['sleb_tokens_usual'])}."]
        lines += ["", "Rank correlation with held-out loss over every evaluated set at this M: " + "; ".join(
            f"{k} Spearman {_f(v['spearman'], 3)}, Kendall {_f(v['kendall'], 3)} (n={v['n']})" for k, v in corr.items()), ""]
    return {"per_m": per_m, "markdown": "\n".join(lines)}


def _row(label, r):
    return {"method": label, "removed": r["removed"], "heldout_loss": r["heldout_loss"], "calib_loss": r.get("calib_loss"),
            "confirm_loss": r.get("confirm_loss"), "fwd_tokens": r.get("cost_forward_tokens"), "bwd_tokens": r.get("cost_backward_tokens")}


def _f(v, d=4):
    return "-" if v is None else f"{v:.{d}f}"


def _i(v):
    return "-" if v is None else f"{int(v):,}"


if __name__ == "__main__":
    sys.exit(main())
