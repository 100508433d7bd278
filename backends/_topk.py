"""The top-k bookkeeping shared by the certified searches (enumeration in :mod:`qblock.backends.exact`,
branch-and-bound in :mod:`qblock.backends.bnb`): the k lowest (energy, state) pairs seen so far, and
the index combinations both enumerate."""

from __future__ import annotations

import itertools
import math

import numpy as np


def _combos(n: int, r: int, shift: int = 0) -> np.ndarray:
    if r == 0:
        return np.zeros((1, 0), dtype=np.intp)
    count = math.comb(n, r)
    flat = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(n), r)), dtype=np.intp, count=count * r)
    return flat.reshape(count, r) + shift


class _TopK:
    """The k lowest (energy, key) pairs seen so far."""

    #: above this many candidates tied at the k-th energy, keep only k of them (bounds memory on a
    #: degenerate plateau); ``None`` keeps every tie
    plateau_cap: int | None = 100_000

    def __init__(self, k: int, complement: bool = False) -> None:
        self.k = k
        self.complement = complement  # states are complements: ties resolve by the complement's order
        self.energy = np.zeros(0)
        self.states: list[np.ndarray] = []
        self.X = None

    @property
    def threshold(self) -> float:
        return float(self.energy[-1]) if len(self.energy) >= self.k else math.inf

    def offer(self, energies: np.ndarray, make_states) -> None:
        """``make_states(idx)`` builds the 0/1 rows of candidates ``idx`` (called only for survivors)."""
        thr = self.threshold
        idx = np.flatnonzero(energies <= thr) if math.isfinite(thr) else np.arange(energies.size)
        if idx.size == 0:
            return
        if idx.size > self.k:
            # keep every candidate tied with the k-th energy, so ties resolve lexicographically below
            kth = np.partition(energies[idx], self.k - 1)[self.k - 1]
            tied = idx[energies[idx] <= kth]
            if self.plateau_cap is None or tied.size <= max(self.plateau_cap, 10 * self.k):
                idx = tied
            else:  # a degenerate plateau: bound memory, ties then resolve arbitrarily
                idx = idx[np.argpartition(energies[idx], self.k - 1)[: self.k]]
        X_new = make_states(idx)
        e_new = energies[idx]
        if self.X is None:
            X_all, e_all = X_new, e_new
        else:
            X_all, e_all = np.concatenate([self.X, X_new]), np.concatenate([self.energy, e_new])
        # deterministic order: energy, then lexicographic state (so ties resolve the same every run)
        keys = 1 - X_all if self.complement else X_all
        order = np.lexsort(tuple(keys[:, ::-1].T) + (e_all,))[: self.k]
        self.X, self.energy = X_all[order], e_all[order]
