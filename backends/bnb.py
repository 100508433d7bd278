"""Certified top-k by branch-and-bound, without enumerating the ``C(N, M)`` feasible states.

Problem: the ``k`` lowest values of ``E(x) = x^T H x + h^T x`` over binary ``x`` with ``sum(x) = M``.

**Convexification (QCR).** For binary ``x`` the diagonal of ``H`` acts linearly (``x_i^2 = x_i``), so
``E(x) = x^T (Q + diag(u)) x + (c - u)^T x`` for every ``u``, where ``Q`` is ``H`` with a zero diagonal
and ``c = h + diag(H)``. On the feasible set only directions ``w`` with ``sum(w) = 0`` matter, so ``u``
is chosen such that ``Q + diag(u)`` is positive semi-definite on ``1^perp`` and the continuous
relaxation over ``{0 <= y <= 1, sum(y) = M}`` is as tight as possible: that ``u`` is the dual of the
Shor semidefinite relaxation (the "quadratic convex reformulation" of Billionnet, Elloumi and
Plateau). It is computed once at the root by a small ADMM on that SDP (numpy only) and then repaired
with an exact eigenvalue shift, so the convexity the bounds rely on holds whatever the ADMM reached.
This works with or without a linear term and for indefinite ``H`` (a larger ``u`` is then needed and
the bound is weaker): the bound never relies on ``H`` being PSD. The fallback ``bound="eig"`` shifts the
diagonal uniformly by the smallest eigenvalue on ``1^perp``.

**Doubly non-negative bound (default, ``bound="dnn"``).** For ``x >= 0`` and any ``N >= 0`` (entrywise),
``x^T Q x >= x^T (Q - N) x``, so the convexified relaxation of ``Q - N`` is still a valid bound. The same
ADMM, with the constraint ``X >= 0`` added (the doubly non-negative SDP), yields ``u`` and ``N`` together;
removing the positive couplings that correlated blocks have lets a much smaller ``u`` convexify, and
the root bound moves from 9-16 % to 4-7 % below the optimum on the paper-structure N=128, M=32
instances (5-37x fewer nodes). Only the free-free block of a node is relaxed: fixed variables keep
the exact ``Q``.

**Tree.** Variables are fixed in a fixed order (block order, or chosen from the root relaxation), so all nodes of the
same depth share the free set and one matrix: nodes are processed in batches, each batch a handful
of matrix products. Each node's bound is a Frank-Wolfe (linearisation) lower bound
``f(y) + min_s grad f(y)^T (s - y)`` of its convex QP relaxation, valid at ANY feasible ``y`` by
convexity, evaluated along warm-started accelerated projected-gradient iterations (exact projection
onto the capped simplex). Iterations stop per node as soon as the node is pruned (bound above the
incumbent) or cannot be (the relaxation value itself is below it). Small subtrees are enumerated in
one matrix product. The incumbent is the k-th best energy, seeded by greedy + swap local search.

Certification: when the search finishes, every state with energy at or below the returned k-th
energy was visited, so the k returned states are the k lowest, ordered by energy and then
lexicographic state (also among states tied with the k-th energy).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from qblock._threads import single_blas_thread
from qblock.backends._topk import _combos, _TopK
from qblock.problems._states import check_num_remove

__all__ = ["topk", "qcr_diagonal", "convexify", "convexify_nonneg", "LEVEL_CACHE_BYTES"]

#: memory for the per-depth matrices of the tree (beyond it the oldest are dropped and rebuilt on demand)
LEVEL_CACHE_BYTES = 256 * 2**20


class _TopKLex(_TopK):
    """The k lowest states in the order (energy, lexicographic state), every tie at the cut kept
    until the final sort (no plateau cap: the candidates offered per node batch are few)."""

    plateau_cap = None


def _complement_basis(n: int) -> np.ndarray:
    """Orthonormal basis (n, n-1) of the subspace ``sum(w) = 0``."""
    if n == 1:
        return np.zeros((1, 0))
    B = np.linalg.qr(np.concatenate([np.ones((n, 1)), np.eye(n)[:, : n - 1]], axis=1))[0][:, 1:]
    return B


def _min_eig_on_complement(A: np.ndarray, B: np.ndarray) -> float:
    if B.shape[1] == 0:
        return 0.0
    return float(np.linalg.eigvalsh(B.T @ A @ B)[0])


def qcr_diagonal(Q: np.ndarray, c: np.ndarray, M: int, *, iters: int = 300, tol: float = 1e-4,
                 deadline: float | None = None) -> np.ndarray:
    """Near-optimal diagonal ``u`` of the quadratic convex reformulation (dual of the Shor SDP).

    Solves ``min <Q, X> + c^T x`` s.t. ``[[1, x^T], [x, X]] >= 0``, ``diag(X) = x``, ``X 1 = M x``,
    ``1^T x = M`` by the dual ADMM of Wen, Goldfarb and Yin and returns minus the multipliers of
    ``diag(X) = x``. The result is NOT guaranteed to convexify ``Q``; :func:`convexify` repairs it.

    Args:
        Q: symmetric ``(n, n)`` with zero diagonal.
        c: linear term (the diagonal folded in).
        M: number of ones.
        iters: maximum ADMM iterations.
        tol: relative primal/dual residual at which to stop.
        deadline: a ``time.perf_counter()`` value at which to stop early (the multipliers reached
            so far are returned; any ``u`` is valid after the repair of :func:`convexify`).

    Example:
        >>> import numpy as np
        >>> Q = np.array([[0.0, 1.0, 0.2], [1.0, 0.0, 0.5], [0.2, 0.5, 0.0]])
        >>> qcr_diagonal(Q, np.ones(3), 1).shape
        (3,)
    """
    return _shor_admm(Q, c, M, iters=iters, tol=tol, nonneg=False, deadline=deadline)[0]


def _gram(n: int, M: int) -> np.ndarray:
    """``A A^T`` of the Shor constraints of :func:`_shor_admm`, in closed form (``O(n^2)``).

    Order: ``Y_00 = 1``; ``a_i: Y_ii - Y_0i = 0``; ``g_i: sum_j Y_ij - M Y_0i = 0``; ``L: sum_i Y_0i = M``.
    Applying the adjoint and then the operator to a multiplier vector ``z`` gives
    ``a_i -> 1.5 za_i + (1 + M/2) zg_i - zL/2``,
    ``g_i -> (1 + M/2) za_i + (n + M^2)/2 zg_i + sum(zg)/2 - M zL/2`` and
    ``L -> -sum(za)/2 - M sum(zg)/2 + n zL/2`` (checked against the operators in the tests).
    """
    m = 2 * n + 2
    a, g, last = np.arange(1, n + 1), np.arange(n + 1, 2 * n + 1), m - 1
    AA = np.zeros((m, m))
    AA[0, 0] = 1.0
    AA[a, a] = 1.5
    AA[a, g] = AA[g, a] = 1.0 + 0.5 * M
    AA[n + 1 : 2 * n + 1, n + 1 : 2 * n + 1] = 0.5
    AA[g, g] += 0.5 * (n + M * M)
    AA[a, last] = AA[last, a] = -0.5
    AA[g, last] = AA[last, g] = -0.5 * M
    AA[last, last] = 0.5 * n
    return AA


def _pinv_psd(A: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of a symmetric PSD matrix by one ``eigh`` (a third of the cost of an SVD)."""
    w, V = np.linalg.eigh(A)
    keep = w > w[-1] * A.shape[0] * np.finfo(float).eps
    return (V[:, keep] / w[keep]) @ V[:, keep].T


def _shor_operators(n: int, M: int):
    """The constraint operator ``A`` of the Shor SDP and its adjoint, on ``(n+1, n+1)`` matrices ``Y``.

    Constraints, in order: ``Y_00 = 1``; ``Y_ii - Y_0i = 0``; ``sum_j Y_ij - M Y_0i = 0``;
    ``sum_i Y_0i = M`` (:func:`_gram` is ``A A^T`` in closed form).
    """
    n1, m = n + 1, 2 * n + 2
    ii = np.arange(1, n1)

    def A_op(Y: np.ndarray) -> np.ndarray:
        out = np.empty(m)
        out[0] = Y[0, 0]
        out[1:n1] = Y[ii, ii] - Y[0, 1:]
        out[n1 : 2 * n + 1] = Y[1:, 1:].sum(axis=1) - M * Y[0, 1:]
        out[m - 1] = Y[0, 1:].sum()
        return out

    def At_op(z: np.ndarray) -> np.ndarray:
        za, zg = z[1:n1], z[n1 : 2 * n + 1]
        Y = np.empty((n1, n1))
        Y[0, 0] = z[0]
        Y[0, 1:] = Y[1:, 0] = -0.5 * za - 0.5 * M * zg + 0.5 * z[m - 1]
        Y[1:, 1:] = 0.5 * (zg[:, None] + zg[None, :])
        Y[ii, ii] += za
        return Y

    return A_op, At_op


def _shor_admm(Q: np.ndarray, c: np.ndarray, M: int, *, iters: int, tol: float,
               nonneg: bool, deadline: float | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Dual ADMM (Wen, Goldfarb, Yin) on the Shor SDP; with ``nonneg`` also ``X_ij >= 0`` (i != j).

    Stops at ``tol``, after ``iters`` iterations, or at ``deadline`` (``time.perf_counter()``),
    whichever comes first.

    Returns:
        ``(u, N, iterations)``: minus the multipliers of ``diag(X) = x`` and, with ``nonneg``, the
        (non-negative, zero-diagonal) multipliers of ``X_ij >= 0`` (zeros otherwise), in the units
        of ``Q``; and the number of iterations run.
    """
    n = Q.shape[0]
    n1 = n + 1
    scale = max(float(np.abs(Q).max(initial=0.0)), float(np.abs(c).max(initial=0.0)), 1e-300)
    C = np.zeros((n1, n1))
    C[0, 1:] = C[1:, 0] = c / (2 * scale)
    C[1:, 1:] = Q / scale
    m = 2 * n + 2
    ii = np.arange(1, n1)
    A_op, At_op = _shor_operators(n, M)

    y = np.zeros(m)
    Z = np.zeros((n1, n1))  # multipliers of X_ij >= 0 (off-diagonal of the X block only)
    if deadline is not None and time.perf_counter() > deadline:
        return -y[1 : n + 1] * scale, Z[1:, 1:] * scale, 0
    AAinv = _pinv_psd(_gram(n, M))
    b = np.zeros(m)
    b[0], b[m - 1] = 1.0, float(M)
    X = np.zeros((n1, n1))
    S = np.zeros((n1, n1))
    off = np.zeros((n1, n1), dtype=bool)
    if nonneg:
        off[1:, 1:] = True
        off[ii, ii] = False
    mu = 1.0
    nb, nc = 1.0 + np.linalg.norm(b), 1.0 + np.linalg.norm(C)
    its = 0
    while its < iters:
        if deadline is not None and time.perf_counter() > deadline:
            break
        y = -AAinv @ (mu * (A_op(X) - b) + A_op(S + Z - C))
        Aty = At_op(y)
        if nonneg:
            Z = np.where(off, np.maximum(C - Aty - S - mu * X, 0.0), 0.0)
        V = C - Aty - Z - mu * X
        V = 0.5 * (V + V.T)
        w, P = np.linalg.eigh(V)
        S = (P * np.maximum(w, 0.0)) @ P.T
        X = (S - V) / mu
        its += 1
        if its % 10 == 0:
            pinf = np.linalg.norm(A_op(X) - b) / nb
            if nonneg:
                pinf += np.linalg.norm(np.minimum(X[off], 0.0)) / nb
            dinf = np.linalg.norm(Aty + S + Z - C) / nc
            if max(pinf, dinf) < tol:
                break
            # balance the residuals (larger mu weighs primal feasibility more)
            if pinf > 3 * dinf:
                mu *= 2.0
            elif dinf > 3 * pinf:
                mu *= 0.5
    return -y[1 : n + 1] * scale, Z[1:, 1:] * scale, its


def convexify(Q: np.ndarray, c: np.ndarray, M: int, method: str = "qcr", *, iters: int = 300) -> tuple[np.ndarray, float]:
    """A diagonal ``u`` with ``Q + diag(u)`` PSD on ``{w : sum(w) = 0}`` (checked by an exact eigenvalue).

    Args:
        Q: symmetric ``(n, n)`` with zero diagonal.
        c: linear term (the diagonal folded in).
        M: number of ones.
        method: ``"qcr"`` (Shor SDP dual), ``"eig"`` (uniform shift) or ``"dnn"`` (the diagonal that
            :func:`convexify_nonneg` computes; its ``N`` is dropped here, so ``Q + diag(u)`` itself is
            made convex).
        iters: ADMM iterations.

    Returns:
        ``(u, min_eigenvalue_after_repair)``.

    Example:
        >>> import numpy as np
        >>> Q = np.array([[0.0, 1.0, 0.2], [1.0, 0.0, 0.5], [0.2, 0.5, 0.0]])
        >>> u, lam = convexify(Q, np.ones(3), 1)
        >>> bool(lam > 0)
        True
    """
    u, _, lam, _ = _convexify(Q, c, M, method, iters, nonneg=False)
    return u, lam


def convexify_nonneg(Q: np.ndarray, c: np.ndarray, M: int, *, iters: int = 300) -> tuple[np.ndarray, np.ndarray, float]:
    """Doubly non-negative convexification: ``u`` and ``N >= 0`` with ``Q - N + diag(u)`` PSD on ``sum(w) = 0``.

    For ``x >= 0``, ``x^T Q x >= x^T (Q - N) x``, so the convex QP relaxation of ``Q - N`` (with the
    diagonal ``u`` moved in as for QCR) is a valid lower bound of the binary problem, for any ``N``
    with non-negative entries. ``u`` and ``N`` are the multipliers of ``diag(X) = x`` and ``X >= 0``
    in the doubly non-negative SDP relaxation, so at the root the bound approaches that SDP's value
    (much tighter than the Shor SDP when ``Q`` has positive couplings, as correlated blocks do).

    Returns:
        ``(u, N, min_eigenvalue_after_repair)``; ``N`` symmetric, zero diagonal, entries ``>= 0``.

    Example:
        >>> import numpy as np
        >>> Q = np.array([[0.0, 1.0, 0.2], [1.0, 0.0, 0.5], [0.2, 0.5, 0.0]])
        >>> u, N, lam = convexify_nonneg(Q, np.ones(3), 1)
        >>> bool(lam > 0 and N.min() >= 0)
        True
    """
    return _convexify(Q, c, M, "dnn", iters, nonneg=True)[:3]


def _convexify(Q: np.ndarray, c: np.ndarray, M: int, method: str, iters: int, nonneg: bool,
               deadline: float | None = None) -> tuple[np.ndarray, np.ndarray, float, int]:
    """``(u, N, min_eigenvalue_after_repair, admm_iterations)``.

    The ADMM stops at ``deadline``; whatever it reached, the exact eigenvalue shift below makes
    ``Q - N + diag(u)`` convex on ``sum(w) = 0``, so the bounds stay valid (only less tight).
    """
    n = Q.shape[0]
    B = _complement_basis(n)
    N = np.zeros((n, n))
    its = 0
    if method in ("qcr", "dnn") and 0 < M < n and n > 2:
        u, N, its = _shor_admm(Q, c, M, iters=iters, tol=1e-4, nonneg=method == "dnn", deadline=deadline)
        if not (np.all(np.isfinite(u)) and np.all(np.isfinite(N))):
            u, N = np.zeros(n), np.zeros((n, n))
        # exact validity of N: symmetric, zero diagonal, non-negative (rounding must not break it)
        N = np.maximum(0.5 * (N + N.T), 0.0)
        np.fill_diagonal(N, 0.0)
        if not nonneg:
            N = np.zeros((n, n))
    elif method in ("qcr", "eig", "dnn"):
        u = np.zeros(n)
    else:
        raise ValueError(f"unknown bound {method!r}; use 'dnn', 'qcr' or 'eig'")
    scale = max(float(np.abs(Q).max(initial=0.0)), 1e-300)
    margin = 1e-9 * scale  # keeps rounding from making the relaxation slightly non-convex
    Qc = Q - N
    lam = _min_eig_on_complement(Qc + np.diag(u), B)
    if lam < margin:
        u = u + (margin - lam)
        lam = _min_eig_on_complement(Qc + np.diag(u), B)
    return u, N, lam, its


def _project(Z: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Exact Euclidean projection of each row of ``Z`` onto ``{0 <= y <= 1, sum(y) = r_row}``.

    ``sum(clip(z - tau, 0, 1))`` is piecewise linear in ``tau`` with breakpoints ``z_i`` and
    ``z_i - 1``; walking the sorted breakpoints gives the segment that hits ``r`` and ``tau`` on it.
    """
    B, m = Z.shape
    bp = np.concatenate([Z, Z - 1.0], axis=1)
    order = np.argsort(-bp, axis=1)
    bp = np.take_along_axis(bp, order, axis=1)
    # slope of h(tau) in -tau just below each breakpoint: +1 at a z_i, -1 at a z_i - 1
    slope = np.cumsum(np.where(order < m, 1.0, -1.0), axis=1)
    h = np.zeros_like(bp)  # h at each breakpoint, walking tau down from +inf
    np.cumsum(slope[:, :-1] * (bp[:, :-1] - bp[:, 1:]), axis=1, out=h[:, 1:])
    j = np.argmax(h >= r[:, None] - 1e-12, axis=1)  # first breakpoint where h reaches r (j >= 1 when r > 0)
    j = np.maximum(j, 1) - 1
    rows = np.arange(B)
    s = slope[rows, j]
    tau = bp[rows, j] - np.where(s > 0, (r - h[rows, j]) / np.where(s > 0, s, 1.0), 0.0)
    return np.clip(Z - tau[:, None], 0.0, 1.0)


def _smallest_sum(G: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Sum of the ``r_row`` smallest entries of each row."""
    Gs = np.sort(G, axis=1)
    cs = np.concatenate([np.zeros((G.shape[0], 1)), np.cumsum(Gs, axis=1)], axis=1)
    return cs[np.arange(G.shape[0]), r]


class _Level:
    """Per-depth data shared by all nodes whose first ``d`` variables are fixed."""

    def __init__(self, A: np.ndarray, L: float) -> None:
        self.A = A  # Q restricted to the free block plus diag(u)
        self.L = L  # Lipschitz constant of the gradient
        self.u = np.zeros(A.shape[0])


def _qp_bounds(
    A: np.ndarray,
    L: float,
    lin: np.ndarray,
    const: np.ndarray,
    r: np.ndarray,
    Y0: np.ndarray,
    thr: float | None,
    tol: float,
    max_iter: int,
    check_every: int = 4,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Lower bounds of ``const + min y^T A y + lin^T y`` over the capped simplices, with early exit.

    Returns:
        ``(bounds, Y, iterations)``; ``bounds`` are valid lower bounds (Frank-Wolfe gap certificates);
        rows that cannot be pruned (relaxation value below ``thr``) stop early with their best bound.
    """
    Bn, m = lin.shape
    Y = _project(Y0, r)
    Z = Y.copy()
    t = 1.0
    best = np.full(Bn, -np.inf)
    active = np.arange(Bn)
    it = 0
    while active.size and it < max_iter:
        it += 1
        Za = Z[active]
        G = 2.0 * (Za @ A) + lin[active]
        Yn = _project(Za - G / L, r[active])
        tn = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        Z[active] = Yn + ((t - 1.0) / tn) * (Yn - Y[active])
        Y[active] = Yn
        t = tn
        if it % check_every == 0 or it == max_iter:
            YA = Yn @ A
            Gy = 2.0 * YA + lin[active]
            f = const[active] + np.einsum("ij,ij->i", Yn, YA) + np.einsum("ij,ij->i", lin[active], Yn)
            lb = f - np.einsum("ij,ij->i", Gy, Yn) + _smallest_sum(Gy, r[active])
            best[active] = np.maximum(best[active], lb)
            if thr is None:  # solve to tolerance (root)
                done = (f - best[active]) <= tol
                active = active[~done]
                continue
            done = (best[active] > thr + tol) | (f <= thr + tol)
            # relaxation value reached its bound: nothing more to gain
            done |= (f - best[active]) <= tol
            active = active[~done]
    return best, Y, it


def _root_order(Q: np.ndarray, c: np.ndarray, u: np.ndarray, M: int, how: str) -> np.ndarray:
    n = Q.shape[0]
    if how == "natural":
        return np.arange(n)
    A = Q + np.diag(u)
    L = 2.0 * max(float(np.linalg.eigvalsh(A)[-1]), 1e-300)
    b, Y, _ = _qp_bounds(A, L, (c - u)[None, :], np.zeros(1), np.array([M]), np.full((1, n), M / n),
                         None, 1e-6 * max(1.0, float(np.abs(A).max())), 2000, check_every=50)
    y = Y[0]
    if how == "fractional":  # most fractional first
        key = -np.minimum(y, 1.0 - y)
        return np.argsort(key, kind="stable")[::-1]
    if how == "decided":  # most decided first, ones before zeros
        return np.lexsort((-y, np.minimum(y, 1.0 - y)))
    if how == "y":  # largest relaxation value first
        return np.argsort(-y, kind="stable")
    raise ValueError(f"unknown order {how!r}")


def _initial_threshold(Q: np.ndarray, c: np.ndarray, M: int, k: int, seed: int, starts: int,
                       rounds: int = 6, deadline: float | None = None) -> tuple[float, int, np.ndarray, np.ndarray]:
    """The k-th lowest distinct energy among greedy + swap-descent states and their swap neighbours.

    The low excited states lie a few swaps from the ground state: the k best are grown by their swap
    neighbourhoods until that set stops changing (a tight incumbent prunes from the first node on).
    Past ``deadline`` the descent and the growth stop early (one round of growth always runs).

    Returns:
        ``(kth_energy, states_seen, best_states, their_energies)`` (inf if fewer than k were seen).
    """
    from qblock.backends.local_search import closure, greedy_state, swap_descent

    n = Q.shape[0]
    rng = np.random.default_rng(seed)
    X0 = np.zeros((starts, n))
    for i in range(starts):
        X0[i, rng.choice(n, M, replace=False)] = 1.0
    X0 = np.concatenate([greedy_state(Q, c, M)[None, :].astype(np.float64), X0])
    X, _ = swap_descent(Q, c, X0, deadline=deadline)
    best, E, seen = closure(Q, c, X, k, max_rounds=rounds, deadline=deadline)
    thr = float(E[-1]) if E.size >= k else math.inf
    return thr, int(seen), best, E


def _simple_bound(Q: np.ndarray, c: np.ndarray, M: int) -> float:
    """A lower bound of ``x^T Q x + c^T x`` over ``sum(x) = M`` in ``O(N^2)``, with no relaxation solved.

    ``E(x) = sum_{i in S} (c_i + sum_{j in S, j != i} Q_ij)``; the inner sum is at least the sum of
    the ``M - 1`` smallest off-diagonal entries of row ``i``, and the outer one at least the sum of
    the ``M`` smallest such row totals. It bounds the open nodes when the time runs out before the
    root relaxation was solved, so an uncertified result still has a finite gap.
    """
    n = Q.shape[0]
    if M == 0:
        return 0.0
    row = np.zeros(n)
    if M > 1:
        R = Q + np.diag(np.full(n, np.inf))  # the diagonal is not a coupling
        row = np.partition(R, M - 2, axis=1)[:, : M - 1].sum(axis=1)
    t = c + row
    return float(np.partition(t, M - 1)[:M].sum())


def topk(
    H: np.ndarray,
    linear: np.ndarray | None,
    num_remove: int,
    k: int = 20,
    time_limit: float | None = None,
    *,
    bound: str = "dnn",
    qcr_iters: int = 200,
    order: str = "natural",
    batch_size: int = 4096,
    max_open: int = 200_000,
    max_qp_iter: int = 60,
    leaf_states: int = 256,
    starts: int = 32,
    seed: int = 0,
    tighten: bool = True,
    refresh: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The ``k`` lowest energies with exactly ``num_remove`` ones, certified by branch-and-bound.

    Args:
        H: symmetric ``(N, N)``; its diagonal is treated as linear (any diagonal is fine).
        linear: length-``N`` linear term or ``None``.
        num_remove: M.
        k: number of states (``min(k, C(N, M))`` are returned).
        time_limit: seconds for the whole call, checked from the start: the convexification (its
            ADMM stops early and the exact eigenvalue repair keeps the bounds valid), the local
            search that seeds the incumbent and the tree. When reached, ``stats["certified"]`` is
            False, ``stats["time_limit_reached"]`` True, and the best states known (from the search
            and the local search) are returned, with ``stats["gap"]`` = their k-th energy minus a
            valid lower bound of every state not yet ruled out (finite; the root bound if the tree
            never started). The last step may overrun the limit by one batch of work.
        bound: ``"dnn"`` (default: diagonal and non-negative couplings ``N`` from the doubly
            non-negative SDP, see :func:`convexify_nonneg`), ``"qcr"`` (diagonal from the Shor SDP) or
            ``"eig"`` (uniform eigenvalue shift).
        qcr_iters: ADMM iterations for the SDP multipliers (more: tighter bounds, slower root).
        order: branching order: ``"natural"`` (block order; best on the banded correlations of real
            models), or from the root relaxation ``y``: ``"y"`` (largest first), ``"decided"``,
            ``"fractional"``.
        batch_size: nodes bounded together in one batch.
        max_open: above this many open nodes the search goes deepest-first (bounds memory).
        max_qp_iter: projected-gradient iterations per batch of bounds.
        leaf_states: subtrees with at most this many completions are enumerated.
        starts: random starts of the swap local search that seeds the incumbent.
        seed: seed of that local search (the result does not depend on it, only the speed).
        tighten: per depth, lower the diagonal to the edge of convexity of the free block.
        refresh: every ``refresh`` depths re-optimise the QCR diagonal for the subtree (0: never).
        progress: show a tqdm counter of nodes.

    Returns:
        ``(X, energies, stats)``: ``X`` int8 ``(k', N)``, energies ascending (``x^T H x + h^T x``,
        ties by lexicographic state), ``stats`` with ``certified``, ``nodes``, ``leaves``, ``bound``,
        ``root_bound``, ``gap``, ``time``, ``qp_iterations``, ``bound_detail``, ``initial_threshold``,
        ``admm_iterations``, ``time_limit_reached``.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> A = rng.standard_normal((40, 12)); H = A.T @ A / 40
        >>> X, e, st = topk(H, None, 4, k=3)
        >>> X.shape, bool(st["certified"]), bool(np.all(np.diff(e) >= 0))
        ((3, 12), True, True)
    """
    t0 = time.perf_counter()
    deadline = None if time_limit is None else t0 + float(time_limit)
    Q, c, M = _checked_input(H, linear, num_remove, k)
    n = Q.shape[0]
    total = math.comb(n, M)
    k = min(int(k), total)
    stats = _initial_stats(bound, total)

    with single_blas_thread():
        if M == 0 or M == n:
            x = np.full((1, n), 1 if M else 0, dtype=np.int8)
            e = float(x[0] @ Q @ x[0] + c @ x[0])
            stats.update(certified=True, gap=0.0, root_bound=e, time=time.perf_counter() - t0, bound="trivial")
            return x, np.array([e]), stats

        # valid for every state: the bound of the open nodes until the root relaxation is solved
        simple_bound = _simple_bound(Q, c, M)
        u, Nn, lam, stats["admm_iterations"] = _convexify(Q, c, M, bound, qcr_iters, nonneg=bound == "dnn",
                                                          deadline=deadline)
        Qc = Q - Nn  # the matrix the relaxations use (Q itself unless bound="dnn")
        stats["min_eig_on_complement"] = lam
        t1 = time.perf_counter()
        thr0, n_init, X_heur, E_heur = _initial_threshold(Q, c, M, k, seed, starts, deadline=deadline)
        stats["initial_threshold"] = thr0
        t2 = time.perf_counter()
        stats["time_convexify"], stats["time_heuristic"] = t1 - t0, t2 - t1
        perm = _root_order(Qc, c, u, M, order)
        search = _Search(Q, Qc, c, u, M, k, perm, thr0, stats, deadline=deadline, bound=bound, qcr_iters=qcr_iters,
                         refresh=refresh, tighten=tighten, leaf_states=leaf_states, max_qp_iter=max_qp_iter)
        search.run(simple_bound, batch_size=batch_size, max_open=max_open, progress=progress)

    X, e = search.result(Q, c, X_heur, E_heur)
    stats.update(time=time.perf_counter() - t0, order=order, initial_states=n_init)
    return X, e, stats


def _initial_stats(bound: str, total: int) -> dict[str, Any]:
    return {
        "bound": f"{bound}-qp",
        "bound_detail": ("convex QP relaxation over {0<=y<=1, sum y = r} after moving the diagonal "
                         + {"qcr": "(QCR: dual of the Shor SDP)", "eig": "(uniform eigenvalue shift)",
                            "dnn": "and dropping x^T N x >= 0 (u, N >= 0: duals of the doubly non-negative SDP)"
                            }.get(bound, bound)
                         + ", convex on sum(w)=0 by an exact eigenvalue check; valid for any H and linear term"),
        "nodes": 0, "leaves": 0, "qp_iterations": 0, "num_feasible_states": total, "time_limit_reached": False,
    }


def _checked_input(H: np.ndarray, linear: np.ndarray | None, num_remove: int,
                   k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(Q, c, M)``: the couplings with a zero diagonal, the linear term with ``H``'s diagonal, and ``M``."""
    H = np.asarray(H, dtype=np.float64)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square, got shape {H.shape}")
    n = H.shape[0]
    M = check_num_remove(num_remove, n)
    if int(k) < 1:
        raise ValueError("k must be at least 1")
    lin = np.zeros(n) if linear is None else np.asarray(linear, dtype=np.float64).reshape(-1)
    if lin.shape != (n,):
        raise ValueError(f"linear must have length {n}, got {lin.shape}")
    if not (np.all(np.isfinite(H)) and np.all(np.isfinite(lin))):
        raise ValueError("H and linear must be finite")
    H = 0.5 * (H + H.T)
    return H - np.diag(np.diag(H)), lin + np.diag(H), M


def _best_seen(Q: np.ndarray, c: np.ndarray, k: int, Xs: list, Es: list) -> tuple[np.ndarray, np.ndarray]:
    """Stopped early: the k best states known, found by the search or by the local search (uncertified)."""
    X_all = np.unique(np.concatenate(Xs), axis=0).astype(np.int8)
    Xf = X_all.astype(np.float64)
    e_all = np.einsum("ij,ij->i", Xf @ Q, Xf) + Xf @ c  # exact energies (the local search's are incremental)
    best = np.lexsort(tuple(X_all[:, ::-1].T) + (e_all,))[:k]
    return X_all[best], e_all[best]


class _Search:
    """The state of one branch-and-bound over the variables in order ``perm``.

    A node is a prefix ``P`` (int8, depth ``d``), its field ``G = Qp @ x_fixed``, the energy ``E`` of the
    fixed part, the picks left ``r``, a warm start ``Y`` of its relaxation and its parent's bound. Open
    nodes are kept by depth; :meth:`run` takes one batch per step, enumerates small subtrees
    (:meth:`_leaves`), bounds the rest by the convex QP relaxation and branches on variable ``d``
    (:meth:`_branch`). ``top`` holds the k best states found.
    """

    def __init__(self, Q: np.ndarray, Qc: np.ndarray, c: np.ndarray, u: np.ndarray, M: int, k: int,
                 perm: np.ndarray, thr0: float, stats: dict[str, Any], *, deadline: float | None, bound: str,
                 qcr_iters: int, refresh: int, tighten: bool, leaf_states: int, max_qp_iter: int) -> None:
        self.n, self.M, self.k = Q.shape[0], M, k
        self.perm, self.thr0, self.stats, self.deadline = perm, thr0, stats, deadline
        self.bound, self.qcr_iters, self.refresh, self.tighten = bound, qcr_iters, refresh, tighten
        self.leaf_states, self.max_qp_iter = leaf_states, max_qp_iter
        self.Qp, self.cp, up = Q[np.ix_(perm, perm)], c[perm], u[perm]
        Qcp = Qc[np.ix_(perm, perm)]
        scale = max(float(np.abs(Q).max(initial=0.0)), float(np.abs(c).max(initial=0.0)), 1e-300)
        # tolerance: bounds and energies are sums of O(n^2) terms of size <= scale
        self.tol = 1e-9 * scale * (1.0 + M) ** 2
        self.margin = 1e-9 * max(float(np.abs(Q).max(initial=0.0)), 1e-300)
        self.top = _TopKLex(k)
        # per-depth matrices, cached up to LEVEL_CACHE_BYTES (all depths together are ~8 N^3 / 3 bytes)
        self.levels: dict[int, _Level] = {}
        # depth -> (diagonal, non-negative part N) of the suffix from that depth
        self.base: dict[int, tuple[np.ndarray, np.ndarray]] = {0: (up, self.Qp - Qcp)}
        self.leaf_tables: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.root_bound: float | None = None
        self.open_min = math.inf
        self.stopped = False

    def result(self, Q: np.ndarray, c: np.ndarray, X_heur: np.ndarray,
               E_heur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(X, energies)`` of the search, and ``certified``, ``gap``, ``root_bound`` in ``stats``.

        Stopped early, the result is the best states known (of the search and of the local search that
        seeded it), uncertified, with the gap to the lowest bound of the nodes left open.
        """
        k, top = self.k, self.top
        if self.stopped:
            X, e = _best_seen(Q, c, k, [X_heur] + ([] if top.X is None else [top.X]),
                              [E_heur] + ([] if top.X is None else [top.energy]))
            self.stats["time_limit_reached"] = True
        elif top.X is None:  # pragma: no cover - a finished search always reaches the k best
            X, e = np.zeros((0, self.n), dtype=np.int8), np.zeros(0)
        else:
            X, e = top.X, top.energy
        certified = (not self.stopped) and X.shape[0] == k
        kth = float(e[-1]) if X.shape[0] == k else math.inf
        open_min = self.open_min
        gap = 0.0 if certified else (max(0.0, kth - open_min) if math.isfinite(kth) and math.isfinite(open_min)
                                     else math.inf)
        self.stats.update(certified=bool(certified), gap=float(gap), root_bound=self.root_bound)
        return X, e

    def level(self, d: int, G: np.ndarray, r: np.ndarray) -> _Level:
        """The relaxation matrix of depth ``d`` (built on first use, re-convexified every ``refresh`` depths)."""
        if d in self.levels:
            return self.levels[d]
        n, base = self.n, self.base
        m_d = n - d
        Qd = self.Qp[d:, d:]
        if self.refresh and d % self.refresh == 0 and d > 0 and 0 < int(np.median(r)) < m_d and m_d > 8:
            # re-optimise the diagonal for this subtree (its own linear term and picks left)
            c_avg = self.cp[d:] + 2.0 * G[:, d:].mean(axis=0)
            ub, Nb, _, _ = _convexify(Qd, c_avg, int(np.median(r)), self.bound, self.qcr_iters,
                                      nonneg=self.bound == "dnn", deadline=self.deadline)
            base[d] = (ub, Nb)
        d0 = max(k for k in base if k <= d)
        ud = np.array(base[d0][0][d - d0 :])
        Ad = Qd - base[d0][1][d - d0 :, d - d0 :] + np.diag(ud)
        if m_d > 2:
            lam_d = _min_eig_on_complement(Ad, _complement_basis(m_d))
            # lower the diagonal to the edge of convexity on 1^perp (tighter bounds), or
            # raise it if rounding left the restriction slightly non-convex
            shift = lam_d - self.margin if (self.tighten or lam_d < self.margin) else 0.0
            ud = ud - shift
            Ad[np.diag_indices(m_d)] -= shift
        Ld = 2.0 * max(float(np.linalg.eigvalsh(Ad)[-1]), 1e-300)
        lv = _Level(Ad, Ld)
        lv.u = ud
        while self.levels and sum(v.A.nbytes for v in self.levels.values()) + Ad.nbytes > LEVEL_CACHE_BYTES:
            del self.levels[next(iter(self.levels))]  # the oldest: breadth-first search moves on from it
        self.levels[d] = lv
        return lv

    def leaf_table(self, d: int, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Every completion of ``r`` picks among the variables from depth ``d`` on, and its pair energy."""
        if (d, r) not in self.leaf_tables:
            S = _combos(self.n - d, r)
            Ind = np.zeros((S.shape[0], self.n - d))
            if r:
                np.put_along_axis(Ind, S, 1.0, axis=1)
            pair = np.einsum("ij,ij->i", Ind @ self.Qp[d:, d:], Ind)
            self.leaf_tables[(d, r)] = (Ind, pair)
        return self.leaf_tables[(d, r)]

    def threshold(self) -> float:
        return min(self.top.threshold, self.thr0)

    def offer(self, Xp_rows: np.ndarray, energies: np.ndarray) -> None:
        def make(idx):
            X = np.zeros((idx.size, self.n), dtype=np.int8)
            X[:, self.perm] = Xp_rows[idx]
            return X

        self.top.offer(energies, make)

    def run(self, simple_bound: float, *, batch_size: int, max_open: int, progress: bool) -> None:
        """Search until no open node can hold one of the k best, or the deadline passes (``stopped``)."""
        n, M = self.n, self.M
        # open nodes by depth; breadth-first (one batch per depth: few, large matrix products) while
        # the number of open nodes stays below max_open, deepest-first beyond (bounded memory)
        pools: dict[int, list] = {0: [(np.zeros((1, 0), dtype=np.int8), np.zeros((1, n)), np.zeros(1), np.array([M]),
                                       np.full((1, n), M / n), np.full(1, simple_bound))]}
        n_open = 1
        bar = None
        if progress:  # tqdm is a core dependency
            from tqdm.auto import tqdm

            bar = tqdm(desc="bnb nodes", unit="node", leave=False)
        while pools:
            if self.deadline is not None and time.perf_counter() > self.deadline:
                self.stopped = True
                self.open_min = min(float(np.min(b[5])) for lst in pools.values() for b in lst)
                break
            d = min(pools) if n_open <= max_open else max(pools)
            parts = pools.pop(d)
            nodes = tuple(np.concatenate([b[i] for b in parts]) for i in range(6))
            if nodes[0].shape[0] > batch_size:
                pools[d] = [tuple(a[batch_size:] for a in nodes)]
                nodes = tuple(a[:batch_size] for a in nodes)
            n_open -= nodes[0].shape[0]
            self.stats["nodes"] += nodes[0].shape[0]
            if bar:
                bar.update(nodes[0].shape[0])
            for kid in self._expand(d, nodes):
                pools.setdefault(d + 1, []).append(kid)
                n_open += kid[0].shape[0]
        if bar:
            bar.close()

    def _expand(self, d: int, nodes: tuple) -> list[tuple]:
        """The children of a batch of depth-``d`` nodes that may still hold one of the k best."""
        P, G, E, r, Y, pb = nodes
        thr = self.threshold()
        # drop nodes whose parent bound already exceeds a threshold that improved meanwhile
        keep = pb <= thr + self.tol
        if not keep.all():
            P, G, E, r, Y, pb = P[keep], G[keep], E[keep], r[keep], Y[keep], pb[keep]
        if P.shape[0] == 0:
            return []
        m = self.n - d
        # complete or tiny subtrees: enumerate them in one product
        ncomp = np.array([math.comb(m, int(ri)) for ri in r]) if m > 0 else np.ones(r.size, dtype=np.int64)
        small = ncomp <= self.leaf_states
        if small.any():
            self._leaves(d, P, G, E, r, small)
            big = ~small
            P, G, E, r, Y, pb = P[big], G[big], E[big], r[big], Y[big], pb[big]
            if P.shape[0] == 0:
                return []
        return self._branch(d, P, G, E, r, Y)

    def _leaves(self, d: int, P, G, E, r, small) -> None:
        """Enumerate the subtrees ``small`` at depth ``d`` and offer their states to the top-k."""
        for ri in np.unique(r[small]):
            sel = np.flatnonzero(small & (r == ri))
            Ind, pair = self.leaf_table(d, int(ri))
            lvec = self.cp[None, d:] + 2.0 * G[sel, d:]
            En = E[sel, None] + lvec @ Ind.T + pair[None, :]
            self.stats["leaves"] += En.size
            nsuf = Ind.shape[0]
            Xrows_pref = P[sel]

            def rows(idx, Xrows_pref=Xrows_pref, Ind=Ind, nsuf=nsuf):
                pi, si = np.divmod(idx, nsuf)
                return np.concatenate([Xrows_pref[pi], Ind[si].astype(np.int8)], axis=1)

            flat = En.ravel()
            thr = self.threshold()
            cand = np.flatnonzero(flat <= thr + self.tol)
            if cand.size:
                self.offer(rows(cand), flat[cand])

    def _branch(self, d: int, P, G, E, r, Y) -> list[tuple]:
        """Bound the nodes by their relaxation and split the survivors on variable ``d``."""
        m = self.n - d
        lv = self.level(d, G, r)
        thr = self.threshold()
        lin_nodes = self.cp[None, d:] + 2.0 * G[:, d:] - lv.u[None, :]
        bnd, Y, its = _qp_bounds(lv.A, lv.L, lin_nodes, E, r, Y[:, -m:], thr, self.tol, self.max_qp_iter)
        self.stats["qp_iterations"] += its
        if self.root_bound is None:
            self.root_bound = float(bnd[0])
        alive = bnd <= thr + self.tol
        if not alive.any():
            return []
        P, G, E, r, Y, bnd = P[alive], G[alive], E[alive], r[alive], Y[alive], bnd[alive]
        # children: x_d = 1 (if picks remain) and x_d = 0 (if enough variables remain)
        one = r >= 1
        zero = r <= m - 1
        kids = []
        if zero.any():
            s = zero
            kids.append((np.concatenate([P[s], np.zeros((s.sum(), 1), np.int8)], axis=1), G[s], E[s], r[s],
                         Y[s, 1:], bnd[s]))
        if one.any():
            s = one
            E1 = E[s] + self.cp[d] + 2.0 * G[s, d]
            G1 = G[s] + self.Qp[d][None, :]
            kids.append((np.concatenate([P[s], np.ones((s.sum(), 1), np.int8)], axis=1), G1, E1, r[s] - 1,
                         Y[s, 1:], bnd[s]))
        return kids
