"""``qblock validate``: does low energy mean a better pruned model? Evaluate the top-k states, random
sets and the depth-pruning baselines on held-out data and report rank correlations."""

from __future__ import annotations

import argparse
import sys

from qblock.cli import CliError
from qblock._energies import SCORED_ENERGY_MODELS
from qblock.cli._common import (add_eval_dtype_option, add_evaluation_options, add_selection_options,  # noqa: F401
                                apply_eval_dtype, benchmark_overlap, check_at_least, check_backend_name, check_counts,
                                check_executor, check_ms, check_output, check_seed, check_selection_options,
                                describe_eval, open_executor, parse_list, parse_ms, selection_settings, setup_torch,
                                text_files, text_sources)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="evaluate low-energy states against baselines on held-out data",
        description=(
            "Evaluate the K lowest-energy states of PROBLEM (from a backend or a solutions JSON written by "
            "'qblock solve --json'), R random removal sets and the baselines (ShortGPT one-shot and iterative, "
            "angular distance, SLEB, norm ratio) on held-out samples never used for calibration; write a "
            "per-candidate table (JSON/CSV/markdown), Spearman/Kendall correlation between energy and held-out "
            "loss with bootstrap intervals, plots and report.md. "
            "Example: qblock validate p.npz --remove 6 --top 10 --out val/"
        ),
    )
    p.add_argument("problem", help="problem file (.npz) from qblock extract")
    p.add_argument("--model", default=None,
                   help="model the problem was extracted from (default: the one recorded in the problem file)")
    p.add_argument("--remove", "-M", default=None,
                   help="blocks to remove, one value or a comma list, e.g. 3,6,9 (default: the problem's M)")
    p.add_argument("--top", "-k", type=int, default=10, help="lowest-energy states per M (default 10)")
    p.add_argument("--solutions", default=None, metavar="FILE.json",
                   help="evaluate these states (qblock solve --json output) instead of solving")
    p.add_argument("--seed", type=int, default=0, help="solver, random-set and bootstrap seed (default 0)")
    p.add_argument("--random", type=int, default=5, metavar="R", help="random removal sets per M (default 5)")
    p.add_argument("--baselines", default="all",
                   help="'all', 'none', or a comma list of shortgpt,shortgpt_iterative,angular,sleb,norm_ratio")
    p.add_argument("--greedy-samples", type=int, default=None, metavar="N",
                   help="calibration samples for the greedy baselines SLEB/iterative ShortGPT (default all)")
    p.add_argument("--calibration", default=None, metavar="FILE|NAME",
                   help="calibration text, if the problem file does not record it")
    p.add_argument("--eval-text", default=None, metavar="FILE|NAME",
                   help="held-out text: a .txt/.jsonl file or a built-in source (lambada, wikipedia, stories, code); "
                        "default: the held-out split of the calibration source")
    p.add_argument("--eval-samples", type=int, default=None, metavar="N",
                   help="held-out samples (default: as many as the extraction reserved, or 16)")
    p.add_argument("--seq-len", type=int, default=None, metavar="L",
                   help="tokens per held-out sample (default: the calibration length)")
    p.add_argument("--tasks", default="", help="benchmarks, comma list (arc_easy,piqa,hellaswag,...; default none)")
    p.add_argument("--task-limit", type=int, default=100, help="items per benchmark (default 100; 0 for all)")
    p.add_argument("--bench-top", type=int, default=2,
                   help="QUBO states per M (best by held-out loss) that get the benchmarks (default 2)")
    p.add_argument("--energies", default="auto",
                   help="energy models to compare: 'auto' (fisher, fisher+grad when A is stored; pairwise for "
                        "N <= 12), 'none', or a comma list of " + ",".join(SCORED_ENERGY_MODELS))
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch size (default 8)")
    p.add_argument("--out", "-o", default="validation", help="output directory (default ./validation)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output, no summary")
    add_evaluation_options(p)
    add_selection_options(p)
    add_eval_dtype_option(p)
    from qblock.validate.heal import add_heal_options

    add_heal_options(p)
    from qblock.cli._common import add_executor_option

    add_executor_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    threads = setup_torch(args)
    from pathlib import Path

    from qblock.problems.block_removal import BlockRemovalProblem
    from qblock.validate.baselines import BASELINE_METHODS
    from qblock.validate.runner import (ValidationError, ValidationSettings, data_for_problem, print_summary,
                                        read_solutions, summary_if_failed, validate,
                                        write_summary_json)

    if not Path(args.problem).is_file():
        raise CliError(f"problem file not found: {args.problem}")
    sources = text_sources(args, "calibration", "eval_text")
    check_output(args.out, "--out", inputs=[args.problem, args.solutions, *text_files(sources)],
                 folder=True, writes=("candidates.*", "summary.json", "report.md", "*.png"))
    check_executor(args)
    check_seed(args.seed)
    check_backend_name(args.backend, "--backend", auto=True)
    check_counts(vars(args))
    check_at_least(("--eval-samples", args.eval_samples, 1), ("--seq-len", args.seq_len, 2))
    check_selection_options(args)  # before the problem or the model is loaded
    problem = BlockRemovalProblem.load(args.problem)
    _check_eval_text(args, sources, problem)
    ms = parse_ms(args.remove)
    solutions = {}
    if args.solutions:
        try:
            m_sol, sets = read_solutions(args.solutions)
        except ValidationError as exc:
            raise CliError(str(exc)) from None
        if ms is None:
            ms = [m_sol]
        elif m_sol not in ms:
            raise CliError(f"{args.solutions} holds states with M = {m_sol}, but --remove asks for {ms}")
        bad = [s for s in sets if any(not 0 <= i < problem.num_blocks for i in s)]
        if bad:
            raise CliError(f"{args.solutions}: block index out of range 0..{problem.num_blocks - 1} in {bad[0]}")
        solutions[m_sol] = sets
    if ms is None:
        if problem.num_remove is None:
            raise CliError(f"{args.problem} has no number of blocks to remove; pass --remove M")
        ms = [problem.num_remove]
    check_ms(ms, problem.num_blocks)  # before the model is loaded
    check_at_least(("--top", args.top, 1), ("--batch-size", args.batch_size, 1))
    baselines = parse_list(args.baselines, BASELINE_METHODS, "--baselines", BASELINE_METHODS)
    from qblock.validate.heal import heal_after_validation, heal_options, print_heal_summary

    heal_opts = heal_options(args)
    from qblock.llm.data import BENCHMARKS

    tasks = parse_list(args.tasks, tuple(BENCHMARKS), "--tasks")
    energies = args.energies if args.energies == "auto" else parse_list(args.energies, SCORED_ENERGY_MODELS, "--energies")

    from qblock._provenance import Provenance

    model_spec = args.model or Provenance.of(problem.metadata).model_spec
    if not model_spec:
        raise CliError("the problem file does not record its model; pass --model")
    from qblock.llm.cache import CacheError
    from qblock.llm.data import DataError
    from qblock.llm.models import ModelLoadError, load_model

    try:
        model, tok = load_model(model_spec, device=args.device, quiet=args.quiet)
    except (ModelLoadError, CacheError) as exc:
        raise CliError(str(exc)) from None
    from qblock.llm.blocks import find_blocks

    dtype = apply_eval_dtype(model, args, healing=bool(heal_opts))
    n_model = len(find_blocks(model))
    if n_model != problem.num_blocks:
        raise CliError(f"model {model_spec} has {n_model} blocks but the problem has {problem.num_blocks}; "
                       "pass the model the problem was extracted from (--model)")
    try:
        calib, evals, prov = data_for_problem(problem, tok, num_eval=args.eval_samples, eval_seq_len=args.seq_len,
                                              eval_text=args.eval_text, calibration=args.calibration)
        settings = ValidationSettings(
            num_removes=ms, top_k=args.top, backend=args.backend, solve_seed=args.seed, num_random=args.random,
            random_seed=args.seed, baselines=baselines, greedy_samples=args.greedy_samples, tasks=tasks,
            task_limit=args.task_limit or None, bench_top=args.bench_top, harness=args.harness, energy_models=energies,
            n_boot=args.bootstrap, stats_seed=args.seed, batch_size=args.batch_size, progress=not args.quiet,
            **selection_settings(args))
        with open_executor(args, quiet=args.quiet) as executor:
            result = validate(problem, model, tok, calib, evals, settings, args.out, solutions=solutions,
                              report_settings={"problem": args.problem, "model": model_spec, "torch threads": threads,
                                               "evaluation dtype": dtype, "held-out data": describe_eval(prov),
                                               "executor": args.executor},
                              notes=benchmark_overlap(prov, tasks, quiet=args.quiet), executor=executor,
                              write_summary=False)
        if heal_opts:
            with summary_if_failed(args.out, result):
                heal_after_validation(result, model, tok, evals, prov, args.out, heal_opts, n_boot=args.bootstrap,
                                      seed=args.seed, batch_size=args.batch_size, progress=not args.quiet,
                                      write_summary=False)
        write_summary_json(args.out, result["summary_json"])  # once, with the healing entry if any
    except (ValidationError, DataError, CacheError) as exc:
        raise CliError(str(exc)) from None
    if not args.quiet:
        print_summary(result)
        print_heal_summary(result)
        print(f"\nwrote {args.out}/: candidates.csv/.json/.md, summary.json, report.md, "
              f"{len(result['plots'])} plot(s)", file=sys.stderr)
    return 0


def _check_eval_text(args, sources: dict, problem) -> None:
    """Refuse held-out text that is the calibration text (given, or recorded in the problem) before the model
    loads."""
    from qblock.llm.data import source_of

    recorded = (problem.metadata or {}).get("data")
    if args.eval_text is None or (args.calibration is None and not recorded):
        return  # nothing to compare (a problem that records no text gets its own error later)
    calibration = sources["calibration"] if args.calibration is not None else source_of(recorded)
    if sources["eval_text"] == calibration:
        raise CliError("--eval-text is the calibration text; omit it to use the disjoint held-out split")
