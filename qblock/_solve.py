"""One entry point for every backend: :func:`solve`."""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

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

    Everything is checked before any work starts: the parameters against the backend's declared
    ones (:func:`qblock.backends.validate_params`: the same rule for every backend, one-line errors),
    the seed, and the memory the solve would need (:mod:`qblock.backends._limits`).

    Args:
        problem: the block-removal problem (``num_remove`` must be set).
        backend: a name from :func:`qblock.backends.names` (``"swap"``, ``"exact"``, ``"sa"``, ...).
        num_solutions: how many distinct feasible states to return at most (the top-k). Values above
            the number of feasible states ``C(N, M)`` are capped to it (there are no more states);
            a top-k whose states alone would not fit in memory is refused.
        seed: random seed, a non-negative integer below ``2**32``; the same seed gives the same result.
        **params: the backend's parameters (``qblock backends`` lists the backends; each one's
            declared parameters are in ``qblock.backends.get_spec(name).params``), e.g. ``num_reads``,
            ``num_sweeps``; penalty backends also take ``penalty`` (one strength) or ``penalty_scan``
            (fractions of the safe strength), ``repair`` and ``polish`` (both default True); the
            certified backends take ``time_limit`` (seconds for the whole solve; an out-of-time
            result has ``info["certified_optimal"] = False``, ``info["time_limit_reached"] = True``
            and ``info["gap"]``).

    Returns:
        A :class:`dimod.SampleSet` over variables ``0..N-1`` holding only feasible, distinct states,
        sorted by the unpenalised energy, with ``info`` keys :data:`INFO_KEYS` (plus backend extras).

    Raises:
        ValueError: unknown backend, unknown or invalid parameter, invalid seed, ``num_remove`` not
            set, or a problem too large for the memory limit (one line each).
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
    from qblock.backends import _limits

    spec = backends.get_spec(backend)
    m = _check_problem(problem, backend, spec)
    params = backends.validate_params(backend, params)
    seed = _check_seed(seed)
    requested = _check_num_solutions(num_solutions)
    num_solutions = min(requested, problem.num_states)  # there are no more distinct feasible states
    _limits.check(backend, problem.num_blocks, m or 0, num_solutions, params, spec.kind, requested=requested)
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


def _check_problem(problem: Any, backend: str, spec: Any) -> int | None:
    """The problem's ``M`` (``None`` for problems without one); a clear error if ``backend`` does not take it.

    A problem declares its kind (``problem.kind``: ``"block_removal"``, ``"rank_selection"``); a backend
    lists the kinds it accepts (:attr:`qblock.backends.BackendSpec.problems`).
    """
    from qblock import backends

    kind = getattr(problem, "kind", None)
    if kind is None or not hasattr(problem, "sampleset_from_states"):
        raise TypeError(f"problem must be a BlockRemovalProblem or RankSelectionProblem, got {type(problem).__name__}")
    if not spec.accepts(kind):
        takers = [n for n in backends.names() if backends.get_spec(n).accepts(kind)]
        raise ValueError(f"backend {backend!r} does not solve {kind} problems; use one of: {', '.join(takers)}")
    return problem._require_m() if isinstance(problem, BlockRemovalProblem) else None


def _check_num_solutions(num_solutions: Any) -> int:
    if isinstance(num_solutions, bool) or not isinstance(num_solutions, (int, np.integer)) or num_solutions < 1:
        raise ValueError(f"num_solutions must be an integer >= 1, got {num_solutions!r}")
    return int(num_solutions)


def _check_seed(seed: Any) -> int | None:
    """``None`` or an integer in ``[0, 2**32)`` (what numpy and the dwave samplers accept)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer from 0 to {2**32 - 1}, got {seed!r}")
    return int(seed)


def _dispatch(problem: BlockRemovalProblem, backend: str, spec: Any, m: int, num_solutions: int,
              seed: int | None, params: dict[str, Any]) -> dimod.SampleSet:
    """Run the backend by its kind (runner, constrained, penalty or CQM) and return feasible states."""
    from qblock import backends

    runner = backends.get_runner(backend, problem.kind)
    if runner is not None:
        sampler = None if spec.check else backends.get_sampler(backend)
        result = runner(problem, sampler, num_solutions=num_solutions, seed=seed, **params)
    elif spec.kind == "constrained":
        result = _constrained(problem, backends.get_sampler(backend), m, num_solutions,
                              {**({"seed": seed} if spec.stochastic else {}), **params})
    elif spec.kind == "penalty":
        sampler = backends.get_sampler(backend)
        result = penalty_pipeline(problem, sampler, num_solutions=num_solutions, seed=seed, **params)
    else:  # cqm without a runner
        sampler = backends.get_sampler(backend)
        raw = sampler.sample_cqm(problem.to_cqm(), **params)
        result = finish(problem, problem.states_from_sampleset(raw), raw.info, num_solutions,
                        num_reads=len(raw), num_infeasible=int((~raw.record.is_feasible).sum()), penalty=None)
    return result


def _constrained(problem: BlockRemovalProblem, sampler: dimod.Sampler, m: int, num_solutions: int,
                 params: dict[str, Any]) -> dimod.SampleSet:
    """A constrained backend's feasible states: on the problem's own matrices when the sampler takes
    them (:class:`qblock.backends.exact.MatrixSampler`: no BQM built and read back), else on its BQM."""
    if hasattr(sampler, "sample_matrices") and hasattr(problem, "objective_matrices"):
        H, linear, offset, _ = problem.objective_matrices()
        X, _, info = sampler.sample_matrices(H, linear, offset, num_remove=m, num_solutions=num_solutions, **params)
    else:
        raw = sampler.sample(problem.objective_bqm(), num_remove=m, num_solutions=num_solutions, **params)
        X, info = problem.states_from_sampleset(raw), raw.info
    return finish(problem, X, info, num_solutions, num_reads=int(info.get("num_reads", len(X))), num_infeasible=0,
                  penalty=None)


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
    (feasible or not), infeasible reads are repaired (``problem.repair_states``: greedy add/drop), every
    read is polished (``problem.polish_states``: 1-in/1-out swap descent for blocks, feasible
    add/drop/exchange descent for ranks), and the best distinct states are grown into a top-k closed
    under those moves (``problem.topk_neighbours``), so the top-k holds the low excited states too.
    The same code serves every problem kind: only these problem methods differ.
    """
    safe = problem.safe_penalty()
    if penalty is not None:
        strengths = [float(penalty)]
    else:
        fractions = DEFAULT_PENALTY_SCAN if penalty_scan is None else tuple(penalty_scan)
        if not fractions:  # an empty scan would run nothing; never fall back silently
            raise ValueError("penalty_scan must hold at least one fraction of the safe penalty strength")
        strengths = [f * safe for f in fractions]
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
        bqm = problem.to_bqm(penalty=lam)
        if "interrupt_function" in getattr(sampler, "parameters", {}) and "interrupt_function" not in kwargs:
            with _ctrl_c_between_reads() as interrupted:
                raw = sampler.sample(bqm, interrupt_function=interrupted, **kwargs)
        else:
            raw = sampler.sample(bqm, **kwargs)
        X = problem.states_from_sampleset(raw)
        X = np.repeat(X, np.asarray(raw.record.num_occurrences), axis=0)
        feasible = problem.feasible_mask(X)
        num_reads += X.shape[0]
        num_infeasible += int((~feasible).sum())
        if repair:
            X = problem.repair_states(X)
        else:
            X = X[feasible]
        if polish and X.shape[0]:
            X = problem.polish_states(np.unique(X, axis=0))
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


@contextmanager
def _ctrl_c_between_reads() -> Iterator[Callable[[], bool]]:
    """A poll function for samplers that call one between reads (dwave's ``interrupt_function``).

    Their C++ loop holds the interpreter for the whole call (N = 2000: 60 s until Ctrl-C took
    effect), and a KeyboardInterrupt raised inside the poll is swallowed; so Ctrl-C only sets a flag
    here, the poll stops the sampler after the current read, and KeyboardInterrupt is raised once
    the sampler has returned. Outside the main thread (no signal handlers there) the poll is a no-op.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return
    hit = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: hit.append(signum))
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)
    if hit:
        raise KeyboardInterrupt


def enrich_with_neighbours(problem: BlockRemovalProblem, X: np.ndarray, num_solutions: int) -> np.ndarray:
    """Add low excited states: grow the reads into a top-k closed under the problem's moves."""
    return np.concatenate([X, problem.topk_neighbours(X, num_solutions)])
