"""Rank allocation under one parameter budget: uniform, global threshold, and the QUBO on any backend.

The budget is ``ratio`` times the decoder-linear parameters (``sum m n``), counted as the PivGa factors
store a rank-``r`` matrix: ``r (m + n) - r^2`` (:func:`qblock.svd.factors.pivga_count`).

* :func:`uniform_ranks`: every matrix keeps the largest rank whose storage is at most ``ratio`` of its own.
* :func:`threshold_ranks`: one global threshold on the singular values (of ``W``, or of ``W S`` when
  whitened): they are taken largest first, over all matrices, while the budget allows.
* :func:`rank_problem` + :func:`ranks_from_state`: the rank-selection QUBO
  (:class:`~qblock.problems.rank_selection.RankSelectionProblem`) from per-sample gradients of group
  gates, and the ranks of a solution of it.

Example:
    >>> import torch
    >>> from qblock.svd.factors import Factorisation
    >>> fs = [Factorisation.plain("a", torch.randn(8, 6, dtype=torch.float64)),
    ...       Factorisation.plain("b", torch.randn(4, 4, dtype=torch.float64))]
    >>> uniform_ranks(fs, 0.5)
    [2, 1]
    >>> sum(stored(fs, threshold_ranks(fs, 0.5))) <= budget_of(fs, 0.5)
    True
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Sequence

import numpy as np

from qblock.svd.factors import Factorisation, pivga_count

__all__ = ["budget_of", "stored", "uniform_ranks", "threshold_ranks", "group_layout", "gate_gradients",
           "rank_problem", "ranks_from_state", "fit_budget"]


def budget_of(fs: Sequence[Factorisation], ratio: float) -> int:
    """``floor(ratio * sum m n)``: the parameters the compressed matrices may store."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1] (the fraction of decoder-linear parameters kept), got {ratio}")
    return int(ratio * sum(m * n for m, n in (f.shape for f in fs)))


def stored(fs: Sequence[Factorisation], ranks: Sequence[int]) -> list[int]:
    """PivGa storage of each matrix at these ranks."""
    return [pivga_count(int(r), *f.shape) for f, r in zip(fs, ranks)]


def uniform_ranks(fs: Sequence[Factorisation], ratio: float) -> list[int]:
    """The largest rank per matrix with ``r (m + n) - r^2 <= ratio * m n``.

    Compared exactly (``ratio`` as the fraction its float is): a float product can round above an
    integer storage that the exact one does not reach, while :func:`budget_of` floors the exact
    product or more, so the sum never exceeds the budget (0.35 of three 15 x 8 matrices: 126 > 125).
    """
    exact = Fraction(ratio)
    out = []
    for f in fs:
        m, n = f.shape
        r = f.rank
        while r > 0 and pivga_count(r, m, n) > exact * m * n:
            r -= 1
        out.append(r)
    return out


def threshold_ranks(fs: Sequence[Factorisation], ratio: float) -> list[int]:
    """One global threshold on the singular values: the largest ones over all matrices within the budget.

    Adding singular value ``i`` (0-based) to an ``m x n`` matrix costs ``m + n - 2 i - 1``; since each
    matrix's values are sorted, taking them largest-first keeps every matrix's kept set a prefix.
    """
    budget = budget_of(fs, ratio)
    s = np.concatenate([f.s.detach().cpu().numpy() for f in fs])
    owner = np.concatenate([np.full(f.rank, k) for k, f in enumerate(fs)])
    inc = np.concatenate([f.shape[0] + f.shape[1] - 2 * np.arange(f.rank) - 1 for f in fs])
    order = np.argsort(-s, kind="stable")
    total = np.cumsum(inc[order])
    take = int(np.searchsorted(total, budget, side="right"))
    return np.bincount(owner[order[:take]], minlength=len(fs)).tolist()


def fit_budget(fs: Sequence[Factorisation], ranks: Sequence[int], budget: int) -> list[int]:
    """Lower ranks, the smallest last singular value first, until the storage fits ``budget``."""
    ranks = [int(r) for r in ranks]
    while sum(stored(fs, ranks)) > budget:
        k = min((k for k in range(len(fs)) if ranks[k] > 0),
                key=lambda k: float(fs[k].s[ranks[k] - 1]) ** 2 / (sum(fs[k].shape) - 2 * ranks[k] + 1))
        ranks[k] -= 1
    return ranks


def group_layout(fs: Sequence[Factorisation], group_size: int) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """Costs, matrix and position of every singular-value group, and each matrix's group sizes.

    A matrix of rank 0 (a zero projection) has no groups (its sizes are ``[]``) and no matrix index:
    the indices number the other matrices ``0 .. L-1``, as the problem needs.
    """
    from qblock.problems.rank_selection import group_costs

    costs, mat, pos, sizes = [], [], [], []
    live = 0  # matrices with groups so far
    for f in fs:
        if f.rank == 0:
            sizes.append([])
            continue
        m, n = f.shape
        gc = group_costs(m, n, group_size, f.rank)
        sizes.append([min(group_size, f.rank - k * group_size) for k in range(len(gc))])
        for k, c in enumerate(gc):
            costs.append(c), mat.append(live), pos.append(k)
        live += 1
    return costs, mat, pos, sizes


def gate_gradients(model, fs: Sequence[Factorisation], samples: Sequence[Any], group_size: int, *,
                   progress: bool = False) -> np.ndarray:
    """``A[s, i] = d loss_s / d g_i`` at ``g = 1`` for every singular-value group gate ``g_i``.

    With ``W(g) = U diag(s * g) B`` and ``G = d loss / d W`` at the full weights, the gate of value
    ``j`` has gradient ``s_j u_j^T G b_j``; a group's gate gradient is the sum over its values.
    """
    import torch
    from tqdm.auto import tqdm

    from qblock.svd.factors import find_linears

    mods = dict(find_linears(model))
    _, _, _, sizes = group_layout(fs, group_size)
    params = [mods[f.name].weight for f in fs]
    flags = [p.requires_grad for p in params]
    rows = []
    try:
        for p in params:
            p.requires_grad_(True)
        for ids in tqdm(samples, desc="group gate gradients", disable=not progress, leave=False):
            ids = torch.as_tensor(ids).reshape(1, -1)
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            row = []
            for f, p, sz in zip(fs, params, sizes):
                per_value = ((f.U.T @ p.grad.double()) * f.B).sum(dim=1) * f.s
                bounds = np.cumsum([0] + sz)
                row.extend(float(per_value[a:b].sum()) for a, b in zip(bounds[:-1], bounds[1:]))
            rows.append(row)
    finally:
        model.zero_grad(set_to_none=True)
        for p, fl in zip(params, flags):
            p.requires_grad_(fl)
    return np.asarray(rows)


def rank_problem(fs: Sequence[Factorisation], A: np.ndarray, ratio: float, group_size: int, *,
                 energy: str = "fisher", couplings: str = "diagonal", metadata: dict | None = None):
    """The rank-selection QUBO for these factorisations and gate gradients (prefix rule on).

    Matrices of rank 0 have nothing to choose and are left out of the problem (``group_sizes`` lists
    ``[]`` for them; :func:`ranks_from_state` gives them rank 0); the budget counts every matrix.
    """
    from qblock.problems.rank_selection import from_gate_gradients

    costs, mat, pos, sizes = group_layout(fs, group_size)
    meta = {"group_size": int(group_size), "ratio": float(ratio), "shapes": [list(f.shape) for f in fs],
            "group_sizes": sizes, **dict(metadata or {})}
    return from_gate_gradients(A, costs, budget_of(fs, ratio), mat, pos, energy=energy, couplings=couplings,
                               prefix=True, matrix_names=[f.name for f in fs if f.rank], metadata=meta,
                               arrays={"A": np.asarray(A)})


def ranks_from_state(problem, y: Any) -> list[int]:
    """Singular values kept per matrix (of every factorisation, rank-0 ones too) by a (prefix) state of
    :func:`rank_problem`'s problem."""
    y = np.asarray(y).reshape(-1)
    groups = iter(problem.groups)
    return [int(sum(sz for sz, keep in zip(s, y[next(groups)]) if keep)) if s else 0
            for s in problem.metadata["group_sizes"]]
