"""Fixed-cardinality simulated annealing: every move swaps one removed and one kept block.

This is Kawasaki dynamics at fixed magnetisation: the number of removed blocks never changes, so
every read is feasible and no penalty term is needed. Many reads run in parallel as rows of numpy
arrays; each swap updates the local fields ``G = X @ H`` of its read in ``O(N)``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from qblock.backends.exact import MatrixSampler
from qblock.backends.local_search import swap_descent, topk_closure
from qblock.problems._states import check_num_remove

__all__ = ["SwapAnnealingSampler", "default_beta_range"]


def default_beta_range(H: np.ndarray, linear: np.ndarray, num_remove: int, rng: np.random.Generator) -> tuple[float, float]:
    """Inverse temperatures from the spread of swap energy changes at random feasible states.

    Hot end: a typical uphill swap (90th percentile of ``|dE|``) is accepted with probability 1/2.
    Cold end: a small uphill swap (5th percentile of the non-zero ``|dE|``) with probability 1/1000.
    """
    n = H.shape[0]
    samples = []
    d = np.diag(H) + linear
    for _ in range(16):
        x = np.zeros(n)
        x[rng.choice(n, num_remove, replace=False)] = 1.0
        g = H @ x
        ones, zeros = np.flatnonzero(x), np.flatnonzero(x == 0)
        i = rng.choice(zeros, 32)
        j = rng.choice(ones, 32)
        de = (d[i] + 2 * g[i]) - (linear[j] + 2 * g[j] - np.diag(H)[j]) - 2 * H[i, j]
        samples.append(np.abs(de))
    de = np.concatenate(samples)
    de = de[de > 1e-12 * max(1.0, float(np.abs(H).max()))]
    if de.size == 0:
        return 0.1, 10.0
    hot = np.log(2.0) / np.percentile(de, 90)
    cold = np.log(1000.0) / max(np.percentile(de, 5), 1e-300)
    return float(hot), float(max(cold, hot * 10))


class SwapAnnealingSampler(MatrixSampler):
    """Annealer whose moves swap a removed and a kept block, so every state has exactly M ones.

    Takes the *unpenalised* objective BQM and ``num_remove``. Returns the best state each read
    visited, polished by steepest swap descent and grown into a top-k closed under swap moves (low
    excited states for the top-k), as distinct states sorted by energy.

    Example:
        >>> import qblock
        >>> p = qblock.random_problem(16, 4, seed=0)
        >>> ss = SwapAnnealingSampler().sample(p.objective_bqm(), num_remove=4, seed=1, num_solutions=3)
        >>> len(ss), all(sum(s.values()) == 4 for s in ss.samples())
        (3, True)
    """

    parameters = {
        "num_remove": [],
        "num_solutions": [],
        "num_reads": [],
        "num_sweeps": [],
        "beta_range": [],
        "seed": [],
        "polish": [],
    }
    properties: dict[str, Any] = {}

    def sample_matrices(
        self,
        H: np.ndarray,
        lin: np.ndarray,
        offset: float,
        *,
        num_remove: int,
        num_solutions: int = 20,
        num_reads: int = 64,
        num_sweeps: int = 200,
        beta_range: tuple[float, float] | None = None,
        seed: int | None = None,
        polish: bool = True,
        **kwargs: Any,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Sample. One sweep is ``N`` proposed swaps per read.

        Args:
            H, lin, offset: the unpenalised objective (``sample`` takes its BQM).
            num_remove: M.
            num_solutions: how many distinct states to return at most.
            num_reads: independent chains (run in parallel).
            num_sweeps: sweeps per chain.
            beta_range: ``(hot, cold)`` inverse temperatures; default from the problem's energy scale.
            seed: random seed.
            polish: finish with steepest swap descent.
        """
        if kwargs:
            raise TypeError(f"unknown parameters for swap: {', '.join(kwargs)}")
        if num_reads < 1 or num_sweeps < 0:
            raise ValueError("num_reads must be >= 1 and num_sweeps >= 0")
        t0 = time.perf_counter()
        n = H.shape[0]
        m = check_num_remove(num_remove, n)
        rng = np.random.default_rng(seed)
        R = int(num_reads)
        order = np.argsort(rng.random((R, n)), axis=1)
        removed, kept = order[:, :m].copy(), order[:, m:].copy()
        X = np.zeros((R, n))
        np.put_along_axis(X, removed, 1.0, axis=1)
        if 0 < m < n and num_sweeps > 0:
            if beta_range is None:
                beta_range = default_beta_range(H, lin, m, rng)
            hot, cold = (float(b) for b in beta_range)
            if not (0 < hot <= cold):
                raise ValueError("beta_range must be (hot, cold) with 0 < hot <= cold")
            d = np.diag(H) + lin
            hd = np.diag(H)
            G = X @ H
            E = np.einsum("ri,ij,rj->r", X, H, X) + X @ lin
            best_E, best_X = E.copy(), X.copy()
            steps = int(num_sweeps) * n
            betas = np.geomspace(hot, cold, steps)
            rows = np.arange(R)
            chunk = 512
            for s0 in range(0, steps, chunk):
                s1 = min(s0 + chunk, steps)
                A = rng.integers(0, m, (s1 - s0, R))
                B = rng.integers(0, n - m, (s1 - s0, R))
                U = np.log(rng.random((s1 - s0, R)))
                for k in range(s1 - s0):
                    a, b = A[k], B[k]
                    j = removed[rows, a]
                    i = kept[rows, b]
                    dE = (d[i] + 2.0 * G[rows, i]) - (lin[j] + 2.0 * G[rows, j] - hd[j]) - 2.0 * H[i, j]
                    acc = -betas[s0 + k] * dE >= U[k]
                    if not acc.any():
                        continue
                    r = rows[acc]
                    ia, ja = i[acc], j[acc]
                    G[r] += H[ia] - H[ja]
                    X[r, ia] = 1.0
                    X[r, ja] = 0.0
                    removed[r, a[acc]] = ia
                    kept[r, b[acc]] = ja
                    E[r] += dE[acc]
                    better = E[r] < best_E[r]
                    if better.any():
                        rb = r[better]
                        best_E[rb] = E[rb]
                        best_X[rb] = X[rb]
            X = best_X
        states = X.astype(np.int8)
        moves = 0
        if polish:
            states, moves = swap_descent(H, lin, np.unique(states, axis=0))
            # the reads end in few distinct minima; grow them into a top-k closed under swaps
            states = np.concatenate([states, topk_closure(H, lin, states, int(num_solutions))])
        uniq = np.unique(states, axis=0)
        Xf = uniq.astype(np.float64)
        e = np.einsum("ri,ij,rj->r", Xf, H, Xf) + Xf @ lin + offset
        order = np.lexsort(tuple(uniq[:, ::-1].T) + (e,))[:num_solutions]
        info = {
            "num_reads": R,
            "num_sweeps": int(num_sweeps),
            "beta_range": None if beta_range is None else [float(b) for b in beta_range],
            "polish_moves": int(moves),
            "timing": time.perf_counter() - t0,
        }
        return uniq[order], e[order], info
