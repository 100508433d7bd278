"""The rank-selection problem: costs, conversions, file format, and every backend that accepts it."""

import itertools

import dimod
import numpy as np
import pytest

import qblock
from qblock.backends import knapsack
from qblock.problems.rank_selection import (RankSelectionProblem, from_gate_gradients, group_costs,
                                            load_problem)
from qblock.testing import brute_force_topk, check_backend, rank_conformance_problems


def _problem(seed=0, shapes=((8, 6), (6, 4), (10, 8)), c=2, frac=0.6, **kw):
    costs, mat, pos = [], [], []
    for l, (m, n) in enumerate(shapes):
        for k, cost in enumerate(group_costs(m, n, c)):
            costs.append(cost), mat.append(l), pos.append(k)
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(32, len(costs))) - 0.3
    return from_gate_gradients(A, costs, int(frac * sum(costs)), mat, pos, **kw)


@pytest.mark.parametrize("m,n,c", [(4, 3, 2), (10, 7, 3), (16, 16, 4), (5, 9, 1), (12, 8, 5)])
def test_group_costs_add_up_to_pivga_storage(m, n, c):
    costs = group_costs(m, n, c)
    r = min(m, n)
    assert len(costs) == -(-r // c)
    for j in range(len(costs) + 1):  # keeping the first j groups stores r(m+n) - r^2 numbers
        rr = min(j * c, r)
        assert sum(costs[:j]) == rr * (m + n) - rr * rr


def test_input_validation_messages():
    with pytest.raises(ValueError, match="costs must be >= 1"):
        RankSelectionProblem(None, [1.0, 2.0], [0, 1], 3, [0, 0], [0, 1])
    with pytest.raises(ValueError, match="numbered 0 .. 1"):
        RankSelectionProblem(None, [1.0, 2.0], [1, 1], 3, [0, 0], [0, 2])
    with pytest.raises(ValueError, match="budget"):
        RankSelectionProblem(None, [1.0, 2.0], [1, 1], -1, [0, 0], [0, 1])
    with pytest.raises(ValueError, match="symmetric"):
        RankSelectionProblem([[0, 1], [0, 0]], [1.0, 2.0], [1, 1], 3, [0, 0], [0, 1])


def test_feasibility_budget_and_prefix():
    p = _problem()
    X = np.array(list(itertools.product((0, 1), repeat=p.num_variables)), dtype=np.int8)
    ok = p.feasible_mask(X)
    expect = (X.astype(np.int64) @ p.costs <= p.budget)
    for later, earlier in p.prefix_pairs:
        expect &= ~((X[:, later] == 1) & (X[:, earlier] == 0))
    assert np.array_equal(ok, expect) and ok.any() and not ok.all()


def test_bqm_energies_and_safe_penalty_ground_state():
    p = _problem(seed=3)
    bqm = p.to_bqm()
    n = p.num_variables
    slack = [v for v in bqm.variables if v >= n]
    assert slack and all(isinstance(v, int) for v in bqm.variables)
    # every feasible state with its best slack has exactly its objective energy
    X, _ = brute_force_topk(p, 10_000)
    S = np.array(list(itertools.product((0, 1), repeat=len(slack))), dtype=np.int8)
    for y in X[:25]:
        rows = np.hstack([np.repeat(y[None, :], len(S), 0), S])
        e = bqm.energies((rows, list(range(n)) + slack))
        assert abs(e.min() - p.energy(y)) < 1e-9
    # the BQM's ground state is the feasible optimum
    ss = dimod.ExactSolver().sample(bqm)
    best = p.decode(ss.truncate(1))
    assert len(best) == 1 and abs(best.first.energy - brute_force_topk(p, 1)[1][0]) < 1e-9


def test_pyqubo_compiled_equals_numpy_bqm():
    p = _problem(seed=4, shapes=((6, 4), (5, 4)))
    lam = 0.37
    ref = p.compiled.to_bqm(index_label=False, feed_dict={"penalty": lam})
    n = p.num_variables
    names = {f"y[{i}]": i for i in range(n)}
    names.update({f"slack[{j}]": n + j for j in range(len(p.slack_weights()))})
    ref = ref.relabel_variables(names, inplace=False)
    ours = p.to_bqm(lam)
    assert set(ref.variables) == set(ours.variables)
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = {v: int(b) for v, b in zip(ours.variables, rng.integers(0, 2, ours.num_variables))}
        assert abs(ref.energy(s) - ours.energy(s)) < 1e-8


def test_ising_cqm_and_quadratic_program_round_trips():
    p = _problem(seed=5)
    X, e = brute_force_topk(p, 5)
    h, J, off = p.to_ising()
    ss = dimod.ExactSolver().sample_ising(h, J)
    back = p.decode(ss.change_vartype(dimod.BINARY).truncate(1))
    assert abs(back.first.energy - e[0]) < 1e-9
    cqm = p.to_cqm()
    assert set(cqm.constraints) == {"budget"} | {f"prefix[{k}]" for k in range(len(p.prefix_pairs))}
    ss = dimod.ExactCQMSolver().sample_cqm(cqm).filter(lambda d: d.is_feasible)
    assert abs(p.decode(ss).first.energy - e[0]) < 1e-9
    assert len(ss) == int(p.feasible_mask(np.array(list(itertools.product((0, 1), repeat=p.num_variables)))).sum())
    pytest.importorskip("qiskit_optimization")
    qp = p.to_quadratic_program()
    assert qp.get_num_binary_vars() == p.num_variables
    for y in X:
        assert abs(qp.objective.evaluate(y.astype(float)) - p.energy(y)) < 1e-9
        assert qp.is_feasible(y.astype(float))
    bad = np.ones(p.num_variables)
    assert not qp.is_feasible(bad) and not p.is_feasible(bad.astype(int))


def test_save_load_round_trip_and_either_kind(tmp_path):
    p = _problem(seed=6, prefix=False)
    q = load_problem(p.save(tmp_path / "r.npz"))
    assert isinstance(q, RankSelectionProblem) and not q.prefix
    for a, b in ((p.H, q.H), (p.linear, q.linear), (p.costs, q.costs), (p.matrix, q.matrix), (p.position, q.position)):
        assert np.array_equal(a, b)
    assert (q.budget, q.offset, q.labels, q.metadata) == (p.budget, p.offset, p.labels, p.metadata)
    b = qblock.random_problem(6, 2, seed=0)
    assert isinstance(load_problem(b.save(tmp_path / "b.npz")), qblock.BlockRemovalProblem)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a qblock problem file"):
        load_problem(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="not a RankSelectionProblem"):
        RankSelectionProblem.load(tmp_path / "b.npz")


@pytest.mark.parametrize("name", ["exact", "swap", "sa", "steepest"])
def test_conformance_on_rank_problems(name):
    check_backend(name, rank_conformance_problems())


@pytest.mark.slow
def test_conformance_on_rank_problems_tabu_sqa():
    check_backend("tabu", rank_conformance_problems(), num_reads=4, num_restarts=2)
    pytest.importorskip("openjij")
    check_backend("sqa", rank_conformance_problems(), num_reads=4)


class _FakeCQM:
    """Leap's CQM solver stood in for by dimod's exact CQM solver (all states, feasible or not)."""

    def __init__(self, **config):
        self.config = config

    def sample_cqm(self, cqm, time_limit=None, label=None):
        return dimod.ExactCQMSolver().sample_cqm(cqm)


class _FakeHybrid:
    """Leap's hybrid BQM solver stood in for by seeded simulated annealing."""

    parameters = {"time_limit": [], "label": []}

    def __init__(self, **config):
        pass

    def sample(self, bqm, time_limit=None, label=None):
        from dwave.samplers import SimulatedAnnealingSampler

        return SimulatedAnnealingSampler().sample(bqm, num_reads=8, seed=5)


def test_conformance_leap_cqm_and_hybrid_through_mocks(tmp_path):
    pytest.importorskip("dwave.system")
    check_backend("leap-cqm", rank_conformance_problems(), sampler_factory=_FakeCQM, save_dir=str(tmp_path))
    check_backend("leap-hybrid", rank_conformance_problems(), sampler_factory=_FakeHybrid, save_dir=str(tmp_path))
    runs = sorted(tmp_path.iterdir())
    assert any((r / "model.cqm").exists() for r in runs)
    assert isinstance(load_problem(runs[0] / "problem.npz"), RankSelectionProblem)


@pytest.mark.parametrize("name", ["qaoa", "scip", "gurobi", "leap-nl"])
def test_backends_without_rank_support_say_so_in_one_line(name):
    with pytest.raises(ValueError) as err:
        qblock.solve(_problem(), name)
    msg = str(err.value)
    assert "\n" not in msg and "does not solve rank_selection" in msg and "swap" in msg


def test_exact_pareto_dp_is_optimal_on_separable_problems():
    for seed in range(6):
        p = _problem(seed=seed, shapes=((8, 6), (6, 6), (10, 8), (4, 4)), couplings="matrix", energy="fisher+grad")
        assert p.num_variables <= 16 and knapsack.separable(p)
        y, info = knapsack.pareto_optimum(p)
        _, e = brute_force_topk(p, 1)
        assert p.is_feasible(y) and abs(p.energy(y) - e[0]) < 1e-9


def test_exact_refuses_the_bnb_strategy_on_a_rank_problem_by_its_name():
    p = _problem(seed=0, shapes=((4, 3), (3, 3)))
    assert p.num_variables <= knapsack.EXACT_ENUMERATION_LIMIT  # small: the old message called it too large
    with pytest.raises(ValueError, match="strategy='bnb' is for block-removal problems"):
        qblock.solve(p, "exact", num_solutions=2, strategy="bnb")


def test_exact_large_separable_uses_dp_and_beats_annealing():
    shapes = [(32, 24)] * 12
    p = _problem(seed=1, shapes=shapes, c=4, frac=0.5, couplings="diagonal", energy="fisher+grad")
    assert p.num_variables > knapsack.EXACT_ENUMERATION_LIMIT
    ex = qblock.solve(p, "exact", num_solutions=1)
    assert ex.info["strategy"] == "pareto-dp" and ex.info["certified_optimal"]
    sw = qblock.solve(p, "swap", num_solutions=3, seed=0, num_reads=8, num_sweeps=50)
    assert sw.first.energy >= ex.first.energy - 1e-9
    top = qblock.solve(p, "exact", num_solutions=4)
    assert not top.info["certified_optimal"] and top.info["certified_top1"]
    assert abs(top.first.energy - ex.first.energy) < 1e-12


def test_exact_refuses_large_coupled_problem_clearly():
    p = _problem(seed=1, shapes=[(16, 12)] * 6, c=2, couplings="full")
    with pytest.raises(ValueError, match="solved exactly only up to"):
        qblock.solve(p, "exact")


def test_swap_keeps_every_state_feasible_without_prefix():
    p = _problem(seed=2, prefix=False, shapes=((12, 8), (10, 8)), c=1)
    ss = qblock.solve(p, "swap", num_solutions=10, seed=3, num_reads=16, num_sweeps=60)
    assert np.all(p.feasible_mask(p.states_from_sampleset(ss)))
    assert abs(ss.first.energy - qblock.solve(p, "tabu", num_solutions=1, seed=0, num_reads=4).first.energy) < 1e-9


def test_repair_and_descent_give_feasible_states():
    p = _problem(seed=7)
    rng = np.random.default_rng(0)
    X = rng.integers(0, 2, (40, p.num_variables)).astype(np.int8)
    R = knapsack.repair(p, X)
    assert np.all(p.feasible_mask(R))
    D, _ = knapsack.descent(p, R)
    assert np.all(p.feasible_mask(D)) and np.all(p.energies(D) <= p.energies(R) + 1e-12)


def test_cli_solve_reads_a_rank_problem_file(tmp_path, capsys):
    import json

    from qblock.cli import main

    f = _problem(seed=8).save(tmp_path / "r.npz")
    assert main(["solve", str(f), "--backend", "exact", "--top", "3", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "budget=" in out and "groups kept per matrix" in out
    sols = json.loads((tmp_path / "s.json").read_text())
    assert sols["problem_kind"] == "rank_selection" and len(sols["solutions"]) == 3
    assert main(["solve", str(f), "--remove", "2"]) == 2
    assert "--remove is for block removal" in capsys.readouterr().err


def test_block_removal_commands_say_a_rank_problem_is_the_other_kind(tmp_path, capsys):
    from qblock.cli import main
    from qblock.compare import compare_problems

    f = _problem(seed=8).save(tmp_path / "r.npz")
    for args in (["compare", str(f), "-b", "swap", "-r", "1", "-o", str(tmp_path / "cmp")], ["show", str(f)],
                 ["validate", str(f), "--out", str(tmp_path / "v")]):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "rank-selection problem" in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "v").exists()
    with pytest.raises(ValueError, match="rank-selection problem, not a block-removal one"):
        qblock.BlockRemovalProblem.load(f)
    with pytest.raises(ValueError, match="comparisons take block-removal problems"):
        compare_problems([load_problem(f)], ["swap"], 1, 0)
