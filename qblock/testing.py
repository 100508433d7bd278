"""Conformance checks every backend must pass, in the spirit of :mod:`dimod.testing`.

Use :func:`check_backend` from a test (it raises ``AssertionError`` naming what failed), or
:func:`conformance_problems` to get the standard instances. The suite runs over every problem kind
the backend accepts: block removal (:func:`conformance_problems`) and rank selection
(:func:`rank_conformance_problems`); the oracle is brute force over all states.

Example:
    >>> from qblock.testing import check_backend
    >>> check_backend("exact")  # raises AssertionError on any failure
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable

import dimod
import numpy as np

from qblock.problems.block_removal import BlockRemovalProblem
from qblock.problems.synthetic import random_problem

__all__ = ["brute_force_topk", "conformance_problems", "rank_conformance_problems", "check_sampleset",
           "check_backend"]


def brute_force_topk(problem: Any, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """All feasible states by ``itertools.combinations`` (or all ``2^N`` states for rank problems); the ``k`` lowest."""
    if problem.kind != "block_removal":
        n = problem.num_variables
        X = np.array(list(itertools.product((0, 1), repeat=n)), dtype=np.int8)
        X = X[problem.feasible_mask(X)]
        e = problem.energies(X)
        order = np.argsort(e, kind="stable")[:k]
        return X[order], e[order]
    n, m = problem.num_blocks, problem._require_m()
    X = np.zeros((0, n), dtype=np.int8) if m > n else np.array(
        [[1 if i in c else 0 for i in range(n)] for c in itertools.combinations(range(n), m)], dtype=np.int8
    ).reshape(-1, n)
    e = problem.energies(X)
    order = np.argsort(e, kind="stable")[:k]
    return X[order], e[order]


def conformance_problems(max_blocks: int = 14) -> list[BlockRemovalProblem]:
    """Small standard instances: PSD (paper structure), with a linear term, and edge cases."""
    n = min(max_blocks, 14)
    probs = [
        random_problem(n, 5 if n >= 10 else max(1, n // 3), seed=11),
        random_problem(n, 4 if n >= 10 else max(1, n // 4), linear=True, seed=12),
        random_problem(min(n, 8), 2, correlation=0.0, seed=13),
    ]
    return probs


def rank_conformance_problems() -> list:
    """Small rank-selection instances: fisher+grad with the prefix rule, fisher without it, a separable one.

    Example:
        >>> [p.num_variables for p in rank_conformance_problems()]
        [9, 7, 7]
    """
    from qblock.problems.rank_selection import from_gate_gradients, group_costs

    def layout(shapes, c):
        costs, mat, pos = [], [], []
        for l, (m, n) in enumerate(shapes):
            for k, cost in enumerate(group_costs(m, n, c)):
                costs.append(cost), mat.append(l), pos.append(k)
        return costs, mat, pos

    rng = np.random.default_rng(21)
    out = []
    for shapes, c, energy, prefix, couplings, frac in (
        ([(8, 6), (6, 4), (10, 8)], 2, "fisher+grad", True, "full", 0.6),
        ([(5, 4), (6, 5), (4, 4)], 2, "fisher", False, "full", 0.5),
        ([(8, 6), (12, 8)], 2, "fisher+grad", True, "matrix", 0.5),
    ):
        costs, mat, pos = layout(shapes, c)
        A = rng.normal(size=(48, len(costs))) - 0.3 + 0.2 * rng.normal(size=(48, 1))
        out.append(from_gate_gradients(A, costs, int(frac * sum(costs)), mat, pos, energy=energy,
                                       prefix=prefix, couplings=couplings))
    return out


def check_sampleset(problem: Any, ss: dimod.SampleSet, *, num_solutions: int | None = None) -> None:
    """Structural checks on a result of :func:`qblock.solve`."""
    from qblock import INFO_KEYS

    assert isinstance(ss, dimod.SampleSet), f"expected a dimod.SampleSet, got {type(ss).__name__}"
    assert set(ss.variables) == set(range(problem.num_variables)), "variables must be the indices 0..N-1"
    assert ss.vartype is dimod.BINARY, "results must be BINARY"
    assert len(ss) >= 1, "no solutions returned"
    if num_solutions is not None:
        assert len(ss) <= num_solutions, f"{len(ss)} solutions returned, more than num_solutions={num_solutions}"
    X = problem.states_from_sampleset(ss)
    assert np.all(problem.feasible_mask(X)), "every returned state must be feasible"
    assert len(np.unique(X, axis=0)) == len(X), "returned states must be distinct"
    e = np.asarray(ss.record.energy)
    assert np.allclose(e, problem.energies(X), rtol=1e-9, atol=1e-9), "energies must equal problem.energy (no penalty)"
    assert np.all(np.diff(e) >= -1e-12), "states must be sorted by energy"
    missing = [k for k in INFO_KEYS if k not in ss.info]
    assert not missing, f"info is missing keys {missing}"
    assert isinstance(ss.info["timing"], float) and ss.info["timing"] >= 0, "info['timing'] must be seconds"


def check_backend(
    backend: str,
    problems: Iterable[Any] | None = None,
    *,
    num_solutions: int = 10,
    seed: int = 7,
    check_optimum: bool = True,
    **params: Any,
) -> None:
    """Run the whole conformance suite for one backend.

    Checks: the backend's sampler follows dimod's sampler API (:func:`dimod.testing.assert_sampler_api`:
    ``parameters``, ``properties``, the ``sample*`` methods; cloud backends, whose runners build their
    sampler, are checked by their own tests); a SampleSet over the right variables; energies equal
    ``problem.energy``; all states feasible, distinct and sorted; the same seed gives the same result;
    the shared ``info`` keys; and (with ``check_optimum``) the best state equals brute force on these
    small instances. Without
    ``problems`` it runs over the standard instances of every problem kind the backend accepts.
    """
    import qblock
    from qblock import backends

    spec = backends.get_spec(backend)
    if spec.check is None:
        import dimod.testing

        dimod.testing.assert_sampler_api(backends.get_sampler(backend))
    if problems is None:
        problems = conformance_problems() + (rank_conformance_problems() if spec.accepts("rank_selection") else [])
    for p in problems:
        ss = qblock.solve(p, backend, num_solutions=num_solutions, seed=seed, **params)
        check_sampleset(p, ss, num_solutions=num_solutions)
        assert ss.info["backend"] == backend
        again = qblock.solve(p, backend, num_solutions=num_solutions, seed=seed, **params)
        assert np.array_equal(problem_states(p, ss), problem_states(p, again)), (
            f"{backend}: the same seed must give the same result"
        )
        if check_optimum:
            _, e_best = brute_force_topk(p, 1)
            assert abs(ss.first.energy - e_best[0]) <= 1e-9 * max(1.0, abs(e_best[0])), (
                f"{backend}: best energy {ss.first.energy} is not the optimum {e_best[0]} ({p!r})"
            )
        if ss.info.get("certified_optimal"):
            Xb, eb = brute_force_topk(p, len(ss))
            assert np.allclose(ss.record.energy, eb), f"{backend}: certified top-k differs from brute force"


def problem_states(problem: BlockRemovalProblem, ss: dimod.SampleSet) -> np.ndarray:
    return problem.states_from_sampleset(ss)
