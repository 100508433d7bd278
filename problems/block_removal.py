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

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import dimod
import numpy as np

from qblock._io import atomic_write_bytes

__all__ = ["BlockRemovalProblem", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_CONSTRAINT_LABEL = "remove_exactly_M"
_PENALTY = "penalty"
_NUM_REMOVE = "num_remove"


def _as_matrix(H: Any) -> np.ndarray:
    try:
        arr = np.asarray(H, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"H must be a numeric square matrix: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"H must be a square 2-D matrix, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("H must have at least one row (one block)")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"H must be finite; H[{bad[0]}, {bad[1]}] = {arr[bad[0], bad[1]]}")
    return arr


def _check_num_remove(num_remove: Any, n: int) -> int:
    if isinstance(num_remove, bool) or int(num_remove) != num_remove:
        raise ValueError(f"num_remove must be an integer, got {num_remove!r}")
    if not 0 <= int(num_remove) <= n:
        raise ValueError(f"num_remove must satisfy 0 <= M <= N = {n}, got M = {num_remove}")
    return int(num_remove)


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

        if linear is None:
            lin = np.zeros(n)
        else:
            try:
                lin = np.asarray(linear, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"linear must be a numeric vector: {exc}") from None
            if lin.shape != (n,):
                raise ValueError(f"linear has {lin.size} entries but H has {n} rows; they must agree")
            if not np.all(np.isfinite(lin)):
                raise ValueError("linear must be finite")
        self._linear = lin.copy()
        self._linear.setflags(write=False)

        try:
            self._offset = float(offset)
        except (TypeError, ValueError):
            raise ValueError(f"offset must be a number, got {offset!r}") from None
        if not math.isfinite(self._offset):
            raise ValueError("offset must be finite")

        self._num_remove = None if num_remove is None else _check_num_remove(num_remove, n)

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
        p._num_remove = _check_num_remove(num_remove, self.num_blocks)
        return p

    def __repr__(self) -> str:
        return (
            f"BlockRemovalProblem(N={self.num_blocks}, M={self._num_remove}, "
            f"linear={'yes' if np.any(self._linear) else 'no'}, energy={self.metadata.get('energy', '?')!r})"
        )

    # ------------------------------------------------------------------ energies
    def _as_states(self, X: Any) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim == 1:
            X = X[None, :]
        if X.ndim != 2 or X.shape[1] != self.num_blocks:
            raise ValueError(f"states must have {self.num_blocks} columns, got shape {X.shape}")
        if not np.all((X == 0) | (X == 1)):
            raise ValueError("states must be binary (0/1)")
        return X.astype(np.float64)

    def energies(self, X: Any) -> np.ndarray:
        """Objective (no penalty) of each row of ``X`` (shape ``(k, N)``), vectorised."""
        Xf = self._as_states(X)
        return np.einsum("ki,ij,kj->k", Xf, self._H, Xf) + Xf @ self._linear + self._offset

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
        from qblock._lazy import require

        qp_mod = require("qiskit_optimization", "qaoa")
        m = self._require_m()
        bqm = self.objective_bqm()
        qp = qp_mod.QuadraticProgram(name)
        for i in range(self.num_blocks):
            qp.binary_var(f"x{i}")
        qp.minimize(
            constant=float(bqm.offset),
            linear={f"x{i}": float(b) for i, b in bqm.linear.items()},
            quadratic={(f"x{u}", f"x{v}"): float(b) for (u, v), b in bqm.quadratic.items()},
        )
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
        """Rows of 0/1 removal vectors from a sampleset of any conversion (BQM, Ising, CQM, qiskit names)."""
        if sampleset.vartype is dimod.SPIN:
            sampleset = sampleset.change_vartype(dimod.BINARY)
        names = list(sampleset.variables)
        cols = [self._variable_index(v) for v in names]
        if sorted(cols) != list(range(self.num_blocks)):
            missing = sorted(set(range(self.num_blocks)) - set(cols))
            raise ValueError(f"sampleset does not hold every block variable; missing {missing[:10]}")
        raw = sampleset.record.sample
        X = np.zeros((raw.shape[0], self.num_blocks), dtype=np.int8)
        X[:, cols] = raw
        return X

    def _variable_index(self, v: Any) -> int:
        if isinstance(v, (int, np.integer)):
            return int(v)
        s = str(v)
        for prefix, suffix in (("x[", "]"), ("x", "")):
            if s.startswith(prefix) and s.endswith(suffix):
                core = s[len(prefix) : len(s) - len(suffix)] if suffix else s[len(prefix) :]
                if core.isdigit():
                    return int(core)
        if s in self._labels:
            return self._labels.index(s)
        raise ValueError(f"unknown variable {v!r} in sampleset")

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
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
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
        buf = io.BytesIO()
        np.savez_compressed(buf, **payload)
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BlockRemovalProblem":
        """Load a problem written by :meth:`save` (``allow_pickle=False``)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"problem file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                H = data["H"]
                linear = data["linear"]
                arrays = {k[len("array__") :]: data[k] for k in data.files if k.startswith("array__")}
        except (ValueError, KeyError, OSError) as exc:
            raise ValueError(f"{path} is not a qblock problem file: {exc}") from None
        if header.get("format") != "qblock.BlockRemovalProblem":
            raise ValueError(f"{path} is not a qblock problem file (format={header.get('format')!r})")
        if int(header.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer qblock (format {header['format_version']})")
        p = cls(
            H,
            header.get("num_remove"),
            linear=linear,
            offset=header.get("offset", 0.0),
            labels=header.get("labels"),
            metadata=header.get("metadata"),
            arrays=arrays,
        )
        return p

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
