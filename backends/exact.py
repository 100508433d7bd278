"""Certified top-k over the feasible states only (exactly M ones).

dimod's ``ExactSolver`` enumerates all ``2^N`` states; here only the ``C(N, M)`` feasible ones are
visited, in blocks that become one BLAS matrix product each:

A removal set ``S`` is split into a *prefix* ``P`` (its ``p`` smallest indices, largest ``t``) and a
*suffix* ``Q`` of ``q = M - p`` indices above ``t``. Then
``E(P u Q) = E(P) + E(Q) + 2 * sum_{i in P, j in Q} H_ij``,
and for all prefixes with the same ``t`` against all suffixes above ``t`` the cross terms are
``C_P @ I_Q^T`` (``C_P`` the prefixes' coupling rows, ``I_Q`` the suffixes' indicator matrix).
Memory is bounded by ``chunk_entries``; the k best are kept by partial selection, so the result is the
exact k lowest energies (certified by exhaustion).
"""

from __future__ import annotations

import math
import time
from typing import Any

import dimod
import numpy as np

from qblock.backends._topk import _combos, _TopK
from qblock.problems._states import check_num_remove

__all__ = ["ExactTopKSampler", "MatrixSampler", "enumerate_topk", "bqm_to_matrices", "set_energies", "auto_backend", "ENUMERATION_LIMIT"]

#: Above this many feasible states ``strategy="auto"`` switches from enumeration to branch-and-bound,
#: and every ``backend="auto"`` (validate, run, viz, benchmarks) switches from ``exact`` to ``swap``.
ENUMERATION_LIMIT = 60_000_000


def auto_backend(n: int, m: int) -> str:
    """The backend an ``"auto"`` choice means for ``N = n`` blocks and ``M = m`` removed: ``"exact"``
    (certified, by enumeration) up to :data:`ENUMERATION_LIMIT` feasible states ``C(N, M)``, else ``"swap"``.

    Example:
        >>> auto_backend(30, 8), auto_backend(80, 16)
        ('exact', 'swap')
    """
    return "exact" if math.comb(n, m) <= ENUMERATION_LIMIT else "swap"

#: The branch-and-bound refuses more blocks than this: its bound costs an ``(N+1) x (N+1)`` eigenvalue
#: decomposition per ADMM step and per depth (N = 1000: ~0.3 s each, minutes in all, and it still
#: cannot certify a top-k that large); real models have at most a few hundred blocks.
BNB_MAX_BLOCKS = 1000


def check_bnb_size(n: int) -> None:
    """Refuse a branch-and-bound over more than :data:`BNB_MAX_BLOCKS` blocks, in one line with a hint."""
    if n > BNB_MAX_BLOCKS:
        raise ValueError(
            f"exact: N = {n} blocks is above the limit of {BNB_MAX_BLOCKS} for a certified search "
            f"(each bound step is an (N+1) x (N+1) eigenvalue problem); use a heuristic backend such as "
            f"'swap' (qblock solve -b swap), or fewer blocks"
        )


def bqm_to_matrices(bqm: dimod.BinaryQuadraticModel) -> tuple[np.ndarray, np.ndarray, float, list]:
    """``(H, linear, offset, variables)`` with ``E(x) = x^T H x + linear^T x + offset`` for a BINARY BQM.

    ``H`` is symmetric with a zero diagonal (the BQM's linear biases already hold the diagonal).
    ``variables`` are sorted when their labels can be (integers: block order), else in the BQM's
    order, so that "lexicographic state" means the same for every BQM of one problem.
    """
    if bqm.vartype is dimod.SPIN:
        bqm = bqm.change_vartype(dimod.BINARY, inplace=False)
    variables = list(bqm.variables)
    try:
        variables = sorted(variables)
    except TypeError:  # mixed label types: keep the BQM's order
        pass
    n = len(variables)
    lin, (row, col, quad), offset = bqm.to_numpy_vectors(variable_order=variables)
    H = np.zeros((n, n))
    np.add.at(H, (row, col), quad / 2.0)
    np.add.at(H, (col, row), quad / 2.0)
    return H, np.asarray(lin, dtype=np.float64), float(offset), variables


def set_energies(H: np.ndarray, d: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Energies of index sets (rows of ``C``): ``sum d[i] + 2 sum_{a<b} H[i_a, i_b]``."""
    e = d[C].sum(axis=1) if C.shape[1] else np.zeros(C.shape[0])
    for a in range(C.shape[1]):
        for b in range(a + 1, C.shape[1]):
            e = e + 2.0 * H[C[:, a], C[:, b]]
    return e


def enumerate_topk(
    H: np.ndarray,
    linear: np.ndarray,
    num_remove: int,
    k: int = 20,
    *,
    suffix_cap: int = 200_000,
    chunk_entries: int = 4_000_000,
    progress: bool = False,
    deadline: float | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The ``k`` lowest-energy states with exactly ``num_remove`` ones, by exhaustive enumeration.

    Args:
        H: symmetric ``(N, N)`` matrix.
        linear: length-``N`` linear term.
        num_remove: M.
        k: how many states to return (fewer if ``C(N, M) < k``).
        suffix_cap: the largest suffix table (rows) held at once.
        chunk_entries: the largest block of energies computed at once (bounds memory).
        progress: show a progress bar (tqdm, if installed).
        deadline: a ``time.perf_counter()`` value; past it the enumeration stops after the current
            block (then ``states_visited < C(N, M)`` and the states are the best of those visited).

    Returns:
        ``(X, energies, states_visited)`` with ``X`` of shape ``(k, N)``, sorted by energy (without the
        BQM offset).

    Example:
        >>> import numpy as np
        >>> X, e, n = enumerate_topk(np.diag([3.0, 1.0, 2.0]), np.zeros(3), 1, k=2)
        >>> X.tolist(), e.tolist(), n
        ([[0, 1, 0], [0, 0, 1]], [1.0, 2.0], 3)
    """
    H = np.asarray(H, dtype=np.float64)
    n = H.shape[0]
    M = check_num_remove(num_remove, n)
    if k < 1:
        raise ValueError("k must be at least 1")
    Hoff = H - np.diag(np.diag(H))
    d = np.diag(H) + np.asarray(linear, dtype=np.float64)
    total = math.comb(n, M)
    bar = None
    if progress:  # tqdm is a core dependency
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="state", unit_scale=True, desc="exact", leave=False)
    try:
        if 2 * M <= n:
            top = _TopK(min(k, total))
            visited = _enumerate(Hoff, d, M, top, suffix_cap, chunk_entries, bar, deadline)
            X = top.X
        else:
            # enumerate the N - M kept blocks y = 1 - x instead (as many states): with x = 1 - y,
            # E = y^T Hoff y - (d + 2 Hoff 1)^T y + const. Split as prefix + suffix, M > N/2 indices make
            # millions of wide prefixes (M = 20 of 30: 40 s, against 0.6 s for its complement)
            top = _TopK(min(k, total), complement=True)
            visited = _enumerate(Hoff, -(d + 2.0 * Hoff.sum(axis=1)), n - M, top, suffix_cap, chunk_entries, bar,
                                 deadline)
            X = None if top.X is None else (1 - top.X).astype(np.int8)
    finally:
        if bar:
            bar.close()
    assert visited == total or deadline is not None, (visited, total)
    if X is None:  # stopped before the first block
        return np.zeros((0, n), dtype=np.int8), np.zeros(0), visited
    if top.complement:  # the energies of the states themselves, as the direct enumeration computes them
        e = set_energies(Hoff, d, np.nonzero(X)[1].reshape(len(X), M))
        order = np.lexsort(tuple(X[:, ::-1].T) + (e,))
        return X[order], e[order], visited
    return X, top.energy, visited


def _enumerate(Hoff: np.ndarray, d: np.ndarray, M: int, top: _TopK, suffix_cap: int, chunk_entries: int, bar,
               deadline: float | None) -> int:
    """Offer every state with ``M`` ones to ``top`` (prefix/suffix blocks, see the module docstring);
    returns the number visited (fewer than ``C(N, M)`` only past ``deadline``)."""
    n = Hoff.shape[0]
    q = M
    while q > 0 and math.comb(n, q) > suffix_cap:
        q -= 1
    p = M - q
    if p == 0:
        C = _combos(n, M)
        e = set_energies(Hoff, d, C)

        def make(idx, C=C):
            X = np.zeros((idx.size, n), dtype=np.int8)
            np.put_along_axis(X, C[idx], 1, axis=1)
            return X

        top.offer(e, make)
        if bar:
            bar.update(C.shape[0])
        return C.shape[0]
    visited = 0
    for t in range(p - 1, n - q):
        if deadline is not None and time.perf_counter() > deadline:
            break
        u = n - 1 - t
        S = _combos(u, q, shift=t + 1)  # suffixes above t
        ES = set_energies(Hoff, d, S)
        IS = np.zeros((S.shape[0], u))
        if q:
            np.put_along_axis(IS, S - (t + 1), 1.0, axis=1)
        Pm = _combos(t, p - 1)
        P = np.concatenate([Pm, np.full((Pm.shape[0], 1), t, dtype=np.intp)], axis=1)
        EP = set_energies(Hoff, d, P)
        CP = 2.0 * Hoff[P][:, :, t + 1 :].sum(axis=1)  # (num_prefixes, u)
        rows = max(1, chunk_entries // max(1, S.shape[0]))
        for lo in range(0, P.shape[0], rows):
            if deadline is not None and time.perf_counter() > deadline:
                break
            hi = min(lo + rows, P.shape[0])
            E = EP[lo:hi, None] + ES[None, :] + CP[lo:hi] @ IS.T

            def make(idx, lo=lo, S=S, P=P, ns=S.shape[0]):
                pi, si = np.divmod(idx, ns)
                X = np.zeros((idx.size, n), dtype=np.int8)
                np.put_along_axis(X, P[lo + pi], 1, axis=1)
                if S.shape[1]:
                    np.put_along_axis(X, S[si], 1, axis=1)
                return X

            top.offer(E.ravel(), make)
            visited += E.size
            if bar:
                bar.update(E.size)
    return visited


class MatrixSampler(dimod.Sampler):
    """A constrained sampler that computes on matrices: subclasses write :meth:`sample_matrices`.

    ``sample(bqm)`` (the dimod API) reads the matrices once with :func:`bqm_to_matrices` and wraps
    the states in a SampleSet; :func:`qblock.solve` calls :meth:`sample_matrices` with the problem's
    own matrices (``problem.objective_matrices()``, the same floats), so solving a problem neither
    builds a BQM nor reads one back.
    """

    def sample(self, bqm: dimod.BinaryQuadraticModel, **kwargs: Any) -> dimod.SampleSet:
        """The states :meth:`sample_matrices` finds for ``bqm``, over its variables (see there for the parameters)."""
        H, lin, offset, variables = bqm_to_matrices(bqm)
        X, energies, info = self.sample_matrices(H, lin, offset, **kwargs)
        return dimod.SampleSet.from_samples((X, variables), vartype=dimod.BINARY, energy=energies, info=info,
                                            sort_labels=False)

    def sample_matrices(self, H: np.ndarray, linear: np.ndarray, offset: float,
                        **kwargs: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """``(states, energies, info)`` for ``E(x) = x^T H x + linear^T x + offset`` (``H`` with a zero diagonal)."""
        raise NotImplementedError


class ExactTopKSampler(MatrixSampler):
    """Certified k lowest-energy states with exactly ``num_remove`` ones, as a dimod sampler.

    Takes the *unpenalised* objective BQM; the constraint is never relaxed, so no penalty is needed.
    Strategy ``"enumerate"`` visits all ``C(N, M)`` feasible states (vectorised, bounded memory);
    ``"bnb"`` is the branch-and-bound of :mod:`qblock.backends.bnb` (no full enumeration);
    ``"auto"`` picks enumeration up to ``ENUMERATION_LIMIT`` states.

    Example:
        >>> import dimod
        >>> bqm = dimod.BQM({0: 1.0, 1: 2.0, 2: 3.0}, {(0, 1): 5.0}, 0.0, "BINARY")
        >>> ss = ExactTopKSampler().sample(bqm, num_remove=2, num_solutions=3)
        >>> [(sorted(k for k, v in s.items() if v), float(e)) for s, e in ss.data(["sample", "energy"])]
        [([0, 2], 4.0), ([1, 2], 5.0), ([0, 1], 8.0)]
    """

    parameters = {"num_remove": [], "num_solutions": [], "strategy": [], "progress": [], "time_limit": []}
    properties: dict[str, Any] = {}

    def sample_matrices(
        self,
        H: np.ndarray,
        linear: np.ndarray,
        offset: float,
        *,
        num_remove: int,
        num_solutions: int = 20,
        strategy: str = "auto",
        progress: bool = False,
        time_limit: float | None = None,
        **kwargs: Any,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """The ``num_solutions`` lowest-energy states with exactly ``num_remove`` ones.

        Args:
            H, linear, offset: the unpenalised objective (:func:`bqm_to_matrices`; ``sample`` takes its BQM).
            num_remove: M.
            num_solutions: k (fewer if there are fewer feasible states).
            strategy: ``"auto"``, ``"enumerate"`` or ``"bnb"``.
            progress: show a progress bar.
            time_limit: seconds for the whole call, or ``None``. When it runs out, the best states
                known are returned with ``info["certified_optimal"] = False``,
                ``info["time_limit_reached"] = True`` and ``info["gap"]``, the k-th energy minus a
                valid lower bound of every state not ruled out.

        Raises:
            ValueError: ``num_remove`` out of range, an unknown strategy, or a branch-and-bound over
                more than :data:`BNB_MAX_BLOCKS` blocks.
        """
        if kwargs:
            raise TypeError(f"unknown parameters for exact: {', '.join(kwargs)}")
        t0 = time.perf_counter()
        deadline = None if time_limit is None else t0 + float(time_limit)
        lin = linear
        n = H.shape[0]
        num_remove = check_num_remove(num_remove, n)
        total = math.comb(n, num_remove)
        if strategy == "auto":
            strategy = "enumerate" if total <= ENUMERATION_LIMIT else "bnb"
        info: dict[str, Any] = {"strategy": strategy, "num_feasible_states": total, "time_limit_reached": False}
        if strategy == "enumerate":
            X, e, visited = enumerate_topk(H, lin, num_remove, num_solutions, progress=progress, deadline=deadline)
            info["states_visited"] = visited
            info["certified"] = visited == total
            if visited < total:
                X, e, info["gap"] = _best_known(H, lin, num_remove, num_solutions, X, e)
                info["time_limit_reached"] = True
            else:
                info["gap"] = 0.0
        elif strategy == "bnb":
            from qblock.backends.bnb import topk as bnb_topk

            check_bnb_size(n)
            X, e, stats = bnb_topk(H, lin, num_remove, num_solutions, time_limit=time_limit)
            info.update(stats)
        else:
            raise ValueError(f"unknown strategy {strategy!r}; use 'auto', 'enumerate' or 'bnb'")
        info["certified_optimal"] = bool(info["certified"])
        info["timing"] = time.perf_counter() - t0
        return X, e + offset, info


def _best_known(H: np.ndarray, lin: np.ndarray, m: int, k: int, X: np.ndarray,
                e: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """An enumeration stopped by its deadline: its states merged with a quick local search's.

    Returns:
        ``(states, energies, gap)``: the best ``k`` known, in (energy, state) order, and the gap of
        their k-th energy above a valid lower bound of every feasible state (``inf`` if fewer than
        ``k`` states are known).
    """
    from qblock.backends.bnb import _initial_threshold, _simple_bound

    Q = H - np.diag(np.diag(H))
    c = lin + np.diag(H)
    # the deadline has passed: one descent pass and one round of swap neighbours, no more
    _, _, Xh, _ = _initial_threshold(Q, c, m, k, seed=0, starts=8, deadline=0.0)
    X_all = np.unique(np.concatenate([X.astype(np.int8), Xh.astype(np.int8)]), axis=0)
    Xf = X_all.astype(np.float64)
    e_all = np.einsum("ij,ij->i", Xf @ Q, Xf) + Xf @ c
    best = np.lexsort(tuple(X_all[:, ::-1].T) + (e_all,))[:k]
    X, e = X_all[best], e_all[best]
    gap = max(0.0, float(e[-1]) - _simple_bound(Q, c, m)) if X.shape[0] >= k else math.inf
    return X, e, gap
