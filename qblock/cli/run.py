"""``qblock run``: the main job, end to end on one model.

Extract the problem (cached: a re-run with the same settings reuses the stored gradient matrix),
solve it for several M, validate the top-k states against every baseline on held-out data, print a
summary table and write a report directory (candidates table, summary.json, report.md, plots).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

from qblock.cli import CliError
from qblock._energies import ENERGY_MODELS, SCORED_ENERGY_MODELS
from qblock.cli._common import (check_at_least, check_backend_name, check_counts, check_executor, check_ms,
                                check_output, check_seed, check_selection_options, open_executor, races)

#: settings of a full run and of ``--quick`` (timings of ``--quick`` in README's quick start; its selection
#: measures pairs in a pool of 10 blocks, never more than the default max(8, N/2), and confirms on 16
#: samples: the same recommended sets as pool max(8, N/2) and 32 samples on SmolLM2 at M = 3, 6, 9, for
#: 31 % fewer selection tokens; the finalists those 16 do not resolve from the lowest race on the other 8)
PRESETS = {
    "full": {"samples": 128, "seq_len": 256, "eval_samples": 32, "top": 10, "random": 5, "greedy_samples": 8,
             "tasks": "arc_easy,piqa,hellaswag", "task_limit": 100, "bench_top": 1, "bootstrap": 2000,
             "select_samples": 16, "select_evaluations": 32, "select_pool": None, "select_confirm_samples": 32,
             "select_race": True},
    "quick": {"samples": 32, "seq_len": 128, "eval_samples": 12, "top": 5, "random": 3, "greedy_samples": 2,
              "tasks": "", "task_limit": 50, "bench_top": 1, "bootstrap": 1000,
              "select_samples": 8, "select_evaluations": 24, "select_pool": 10, "select_confirm_samples": 16,
              "select_race": True},
}
DEFAULT_M = "3,6,9"


def register(sub: argparse._SubParsersAction) -> None:
    from qblock.cli._common import add_eval_dtype_option, add_evaluation_options, add_selection_options

    p = sub.add_parser(
        "run",
        help="the main job: extract, solve and validate against baselines, with a report",
        description=(
            "End to end on MODEL (default SmolLM2-135M-Instruct, offline once cached): extract the block-removal "
            "problem (cached), solve it for each M, evaluate the top-k states, random sets and every baseline "
            "(ShortGPT, iterative ShortGPT, angular distance, SLEB, norm ratio) on held-out text, print a summary "
            "and write a report directory. 'qblock run --quick' took 5.6 minutes on 2 quiet CPU cores with native "
            "bf16 with the model and its extraction cached, 6.8 beside a busy loop; 8 to 12 and 14.5 to 17 on AVX2-only CPUs "
            "(fp32); a full run takes hours on such machines; --device cuda where there is a GPU. "
            f"Full settings: {PRESETS['full']}; quick: {PRESETS['quick']}."
        ),
    )
    p.add_argument("--quick", action="store_true", help="small, fast settings (see the description)")
    p.add_argument("--model", default="default",
                   help="model spec: default (SmolLM2-135M-Instruct), gemma3-270m (Gemma-3-270M), a local HF "
                        "model directory, a .gguf file or a hub id (default: default)")
    p.add_argument("--remove", "-M", default=DEFAULT_M, help=f"values of M, comma list (default {DEFAULT_M})")
    p.add_argument("--samples", type=int, default=None, help="calibration samples (preset)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (preset)")
    p.add_argument("--eval-samples", type=int, default=None, help="held-out samples (preset)")
    p.add_argument("--top", "-k", type=int, default=None, help="lowest-energy states per M (preset)")
    p.add_argument("--random", type=int, default=None, help="random sets per M (preset)")
    p.add_argument("--greedy-samples", type=int, default=None,
                   help="calibration samples for SLEB / iterative ShortGPT (preset)")
    p.add_argument("--baselines", default="all", help="'all', 'none' or a comma list (default all)")
    p.add_argument("--tasks", default=None, help="benchmarks, comma list, or 'none' (preset)")
    p.add_argument("--task-limit", type=int, default=None, help="items per benchmark (preset)")
    p.add_argument("--calibration", default=None, metavar="FILE|NAME",
                   help="calibration and held-out text (disjoint passages): a .txt/.jsonl file or a built-in source, "
                        "lambada (default, book passages), wikipedia, stories or code")
    p.add_argument("--eval-text", default=None, metavar="FILE|NAME",
                   help="judge every set on this text instead of the calibration source's held-out passages (a file "
                        "or a built-in source, e.g. code); everything is still chosen on calibration data only")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples for the intervals (preset)")
    p.add_argument("--energy", default="fisher", choices=tuple(ENERGY_MODELS),
                   help="energy model to solve: " + ", ".join(ENERGY_MODELS) + " (default fisher; see qblock extract)")
    p.add_argument("--gate", default="layer", choices=("layer", "branch"),
                   help="gate mode of the extraction: layer (default, any block) or branch (the paper's)")
    p.add_argument("--energies", default="auto", help="energy models to compare (see qblock validate)")
    p.add_argument("--seed", type=int, default=0, help="data, solver and bootstrap seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--restart", action="store_true", help="recompute the cached extraction")
    p.add_argument("--out", "-o", default=None, help="report directory (default ./qblock-report[-quick])")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    add_evaluation_options(p)
    add_selection_options(p, samples=None, evaluations=None, confirm_samples=None, race=None)
    add_eval_dtype_option(p)
    from qblock.validate.heal import add_heal_options

    add_heal_options(p)
    from qblock.cli._common import add_executor_option

    add_executor_option(p)
    p.set_defaults(func=run)


def _resolve(args) -> dict:
    preset = dict(PRESETS["quick" if args.quick else "full"])
    for key in list(preset):
        v = getattr(args, key, None)
        if v is not None:
            preset[key] = v
    return preset


def _checked_settings(args: argparse.Namespace):
    """The preset with the user's values over it, every option checked before any work.

    Returns:
        ``(cfg, ms, baselines, tasks, energies)``; the preset's selection settings are set on ``args``.
    """
    from qblock.cli._common import parse_list, parse_ms, text_sources
    from qblock.llm.data import BENCHMARKS
    from qblock.validate.baselines import BASELINE_METHODS

    check_seed(args.seed)
    check_backend_name(args.backend, "--backend", auto=True)
    check_selection_options(args)  # the user's own values, before the preset fills in the rest
    cfg = _resolve(args)
    check_counts(cfg)
    cfg["seed"], cfg["gate"] = args.seed, args.gate
    cfg["select_race"] = races(cfg["select_race"], args.select_confirm)
    for key in ("select_samples", "select_evaluations", "select_pool", "select_confirm_samples", "select_race"):
        setattr(args, key, cfg[key])
    check_selection_options(args)  # before the model is loaded or the cached problem rewritten
    ms = parse_ms(args.remove)
    check_at_least(*((f"--{k.replace('_', '-')}", cfg.get(k, getattr(args, k, 1)), 1)
                     for k in ("samples", "eval_samples", "top", "batch_size")))
    if cfg["seq_len"] < 2:
        raise CliError("--seq-len must be at least 2")
    baselines = parse_list(args.baselines, BASELINE_METHODS, "--baselines", BASELINE_METHODS)
    tasks = parse_list(cfg["tasks"], tuple(BENCHMARKS), "--tasks")
    energies = args.energies if args.energies == "auto" else parse_list(args.energies, SCORED_ENERGY_MODELS, "--energies")
    sources = text_sources(args, "calibration", "eval_text")
    for option in sources:
        if getattr(args, option) is not None:
            cfg[option] = sources[option] or "lambada"
    if args.eval_text is not None and sources["eval_text"] == sources["calibration"]:
        raise CliError("--eval-text is the calibration text; omit it to judge on the disjoint held-out passages")
    return cfg, ms, baselines, tasks, energies


def run(args: argparse.Namespace) -> int:
    from qblock.cli._common import (apply_eval_dtype, benchmark_overlap, describe_eval, selection_settings, setup_torch,
                                    text_files)

    threads = setup_torch(args)
    from qblock.llm.cache import CacheError
    from qblock.llm.data import DataError
    from qblock.llm.models import ModelLoadError, load_model, model_provenance
    from qblock.llm.pipeline import ExtractError, ExtractionSettings
    from qblock.validate.runner import (ValidationError, ValidationSettings, data_for_problem, print_summary,
                                        summary_if_failed, validate, write_summary_json)

    check_executor(args)
    t_start = time.perf_counter()
    preset_pool = args.select_pool is None  # the preset's pool is capped at the model's blocks below
    cfg, ms, baselines, tasks, energies = _checked_settings(args)
    from qblock.validate.heal import heal_after_validation, heal_options, print_heal_summary

    heal_opts = heal_options(args)
    out = args.out or ("qblock-report-quick" if args.quick else "qblock-report")
    check_output(out, "--out", inputs=text_files({k: cfg.get(k) for k in ("calibration", "eval_text")}), folder=True)
    progress = not args.quiet
    timings = {}

    def log(msg):
        if progress:
            print(f"qblock run: {msg}", file=sys.stderr, flush=True)

    log(f"{'quick' if args.quick else 'full'} settings: {cfg}; M = {ms}")
    t0 = time.perf_counter()
    try:
        model, tok = load_model(args.model, device=args.device, quiet=args.quiet)
    except (ModelLoadError, CacheError) as exc:
        raise CliError(str(exc)) from None
    timings["load_model"] = time.perf_counter() - t0
    prov = model_provenance(args.model)
    extraction = ExtractionSettings(
        model_spec=args.model, num_samples=cfg["samples"], seq_len=cfg["seq_len"], energy=args.energy, gate=args.gate,
        batch_size=args.batch_size, seed=args.seed, progress=progress, restart=args.restart,
        num_eval=cfg["eval_samples"], device=args.device, calibration=cfg.get("calibration"))
    ppath = extraction.cache_path(prov)
    cached = ppath.exists() and not args.restart
    log(("reusing cached extraction " if cached else "extracting the problem into ") + str(ppath))
    t0 = time.perf_counter()
    try:
        problem = replace(extraction, out=ppath).extract(model=model, tokenizer=tok)
    except (CacheError, DataError, ExtractError) as exc:
        raise CliError(str(exc)) from None
    timings["extract"] = time.perf_counter() - t0
    n = problem.num_blocks
    check_ms(ms, n)
    if preset_pool and args.select_pool is not None:
        from qblock.select import default_pool_size

        # a preset is meant to be cheaper: never a larger pool than the default rule gives this model
        capped = min(args.select_pool, default_pool_size(n))
        if capped != args.select_pool:
            log(f"selection pool: {capped} blocks (the preset's {args.select_pool}, capped at the default "
                f"max(8, N/2) for this {n}-block model)")
        args.select_pool = capped
    dtype = apply_eval_dtype(model, args, healing=bool(heal_opts))  # after extraction: gradients stay fp32
    try:
        calib, evals, dprov = data_for_problem(problem, tok, num_eval=cfg["eval_samples"], eval_text=cfg.get("eval_text"))
        settings = ValidationSettings(
            num_removes=ms, top_k=cfg["top"], backend=args.backend, solve_seed=args.seed, num_random=cfg["random"],
            random_seed=args.seed, baselines=baselines, greedy_samples=cfg["greedy_samples"], tasks=tasks,
            task_limit=cfg["task_limit"] or None, bench_top=cfg["bench_top"], harness=args.harness, energy_models=energies,
            n_boot=cfg["bootstrap"], stats_seed=args.seed, batch_size=args.batch_size, progress=progress,
            **selection_settings(args))
        notes = [
            f"extraction {'reused from the cache' if cached else 'computed'} in {timings['extract']:.1f} s "
            f"({cfg['samples']} samples x {cfg['seq_len']} tokens, one batched forward+backward); problem file {ppath}",
            "QUBO cost: one forward and one backward pass over the calibration samples, shared by every M and every "
            "state; baseline costs are forward passes over their own calibration samples, counted as run",
            "greedy baselines (SLEB, iterative ShortGPT) are run once for the largest M; their first M steps are the "
            "result for a smaller M, and the cost listed is that of those steps",
            *benchmark_overlap(dprov, tasks, quiet=args.quiet),
        ]
        with open_executor(args, quiet=args.quiet) as executor:
            result = validate(problem, model, tok, calib, evals, settings, out,
                              report_settings={"model": f"{prov.get('id')} ({prov.get('source')})",
                                               "torch threads": threads, "evaluation dtype": dtype,
                                               "mode": "quick" if args.quick else "full",
                                               "energy (solved)": problem.metadata.get("energy"),
                                               "calibration": f"{cfg['samples']} samples x {cfg['seq_len']} tokens",
                                               "held-out data": describe_eval(dprov),
                                               "executor": args.executor},
                              title=f"qblock run: which blocks of {prov.get('id')} to remove", notes=notes,
                              executor=executor, write_summary=False)
        if heal_opts:
            with summary_if_failed(out, result):
                heal_after_validation(result, model, tok, evals, dprov, out, heal_opts, n_boot=cfg["bootstrap"],
                                      seed=args.seed, batch_size=args.batch_size, progress=progress,
                                      write_summary=False)
    except (ValidationError, DataError, CacheError) as exc:
        raise CliError(str(exc)) from None
    timings.update(result["timings"])
    total = time.perf_counter() - t_start
    timings["total"] = total
    # summary.json is written once, with the whole job's phase timings (and the healing, if any)
    result["summary_json"]["timings_seconds"] = {k: round(float(v), 3) for k, v in timings.items()}
    write_summary_json(out, result["summary_json"])
    if progress:
        print_summary(result)
        print_heal_summary(result)
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total")
        print(f"\ntotal {total:.0f} s ({phases})")
        print(f"report: {out}/report.md (tables: candidates.csv/.json/.md, summary.json, plots)")
    return 0

