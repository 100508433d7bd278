"""QAOA on qiskit-aer simulators, as a :class:`dimod.Sampler` and a :func:`qblock.solve` runner.

Two ansaetze:

* ``mixer="xy"`` (default, constraint preserving): the register starts in the Dicke state with
  ``M`` ones (Baertschi-Eidenbenz split-and-cyclic-shift circuit) and the mixer is a sum of
  ``(XX + YY) / 2`` over qubit pairs (``xy_topology="ring"`` or ``"complete"``). Every factor
  ``exp(-i b (XX + YY) / 2)`` of one pair is applied as ``RXX(b) RYY(b)`` *adjacently* (the two
  terms commute), so each factor conserves the Hamming weight exactly and so does the whole
  circuit after transpilation: every measured state removes exactly ``M`` blocks.
* ``mixer="x"`` (standard): ``|+>^N`` and an ``RX`` mixer on the *penalised* QUBO; infeasible
  measurements are counted (``feasible_fraction``) and, in :func:`run`, repaired greedily.

The cost layer is written by hand from the BQM's linear and quadratic biases (not via dimod's Ising
form: dimod uses ``x = (1 + s) / 2`` while a measured qiskit bit ``1`` is ``Z = -1``, i.e.
``x = (1 - z) / 2``; going through one convention into the other flips every bit). The cost is
divided by its largest coefficient so that angles are O(1) for every instance.

Expectation values during the classical optimisation: with the ``statevector`` method the circuit
is simulated once per evaluation with ``save_probabilities`` and ``<C>`` is the exact dot product of
the probabilities with the precomputed diagonal of ``C`` (no shot noise, ~ms per evaluation at
N = 16). With other simulator methods (e.g. ``matrix_product_state``) the expectation is the mean
energy of ``shots`` samples from Aer's ``SamplerV2``. The final measurement always goes through
Aer's ``SamplerV2`` on the circuit transpiled by a preset pass manager.

Example:
    >>> import qblock
    >>> p = qblock.random_problem(8, 2, seed=0)
    >>> ss = qblock.solve(p, "qaoa", num_solutions=3, seed=1, reps=1, maxiter=30)
    >>> len(ss), ss.info["feasible_fraction"]
    (3, 1.0)
"""

from __future__ import annotations

import math
import time
from typing import Any

import dimod
import numpy as np

from qblock.backends._optional import DEFAULT_MAX_QUBITS
from qblock.problems._states import check_num_remove

__all__ = [
    "QAOASampler",
    "run",
    "dicke_circuit",
    "build_qaoa_circuit",
    "ising_from_bqm",
    "statevector_bytes",
    "QubitLimitError",
    "OPTIMIZERS",
]

#: optimisers accepted by ``optimizer=`` (all gradient-free, from scipy)
OPTIMIZERS = ("COBYLA", "Nelder-Mead", "Powell")

#: simulator methods that give an exact statevector for the expectation values
_STATEVECTOR_METHODS = ("statevector", "automatic")


class QubitLimitError(ValueError):
    """The circuit needs more qubits than ``max_qubits`` allows."""


def statevector_bytes(num_qubits: int) -> int:
    """Memory of a complex128 statevector: ``16 * 2**n`` bytes."""
    return 16 * 2 ** int(num_qubits)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


# ---------------------------------------------------------------------------- circuit pieces
def ising_from_bqm(bqm: dimod.BinaryQuadraticModel, variables: list) -> tuple[np.ndarray, np.ndarray, float]:
    """Coefficients of the cost in qiskit's Z convention: ``E = c + sum h_i Z_i + sum_{i<j} J_ij Z_i Z_j``.

    With ``x_i = (1 - Z_i) / 2`` (bit 1 measured as ``Z = -1``), a BINARY BQM
    ``E = sum a_i x_i + sum b_ij x_i x_j + c0`` gives ``h_i = -a_i / 2 - sum_j b_ij / 4``,
    ``J_ij = b_ij / 4`` and ``c = c0 + sum a_i / 2 + sum b_ij / 4``.

    Returns:
        ``(h, J, c)`` with ``J`` strictly upper triangular, indexed by position in ``variables``.
    """
    if bqm.vartype is dimod.SPIN:
        bqm = bqm.change_vartype(dimod.BINARY, inplace=False)
    n = len(variables)
    pos = {v: k for k, v in enumerate(variables)}
    h = np.zeros(n)
    J = np.zeros((n, n))
    c = float(bqm.offset)
    for v, a in bqm.linear.items():
        h[pos[v]] -= a / 2.0
        c += a / 2.0
    for (u, v), b in bqm.quadratic.items():
        i, j = sorted((pos[u], pos[v]))
        J[i, j] += b / 4.0
        h[i] -= b / 4.0
        h[j] -= b / 4.0
        c += b / 4.0
    return h, J, c


def dicke_circuit(num_qubits: int, num_ones: int):
    """A circuit preparing the Dicke state ``|D^n_k>`` (uniform over all ``k``-ones bitstrings).

    Baertschi and Eidenbenz's split-and-cyclic-shift construction: start from ``k`` ones on the last
    qubits, then for ``m = n .. 2`` apply ``SCS(m, min(k, m - 1))`` on the first ``m`` positions.
    ``SCS(m, k)`` maps ``|0^{m-l} 1^l>`` to ``sqrt(l/m)|0^{m-l} 1^l> + sqrt((m-l)/m)|0^{m-l-1} 1^l 0>``
    for every ``l <= k``: for each ``l`` it rotates positions ``(m-l, m)`` within span{01, 10}
    (``CX``, a controlled ``RY``, ``CX``), controlled also by position ``m-l+1`` when ``l >= 2``.
    It uses O(k n) gates and depth O(n).

    Example:
        >>> from qiskit.quantum_info import Statevector
        >>> import numpy as np
        >>> sv = Statevector(dicke_circuit(4, 2)).probabilities()
        >>> np.allclose(sv[[3, 5, 6, 9, 10, 12]], 1 / 6)
        True
    """
    from qiskit import QuantumCircuit
    from qiskit.circuit.library import RYGate

    n, k = int(num_qubits), int(num_ones)
    if not 0 <= k <= n:
        raise ValueError(f"Dicke state needs 0 <= k <= n, got n={n}, k={k}")
    qc = QuantumCircuit(n, name=f"dicke_{n}_{k}")
    if k == 0:
        return qc
    # position p (1-based, as in the construction) is qubit p - 1
    for p in range(n - k + 1, n + 1):
        qc.x(p - 1)
    if k == n:
        return qc
    for m in range(n, 1, -1):
        for l in range(1, min(k, m - 1) + 1):
            a, b = m - l - 1, m - 1  # qubits of positions m-l and m
            theta = 2.0 * math.acos(math.sqrt(l / m))
            qc.cx(a, b)
            if l == 1:
                qc.cry(theta, b, a)
            else:
                qc.append(RYGate(theta).control(2), [b, m - l, a])  # controls: position m and m-l+1
            qc.cx(a, b)
    return qc


def _xy_pairs(n: int, topology: str) -> list[tuple[int, int]]:
    if topology == "ring":
        if n < 2:
            return []
        if n == 2:
            return [(0, 1)]
        # even pairs, odd pairs, then the closing edge: the usual parity ordering of the ring mixer
        return [(i, i + 1) for i in range(0, n - 1, 2)] + [(i, i + 1) for i in range(1, n - 1, 2)] + [(n - 1, 0)]
    if topology == "complete":
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    raise ValueError(f"xy_topology must be 'ring' or 'complete', got {topology!r}")


def build_qaoa_circuit(
    h: np.ndarray,
    J: np.ndarray,
    reps: int,
    *,
    mixer: str = "xy",
    num_ones: int | None = None,
    xy_topology: str = "ring",
    prepare: bool = True,
):
    """The parametrised QAOA circuit (no measurement) and its ``(gammas, betas)`` parameters.

    With ``prepare=False`` the initial-state preparation (Dicke circuit or Hadamards) is left out, for
    simulations that inject the initial state directly.

    Cost layer ``exp(-i gamma C)``: ``RZ(2 gamma h_i)`` and ``RZZ(2 gamma J_ij)``. Mixer layer: ``RX(2 beta)``
    (``mixer="x"``) or, per pair, ``RXX(beta) RYY(beta)`` = ``exp(-i beta (XX + YY) / 2)`` (``mixer="xy"``).
    """
    from qiskit import QuantumCircuit
    from qiskit.circuit import ParameterVector

    n = len(h)
    if reps < 1:
        raise ValueError("reps must be at least 1")
    gammas = ParameterVector("gamma", reps)
    betas = ParameterVector("beta", reps)
    qc = QuantumCircuit(n, name=f"qaoa_{mixer}_p{reps}")
    if mixer == "xy":
        if num_ones is None:
            raise ValueError("mixer='xy' needs num_remove (the Hamming weight of the Dicke state)")
        if prepare:
            qc.compose(dicke_circuit(n, num_ones), inplace=True)
        pairs = _xy_pairs(n, xy_topology)
    elif mixer == "x":
        if prepare:
            qc.h(range(n))
        pairs = []
    else:
        raise ValueError(f"mixer must be 'xy' or 'x', got {mixer!r}")
    iu, ju = np.nonzero(np.triu(J, 1))
    for r in range(reps):
        for i in range(n):
            if h[i] != 0.0:
                qc.rz(2.0 * float(h[i]) * gammas[r], i)
        for i, j in zip(iu, ju):
            qc.rzz(2.0 * float(J[i, j]) * gammas[r], int(i), int(j))
        if mixer == "x":
            qc.rx(2.0 * betas[r], range(n))
        else:
            for i, j in pairs:  # XX and YY of one pair adjacent: together they conserve the weight
                qc.rxx(betas[r], i, j)
                qc.ryy(betas[r], i, j)
    return qc, list(gammas), list(betas)


def _initial_state(n: int, m: int | None) -> np.ndarray:
    """The Dicke state with ``m`` ones (uniform over weight-``m`` basis states) or, for ``m=None``, ``|+>^n``."""
    if m is None:
        return np.full(2**n, 2.0 ** (-n / 2), dtype=complex)
    idx = np.arange(2**n, dtype=np.int64)
    weight = np.zeros(2**n, dtype=np.int64)
    for i in range(n):
        weight += (idx >> i) & 1
    sv = (weight == m).astype(complex)
    return sv / np.sqrt(sv.real.sum())


def _sorted_like(targets, params) -> list:
    """``params`` matched to ``targets`` by name (two circuits built alike have equally named parameters)."""
    by_name = {p.name: p for p in params}
    return [by_name[t.name] for t in targets]


def _basis_bits(n: int) -> np.ndarray:
    """``(2**n, n)`` bits of every basis index; column ``i`` is qubit ``i`` (qiskit's little endian)."""
    idx = np.arange(2**n, dtype=np.int64)
    return ((idx[:, None] >> np.arange(n)) & 1).astype(np.int8)


def _energies(Q: np.ndarray, lin: np.ndarray, offset: float, X: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    out = np.empty(X.shape[0])
    for s in range(0, X.shape[0], chunk):
        Xf = X[s : s + chunk].astype(np.float64)
        out[s : s + chunk] = np.einsum("ki,ij,kj->k", Xf, Q, Xf) + Xf @ lin + offset
    return out


def _cost_scale(Q: np.ndarray, lin: np.ndarray, n: int, m: int | None, samples: int = 4096) -> float:
    """Spread (standard deviation) of the cost over the states the mixer explores: uniformly random
    weight-``m`` states (XY mixer) or uniformly random bitstrings (X mixer). Dividing the cost by it
    makes ``gamma ~ 1`` a phase spread of about one radian on every instance. A fixed seed keeps it
    deterministic."""
    rng = np.random.default_rng(0)
    if m is None:
        X = rng.integers(0, 2, (samples, n)).astype(np.int8)
    else:
        X = np.zeros((samples, n), dtype=np.int8)
        np.put_along_axis(X, np.argsort(rng.random((samples, n)), axis=1)[:, :m], 1, axis=1)
    s = float(_energies(Q, lin, 0.0, X).std())
    return s if s > 1e-300 else 1.0


# ---------------------------------------------------------------------------- the sampler
class QAOASampler(dimod.Sampler):
    """QAOA simulated with qiskit-aer; returns measured states as a :class:`dimod.SampleSet`.

    Example:
        >>> import qblock
        >>> p = qblock.random_problem(8, 3, seed=2)
        >>> ss = QAOASampler().sample(p.objective_bqm(), num_remove=3, reps=1, seed=0, maxiter=20)
        >>> all(sum(s.values()) == 3 for s in ss.samples())
        True
    """

    parameters = {
        "num_remove": [], "num_solutions": [], "mixer": [], "reps": [], "shots": [], "seed": [],
        "optimizer": [], "maxiter": [], "init": [], "xy_topology": [], "method": [], "max_qubits": [],
        "restarts": [], "initial_point": [], "feasible_only": [], "threads": [],
    }
    properties = {"mixers": ("xy", "x"), "optimizers": OPTIMIZERS, "inits": ("linear_ramp", "random")}

    def sample(
        self,
        bqm: dimod.BinaryQuadraticModel,
        *,
        num_remove: int | None = None,
        num_solutions: int | None = None,
        mixer: str = "xy",
        reps: int = 2,
        shots: int = 4096,
        seed: int | None = None,
        optimizer: str = "COBYLA",
        maxiter: int = 100,
        init: str = "linear_ramp",
        xy_topology: str = "ring",
        method: str = "statevector",
        max_qubits: int = DEFAULT_MAX_QUBITS,
        restarts: int = 0,
        initial_point: Any = None,
        ramp_scale: float = 0.75,
        feasible_only: bool = True,
        threads: int | None = None,
        **kwargs: Any,
    ) -> dimod.SampleSet:
        """Optimise the QAOA angles, then measure ``shots`` times.

        Args:
            bqm: the cost (BINARY). For ``mixer="xy"`` pass the unpenalised objective (a penalty would
                be constant on the weight-``M`` subspace anyway); for ``mixer="x"`` the penalised QUBO.
            num_remove: ``M``: the Dicke state's weight (required for ``"xy"``); for ``"x"`` it only
                defines which measured states count as feasible.
            num_solutions: keep at most this many distinct states (the lowest); default all.
            mixer: ``"xy"`` (constraint preserving, default) or ``"x"``.
            reps: QAOA depth ``p``.
            shots: measurements of the optimised circuit (also per evaluation for sampling methods).
            seed: seeds the simulator, random initial angles and sampling (same seed, same result).
            optimizer: ``"COBYLA"`` (default), ``"Nelder-Mead"`` or ``"Powell"`` (scipy).
            maxiter: optimiser iterations (per start).
            init: ``"linear_ramp"`` (default; an annealing-like schedule) or ``"random"``.
            xy_topology: pairs of the XY mixer, ``"ring"`` or ``"complete"``.
            method: Aer simulation method (``"statevector"`` default, ``"matrix_product_state"``, ...).
            max_qubits: refuse larger circuits (a statevector needs ``16 * 2**n`` bytes); not applied
                to ``method="matrix_product_state"``.
            restarts: extra optimiser starts from random angles; the best is kept.
            initial_point: explicit ``[gamma_1..gamma_p, beta_1..beta_p]`` (overrides ``init``).
            ramp_scale: total "time" of the linear ramp (angles in units of the normalised cost).
            feasible_only: with ``num_remove`` given, drop measured states without exactly ``M`` ones.
            threads: Aer's ``max_parallel_threads`` (0 = all cores). Default 1 up to 20 qubits (a
                statevector of at most 16 MiB gains little from threads, and on a busy 2-core machine
                OpenMP made N = 15 runs 30x slower: 3.8 s instead of 0.11 s per evaluation), else 0.

        Returns:
            Distinct measured states (feasible ones only when ``num_remove`` is given), sorted by the
            BQM energy, ``num_occurrences`` = how often each was measured, and ``info`` with the
            angles, feasible fraction, probability of the optimum, approximation ratio and timings.

        Raises:
            QubitLimitError: more variables than ``max_qubits``; the message gives the memory needed.
        """
        if kwargs:
            raise TypeError(f"unknown parameters for qaoa: {', '.join(sorted(kwargs))}")
        from scipy.optimize import minimize  # noqa: F401  (scipy missing: fail before any work)

        t_start = time.perf_counter()
        variables = list(bqm.variables)
        try:
            variables = sorted(variables)
        except TypeError:
            pass
        m, opt_name, reps, shots, maxiter = _checked_settings(len(variables), num_remove, mixer, optimizer, init,
                                                              reps, shots, maxiter, max_qubits, method)
        rng = np.random.default_rng(seed)
        sim_seed = int(rng.integers(2**31))
        # build: the cost diagonal and the circuits, transpiled once
        run = _QAOARun(bqm, variables, m, mixer=mixer, reps=reps, shots=shots, xy_topology=xy_topology,
                       method=method, threads=threads, sim_seed=sim_seed)
        # optimise: the angles, from a linear ramp (or given / random angles) and random restarts
        starts = _starting_angles(reps, init, initial_point, restarts, ramp_scale, rng)
        best, history = run.optimise(starts, opt_name, maxiter)
        # measure: the optimised circuit through Aer's SamplerV2
        theta = np.asarray(best.x, dtype=float)
        X, e_shots, feasible = run.measure(theta)
        info = run.info(theta, best, history, e_shots, feasible, xy_topology=xy_topology, optimizer=opt_name,
                        init="explicit" if initial_point is not None else init, restarts=int(restarts))
        info["timing_detail"] = {
            "diagonal": run.t_diag, "build_transpile": run.t_build, "optimise": run.t_opt, "sample": run.t_sample,
            "total": time.perf_counter() - t_start,
        }
        return run.distinct(X[feasible] if feasible_only else X, variables, num_solutions, info)


def _checked_settings(n: int, num_remove, mixer: str, optimizer: str, init: str, reps, shots, maxiter,
                      max_qubits, method: str) -> tuple[int | None, str, int, int, int]:
    """``(M, optimizer name, reps, shots, maxiter)``, every setting checked before anything is built."""
    if n == 0:
        raise ValueError("the BQM has no variables")
    # the limit guards dense simulation; a matrix-product-state simulation grows with entanglement instead
    if n > int(max_qubits) and method != "matrix_product_state":
        need = statevector_bytes(n)
        raise QubitLimitError(
            f"QAOA on {n} qubits exceeds max_qubits={max_qubits}: a statevector of {n} qubits needs "
            f"16 bytes * 2^{n} = {_human_bytes(need)} (plus 8 bytes * 2^{n} for the cost diagonal); "
            f"raise max_qubits if the machine has the memory, or use method='matrix_product_state' (command line: "
            f"--param max_qubits={n} or --param method=matrix_product_state)"
        )
    if mixer not in ("xy", "x"):
        raise ValueError(f"mixer must be 'xy' or 'x', got {mixer!r}")
    m = None if num_remove is None else check_num_remove(num_remove, n)
    if mixer == "xy" and m is None:
        raise ValueError("mixer='xy' needs num_remove=M (the Dicke state has M ones)")
    opt_name = {o.lower(): o for o in OPTIMIZERS}.get(str(optimizer).lower())
    if opt_name is None:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if init not in ("linear_ramp", "random"):
        raise ValueError(f"init must be 'linear_ramp' or 'random', got {init!r}")
    reps, shots, maxiter = int(reps), int(shots), int(maxiter)
    if reps < 1 or shots < 1 or maxiter < 1:
        raise ValueError("reps, shots and maxiter must be at least 1")
    return m, opt_name, reps, shots, maxiter


def _starting_angles(reps: int, init: str, initial_point, restarts, ramp_scale: float,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """The optimiser's starting angles ``[gamma_1..gamma_p, beta_1..beta_p]`` (gamma in units of 1/scale)."""

    def ramp() -> np.ndarray:
        k = (np.arange(reps) + 0.5) / reps
        return np.concatenate([k * ramp_scale, (1.0 - k) * ramp_scale])

    def random_start() -> np.ndarray:
        return np.concatenate([rng.uniform(0, math.pi / 2, reps), rng.uniform(0, math.pi / 2, reps)])

    starts = []
    if initial_point is not None:
        x0 = np.asarray(initial_point, dtype=float).reshape(-1)
        if x0.size != 2 * reps:
            raise ValueError(f"initial_point needs 2 * reps = {2 * reps} angles, got {x0.size}")
        starts.append(x0)
    else:
        starts.append(ramp() if init == "linear_ramp" else random_start())
    starts += [random_start() for _ in range(int(restarts))]
    return starts


class _QAOARun:
    """One QAOA run: the normalised cost (and its exact diagonal for statevector methods), the circuits
    transpiled once, the simulator; then :meth:`optimise`, :meth:`measure`, :meth:`info`, :meth:`distinct`."""

    def __init__(self, bqm: dimod.BinaryQuadraticModel, variables: list, m: int | None, *, mixer: str, reps: int,
                 shots: int, xy_topology: str, method: str, threads: int | None, sim_seed: int) -> None:
        n = len(variables)
        self.n, self.m, self.mixer, self.reps, self.shots, self.method = n, m, mixer, reps, shots, method
        # ---- cost: qiskit Z-convention coefficients, normalised
        bqm_bin = bqm if bqm.vartype is dimod.BINARY else bqm.change_vartype(dimod.BINARY, inplace=False)
        h, J, _ = ising_from_bqm(bqm_bin, variables)
        lin, (row, col, quad), offset = bqm_bin.to_numpy_vectors(variable_order=variables)
        Q = np.zeros((n, n))
        np.add.at(Q, (row, col), quad)
        self.Q, self.lin, self.offset = Q, np.asarray(lin, dtype=np.float64), float(offset)
        self.scale = _cost_scale(Q, self.lin, n, m if mixer == "xy" else None)
        self.exact_sv = method in _STATEVECTOR_METHODS
        t0 = time.perf_counter()
        self.diag = self.feas_idx = None
        self.e_opt = self.e_worst = self.e_mean_uniform = None
        if self.exact_sv:
            bits = _basis_bits(n)
            self.diag = _energies(Q, self.lin, self.offset, bits)
            if m is not None:
                self.feas_idx = np.flatnonzero(bits.sum(axis=1) == m)
                fe = self.diag[self.feas_idx]
            else:
                fe = self.diag
            self.e_opt, self.e_worst, self.e_mean_uniform = float(fe.min()), float(fe.max()), float(fe.mean())
            del bits
        self.t_diag = time.perf_counter() - t0
        self._build(h, J, xy_topology, threads, sim_seed)
        self.evaluations = 0

    def _build(self, h: np.ndarray, J: np.ndarray, xy_topology: str, threads: int | None, sim_seed: int) -> None:
        """The circuits, built once and transpiled once by a preset pass manager, and the simulator."""
        from qiskit.transpiler import generate_preset_pass_manager
        from qiskit_aer import AerSimulator
        from qiskit_aer.primitives import SamplerV2

        n, m, mixer, reps, method, scale = self.n, self.m, self.mixer, self.reps, self.method, self.scale
        t0 = time.perf_counter()
        qc, gammas, betas = build_qaoa_circuit(h / scale, J / scale, reps, mixer=mixer, num_ones=m,
                                               xy_topology=xy_topology)
        self.params = params = list(gammas) + list(betas)
        self.threads = threads = (1 if n <= 20 else 0) if threads is None else int(threads)
        self.backend = AerSimulator(method=method, seed_simulator=sim_seed, max_parallel_threads=threads)
        pm = generate_preset_pass_manager(optimization_level=1, backend=self.backend, seed_transpiler=0)
        meas = qc.measure_all(inplace=False)
        self.t_meas = pm.run(meas)
        if self.exact_sv:
            # Optimisation loop: the initial state (Dicke or |+>^n, known exactly) is injected with
            # Aer's set_statevector instead of simulating its preparation gates every evaluation
            # (2-3x faster at N = 14); the sampled circuit below keeps the gate-level preparation.
            from qiskit import QuantumCircuit
            from qiskit_aer.library import SetStatevector

            layers, _, _ = build_qaoa_circuit(h / scale, J / scale, reps, mixer=mixer, num_ones=m,
                                              xy_topology=xy_topology, prepare=False)
            layers.assign_parameters(dict(zip(layers.parameters, _sorted_like(layers.parameters, params))),
                                     inplace=True)
            probe = QuantumCircuit(n)
            probe.append(SetStatevector(_initial_state(n, m if mixer == "xy" else None)), range(n))
            probe.compose(layers, inplace=True)
            probe.save_probabilities()
            self.t_probe = pm.run(probe)
        self.t_build = time.perf_counter() - t0
        t_core = pm.run(qc)
        self.width, self.depth = t_core.num_qubits, t_core.depth()
        self.ops = {k: int(v) for k, v in t_core.count_ops().items()}
        self.sampler = SamplerV2(default_shots=self.shots, seed=sim_seed,
                                 options={"backend_options": {"method": method, "max_parallel_threads": threads}})
        # a pub's parameter values follow circuit.parameters (sorted by name: beta before gamma)
        where = {p.name: k for k, p in enumerate(params)}
        self.meas_order = np.array([where[p.name] for p in self.t_meas.parameters], dtype=np.intp)  # may be empty

    def sample_bits(self, theta: np.ndarray, nshots: int) -> np.ndarray:
        values = np.asarray(theta, dtype=float)[self.meas_order]
        res = self.sampler.run([(self.t_meas, values)], shots=nshots).result()[0]
        arr = res.data.meas.to_bool_array(order="little")  # column i is qubit i
        return arr.astype(np.int8)

    def probabilities(self, theta: np.ndarray) -> np.ndarray:
        binds = {p: [float(v)] for p, v in zip(self.params, theta)}
        result = self.backend.run(self.t_probe, parameter_binds=[binds]).result()
        return np.asarray(result.data(0)["probabilities"], dtype=np.float64)

    def cost(self, theta: np.ndarray) -> float:
        self.evaluations += 1
        if self.exact_sv:
            return float(self.probabilities(theta) @ self.diag)
        X = self.sample_bits(theta, self.shots)
        return float(_energies(self.Q, self.lin, self.offset, X).mean())

    def optimise(self, starts: list[np.ndarray], opt_name: str, maxiter: int):
        """``(best scipy result, expectation reached from each start)``."""
        from scipy.optimize import minimize

        t0 = time.perf_counter()
        best = None
        history = []
        for x0 in starts:
            opts = {"maxiter": maxiter}
            if opt_name == "COBYLA":
                opts["rhobeg"] = 0.2
            res = minimize(self.cost, x0, method=opt_name, options=opts)
            history.append(float(res.fun))
            if best is None or res.fun < best.fun:
                best = res
        self.t_opt = time.perf_counter() - t0
        return best, history

    def measure(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(shots, their energies, which are feasible)`` of the circuit at angles ``theta``."""
        t0 = time.perf_counter()
        X = self.sample_bits(theta, self.shots)
        self.t_sample = time.perf_counter() - t0
        e_shots = _energies(self.Q, self.lin, self.offset, X)
        feasible = np.ones(len(X), bool) if self.m is None else X.sum(axis=1) == self.m
        return X, e_shots, feasible

    def info(self, theta: np.ndarray, best, history: list[float], e_shots: np.ndarray, feasible: np.ndarray, *,
             xy_topology: str, optimizer: str, init: str, restarts: int) -> dict[str, Any]:
        """The SampleSet's ``info``: settings, angles, circuit, and (statevector) how good the state is."""
        reps, scale = self.reps, self.scale
        info: dict[str, Any] = {
            "mixer": self.mixer,
            "xy_topology": xy_topology if self.mixer == "xy" else None,
            "reps": reps,
            "shots": self.shots,
            "optimizer": optimizer,
            "init": init,
            "restarts": restarts,
            "method": self.method,
            "threads": self.threads,
            "optimal_gammas": [float(g) / scale for g in theta[:reps]],
            "optimal_betas": [float(b) for b in theta[reps:]],
            "normalised_gammas": [float(g) for g in theta[:reps]],
            "cost_scale": scale,
            "optimal_expectation": float(best.fun),
            "start_expectations": history,
            "expectation_mode": (("exact: probabilities of the simulated statevector (initial state injected) "
                                  "dotted with the cost diagonal") if self.exact_sv
                                 else f"mean energy of {self.shots} shots"),
            "circuit_evaluations": self.evaluations,
            "circuit_width": int(self.width),
            "circuit_depth": int(self.depth),
            "circuit_ops": self.ops,
            "feasible_fraction": float(feasible.mean()),
            "num_shots_feasible": int(feasible.sum()),
        }
        if self.e_opt is not None:
            info.update(self._quality(theta, e_shots, feasible))
        return info

    def _quality(self, theta: np.ndarray, e_shots: np.ndarray, feasible: np.ndarray) -> dict[str, Any]:
        """Probability and frequency of the optimum and the approximation ratio (exact diagonal known)."""
        diag, e_opt, e_worst, feas_idx = self.diag, self.e_opt, self.e_worst, self.feas_idx
        span = e_worst - e_opt
        probs = self.probabilities(theta)
        opt_mask = np.abs(diag - e_opt) <= 1e-9 * max(1.0, abs(e_opt))
        if feas_idx is not None:
            fmask = np.zeros(diag.size, bool)
            fmask[feas_idx] = True
            opt_mask &= fmask
        fe_shots = e_shots[feasible]
        return {
            "exact_optimum": e_opt,
            "optimum_probability": float(probs[opt_mask].sum()),
            "optimum_frequency": float(np.mean((np.abs(e_shots - e_opt) <= 1e-9 * max(1.0, abs(e_opt))) & feasible)),
            # baseline: the optimum's probability in the initial state (uniform over what the mixer explores)
            "uniform_optimum_probability": float(opt_mask.sum() / (len(feas_idx) if self.mixer == "xy" else diag.size)),
            "approximation_ratio": float((e_worst - fe_shots.mean()) / span) if span > 0 and fe_shots.size else None,
            "uniform_approximation_ratio": float((e_worst - self.e_mean_uniform) / span) if span > 0 else None,
        }

    def distinct(self, Xk: np.ndarray, variables: list, num_solutions: int | None,
                 info: dict[str, Any]) -> dimod.SampleSet:
        """The distinct measured states, sorted by energy, counted in ``num_occurrences``."""
        if Xk.shape[0]:
            uniq, counts = np.unique(Xk, axis=0, return_counts=True)
        else:
            uniq, counts = np.zeros((0, self.n), dtype=np.int8), np.zeros(0, dtype=int)
        e = _energies(self.Q, self.lin, self.offset, uniq)
        order = np.lexsort((np.arange(len(e)), e))
        if num_solutions is not None:
            order = order[: int(num_solutions)]
        return dimod.SampleSet.from_samples(
            (uniq[order], variables), vartype=dimod.BINARY, energy=e[order],
            num_occurrences=counts[order], info=info, sort_labels=False,
        )


# ---------------------------------------------------------------------------- the runner
def run(
    problem,
    sampler: QAOASampler | None,
    *,
    num_solutions: int,
    seed: int | None,
    mixer: str = "xy",
    penalty: float | None = None,
    repair: bool = True,
    exact_limit: int = 200_000,
    **params: Any,
) -> dimod.SampleSet:
    """:func:`qblock.solve` runner of the ``qaoa`` backend.

    ``mixer="xy"`` samples the objective from the Dicke state (every shot feasible). ``mixer="x"``
    samples the penalised QUBO (``penalty`` default :meth:`BlockRemovalProblem.safe_penalty`);
    infeasible shots are counted in ``num_infeasible`` and, with ``repair`` (default), made feasible
    by greedy add/drop so that a result always exists (``info['repaired']``).

    When the simulator method gives no exact enumeration and ``C(N, M) <= exact_limit``, the exact
    optimum comes from ``qblock.solve(problem, "exact")`` for the probability / ratio fields.

    Example:
        >>> import qblock
        >>> p = qblock.random_problem(8, 2, seed=0)
        >>> ss = qblock.solve(p, "qaoa", seed=3, reps=1, maxiter=20, mixer="x")
        >>> bool(ss.info["num_infeasible"] >= 0) and ss.info["mixer"] == "x"
        True
    """
    from qblock._solve import finish

    sampler = sampler or QAOASampler()
    m = problem._require_m()
    if mixer == "xy":
        bqm = problem.objective_bqm()
        used_penalty = None
    else:
        used_penalty = float(problem.safe_penalty() if penalty is None else penalty)
        bqm = problem.to_bqm(penalty=used_penalty)
    raw = sampler.sample(bqm, num_remove=m, mixer=mixer, seed=seed, feasible_only=(mixer == "xy"), **params)
    info = dict(raw.info)
    shots = int(info["shots"])
    X = problem.states_from_sampleset(raw)
    X = np.repeat(X, np.asarray(raw.record.num_occurrences), axis=0)
    num_infeasible = shots - int(info["num_shots_feasible"])
    if mixer == "x":
        info["repaired"] = bool(repair)
        if repair:
            from qblock.backends.local_search import repair as repair_fn

            X = repair_fn(problem.H, problem.linear, X, m)
        else:
            X = X[X.sum(axis=1) == m]
    if "exact_optimum" not in info and math.comb(problem.num_blocks, m) <= exact_limit:
        import qblock

        ex = qblock.solve(problem, "exact", num_solutions=1)
        info["exact_optimum"] = float(ex.first.energy)
    if "exact_optimum" in info and X.shape[0]:
        e = problem.energies(X)
        tol = 1e-9 * max(1.0, abs(info["exact_optimum"]))
        hit = np.abs(e - info["exact_optimum"]) <= tol
        info["optimum_in_samples"] = bool(np.any(hit))
        if "optimum_frequency" not in info and mixer == "xy":  # sampling methods: from the shots
            info["optimum_frequency"] = float(hit.sum() / shots)
    return finish(problem, X, info, num_solutions, num_reads=shots, num_infeasible=num_infeasible,
                  penalty=used_penalty)
