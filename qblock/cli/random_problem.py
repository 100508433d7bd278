"""``qblock random-problem``: a synthetic instance of the paper's structure, ``H = A^T A / m``."""

from __future__ import annotations

import argparse
import sys

from qblock.cli import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("random-problem", help="write a synthetic PSD problem (H = A^T A / m)",
                       description="Write a synthetic problem of the paper's structure, H = A^T A / m, with "
                                   "correlated neighbouring blocks: for trying backends without a model.")
    p.add_argument("--blocks", "-N", type=int, required=True, help="number of blocks N")
    p.add_argument("--remove", "-M", type=int, default=None, help="blocks to remove (default N/4, at least 1)")
    p.add_argument("--samples", type=int, default=256, help="rows m of A (default 256)")
    p.add_argument("--correlation", type=float, default=0.6, help="neighbouring-block correlation (default 0.6)")
    p.add_argument("--linear", action="store_true", help="add a first-order (linear) term")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", "-o", required=True, help="output problem file (.npz is added when missing)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qblock.cli._common import check_output, check_seed
    from qblock.problems.synthetic import random_problem

    if args.blocks < 1:
        raise CliError("--blocks must be at least 1")
    check_seed(args.seed)
    from qblock._io import npz_path

    check_output(args.out, "--out")  # a folder, an empty path: refused as spelled
    out = npz_path(args.out)  # as extract: "-o p" writes p.npz
    check_output(out, "--out")
    p = random_problem(args.blocks, args.remove, num_samples=args.samples, correlation=args.correlation,
                       linear=args.linear, seed=args.seed)
    p.save(out)
    print(f"wrote {out}: N={p.num_blocks}, M={p.num_remove}, energy={p.metadata['energy']}", file=sys.stderr)
    return 0
