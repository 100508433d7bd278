"""``qblock svd``: compress every decoder linear by a truncated SVD with ranks chosen under one budget.

Example::

    qblock svd --model default --ratio 0.8 --method uniform --out smol-svd80/
    qblock svd --model default --ratio 0.8 --method exact --out smol-svd80-qubo/
    qblock svd --model default --ratio 0.8 --method fermigrad --param steps=20 --out smol-fg80/
"""

from __future__ import annotations

import argparse
import json
import sys

from qblock.cli import CliError
from qblock.cli._common import (check_at_least, check_fresh_folder, check_output, check_seed, parse_params,
                                text_files, text_sources)

_DESCRIPTION = (
    "SVD of every attention and MLP projection of every decoder block (plain, or whitened on calibration "
    "activations as SVD-LLM does), ranks chosen by METHOD so that the PivGa factors store at most RATIO of the "
    "decoder-linear parameters, and an export: OUT is a Hugging Face model directory with the dense "
    "reconstructed weights, plus lowrank.safetensors (gauge-fixed factors; qblock.svd.export.load_lowrank reads "
    "them) and svd.json. METHOD is uniform, global-threshold, fermigrad or any backend name (the rank-selection "
    "QUBO solved by that backend). Example: qblock svd --model default --ratio 0.8 --method exact --out svd80/"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("svd", help="compress the decoder linears by SVD with globally chosen ranks",
                       description=_DESCRIPTION)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a local HF directory, ...")
    p.add_argument("--ratio", type=float, required=True,
                   help="fraction of the decoder-linear parameters kept, in (0, 1] (0.8 = 20%% fewer)")
    p.add_argument("--method", default="uniform",
                   help="uniform, global-threshold, fermigrad, or a backend (exact, swap, sa, tabu, leap-cqm, ...)")
    p.add_argument("--basis", default="whitened", choices=("whitened", "plain"),
                   help="SVD of W (plain) or of W S with S S^T the input activations' second moment (default)")
    p.add_argument("--calibration", default=None, metavar="FILE|NAME",
                   help="calibration text (.txt passages separated by blank lines, or .jsonl), or a built-in source: "
                        "lambada (default), wikipedia, stories, code")
    p.add_argument("--samples", type=int, default=16, help="calibration samples (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample (default 128)")
    p.add_argument("--group-size", type=int, default=32, help="singular values per QUBO variable (default 32)")
    p.add_argument("--energy", default="fisher", choices=("fisher", "fisher+grad"), help="QUBO energy (default fisher)")
    p.add_argument("--couplings", default="diagonal", choices=("full", "matrix", "diagonal"),
                   help="QUBO couplings kept (default diagonal; with diagonal or matrix, exact solves any size)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a parameter of the backend or of FermiGrad (steps, lr, t_start, t_end, batch); repeatable")
    p.add_argument("--seed", type=int, default=0, help="data and solver seed (default 0)")
    p.add_argument("--out", "-o", required=True, help="output model directory")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out directory")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> dict:
    from qblock import backends
    from qblock.svd import METHODS

    if not 0.0 < args.ratio <= 1.0:
        raise CliError(f"--ratio must be in (0, 1] (the fraction of parameters kept), got {args.ratio}")
    if args.method not in METHODS and args.method not in backends.names():
        raise CliError(f"--method {args.method!r} is unknown; choose one of {', '.join(METHODS)} or a backend "
                       f"({', '.join(backends.names())})")
    if args.method in backends.names() and not backends.get_spec(args.method).accepts("rank_selection"):
        raise CliError(f"--method {args.method}: that backend does not solve rank-selection problems")
    check_at_least(("--samples", args.samples, 1), ("--seq-len", args.seq_len, 2), ("--group-size", args.group_size, 1))
    check_seed(args.seed)
    # as prune and heal: never the model read (--model D -o D replaced it), nor into another model's files
    check_output(args.out, "--out", folder=True, writes=("*.safetensors", "*.json"),
                 inputs=[*text_files(text_sources(args, "calibration")), args.model])
    check_fresh_folder(args.out, "--out", args.overwrite)
    return parse_params(args.param)


def run(args: argparse.Namespace) -> int:
    from qblock._lazy import require

    require("torch", "llm")
    require("transformers", "llm")
    params = _check(args)
    import torch

    from qblock.llm.cache import CacheError
    from qblock.llm.data import DataError, calibration_and_eval
    from qblock.llm.models import ModelLoadError, load_model, model_provenance
    from qblock.svd import allocate, factorise
    from qblock.svd.export import export

    try:
        model, tok = load_model(args.model, quiet=args.quiet)
        calib, _, prov = calibration_and_eval(tok, args.calibration, num_calib=args.samples, num_eval=0,
                                              seq_len=args.seq_len, seed=args.seed)
    except (CacheError, DataError, ModelLoadError) as exc:
        raise CliError(str(exc)) from None
    model.eval()
    torch.manual_seed(args.seed)
    fs = factorise(model, calib, whiten=args.basis == "whitened", progress=not args.quiet)
    fermi = params if args.method == "fermigrad" else None
    ranks, info = allocate(model, fs, args.ratio, args.method, calibration=calib, group_size=args.group_size,
                           energy=args.energy, couplings=args.couplings, seed=args.seed, progress=not args.quiet,
                           fermigrad=fermi, backend_params=None if fermi is not None else params)
    record = {**info, "basis": args.basis, "model": model_provenance(args.model),
              "data": {k: v for k, v in prov.items() if k != "calibration"} | {
                  "calibration_samples": args.samples, "seq_len": args.seq_len}}
    out = export(model, tok, fs, ranks, args.out, json.loads(json.dumps(record, default=str)), quiet=args.quiet)
    if not args.quiet:
        print(f"{out}: {args.method} ({args.basis}) kept {info['stored']:,} of "
              f"{sum(m * n for m, n in (f.shape for f in fs)):,} decoder-linear parameters "
              f"(budget {info['budget']:,}) in {info['seconds']:.1f} s", file=sys.stdout)
    return 0
