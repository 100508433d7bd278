"""Energy vs held-out loss scatter plots (matplotlib, Agg backend, PNG).

Example:
    >>> import tempfile, os
    >>> rows = [{"num_remove": 2, "method": "qubo", "rank": 1, "removed": [0, 1], "energy": 0.1,
    ...          "heldout_loss": 2.0},
    ...         {"num_remove": 2, "method": "shortgpt", "rank": None, "removed": [1, 2], "energy": 0.3,
    ...          "heldout_loss": 2.4}]
    >>> paths = plot_energy_vs_loss(rows, tempfile.mkdtemp())
    >>> [os.path.basename(p) for p in paths]
    ['energy_vs_loss_M2.png']
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from qblock.validate.stats import QUBO_METHOD, RANDOM_METHOD, REFERENCE_METHOD

__all__ = ["plot_energy_vs_loss", "plot_loss_vs_m"]

_MARKERS = {"shortgpt": "s", "shortgpt_iterative": "D", "angular": "^", "sleb": "v", "norm_ratio": "P"}


def _plt():
    from qblock._lazy import require

    mpl = require("matplotlib", "viz")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(v: Any) -> bool:
    return isinstance(v, (int, float)) and v is not None and math.isfinite(float(v))


def plot_energy_vs_loss(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike,
                        energy_key: str = "energy") -> list[str]:
    """One PNG per M: energy (x) vs held-out loss (y); QUBO states coloured by rank, random sets in
    grey, each baseline with its own marker and label. Returns the written paths."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    ms = sorted({int(r["num_remove"]) for r in rows if r["method"] != REFERENCE_METHOD})
    for m in ms:
        sel = [r for r in rows if int(r["num_remove"]) == m and _ok(r.get(energy_key)) and _ok(r.get("heldout_loss"))]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        q = [r for r in sel if r["method"] == QUBO_METHOD]
        if q:
            sc = ax.scatter([r[energy_key] for r in q], [r["heldout_loss"] for r in q],
                            c=[r.get("rank") or 0 for r in q], cmap="viridis_r", s=36, zorder=3,
                            label=f"QUBO top-{len(q)}")
            fig.colorbar(sc, ax=ax, label="QUBO rank")
        rnd = [r for r in sel if r["method"] == RANDOM_METHOD]
        if rnd:
            ax.scatter([r[energy_key] for r in rnd], [r["heldout_loss"] for r in rnd], c="0.6", marker="x",
                       s=36, zorder=2, label="random")
        for method in sorted({str(r["method"]) for r in sel} - {QUBO_METHOD, RANDOM_METHOD}):
            b = [r for r in sel if r["method"] == method]
            ax.scatter([r[energy_key] for r in b], [r["heldout_loss"] for r in b], marker=_MARKERS.get(method, "o"),
                       s=70, facecolors="none", edgecolors="C3", linewidths=1.5, zorder=4)
            for r in b:
                ax.annotate(method, (r[energy_key], r["heldout_loss"]), textcoords="offset points",
                            xytext=(5, 4), fontsize=7, color="C3")
        ax.set_xlabel("energy" if energy_key == "energy" else energy_key)
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(f"Remove M={m} blocks: energy vs held-out loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        p = out / f"energy_vs_loss_M{m}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


def plot_loss_vs_m(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> str | None:
    """Best held-out loss per method vs M (one line per method; the full model as a dashed line)."""
    plt = _plt()
    ms = sorted({int(r["num_remove"]) for r in rows if r["method"] != REFERENCE_METHOD})
    if not ms:
        return None
    methods = sorted({str(r["method"]) for r in rows if r["method"] != REFERENCE_METHOD},
                     key=lambda m: (m != QUBO_METHOD, m == RANDOM_METHOD, m))
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, method in enumerate(methods):
        xs, ys = [], []
        for m in ms:
            v = [float(r["heldout_loss"]) for r in rows
                 if r["method"] == method and int(r["num_remove"]) == m and _ok(r.get("heldout_loss"))]
            if v:
                xs.append(m)
                ys.append(min(v))
        label = "QUBO (best of top-k)" if method == QUBO_METHOD else ("random (best)" if method == RANDOM_METHOD else method)
        ax.plot(xs, ys, marker=_MARKERS.get(method, "o"), label=label, lw=2.2 if method == QUBO_METHOD else 1.2,
                color="C0" if method == QUBO_METHOD else ("0.6" if method == RANDOM_METHOD else f"C{i + 1}"))
    ref = [r for r in rows if r["method"] == REFERENCE_METHOD and _ok(r.get("heldout_loss"))]
    if ref:
        ax.axhline(float(ref[0]["heldout_loss"]), color="k", ls="--", lw=1, label="full model")
    ax.set_xlabel("blocks removed (M)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_xticks(ms)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Held-out loss of the pruned model")
    fig.tight_layout()
    p = Path(out_dir) / "loss_vs_m.png"
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return str(p)
