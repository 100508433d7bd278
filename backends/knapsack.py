"""Solvers and moves for the rank-selection knapsack (:class:`~qblock.problems.rank_selection.RankSelectionProblem`).

A feasible state keeps the budget (``sum cost_i y_i <= budget``) and, with the prefix rule, keeps a
leading run of each matrix's groups. The moves that stay feasible are: *add* a group (the next one
of its matrix under the prefix rule) if it fits, *drop* a group (the last kept one under the rule),
and *exchange*: drop one group and add another in one move if the result fits (under the rule, of
two different matrices). For ``E(y) = y^T H y + h^T y`` with local fields ``g = H y``:

* adding ``i`` changes ``E`` by ``H_ii + h_i + 2 g_i``;
* dropping ``j`` by ``-(h_j + 2 g_j - H_jj)``;
* exchanging by their sum minus ``2 H_ij``.

What is here:

* :func:`run_exact` (backend ``exact``): certified top-k by enumerating all ``2^N`` states for
  ``N <= EXACT_ENUMERATION_LIMIT``; for a larger problem with the prefix rule and an objective
  separable by matrix (no coupling between two matrices), a certified optimum by dynamic programming
  over the matrices' Pareto fronts of (cost, energy) (the rest of the top-k then comes from feasible
  moves around it and is not certified); anything else is a clear error.
* :func:`run_swap` (backend ``swap``): annealing whose moves are the feasible ones above, so every
  state of every read keeps the budget; the best state of each read is polished by steepest descent
  and grown into a top-k closed under the moves.
* :func:`repair`, :func:`descent`, :func:`topk_closure`, :func:`greedy_fill`: what the penalty
  backends' pipeline uses on this problem (:func:`qblock.solve`).

Example:
    >>> import numpy as np
    >>> from qblock.problems.rank_selection import RankSelectionProblem
    >>> p = RankSelectionProblem(None, [-3.0, -1.0, -2.0, -0.5], costs=[2, 2, 2, 2], budget=4,
    ...                          matrix=[0, 0, 1, 1], position=[0, 1, 0, 1])
    >>> ss = run_exact(p, num_solutions=2, seed=None)
    >>> p.ranks_of(ss.record.sample[0]), float(ss.first.energy)
    ([1, 1], -5.0)
"""

from __future__ import annotations

import time
from typing import Any

import dimod
import numpy as np

from qblock.backends.local_search import expand_topk

__all__ = ["EXACT_ENUMERATION_LIMIT", "greedy_fill", "repair", "descent", "topk_closure", "moves",
           "separable", "pareto_optimum", "run_exact", "run_swap"]

#: the exact backend enumerates all 2^N states up to this many variables
EXACT_ENUMERATION_LIMIT = 20


# ---------------------------------------------------------------------------- moves
def _candidates(p, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Variables that may be added / dropped from state ``y`` (before the budget check)."""
    if not p.prefix:
        return np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    add, drop = [], []
    for g in p.groups:
        r = int(y[g].sum())
        if r < len(g):
            add.append(g[r])
        if r > 0:
            drop.append(g[r - 1])
    return np.array(add, dtype=np.int64), np.array(drop, dtype=np.int64)


def moves(p, y: np.ndarray, g: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All feasible moves from the feasible state ``y``: ``(add, drop, dE)``, ``-1`` for "none".

    A pure add has ``drop = -1``, a pure drop ``add = -1``.
    """
    H, h = p.H, p.linear
    yf = y.astype(np.float64)
    g = H @ yf if g is None else g
    A, D = _candidates(p, y)
    room = p.budget - int(y.astype(np.int64) @ p.costs)
    din = np.diag(H)[A] + h[A] + 2.0 * g[A]
    dout = -(h[D] + 2.0 * g[D] - np.diag(H)[D])
    fits = p.costs[A] <= room
    adds = (A[fits], np.full(int(fits.sum()), -1), din[fits])
    drops = (np.full(D.size, -1), D, dout)
    X = din[:, None] + dout[None, :] - 2.0 * H[np.ix_(A, D)]
    ok = p.costs[A][:, None] - p.costs[D][None, :] <= room
    if p.prefix:
        ok &= p.matrix[A][:, None] != p.matrix[D][None, :]
    ii, jj = np.nonzero(ok)
    swaps = (A[ii], D[jj], X[ii, jj])
    return tuple(np.concatenate(parts) for parts in zip(adds, drops, swaps))  # type: ignore[return-value]


def _apply(y: np.ndarray, i: int, j: int) -> np.ndarray:
    out = y.copy()
    if i >= 0:
        out[i] = 1
    if j >= 0:
        out[j] = 0
    return out


def greedy_fill(p, X: np.ndarray) -> np.ndarray:
    """Add, row by row, the fitting group of most negative energy change per cost until none lowers ``E``."""
    X = np.asarray(X, dtype=np.int8).copy().reshape(-1, p.num_variables)
    H, d = p.H, np.diag(p.H) + p.linear
    for r in range(X.shape[0]):
        y = X[r]
        g = H @ y.astype(np.float64)
        while True:
            A, _ = _candidates(p, y)
            room = p.budget - int(y.astype(np.int64) @ p.costs)
            A = A[p.costs[A] <= room]
            if not A.size:
                break
            de = (d[A] + 2.0 * g[A]) / p.costs[A]
            k = int(np.argmin(de))
            if de[k] >= 0:
                break
            y[A[k]] = 1
            g += H[A[k]]
    return X


def repair(p, X: np.ndarray) -> np.ndarray:
    """Make every row feasible: keep only each matrix's leading run (prefix rule), then drop groups,
    the one of smallest energy increase per freed cost first, until the budget holds."""
    X = np.asarray(X, dtype=np.int8).copy().reshape(-1, p.num_variables)
    if p.prefix:
        for g in p.groups:
            X[:, g] = np.cumprod(X[:, g], axis=1)
    H, h = p.H, p.linear
    for r in np.flatnonzero(p.total_costs(X) > p.budget):
        y = X[r]
        g = H @ y.astype(np.float64)
        while int(y.astype(np.int64) @ p.costs) > p.budget:
            _, D = _candidates(p, y)
            dout = -(h[D] + 2.0 * g[D] - np.diag(H)[D]) / p.costs[D]
            j = int(D[np.argmin(dout)])
            y[j] = 0
            g -= H[j]
    return X


def descent(p, X: np.ndarray, max_iter: int = 100_000, tol: float = 1e-12) -> tuple[np.ndarray, int]:
    """Steepest descent over feasible add / drop / exchange moves, row by row. Returns ``(states, moves)``."""
    X = np.asarray(X, dtype=np.int8).copy().reshape(-1, p.num_variables)
    scale = tol * max(1.0, float(np.abs(p.H).max()), float(np.abs(p.linear).max()))
    total = 0
    for r in range(X.shape[0]):
        y = X[r]
        g = p.H @ y.astype(np.float64)
        for _ in range(max_iter):
            a, b, de = moves(p, y, g)
            if not de.size:
                break
            k = int(np.argmin(de))
            if de[k] >= -scale:
                break
            if a[k] >= 0:
                y[a[k]] = 1
                g += p.H[a[k]]
            if b[k] >= 0:
                y[b[k]] = 0
                g -= p.H[b[k]]
            total += 1
    return X, total


def topk_closure(p, X: np.ndarray, k: int, max_rounds: int = 50) -> np.ndarray:
    """Grow a pool from the feasible rows of ``X`` until its ``k`` best states are closed under feasible moves.

    At the end no state one move away from a returned state is missing from the top-k if it is lower
    than the k-th energy. Returns at most ``k`` distinct states sorted by (energy, state).
    """
    X = np.asarray(X, dtype=np.int8).reshape(-1, p.num_variables)
    X = np.unique(X[p.feasible_mask(X)], axis=0)
    if not X.shape[0]:
        return X
    n = p.num_variables

    def knapsack_moves(y: np.ndarray, e: float):
        a, b, de = moves(p, y)
        return e + de, lambda keep: np.array([_apply(y, a[t], b[t]) for t in keep], dtype=np.int8).reshape(-1, n)

    return expand_topk(X, p.energies(X), k, knapsack_moves, max_rounds)[0]


# ---------------------------------------------------------------------------- exact
def separable(p) -> bool:
    """True if ``H`` couples no two variables of different matrices."""
    mask = p.matrix[:, None] != p.matrix[None, :]
    return not np.any(p.H[mask])


def _enumerate_topk(p, k: int) -> tuple[np.ndarray, np.ndarray]:
    """All ``2^N`` states in chunks; the ``k`` best feasible ones (ties by state)."""
    n = p.num_variables
    bits = 1 << np.arange(n - 1, -1, -1, dtype=np.int64)
    best_X, best_E = np.zeros((0, n), dtype=np.int8), np.zeros(0)
    chunk = 1 << 15
    for lo in range(0, 1 << n, chunk):
        ids = np.arange(lo, min(lo + chunk, 1 << n), dtype=np.int64)
        X = ((ids[:, None] & bits[None, :]) > 0).astype(np.int8)
        X = X[p.feasible_mask(X)]
        if not X.shape[0]:
            continue
        X = np.concatenate([best_X, X])
        E = np.concatenate([best_E, p.energies(X[len(best_X):])])
        order = np.lexsort(tuple(X[:, ::-1].T) + (E,))[:k]
        best_X, best_E = X[order], E[order]
    return best_X, best_E


def _matrix_options(p, l: int) -> tuple[np.ndarray, np.ndarray]:
    """Cost and energy (without offset) of keeping the first ``0 .. G`` groups of matrix ``l``."""
    g = p.groups[l]
    costs = np.concatenate([[0], np.cumsum(p.costs[g])])
    Y = np.tril(np.ones((len(g) + 1, len(g))), -1)  # row j keeps the first j groups
    Hs, hs = p.H[np.ix_(g, g)], p.linear[g]
    return costs.astype(np.int64), np.einsum("ri,ij,rj->r", Y, Hs, Y) + Y @ hs


def pareto_optimum(p, *, progress: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """The optimal state of a separable prefix problem by dynamic programming over Pareto fronts.

    Matrix by matrix, the partial solutions are merged with that matrix's options (keep its first
    ``j`` groups) and only the Pareto front of (cost, energy) within the budget is kept: a partial
    solution with more cost and no less energy than another can never complete to a better state.

    Returns:
        ``(state, info)`` with ``info["front_sizes"]`` (the largest front) and ``info["energy"]``.
    """
    from tqdm.auto import tqdm

    cost, energy = np.zeros(1, dtype=np.int64), np.zeros(1)
    parents, choices = [], []
    largest = 1
    for l in tqdm(range(p.num_matrices), desc="exact DP", disable=not progress, leave=False):
        oc, oe = _matrix_options(p, l)
        c = (cost[:, None] + oc[None, :]).ravel()
        e = (energy[:, None] + oe[None, :]).ravel()
        ok = np.flatnonzero(c <= p.budget)
        order = ok[np.lexsort((e[ok], c[ok]))]
        e_sorted = e[order]
        running = np.minimum.accumulate(e_sorted)
        keep = np.ones(order.size, dtype=bool)
        keep[1:] = e_sorted[1:] < running[:-1]
        sel = order[keep]
        parents.append(sel // oc.size)
        choices.append(sel % oc.size)
        cost, energy = c[sel], e[sel]
        largest = max(largest, sel.size)
    best = int(np.argmin(energy))
    ranks = []
    for par, ch in zip(reversed(parents), reversed(choices)):
        ranks.append(int(ch[best]))
        best = int(par[best])
    y = p.state_from_ranks(ranks[::-1])
    return y, {"largest_front": int(largest), "energy": float(p.energy(y))}


def run_exact(problem, sampler: Any = None, *, num_solutions: int, seed: int | None = None,
              strategy: str = "auto", progress: bool = False, time_limit: float | None = None) -> dimod.SampleSet:
    """``exact`` on a rank-selection problem (see the module docstring for when it applies).

    Raises:
        ValueError: the problem is too large to enumerate and not separable with the prefix rule.
    """
    from qblock._solve import finish

    p = problem
    n = p.num_variables
    if strategy == "bnb":
        raise ValueError("exact: strategy='bnb' is for block-removal problems; a rank-selection problem is "
                         f"enumerated (up to {EXACT_ENUMERATION_LIMIT} variables) or solved by the Pareto DP "
                         "(strategy='auto')")
    if n <= EXACT_ENUMERATION_LIMIT:
        X, _ = _enumerate_topk(p, num_solutions)
        info = {"certified_optimal": True, "strategy": "enumerate"}
    elif p.prefix and separable(p):
        y, extra = pareto_optimum(p, progress=progress)
        X = np.concatenate([y[None, :], topk_closure(p, y[None, :], num_solutions)]) if num_solutions > 1 else y[None, :]
        info = {"certified_optimal": num_solutions == 1, "certified_top1": True, "strategy": "pareto-dp", **extra}
    else:
        raise ValueError(
            f"exact: a rank-selection problem with {n} variables is solved exactly only up to "
            f"{EXACT_ENUMERATION_LIMIT} variables, or with the prefix rule and no coupling between matrices "
            f"(couplings='matrix' or 'diagonal'); use swap, sa, tabu or leap-cqm")
    return finish(p, X, info, num_solutions, num_reads=int(X.shape[0]), num_infeasible=0, penalty=None)


# ---------------------------------------------------------------------------- annealing
def _propose(p, X: np.ndarray, J: np.ndarray | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One proposal per read: (add, drop) variable indices, ``-1`` for none; invalid ones are ``-2``."""
    R, n = X.shape
    kind = rng.integers(0, 3, R)  # 0 add, 1 drop, 2 exchange
    rows = np.arange(R)
    if J is not None:
        starts = np.array([g[0] for g in p.groups])
        sizes = np.array([len(g) for g in p.groups])
        a, b = rng.integers(0, len(sizes), R), rng.integers(0, len(sizes), R)
        i = np.where(J[rows, b] < sizes[b], starts[b] + J[rows, b], -2)
        j = np.where(J[rows, a] > 0, starts[a] + J[rows, a] - 1, -2)
        j = np.where((kind == 2) & (a == b), -2, j)
    else:
        i, j = rng.integers(0, n, R), rng.integers(0, n, R)
        i = np.where(X[rows, i] == 0, i, -2)
        j = np.where(X[rows, j] == 1, j, -2)
    i = np.where(kind == 1, -1, i)
    j = np.where(kind == 0, -1, j)
    return i, j


def _anneal(p, R: int, sweeps: int, beta_range, rng) -> np.ndarray:
    """Metropolis over feasible moves for ``R`` reads from the empty state; the best state of each read."""
    H, h = p.H, p.linear
    n = p.num_variables
    d, hd = np.diag(H) + h, np.diag(H)
    X = np.zeros((R, n), dtype=np.float64)
    J = np.zeros((R, p.num_matrices), dtype=np.int64) if p.prefix else None
    G, E, C = np.zeros((R, n)), np.zeros(R), np.zeros(R, dtype=np.int64)
    best_E, best_X = E.copy(), X.copy()
    steps = sweeps * (p.num_matrices if p.prefix else n)
    if beta_range is None:
        scale = np.abs(np.concatenate([d, 2.0 * H[np.triu_indices(n, 1)]]))
        scale = scale[scale > 1e-12 * max(1.0, scale.max(initial=0.0))]
        beta_range = (np.log(2.0) / np.percentile(scale, 90), np.log(1000.0) / np.percentile(scale, 5)) \
            if scale.size else (0.1, 10.0)
    betas = np.geomspace(beta_range[0], max(beta_range[1], beta_range[0]), max(steps, 1))
    rows = np.arange(R)
    mat = p.matrix
    for s in range(steps):
        i, j = _propose(p, X, J, rng)
        ok = (i != -2) & (j != -2)
        ic, jc = np.maximum(i, 0), np.maximum(j, 0)
        de = np.where(i >= 0, d[ic] + 2.0 * G[rows, ic], 0.0) \
            + np.where(j >= 0, -(h[jc] + 2.0 * G[rows, jc] - hd[jc]), 0.0) \
            - np.where((i >= 0) & (j >= 0), 2.0 * H[ic, jc], 0.0)
        dc = np.where(i >= 0, p.costs[ic], 0) - np.where(j >= 0, p.costs[jc], 0)
        ok &= C + dc <= p.budget
        ok &= -betas[s] * de >= np.log(rng.random(R))
        for r in np.flatnonzero(ok):
            if i[r] >= 0:
                X[r, i[r]] = 1.0
                G[r] += H[i[r]]
                if J is not None:
                    J[r, mat[i[r]]] += 1
            if j[r] >= 0:
                X[r, j[r]] = 0.0
                G[r] -= H[j[r]]
                if J is not None:
                    J[r, mat[j[r]]] -= 1
        E[ok] += de[ok]
        C[ok] += dc[ok]
        better = E < best_E
        best_E[better], best_X[better] = E[better], X[better]
    return best_X.astype(np.int8)


def run_swap(problem, sampler: Any = None, *, num_solutions: int, seed: int | None = None, num_reads: int = 64,
             num_sweeps: int = 200, beta_range: tuple[float, float] | None = None, polish: bool = True) -> dimod.SampleSet:
    """``swap`` on a rank-selection problem: budget-preserving annealing (every state feasible).

    One sweep is one proposal per matrix (prefix rule) or per variable, for every read; a proposal adds,
    drops or exchanges groups and is rejected if it would break the budget.
    """
    from qblock._solve import finish

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    X = _anneal(problem, int(num_reads), int(num_sweeps), beta_range, rng)
    moves_made = 0
    if polish:
        X, moves_made = descent(problem, np.unique(X, axis=0))
        X = np.concatenate([X, topk_closure(problem, X, num_solutions)])
    info = {"num_sweeps": int(num_sweeps), "polish_moves": int(moves_made), "anneal_seconds": time.perf_counter() - t0}
    return finish(problem, X, info, num_solutions, num_reads=int(num_reads), num_infeasible=0, penalty=None)
