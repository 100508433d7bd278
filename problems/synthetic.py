"""Synthetic instances with the structure of real ones: ``H = A^T A / m``.

Rows of ``A`` play the role of per-sample gate gradients. Real models show (i) a few very important
blocks (the first and last ones), (ii) correlation between neighbouring blocks, (iii) heavy-tailed
per-sample magnitudes. The generator reproduces these so that solver studies are not run on
unrealistically easy (i.i.d.) matrices.
"""

from __future__ import annotations

import numpy as np

from qblock.problems.block_removal import BlockRemovalProblem

__all__ = ["paper_structure_A", "random_problem"]


def paper_structure_A(
    num_blocks: int,
    num_samples: int = 256,
    *,
    correlation: float = 0.6,
    seed: int | None = None,
) -> np.ndarray:
    """A random ``(num_samples, num_blocks)`` gradient-like matrix.

    Args:
        num_blocks: N.
        num_samples: m, the number of rows (calibration samples).
        correlation: AR(1) correlation between neighbouring blocks (0 gives independent columns).
        seed: random seed.

    Example:
        >>> paper_structure_A(8, 16, seed=0).shape
        (16, 8)
    """
    if num_blocks < 1 or num_samples < 1:
        raise ValueError("num_blocks and num_samples must be positive")
    if not -1.0 < correlation < 1.0:
        raise ValueError("correlation must lie in (-1, 1)")
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((num_samples, num_blocks))
    cols = np.empty_like(z)
    cols[:, 0] = z[:, 0]
    s = np.sqrt(1.0 - correlation**2)
    for i in range(1, num_blocks):
        cols[:, i] = correlation * cols[:, i - 1] + s * z[:, i]
    depth = np.linspace(0.0, 1.0, num_blocks)
    # U-shaped importance: first and last blocks matter most, plus per-block jitter
    importance = 0.3 + 2.5 * np.exp(-depth / 0.08) + 1.2 * np.exp(-(1.0 - depth) / 0.1)
    importance *= rng.lognormal(0.0, 0.35, num_blocks)
    sample_scale = rng.lognormal(0.0, 0.5, (num_samples, 1))  # heavy-tailed per-sample magnitude
    return cols * importance[None, :] * sample_scale


def random_problem(
    num_blocks: int,
    num_remove: int | None = None,
    *,
    num_samples: int = 256,
    correlation: float = 0.6,
    linear: bool = False,
    seed: int | None = None,
) -> BlockRemovalProblem:
    """A synthetic PSD problem ``H = A^T A / m`` (optionally with the first-order term ``-mean(A)``).

    Args:
        num_blocks: N.
        num_remove: M (default ``N // 4``, at least 1 where ``N >= 2``: removing nothing is no problem to solve).
        num_samples: m rows of ``A``.
        correlation: neighbouring-block correlation of ``A``'s columns.
        linear: add the first-order Taylor term ``h = -mean(A, axis=0)`` (then ``E`` is not PSD-only).
        seed: random seed.

    Example:
        >>> p = random_problem(10, 3, seed=1)
        >>> p.num_blocks, p.num_remove, p.is_psd
        (10, 3, True)
    """
    A = paper_structure_A(num_blocks, num_samples, correlation=correlation, seed=seed)
    H = A.T @ A / num_samples
    lin = None
    if linear:
        # gradients of a trained model are not zero-mean; give them a systematic part so the
        # first-order term matters, as it does for real models
        rng = np.random.default_rng(None if seed is None else seed + 7919)
        lin = -(A.mean(axis=0) + rng.normal(0.0, 1.0, num_blocks) * np.sqrt(np.diag(H)))
    return BlockRemovalProblem(
        H,
        (max(num_blocks // 4, min(1, num_blocks - 1)) if num_remove is None else num_remove),
        linear=lin,
        labels=[f"layers.{i}" for i in range(num_blocks)],
        metadata={
            "source": "synthetic",
            "energy": "fisher+grad" if linear else "fisher",
            "num_samples": num_samples,
            "correlation": correlation,
            "seed": seed,
        },
    )
