import itertools
import math

import dimod
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qblock
from qblock import backends
from qblock.backends.exact import ExactTopKSampler, enumerate_topk
from qblock.backends.local_search import repair, swap_descent, swap_neighbours
from qblock.backends.swap import SwapAnnealingSampler
from qblock.testing import brute_force_topk, check_backend

LOCAL = ["exact", "swap", "sa", "tabu", "steepest"]


def available_backends():
    """Every registered backend that can run here (cloud ones are covered by mocked tests)."""
    return [n for n, a in backends.available().items() if a["available"]]


@pytest.mark.parametrize("name", LOCAL)
def test_conformance_local(name):
    check_backend(name)


@pytest.mark.parametrize("name", sorted(set(available_backends()) - set(LOCAL)))
def test_conformance_other_available(name):
    # quantum simulators: small instances only (qubits = N)
    problems = [qblock.random_problem(8, 2, seed=21), qblock.random_problem(8, 3, linear=True, seed=22)]
    check_backend(name, problems, num_solutions=5)


def test_registry_lists_builtin_backends_and_reasons():
    av = backends.available()
    for name in LOCAL:
        assert av[name]["available"], av[name]
    for name in ("qaoa", "leap-hybrid", "leap-cqm", "dwave-qpu"):
        assert name in av
        if not av[name]["available"]:
            assert av[name]["reason"]
    with pytest.raises(ValueError, match="unknown backend"):
        backends.get_spec("nope")


def test_solve_is_the_function_and_info_keys_are_public():
    # the solve module is private (qblock._solve), so the function qblock.solve hides nothing
    assert callable(qblock.solve) and qblock.solve.__module__ == "qblock._solve"
    ss = qblock.solve(qblock.random_problem(8, 2, seed=0), "exact", num_solutions=2)
    assert set(qblock.INFO_KEYS) <= set(ss.info)


def test_backends_are_dimod_samplers():
    assert isinstance(ExactTopKSampler(), dimod.Sampler)
    assert isinstance(SwapAnnealingSampler(), dimod.Sampler)
    for name in ("sa", "tabu", "steepest"):
        assert isinstance(backends.get_sampler(name), dimod.Sampler)


def test_exact_top20_equals_brute_force_n14_m5():
    for seed in range(3):
        p = qblock.random_problem(14, 5, seed=seed, linear=bool(seed == 2))
        ss = qblock.solve(p, "exact", num_solutions=20)
        Xb, eb = brute_force_topk(p, 20)
        assert np.allclose(ss.record.energy, eb)
        assert ss.info["certified_optimal"] is True


@pytest.mark.parametrize("name", ["swap", "sa", "tabu"])
def test_heuristics_find_optimum_n14_m5_default_params(name):
    for seed in range(3):
        p = qblock.random_problem(14, 5, seed=100 + seed)
        _, eb = brute_force_topk(p, 1)
        ss = qblock.solve(p, name, seed=seed)
        assert ss.first.energy == pytest.approx(eb[0], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("n,m", [(5, 0), (5, 5), (6, 1), (6, 5), (1, 1)])
def test_edge_cardinalities(n, m):
    p = qblock.random_problem(n, m, seed=1)
    for name in ("exact", "swap", "sa"):
        ss = qblock.solve(p, name, num_solutions=3, seed=0)
        Xb, eb = brute_force_topk(p, 3)
        assert len(ss) == min(3, math.comb(n, m))
        assert ss.first.energy == pytest.approx(eb[0])


def test_exact_enumerates_n30_m8_and_n40_m6():
    # timings of this case live in benchmarks/ (no wall-clock asserts in the suite)
    for n, m in [(30, 8), (40, 6)]:
        p = qblock.random_problem(n, m, seed=0)
        ss = qblock.solve(p, "exact", num_solutions=20)
        assert ss.info["states_visited"] == math.comb(n, m)
        assert ss.info["certified_optimal"] is True
        # the certified optimum cannot be beaten by a heuristic
        assert qblock.solve(p, "swap", seed=0).first.energy >= ss.first.energy - 1e-12


def test_exact_agrees_with_dimod_exact_solver():
    p = qblock.random_problem(16, 4, seed=3)
    ours = qblock.solve(p, "exact", num_solutions=5)
    ref = p.decode(dimod.ExactSolver().sample(p.to_bqm()))
    assert np.allclose(ours.record.energy, ref.record.energy[:5])
    assert ours.info["states_visited"] == math.comb(16, 4)  # only the feasible slice, not all 2^16


def test_exact_chunked_paths_agree():
    rng = np.random.default_rng(0)
    H = rng.normal(size=(13, 13))
    H = (H + H.T) / 2
    lin = rng.normal(size=13)
    base = enumerate_topk(H, lin, 6, 30)
    for cap, chunk in [(1, 7), (50, 100), (10**9, 10**9)]:
        X, e, n = enumerate_topk(H, lin, 6, 30, suffix_cap=cap, chunk_entries=chunk)
        assert n == math.comb(13, 6)
        assert np.allclose(e, base[1]) and np.array_equal(X, base[0])


@pytest.mark.parametrize("kind", ["real", "integer ties"])
def test_exact_removing_more_than_half_equals_brute_force(kind):
    """M > N/2 enumerates the kept blocks instead: the same states, energies and tie order as sorting all."""
    rng = np.random.default_rng(1)
    n = 11
    A = rng.normal(size=(n, n)) if kind == "real" else rng.integers(-1, 2, size=(n, n)).astype(float)
    H, lin = A + A.T, (rng.normal(size=n) if kind == "real" else rng.integers(-1, 2, size=n).astype(float))
    for M in (6, 8, 10, 11):
        C = np.array(list(itertools.combinations(range(n), M)))
        X = np.zeros((len(C), n), dtype=np.int8)
        np.put_along_axis(X, C, 1, axis=1)
        e = np.einsum("si,ij,sj->s", X, H, X) + X @ lin
        order = np.lexsort(tuple(X[:, ::-1].T) + (e,))[:25]
        for cap, chunk in [(1, 7), (10**9, 10**9)]:
            Xk, ek, visited = enumerate_topk(H, lin, M, 25, suffix_cap=cap, chunk_entries=chunk)
            assert visited == len(C) and np.array_equal(Xk, X[order]) and np.allclose(ek, e[order], atol=1e-9)


def test_exact_sampler_on_plain_bqm_with_string_labels():
    bqm = dimod.BQM({"a": 1.0, "b": -2.0, "c": 0.5}, {("a", "b"): 3.0, ("b", "c"): -1.0}, 2.0, "BINARY")
    ss = ExactTopKSampler().sample(bqm, num_remove=2, num_solutions=3)
    for sample, energy in ss.data(["sample", "energy"]):
        assert bqm.energy(sample) == pytest.approx(energy)
        assert sum(sample.values()) == 2
    ref = sorted(bqm.energy(dict(zip("abc", c))) for c in [(1, 1, 0), (1, 0, 1), (0, 1, 1)])
    assert np.allclose(ss.record.energy, ref)


def test_penalty_info_and_scan():
    p = qblock.random_problem(20, 5, seed=4)
    ss = qblock.solve(p, "sa", seed=1, num_reads=8)
    from qblock._solve import DEFAULT_PENALTY_SCAN

    assert ss.info["num_reads"] == 8 * len(DEFAULT_PENALTY_SCAN)
    assert 0 <= ss.info["num_infeasible"] <= ss.info["num_reads"]
    assert ss.info["penalty"] in [s["penalty"] for s in ss.info["penalty_scan"]]
    one = qblock.solve(p, "sa", seed=1, num_reads=8, penalty=p.safe_penalty())
    assert len(one.info["penalty_scan"]) == 1


def test_same_seed_same_result_and_different_seeds_run():
    p = qblock.random_problem(24, 6, seed=5)
    a = qblock.solve(p, "swap", seed=3, num_solutions=10)
    b = qblock.solve(p, "swap", seed=3, num_solutions=10)
    assert np.array_equal(a.record.sample, b.record.sample)
    assert a.info["seed"] == 3


def test_local_search_helpers():
    p = qblock.random_problem(12, 4, linear=True, seed=6)
    rng = np.random.default_rng(0)
    X = rng.integers(0, 2, size=(20, 12))
    R = repair(p.H, p.linear, X, 4)
    assert np.all(R.sum(1) == 4)
    D, _ = swap_descent(p.H, p.linear, R)
    assert np.all(p.energies(D) <= p.energies(R) + 1e-12)
    for x in D:  # a swap-local minimum: no neighbour is lower
        assert p.energies(swap_neighbours(x)).min() >= p.energy(x) - 1e-12
    assert len(swap_neighbours(D[0])) == 4 * 8


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 9),
    data=st.data(),
    seed=st.integers(0, 2**16),
    with_linear=st.booleans(),
)
def test_property_exact_and_swap_vs_brute_force(n, data, seed, with_linear):
    m = data.draw(st.integers(0, n))
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n + 2, n))
    lin = rng.normal(size=n) if with_linear else None
    p = qblock.BlockRemovalProblem(A.T @ A / (n + 2), m, linear=lin)
    k = data.draw(st.integers(1, 12))
    Xb, eb = brute_force_topk(p, k)
    ss = qblock.solve(p, "exact", num_solutions=k)
    assert np.allclose(ss.record.energy, eb)
    sw = qblock.solve(p, "swap", num_solutions=k, seed=seed, num_reads=8, num_sweeps=20)
    assert sw.first.energy == pytest.approx(eb[0], abs=1e-9)
    assert np.all(p.states_from_sampleset(sw).sum(1) == m)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(3, 10), seed=st.integers(0, 2**16))
def test_property_safe_penalty_bqm_minimum_is_feasible_optimum(n, seed):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n))
    m = int(rng.integers(1, n))
    p = qblock.BlockRemovalProblem(A.T @ A / n, m, linear=rng.normal(size=n))
    ss = dimod.ExactSolver().sample(p.to_bqm())
    x = p.states_from_sampleset(ss.truncate(1))[0]
    _, eb = brute_force_topk(p, 1)
    assert x.sum() == m and p.energy(x) == pytest.approx(eb[0])


@pytest.mark.parametrize("name", ["swap", "sa", "tabu"])
def test_heuristic_top10_equals_certified_top10(name):
    # users want the low excited states too, not only the ground state
    p = qblock.random_problem(24, 6, seed=8, num_samples=512)
    ex = qblock.solve(p, "exact", num_solutions=10)
    ss = qblock.solve(p, name, num_solutions=10, seed=0)
    assert np.allclose(ss.record.energy, ex.record.energy)


def test_topk_closure_recovers_excited_states_from_the_optimum_alone():
    from qblock.backends.local_search import topk_closure

    p = qblock.random_problem(20, 5, seed=2)
    ex = qblock.solve(p, "exact", num_solutions=15)
    X = topk_closure(p.H, p.linear, p.states_from_sampleset(ex)[:1], 15)
    assert np.allclose(p.energies(X), ex.record.energy)


def test_saved_files_have_normal_permissions(tmp_path):
    import os
    import stat

    f = qblock.random_problem(4, 1, seed=0).save(tmp_path / "p.npz")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o666 & ~umask


def test_exact_ties_resolve_the_same_for_enumeration_and_bnb():
    # every pair has the same energy: the top-k is decided by the tie rule alone
    p = qblock.BlockRemovalProblem(np.eye(9), 2)
    a = qblock.solve(p, "exact", num_solutions=7, strategy="enumerate")
    b = qblock.solve(p, "exact", num_solutions=7, strategy="bnb")
    assert np.array_equal(p.states_from_sampleset(a), p.states_from_sampleset(b))
    X = p.states_from_sampleset(a)
    # energy, then lexicographic order of the 0/1 vector
    assert [tuple(x) for x in X] == sorted(tuple(x) for x in X)


@pytest.mark.parametrize("entry", ["enumerate_topk", "exact", "swap", "bnb", "qaoa", "miqp", "problem", "refine"])
@pytest.mark.parametrize("m", [-1, 5, 2.5, True])
def test_every_entry_point_refuses_a_bad_m_with_one_message(entry, m):
    """One rule for M (qblock.problems._states.check_num_remove), so one message wherever M enters."""
    from qblock.backends import bnb, miqp, qaoa
    from qblock.problems._states import check_num_remove

    n = 4
    H = np.ones((n, n)) - np.eye(n)
    lin = np.zeros(n)
    calls = {
        "enumerate_topk": lambda: enumerate_topk(H, lin, m, 1),
        "exact": lambda: ExactTopKSampler().sample_matrices(H, lin, 0.0, num_remove=m, num_solutions=1),
        "swap": lambda: SwapAnnealingSampler().sample_matrices(H, lin, 0.0, num_remove=m, num_solutions=1),
        "bnb": lambda: bnb.topk(H, lin, m, 1),
        "qaoa": lambda: qaoa._checked_settings(n, m, "xy", "cobyla", "dicke", 1, 8, 1, 22, "statevector"),
        "miqp": lambda: miqp._prepare(H, lin, m, 1),
        "problem": lambda: qblock.random_problem(n, 1, seed=0).with_num_remove(m),
        "refine": lambda: _refine_with_m(m),
    }
    with pytest.raises(ValueError) as want:
        check_num_remove(m, n, low=1 if entry == "refine" else 0)
    with pytest.raises(ValueError) as got:
        calls[entry]()
    assert str(got.value) == str(want.value)


def _refine_with_m(m):
    from qblock.select import refine

    return refine(None, qblock.random_problem(4, 1, seed=0), m, budget_tokens=0)  # M is checked first
