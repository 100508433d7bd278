"""``qblock solve``: solve a saved problem with any backend and print / save the ranked solutions."""

from __future__ import annotations

import argparse
import sys

from qblock.cli import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "solve",
        help="solve a problem file with a backend; print the top-k",
        description="Solve PROBLEM.npz (remove exactly M blocks) and print the K best distinct solutions.",
    )
    p.add_argument("problem", help="problem file (.npz) written by qblock extract / random-problem")
    p.add_argument("--remove", "-M", type=int, default=None, help="number of blocks to remove (default: the file's)")
    p.add_argument("--backend", "-b", default="swap", help="backend name (see `qblock backends`; default swap)")
    p.add_argument("--top", "-k", type=int, default=20, help="how many distinct solutions (default 20)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="backend parameter (repeatable), e.g. num_reads=128")
    p.add_argument("--json", dest="json_out", default=None, help="write the solutions as JSON here")
    p.add_argument("--dry-run", action="store_true", help="cloud backends: show what would be sent, send nothing")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


def _describe(problem, sample) -> str:
    """Removed blocks, or for a rank-selection problem the groups kept per matrix and the cost."""
    if problem.kind == "rank_selection":
        y = [sample[i] for i in range(problem.num_variables)]
        return f"groups kept per matrix {problem.ranks_of(y)}, cost {int(problem.total_costs(y)[0]):,}"
    return " ".join(str(i) for i in problem.removed_blocks(sample))


def format_table(problem, ss, limit: int | None = None) -> str:
    rows = [("rank", "energy", "removed blocks" if problem.kind == "block_removal" else "state")]
    for rank, (sample, energy) in enumerate(ss.data(["sample", "energy"]), start=1):
        if limit and rank > limit:
            break
        rows.append((str(rank), f"{energy:.6g}", _describe(problem, sample)))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:>{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)


def certification_line(info: dict) -> str | None:
    """The plain-language line for a result that ran out of time, or ``None``.

    Example:
        >>> certification_line({"certified_optimal": False, "time_limit_reached": True, "gap": 0.25})
        'NOT CERTIFIED: time limit reached; gap 0.25 (the true k-th best energy is at most that much lower)'
    """
    if info.get("certified_optimal") or not info.get("time_limit_reached"):
        return None
    gap = info.get("gap")
    if isinstance(gap, (int, float)) and gap == gap and gap != float("inf"):
        gap_text = f"gap {gap:.6g} (the true k-th best energy is at most that much lower)"
    else:
        gap_text = "gap unknown (fewer states than asked for were found)"
    return f"NOT CERTIFIED: time limit reached; {gap_text}"


def _warn_if_long(problem, backend: str, params: dict) -> None:
    """``exact`` past enumeration and past the sizes it was measured on (N = 128 in about a second), with no
    time limit: say that it may take long, and how to bound it."""
    import math

    from qblock.backends.exact import ENUMERATION_LIMIT

    if backend != "exact" or "time_limit" in params or problem.kind != "block_removal" or problem.num_blocks <= 128:
        return
    feasible = math.comb(problem.num_blocks, problem.num_remove)
    if params.get("strategy", "auto") != "enumerate" and feasible > ENUMERATION_LIMIT:
        print(f"note: a certified top-k over N={problem.num_blocks}, M={problem.num_remove} is a branch-and-bound "
              "that can take long; --param time_limit=SECONDS bounds it (the answer then says if it is not "
              "certified)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import qblock
    from qblock import backends
    from qblock._solutions import solutions_payload
    from qblock.cli._common import OWN_OPTIONS, check_output, check_seed, load_problem, parse_params, write_json_atomic

    if args.top < 1:
        raise CliError("--top must be at least 1")
    check_seed(args.seed)
    json_out = check_output(args.json_out, "--json", inputs=[args.problem])
    if json_out is not None and json_out.suffix.lower() == ".npz":  # problem files are .npz
        raise CliError(f"--json {args.json_out}: the solutions are JSON, not a problem file; give a .json path")
    problem = load_problem(args.problem, args.remove)
    params = parse_params(args.param, own=OWN_OPTIONS)
    spec = backends.get_spec(args.backend)
    if args.dry_run:
        backends.validate_params(args.backend, params)
        if not spec.check:
            raise CliError(f"--dry-run is for cloud backends; {args.backend!r} runs locally")
        from qblock.backends.leap import dry_run_plan, format_plan

        print(format_plan(dry_run_plan(problem, args.backend, **params)))
        return 0
    if not args.quiet:
        _warn_if_long(problem, args.backend, params)
    ss = qblock.solve(problem, backend=args.backend, num_solutions=args.top, seed=args.seed, **params)
    if len(ss) == 0:
        raise CliError(f"backend {args.backend!r} returned no feasible solution; try more reads or another backend")
    uncertified = certification_line(ss.info)
    if not args.quiet:
        info = ss.info
        what = f"remove M={problem.num_remove}" if problem.kind == "block_removal" else f"budget={problem.budget:,}"
        head = (f"{args.problem}: N={problem.num_blocks}, {what}, backend={args.backend}, "
                f"{len(ss)} solutions in {info['timing']:.2f} s")
        if info.get("certified_optimal"):
            head += " (certified optimal)"
        print(head)
        if uncertified:
            print(uncertified)
        print(format_table(problem, ss))
    elif uncertified:  # quiet prints only problems, and an uncertified "exact" answer is one
        print(uncertified, file=sys.stderr)
    if json_out is not None:
        write_json_atomic(json_out, solutions_payload(problem, ss))
        if not args.quiet:
            print(f"wrote {json_out}", file=sys.stderr)
    return 0
