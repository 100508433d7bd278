"""``qblock extract``: gate gradients of a model on calibration text -> a problem file (resumable)."""

from __future__ import annotations

import argparse

from qblock.cli import CliError
from qblock.cli._common import check_output, text_files, text_sources


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="compute the block-removal problem of a model (resumable)",
        description=(
            "Compute per-sample gate gradients A of MODEL on calibration text and write the block-removal "
            "problem (H = A^T A / m for --energy fisher). Checkpoints go to OUT's .partial.npz; re-running "
            "the same command resumes. Example: qblock extract --model default --samples 128 --out p.npz"
        ),
    )
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct, offline once cached), 'gemma3-270m' (Gemma-3-270M, "
                        "Gemma Terms of Use), a local HF model directory, a .gguf file, or a hub id (default: default)")
    p.add_argument("--samples", type=int, default=128, help="calibration samples m (default 128)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sample (default 256)")
    from qblock._energies import ENERGY_MODELS

    p.add_argument("--energy", default="fisher", choices=tuple(ENERGY_MODELS),
                   help="; ".join(f"{k}: {v}" for k, v in ENERGY_MODELS.items()) + " (default fisher; the measured "
                        "energies are not resumable)")
    p.add_argument("--gate", default="layer", choices=("layer", "branch"), help="gate mode (default layer)")
    p.add_argument("--granularity", default="block", choices=("block", "sublayer"),
                   help="one variable per block, or per residual branch (branch gates only)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batched backward (default 8)")
    p.add_argument("--calibration", default=None, metavar="FILE|NAME",
                   help="calibration text: .txt (paragraphs) or .jsonl ('text' field), or a built-in source: "
                        "lambada (default, book passages), wikipedia, stories, code")
    p.add_argument("--eval-samples", type=int, default=64,
                   help="held-out samples reserved (disjoint passages) for evaluation (default 64)")
    p.add_argument("--seed", type=int, default=0, help="data shuffle/split seed (default 0)")
    p.add_argument("--out", "-o", required=True, help="output problem file (.npz)")
    p.add_argument("--remove", "-M", type=int, default=None, help="number of blocks to remove, stored in the file")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="checkpoint every N samples (default 32)")
    p.add_argument("--restart", action="store_true", help="discard an existing checkpoint/output and start over")
    p.add_argument("--no-keep-a", action="store_true", help="do not store A in the file")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default float32; bf16 is very slow on most CPUs)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default cpu), or auto to spread a large model over all GPUs (device_map)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    from qblock.cli._common import add_executor_option

    add_executor_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qblock._lazy import require

    require("torch", "llm")
    require("transformers", "llm")
    from qblock.llm.cache import CacheError
    from qblock.llm.data import DataError
    from qblock.cli._common import check_at_least, check_seed
    from qblock.llm.pipeline import ExtractError, extract_problem, npz_path

    check_at_least(("--samples", args.samples, 1), ("--seq-len", args.seq_len, 1), ("--batch-size", args.batch_size, 1),
                   ("--checkpoint-every", args.checkpoint_every, 1))
    if args.seq_len < 2:
        raise CliError("--seq-len must be at least 2 (next-token loss)")
    if args.eval_samples < 0:
        raise CliError("--eval-samples must be >= 0")
    if args.granularity == "sublayer" and args.gate != "branch":
        raise CliError("--granularity sublayer needs --gate branch (one gate per residual branch)")
    check_seed(args.seed)
    out = npz_path(args.out)  # the file written ("-o e4" writes e4.npz): checked and named as such
    check_output(out, "--out", inputs=text_files(text_sources(args, "calibration")))
    from qblock.cli._common import check_executor, open_executor

    if args.executor != "local" and args.energy != "measured":
        raise CliError(f"--executor applies to --energy measured; the {args.energy} energy's gradients split over "
                       "processes with torchrun instead (README: Beyond one machine)")
    check_executor(args)
    try:
        with open_executor(args, quiet=args.quiet) as executor:
            problem = extract_problem(
                model_spec=args.model, num_samples=args.samples, seq_len=args.seq_len, energy=args.energy,
                gate=args.gate, granularity=args.granularity, batch_size=args.batch_size, seed=args.seed,
                out=args.out, checkpoint_every=args.checkpoint_every, calibration=args.calibration,
                keep_A=not args.no_keep_a, progress=not args.quiet, num_remove=args.remove,
                restart=args.restart, num_eval=args.eval_samples, dtype=args.dtype, device=args.device,
                executor=executor,
            )
    except (CacheError, DataError, ExtractError) as exc:
        raise CliError(str(exc)) from None
    if problem is None:  # a torchrun rank other than 0: rank 0 wrote the output
        return 0
    if not args.quiet:
        m = problem.metadata
        print(f"{out}: {problem.num_blocks} variables ({m['gate']}/{m['granularity']}), "
              f"energy {m['energy']}, {m['num_samples']} samples x {m['seq_len']} tokens, "
              f"model {m['model'].get('id')}")
        diag = problem.H.diagonal() + problem.linear
        cheapest = sorted(range(problem.num_blocks), key=lambda i: diag[i])[:5]
        print("cheapest single removals: " + ", ".join(f"{problem.labels[i]} ({diag[i]:.3g})" for i in cheapest))
        if problem.num_remove is None:
            print(f"next: qblock solve {out} --remove M")
        else:
            print(f"next: qblock solve {out}")
    return 0
