"""``qblock compare``: run several backends on the same problem(s) and compare them.

Examples::

    qblock compare P.npz --remove 8 --backends exact,swap,sa,tabu,steepest,qaoa --repeats 10 --out cmp/
    qblock compare --blocks 16,32,64,128 --backends swap,tabu,sa --repeats 5 --out sweep/
    qblock compare --from-json cmp/compare.json --out cmp2/      # re-draw everything from the JSON
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qblock.cli import CliError


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"{what} expects comma-separated integers, got {text!r}") from None
    if not vals:
        raise CliError(f"{what} is empty")
    return vals


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare backends: energy gap, success probability, feasibility, top-k overlap, TTS99",
        description=(
            "Run each backend REPEATS times (distinct seeds) on each problem and write a markdown table, "
            "CSV, JSON (with every raw run, so every figure can be recomputed) and PNG plots. Problems "
            "come from files (one study per file and per --remove value) or, with --blocks, are synthetic "
            "instances of the paper's structure H = A^T A / m (a scaling sweep)."
        ),
    )
    p.add_argument("problems", nargs="*", metavar="PROBLEM.npz", help="problem file(s) (qblock extract / random-problem)")
    p.add_argument("--remove", "-M", default=None,
                   help="blocks to remove; a comma list gives one study per value (default: the file's, or N/4 with --blocks)")
    p.add_argument("--blocks", default=None, help="synthetic scaling sweep over these N, e.g. 16,32,64,128")
    p.add_argument("--remove-fraction", type=float, default=0.25, help="with --blocks: M = round(N * this) (default 0.25)")
    p.add_argument("--linear", action="store_true", help="with --blocks: include the first-order (gradient) term")
    p.add_argument("--backends", "-b", default="exact,swap,sa,tabu,steepest",
                   help="comma-separated backend names (default exact,swap,sa,tabu,steepest); unavailable ones are skipped")
    p.add_argument("--repeats", "-r", type=int, default=5, help="runs per stochastic backend (default 5)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds per backend and problem: no new repeat starts after this; also bounds exact's branch-and-bound")
    p.add_argument("--exact-time-limit", type=float, default=60.0,
                   help="seconds for exact's branch-and-bound when --time-limit is not given (default 60)")
    p.add_argument("--top", "-k", type=int, default=10, help="top-k size for the overlap (default 10)")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument("--rtol", type=float, default=1e-6, help="a run succeeds within rtol*|E_ref| + atol (default 1e-6)")
    p.add_argument("--atol", type=float, default=1e-9, help="absolute success tolerance (default 1e-9)")
    p.add_argument("--no-exact-reference", action="store_true",
                   help="do not run exact for a certified reference when it is not among --backends")
    p.add_argument("--param", action="append", metavar="BACKEND.KEY=VALUE",
                   help="backend parameter (repeatable), e.g. sa.num_reads=64 or tabu.timeout=50")
    p.add_argument("--out", "-o", default="qblock-compare", help="output folder (default ./qblock-compare)")
    p.add_argument("--from-json", default=None, metavar="COMPARE.json",
                   help="run nothing: re-draw the table and plots from a saved compare.json")
    p.add_argument("--quiet", "-q", action="store_true", help="no table, no progress bar")
    from qblock.cli._common import add_executor_option

    add_executor_option(p)
    p.set_defaults(func=run)


def _params(items: list[str] | None) -> dict[str, dict]:
    from qblock.cli._common import OWN_OPTIONS, parse_params

    out: dict[str, dict] = {}
    for item in items or []:
        key = item.split("=", 1)[0]
        if "." not in key:
            raise CliError(f"--param expects BACKEND.KEY=VALUE (e.g. sa.num_reads=64), got {item!r}")
        backend, _, rest = item.partition(".")
        out.setdefault(backend, {}).update(parse_params([rest], own=OWN_OPTIONS))
    return out


#: what ``compare`` writes into --out (qblock.compare.write_outputs; render skips compare.json)
WRITES = ("compare.md", "compare.csv", "*.png")


def run(args: argparse.Namespace) -> int:
    from qblock import compare as cmp
    from qblock.cli._common import check_at_least, check_output, check_seed

    check_seed(args.seed)
    writes = WRITES if args.from_json else WRITES + ("compare.json",)
    check_output(args.out, "--out", inputs=[*args.problems, args.from_json], folder=True, writes=writes)
    if args.from_json:
        if args.problems or args.blocks:
            raise CliError("--from-json re-draws a saved comparison; give no problems or --blocks with it")
        result = cmp.load_result(args.from_json)
        paths = cmp.render(result, args.out)
        if not args.quiet:
            print(cmp.format_markdown(result))
            print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    if args.repeats < 1:
        raise CliError("--repeats must be at least 1")
    if args.top < 1:
        raise CliError("--top must be at least 1")
    # `not v > 0`: NaN is refused too
    for flag, v in (("--time-limit", args.time_limit), ("--exact-time-limit", args.exact_time_limit)):
        if v is not None and not v > 0:
            raise CliError(f"{flag} must be positive, got {v}")
    check_at_least(("--rtol", args.rtol, 0), ("--atol", args.atol, 0))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends:
        raise CliError("--backends is empty")
    from qblock import backends as registry

    unknown = [b for b in backends if b not in registry.names()]
    if unknown:
        raise CliError(f"unknown backend(s) {', '.join(unknown)}; choose from: {', '.join(registry.names())}")
    params = _params(args.param)
    for name, values in params.items():
        registry.validate_params(name, values)  # as solve does: a misspelt key fails now, not mid-study
    # "3,3" asks for one study of M = 3, not two
    removes = list(dict.fromkeys(_int_list(args.remove, "--remove"))) if args.remove else None

    problems, names = [], []
    if args.blocks:
        if args.problems:
            raise CliError("give either problem files or --blocks (a synthetic sweep), not both")
        if removes:
            raise CliError("with --blocks, set M through --remove-fraction (M = round(N * fraction))")
        try:
            problems = cmp.synthetic_problems(_int_list(args.blocks, "--blocks"), args.remove_fraction,
                                              seed=args.seed, linear=args.linear)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        names = [f"synthetic{'+linear' if args.linear else ''} seed={args.seed + i}" for i in range(len(problems))]
    else:
        if not args.problems:
            raise CliError("give a problem file (PROBLEM.npz) or --blocks N1,N2,... for a synthetic sweep")
        from qblock.cli._common import load_problem

        seen = set()
        for path in args.problems:
            where = Path(path).resolve()
            if where in seen:  # a file named twice (p.npz, ./p.npz) is one problem
                continue
            seen.add(where)
            problem = load_problem(path, removes[0] if removes else None)  # read once for every M
            try:
                cmp.require_block_removal(problem, path)
            except ValueError as exc:
                raise CliError(str(exc)) from None
            problems += [problem.with_num_remove(m) for m in removes] if removes else [problem]
            names += [path] * (len(removes) if removes else 1)
    from qblock.cli._common import open_executor

    with open_executor(args, quiet=args.quiet) as executor:
        result = cmp.compare_problems(
            problems, backends, args.repeats, args.seed, names=names, progress=not args.quiet,
            top_k=args.top, time_limit=args.time_limit, exact_reference=not args.no_exact_reference,
            exact_time_limit=args.exact_time_limit,
            rtol=args.rtol, atol=args.atol, params=params, executor=executor,
        )
    paths = cmp.write_outputs(result, args.out)
    if not args.quiet:
        print(cmp.format_markdown(result))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
