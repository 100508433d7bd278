"""How the penalty strength decides whether single-flip samplers find the constrained optimum.

For paper-structure instances (``H = A^T A / m``, m = 2048, M = N/4, with and without a linear term)
this runs dwave-samplers' SA and tabu on the penalised QUBO at single strengths (fractions of
the provably safe one) and with qblock's default scan, each with and without swap polishing, and
records the gap to the best known energy (swap annealer and exact where it can run).

Run: ``python benchmarks/penalty_scan.py [--blocks 32,64,128] [--out benchmarks/results/penalty_scan.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import qblock
from qblock._solve import DEFAULT_PENALTY_SCAN
from qblock.backends.exact import ENUMERATION_LIMIT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="32,64,128")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "penalty_scan.json"))
    args = ap.parse_args()
    rows = []
    for n in [int(b) for b in args.blocks.split(",")]:
        for linear in (False, True):
            for inst in range(args.seeds):
                p = qblock.random_problem(n, n // 4, num_samples=2048, linear=linear, seed=inst)
                ref = qblock.solve(p, "swap", seed=0, num_reads=128, num_sweeps=400)
                best, ref_name = ref.first.energy, "swap(128 reads, 400 sweeps)"
                if math.comb(n, n // 4) <= ENUMERATION_LIMIT:
                    best, ref_name = qblock.solve(p, "exact", num_solutions=1).first.energy, "exact"
                for backend in ("sa", "tabu"):
                    settings = [((f,), f"{f} x safe") for f in (0.005, 0.02, 0.1, 1.0)]
                    settings.append((DEFAULT_PENALTY_SCAN, "default scan"))
                    for scan, label in settings:
                        for polish in (False, True):
                            t = time.perf_counter()
                            ss = qblock.solve(p, backend, seed=inst, penalty_scan=scan, polish=polish)
                            rows.append({
                                "N": n, "M": n // 4, "linear": linear, "instance": inst, "backend": backend,
                                "penalty": label, "polish": polish,
                                "gap": float(ss.first.energy - best),
                                "hit": bool(ss.first.energy - best <= 1e-9 * max(1, abs(best))),
                                "raw_feasible_fraction": 1 - ss.info["num_infeasible"] / ss.info["num_reads"],
                                "seconds": time.perf_counter() - t, "reference": ref_name,
                            })
                print(f"N={n} linear={linear} instance={inst} done", flush=True)
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    # summary table: fraction of instances where the best state was hit
    print("| N | backend | penalty | polish | optimum hit | raw feasible |")
    print("|---|---|---|---|---|---|")
    keys = sorted({(r["N"], r["backend"], r["penalty"], r["polish"]) for r in rows})
    for key in keys:
        sel = [r for r in rows if (r["N"], r["backend"], r["penalty"], r["polish"]) == key]
        hit = sum(r["hit"] for r in sel)
        feas = sum(r["raw_feasible_fraction"] for r in sel) / len(sel)
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {hit}/{len(sel)} | {feas:.2f} |")


if __name__ == "__main__":
    main()
