"""Global SVD rank selection as a knapsack QUBO: keep singular-value groups under a parameter budget.

Every linear weight ``W_l`` (``m_l x n_l``) of the model is written as ``U diag(s) V^T`` and its
singular values are cut into groups of ``c`` consecutive values. Binary variable ``y_(l,k) = 1``
keeps group ``k`` of matrix ``l``. The energy is a quadratic form in ``y``,
``E(y) = y^T H y + linear^T y + offset``, and the constraint is a knapsack: the kept parameters,
``sum_i cost_i y_i``, may not exceed ``budget``; with the *prefix rule* (default) group ``k`` is
kept only if group ``k - 1`` is, so a matrix keeps its leading singular values.

Parameter costs are counted as the PivGa gauge-fixed factors store them: a rank-``r`` factor pair of an
``m x n`` matrix stores ``r (m + n) - r^2`` numbers (see :mod:`qblock.svd`), so raising the rank from
``r - 1`` to ``r`` costs ``m + n - 2 r + 1`` and the group holding ranks ``a+1 .. b`` costs the sum
of those (:func:`group_costs`). Under the prefix rule the costs of a state add up to its stored
parameters exactly. (Without the rule a state's real storage is that of its rank count, which can be
more than the sum; :meth:`RankSelectionProblem.stored_parameters` gives it.)

The conversions mirror :class:`~qblock.problems.BlockRemovalProblem`'s:

* :meth:`~RankSelectionProblem.to_cqm` and :meth:`~RankSelectionProblem.to_quadratic_program`: the
  objective with the native inequality ``sum cost_i y_i <= budget`` (label ``budget``) and, with the
  prefix rule, ``y_(l,k) - y_(l,k-1) <= 0`` (labels ``prefix[i]``);
* :meth:`~RankSelectionProblem.to_bqm` (and ``to_qubo``/``to_ising``): the objective plus
  ``penalty * ((sum q_i y_i + sum w_j s_j - B')^2 + sum y_(l,k) (1 - y_(l,k-1)))`` with binary slack
  variables (labels ``N, N+1, ...``; ``slack[j]`` in PyQUBO) whose weights ``w_j`` represent every integer ``0 .. B'`` exactly; ``q``
  and ``B'`` are the costs and the budget in units of ``unit`` (costs rounded up, the budget down,
  so a state feasible in units is feasible in parameters);
* :attr:`~RankSelectionProblem.compiled`: the same penalised model written in PyQUBO, with the penalty
  strength a ``Placeholder``.

Every conversion is read back by :meth:`~RankSelectionProblem.decode` (slack variables dropped,
infeasible states dropped, sorted by the objective). Files are ``.npz`` + a JSON header, never pickle;
:func:`load_problem` reads either problem kind.

Example:
    >>> import numpy as np
    >>> p = RankSelectionProblem(np.zeros((3, 3)), linear=[-3.0, -2.0, -1.0], costs=[4, 3, 2], budget=7,
    ...                          matrix=[0, 0, 0], position=[0, 1, 2])
    >>> p.energy([1, 1, 0]), p.is_feasible([1, 1, 0]), p.is_feasible([1, 0, 1])
    (-5.0, True, False)
"""

from __future__ import annotations

import json
import math
import os
from functools import reduce
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import dimod
import numpy as np

from qblock.problems._states import binary_program, binary_states, quadratic_energies, save_npz
from qblock.problems.block_removal import BlockRemovalProblem, _as_real, _read_npz

__all__ = ["RankSelectionProblem", "group_costs", "load_problem", "KIND", "FORMAT_VERSION"]

#: the problem kind, what :class:`qblock.backends.BackendSpec.problems` lists
KIND = "rank_selection"
FORMAT_VERSION = 1
_BUDGET = "budget"
_PENALTY = "penalty"
#: largest budget in units the penalised BQM uses before it coarsens the unit (see ``to_bqm``)
MAX_BQM_LEVELS = 2**16


def group_costs(m: int, n: int, group_size: int, rank: int | None = None) -> list[int]:
    """PivGa storage cost of each singular-value group of an ``m x n`` matrix.

    Keeping the first ``r`` singular values stores ``r (m + n) - r^2`` numbers; group ``k`` covers
    ranks ``k c + 1 .. min((k + 1) c, rank)`` and costs the difference of that count at its ends.

    Example:
        >>> group_costs(4, 3, 2)          # ranks 1-2: 2*7-4 = 10; rank 3: 3*7-9 - 10 = 2
        [10, 2]
        >>> sum(group_costs(6, 5, 2)) == 5 * 11 - 25
        True
    """
    rank = min(m, n) if rank is None else int(rank)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")

    def stored(r: int) -> int:
        return r * (m + n) - r * r

    ends = list(range(group_size, rank, group_size)) + [rank]
    out, prev = [], 0
    for e in ends:
        out.append(stored(e) - stored(prev))
        prev = e
    return out


def _as_int_vector(value: Any, n: int, what: str, low: int) -> np.ndarray:
    arr = _as_real(value, what)
    if arr.ndim != 1 or arr.size != n:
        raise ValueError(f"{what} must be a 1-D vector of length {n}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise ValueError(f"{what} must hold whole numbers")
    if arr.size and arr.min() < low:
        raise ValueError(f"{what} must be >= {low}, got {arr.min():g}")
    return arr.astype(np.int64)


class RankSelectionProblem:
    """Keep singular-value groups (``y_i = 1``) at the lowest energy within a parameter budget.

    Args:
        H: symmetric ``(N, N)`` quadratic term (``None``: zeros, a linear objective).
        linear: length-``N`` linear term.
        costs: positive integer cost of each variable (stored parameters, :func:`group_costs`).
        budget: the largest total cost allowed (``sum costs * y <= budget``).
        matrix: for each variable the index of its weight matrix (``0 .. L-1``).
        position: for each variable its group index within the matrix (``0, 1, ...`` for each matrix).
        prefix: keep group ``k`` only if group ``k - 1`` is kept.
        offset: constant added to every energy.
        labels: variable names (default ``"l{matrix}.g{position}"``).
        matrix_names: names of the ``L`` matrices (``"model.layers.0.self_attn.q_proj"``).
        metadata: JSON-serialisable provenance.
        arrays: named numeric arrays saved with the problem (e.g. the gate gradients ``A``).

    Raises:
        ValueError: with a message that says what is wrong with the input.

    Example:
        >>> import numpy as np
        >>> p = RankSelectionProblem(np.diag([0.0, 0.0, 0.0]), linear=[-1.0, -0.5, -2.0], costs=[2, 1, 2],
        ...                          budget=3, matrix=[0, 0, 1], position=[0, 1, 0])
        >>> p.num_variables, p.num_matrices, p.ranks_of([1, 0, 1])
        (3, 2, [1, 1])
    """

    kind = KIND

    def __init__(self, H: Any, linear: Any, costs: Any, budget: int, matrix: Any, position: Any, *,
                 prefix: bool = True, offset: float = 0.0, labels: Sequence[str] | None = None,
                 matrix_names: Sequence[str] | None = None, metadata: Mapping[str, Any] | None = None,
                 arrays: Mapping[str, np.ndarray] | None = None) -> None:
        lin = _as_real(linear, "linear")
        if lin.ndim != 1 or lin.size == 0:
            raise ValueError(f"linear must be a non-empty 1-D vector, got shape {lin.shape}")
        n = lin.size
        if H is None:
            H = np.zeros((n, n))
        # the block problem's checks of H (square, finite, symmetric) and of the linear term
        base = BlockRemovalProblem(H, None, linear=lin)
        if base.num_blocks != n:
            raise ValueError(f"H has {base.num_blocks} rows but linear has {n} entries; they must agree")
        self._H, self._linear = base.H, base.linear
        self._costs = _as_int_vector(costs, n, "costs", 1)
        self._matrix = _as_int_vector(matrix, n, "matrix", 0)
        self._position = _as_int_vector(position, n, "position", 0)
        for arr in (self._costs, self._matrix, self._position):
            arr.setflags(write=False)
        if isinstance(budget, bool) or not float(budget).is_integer() or budget < 0:
            raise ValueError(f"budget must be a whole number >= 0, got {budget!r}")
        self._budget = int(budget)
        self._prefix = bool(prefix)
        self._offset = float(offset)
        if not math.isfinite(self._offset):
            raise ValueError("offset must be finite")
        self._layout()
        self._labels = tuple(str(x) for x in labels) if labels is not None else tuple(
            f"l{l}.g{k}" for l, k in zip(self._matrix, self._position))
        if len(self._labels) != n or len(set(self._labels)) != n:
            raise ValueError(f"labels must be {n} distinct names")
        L = self.num_matrices
        self.matrix_names = tuple(str(x) for x in matrix_names) if matrix_names is not None else tuple(
            str(i) for i in range(L))
        if len(self.matrix_names) != L:
            raise ValueError(f"matrix_names has {len(self.matrix_names)} entries but there are {L} matrices")
        self.metadata: dict[str, Any] = dict(metadata or {})
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None
        self.arrays = {str(k): np.asarray(v) for k, v in (arrays or {}).items()}
        if any(a.dtype == object for a in self.arrays.values()):
            raise ValueError("arrays must be numeric; only numeric arrays can be saved")
        self._safe_penalty: float | None = None
        self._compiled = None

    def _layout(self) -> None:
        """Check that each matrix's groups are numbered ``0 .. G-1``; index the prefix pairs."""
        mats = np.unique(self._matrix)
        if mats.size and not np.array_equal(mats, np.arange(mats.size)):
            raise ValueError("matrix indices must be 0 .. L-1 with every matrix present")
        self._index = {}
        for i, (l, k) in enumerate(zip(self._matrix.tolist(), self._position.tolist())):
            if (l, k) in self._index:
                raise ValueError(f"matrix {l} has group {k} twice")
            self._index[(l, k)] = i
        counts = np.bincount(self._matrix, minlength=mats.size)
        for l in range(mats.size):
            if any((l, k) not in self._index for k in range(counts[l])):
                raise ValueError(f"the groups of matrix {l} must be numbered 0 .. {counts[l] - 1}")
        self._groups = [np.array([self._index[(l, k)] for k in range(counts[l])], dtype=np.int64)
                        for l in range(mats.size)]
        pairs = [(self._index[(l, k)], self._index[(l, k - 1)]) for l in range(mats.size)
                 for k in range(1, counts[l])] if self._prefix else []
        self._pairs = np.array(pairs, dtype=np.int64).reshape(-1, 2)  # (later, earlier)

    # ------------------------------------------------------------------ properties
    H = property(lambda self: self._H, doc="The symmetric quadratic term (read-only).")
    linear = property(lambda self: self._linear, doc="The linear term (read-only).")
    offset = property(lambda self: self._offset)
    costs = property(lambda self: self._costs, doc="Integer cost of each variable (read-only).")
    budget = property(lambda self: self._budget, doc="The largest total cost allowed.")
    prefix = property(lambda self: self._prefix, doc="Whether the prefix rule holds.")
    matrix = property(lambda self: self._matrix, doc="The matrix index of each variable.")
    position = property(lambda self: self._position, doc="The group index of each variable in its matrix.")
    labels = property(lambda self: self._labels)
    groups = property(lambda self: self._groups, doc="For each matrix, its variables in group order.")
    prefix_pairs = property(lambda self: self._pairs, doc="``(later, earlier)`` variable pairs of the prefix rule.")

    @property
    def num_variables(self) -> int:
        return self._linear.size

    num_blocks = num_variables  # the name the shared size checks read

    @property
    def num_matrices(self) -> int:
        return len(self._groups)

    @property
    def num_states(self) -> int:
        """An upper bound of the number of feasible states (the top-k is capped to it)."""
        if self._prefix:
            return math.prod(len(g) + 1 for g in self._groups)
        return 2 ** self.num_variables

    def __repr__(self) -> str:
        return (f"RankSelectionProblem(N={self.num_variables}, matrices={self.num_matrices}, "
                f"budget={self._budget}, prefix={self._prefix}, energy={self.metadata.get('energy', '?')!r})")

    def with_budget(self, budget: int) -> "RankSelectionProblem":
        """The same energy and layout with another budget."""
        p = RankSelectionProblem.__new__(RankSelectionProblem)
        p.__dict__.update(self.__dict__)
        p.metadata = dict(self.metadata)
        if isinstance(budget, bool) or not float(budget).is_integer() or budget < 0:
            raise ValueError(f"budget must be a whole number >= 0, got {budget!r}")
        p._budget, p._safe_penalty, p._compiled = int(budget), None, None
        return p

    # ------------------------------------------------------------------ energies and feasibility
    def _as_states(self, X: Any) -> np.ndarray:
        return binary_states(X, self.num_variables)

    def energies(self, X: Any) -> np.ndarray:
        """Objective (no penalty) of each row of ``X``, vectorised."""
        Xf = self._as_states(X)
        return quadratic_energies(Xf, self._H, self._linear, self._offset)

    def energy(self, y: Any) -> float:
        return float(self.energies(y)[0])

    def total_costs(self, X: Any) -> np.ndarray:
        """``sum cost_i y_i`` of each row (exact integers)."""
        return np.asarray(X, dtype=np.int64).reshape(-1, self.num_variables) @ self._costs

    def feasible_mask(self, X: Any) -> np.ndarray:
        """Whether each row keeps the budget (and the prefix rule)."""
        X = np.asarray(X).reshape(-1, self.num_variables)
        ok = self.total_costs(X) <= self._budget
        if self._prefix and self._pairs.size:
            ok &= ~np.any((X[:, self._pairs[:, 0]] == 1) & (X[:, self._pairs[:, 1]] == 0), axis=1)
        return ok

    def is_feasible(self, y: Any) -> bool:
        return bool(self.feasible_mask(self._as_states(y).astype(np.int8))[0])

    def ranks_of(self, y: Any) -> list[int]:
        """How many groups each matrix keeps."""
        y = np.asarray(y).reshape(-1)
        return [int(y[g].sum()) for g in self._groups]

    def state_from_ranks(self, ranks: Sequence[int]) -> np.ndarray:
        """The prefix state keeping the first ``ranks[l]`` groups of matrix ``l``."""
        if len(ranks) != self.num_matrices:
            raise ValueError(f"ranks must have {self.num_matrices} entries")
        y = np.zeros(self.num_variables, dtype=np.int8)
        for g, r in zip(self._groups, ranks):
            if not 0 <= int(r) <= len(g):
                raise ValueError(f"a rank of {r} groups is outside 0 .. {len(g)}")
            y[g[: int(r)]] = 1
        return y

    def stored_parameters(self, y: Any, shapes: Sequence[tuple[int, int]], group_size: int) -> int:
        """Real PivGa storage of ``y``: ``r (m + n) - r^2`` per matrix with ``r`` its kept singular values.

        ``r`` counts the kept groups' singular values (the last group may be shorter).
        """
        total = 0
        y = np.asarray(y).reshape(-1)
        for g, (m, n) in zip(self._groups, shapes):
            sizes = [min(group_size, min(m, n) - k * group_size) for k in range(len(g))]
            r = int(sum(s for s, keep in zip(sizes, y[g]) if keep))
            total += r * (m + n) - r * r
        return total

    # ------------------------------------------------------------------ penalised model
    def bqm_unit(self) -> int:
        """Cost unit of the penalised BQM: the gcd of costs and budget, coarsened so that the budget is
        at most :data:`MAX_BQM_LEVELS` units (slack variables and coefficient range stay small)."""
        g = reduce(math.gcd, [int(c) for c in self._costs] + [self._budget]) or 1
        if self._budget // g > MAX_BQM_LEVELS:
            g = -(-self._budget // MAX_BQM_LEVELS)
        return max(1, g)

    def slack_weights(self, unit: int | None = None) -> np.ndarray:
        """Weights of the binary slack variables: every integer ``0 .. B'`` is a sum of a subset."""
        unit = unit or self.bqm_unit()
        top = self._budget // unit
        if top <= 0:
            return np.zeros(0, dtype=np.int64)
        bits = top.bit_length()
        w = [1 << j for j in range(bits - 1)]
        w.append(top - (sum(w)))
        return np.array(w, dtype=np.int64)

    def safe_penalty(self) -> float:
        """A penalty strength that puts every infeasible state above the feasible optimum.

        ``U`` is the energy of a feasible state (a greedy fill), ``L`` a lower bound of the objective
        over all binary states, as for the block problem. An infeasible state has a penalty term of at
        least 1 (integer units), so ``lambda = (U - L)(1 + 1e-6) + eps`` suffices.
        """
        if self._safe_penalty is None:
            from qblock.backends.knapsack import greedy_fill

            upper = float(self.energies(greedy_fill(self, np.zeros((1, self.num_variables), np.int8)))[0])
            d = np.diag(self._H) + self._linear
            lower = self._offset + float(np.minimum(d, 0).sum() + np.minimum(2.0 * np.triu(self._H, 1), 0).sum())
            gap = max(upper - lower, 0.0)
            self._safe_penalty = gap * (1.0 + 1e-6) + 1e-9 * max(1.0, abs(upper)) + 1e-12
        return self._safe_penalty

    def objective_bqm(self) -> dimod.BinaryQuadraticModel:
        """The objective alone over the variables ``0 .. N-1``."""
        return dimod.BinaryQuadraticModel(np.diag(self._H) + self._linear, np.triu(2.0 * self._H, 1),
                                          self._offset, dimod.BINARY)

    def to_bqm(self, penalty: float | None = None) -> dimod.BinaryQuadraticModel:
        """The penalised BQM: objective + ``penalty`` * (budget equality with slack + prefix terms).

        Variables ``0 .. N-1`` are the groups, ``N, N+1, ...`` the slack bits (integer labels, as some
        samplers sort labels and cannot compare names with numbers). With the default unit
        (:meth:`bqm_unit`) every feasible state with its best slack has exactly its objective energy.

        Example:
            >>> p = RankSelectionProblem(None, [-1.0, -1.0], costs=[2, 2], budget=2, matrix=[0, 1], position=[0, 0])
            >>> bqm = p.to_bqm()
            >>> list(bqm.variables)         # two groups, then the slack bits of 0 .. 1 budget units
            [0, 1, 2]
        """
        lam = self.safe_penalty() if penalty is None else float(penalty)
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"penalty must be a finite non-negative number, got {penalty!r}")
        bqm = self.objective_bqm()
        if not lam:
            return bqm
        unit = self.bqm_unit()
        q = -(-self._costs // unit)  # costs rounded up
        w = self.slack_weights(unit)
        n = self.num_variables
        terms = [(i, float(c)) for i, c in enumerate(q)] + [(n + j, float(c)) for j, c in enumerate(w)]
        bqm.add_linear_equality_constraint(terms, lagrange_multiplier=lam, constant=-float(self._budget // unit))
        for later, earlier in self._pairs:  # y_later (1 - y_earlier)
            bqm.add_linear(int(later), lam)
            bqm.add_quadratic(int(later), int(earlier), -lam)
        return bqm

    def to_qubo(self, penalty: float | None = None):
        return self.to_bqm(penalty).to_qubo()

    def to_ising(self, penalty: float | None = None):
        return self.to_bqm(penalty).to_ising()

    @property
    def compiled(self):
        """The penalised model written in PyQUBO (penalty strength a ``Placeholder``), compiled on first use.

        ``compiled.to_bqm(feed_dict={"penalty": lam})`` equals :meth:`to_bqm` ``(lam)`` up to variable
        names (``y[i]`` for group ``i``). The solvers use the numpy-built :meth:`to_bqm`.
        """
        if self._compiled is None:
            from pyqubo import Binary, Constraint, Placeholder

            n, H = self.num_variables, self._H
            y = [Binary(f"y[{i}]") for i in range(n)]
            obj = 0.0 + self._offset
            for i in range(n):
                d = float(H[i, i] + self._linear[i])
                if d:
                    obj += d * y[i]
                for j in range(i + 1, n):
                    if H[i, j]:
                        obj += float(2.0 * H[i, j]) * y[i] * y[j]
            unit = self.bqm_unit()
            q = -(-self._costs // unit)
            total = sum((int(c) * y[i] for i, c in enumerate(q)), 0)
            total += sum((int(w) * Binary(f"slack[{j}]") for j, w in enumerate(self.slack_weights(unit))), 0)
            budget = Constraint((total - int(self._budget // unit)) ** 2, label=_BUDGET)
            model = obj + Placeholder(_PENALTY) * budget
            if self._pairs.size:
                rule = sum((y[int(a)] * (1 - y[int(b)]) for a, b in self._pairs), 0)
                model += Placeholder(_PENALTY) * Constraint(rule, label="prefix")
            self._compiled = model.compile()
        return self._compiled

    # ------------------------------------------------------------------ constrained forms
    def to_cqm(self) -> dimod.ConstrainedQuadraticModel:
        """The objective with the native knapsack inequality (``budget``) and prefix inequalities."""
        cqm = dimod.ConstrainedQuadraticModel()
        cqm.set_objective(self.objective_bqm())
        cqm.add_constraint_from_iterable([(i, float(c)) for i, c in enumerate(self._costs)], "<=",
                                         rhs=float(self._budget), label=_BUDGET)
        for k, (later, earlier) in enumerate(self._pairs):
            cqm.add_constraint_from_iterable([(int(later), 1.0), (int(earlier), -1.0)], "<=", rhs=0.0,
                                             label=f"prefix[{k}]")
        return cqm

    def to_quadratic_program(self, name: str = "rank_selection"):
        """A qiskit-optimization ``QuadraticProgram`` with binaries ``y0..y{N-1}`` and the same constraints."""
        qp = binary_program(self, name, "y")
        qp.linear_constraint({f"y{i}": int(c) for i, c in enumerate(self._costs)}, "<=", self._budget, name=_BUDGET)
        for k, (later, earlier) in enumerate(self._pairs):
            qp.linear_constraint({f"y{int(later)}": 1, f"y{int(earlier)}": -1}, "<=", 0, name=f"prefix_{k}")
        return qp

    # ------------------------------------------------------------------ reading results back
    def _variable_index(self, v: Any) -> int | None:
        """The group index of a variable name, or ``None`` for a slack variable."""
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            return int(v) if int(v) < self.num_variables else None  # N, N+1, ...: slack bits
        s = str(v)
        if s.startswith("slack"):
            return None
        for prefix, suffix in (("y[", "]"), ("y", "")):
            core = s[len(prefix): len(s) - len(suffix)] if s.startswith(prefix) and s.endswith(suffix) else ""
            if core.isdigit():
                return int(core)
        if s in self._labels:
            return self._labels.index(s)
        raise ValueError(f"unknown variable {v!r} in sampleset (expected a group index, 'y[i]', 'yi', a label or a slack)")

    def states_from_sampleset(self, sampleset: dimod.SampleSet) -> np.ndarray:
        """0/1 rows over the ``N`` groups from a sampleset of any conversion (slack variables dropped)."""
        if not isinstance(sampleset, dimod.SampleSet):
            raise TypeError(f"expected a dimod.SampleSet, got {type(sampleset).__name__}")
        if sampleset.vartype is dimod.SPIN:
            sampleset = sampleset.change_vartype(dimod.BINARY)
        cols = [self._variable_index(v) for v in sampleset.variables]
        keep = [j for j, c in enumerate(cols) if c is not None]
        idx = [cols[j] for j in keep]
        if sorted(idx) != list(range(self.num_variables)):
            raise ValueError(f"sampleset must hold exactly the N = {self.num_variables} group variables")
        X = np.zeros((len(sampleset), self.num_variables), dtype=np.int8)
        X[:, idx] = sampleset.record.sample[:, keep]
        return X

    def sampleset_from_states(self, X: Any, info: Mapping[str, Any] | None = None) -> dimod.SampleSet:
        """Feasible distinct rows of ``X`` as a SampleSet sorted by objective (ties by state)."""
        X = np.asarray(X, dtype=np.int8).reshape(-1, self.num_variables)
        X = X[self.feasible_mask(X)]
        uniq, counts = (np.unique(X, axis=0, return_counts=True) if X.shape[0]
                        else (X, np.zeros(0, dtype=int)))
        e = self.energies(uniq) if uniq.shape[0] else np.zeros(0)
        order = np.lexsort(tuple(uniq[:, ::-1].T) + (e,)) if uniq.shape[0] else np.zeros(0, dtype=int)
        return dimod.SampleSet.from_samples((uniq[order], list(range(self.num_variables))), vartype=dimod.BINARY,
                                            energy=e[order], num_occurrences=counts[order], info=dict(info or {}),
                                            sort_labels=False)

    def decode(self, sampleset: dimod.SampleSet, info: Mapping[str, Any] | None = None) -> dimod.SampleSet:
        """Any conversion's results back: feasible, distinct, sorted by the unpenalised objective."""
        X = np.repeat(self.states_from_sampleset(sampleset), np.asarray(sampleset.record.num_occurrences), axis=0)
        return self.sampleset_from_states(X, info={**dict(sampleset.info), **dict(info or {})})

    # ------------------------------------------------------------------ the shared solve contract
    def repair_states(self, X: np.ndarray) -> np.ndarray:
        """Every row made feasible (prefix closure, then greedy drops until the budget holds)."""
        from qblock.backends.knapsack import repair

        return repair(self, X)

    def polish_states(self, X: np.ndarray) -> np.ndarray:
        """Every row taken to a local minimum of add / drop / exchange moves that stay feasible."""
        from qblock.backends.knapsack import descent

        return descent(self, X)[0]

    def topk_neighbours(self, X: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` best states of a pool grown from ``X`` until closed under feasible moves."""
        from qblock.backends.knapsack import topk_closure

        return topk_closure(self, X, k)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Save to ``.npz`` with a JSON header (never pickle); atomic.

        Example:
            >>> import tempfile, os
            >>> p = RankSelectionProblem(None, [-1.0, -2.0], costs=[3, 4], budget=5, matrix=[0, 0], position=[0, 1])
            >>> q = load_problem(p.save(os.path.join(tempfile.mkdtemp(), "r.npz")))
            >>> q.kind, q.budget, q.costs.tolist(), q.prefix
            ('rank_selection', 5, [3, 4], True)
        """
        header = {"format": "qblock.RankSelectionProblem", "format_version": FORMAT_VERSION, "budget": self._budget,
                  "prefix": self._prefix, "offset": self._offset, "labels": list(self._labels),
                  "matrix_names": list(self.matrix_names), "metadata": self.metadata, "arrays": sorted(self.arrays)}
        payload = {"H": self._H, "linear": self._linear, "costs": self._costs, "matrix": self._matrix,
                   "position": self._position, "header": np.array(json.dumps(header))}
        payload.update({f"array__{k}": v for k, v in self.arrays.items()})
        return save_npz(path, payload)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RankSelectionProblem":
        """Read a file written by :meth:`save` (never unpickles)."""
        p = load_problem(path)
        if not isinstance(p, cls):
            raise ValueError(f"{path} holds a {type(p).__name__}, not a RankSelectionProblem")
        return p


def _header(data: Mapping[str, np.ndarray]) -> dict[str, Any]:
    raw = data["header"]
    if raw.shape != () or raw.dtype.kind != "U":
        raise ValueError("the header must be one JSON string")
    try:
        header = json.loads(str(raw[()]))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("the header must be a JSON object")
    return header


def load_problem(path: str | os.PathLike):
    """Load a problem file of either kind (:class:`BlockRemovalProblem` or :class:`RankSelectionProblem`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a qblock problem file (the message says why).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"problem file not found: {path}")
    try:
        data = _read_npz(path)
        header = _header(data)
    except ValueError as exc:
        raise ValueError(f"{path} is not a qblock problem file ({exc})") from None
    if header.get("format") != "qblock.RankSelectionProblem":
        return BlockRemovalProblem.load(path)
    try:
        version = header.get("format_version", 0)
        if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {version!r}")
        for key in ("costs", "matrix", "position"):
            if key not in data:
                raise ValueError(f"no {key} in the archive")
        if not isinstance(header.get("metadata", {}), dict):
            raise ValueError("metadata must be a JSON object")
        arrays = {k[len("array__"):]: v for k, v in data.items() if k.startswith("array__")}
        return RankSelectionProblem(
            data["H"], data["linear"], data["costs"], header.get("budget"), data["matrix"], data["position"],
            prefix=bool(header.get("prefix", True)), offset=header.get("offset", 0.0), labels=header.get("labels"),
            matrix_names=header.get("matrix_names"), metadata=header.get("metadata"), arrays=arrays)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a valid rank-selection problem file ({exc})") from None


def _removal_energy_to_keep(H: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Rewrite ``x^T H x + h^T x`` in the removal variables ``x = 1 - y`` as a form in ``y``."""
    ones = np.ones(H.shape[0])
    return H, -2.0 * (H @ ones) - h, float(ones @ H @ ones + h @ ones)


def from_gate_gradients(A: Any, costs: Any, budget: int, matrix: Any, position: Any, *, energy: str = "fisher",
                        couplings: str = "full", prefix: bool = True, **kwargs: Any) -> RankSelectionProblem:
    """The rank problem from per-sample gradients of the group gates (``A[s, i] = d loss_s / d g_i`` at ``g = 1``).

    Removing group ``i`` moves its gate from 1 to 0, so the block problem's energies apply to the removal
    vector ``x = 1 - y``: ``fisher`` ``E = x^T (A^T A / m) x`` and ``fisher+grad``
    ``E = -mean(A)^T x + x^T (A^T A / m) x / 2``; they are rewritten in ``y``. ``couplings`` keeps
    the full ``H`` (``"full"``), only its blocks within one matrix (``"matrix"``), or its diagonal
    (``"diagonal"``); the last two make the objective separable by matrix, which the ``exact``
    backend solves by dynamic programming at any size.

    Example:
        >>> import numpy as np
        >>> p = from_gate_gradients(np.ones((4, 2)), costs=[1, 1], budget=1, matrix=[0, 0], position=[0, 1])
        >>> p.energy([1, 1]), p.energy([1, 0]), p.energy([0, 0])     # x = 0, x = e_2, x = 1
        (0.0, 1.0, 4.0)
    """
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or not np.all(np.isfinite(A)):
        raise ValueError("A must be a finite (samples x groups) matrix")
    F = A.T @ A / A.shape[0]
    mat = np.asarray(matrix)
    if couplings == "matrix":
        F = np.where(mat[:, None] == mat[None, :], F, 0.0)
    elif couplings == "diagonal":
        F = np.diag(np.diag(F))
    elif couplings != "full":
        raise ValueError(f"couplings must be 'full', 'matrix' or 'diagonal', got {couplings!r}")
    if energy == "fisher":
        H, h = F, np.zeros(F.shape[0])
    elif energy == "fisher+grad":
        H, h = F / 2.0, -A.mean(axis=0)
    else:
        raise ValueError(f"energy must be 'fisher' or 'fisher+grad', got {energy!r}")
    Hy, hy, c = _removal_energy_to_keep(H, h)
    meta = {"energy": energy, "couplings": couplings, "num_samples": int(A.shape[0]), **dict(kwargs.pop("metadata", {}) or {})}
    return RankSelectionProblem(Hy, hy, costs, budget, matrix, position, prefix=prefix, offset=c, metadata=meta, **kwargs)
