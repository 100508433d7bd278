"""Pictures of a block-removal problem (matplotlib, Agg backend; networkx).

* :func:`plot_hessian`: heat map of ``H`` with block labels (symmetric log colour scale, since the
  first and last blocks usually dominate), removed blocks marked;
* :func:`plot_depth_graph`: the block interaction graph (:meth:`BlockRemovalProblem.to_networkx`)
  laid out along the depth of the model - ``x`` is the block index, couplings are arcs (above the axis
  when positive, below when negative), node area is the single-block cost, the removal set is red and
  the couplings *between removed blocks* (exactly the pair terms of its energy) are drawn red;
* :func:`plot_block_costs`: bar chart of the single-block costs ``H_ii + h_i``;
* :func:`plot_embedding`: a minor embedding of the (dense) problem graph on a D-Wave hardware graph,
  chains coloured by length, plus the chain length per block. Offline: the hardware graph is that of
  ``dwave.system.testing.MockDWaveSampler`` (Pegasus or Zephyr) and the embedding comes from
  minorminer's clique embedder, which is what the QPU backend needs for a dense ``H``.

:func:`show` draws all of them into a folder (plus ``show.json`` with the numbers behind them).

Example:
    >>> import qblock, tempfile
    >>> from qblock.viz import show
    >>> paths = show(qblock.random_problem(12, 3, seed=0), tempfile.mkdtemp(), embedding=False)
    >>> sorted(paths)
    ['block_costs', 'depth_graph', 'hessian', 'json']
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qblock.problems.block_removal import BlockRemovalProblem

__all__ = [
    "choose_removal",
    "plot_hessian",
    "plot_depth_graph",
    "plot_block_costs",
    "embedding_for",
    "plot_embedding",
    "embedding_available",
    "show",
]

REMOVED = "#d62728"
KEPT = "#4a78b5"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    from qblock._io import atomic_write_bytes

    plt = _pyplot()
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _short(label: str) -> str:
    """``model.layers.7`` -> ``layers.7``: keep the part that tells blocks apart."""
    parts = label.split(".")
    return ".".join(parts[-2:]) if len(parts) > 2 else label


def _tick_step(n: int, room: int = 40) -> int:
    return max(1, math.ceil(n / room))


def choose_removal(problem: BlockRemovalProblem, backend: str = "auto", seed: int | None = 0) -> dict[str, Any]:
    """The removal set to highlight: the best state of ``exact`` (certified) when the problem is small
    enough, else of ``swap``.

    Returns:
        ``{"removed": [...], "energy": float, "backend": str, "certified": bool}``

    Example:
        >>> import qblock
        >>> choose_removal(qblock.random_problem(10, 2, seed=0))["certified"]
        True
    """
    import qblock

    if backend == "auto":
        from qblock.backends.exact import auto_backend

        backend = auto_backend(problem.num_blocks, problem.num_remove)
    ss = qblock.solve(problem, backend=backend, num_solutions=1, seed=seed)
    if not len(ss):
        raise ValueError(f"backend {backend!r} returned no feasible state")
    return {
        "removed": problem.removed_blocks(ss.first.sample),
        "energy": float(ss.first.energy),
        "backend": backend,
        "certified": bool(ss.info.get("certified_optimal", False)),
    }


def _removed_mask(problem: BlockRemovalProblem, removed: Sequence[int] | None) -> np.ndarray:
    mask = np.zeros(problem.num_blocks, dtype=bool)
    if removed is not None:
        idx = [int(i) for i in removed]
        bad = [i for i in idx if not 0 <= i < problem.num_blocks]
        if bad:
            raise ValueError(f"removed block index {bad[0]} out of range 0..{problem.num_blocks - 1}")
        mask[idx] = True
    return mask


def _max_edges(n: int, max_edges: int | None) -> int:
    """Couplings the depth graph draws: ``4 n`` by default; a negative count is refused (as a slice
    bound it would silently drop the strongest couplings instead)."""
    if max_edges is None:
        return 4 * n
    if not int(max_edges) >= 0:
        raise ValueError(f"max_edges must be at least 0, got {max_edges}")
    return int(max_edges)


def plot_hessian(problem: BlockRemovalProblem, path: str | os.PathLike, removed: Sequence[int] | None = None) -> Path:
    """Heat map of ``H`` (symmetric log colour scale) with block labels; removed blocks' labels in red."""
    from matplotlib.colors import SymLogNorm

    plt = _pyplot()
    H = problem.H
    n = problem.num_blocks
    mask = _removed_mask(problem, removed)
    vmax = float(np.abs(H).max()) or 1.0
    # linear within 1e-3 of the largest entry, logarithmic beyond: the first/last blocks dominate H
    norm = SymLogNorm(linthresh=vmax * 1e-3, vmin=-vmax, vmax=vmax, base=10)
    size = min(12.0, 4.5 + n * 0.07)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(H, cmap="RdBu_r", norm=norm, interpolation="nearest")
    step = _tick_step(n)
    ticks = list(range(0, n, step))
    labels = [_short(problem.labels[i]) for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
    ax.set_yticks(ticks, labels, fontsize=7)
    for lab, i in zip(ax.get_xticklabels(), ticks):
        lab.set_color(REMOVED if mask[i] else "black")
    for lab, i in zip(ax.get_yticklabels(), ticks):
        lab.set_color(REMOVED if mask[i] else "black")
    for i in np.flatnonzero(mask):  # removed blocks: red marks on both axes
        ax.plot([i], [-0.5], marker="v", color=REMOVED, ms=5, clip_on=False)
        ax.plot([-0.5], [i], marker=">", color=REMOVED, ms=5, clip_on=False)
    fig.colorbar(im, ax=ax, shrink=0.8, label="H_ij (symmetric log scale)")
    title = f"H ({n} x {n})"
    if mask.any():
        title += f"; red: the {int(mask.sum())} removed blocks"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("block")
    ax.set_ylabel("block")
    fig.tight_layout()
    return _save(fig, path)


def plot_depth_graph(
    problem: BlockRemovalProblem,
    path: str | os.PathLike,
    removed: Sequence[int] | None = None,
    *,
    max_edges: int | None = None,
) -> Path:
    """The interaction graph along the depth of the model (arc diagram, ``x`` = block index).

    Args:
        problem: the problem; its graph comes from :meth:`~BlockRemovalProblem.to_networkx`.
        path: PNG to write.
        removed: the removal set to highlight (red nodes; red arcs for the couplings among removed
            blocks, which are exactly the pair terms of the set's energy).
        max_edges: draw only the strongest couplings (default ``4 N``) plus all among removed blocks;
            a dense ``H`` has ``N (N-1) / 2`` of them.
    """
    from matplotlib.patches import Arc

    plt = _pyplot()
    g = problem.to_networkx()
    n = problem.num_blocks
    mask = _removed_mask(problem, removed)
    max_edges = _max_edges(n, max_edges)
    edges = sorted(g.edges(data="weight"), key=lambda e: -abs(e[2]))
    keep = edges[:max_edges]
    among = [e for e in edges[max_edges:] if mask[e[0]] and mask[e[1]]]
    drawn = keep + among
    wmax = max((abs(w) for _, _, w in drawn), default=1.0) or 1.0
    fig, ax = plt.subplots(figsize=(min(16.0, 6.0 + 0.12 * n), 5.0))
    hmax = 0.0
    # faint arcs first, highlighted ones on top
    for u, v, w in sorted(drawn, key=lambda e: (mask[e[0]] and mask[e[1]], abs(e[2]))):
        i, j = sorted((u, v))
        width = j - i
        height = width * 0.9
        hmax = max(hmax, height / 2)
        hot = mask[i] and mask[j]
        rel = abs(w) / wmax
        ax.add_patch(Arc(((i + j) / 2, 0.0), width, height, theta1=0 if w > 0 else 180, theta2=180 if w > 0 else 360,
                         color=REMOVED if hot else ("#555555" if w > 0 else "#2ca02c"),
                         alpha=0.9 if hot else 0.15 + 0.6 * rel, lw=0.4 + 2.6 * rel))
    cost = np.array([g.nodes[i]["cost"] for i in range(n)])
    span = float(np.abs(cost).max()) or 1.0
    sizes = 20 + 280 * np.abs(cost) / span
    ax.scatter(np.arange(n)[~mask], np.zeros((~mask).sum()), s=sizes[~mask], color=KEPT, zorder=3,
               edgecolors="white", label="kept block")
    if mask.any():
        ax.scatter(np.arange(n)[mask], np.zeros(mask.sum()), s=sizes[mask], color=REMOVED, zorder=4,
                   edgecolors="black", label="removed block")
    step = _tick_step(n, 48)
    ax.set_xticks(range(0, n, step), [_short(problem.labels[i]) for i in range(0, n, step)], rotation=90, fontsize=7)
    ax.set_yticks([])
    ax.set_xlim(-1, n)
    ax.set_ylim(-hmax * 1.05 - 0.5, hmax * 1.05 + 0.5)
    ax.set_xlabel("depth (block index)")
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    shown = f"{len(drawn)} of {g.number_of_edges()} couplings" if len(drawn) < g.number_of_edges() else "all couplings"
    ax.set_title(f"block interaction graph along depth ({shown})\n"
                 "arcs above: couplings 2H_ij > 0, below: < 0; node area: single-block cost", fontsize=9)
    from matplotlib.lines import Line2D

    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="#555555", label="coupling > 0"), Line2D([], [], color="#2ca02c", label="coupling < 0")]
    if mask.any():
        handles.append(Line2D([], [], color=REMOVED, label="coupling among removed (in E)"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _save(fig, path)


def plot_block_costs(problem: BlockRemovalProblem, path: str | os.PathLike, removed: Sequence[int] | None = None) -> Path:
    """Bar chart of the single-block costs ``H_ii + h_i`` (the energy of removing that block alone)."""
    plt = _pyplot()
    n = problem.num_blocks
    mask = _removed_mask(problem, removed)
    cost = np.diag(problem.H) + problem.linear
    fig, ax = plt.subplots(figsize=(min(16.0, 5.0 + 0.12 * n), 3.8))
    ax.bar(np.arange(n), cost, color=np.where(mask, REMOVED, KEPT), width=0.8)
    if cost.min() > 0 and cost.max() / max(cost.min(), 1e-300) > 100:
        ax.set_yscale("log")
    step = _tick_step(n, 48)
    ax.set_xticks(range(0, n, step), [_short(problem.labels[i]) for i in range(0, n, step)], rotation=90, fontsize=7)
    ax.set_xlim(-1, n)
    ax.set_xlabel("block")
    ax.set_ylabel("H_ii + h_i")
    title = "single-block cost (energy of removing one block alone)"
    if mask.any():
        title += "; red: removed"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------ QPU embedding
def _graphs_module():
    """dwave-networkx under its new name (dwave.graphs, with dwave-system >= 1.30) or its old one."""
    import importlib

    for name in ("dwave.graphs", "dwave_networkx"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    from qblock._lazy import MissingDependencyError

    raise MissingDependencyError(
        "drawing the QPU embedding needs dwave-networkx (dwave.graphs); install it with: pip install 'qblock[leap]'"
    )


def embedding_available() -> tuple[bool, str]:
    """``(ok, reason)``: can :func:`plot_embedding` run here (dwave-system, minorminer, dwave-networkx)?"""
    from qblock._lazy import is_installed

    missing = [m for m in ("dwave.system", "minorminer") if not is_installed(m)]
    if not (is_installed("dwave.graphs") or is_installed("dwave_networkx")):
        missing.append("dwave-networkx")
    if missing:
        return False, f"missing {', '.join(missing)} (pip install 'qblock[leap]')"
    return True, ""


_SHAPES = {"pegasus": (4, 6, 8, 12, 16), "zephyr": (2, 4, 6, 8, 12)}


def embedding_for(problem: BlockRemovalProblem, topology: str = "pegasus") -> dict[str, Any]:
    """Clique-embed the problem's ``N`` variables on the smallest mock hardware graph that holds them.

    Uses ``MockDWaveSampler(topology_type=..., topology_shape=...)`` for the hardware graph and
    ``minorminer.busclique.find_clique_embedding`` (deterministic, offline). A dense ``H`` couples
    every pair of blocks, so a clique embedding is what the QPU needs.

    Returns:
        ``{"topology", "shape", "num_qubits_graph", "embedding": {block: [qubits]}, "chain_lengths": [...]}``

    Example:
        >>> import qblock
        >>> e = embedding_for(qblock.random_problem(12, 3, seed=0))
        >>> e["topology"], len(e["chain_lengths"]), min(e["chain_lengths"]) >= 1
        ('pegasus', 12, True)
    """
    from qblock._lazy import require

    if topology not in _SHAPES:
        raise ValueError(f"topology must be one of {', '.join(_SHAPES)}, got {topology!r}")
    testing = require("dwave.system.testing", "leap")
    busclique = require("minorminer.busclique", "leap")
    dg = _graphs_module()
    n = problem.num_blocks
    for m in _SHAPES[topology]:
        sampler = testing.MockDWaveSampler(topology_type=topology, topology_shape=[m], parameter_warnings=False)
        maker = dg.pegasus_graph if topology == "pegasus" else dg.zephyr_graph
        G = maker(m, node_list=sampler.nodelist, edge_list=sampler.edgelist)
        emb = busclique.find_clique_embedding(n, G)
        if len(emb) == n:
            emb = {int(k): [int(q) for q in v] for k, v in emb.items()}
            return {
                "topology": topology,
                "shape": [m],
                "num_qubits_graph": G.number_of_nodes(),
                "embedding": {str(k): emb[k] for k in range(n)},
                "chain_lengths": [len(emb[k]) for k in range(n)],
                "_graph": G,
            }
    raise ValueError(f"no clique embedding of {n} variables on {topology} up to shape {_SHAPES[topology][-1]}")


def plot_embedding(problem: BlockRemovalProblem, path: str | os.PathLike, topology: str = "pegasus") -> tuple[Path, dict[str, Any]]:
    """The QPU embedding: chains drawn on the hardware graph coloured by length, and chain length per block.

    Returns:
        ``(path, info)`` where ``info`` is :func:`embedding_for`'s dictionary (without the graph).
    """
    import matplotlib.cm as cm
    from matplotlib.colors import Normalize

    plt = _pyplot()
    dg = _graphs_module()
    info = embedding_for(problem, topology)
    G = info.pop("_graph")
    lengths = np.array(info["chain_lengths"])
    emb = {int(k): v for k, v in info["embedding"].items()}
    norm = Normalize(vmin=max(1, lengths.min() - 1), vmax=lengths.max() + 0.5)
    cmap = plt.colormaps["viridis"]
    colors = {k: tuple(cmap(norm(len(c)))) for k, c in emb.items()}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 6), gridspec_kw={"width_ratios": [1.3, 1]})
    draw = dg.draw_pegasus_embedding if topology == "pegasus" else dg.draw_zephyr_embedding
    draw(G, emb, chain_color=colors, ax=ax1, node_size=6, width=0.4, unused_color=(0.85, 0.85, 0.85, 0.6),
         interaction_edges=[])
    ax1.set_title(f"{topology} {info['shape'][0]} (mock, {G.number_of_nodes()} qubits): "
                  f"{int(lengths.sum())} qubits in {len(emb)} chains", fontsize=9)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax1, shrink=0.7, label="chain length")
    ax2.bar(np.arange(len(lengths)), lengths, color=[colors[k] for k in range(len(lengths))])
    ax2.set_xlabel("block")
    ax2.set_ylabel("chain length (qubits)")
    ax2.set_title(f"chain length per block: mean {lengths.mean():.2f}, max {lengths.max()}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path), info


def show(
    problem: BlockRemovalProblem,
    out_dir: str | os.PathLike,
    removed: Sequence[int] | None = None,
    *,
    backend: str = "auto",
    seed: int | None = 0,
    embedding: bool = True,
    topology: str = "pegasus",
    max_edges: int | None = None,
) -> dict[str, Path]:
    """Draw every picture of ``problem`` into ``out_dir``.

    Args:
        problem: the problem. If ``removed`` is None and ``num_remove`` is set, the removal set shown
            is :func:`choose_removal`'s (exact when small enough, else swap).
        out_dir: folder for ``hessian.png``, ``depth_graph.png``, ``block_costs.png``,
            ``embedding.png`` (when dwave-system, minorminer and dwave-networkx are installed and
            ``embedding``) and ``show.json`` (the removal set, its energy and how it was found,
            chain lengths, or why the embedding was skipped).
        removed: a removal set to highlight instead: each block once, ``num_remove`` of them when the
            problem sets it (else ``ValueError``, before anything is written).
        backend, seed: for :func:`choose_removal`.
        embedding: also draw the QPU embedding.
        topology: ``"pegasus"`` or ``"zephyr"``.
        max_edges: see :func:`plot_depth_graph`.

    Returns:
        ``{name: path}`` of what was written.
    """
    from qblock._io import atomic_write_bytes, remove_stale

    out = Path(out_dir)
    meta: dict[str, Any] = {"num_blocks": problem.num_blocks, "num_remove": problem.num_remove,
                            "labels": list(problem.labels)}
    if removed is None and problem.num_remove is not None:
        meta["removal"] = choose_removal(problem, backend, seed)
        removed = meta["removal"]["removed"]
    elif removed is not None:
        from qblock._solutions import check_removed

        # each block once, in range, M of them: else the drawing and the energy describe another set
        removed = check_removed(list(removed), "removed", num_blocks=problem.num_blocks,
                                 num_remove=problem.num_remove)
        meta["removal"] = {"removed": removed, "energy": problem.energy(problem.state_from_removed(removed)),
                           "backend": "given", "certified": False}
    _max_edges(problem.num_blocks, max_edges)
    out.mkdir(parents=True, exist_ok=True)  # only now: nothing is written when the input is wrong
    paths: dict[str, Path] = {
        "hessian": plot_hessian(problem, out / "hessian.png", removed),
        "depth_graph": plot_depth_graph(problem, out / "depth_graph.png", removed, max_edges=max_edges),
        "block_costs": plot_block_costs(problem, out / "block_costs.png", removed),
    }
    if embedding:
        ok, reason = embedding_available()
        if ok:
            paths["embedding"], info = plot_embedding(problem, out / "embedding.png", topology)
            meta["embedding"] = {k: v for k, v in info.items() if k != "embedding"}
        else:
            meta["embedding"] = {"skipped": reason}
    atomic_write_bytes(out / "show.json", (json.dumps(meta, indent=1) + "\n").encode())
    paths["json"] = out / "show.json"
    remove_stale(out, ["embedding.png"], paths.values())  # an earlier run's, not this problem's
    return paths

