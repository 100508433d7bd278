"""The block-removal problem: minimise ``x^T H x + h^T x + c`` subject to ``sum(x) = M``.

``x_i = 1`` means "remove block i". The penalised model is
``x^T H x + h^T x + c + penalty * (sum(x) - M)^2``. The BQM conversions (BQM, Ising, CQM, qiskit
``QuadraticProgram``) are built directly from ``H`` with numpy, over the variables ``0 .. N-1`` in block
order, so they cost ``O(N^2)`` time and memory and never wait on a compiler (a PyQUBO compile of
``N = 5000`` blocks took minutes and ~7 GB and ignored Ctrl-C). The same model written in PyQUBO, with the
constraint as a :class:`pyqubo.Constraint` and the strength and ``M`` as :class:`pyqubo.Placeholder`\ s,
is available as :attr:`BlockRemovalProblem.compiled` (built on first use only; the tests check both
forms agree). Every conversion can be read back with :meth:`BlockRemovalProblem.decode`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import dimod
import numpy as np

from qblock.problems._states import (binary_program, binary_states, check_num_remove, quadratic_energies,
                                     save_npz)

__all__ = ["BlockRemovalProblem", "FORMAT_VERSION", "removal_key"]

FORMAT_VERSION = 1
_CONSTRAINT_LABEL = "remove_exactly_M"
_PENALTY = "penalty"
_NUM_REMOVE = "num_remove"


def removal_key(removed: Iterable[Any]) -> tuple[int, ...]:
    """The one key of a removal set wherever sets are cached or compared: its distinct blocks, ascending.

    Example:
        >>> removal_key([5, 2, np.int64(5)])
        (2, 5)
    """
    return tuple(sorted({int(i) for i in removed}))


def _as_real(value: Any, what: str) -> np.ndarray:
    """``value`` as a float64 array; complex, text and date values are errors, never coerced."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged nested lists
        raise ValueError(f"{what} must be a numeric array: {exc}") from None
    if arr.dtype.kind == "c":
        raise ValueError(f"{what} must be real, got complex values; take .real first if the imaginary part is noise")
    if arr.dtype.kind not in "biufO":
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    try:
        out = np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be numeric: {exc}") from None
    return out


def _as_matrix(H: Any) -> np.ndarray:
    arr = _as_real(H, "H")
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"H must be a square 2-D matrix, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("H must have at least one row (one block)")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"H must be finite; H[{bad[0]}, {bad[1]}] = {arr[bad[0], bad[1]]}")
    return arr


def _as_linear(linear: Any, n: int) -> np.ndarray:
    if linear is None:
        return np.zeros(n)
    lin = _as_real(linear, "linear")
    # exactly one entry per block: a (2, 3) or (1, N) array is a caller's mistake, not a vector
    if lin.ndim != 1:
        raise ValueError(f"linear must be a 1-D vector of length N = {n}, got shape {lin.shape}")
    if lin.size != n:
        raise ValueError(f"linear has {lin.size} entries but H has {n} rows; they must agree")
    if not np.all(np.isfinite(lin)):
        raise ValueError("linear must be finite")
    return lin.copy()


class BlockRemovalProblem:
    """Remove exactly ``num_remove`` of ``N`` blocks at the lowest energy.

    The energy of a removal vector ``x`` (``x_i = 1``: block ``i`` removed) is
    ``E(x) = x^T H x + linear^T x + offset``; as ``x_i^2 = x_i`` the diagonal of ``H`` acts linearly.

    Args:
        H: symmetric ``(N, N)`` matrix (e.g. the empirical Fisher ``A^T A / m``). Asymmetry within a
            relative tolerance of ``1e-8`` is averaged away; larger asymmetry is an error.
        num_remove: how many blocks to remove (``0 <= M <= N``); ``None`` leaves it to be chosen
            later with :meth:`with_num_remove`.
        linear: optional length-``N`` linear term ``h``.
        offset: constant added to every energy.
        labels: human names of the blocks (``"model.layers.7"``); default ``"0" .. "N-1"``.
        metadata: JSON-serialisable provenance (model id, energy model, data, ...).
        arrays: optional named numpy arrays saved with the problem (e.g. the gradient matrix ``A``).

    Raises:
        ValueError: with a message that says what is wrong with the input.

    Example:
        >>> import numpy as np
        >>> p = BlockRemovalProblem(np.array([[2.0, 1.0], [1.0, 3.0]]), num_remove=1)
        >>> p.energy([1, 0]), p.energy([0, 1]), p.energy([1, 1])
        (2.0, 3.0, 7.0)
        >>> p.is_feasible([1, 1])
        False
    """

    def __init__(
        self,
        H: Any,
        num_remove: int | None,
        linear: Any = None,
        offset: float = 0.0,
        labels: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        arrays: Mapping[str, np.ndarray] | None = None,
        *,
        symmetry_tol: float = 1e-8,
    ) -> None:
        H = _as_matrix(H)
        n = H.shape[0]
        scale = max(1.0, float(np.max(np.abs(H))))
        asym = float(np.max(np.abs(H - H.T)))
        if asym > symmetry_tol * scale:
            i, j = np.unravel_index(np.argmax(np.abs(H - H.T)), H.shape)
            raise ValueError(
                f"H must be symmetric: |H[{i},{j}] - H[{j},{i}]| = {asym:.3g} exceeds tolerance "
                f"{symmetry_tol * scale:.3g}"
            )
        self._H = (H + H.T) / 2.0
        self._H.setflags(write=False)

        self._linear = _as_linear(linear, n)
        self._linear.setflags(write=False)

        try:
            self._offset = float(offset)
        except (TypeError, ValueError):
            raise ValueError(f"offset must be a number, got {offset!r}") from None
        if not math.isfinite(self._offset):
            raise ValueError("offset must be finite")

        self._num_remove = None if num_remove is None else check_num_remove(num_remove, n)

        if labels is None:
            labels = [str(i) for i in range(n)]
        labels = [str(lab) for lab in labels]
        if len(labels) != n:
            raise ValueError(f"labels has {len(labels)} entries but H has {n} rows; they must agree")
        if len(set(labels)) != n:
            raise ValueError("labels must be distinct")
        self._labels = tuple(labels)

        self.metadata: dict[str, Any] = dict(metadata or {})
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None
        self.arrays: dict[str, np.ndarray] = {}
        for key, value in (arrays or {}).items():
            arr = np.asarray(value)
            if arr.dtype == object:
                raise ValueError(f"array {key!r} has dtype object; only numeric arrays can be saved")
            self.arrays[str(key)] = arr
        self._compiled = None  # the PyQUBO model, compiled on first use and shared by with_num_remove
        self._safe_penalty: float | None = None

    # ------------------------------------------------------------------ basic properties
    @property
    def H(self) -> np.ndarray:
        """The symmetric quadratic matrix (read-only)."""
        return self._H

    @property
    def linear(self) -> np.ndarray:
        """The linear term (zeros when none was given; read-only)."""
        return self._linear

    @property
    def offset(self) -> float:
        return self._offset

    @property
    def num_blocks(self) -> int:
        """N, the number of binary variables."""
        return self._H.shape[0]

    @property
    def num_remove(self) -> int | None:
        """M, how many blocks must be removed."""
        return self._num_remove

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    @property
    def variables(self) -> range:
        """Variables are the block indices ``0 .. N-1``."""
        return range(self.num_blocks)

    @property
    def num_states(self) -> int:
        """C(N, M): how many feasible states there are."""
        return math.comb(self.num_blocks, self._require_m())

    @property
    def is_psd(self) -> bool:
        """True if ``H`` is positive semi-definite (within a relative tolerance of 1e-10)."""
        ev = np.linalg.eigvalsh(self._H)
        return bool(ev[0] >= -1e-10 * max(1.0, float(np.abs(ev).max())))

    #: the problem kind (see :attr:`qblock.backends.BackendSpec.problems`)
    kind = "block_removal"

    @property
    def num_variables(self) -> int:
        """N, the same as :attr:`num_blocks` (the name every problem kind shares)."""
        return self.num_blocks

    def feasible_mask(self, X: Any) -> np.ndarray:
        """Whether each row of ``X`` removes exactly ``M`` blocks."""
        return np.asarray(X).reshape(-1, self.num_blocks).sum(axis=1) == self._require_m()

    def repair_states(self, X: np.ndarray) -> np.ndarray:
        """Rows made feasible by greedy add / drop (:func:`qblock.backends.local_search.repair`)."""
        from qblock.backends.local_search import repair

        return repair(self._H, self._linear, X, self._require_m())

    def polish_states(self, X: np.ndarray) -> np.ndarray:
        """Rows taken to 1-in/1-out swap minima (:func:`qblock.backends.local_search.swap_descent`)."""
        from qblock.backends.local_search import swap_descent

        return swap_descent(self._H, self._linear, X)[0]

    def topk_neighbours(self, X: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` best of a pool grown from ``X`` until closed under swaps (:func:`~qblock.backends.local_search.topk_closure`)."""
        from qblock.backends.local_search import topk_closure

        return topk_closure(self._H, self._linear, X, k)

    def _require_m(self) -> int:
        if self._num_remove is None:
            raise ValueError("num_remove is not set; use problem.with_num_remove(M) (CLI: --remove M)")
        return self._num_remove

    def with_num_remove(self, num_remove: int) -> "BlockRemovalProblem":
        """The same energy (the same ``H``, no copy) with a different number of blocks to remove."""
        p = BlockRemovalProblem.__new__(BlockRemovalProblem)
        p.__dict__.update(self.__dict__)
        p.metadata = dict(self.metadata)
        p._safe_penalty = None
        p._num_remove = check_num_remove(num_remove, self.num_blocks)
        return p

    def __repr__(self) -> str:
        return (
            f"BlockRemovalProblem(N={self.num_blocks}, M={self._num_remove}, "
            f"linear={'yes' if np.any(self._linear) else 'no'}, energy={self.metadata.get('energy', '?')!r})"
        )

    # ------------------------------------------------------------------ energies
    def _as_states(self, X: Any) -> np.ndarray:
        return binary_states(X, self.num_blocks)

    def energies(self, X: Any) -> np.ndarray:
        """Objective (no penalty) of each row of ``X`` (shape ``(k, N)``), vectorised."""
        Xf = self._as_states(X)
        return quadratic_energies(Xf, self._H, self._linear, self._offset)

    def energy(self, x: Any) -> float:
        """Objective (no penalty) of one removal vector ``x``."""
        return float(self.energies(x)[0])

    def energy_of(self, removed: Iterable[int]) -> float:
        """Objective of removing the blocks with these indices."""
        return self.energy(self.state_from_removed(removed))

    def state_from_removed(self, removed: Iterable[int]) -> np.ndarray:
        """0/1 vector with ones at ``removed``."""
        x = np.zeros(self.num_blocks, dtype=np.int8)
        idx = [int(i) for i in removed]
        for i in idx:
            if not 0 <= i < self.num_blocks:
                raise ValueError(f"block index {i} out of range 0..{self.num_blocks - 1}")
        x[idx] = 1
        return x

    def is_feasible(self, x: Any) -> bool:
        """True if exactly ``num_remove`` blocks are removed."""
        return bool(self._as_states(x)[0].sum() == self._require_m())

    # ------------------------------------------------------------------ the PyQUBO model
    @property
    def compiled(self):
        """The same model in PyQUBO: objective + penalty * Constraint((sum x - M)^2), compiled on first use.

        Both the penalty strength and ``M`` are PyQUBO ``Placeholder``\\ s, so the model is built and
        compiled once per ``H`` and reused for every ``M`` and every penalty strength. The solvers do
        not use it (:meth:`to_bqm` builds the same BQM with numpy); it is here for PyQUBO users and
        costs ``O(N^2)`` Python objects, so avoid it for thousands of blocks.
        """
        if self._compiled is None:
            from pyqubo import Binary, Constraint, Placeholder

            n = self.num_blocks
            x = [Binary(f"x[{i}]") for i in range(n)]
            H, lin = self._H, self._linear
            objective = 0.0
            for i in range(n):
                d = float(H[i, i] + lin[i])
                if d != 0.0:
                    objective += d * x[i]
                for j in range(i + 1, n):
                    if H[i, j] != 0.0:
                        objective += float(2.0 * H[i, j]) * x[i] * x[j]
            total = sum(x[1:], x[0])
            cardinality = Constraint((total - Placeholder(_NUM_REMOVE)) ** 2, label=_CONSTRAINT_LABEL)
            self._compiled = (objective + Placeholder(_PENALTY) * cardinality).compile()
            # share with problems derived by with_num_remove()
        return self._compiled

    def _feed(self, penalty: float) -> dict[str, float]:
        return {_PENALTY: float(penalty), _NUM_REMOVE: float(self._require_m())}

    def safe_penalty(self) -> float:
        """A penalty strength that provably puts every infeasible state above the feasible optimum.

        Bound: let ``U`` be the energy of any feasible state (a greedy one with 1-swap descent) and
        ``L`` a lower bound of ``E`` over *all* binary states:
        ``L = c + sum_i min(0, H_ii + h_i) + sum_{i<j} min(0, 2 H_ij)`` (and ``L = c`` if ``H`` is PSD
        with no linear term, since then ``E >= c``). An infeasible state has ``(sum x - M)^2 >= 1``,
        so its penalised energy is at least ``L + lambda``. With ``lambda = (U - L) * (1 + 1e-6) + 1e-9``
        that is above ``U >= E*``, the feasible optimum, and also above ``E*`` plus the gap to every
        feasible state below ``U``.
        """
        if self._safe_penalty is None:
            from qblock.backends.local_search import greedy_state, swap_descent

            m = self._require_m()
            x0 = greedy_state(self._H, self._linear, m)
            x0, _ = swap_descent(self._H, self._linear, x0[None, :])
            upper = float(self.energies(x0)[0])
            d = np.diag(self._H) + self._linear
            off = 2.0 * np.triu(self._H, 1)
            lower = self._offset + float(np.minimum(d, 0).sum() + np.minimum(off, 0).sum())
            if not np.any(self._linear) and self.is_psd:
                lower = max(lower, self._offset)
            gap = max(upper - lower, 0.0)
            self._safe_penalty = gap * (1.0 + 1e-6) + 1e-9 * max(1.0, abs(upper)) + 1e-12
        return self._safe_penalty

    # ------------------------------------------------------------------ conversions
    def objective_bqm(self) -> dimod.BinaryQuadraticModel:
        """The unpenalised objective as a BQM over the integer variables ``0 .. N-1`` (block order)."""
        return self.to_bqm(penalty=0.0)

    def objective_matrices(self) -> tuple[np.ndarray, np.ndarray, float, list[int]]:
        """The unpenalised objective as ``(H0, d, offset, variables)``: ``E(x) = x^T H0 x + d^T x + offset``
        with ``H0`` symmetric with a zero diagonal and ``d = diag(H) + h``.

        Exactly what :func:`qblock.backends.exact.bqm_to_matrices` reads back from :meth:`objective_bqm`
        (the same floats), without building the BQM: the constrained backends' direct input.

        Example:
            >>> import numpy as np
            >>> from qblock.backends.exact import bqm_to_matrices
            >>> p = BlockRemovalProblem(np.array([[1.0, 0.5], [0.5, 2.0]]), 1, linear=[0.1, 0.0])
            >>> H0, d, c, v = p.objective_matrices()
            >>> H1, d1, c1, v1 = bqm_to_matrices(p.objective_bqm())
            >>> bool((H0 == H1).all() and (d == d1).all()), c == c1, v == v1
            (True, True, True)
        """
        upper = np.triu(self._H, 1)  # the BQM keeps the upper triangle: the same couplings
        return upper + upper.T, np.diag(self._H) + self._linear, float(self._offset), list(range(self.num_blocks))

    def to_bqm(self, penalty: float | None = None) -> dimod.BinaryQuadraticModel:
        """Penalised QUBO as a :class:`dimod.BinaryQuadraticModel` over variables ``0 .. N-1``.

        The BQM is ``x^T H x + h^T x + c + penalty * (sum(x) - M)^2`` expanded with ``x_i^2 = x_i``:
        linear biases ``H_ii + h_i + penalty * (1 - 2M)``, couplings ``2 H_ij + 2 penalty`` (``i < j``) and
        offset ``c + penalty * M^2``. It is built from ``H`` with numpy (``O(N^2)``, no compiler), and
        its variables are in block order, so samplers that break ties by variable order break them
        by block order.

        Args:
            penalty: strength of the cardinality penalty; default :meth:`safe_penalty`; ``0`` gives
                the objective alone (``M`` need not be set then).

        Example:
            >>> import numpy as np
            >>> p = BlockRemovalProblem(np.eye(3), num_remove=1)
            >>> bqm = p.to_bqm()
            >>> list(bqm.variables)
            [0, 1, 2]
            >>> bool(abs(bqm.energy({0: 1, 1: 0, 2: 0}) - p.energy([1, 0, 0])) < 1e-9)
            True
        """
        if penalty is None:
            penalty = self.safe_penalty()
        try:
            lam = float(penalty)
        except (TypeError, ValueError):
            raise ValueError(f"penalty must be a finite non-negative number, got {penalty!r}") from None
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"penalty must be a finite non-negative number, got {penalty!r}")
        n = self.num_blocks
        linear = np.diag(self._H) + self._linear
        couplings = np.triu(2.0 * self._H, 1)
        offset = self._offset
        if lam:
            m = self._require_m()
            linear = linear + lam * (1.0 - 2.0 * m)
            couplings = couplings + np.triu(np.full((n, n), 2.0 * lam), 1)
            offset += lam * m * m
        return dimod.BinaryQuadraticModel(linear, couplings, offset, dimod.BINARY)

    def to_qubo(self, penalty: float | None = None) -> tuple[dict[tuple[int, int], float], float]:
        """``(Q, offset)`` dictionaries of the penalised QUBO."""
        return self.to_bqm(penalty).to_qubo()

    def to_ising(self, penalty: float | None = None) -> tuple[dict[int, float], dict[tuple[int, int], float], float]:
        """``(h, J, offset)`` of the penalised problem in spin form, dimod convention ``x = (1 + s) / 2``."""
        return self.to_bqm(penalty).to_ising()

    def to_cqm(self) -> dimod.ConstrainedQuadraticModel:
        """A :class:`dimod.ConstrainedQuadraticModel` with the equality ``sum(x) == M`` (label ``remove_exactly_M``)."""
        m = self._require_m()
        cqm = dimod.ConstrainedQuadraticModel()
        cqm.set_objective(self.objective_bqm())
        cqm.add_constraint_from_iterable(
            [(i, 1.0) for i in range(self.num_blocks)], "==", rhs=float(m), label=_CONSTRAINT_LABEL
        )
        return cqm

    def to_quadratic_program(self, name: str = "block_removal"):
        """A qiskit-optimization ``QuadraticProgram``: binaries ``x0..x{N-1}``, the objective read
        from the unpenalised BQM (:meth:`objective_bqm`), and the linear equality ``sum x == M``."""
        qp = binary_program(self, name, "x")
        m = self._require_m()
        qp.linear_constraint({f"x{i}": 1 for i in range(self.num_blocks)}, "==", m, name=_CONSTRAINT_LABEL)
        return qp

    def to_networkx(self):
        """Block interaction graph: nodes carry the single-block cost ``H_ii + h_i`` and the label,
        edges the couplings ``2 H_ij``."""
        from qblock._lazy import require

        nx = require("networkx", "viz")
        g = nx.Graph()
        for i in range(self.num_blocks):
            g.add_node(i, label=self._labels[i], cost=float(self._H[i, i] + self._linear[i]))
        for i in range(self.num_blocks):
            for j in range(i + 1, self.num_blocks):
                if self._H[i, j] != 0.0:
                    g.add_edge(i, j, weight=float(2.0 * self._H[i, j]))
        return g

    # ------------------------------------------------------------------ reading results back
    def states_from_sampleset(self, sampleset: dimod.SampleSet) -> np.ndarray:
        """Rows of 0/1 removal vectors from a sampleset of any conversion (BQM, Ising, CQM, qiskit names).

        Raises:
            TypeError: ``sampleset`` is not a :class:`dimod.SampleSet`.
            ValueError: its variables are not exactly this problem's ``N`` block variables.
        """
        if not isinstance(sampleset, dimod.SampleSet):
            raise TypeError(
                f"expected a dimod.SampleSet, got {type(sampleset).__name__} "
                "(for 0/1 rows use sampleset_from_states)"
            )
        if sampleset.vartype is dimod.SPIN:
            sampleset = sampleset.change_vartype(dimod.BINARY)
        names = list(sampleset.variables)
        cols = [self._variable_index(v) for v in names]
        n = self.num_blocks
        if sorted(cols) != list(range(n)):
            extra = [v for v, c in zip(names, cols) if not 0 <= c < n]
            missing = sorted(set(range(n)) - set(cols))
            twice = sorted({c for c in cols if cols.count(c) > 1})
            found = [f"{what} {vals[:10]}" for what, vals in
                     (("extra", extra), ("missing", missing), ("given twice", twice)) if vals]
            raise ValueError(f"sampleset must hold exactly the N = {n} block variables 0..{n - 1}; {', '.join(found)}")
        raw = sampleset.record.sample
        X = np.zeros((raw.shape[0], self.num_blocks), dtype=np.int8)
        X[:, cols] = raw
        return X

    def _variable_index(self, v: Any) -> int:
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            return int(v)
        s = str(v)
        for prefix, suffix in (("x[", "]"), ("x", "")):
            if s.startswith(prefix) and s.endswith(suffix):
                core = s[len(prefix) : len(s) - len(suffix)] if suffix else s[len(prefix) :]
                if core.isdigit():
                    return int(core)
        if s in self._labels:
            return self._labels.index(s)
        raise ValueError(
            f"unknown variable {v!r} in sampleset (expected a block index, 'x[i]', 'xi' or a block label)"
        )

    def sampleset_from_states(self, X: Any, info: Mapping[str, Any] | None = None, **vectors) -> dimod.SampleSet:
        """Feasible, distinct states of ``X`` as a SampleSet sorted by objective energy (penalty removed).

        ``num_occurrences`` counts how often each distinct state appeared.
        """
        X = np.asarray(X, dtype=np.int8).reshape(-1, self.num_blocks)
        m = self._require_m()
        X = X[X.sum(axis=1) == m]
        if X.shape[0]:
            uniq, counts = np.unique(X, axis=0, return_counts=True)
            e = self.energies(uniq)
            order = np.lexsort((np.arange(len(e)), e))
            uniq, counts, e = uniq[order], counts[order], e[order]
        else:
            uniq = np.zeros((0, self.num_blocks), dtype=np.int8)
            counts = np.zeros(0, dtype=int)
            e = np.zeros(0)
        return dimod.SampleSet.from_samples(
            (uniq, list(range(self.num_blocks))),
            vartype=dimod.BINARY,
            energy=e,
            num_occurrences=counts,
            info=dict(info or {}),
            sort_labels=False,
            **vectors,
        )

    def decode(self, sampleset: dimod.SampleSet, info: Mapping[str, Any] | None = None) -> dimod.SampleSet:
        """Interpret a sampleset from any conversion: keep feasible states, de-duplicate, sort by the
        unpenalised objective.

        Example:
            >>> import dimod, numpy as np
            >>> p = BlockRemovalProblem(np.diag([3.0, 1.0, 2.0]), num_remove=1)
            >>> ss = dimod.ExactSolver().sample(p.to_bqm())
            >>> p.removed_blocks(p.decode(ss).first.sample)
            [1]
        """
        X = self.states_from_sampleset(sampleset)
        occ = np.asarray(sampleset.record.num_occurrences)
        X = np.repeat(X, occ, axis=0)
        merged = dict(sampleset.info)
        merged.update(info or {})
        return self.sampleset_from_states(X, info=merged)

    def removed_blocks(self, x: Any) -> list[int]:
        """Indices of the removed blocks of a state (dict sample or 0/1 vector)."""
        if isinstance(x, Mapping):
            return sorted(self._variable_index(k) for k, v in x.items() if v)
        return [int(i) for i in np.flatnonzero(np.asarray(x))]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Save to ``.npz`` (arrays) with JSON metadata; never pickle. The write is atomic.

        Example:
            >>> import numpy as np, tempfile, os
            >>> p = BlockRemovalProblem(np.eye(3), 1, labels=["a", "b", "c"], metadata={"model": "toy"})
            >>> f = os.path.join(tempfile.mkdtemp(), "p.npz")
            >>> q = BlockRemovalProblem.load(p.save(f))
            >>> q.labels, q.metadata["model"], bool((q.H == p.H).all())
            (('a', 'b', 'c'), 'toy', True)
        """
        header = {
            "format": "qblock.BlockRemovalProblem",
            "format_version": FORMAT_VERSION,
            "num_remove": self._num_remove,
            "offset": self._offset,
            "labels": list(self._labels),
            "metadata": self.metadata,
            "arrays": sorted(self.arrays),
        }
        payload = {"H": self._H, "linear": self._linear, "header": np.array(json.dumps(header))}
        for key, arr in self.arrays.items():
            payload[f"array__{key}"] = arr
        return save_npz(path, payload)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BlockRemovalProblem":
        """Load a problem written by :meth:`save`; never unpickles.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: ``path`` is not a valid problem file; the message names the file and what is
                wrong (truncated, not an archive, a bad header, an invalid matrix, ...).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"problem file not found: {path}")
        try:
            data = _read_npz(path)
            header = _parse_header(data)
            arrays = {k[len("array__") :]: v for k, v in data.items() if k.startswith("array__")}
            return cls(
                data["H"],
                header["num_remove"],
                linear=data["linear"],
                offset=header["offset"],
                labels=header["labels"],
                metadata=header["metadata"],
                arrays=arrays,
            )
        except _OtherKind as exc:
            raise ValueError(f"{path} {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{path} is not a qblock problem file ({exc})") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (matrices as nested lists)."""
        return {
            "H": self._H.tolist(),
            "linear": self._linear.tolist(),
            "offset": self._offset,
            "num_remove": self._num_remove,
            "labels": list(self._labels),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BlockRemovalProblem":
        return cls(d["H"], d.get("num_remove"), d.get("linear"), d.get("offset", 0.0), d.get("labels"), d.get("metadata"))


# ---------------------------------------------------------------------------------- reading files
class _OtherKind(ValueError):
    """A valid qblock problem file of another kind than the one asked for."""


#: deflate never expands more than ~1032:1, so a member claiming more data than that is corrupt
_MAX_DEFLATE_RATIO = 1100
#: what a problem file's archive can hold: the header, H, linear and the optional named arrays
_REQUIRED = ("header", "H", "linear")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The ``.npy`` members of the archive at ``path``, read with ``allow_pickle=False``.

    Every failure is a ``ValueError`` saying why: an empty, truncated or corrupt file raises a zoo
    of types inside ``zipfile``/``zlib``/numpy, and no declared size is trusted before it is checked
    against the bytes that are really there (so a crafted header cannot make us allocate gigabytes).
    """
    disk = path.stat().st_size
    if path.is_dir():
        raise ValueError("it is a folder")
    if not path.is_file():
        raise ValueError("not a regular file")  # a device or pipe: reading it could block forever
    if disk == 0:
        raise ValueError("the file is empty")
    try:
        with zipfile.ZipFile(path) as zf:
            data = {info.filename[:-4]: _read_member(zf, info, disk)
                    for info in zf.infolist() if info.filename.endswith(".npy")}
    except PermissionError:
        raise  # an access problem, not a bad file: the caller reports it with the path
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, struct.error,
            UnicodeDecodeError, OverflowError) as exc:
        raise ValueError(f"truncated or not a .npz archive: {exc}") from None
    except (tokenize.TokenError, SyntaxError, RecursionError) as exc:
        # numpy parses a damaged .npy header with tokenize/ast and lets their errors through
        raise ValueError(f"a damaged .npy header: {exc}") from None
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f"no {', '.join(missing)} in the archive")
    return data


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, disk_size: int) -> np.ndarray:
    name = info.filename
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ValueError(f"member {name} uses an unsupported compression")
    room = min(info.compress_size, disk_size)
    if info.compress_type == zipfile.ZIP_DEFLATED:
        room *= _MAX_DEFLATE_RATIO
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"member {name} has unsupported .npy version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(fh)
        if dtype.hasobject:
            raise ValueError(f"member {name} holds Python objects; problem files never contain pickles")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > min(info.file_size, room):
            raise ValueError(f"member {name} declares shape {shape} but the file is too short for it")
    with zf.open(info) as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)


def _parse_header(data: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The JSON header, checked field by field (every failure a ``ValueError``)."""
    raw = data["header"]
    if raw.shape != () or raw.dtype.kind != "U":
        raise ValueError(f"the header must be one JSON string, got a {raw.dtype} array of shape {raw.shape}")
    try:
        header = json.loads(str(raw[()]))
    except RecursionError:
        raise ValueError("the header is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"the header must be a JSON object, got {type(header).__name__}")
    if header.get("format") == "qblock.RankSelectionProblem":  # a qblock file, of the other kind
        raise _OtherKind("is a rank-selection problem, not a block-removal one "
                         "(qblock solve and qblock.load_problem take either kind)")
    if header.get("format") != "qblock.BlockRemovalProblem":
        raise ValueError(f"format={header.get('format')!r}")
    version = header.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"written by a newer qblock (format {version}); upgrade qblock")
    out = {"num_remove": header.get("num_remove"), "offset": header.get("offset", 0.0),
           "labels": header.get("labels"), "metadata": header.get("metadata")}
    if out["labels"] is not None and not (
        isinstance(out["labels"], list) and all(isinstance(lab, (str, int)) for lab in out["labels"])
    ):
        raise ValueError("labels must be a list of strings")
    if out["metadata"] is not None and not isinstance(out["metadata"], dict):
        raise ValueError(f"metadata must be a JSON object, got {type(out['metadata']).__name__}")
    if isinstance(out["offset"], bool) or not isinstance(out["offset"], (int, float)):
        raise ValueError(f"offset must be a number, got {out['offset']!r}")
    return out
