"""Time-to-optimum of the heuristic backends (swap, SA, tabu) vs N, against certified optima.

For each N (default 16 .. 128) one instance of the paper's structure (``H = A^T A / m``, m = 2048,
M = N/4) is solved exactly by qblock's branch-and-bound (certified ground state), then every backend
runs ``--repeats`` times through :func:`qblock.solve` with its default parameters and a different seed.
Reported per backend and N: median wall time of one run, success probability p (best energy equal to
the certified optimum within 1e-9 relative), and the time to reach the optimum with 99 % confidence,
``TTS99 = t * ln(0.01) / ln(1 - p)`` (``t`` if p >= 0.99, infinite if p = 0; :func:`qblock.compare.tts99`).

Run (about two minutes)::

    python benchmarks/solvers_tts.py                 # writes benchmarks/results/solvers_tts.{json,md}
    python benchmarks/solvers_tts.py --sizes 16 32 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


from qblock.compare import tts99  # noqa: E402  (one definition of TTS99, shared with qblock compare)


def run(args) -> dict:
    import qblock
    from bnb_topk import machine_info
    from qblock.backends import bnb

    from tqdm.auto import tqdm  # a core dependency of qblock
    rows = []
    for n in args.sizes:
        M = max(1, n // 4)
        p = qblock.random_problem(n, M, num_samples=args.rows, seed=args.seed)
        t = time.perf_counter()
        X, e, st = bnb.topk(p.H, p.linear, M, 1, time_limit=args.certify_time_limit)
        cert_time = time.perf_counter() - t
        opt = float(e[0]) + p.offset
        row = {"N": n, "M": M, "optimum": opt, "certified": st["certified"], "certify_seconds": cert_time, "backends": {}}
        it = tqdm(args.backends, desc=f"N={n}", leave=False)
        for name in it:
            times, hits, bests = [], 0, []
            for r in range(args.repeats):
                t = time.perf_counter()
                ss = qblock.solve(p, name, num_solutions=1, seed=args.seed * 1000 + r)
                times.append(time.perf_counter() - t)
                best = float(ss.first.energy)
                bests.append(best)
                hits += int(abs(best - opt) <= 1e-9 * max(1.0, abs(opt)))
            prob = hits / args.repeats
            tm = float(np.median(times))
            row["backends"][name] = {"median_seconds": tm, "p_success": prob, "tts99_seconds": tts99(tm, prob) if prob > 0 else None,
                                     "best_energy": min(bests), "worst_energy": max(bests)}
        rows.append(row)
        print(f"N={n}: optimum {opt:.6g} (certified={st['certified']}, {cert_time:.2f}s) " + ", ".join(
            f"{b}: p={v['p_success']:.2f} t={v['median_seconds']:.2f}s" for b, v in row["backends"].items()), flush=True)
    return {"benchmark": "solvers_tts", "machine": machine_info(), "settings": vars(args), "rows": rows,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def markdown(res: dict) -> str:
    m = res["machine"]
    s = res["settings"]
    names = s["backends"]
    head = "| N | M | certified optimum (bnb time) | " + " | ".join(f"{b}: p / t / TTS99" for b in names) + " |"
    lines = [
        "# Time-to-optimum of heuristic backends vs N (checked against certified optima)",
        "",
        f"Machine: {m['cpu']}, {m['cores_available']} cores, load average at start "
        f"{', '.join(f'{x:.1f}' for x in (m['load_average_at_start'] or []))}; numpy {m['numpy']}, scipy {m['scipy']}. "
        f"Run {res['date_utc']} UTC. Instances: qblock.random_problem(N, N/4, num_samples={s['rows']}, seed={s['seed']}); "
        f"{s['repeats']} seeded runs per backend with default parameters via qblock.solve.",
        "p: fraction of runs whose best state has the certified optimal energy; t: median seconds per run; "
        "TTS99 = t ln(0.01) / ln(1 - p).",
        "",
        head,
        "|" + "---|" * (3 + len(names)),
    ]
    for row in res["rows"]:
        cells = []
        for b in names:
            v = row["backends"][b]
            tts = "inf" if v["tts99_seconds"] is None else f"{v['tts99_seconds']:.2f} s"
            cells.append(f"{v['p_success']:.2f} / {v['median_seconds']:.2f} s / {tts}")
        cert = "yes" if row["certified"] else "NO"
        lines.append(f"| {row['N']} | {row['M']} | {row['optimum']:.6g} ({cert}, {row['certify_seconds']:.2f} s) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 48, 64, 96, 128])
    ap.add_argument("--backends", nargs="+", default=["swap", "sa", "tabu"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=2048, help="rows m of A (default 2048)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--certify-time-limit", type=float, default=120.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "solvers_tts"))
    args = ap.parse_args(argv)
    from _out import write_results

    res = run(args)
    write_results(args.out, res, markdown(res), echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
