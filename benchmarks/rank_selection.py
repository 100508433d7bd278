"""Study: global SVD rank selection on a real model at several kept fractions, every method, both bases.

For SmolLM2-135M (``--model default``) at 90, 80 and 70 % of the decoder-linear parameters kept
(PivGa storage), with plain and activation-whitened SVD, it measures the held-out loss of:
uniform ranks, one global singular-value threshold, FermiGrad, and the rank-selection QUBO solved by
``exact`` (Pareto dynamic programming; the QUBO keeps the diagonal of the Fisher, ``couplings="diagonal"``,
so that it is exact at this size), ``swap``, ``sa`` and ``leap-cqm`` through a local mock (no Leap access here: the mock
runs simulated annealing on dimod's penalised BQM of the CQM, so its numbers say nothing about Leap's
solver, only that the CQM path runs at this size). Each entry has the time its allocation took.

Writes ``benchmarks/results/rank_selection.json`` after every measurement and
``benchmarks/results/rank_selection.md`` at the end.

Run::

    QBLOCK_CACHE=/work/qcache OMP_NUM_THREADS=1 python benchmarks/rank_selection.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("uniform", "global-threshold", "fermigrad", "exact", "swap", "sa", "leap-cqm")
#: backend parameters of the QUBO methods (sized so that the study fits in well under 45 minutes on one core)
BACKEND_PARAMS = {
    "exact": {},
    "swap": {"num_reads": 16, "num_sweeps": 50},
    "sa": {"num_reads": 2, "num_sweeps": 100, "penalty_scan": [1.0]},
    "leap-cqm": {},
}


class MockLeapCQM:
    """Stands in for LeapHybridCQMSampler offline: seeded simulated annealing on ``dimod.cqm_to_bqm``.

    Returns the CQM's own variables with ``is_feasible`` as Leap does; its quality is that of a short
    local anneal, not of Leap's hybrid solver.
    """

    def __init__(self, **config):
        self.config = config

    def sample_cqm(self, cqm, time_limit=None, label=None):
        import dimod
        from dwave.samplers import SimulatedAnnealingSampler

        bqm, _ = dimod.cqm_to_bqm(cqm, lagrange_multiplier=max(1.0, max(abs(b) for b in cqm.objective.linear.values())))
        ss = SimulatedAnnealingSampler().sample(bqm, num_reads=2, num_sweeps=50, seed=11)
        samples = [{v: s[v] for v in cqm.variables} for s in ss.samples()]
        return dimod.SampleSet.from_samples_cqm(samples, cqm)


def _data(args):
    import torch

    from qblock.llm.data import calibration_and_eval
    from qblock.llm.models import load_model

    torch.set_num_threads(1)
    model, tok = load_model(args.model, quiet=True)
    model.eval()
    calib, heldout, prov = calibration_and_eval(tok, num_calib=args.calib, num_eval=args.eval,
                                                seq_len=args.seq_len, seed=0)
    return model, calib, heldout, prov


def _evaluate(model, fs, ranks, originals, heldout):
    import torch

    from qblock.svd.export import apply_ranks
    from qblock.svd.factors import find_linears
    from qblock.validate.evaluate import heldout_loss

    apply_ranks(model, fs, ranks)
    try:
        return heldout_loss(model, heldout, batch_size=4)[0]
    finally:
        with torch.no_grad():
            for name, mod in find_linears(model):
                mod.weight.copy_(originals[name])


def _run_basis(model, basis, calib, heldout, originals, args, out, save):
    from qblock.svd import allocate, factorise
    from qblock.svd.allocate import gate_gradients

    t0 = time.perf_counter()
    fs = factorise(model, calib[: args.whiten_samples] if basis == "whitened" else None, whiten=basis == "whitened")
    out["bases"][basis] = {"svd_seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    A = gate_gradients(model, fs, calib[: args.grad_samples], args.group_size)
    out["bases"][basis]["gradient_seconds"] = time.perf_counter() - t0
    print(f"[{basis}] SVD {out['bases'][basis]['svd_seconds']:.0f} s, gradients "
          f"{out['bases'][basis]['gradient_seconds']:.0f} s", flush=True)
    for ratio in args.ratios:
        for method in args.methods:
            params = dict(BACKEND_PARAMS.get(method, {}))
            if method == "leap-cqm":
                params.update(sampler_factory=MockLeapCQM, save_dir=str(Path(args.scratch) / "leap"))
            ranks, info = allocate(model, fs, ratio, method, calibration=calib[: args.fermi_samples],
                                   group_size=args.group_size, gradients=A, seed=0, backend_params=params,
                                   energy=args.energy, couplings=args.couplings,
                                   fermigrad={"steps": args.fermi_steps})
            loss = _evaluate(model, fs, ranks, originals, heldout)
            row = {"basis": basis, "ratio": ratio, "method": method, "heldout_loss": loss,
                   "seconds": info["seconds"], "stored": info["stored"], "budget": info["budget"], "ranks": ranks}
            for key in ("qubo", "fermigrad"):
                if key in info:
                    row[key] = {k: v for k, v in info[key].items() if k not in ("mu",)}
            out["rows"].append(row)
            save()
            print(f"[{basis}] kept {ratio:.0%} {method:17s} loss {loss:.4f}  ({info['seconds']:.1f} s)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--bases", nargs="+", default=["plain", "whitened"])
    ap.add_argument("--calib", type=int, default=16, help="calibration samples")
    ap.add_argument("--whiten-samples", type=int, default=16)
    ap.add_argument("--grad-samples", type=int, default=8)
    ap.add_argument("--fermi-samples", type=int, default=8)
    ap.add_argument("--fermi-steps", type=int, default=12)
    ap.add_argument("--eval", type=int, default=8, help="held-out samples")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--energy", default="fisher", choices=("fisher", "fisher+grad"))
    ap.add_argument("--couplings", default="diagonal", choices=("full", "matrix", "diagonal"))
    ap.add_argument("--out", default=str(RESULTS / "rank_selection"))
    ap.add_argument("--scratch", default="/tmp/qblock-rank-study")
    args = ap.parse_args(argv)

    from qblock.svd.factors import find_linears
    from qblock.validate.evaluate import heldout_loss

    t_start = time.perf_counter()
    model, calib, heldout, prov = _data(args)
    originals = {name: mod.weight.detach().clone() for name, mod in find_linears(model)}
    out = {"settings": vars(args), "backend_params": {k: dict(v) for k, v in BACKEND_PARAMS.items()},
           "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                       "note": "2 CPU cores shared with other jobs; torch.set_num_threads(1)"},
           "data": {"source": prov.get("source"), "calibration_samples": args.calib, "heldout_samples": args.eval,
                    "seq_len": args.seq_len},
           "dense_heldout_loss": heldout_loss(model, heldout, batch_size=4)[0], "bases": {}, "rows": []}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out["total_seconds"] = time.perf_counter() - t_start
        path.with_suffix(".json").write_text(json.dumps(out, indent=1, default=str) + "\n")

    save()
    print(f"dense held-out loss {out['dense_heldout_loss']:.4f}", flush=True)
    for basis in args.bases:
        _run_basis(model, basis, calib, heldout, originals, args, out, save)
    save()
    path.with_suffix(".md").write_text(report(out))
    print(f"wrote {path.with_suffix('.md')} in {out['total_seconds'] / 60:.1f} min", flush=True)
    return 0


def report(out: dict) -> str:
    """The markdown table: held-out loss (and seconds) per method, basis and kept fraction."""
    rows = out["rows"]
    ratios = sorted({r["ratio"] for r in rows}, reverse=True)
    lines = [f"# Global SVD rank selection: {out['settings']['model']} (held-out loss; lower is better)", "",
             f"Dense model: {out['dense_heldout_loss']:.4f}. {out['data']['heldout_samples']} held-out and "
             f"{out['data']['calibration_samples']} calibration samples of {out['data']['seq_len']} tokens; "
             f"QUBO: groups of {out['settings']['group_size']} singular values, {out['settings']['energy']} energy from "
             f"{out['settings']['grad_samples']} samples, couplings: {out['settings']['couplings']}; FermiGrad "
             f"{out['settings']['fermi_steps']} steps. Time: the allocation alone (QUBO: solve, plus the "
             "shared gradients listed below). Whole study: "
             f"{out.get('total_seconds', 0) / 60:.1f} min.", ""]
    for basis in out["bases"]:
        b = out["bases"][basis]
        lines += [f"## {basis} SVD (SVD {b['svd_seconds']:.0f} s, QUBO gate gradients {b['gradient_seconds']:.0f} s)", "",
                  "| method | " + " | ".join(f"{r:.0%} kept" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for method in dict.fromkeys(r["method"] for r in rows if r["basis"] == basis):
            cells = []
            for ratio in ratios:
                hit = [r for r in rows if r["basis"] == basis and r["method"] == method and r["ratio"] == ratio]
                cells.append(f"{hit[0]['heldout_loss']:.3f} ({hit[0]['seconds']:.1f} s)" if hit else "-")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _verdict(rows, ratios)
    return "\n".join(lines) + "\n"


def _verdict(rows, ratios) -> list[str]:
    """Per kept fraction: the best global method against the better uniform basis."""
    out = ["## Best global method against uniform ranks", ""]
    for ratio in ratios:
        at = [r for r in rows if r["ratio"] == ratio]
        uni = min((r for r in at if r["method"] == "uniform"), key=lambda r: r["heldout_loss"], default=None)
        glob = min((r for r in at if r["method"] != "uniform"), key=lambda r: r["heldout_loss"], default=None)
        if uni and glob:
            diff = glob["heldout_loss"] - uni["heldout_loss"]
            word = "beats" if diff < 0 else "does not beat"
            out.append(f"* {ratio:.0%} kept: best global {glob['method']} ({glob['basis']}) {glob['heldout_loss']:.3f} "
                       f"{word} uniform ({uni['basis']}) {uni['heldout_loss']:.3f} by {abs(diff):.3f}")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
