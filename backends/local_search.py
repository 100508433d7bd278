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
    "neighbour_energies", "topk_closure",
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


def swap_descent(
    H: np.ndarray, linear: np.ndarray, X: np.ndarray, max_iter: int = 10_000, tol: float = 1e-12
) -> tuple[np.ndarray, int]:
    """Steepest 1-in/1-out descent to a swap-local minimum, for every row at once.

    Returns:
        ``(states, number_of_improving_moves)``.
    """
    X = np.asarray(X, dtype=np.float64).copy()
    r, n = X.shape
    if r == 0:
        return X.astype(np.int8), 0
    scale = tol * max(1.0, float(np.abs(H).max()))
    moves = 0
    active = np.arange(r)
    for _ in range(max_iter):
        Xa = X[active]
        G = Xa @ H
        din = add_deltas(H, linear, Xa, G)
        dout = drop_deltas(H, linear, Xa, G)
        din[Xa == 1] = np.inf
        dout[Xa == 0] = np.inf
        D = din[:, :, None] + dout[:, None, :] - 2.0 * H[None, :, :]
        flat = D.reshape(len(active), -1)
        k = np.argmin(flat, axis=1)
        best = flat[np.arange(len(active)), k]
        improve = best < -scale
        if not improve.any():
            break
        rows = active[improve]
        i, j = np.divmod(k[improve], n)
        X[rows, i] = 1.0
        X[rows, j] = 0.0
        moves += int(improve.sum())
        active = rows
    return X.astype(np.int8), moves


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


def topk_closure(H: np.ndarray, linear: np.ndarray, X: np.ndarray, k: int, max_rounds: int = 50) -> np.ndarray:
    """Grow a pool of states until its ``k`` best are closed under 1-swap moves.

    Starting from the states ``X`` (e.g. annealer reads), repeatedly expands every state among the
    current ``k`` best whose swap neighbours have not been looked at, keeping any neighbour that would
    enter the top-k. At the end no 1-swap neighbour of a returned state is missing from the top-k
    if it is lower than the k-th energy. This recovers low excited states that a sampler visits only
    rarely (the true top-k is typically connected by swaps). Energies use incremental deltas.

    Returns:
        The pool's best ``k`` distinct states (sorted by energy).
    """
    X = np.unique(np.asarray(X, dtype=np.int8), axis=0)
    if X.shape[0] == 0:
        return X
    Xf = X.astype(np.float64)
    e = np.einsum("ri,ij,rj->r", Xf, H, Xf) + Xf @ linear
    pool = {row.tobytes(): (float(en), row) for row, en in zip(X, e)}
    expanded: set[bytes] = set()
    for _ in range(max_rounds):
        best = sorted(pool.items(), key=lambda kv: (kv[1][0], kv[0]))[:k]
        todo = [(key, val) for key, val in best if key not in expanded]
        if not todo:
            break
        threshold = best[-1][1][0] if len(best) >= k else np.inf
        for key, (en, row) in todo:
            expanded.add(key)
            ne, pairs = neighbour_energies(H, linear, row, en)
            keep = np.flatnonzero(ne < threshold) if np.isfinite(threshold) else np.argsort(ne)[:k]
            for idx in keep:
                y = row.copy()
                y[pairs[idx, 0]] = 1
                y[pairs[idx, 1]] = 0
                kb = y.tobytes()
                if kb not in pool:
                    pool[kb] = (float(ne[idx]), y)
    best = sorted(pool.items(), key=lambda kv: (kv[1][0], kv[0]))[:k]
    return np.array([val[1] for _, val in best], dtype=np.int8)
