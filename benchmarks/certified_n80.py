"""Acceptance timing: certified top-20 at N = 80 for every M = 8..40, end to end through ``qblock.solve``.

The issue-10 target: with the README install alone, ``qblock.solve(qblock.random_problem(80, M,
seed=s), "exact", num_solutions=20)`` is certified in well under 1 s for each M = 8..40 on a loaded
2-core machine. This script measures exactly that call (problem built outside the timer; BQM
conversion, convexification, local search and branch-and-bound inside) and can add load itself:
``--burn K`` starts K busy-looping processes for the duration, so a quiet machine can be measured
loaded too. It records the load average before and after and the library versions.

Run::

    python benchmarks/certified_n80.py                 # M = 8..40, seeds 0..2, on the machine as it is
    python benchmarks/certified_n80.py --burn 2        # the same with two extra busy processes
    python benchmarks/certified_n80.py --quick         # M = 8, 16, 24, 32, 40, seed 0

Writes ``benchmarks/results/certified_n80.{json,md}`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bnb_topk import machine_info  # noqa: E402  (one description of the machine for every benchmark)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def burners(count: int) -> list[subprocess.Popen]:
    """``count`` processes that spin a CPU each until killed (load of a busy machine)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def measure(ms: list[int], seeds: list[int], k: int) -> list[dict]:
    import qblock

    qblock.solve(qblock.random_problem(20, 5, seed=0), "exact", num_solutions=k)  # imports, first-call costs
    rows = []
    for M in ms:
        for seed in seeds:
            p = qblock.random_problem(80, M, seed=seed)
            t, c = time.perf_counter(), time.process_time()
            ss = qblock.solve(p, "exact", num_solutions=k)
            dt, cpu = time.perf_counter() - t, time.process_time() - c
            info = ss.info
            rows.append({"M": M, "seed": seed, "seconds": dt, "cpu_seconds": cpu, "certified": bool(info["certified_optimal"]),
                         "strategy": info.get("strategy"), "nodes": info.get("nodes"),
                         "time_convexify": info.get("time_convexify"), "time_heuristic": info.get("time_heuristic"),
                         "num_solutions": len(ss)})
            print(f"M={M:2d} seed={seed}: {dt:.3f} s ({cpu:.3f} s CPU) certified={rows[-1]['certified']} nodes={rows[-1]['nodes']}",
                  flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for M in sorted({r["M"] for r in rows}):
        ts = [r["seconds"] for r in rows if r["M"] == M]
        cs = [r["cpu_seconds"] for r in rows if r["M"] == M]
        out.append({"M": M, "runs": len(ts), "median_s": statistics.median(ts), "max_s": max(ts),
                    "median_cpu_s": statistics.median(cs), "max_cpu_s": max(cs),
                    "all_certified": all(r["certified"] for r in rows if r["M"] == M)})
    return out


def markdown(res: dict) -> str:
    m, s = res["machine"], res["settings"]
    rows = res["rows"]
    ts = [r["seconds"] for r in rows]
    cs = [r["cpu_seconds"] for r in rows]
    lines = [
        f"# Certified top-{s['k']} at N = 80, M = {min(s['ms'])}..{max(s['ms'])}, end to end (`qblock.solve(..., \"exact\")`)",
        "",
        f"Machine: {m['cpu']}, {m['cores_available']} cores; Python {m['python']}, numpy {m['numpy']}, scipy {m['scipy']}. "
        f"Load average (1 min) {res['load_before'][0]:.1f} before and {res['load_after'][0]:.1f} after; "
        f"{s['burn']} extra busy process(es) started by the benchmark. Run {res['date_utc']} UTC.",
        "",
        f"Instances `qblock.random_problem(80, M, seed=s)`, seeds {', '.join(map(str, s['seeds']))}; the timer covers "
        "`qblock.solve` (BQM conversion, SDP convexification, local search, branch-and-bound).",
        "",
        f"All {len(rows)} runs: wall median {statistics.median(ts):.3f} s, max {max(ts):.3f} s; CPU median "
        f"{statistics.median(cs):.3f} s, max {max(cs):.3f} s; {sum(r['certified'] for r in rows)}/{len(rows)} certified. "
        "(Wall time is what a user waits; CPU time is the work, which the load does not change.)",
        "",
        "| M | runs | wall median | wall max | CPU median | CPU max | certified |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in res["summary"]:
        lines.append(f"| {row['M']} | {row['runs']} | {row['median_s']:.3f} s | {row['max_s']:.3f} s | "
                     f"{row['median_cpu_s']:.3f} s | {row['max_cpu_s']:.3f} s | "
                     f"{'all' if row['all_certified'] else 'NOT all'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", type=int, nargs="+", default=list(range(8, 41)), help="values of M (default 8..40)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="instance seeds (default 0 1 2)")
    ap.add_argument("--k", type=int, default=20, help="top-k (default 20)")
    ap.add_argument("--burn", type=int, default=0, help="extra busy processes during the measurement")
    ap.add_argument("--quick", action="store_true", help="M = 8, 16, 24, 32, 40 and seed 0 only")
    ap.add_argument("--out", default=str(RESULTS / "certified_n80"), help="output path without extension")
    args = ap.parse_args(argv)
    if args.quick:
        args.ms, args.seeds = [8, 16, 24, 32, 40], [0]
    load_before = list(os.getloadavg())
    procs = burners(args.burn)
    try:
        if procs:
            time.sleep(2.0)  # let the load build up
        rows = measure(args.ms, args.seeds, args.k)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    res = {"benchmark": "certified_n80", "machine": machine_info(), "settings": vars(args), "load_before": load_before,
           "load_after": list(os.getloadavg()), "rows": rows, "summary": summary(rows),
           "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0 if all(r["certified"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
