"""Timing of the ``qaoa`` backend for N = 8..16 on random PSD instances (H = A^T A / m).

For every N (with M = round(0.3 N)) and every ansatz variant, solves one instance with
``qblock.solve(p, "qaoa", ...)`` and records wall time, the split into diagonal / transpile /
optimisation / sampling, circuit evaluations and time per evaluation, circuit width and depth, and
the quality numbers (probability of the optimum against uniform sampling over feasible states,
approximation ratio against uniform, and whether the optimum was measured).

Writes ``benchmarks/results/qaoa_timing.json`` and ``.md`` with the machine noted (CPU, cores, load
average at start and end, package versions).

Usage:
    python benchmarks/qaoa_timing.py                    # N = 8..16, all variants
    python benchmarks/qaoa_timing.py --sizes 8 10 --variants xy-ring
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "xy-ring": {"mixer": "xy", "xy_topology": "ring"},
    "xy-complete": {"mixer": "xy", "xy_topology": "complete"},
    "x": {"mixer": "x"},
}


def machine() -> dict:
    from importlib.metadata import version

    from bnb_topk import cpu_model

    cpu = cpu_model()
    pkgs = {}
    for name in ("qiskit", "qiskit-aer", "numpy", "scipy", "dimod"):
        try:
            pkgs[name] = version(name)
        except Exception:
            pkgs[name] = None
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
        "packages": pkgs,
    }


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv=None) -> int:
    import qblock
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(range(8, 17)))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--maxiter", type=int, default=100)
    ap.add_argument("--shots", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "qaoa_timing"))
    ap.add_argument("--render-only", action="store_true", help="re-write the .md from the existing .json")
    args = ap.parse_args(argv)
    if args.render_only:
        render(Path(args.out))
        return 0

    info = machine()
    rows = []
    jobs = [(n, v) for n in args.sizes for v in args.variants]
    for n, variant in tqdm(jobs, desc="qaoa timing"):
        m = max(2, round(0.3 * n))
        p = qblock.random_problem(n, m, seed=args.seed + n)
        t0 = time.perf_counter()
        ss = qblock.solve(p, "qaoa", num_solutions=5, seed=args.seed, reps=args.reps, maxiter=args.maxiter,
                          shots=args.shots, **VARIANTS[variant])
        wall = time.perf_counter() - t0
        best = qblock.solve(p, "exact", num_solutions=1).first.energy
        i = ss.info
        td = i["timing_detail"]
        rows.append({
            "N": n, "M": m, "variant": variant, "reps": args.reps, "shots": args.shots, "maxiter": args.maxiter,
            "wall_s": wall,
            "diagonal_s": td["diagonal"], "build_transpile_s": td["build_transpile"],
            "optimise_s": td["optimise"], "sample_s": td["sample"],
            "circuit_evaluations": i["circuit_evaluations"],
            "s_per_evaluation": td["optimise"] / max(1, i["circuit_evaluations"]),
            "circuit_width": i["circuit_width"], "circuit_depth": i["circuit_depth"],
            "statevector_bytes": 16 * 2**n,
            "feasible_fraction": i["feasible_fraction"],
            "optimum_probability": i.get("optimum_probability"),
            "uniform_optimum_probability": i.get("uniform_optimum_probability"),
            "approximation_ratio": i.get("approximation_ratio"),
            "uniform_approximation_ratio": i.get("uniform_approximation_ratio"),
            "optimum_in_top5": bool(np.any(np.abs(ss.record.energy - best) <= 1e-9 * max(1.0, abs(best)))),
        })
    info["load_average_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "qaoa_timing", "machine": info, "settings": vars(args), "results": rows,
               "expectation_mode": "exact statevector probabilities (Aer, statevector method), final shots via Aer SamplerV2"}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    render(out)
    return 0


def render(out: Path) -> None:
    """Write the markdown table from the JSON (``--render-only`` re-renders without re-running)."""
    payload = json.loads(out.with_suffix(".json").read_text())
    info, rows = payload["machine"], payload["results"]
    args = argparse.Namespace(**payload["settings"])
    lines = [
        "# QAOA timing (qblock `qaoa` backend, qiskit-aer statevector)",
        "",
        f"Machine: {info['cpu']}, {info['logical_cores']} logical cores, {info['platform']}; "
        f"load average at start {info['load_average_start'][0]:.1f}, at end {info['load_average_end'][0]:.1f} "
        "(the machine was shared; timings include that contention).",
        f"Packages: {', '.join(f'{k} {v}' for k, v in info['packages'].items())}.",
        f"Settings: reps={args.reps}, COBYLA maxiter={args.maxiter}, shots={args.shots}, linear-ramp start; "
        "one random instance per N (`qblock.random_problem(N, M, seed=N)`), M = round(0.3 N).",
        "p(opt)/uniform: probability of the optimum in the final state divided by 1/C(N,M) "
        "(X mixer: by 1/2^N, its initial state is uniform over all bitstrings). AR: approximation ratio of the measured "
        "feasible shots, (E_max - mean E) / (E_max - E_min) over feasible states; uniform sampling gives 'AR unif'.",
        "",
        "| N | M | variant | wall s | s/eval | evals | depth | feasible | p(opt) | p(opt)/uniform | AR | AR unif | opt in top 5 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = (r["optimum_probability"] / r["uniform_optimum_probability"]) if r["uniform_optimum_probability"] else float("nan")
        lines.append(
            f"| {r['N']} | {r['M']} | {r['variant']} | {r['wall_s']:.2f} | {r['s_per_evaluation'] * 1e3:.1f} ms | "
            f"{r['circuit_evaluations']} | {r['circuit_depth']} | {r['feasible_fraction']:.3f} | "
            f"{r['optimum_probability']:.2e} | {ratio:.2f} | "
            f"{_f(r['approximation_ratio'])} | {_f(r['uniform_approximation_ratio'])} | {'yes' if r['optimum_in_top5'] else 'no'} |"
        )
    lines += [
        "",
        "Reading (written for the recorded run): every XY-mixer shot is feasible; the X mixer on the penalised",
        "QUBO spends 67-80% of its shots on infeasible states (its feasible top-k also benefits from greedy",
        "repair). At p=2 every variant improves the approximation ratio over uniform sampling, but the",
        "probability of the optimum ranges from about 0.01x to 17x its uniform value: minimising <C> does not",
        "concentrate on the optimum at this depth (the complete XY mixer at N=13-14 pushed it far below",
        "uniform and missed it). Where the optimum is found, 4096 shots cover much of the C(N, M) feasible",
        "states. Time per evaluation grows from about 7 ms (N=8) to 130 ms (N=16, ring) on this shared machine.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
