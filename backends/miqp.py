"""Optional MIQP backends: SCIP (``pyscipopt``, open source) and Gurobi (``gurobipy``).

Both receive the objective ``x^T H x + h^T x`` over binary ``x`` with the linear constraint
``sum(x) = M``. Top-k:

* Gurobi: a solution pool with ``PoolSearchMode=2`` (a systematic search for the k best), which Gurobi
  proves optimal when it finishes within the time limit.
* SCIP: k successive solves, each adding a no-good cut ``sum_{i in S} x_i <= M - 1`` that removes the
  previous optimum ``S`` (for fixed cardinality this cut removes exactly that state); every state is
  proven optimal among those not yet excluded, so the list is certified when every solve finishes.

Since ``x_i^2 = x_i`` the solvers are free to convexify; the quadratic is passed as given (the BQM's
zero diagonal plus the linear term, or a PSD ``H`` with its diagonal when called directly).

Example:
    >>> import numpy as np
    >>> from qblock.backends.miqp import topk_scip  # doctest: +SKIP
    >>> X, e, stats = topk_scip(np.eye(4), None, 2, k=3)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from typing import Any

import dimod
import numpy as np

from qblock._lazy import require
from qblock.backends.exact import MatrixSampler
from qblock.problems._states import check_num_remove

__all__ = ["topk_gurobi", "topk_scip", "GurobiTopKSampler", "SCIPTopKSampler"]


def _prepare(H: np.ndarray, linear: np.ndarray | None, num_remove: int, k: int):
    H = np.asarray(H, dtype=np.float64)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square, got shape {H.shape}")
    n = H.shape[0]
    lin = np.zeros(n) if linear is None else np.asarray(linear, dtype=np.float64).reshape(-1)
    if lin.shape != (n,):
        raise ValueError(f"linear must have length {n}")
    M = check_num_remove(num_remove, n)
    if int(k) < 1:
        raise ValueError("k must be at least 1")
    return 0.5 * (H + H.T), lin, M, min(int(k), math.comb(n, M))


def _convex_form(H: np.ndarray, lin: np.ndarray, M: int,
                 deadline: float | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """An equivalent objective for binaries with a PSD quadratic (``x_i^2 = x_i`` moves the diagonal).

    If ``H`` is already PSD it is returned unchanged. Otherwise the diagonal becomes the QCR diagonal
    of :func:`qblock.backends.bnb.convexify` plus the smallest uniform shift that makes it PSD on all
    of R^N, so MIQP solvers see a convex problem (they are much faster on one). The QCR iterations stop
    at ``deadline`` (a ``time.perf_counter()`` value): the shift keeps the form exact, only less tight.
    """
    if np.linalg.eigvalsh(H)[0] >= -1e-12 * max(1.0, float(np.abs(H).max())):
        return H, lin, False
    from qblock.backends.bnb import _convexify

    Q = H - np.diag(np.diag(H))
    c = lin + np.diag(H)
    u = _convexify(Q, c, M, "qcr", 300, nonneg=False, deadline=deadline)[0]
    lam = float(np.linalg.eigvalsh(Q + np.diag(u))[0])
    if lam < 0:
        u = u - lam
    return Q + np.diag(u), c - u, True


def _gap(energies: np.ndarray, k: int, lower: float, certified: bool) -> float:
    """The gap every backend reports: the k-th energy minus a bound of every state not returned, in energy units
    (0 when certified; ``inf`` with fewer than k states or no finite bound).

    Example:
        >>> _gap(np.array([1.0, 2.5]), 2, 2.0, False), _gap(np.array([1.0]), 2, 0.0, False)
        (0.5, inf)
        >>> _gap(np.array([1.0]), 1, -5.0, True)
        0.0
    """
    if certified:
        return 0.0
    if len(energies) < k or not math.isfinite(lower):
        return math.inf
    return max(0.0, float(energies[k - 1]) - lower)


def _half_time(t0: float, time_limit: float | None) -> float | None:
    """The deadline of the convex form: half the time limit, so the solver keeps the other half."""
    return None if time_limit is None else t0 + 0.5 * float(time_limit)


def _unit_scale(H: np.ndarray, lin: np.ndarray) -> float:
    """The factor that brings the largest coefficient to 1: a solver's absolute tolerances (about 1e-6)
    then cannot swallow an instance's whole energy range (Fisher energies of order 1e-6 came back
    "certified" in the wrong order)."""
    top = max(float(np.abs(H).max(initial=0.0)), float(np.abs(lin).max(initial=0.0)))
    return 1.0 / top if top > 0 else 1.0


def _sorted_result(H, lin, states: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not states:
        return np.zeros((0, H.shape[0]), dtype=np.int8), np.zeros(0)
    X = np.unique(np.array(states, dtype=np.int8), axis=0)
    Xf = X.astype(np.float64)
    e = np.einsum("ij,ij->i", Xf @ H, Xf) + Xf @ lin
    order = np.lexsort(tuple(X[:, ::-1].T) + (e,))
    return X[order], e[order]


def topk_gurobi(
    H: np.ndarray,
    linear: np.ndarray | None,
    num_remove: int,
    k: int = 20,
    time_limit: float | None = None,
    *,
    threads: int | None = None,
    verbose: bool = False,
    convex: bool = True,
    linearize: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The k best states by Gurobi's solution pool (``PoolSearchMode=2``).

    ``linearize`` sets ``PreQLinearize=2`` (Gurobi solves a linearised MILP); ``None`` (default) does so
    for N <= 16 only: on small instances with a linear term Gurobi 13's pool search on the quadratic
    form stalled (77,000 nodes in 20 s for N=10, M=4), while the quadratic form was faster on larger
    ones (real N=30 problem: 0.15 s quadratic vs 5 s linearised; N=80: ~3x).

    With ``convex`` (default) a non-PSD ``H`` (e.g. the zero-diagonal form of a BQM) is first rewritten
    with a convexifying diagonal (:func:`_convex_form`); the states and energies are unchanged.

    Returns:
        ``(X, energies, stats)`` like :func:`qblock.backends.bnb.topk`; ``stats["certified"]`` is True
        when Gurobi reports OPTIMAL for the pool.
    """
    gp = require("gurobipy", "gurobi")
    H, lin, M, k = _prepare(H, linear, num_remove, k)
    n = H.shape[0]
    H0, lin0 = H, lin  # energies are reported in the original form
    t0 = time.perf_counter()  # time_limit bounds the whole solve, the convex form included
    if convex:
        H, lin, _ = _convex_form(H, lin, M, _half_time(t0, time_limit))
    scale = _unit_scale(H, lin)
    H, lin = H * scale, lin * scale
    env = gp.Env(empty=True)
    env.setParam("OutputFlag", 1 if verbose else 0)
    env.start()
    try:
        model = gp.Model(env=env)
        if time_limit is not None:
            model.Params.TimeLimit = max(0.0, float(time_limit) - (time.perf_counter() - t0))
        if threads is not None:
            model.Params.Threads = int(threads)
        if linearize or (linearize is None and n <= 16):
            model.Params.PreQLinearize = 2
        model.Params.PoolSearchMode = 2
        model.Params.PoolSolutions = k
        model.Params.MIPGap = 0.0
        model.Params.MIPGapAbs = 0.0
        x = model.addMVar(n, vtype=gp.GRB.BINARY, name="x")
        model.setObjective(x @ H @ x + lin @ x, gp.GRB.MINIMIZE)
        model.addConstr(x.sum() == M)
        model.optimize()
        if model.Status == gp.GRB.INTERRUPTED:  # Gurobi catches Ctrl-C itself; pass it on
            raise KeyboardInterrupt
        states = []
        for i in range(model.SolCount):
            model.Params.SolutionNumber = i
            states.append(np.rint(np.array(x.Xn)).astype(np.int8))
        certified = model.Status == gp.GRB.OPTIMAL and len(states) >= k
        stats = {
            "certified": bool(certified),
            "nodes": int(model.NodeCount),
            "bound": "gurobi",
            "status": int(model.Status),
            "time_limit_reached": model.Status == gp.GRB.TIME_LIMIT,
            # a bound of the optimum, so of every state (the convex form has the same feasible energies)
            "lower_bound": (float(model.ObjBound) / scale if certified or model.Status == gp.GRB.TIME_LIMIT
                            else -math.inf),
        }
    except gp.GurobiError as exc:
        raise RuntimeError(f"Gurobi failed: {exc} (the pip licence is size-limited)") from None
    finally:
        env.dispose()
    X, e = _sorted_result(H0, lin0, states)
    # not Gurobi's MIPGap: that is relative, and about the best state only
    stats["gap"] = _gap(e, k, stats["lower_bound"], certified)
    stats["time"] = time.perf_counter() - t0
    return X[:k], e[:k], stats


def topk_scip(
    H: np.ndarray,
    linear: np.ndarray | None,
    num_remove: int,
    k: int = 20,
    time_limit: float | None = None,
    *,
    threads: int | None = None,
    verbose: bool = False,
    convex: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The k best states by k SCIP solves with no-good cuts (objective as an epigraph constraint).

    ``time_limit`` bounds the whole sequence; ``stats["certified"]`` is True when every solve was
    proven optimal. ``stats["first_time"]`` is the time of the first (ground-state) solve. When the
    time runs out, ``stats["time_limit_reached"]`` is True and ``stats["lower_bound"]`` bounds every
    state not returned as certified (the last proven optimum, or SCIP's dual bound of the unfinished
    solve); ``stats["gap"]`` is the k-th returned energy minus it (``inf`` with fewer than k states).
    """
    scip = require("pyscipopt", "miqp")
    H, lin, M, k = _prepare(H, linear, num_remove, k)
    n = H.shape[0]
    H0, lin0 = H, lin
    t0 = time.perf_counter()  # time_limit bounds the whole sequence, the convex form included
    if convex:
        H, lin, _ = _convex_form(H, lin, M, _half_time(t0, time_limit))
    scale = _unit_scale(H, lin)
    H, lin = H * scale, lin * scale
    model = scip.Model()
    if not verbose:
        model.hideOutput()
    model.setParam("numerics/feastol", 1e-9)  # the epigraph row t >= energy: its slack is an energy error
    x = [model.addVar(vtype="B", name=f"x{i}") for i in range(n)]
    lo = float(np.minimum(H, 0).sum() + np.minimum(lin, 0).sum())
    hi = float(np.maximum(H, 0).sum() + np.maximum(lin, 0).sum())
    t = model.addVar(lb=lo - 1.0, ub=hi + 1.0, name="t")
    iu = np.triu_indices(n, 1)
    quad = scip.quicksum(float(2 * H[i, j]) * x[i] * x[j] for i, j in zip(*iu) if H[i, j] != 0.0)
    lin_terms = scip.quicksum(float(lin[i] + H[i, i]) * x[i] for i in range(n))
    model.addCons(t >= quad + lin_terms)
    model.addCons(scip.quicksum(x) == M)
    model.setObjective(t, "minimize")
    states: list[np.ndarray] = []
    certified = True
    out_of_time = False
    lower = -math.inf  # every state not yet proven among the best is at least this
    nodes = 0
    first_time = None
    for _ in range(k):
        if time_limit is not None:
            left = time_limit - (time.perf_counter() - t0)
            if left <= 0:
                certified, out_of_time = False, True
                break
            model.setParam("limits/time", left)
        model.optimize()
        nodes += int(model.getNNodes())
        status = model.getStatus()
        if status == "userinterrupt":  # SCIP catches Ctrl-C itself; pass it on instead of a partial list
            raise KeyboardInterrupt
        if status != "optimal":
            # the unfinished solve's dual bound holds for every state not cut off yet
            lower = max(lower, float(model.getDualbound()) / scale)
        if model.getNSols() == 0:
            certified = certified and status == "infeasible"
            out_of_time = status == "timelimit"
            break
        sol = model.getBestSol()
        s = np.array([round(model.getSolVal(sol, v)) for v in x], dtype=np.int8)
        if status != "optimal":
            certified = False
            out_of_time = status == "timelimit"
            states.append(s)
            break
        states.append(s)
        lower = max(lower, float(s @ H0 @ s + lin0 @ s))  # the optimum over the states not cut off
        if first_time is None:
            first_time = time.perf_counter() - t0
        model.freeTransform()
        ones = np.flatnonzero(s == 1)
        model.addCons(scip.quicksum(x[i] for i in ones) <= M - 1)
    X, e = _sorted_result(H0, lin0, states)
    certified = certified and X.shape[0] >= k
    gap = _gap(e, k, lower, certified)
    return X[:k], e[:k], {"certified": bool(certified), "nodes": nodes, "bound": "scip", "gap": gap,
                          "time": time.perf_counter() - t0, "first_time": first_time,
                          "time_limit_reached": bool(out_of_time), "lower_bound": lower}


def _fill_uncertified(H: np.ndarray, lin: np.ndarray, M: int, k: int, X: np.ndarray, e: np.ndarray,
                      lower: float) -> tuple[np.ndarray, np.ndarray, float]:
    """A solver that ran out of time with fewer than k states: add a quick local search's states.

    The result stays labelled uncertified; the gap is the k-th energy above ``lower`` (a bound of
    every state the solver did not prove), or above the simple row bound if that is tighter.

    Returns:
        ``(states, energies, gap)`` in (energy, state) order.
    """
    from qblock.backends.bnb import _initial_threshold, _simple_bound

    Q = H - np.diag(np.diag(H))
    c = lin + np.diag(H)
    _, _, Xh, _ = _initial_threshold(Q, c, M, k, seed=0, starts=8, deadline=0.0)  # one quick pass
    Xs, es = _sorted_result(H, lin, list(X) + list(Xh))
    lower = max(lower, _simple_bound(Q, c, M))
    return Xs[:k], es[:k], _gap(es, k, lower, False)


class _MIQPSampler(MatrixSampler):
    """Common dimod wrapper: objective BQM + ``num_remove`` -> certified top-k (when the solver finishes)."""

    _solver = staticmethod(topk_scip)
    _name = ""
    parameters = {"num_remove": [], "num_solutions": [], "time_limit": [], "threads": [], "verbose": []}
    properties: dict[str, Any] = {}

    def sample_matrices(self, H: np.ndarray, lin: np.ndarray, offset: float, *, num_remove: int,
                        num_solutions: int = 20, time_limit: float | None = None, threads: int | None = None,
                        verbose: bool = False, **kwargs: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """The certified top-k of ``x^T H x + lin^T x + offset`` with ``num_remove`` ones (``sample`` takes its BQM)."""
        if kwargs:
            raise TypeError(f"unknown parameters for {self._name}: {', '.join(kwargs)}")
        t0 = time.perf_counter()
        X, e, stats = type(self)._solver(H, lin, num_remove, num_solutions, time_limit, threads=threads, verbose=verbose)
        k = min(int(num_solutions), math.comb(H.shape[0], int(num_remove)))
        if not stats["certified"] and X.shape[0] < k:
            # out of time before k states were found: never return an empty or short list silently
            X, e, stats["gap"] = _fill_uncertified(H, lin, int(num_remove), k, X, e, stats.get("lower_bound", -math.inf))
            stats["filled_by_local_search"] = True
        info = dict(stats)
        # the solvers bound x^T H x + lin^T x; the energies reported include the offset, so must the bound
        bound = info.get("lower_bound", -math.inf)
        info["lower_bound"] = float(bound) + offset if math.isfinite(bound) else None
        info["certified_optimal"] = bool(stats["certified"])
        info["timing"] = time.perf_counter() - t0
        return X, e + offset, info


class SCIPTopKSampler(_MIQPSampler):
    """SCIP top-k by no-good cuts, as a dimod sampler (needs ``pyscipopt``).

    Example:
        >>> import dimod
        >>> bqm = dimod.BQM({0: 1.0, 1: 2.0, 2: 3.0}, {(0, 1): 5.0}, 0.0, "BINARY")
        >>> ss = SCIPTopKSampler().sample(bqm, num_remove=2, num_solutions=2)  # doctest: +SKIP
        >>> list(ss.record.energy)  # doctest: +SKIP
        [4.0, 5.0]
    """

    _solver = staticmethod(topk_scip)
    _name = "scip"


class GurobiTopKSampler(_MIQPSampler):
    """Gurobi top-k by its solution pool, as a dimod sampler (needs ``gurobipy``; pip licence is size-limited)."""

    _solver = staticmethod(topk_gurobi)
    _name = "gurobi"
