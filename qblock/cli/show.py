"""``qblock show``: pictures of a problem (heat map of H, interaction graph along depth, block costs,
QPU embedding)."""

from __future__ import annotations

import argparse

from qblock.cli import CliError

#: what ``show`` writes into --out (qblock.viz.show)
WRITES = ("hessian.png", "depth_graph.png", "block_costs.png", "embedding.png", "show.json")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="draw the problem: heat map of H, interaction graph along depth, block costs, QPU embedding",
        description=(
            "Write PNG pictures of PROBLEM.npz into --out: hessian.png (H with block labels), depth_graph.png "
            "(the block interaction graph laid out along the depth of the model, the chosen removal set in red), "
            "block_costs.png (single-block costs) and, when dwave-system, minorminer and dwave-networkx are "
            "installed, embedding.png (chain lengths of a clique embedding on a mock Pegasus/Zephyr graph; offline). "
            "The removal set is the best solution of exact (when small enough) or swap, unless --removed is given."
        ),
    )
    p.add_argument("problem", help="problem file (.npz)")
    p.add_argument("--remove", "-M", type=int, default=None, help="number of blocks to remove (default: the file's)")
    p.add_argument("--removed", default=None, metavar="I,J,...",
                   help="highlight this removal set instead of solving (M distinct blocks)")
    p.add_argument("--backend", "-b", default="auto", help="backend that chooses the removal set (default: exact if small, else swap)")
    p.add_argument("--seed", type=int, default=0, help="seed for a stochastic backend (default 0)")
    p.add_argument("--out", "-o", default="qblock-show", help="output folder (default ./qblock-show)")
    p.add_argument("--topology", choices=("pegasus", "zephyr"), default="pegasus", help="hardware graph for the embedding")
    p.add_argument("--no-embedding", action="store_true", help="skip the QPU embedding picture")
    p.add_argument("--max-edges", type=int, default=None, help="couplings drawn in the depth graph (default 4N)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from qblock.cli._common import check_output, check_seed
    from qblock.problems.block_removal import BlockRemovalProblem
    from qblock.viz import show

    check_seed(args.seed)
    check_output(args.out, "--out", inputs=[args.problem], folder=True, writes=WRITES)
    path = Path(args.problem)
    if not path.exists():
        raise CliError(f"problem file not found: {args.problem}")
    problem = BlockRemovalProblem.load(path)
    if args.remove is not None:
        problem = problem.with_num_remove(args.remove)
    removed = None
    if args.removed:
        try:
            removed = [int(v) for v in args.removed.split(",") if v.strip()]
        except ValueError:
            raise CliError(f"--removed expects comma-separated block indices, got {args.removed!r}") from None
        from qblock._solutions import check_removed

        removed = check_removed(removed, "--removed", num_blocks=problem.num_blocks, num_remove=problem.num_remove)
    if args.backend != "auto":
        from qblock import backends

        backends.get_spec(args.backend)
    paths = show(problem, args.out, removed, backend=args.backend, seed=args.seed,
                 embedding=not args.no_embedding, topology=args.topology, max_edges=args.max_edges)
    if not args.quiet:
        meta = json.loads(Path(paths["json"]).read_text())
        rem = meta.get("removal")
        if rem:
            how = "certified optimum" if rem["certified"] else f"from {rem['backend']}"
            print(f"removal set ({how}): {rem['removed']}  energy {rem['energy']:.6g}")
        elif problem.num_remove is None and removed is None:
            print("no removal set drawn: the file has no M (pass --remove M or --removed I,J,...)")
        emb = meta.get("embedding")
        if emb and "skipped" in emb:
            print(f"embedding skipped: {emb['skipped']}")
        elif emb:
            cl = emb["chain_lengths"]
            print(f"embedding on {emb['topology']} {emb['shape'][0]}: chain lengths mean {sum(cl) / len(cl):.2f}, max {max(cl)}")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
