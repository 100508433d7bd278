"""One entry point for every backend: :func:`solve`."""

from __future__ import annotations

import math
import time
from typing import Any

import dimod
import numpy as np

from qblock._threads import single_blas_thread
from qblock.problems.block_removal import BlockRemovalProblem

__all__ = ["solve", "INFO_KEYS", "penalty_pipeline", "finish"]

#: keys every backend's result has in ``SampleSet.info``
INFO_KEYS = ("backend", "timing", "num_reads", "num_infeasible", "penalty", "seed", "certified_optimal")

#: fractions of the safe penalty strength scanned by penalty backends (weak strengths keep neighbouring
#: feasible states reachable for single-flip moves; the strong one guarantees feasibility of the minimum)
DEFAULT_PENALTY_SCAN = (0.005, 0.02, 0.1, 1.0)


def solve(
    problem: BlockRemovalProblem,
    backend: str = "swap",
    num_solutions: int = 20,
    seed: int | None = None,
    **params: Any,
) -> dimod.SampleSet:
    """Solve ``problem`` with a named backend and return its best distinct feasible states.

    Args:
        problem: the block-removal problem (``num_remove`` must be set).
        backend: a name from :func:`qblock.backends.names` (``"swap"``, ``"exact"``, ``"sa"``, ...).
        num_solutions: how many distinct feasible states to return at most (the top-k).
        seed: random seed; the same seed gives the same result.
        **params: passed to the backend's sampler (e.g. ``num_reads``, ``num_sweeps``); penalty backends
            also take ``penalty`` (one strength) or ``penalty_scan`` (fractions of the safe strength),
            ``repair`` and ``polish`` (both default True).

    Returns:
        A :class:`dimod.SampleSet` over variables ``0..N-1`` holding only feasible, distinct states,
        sorted by the unpenalised energy, with ``info`` keys :data:`INFO_KEYS` (plus backend extras).

    Raises:
        ValueError: unknown backend, bad parameters, or ``num_remove`` not set.
        qblock._lazy.MissingDependencyError: the backend's optional dependency is not installed.

    Example:
        >>> import qblock
        >>> p = qblock.random_problem(14, 5, seed=3)
        >>> a = qblock.solve(p, "exact", num_solutions=5)
        >>> b = qblock.solve(p, "swap", num_solutions=5, seed=1)
        >>> bool(abs(a.first.energy - b.first.energy) < 1e-9)
        True
    """
    from qblock import backends

    if not isinstance(problem, BlockRemovalProblem):
        raise TypeError(f"problem must be a BlockRemovalProblem, got {type(problem).__name__}")
    m = problem._require_m()
    if int(num_solutions) < 1:
        raise ValueError("num_solutions must be at least 1")
    num_solutions = int(num_solutions)
    spec = backends.get_spec(backend)
    params = {**spec.defaults, **params}
    if seed is None and spec.stochastic:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    t0 = time.perf_counter()
    with single_blas_thread():  # small matrices: BLAS threads only add contention
        result = _dispatch(problem, backend, spec, m, num_solutions, seed, params)
    result.info["backend"] = backend
    result.info["seed"] = seed
    result.info["timing"] = time.perf_counter() - t0
    result.info.setdefault("certified_optimal", False)
    for key in INFO_KEYS:
        result.info.setdefault(key, None)
    return result


def _dispatch(problem: BlockRemovalProblem, backend: str, spec: Any, m: int, num_solutions: int,
              seed: int | None, params: dict[str, Any]) -> dimod.SampleSet:
    """Run the backend by its kind (runner, constrained, penalty or CQM) and return feasible states."""
    from qblock import backends

    runner = backends.get_runner(backend)
    if runner is not None:
        sampler = None if spec.check else backends.get_sampler(backend)
        result = runner(problem, sampler, num_solutions=num_solutions, seed=seed, **params)
    elif spec.kind == "constrained":
        sampler = backends.get_sampler(backend)
        raw = sampler.sample(
            problem.objective_bqm(), num_remove=m, num_solutions=num_solutions,
            **({"seed": seed} if spec.stochastic else {}), **params,
        )
        result = finish(problem, problem.states_from_sampleset(raw), raw.info, num_solutions,
                        num_reads=int(raw.info.get("num_reads", len(raw))), num_infeasible=0, penalty=None)
    elif spec.kind == "penalty":
        sampler = backends.get_sampler(backend)
        result = penalty_pipeline(problem, sampler, num_solutions=num_solutions, seed=seed, **params)
    else:  # cqm without a runner
        sampler = backends.get_sampler(backend)
        raw = sampler.sample_cqm(problem.to_cqm(), **params)
        result = finish(problem, problem.states_from_sampleset(raw), raw.info, num_solutions,
                        num_reads=len(raw), num_infeasible=int((~raw.record.is_feasible).sum()), penalty=None)
    return result


def finish(
    problem: BlockRemovalProblem,
    X: np.ndarray,
    info: dict[str, Any],
    num_solutions: int,
    *,
    num_reads: int,
    num_infeasible: int,
    penalty: float | None,
) -> dimod.SampleSet:
    """Feasible distinct states of ``X``, sorted by objective, cut to ``num_solutions``."""
    ss = problem.sampleset_from_states(X, info=dict(info))
    ss = ss.truncate(num_solutions, sorted_by="energy") if len(ss) > num_solutions else ss
    ss.info.update({"num_reads": int(num_reads), "num_infeasible": int(num_infeasible), "penalty": penalty})
    ss.info.setdefault("certified_optimal", bool(info.get("certified_optimal", False)))
    return ss


def penalty_pipeline(
    problem: BlockRemovalProblem,
    sampler: dimod.Sampler,
    *,
    num_solutions: int,
    seed: int | None,
    penalty: float | None = None,
    penalty_scan: tuple[float, ...] | None = None,
    repair: bool = True,
    polish: bool = True,
    **params: Any,
) -> dimod.SampleSet:
    """Run a BQM sampler on the PyQUBO penalised model over a scan of penalty strengths.

    Each strength comes from feeding the compiled model's ``Placeholder``; the raw reads are counted
    (feasible or not), infeasible reads are repaired by greedy add/drop, every read is polished by
    1-in/1-out swap descent, and the best distinct states are grown into a top-k closed under swaps
    (so the top-k holds the low excited states too, not only the minima the reads ended in).
    """
    from qblock.backends.local_search import repair as repair_fn
    from qblock.backends.local_search import swap_descent

    m = problem._require_m()
    safe = problem.safe_penalty()
    if penalty is not None:
        strengths = [float(penalty)]
    else:
        strengths = [f * safe for f in (penalty_scan or DEFAULT_PENALTY_SCAN)]
    accepts_seed = "seed" in getattr(sampler, "parameters", {})
    rng = np.random.default_rng(seed)
    all_X, per_strength = [], []
    num_reads = num_infeasible = 0
    best_strength, best_energy = None, math.inf
    for lam in strengths:
        kwargs = dict(params)
        if accepts_seed:
            kwargs["seed"] = int(rng.integers(2**31))
        if "initial_states" not in kwargs and "num_reads" in getattr(sampler, "parameters", {}):
            kwargs.setdefault("num_reads", 32)
        raw = sampler.sample(problem.to_bqm(penalty=lam), **kwargs)
        X = problem.states_from_sampleset(raw)
        X = np.repeat(X, np.asarray(raw.record.num_occurrences), axis=0)
        feasible = X.sum(axis=1) == m
        num_reads += X.shape[0]
        num_infeasible += int((~feasible).sum())
        if repair:
            X = repair_fn(problem.H, problem.linear, X, m)
        else:
            X = X[feasible]
        if polish and X.shape[0]:
            X, _ = swap_descent(problem.H, problem.linear, np.unique(X, axis=0))
        if X.shape[0]:
            e = problem.energies(X).min()
            per_strength.append({"penalty": lam, "best_energy": float(e), "feasible_before_repair": int(feasible.sum())})
            if e < best_energy - 1e-12:
                best_energy, best_strength = float(e), lam
        else:
            per_strength.append({"penalty": lam, "best_energy": None, "feasible_before_repair": 0})
        all_X.append(X)
    X = np.concatenate(all_X) if all_X else np.zeros((0, problem.num_blocks), dtype=np.int8)
    if polish and X.shape[0]:
        X = enrich_with_neighbours(problem, X, num_solutions)
    info = {
        "penalty_scan": per_strength,
        "safe_penalty": safe,
        "repaired": bool(repair),
        "polished": bool(polish),
    }
    return finish(problem, X, info, num_solutions, num_reads=num_reads, num_infeasible=num_infeasible,
                  penalty=best_strength)


def enrich_with_neighbours(problem: BlockRemovalProblem, X: np.ndarray, num_solutions: int) -> np.ndarray:
    """Add low excited states: grow the reads into a top-k closed under 1-in/1-out swaps."""
    from qblock.backends.local_search import topk_closure

    return np.concatenate([X, topk_closure(problem.H, problem.linear, X, num_solutions)])
