"""Run every qblock benchmark under ``benchmarks/`` with small default settings, one after another.

Known benchmarks get settings that finish in a few minutes each on 2 CPU cores; any other
``benchmarks/*.py`` script found is run with its own defaults, except the follow-ups that re-examine
another benchmark's results (:data:`FOLLOW_UPS`: run them by hand) and the studies on a real model
(:data:`STUDIES`, 20 minutes to an hour each: run only when named with ``--only``; raise ``--timeout``).
Each writes its JSON / markdown results (into ``--out-dir``, default ``benchmarks/results``); a summary
of what ran, how long it took and whether it succeeded goes to ``<out-dir>/run_all.json``. Scripts run
one at a time (they time things, so they must not compete for the cores).

Usage::

    python benchmarks/run_all.py                      # everything
    python benchmarks/run_all.py --only bnb_topk solvers_tts
    python benchmarks/run_all.py --quick --out-dir /tmp/bench   # smaller settings, results elsewhere
    python benchmarks/run_all.py --only selection_quality --timeout 7200   # a real-model study
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: per script: (arguments, quick arguments, how it takes its output path: "stem" (no extension) or
#: "json" (a .json file)). Scripts not listed run with their defaults.
KNOWN: dict[str, tuple[list[str], list[str], str]] = {
    "bnb_topk": ([], ["--quick"], "stem"),
    "certified_n80": ([], ["--quick"], "stem"),
    "solvers_tts": ([], ["--sizes", "16", "32", "64", "--repeats", "3"], "stem"),
    "extract_speed": (["--random-weights", "--samples", "8", "--seq-len", "64", "--batch-size", "4"],
                      ["--random-weights", "--samples", "4", "--seq-len", "32", "--batch-size", "4"], "json"),
    "qaoa_timing": (["--sizes", "8", "10", "12"], ["--sizes", "8", "10"], "stem"),
    "penalty_scan": (["--blocks", "32,64", "--seeds", "1"], ["--blocks", "32", "--seeds", "1"], "json"),
    "executor_compare": ([], ["--blocks", "24", "--repeats", "2"], "stem"),
}


#: the studies on a real model (downloaded once into QBLOCK_CACHE; 20 minutes to an hour on 2 cores), run
#: only when named with ``--only``; the same shape as :data:`KNOWN` (no smaller settings: a smaller study
#: would not answer its question)
STUDIES: dict[str, tuple[list[str], list[str], str]] = {
    "selection_quality": ([], [], "stem"),
    "rank_selection": ([], [], "stem"),
}

#: scripts that re-examine another benchmark's results (a path is required), so they are not run here
FOLLOW_UPS = ("selection_recheck", "selection_paired", "report_paired", "criterion_probe")


def discover(studies: bool = False) -> list[str]:
    """Benchmark scripts present: the known ones first (in a fixed order), then any others (not the
    :data:`FOLLOW_UPS`; the :data:`STUDIES` only with ``studies``)."""
    skip = ("run_all", "__init__", *FOLLOW_UPS, *(() if studies else STUDIES))
    present = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in skip and not p.stem.startswith("_"))
    return [s for s in KNOWN if s in present] + [s for s in present if s not in KNOWN]


def command(name: str, out_dir: Path, quick: bool) -> list[str]:
    cmd = [sys.executable, str(HERE / f"{name}.py")]
    settings = KNOWN.get(name) or STUDIES.get(name)
    if settings:
        full, small, out_kind = settings
        cmd += small if quick else full
        # a study names its own files (by model) in benchmarks/results; elsewhere it writes where it is told
        if name in KNOWN or out_dir.resolve() != (HERE / "results").resolve():
            cmd += ["--out", str(out_dir / (name + (".json" if out_kind == "json" else "")))]
    return cmd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=None, help="run only these benchmarks (script names without .py)")
    ap.add_argument("--quick", action="store_true", help="smaller settings")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark")
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = discover(studies=bool(args.only))
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            print(f"unknown benchmark(s): {', '.join(unknown)}; present: {', '.join(names)}", file=sys.stderr)
            return 2
        names = [n for n in names if n in args.only]
    summary = []
    for name in names:
        cmd = command(name, out_dir, args.quick)
        print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=args.timeout, capture_output=True, text=True)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired:
            rc, tail = None, f"timed out after {args.timeout:.0f} s"
        dt = time.perf_counter() - t
        ok = rc == 0
        print(tail if not ok else (proc.stdout[-1500:] if proc.stdout else ""), flush=True)
        print(f"=== {name}: {'ok' if ok else 'FAILED'} in {dt:.1f} s", flush=True)
        summary.append({"benchmark": name, "command": cmd[1:], "ok": ok, "returncode": rc, "seconds": dt,
                        "output_tail": None if ok else tail})
    (out_dir / "run_all.json").write_text(json.dumps({"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                                                      "quick": args.quick, "runs": summary}, indent=2))
    failed = [s["benchmark"] for s in summary if not s["ok"]]
    print(f"{len(summary) - len(failed)}/{len(summary)} benchmarks ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
