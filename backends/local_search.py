"""Vectorised moves at fixed cardinality: greedy construction, repair, 1-in/1-out swap descent.

All functions work on many states at once (rows of a 0/1 matrix) with incremental energies from the
local fields ``G = X @ H``. For ``E(x) = x^T H x + h^T x`` (``H`` symmetric):

* adding block ``i`` (``x_i: 0 -> 1``) changes ``E`` by ``H_ii + h_i + 2 G_i``;
* dropping block ``j`` (``x_j: 1 -> 0``) changes it by ``-(h_j + 2 G_j - H_jj)``;
* swapping (add ``i``, drop ``j``) changes it by the sum of the two minus ``2 H_ij``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "greedy_state", "repair", "swap_descent", "swap_neighbours", "add_deltas", "drop_deltas",
    "neighbour_energies", "topk_closure", "closure", "expand_topk", "DESCENT_CHUNK_ENTRIES",
]


def add_deltas(H: np.ndarray, linear: np.ndarray, X: np.ndarray, G: np.ndarray | None = None) -> np.ndarray:
    """Energy change of adding each block (meaningful where ``X == 0``)."""
    if G is None:
        G = X @ H
    return np.diag(H)[None, :] + linear[None, :] + 2.0 * G


def drop_deltas(H: np.ndarray, linear: np.ndarray, X: np.ndarray, G: np.ndarray | None = None) -> np.ndarray:
    """Energy change of dropping each block (meaningful where ``X == 1``)."""
    if G is None:
        G = X @ H
    return -(linear[None, :] + 2.0 * G - np.diag(H)[None, :])


def greedy_state(H: np.ndarray, linear: np.ndarray, num_remove: int) -> np.ndarray:
    """Add blocks one at a time, each time the one that raises the energy least."""
    n = H.shape[0]
    x = np.zeros((1, n))
    for _ in range(num_remove):
        d = add_deltas(H, linear, x)[0]
        d[x[0] == 1] = np.inf
        x[0, int(np.argmin(d))] = 1.0
    return x[0].astype(np.int8)


def repair(H: np.ndarray, linear: np.ndarray, X: np.ndarray, num_remove: int) -> np.ndarray:
    """Make every row hold exactly ``num_remove`` ones, greedily (cheapest drop / add first)."""
    X = np.asarray(X, dtype=np.float64).copy()
    rows = np.arange(X.shape[0])
    while True:
        counts = X.sum(axis=1)
        over, under = counts > num_remove, counts < num_remove
        if not over.any() and not under.any():
            return X.astype(np.int8)
        G = X @ H
        if over.any():
            d = drop_deltas(H, linear, X, G)
            d[X == 0] = np.inf
            j = np.argmin(d, axis=1)
            X[rows[over], j[over]] = 0.0
        if under.any():
            d = add_deltas(H, linear, X, G)
            d[X == 1] = np.inf
            i = np.argmin(d, axis=1)
            X[rows[under], i[under]] = 1.0


#: the largest (rows x N x N) block of swap energy changes held at once by :func:`swap_descent` (floats)
DESCENT_CHUNK_ENTRIES = 4_000_000


def swap_descent(
    H: np.ndarray, linear: np.ndarray, X: np.ndarray, max_iter: int = 10_000, tol: float = 1e-12,
    *, deadline: float | None = None,
) -> tuple[np.ndarray, int]:
    """Steepest 1-in/1-out descent to a swap-local minimum, for every row at once.

    Rows are processed in chunks of at most :data:`DESCENT_CHUNK_ENTRIES` swap deltas (a full
    ``rows x N x N`` block at N = 1000 and 64 rows took 2 GB).

    Args:
        H, linear: the energy ``x^T H x + linear^T x``.
        X: starting states (rows).
        max_iter: at most this many moves per row.
        tol: relative size of an improvement that counts.
        deadline: a ``time.perf_counter()`` value; past it the descent stops after the current
            iteration (the states stay valid, they may just not be local minima yet).

    Returns:
        ``(states, number_of_improving_moves)``.
    """
    import time

    X = np.asarray(X, dtype=np.float64).copy()
    r, n = X.shape
    if r == 0:
        return X.astype(np.int8), 0
    scale = tol * max(1.0, float(np.abs(H).max()))
    rows_per_chunk = max(1, DESCENT_CHUNK_ENTRIES // max(1, n * n))
    moves = 0
    active = np.arange(r)
    for _ in range(max_iter):
        improved = []
        for lo in range(0, active.size, rows_per_chunk):
            rows = active[lo : lo + rows_per_chunk]
            i, j, ok = _best_swaps(H, linear, X[rows], scale)
            rows = rows[ok]
            X[rows, i[ok]] = 1.0
            X[rows, j[ok]] = 0.0
            improved.append(rows)
        active = np.concatenate(improved)
        moves += int(active.size)
        if not active.size or (deadline is not None and time.perf_counter() > deadline):
            break
    return X.astype(np.int8), moves


def _best_swaps(H: np.ndarray, linear: np.ndarray, Xa: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row: the best swap (add ``i``, drop ``j``) and whether it lowers the energy."""
    n = H.shape[0]
    G = Xa @ H
    din = add_deltas(H, linear, Xa, G)
    dout = drop_deltas(H, linear, Xa, G)
    din[Xa == 1] = np.inf
    dout[Xa == 0] = np.inf
    D = din[:, :, None] + dout[:, None, :] - 2.0 * H[None, :, :]
    flat = D.reshape(Xa.shape[0], -1)
    k = np.argmin(flat, axis=1)
    best = flat[np.arange(Xa.shape[0]), k]
    i, j = np.divmod(k, n)
    return i, j, best < -scale


def swap_neighbours(x: np.ndarray) -> np.ndarray:
    """All states one swap away from ``x`` (``M * (N - M)`` rows)."""
    x = np.asarray(x, dtype=np.int8)
    ones, zeros = np.flatnonzero(x == 1), np.flatnonzero(x == 0)
    if len(ones) == 0 or len(zeros) == 0:
        return np.zeros((0, x.size), dtype=np.int8)
    jj, ii = np.meshgrid(ones, zeros, indexing="ij")
    out = np.repeat(x[None, :], jj.size, axis=0)
    rows = np.arange(jj.size)
    out[rows, jj.ravel()] = 0
    out[rows, ii.ravel()] = 1
    return out


def neighbour_energies(H: np.ndarray, linear: np.ndarray, x: np.ndarray, energy: float) -> tuple[np.ndarray, np.ndarray]:
    """Energies of all 1-swap neighbours of ``x`` from incremental deltas, with the (add, drop) pairs."""
    xf = np.asarray(x, dtype=np.float64)[None, :]
    g = xf @ H
    din = add_deltas(H, linear, xf, g)[0]
    dout = drop_deltas(H, linear, xf, g)[0]
    ones, zeros = np.flatnonzero(x == 1), np.flatnonzero(x == 0)
    ii, jj = np.meshgrid(zeros, ones, indexing="ij")
    e = energy + din[ii] + dout[jj] - 2.0 * H[ii, jj]
    return e.ravel(), np.stack([ii.ravel(), jj.ravel()], axis=1)


def topk_closure(H: np.ndarray, linear: np.ndarray, X: np.ndarray, k: int, max_rounds: int = 50,
                 *, deadline: float | None = None) -> np.ndarray:
    """Grow a pool of states until its ``k`` best are closed under 1-swap moves.

    Starting from the states ``X`` (e.g. annealer reads), repeatedly expands every state among the
    current ``k`` best whose swap neighbours have not been looked at, keeping any neighbour that would
    enter the top-k. At the end no 1-swap neighbour of a returned state is missing from the top-k
    if it is lower than the k-th energy. This recovers low excited states that a sampler visits only
    rarely (the true top-k is typically connected by swaps). Energies use incremental deltas.

    Args:
        H, linear: the energy ``x^T H x + linear^T x``.
        X: starting states.
        k: size of the top-k.
        max_rounds: at most this many rounds of expansion.
        deadline: a ``time.perf_counter()`` value; past it no further round starts (the first round
            always runs, so a top-k exists whenever the neighbourhoods are large enough).

    Returns:
        The pool's best ``k`` distinct states (sorted by energy, ties by lexicographic state).
    """
    return closure(H, linear, X, k, max_rounds, deadline=deadline)[0]


def _order(X: np.ndarray, E: np.ndarray) -> np.ndarray:
    """Indices sorting the rows by energy, ties by lexicographic state."""
    return np.lexsort(tuple(X[:, ::-1].T) + (E,))


def closure(H: np.ndarray, linear: np.ndarray, X: np.ndarray, k: int, max_rounds: int = 50,
            *, deadline: float | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`topk_closure` with the energies and the number of distinct states looked at.

    Returns:
        ``(states, energies, states_seen)``: at most ``k`` states in (energy, state) order, and how
        many states' energies were looked at (the starting ones and every neighbour evaluated).
    """
    X = np.unique(np.asarray(X, dtype=np.int8), axis=0)
    if X.shape[0] == 0:
        return X, np.zeros(0), 0
    Xf = X.astype(np.float64)
    E = np.einsum("ri,ij,rj->r", Xf, H, Xf) + Xf @ linear

    def swaps(x: np.ndarray, e: float):
        ne, pairs = neighbour_energies(H, linear, x, e)

        def make(keep: np.ndarray) -> np.ndarray:
            Y = np.repeat(x[None, :], keep.size, axis=0)
            rows = np.arange(keep.size)
            Y[rows, pairs[keep, 0]] = 1
            Y[rows, pairs[keep, 1]] = 0
            return Y

        return ne, make

    return expand_topk(X, E, k, swaps, max_rounds, deadline=deadline)


def expand_topk(X: np.ndarray, E: np.ndarray, k: int, neighbours, max_rounds: int = 50,
                *, deadline: float | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Grow the distinct states ``X`` (energies ``E``) until their ``k`` best are closed under a move set.

    The one top-k closure loop, for the swap moves of block removal (:func:`closure`) and the
    knapsack moves of rank selection (:func:`qblock.backends.knapsack.topk_closure`). The pool never
    holds more than ``k`` states plus ``k`` new ones per expanded state: a state that falls below the
    k-th place can never come back (the k-th energy only decreases), and of one state's neighbours at
    most ``k`` can enter, so only those are built.

    Args:
        X, E: distinct starting states and their energies.
        k: how many states to keep.
        neighbours: ``neighbours(x, e) -> (ne, make)``: the energies of every neighbour of ``x``
            (energy ``e``) and ``make(idx)``, the rows of the neighbours at ``idx``.
        max_rounds: expansion rounds at most.
        deadline: ``time.perf_counter()`` value after which no new round starts.

    Returns:
        ``(states, energies, states_seen)`` in (energy, state) order.
    """
    import time

    order = _order(X, E)[:k]
    X, E = X[order], E[order]
    seen = X.shape[0]
    expanded: set[bytes] = set()
    for rnd in range(max_rounds):
        if rnd and deadline is not None and time.perf_counter() > deadline:
            break
        todo = [i for i in range(X.shape[0]) if X[i].tobytes() not in expanded]
        if not todo:
            break
        threshold = E[-1] if X.shape[0] >= k else np.inf
        new_X, new_E = [X], [E]
        for i in todo:
            expanded.add(X[i].tobytes())
            ne, make = neighbours(X[i], float(E[i]))
            seen += ne.size
            keep = np.flatnonzero(ne < threshold) if np.isfinite(threshold) else np.arange(ne.size)
            if keep.size > k:
                keep = keep[np.argpartition(ne[keep], k - 1)[:k]]
            new_X.append(make(keep))
            new_E.append(ne[keep])
        X, idx = np.unique(np.concatenate(new_X), axis=0, return_index=True)
        E = np.concatenate(new_E)[idx]
        order = _order(X, E)[:k]
        X, E = X[order], E[order]
    return X, E, seen
