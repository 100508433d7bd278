import json

import dimod
import numpy as np
import pytest

import qblock
from qblock import BlockRemovalProblem
from qblock.testing import brute_force_topk


def psd(n, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(3 * n, n))
    return A.T @ A / (3 * n)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(H=np.ones((2, 3)), num_remove=1), "square"),
        (dict(H=np.array([[1.0, 2.0], [0.0, 1.0]]), num_remove=1), "symmetric"),
        (dict(H=np.array([[np.nan, 0.0], [0.0, 1.0]]), num_remove=1), "finite"),
        (dict(H=np.eye(3), num_remove=4), "0 <= M <= N"),
        (dict(H=np.eye(3), num_remove=-1), "0 <= M <= N"),
        (dict(H=np.eye(3), num_remove=1.5), "whole number"),
        (dict(H=np.eye(3), num_remove=1, linear=[1.0, 2.0]), "linear has 2 entries"),
        (dict(H=np.eye(3), num_remove=1, labels=["a", "b"]), "labels has 2"),
        (dict(H=np.eye(3), num_remove=1, labels=["a", "a", "b"]), "distinct"),
        (dict(H=np.eye(2), num_remove=1, metadata={"x": object()}), "JSON"),
        (dict(H=[["a", "b"], ["c", "d"]], num_remove=1), "numeric"),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockRemovalProblem(**kwargs)


def test_tiny_asymmetry_is_averaged():
    H = psd(4)
    H[0, 1] += 1e-12
    p = BlockRemovalProblem(H, 2)
    assert np.array_equal(p.H, p.H.T)


def test_energy_definition_and_vectorised():
    H, lin = psd(6, 1), np.linspace(-1, 1, 6)
    p = BlockRemovalProblem(H, 2, linear=lin, offset=0.5)
    X = np.random.default_rng(0).integers(0, 2, size=(50, 6))
    expected = np.array([x @ H @ x + lin @ x + 0.5 for x in X])
    assert np.allclose(p.energies(X), expected)
    assert p.energy(X[0]) == pytest.approx(expected[0])
    assert p.energy_of([1, 4]) == pytest.approx(p.energy([0, 1, 0, 0, 1, 0]))


def test_bqm_matches_energy_on_feasible_and_penalises_infeasible():
    p = qblock.random_problem(8, 3, linear=True, seed=2)
    pen = p.safe_penalty()
    bqm = p.to_bqm()
    assert sorted(bqm.variables) == list(range(8))
    ss = dimod.ExactSolver().sample(bqm)
    X = p.states_from_sampleset(ss)
    feas = X.sum(1) == 3
    assert np.allclose(ss.record.energy[feas], p.energies(X[feas]))
    # infeasible: energy + penalty * (sum - M)^2
    viol = (X[~feas].sum(1) - 3) ** 2
    assert np.allclose(ss.record.energy[~feas], p.energies(X[~feas]) + pen * viol)


@pytest.mark.parametrize("penalty", [0.0, 0.7, None])
def test_numpy_bqm_equals_the_pyqubo_model_in_block_order(penalty):
    # the BQM is built from H with numpy (a PyQUBO compile of N = 5000 took minutes and ~7 GB);
    # it must be the same model as the PyQUBO one, with the variables in block order
    p = qblock.random_problem(9, 4, linear=True, seed=6)
    bqm = p.to_bqm(penalty)
    assert list(bqm.variables) == list(range(9))
    lam = p.safe_penalty() if penalty is None else penalty
    ref = p.compiled.to_bqm(index_label=False, feed_dict=p._feed(lam))
    ref.relabel_variables({f"x[{i}]": i for i in range(9)}, inplace=True)
    for i in range(9):
        assert bqm.get_linear(i) == pytest.approx(ref.get_linear(i), abs=1e-12)
        for j in range(i + 1, 9):
            assert bqm.get_quadratic(i, j, default=0.0) == pytest.approx(ref.get_quadratic(i, j, default=0.0), abs=1e-12)
    assert bqm.offset == pytest.approx(ref.offset + p.offset, abs=1e-12)


def test_objective_bqm_needs_no_num_remove_and_checks_the_penalty():
    p = BlockRemovalProblem(np.eye(3), None)
    assert p.objective_bqm().energy({0: 1, 1: 1, 2: 0}) == 2.0
    for bad in (-1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="penalty must be a finite non-negative number"):
            p.with_num_remove(1).to_bqm(penalty=bad)


@pytest.mark.parametrize("seed", range(5))
def test_safe_penalty_makes_bqm_ground_state_feasible_and_optimal(seed):
    p = qblock.random_problem(9, 3, linear=bool(seed % 2), correlation=0.0, seed=seed)
    ss = dimod.ExactSolver().sample(p.to_bqm())
    best = p.states_from_sampleset(ss.truncate(1))[0]
    assert best.sum() == 3
    _, eb = brute_force_topk(p, 1)
    assert p.energy(best) == pytest.approx(eb[0])
    # every infeasible state lies above the feasible optimum
    X = p.states_from_sampleset(ss)
    infeasible = X.sum(1) != 3
    assert ss.record.energy[infeasible].min() > eb[0]


def test_penalty_and_M_are_placeholders_compiled_once():
    p = qblock.random_problem(10, 3, seed=0)
    compiled = p.compiled
    q = p.with_num_remove(5)
    assert q.compiled is compiled  # same PyQUBO model, new feed values
    assert q.num_remove == 5 and p.num_remove == 3
    assert q.H is p.H
    ss = dimod.ExactSolver().sample(q.to_bqm())
    assert q.states_from_sampleset(ss.truncate(1))[0].sum() == 5
    with pytest.raises(ValueError):
        p.with_num_remove(11)


def test_labels_are_mapped_explicitly_not_by_pyqubo_order():
    # pyqubo numbers variables its own way; a diagonal problem detects any mix-up
    d = np.arange(12, 0, -1, dtype=float)
    p = BlockRemovalProblem(np.diag(d), 1)
    bqm = p.to_bqm(penalty=100.0)
    for i in range(12):
        assert bqm.get_linear(i) == pytest.approx(d[i] + 100.0 * (1 - 2 * 1))


def test_ising_roundtrip_decodes_back():
    p = qblock.random_problem(8, 2, seed=4)
    h, J, off = p.to_ising()
    ising = dimod.BinaryQuadraticModel.from_ising(h, J, off)
    ss = dimod.ExactSolver().sample(ising)
    assert ss.vartype is dimod.SPIN
    dec = p.decode(ss)
    _, eb = brute_force_topk(p, 3)
    assert np.allclose(dec.record.energy[:3], eb)


def test_cqm_has_equality_and_objective():
    p = qblock.random_problem(7, 2, linear=True, seed=5)
    cqm = p.to_cqm()
    assert list(cqm.constraints) == ["remove_exactly_M"]
    c = cqm.constraints["remove_exactly_M"]
    assert c.sense is dimod.sym.Sense.Eq
    assert c.rhs == 2
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 2, 7)
        sample = dict(enumerate(x.tolist()))
        assert cqm.objective.energy(sample) == pytest.approx(p.energy(x))
        assert cqm.check_feasible(sample) == (x.sum() == 2)
    ss = dimod.ExactCQMSolver().sample_cqm(cqm)
    dec = p.decode(ss)
    assert np.all(p.states_from_sampleset(dec).sum(1) == 2)
    _, eb = brute_force_topk(p, 1)
    assert dec.first.energy == pytest.approx(eb[0])


def test_quadratic_program_energies_agree():
    pytest.importorskip("qiskit_optimization")
    p = qblock.random_problem(6, 2, linear=True, seed=6)
    qp = p.to_quadratic_program()
    assert qp.get_num_binary_vars() == 6
    assert qp.linear_constraints[0].rhs == 2
    X, _ = brute_force_topk(p, 15)
    for x in X:
        assert qp.objective.evaluate(x.astype(float)) == pytest.approx(p.energy(x))


def test_decode_filters_dedups_and_sorts():
    p = BlockRemovalProblem(np.diag([3.0, 1.0, 2.0]), 1)
    ss = dimod.SampleSet.from_samples(
        ([[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 1, 0]], [0, 1, 2]), "BINARY", energy=[0, 0, 0, 0]
    )
    out = p.decode(ss)
    assert [p.removed_blocks(s) for s in out.samples()] == [[1], [0]]
    assert list(out.record.energy) == [1.0, 3.0]
    assert list(out.record.num_occurrences) == [2, 1]


def test_save_load_roundtrip_exact(tmp_path):
    p = qblock.random_problem(11, 3, linear=True, seed=9)
    p.metadata["note"] = {"nested": [1, 2, "x"]}
    p.arrays["A"] = np.random.default_rng(0).normal(size=(5, 11))
    f = p.save(tmp_path / "p.npz")
    q = BlockRemovalProblem.load(f)
    assert np.array_equal(q.H, p.H) and np.array_equal(q.linear, p.linear)
    assert q.offset == p.offset and q.num_remove == p.num_remove and q.labels == p.labels
    assert q.metadata == p.metadata
    assert np.array_equal(q.arrays["A"], p.arrays["A"])
    # the file holds no pickled objects
    with np.load(f, allow_pickle=False) as data:
        assert json.loads(str(data["header"]))["format"] == "qblock.BlockRemovalProblem"


def test_load_rejects_other_files(tmp_path):
    f = tmp_path / "x.npz"
    np.savez(f, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a qblock problem"):
        BlockRemovalProblem.load(f)
    with pytest.raises(FileNotFoundError):
        BlockRemovalProblem.load(tmp_path / "missing.npz")


def test_solve_requires_num_remove():
    p = BlockRemovalProblem(np.eye(3), None)
    with pytest.raises(ValueError, match="num_remove is not set"):
        qblock.solve(p, "exact")


def test_to_networkx():
    pytest.importorskip("networkx")
    p = qblock.random_problem(5, 2, seed=0)
    g = p.to_networkx()
    assert g.number_of_nodes() == 5
    assert g.nodes[0]["label"] == "layers.0"
    assert g.edges[0, 1]["weight"] == pytest.approx(2 * p.H[0, 1])


def test_random_problem_default_m_is_a_quarter_and_never_nothing():
    from qblock.problems.synthetic import random_problem

    assert [random_problem(n, seed=0).num_remove for n in (1, 2, 3, 4, 8, 12)] == [0, 1, 1, 1, 2, 3]
