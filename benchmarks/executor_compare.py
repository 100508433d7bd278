"""``qblock compare`` with ``--executor local`` vs ``--executor ray`` on this machine, and Ray's overheads.

Runs the same comparison study (5 backends x 5 seeds on a synthetic N-block problem) once with each
executor, one after the other, each as a fresh ``qblock compare`` process (so the Ray figure includes
starting a local Ray instance), checks the tables agree (everything but wall times), and measures on a
warm Ray instance: start-up time, and the round trip of a no-op task (the per-task overhead).

Usage::

    python benchmarks/executor_compare.py                 # N = 40, M = 10, 5 x 5 runs
    python benchmarks/executor_compare.py --blocks 24 --repeats 2 --out /tmp/executor_compare

Writes ``benchmarks/results/executor_compare.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = "exact,swap,sa,tabu,steepest"


def _noop(x):
    return x


def _compare(executor: str, blocks: int, repeats: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "qblock", "compare", "--blocks", str(blocks), "--backends", BACKENDS,
           "--repeats", str(repeats), "--seed", "0", "--executor", executor, "--out", str(out), "-q"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def _strip(obj):
    drop = {"wall_time", "timing", "time_per_run", "tts99", "created"}
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def warm_study(blocks: int, repeats: int) -> dict:
    """The same study in this process: local, then on an already started Ray instance (no start-up)."""
    from qblock.compare import compare_backends, synthetic_problems
    from qblock.executor import open_executor

    problem = synthetic_problems([blocks], seed=0)[0]
    backends = BACKENDS.split(",")
    t0 = time.perf_counter()
    compare_backends(problem, backends, repeats, 0, progress=False)
    local = time.perf_counter() - t0
    with open_executor("ray", num_cpus=min(2, os.cpu_count() or 1)) as ex:
        ex.map(_noop, range(20))  # workers started and warm
        t0 = time.perf_counter()
        compare_backends(problem, backends, repeats, 0, progress=False, executor=ex)
        warm = time.perf_counter() - t0
    return {"local_seconds": local, "ray_warm_seconds": warm, "ray_warm_over_local": warm / local}


def ray_overheads(num_cpus: int, tasks: int = 200) -> dict:
    """Ray start-up time and the warm round trip of no-op tasks (submitted together and one at a time)."""
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    init = time.perf_counter() - t0
    noop = ray.remote(_noop)
    ray.get([noop.remote(i) for i in range(20)])  # warm the workers
    t0 = time.perf_counter()
    ray.get([noop.remote(i) for i in range(tasks)])
    batch = (time.perf_counter() - t0) / tasks
    t0 = time.perf_counter()
    for i in range(50):
        ray.get(noop.remote(i))
    serial = (time.perf_counter() - t0) / 50
    ray.shutdown()
    return {"ray_version": ray.__version__, "init_seconds": init, "task_seconds_batched": batch,
            "task_seconds_round_trip": serial}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "executor_compare"))
    args = ap.parse_args()
    try:
        import ray  # noqa: F401
    except ImportError:
        print("executor_compare: Ray is not installed (pip install 'qblock[ray]'); nothing measured")
        return 0
    machine = {"cpu_count": os.cpu_count(), "python": platform.python_version(),
               "load_average_at_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        t_local = _compare("local", args.blocks, args.repeats, Path(tmp) / "local")
        load_mid = list(os.getloadavg())
        t_ray = _compare("ray", args.blocks, args.repeats, Path(tmp) / "ray")
        a = json.loads((Path(tmp) / "local" / "compare.json").read_text())
        b = json.loads((Path(tmp) / "ray" / "compare.json").read_text())
        same = _strip(a["studies"]) == _strip(b["studies"])
        runs = len(a["studies"][0]["runs"])
        solver_seconds = sum(r["wall_time"] for r in a["studies"][0]["runs"])
        solver_seconds_ray = sum(r["wall_time"] for r in b["studies"][0]["runs"])
    warm = warm_study(args.blocks, args.repeats)
    over = ray_overheads(min(2, os.cpu_count() or 1))
    machine["load_average_at_end"] = list(os.getloadavg())
    machine["load_average_between_runs"] = load_mid
    res = {"benchmark": "executor_compare", "blocks": args.blocks, "remove": round(args.blocks * 0.25),
           "backends": BACKENDS.split(","), "repeats": args.repeats, "runs": runs,
           "local_seconds": t_local, "ray_seconds": t_ray, "ray_over_local": t_ray / t_local,
           "solver_seconds_local": solver_seconds, "solver_seconds_ray": solver_seconds_ray,
           "tables_identical_except_times": same, "in_process": warm, "ray": over, "machine": machine}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = [f"# qblock compare: local vs Ray executor ({runs} runs: {len(res['backends'])} backends x "
          f"{args.repeats} seeds, N = {args.blocks})", "",
          "| executor | wall time [s] | sum of solver run times [s] |", "|---|---:|---:|",
          f"| local | {t_local:.1f} | {solver_seconds:.1f} |", f"| ray (local instance, 2 CPUs) | {t_ray:.1f} | "
          f"{solver_seconds_ray:.1f} |", "",
          f"ray / local = {t_ray / t_local:.2f} (the Ray process includes starting Ray); tables identical "
          f"except times: {same}.",
          f"In one process, Ray already started: local {warm['local_seconds']:.1f} s, ray "
          f"{warm['ray_warm_seconds']:.1f} s (ray / local = {warm['ray_warm_over_local']:.2f}).",
          f"Ray {over['ray_version']}: ray.init {over['init_seconds']:.1f} s, warm no-op task "
          f"{1e3 * over['task_seconds_batched']:.1f} ms batched / {1e3 * over['task_seconds_round_trip']:.1f} ms "
          f"round trip. Load average {machine['load_average_at_start']} at start, "
          f"{machine['load_average_at_end']} at end, {os.cpu_count()} cores.", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
