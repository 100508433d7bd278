"""Certified exact top-k at the scale of large models: qblock's branch-and-bound vs SCIP, Gurobi, enumeration.

Instances have the paper's structure: ``H = A^T A / m`` with ``m = 2048`` gradient rows whose columns
are correlated across neighbouring blocks (:func:`qblock.problems.synthetic.paper_structure_A`);
optionally also a real extracted problem (``--problem P.npz``, its own ``num_remove`` or ``--remove``).

* qblock ``bnb``: :func:`qblock.backends.bnb.topk` on the energy as the ``exact`` backend receives it
  from the BQM (zero diagonal, diagonal folded into the linear term): it does not get the PSD form.
* Gurobi (if ``gurobipy`` imports): solution pool of k (``PoolSearchMode=2``) on the PSD form
  ``x^T H x`` with ``H``'s diagonal, 2 threads.
* SCIP (if ``pyscipopt`` imports): the ground state (``--scip-k 1``, default) or the top-k by no-good
  cuts, on the PSD form, one thread.
* enumeration: the reference method visits all ``C(N, M)`` states; its time is extrapolated from the
  rate of :func:`qblock.backends.exact.enumerate_topk` measured here on N=30, M=8 (5.9 million states).

Every solver's list is checked against the branch-and-bound's (same energies within 1e-9 relative).

Run (a few minutes)::

    python benchmarks/bnb_topk.py            # writes benchmarks/results/bnb_topk.{json,md}
    python benchmarks/bnb_topk.py --quick    # N=80, M=8 and 40 only, no N=128
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _out import write_results  # noqa: E402  (the benchmarks' one output rule)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one); every benchmark records it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict:
    """CPU model, cores, load and library versions (timings depend on all of them)."""
    import scipy

    cpu = cpu_model()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = {
        "cpu": cpu,
        "cores_available": cores,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }
    for mod in ("pyscipopt", "gurobipy"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", None) or ".".join(map(str, m.gurobi.version()))
        except Exception:
            info[mod] = None
    return info


def enumeration_rate(n: int = 30, M: int = 8, k: int = 20) -> dict:
    from qblock.backends.exact import enumerate_topk
    from qblock.problems.synthetic import paper_structure_A

    A = paper_structure_A(n, 2048, seed=123)
    H = A.T @ A / 2048
    t = time.perf_counter()
    _, _, visited = enumerate_topk(H, np.zeros(n), M, k)
    dt = time.perf_counter() - t
    return {"N": n, "M": M, "states": visited, "seconds": dt, "states_per_second": visited / dt}


def instances(args) -> list[dict]:
    from qblock.problems.synthetic import paper_structure_A

    cases = [(80, 8), (80, 40)] if args.quick else [(80, 8), (80, 16), (80, 24), (80, 40), (128, 32)]
    out = []
    for seed in ([] if args.no_synthetic else [args.seed] + list(args.extra_seeds)):
        for n, M in cases:
            A = paper_structure_A(n, args.rows, seed=seed)
            name = f"paper N={n} M={M}" + (f" seed={seed}" if args.extra_seeds else "")
            out.append({"name": name, "H": A.T @ A / args.rows, "linear": np.zeros(n), "M": M,
                        "source": f"paper_structure_A(N={n}, m={args.rows}, seed={seed})",
                        "extra": seed != args.seed})
    if args.problem:
        from qblock.problems.block_removal import BlockRemovalProblem

        p = BlockRemovalProblem.load(args.problem)
        M = args.remove if args.remove is not None else p.num_remove
        if M is None:
            raise SystemExit("--problem has no num_remove; pass --remove M")
        out.append({"name": f"{Path(args.problem).name} N={p.num_blocks} M={M}", "H": p.H, "linear": p.linear,
                    "M": int(M), "source": str(args.problem)})
    return out


def agree(e_ref: np.ndarray, e: np.ndarray) -> bool | None:
    if e is None or len(e) == 0:
        return None
    n = min(len(e_ref), len(e))
    return bool(np.allclose(e_ref[:n], e[:n], rtol=1e-9, atol=1e-9 * max(1.0, float(np.abs(e_ref).max()))))


def run(args) -> dict:
    from qblock.backends import bnb

    info = machine_info()
    rate = enumeration_rate()
    rows = []
    for inst in instances(args):
        H, lin, M, n = inst["H"], inst["linear"], inst["M"], inst["H"].shape[0]
        row = {"instance": inst["name"], "source": inst["source"], "N": n, "M": M, "k": args.k,
               "states": math.comb(n, M)}
        # qblock branch-and-bound on the BQM form (zero diagonal + linear), as the exact backend gets it
        Q = H - np.diag(np.diag(H))
        t = time.perf_counter()
        X, e, st = bnb.topk(Q, lin + np.diag(H), M, args.k, time_limit=args.time_limit)
        row["qblock_bnb"] = {"seconds": time.perf_counter() - t, "certified": st["certified"], "nodes": st["nodes"],
                             "bound": st["bound"], "root_bound": st["root_bound"], "gap": st["gap"],
                             "best": float(e[0]) if len(e) else None, "kth": float(e[-1]) if len(e) else None}
        print(f"{inst['name']}: qblock bnb {row['qblock_bnb']['seconds']:.2f}s certified={st['certified']} "
              f"nodes={st['nodes']}", flush=True)
        row["enumeration_extrapolated_s"] = math.comb(n, M) / rate["states_per_second"]
        if not args.no_gurobi:
            try:
                from qblock.backends.miqp import topk_gurobi

                t = time.perf_counter()
                Xg, eg, sg = topk_gurobi(H, lin, M, args.k, time_limit=args.solver_time_limit, threads=2)
                row["gurobi"] = {"seconds": time.perf_counter() - t, "certified": sg["certified"], "nodes": sg["nodes"],
                                 "agrees": agree(e, eg)}
            except ImportError:
                row["gurobi"] = {"error": "gurobipy not installed"}
            except Exception as exc:  # licence limits etc.: report, do not abort the table
                row["gurobi"] = {"error": str(exc).splitlines()[0][:200]}
            print(f"  gurobi {row['gurobi']}", flush=True)
        if not args.no_scip and not inst.get("extra"):
            try:
                from qblock.backends.miqp import topk_scip

                t = time.perf_counter()
                Xs, es, ss = topk_scip(H, lin, M, args.scip_k, time_limit=args.solver_time_limit)
                row["scip"] = {"seconds": time.perf_counter() - t, "k": args.scip_k, "certified": ss["certified"],
                               "nodes": ss["nodes"], "agrees": agree(e, es)}
            except ImportError:
                row["scip"] = {"error": "pyscipopt not installed"}
            except Exception as exc:
                row["scip"] = {"error": str(exc).splitlines()[0][:200]}
            print(f"  scip {row['scip']}", flush=True)
        rows.append(row)
    return {"benchmark": "bnb_topk", "machine": info, "enumeration_rate": rate, "settings": vars(args), "rows": rows,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def _fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 100:
        return f"{s:.2f} s"
    for unit, div in (("min", 60), ("h", 3600), ("days", 86400), ("years", 31557600)):
        if s / div < 100 or unit == "years":
            v = s / div
            return f"{v:.3g} {unit}"
    return f"{s:.3g} s"


def _solver_cell(d: dict | None) -> str:
    if not d:
        return "not run"
    if "error" in d:
        return d["error"]
    mark = "certified" if d["certified"] else "NOT certified"
    if d.get("agrees") in (True, None):
        extra = ""
    else:  # a certified list that differs would be a bug somewhere; an uncertified one is just not optimal
        extra = " (DISAGREES)" if d["certified"] else " (best found above the optimum)"
    return f"{_fmt_time(d['seconds'])} ({mark}, {d['nodes']} nodes){extra}"


def markdown(res: dict) -> str:
    m = res["machine"]
    r = res["enumeration_rate"]
    k = res["settings"]["k"]
    lines = [
        f"# Certified top-{k}: qblock branch-and-bound vs SCIP, Gurobi and full enumeration",
        "",
        f"Machine: {m['cpu']}, {m['cores_available']} cores available, load average at start "
        f"{', '.join(f'{x:.1f}' for x in (m['load_average_at_start'] or []))}; Python {m['python']}, "
        f"numpy {m['numpy']}, scipy {m['scipy']}, pyscipopt {m['pyscipopt']}, gurobipy {m['gurobipy']}. "
        f"Run {res['date_utc']} UTC.",
        "",
        f"qblock bnb: numpy/scipy only, one BLAS thread, on the BQM form (zero diagonal). Gurobi: solution pool "
        f"of {k} (PoolSearchMode=2), 2 threads, PSD form. SCIP: top-{res['settings']['scip_k']} by no-good cuts, PSD form. "
        f"Enumeration: C(N, M) / {r['states_per_second']:.3g} states/s (measured: N={r['N']}, M={r['M']}, "
        f"{r['states']:,} states in {r['seconds']:.2f} s).",
        "",
        "| instance | C(N,M) | qblock bnb | nodes | Gurobi (pool) | SCIP | enumeration (extrapolated) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        b = row["qblock_bnb"]
        cert = "certified" if b["certified"] else f"NOT certified, gap {b['gap']:.3g}"
        lines.append(
            f"| {row['instance']} | {row['states']:.3g} | {_fmt_time(b['seconds'])} ({cert}) | {b['nodes']} | "
            f"{_solver_cell(row.get('gurobi'))} | {_solver_cell(row.get('scip'))} | "
            f"{_fmt_time(row['enumeration_extrapolated_s'])} |"
        )
    lines.append("")
    lines.append("Every solver's energies were checked against qblock's certified list ('DISAGREES' would flag a "
                 "mismatch). Timings share the machine with other jobs when the load average is high.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=20, help="top-k (default 20)")
    ap.add_argument("--rows", type=int, default=2048, help="rows m of A (default 2048)")
    ap.add_argument("--seed", type=int, default=0, help="instance seed (default 0)")
    ap.add_argument("--time-limit", type=float, default=120.0, help="qblock bnb time limit per instance (s)")
    ap.add_argument("--solver-time-limit", type=float, default=60.0, help="SCIP / Gurobi time limit (s)")
    ap.add_argument("--scip-k", type=int, default=1, help="states SCIP must certify (default 1: ground state)")
    ap.add_argument("--no-scip", action="store_true")
    ap.add_argument("--no-gurobi", action="store_true")
    ap.add_argument("--quick", action="store_true", help="N=80 with M=8 and 40 only")
    ap.add_argument("--extra-seeds", type=int, nargs="*", default=[],
                    help="more instance seeds (qblock and Gurobi only; SCIP runs on --seed only)")
    ap.add_argument("--problem", default=None, help="also a real extracted problem (.npz)")
    ap.add_argument("--remove", type=int, default=None, help="M for --problem")
    ap.add_argument("--no-synthetic", action="store_true", help="only the --problem instance")
    ap.add_argument("--out", default=str(RESULTS / "bnb_topk"), help="output path without extension")
    args = ap.parse_args(argv)
    res = run(args)
    write_results(args.out, res, markdown(res), echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
