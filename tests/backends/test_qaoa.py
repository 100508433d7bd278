"""Tests of the QAOA backend (qiskit-aer simulators). Offline, seeded."""

from __future__ import annotations

import math

import dimod
import numpy as np
import pytest

pytest.importorskip("qiskit")
pytest.importorskip("qiskit_aer")

import qblock  # noqa: E402
from qblock.backends.qaoa import (  # noqa: E402
    QAOASampler,
    QubitLimitError,
    _initial_state,
    build_qaoa_circuit,
    dicke_circuit,
    ising_from_bqm,
)
from qblock.testing import check_backend, conformance_problems  # noqa: E402


def _probabilities(qc) -> np.ndarray:
    from qiskit.quantum_info import Statevector

    return Statevector(qc).probabilities()


def _weights(n: int) -> np.ndarray:
    return np.array([bin(i).count("1") for i in range(2**n)])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_dicke_state_is_uniform_over_weight_k(n):
    w = _weights(n)
    for k in range(n + 1):
        p = _probabilities(dicke_circuit(n, k))
        assert np.allclose(p[w == k], 1.0 / math.comb(n, k), atol=1e-12), (n, k)
        assert p[w != k].sum() < 1e-12


def test_ising_coefficients_use_qiskit_convention():
    rng = np.random.default_rng(0)
    bqm = dimod.generators.gnp_random_bqm(6, 0.7, "BINARY", random_state=1)
    bqm.offset = 0.3
    variables = list(range(6))
    h, J, c = ising_from_bqm(bqm, variables)
    for _ in range(20):
        x = rng.integers(0, 2, 6)
        z = 1 - 2 * x  # measured bit 1 <-> Z = -1
        e = c + h @ z + z @ np.triu(J, 1) @ z
        assert e == pytest.approx(bqm.energy(dict(enumerate(x))), abs=1e-9)


@pytest.mark.parametrize("topology", ["ring", "complete"])
def test_xy_mixer_preserves_weight_after_transpilation(topology):
    from qiskit.transpiler import generate_preset_pass_manager
    from qiskit_aer import AerSimulator

    n, m = 6, 2
    p = qblock.random_problem(n, m, seed=4)
    h, J, _ = ising_from_bqm(p.objective_bqm(), list(range(n)))
    qc, g, b = build_qaoa_circuit(h, J, 2, mixer="xy", num_ones=m, xy_topology=topology)
    pm = generate_preset_pass_manager(optimization_level=1, backend=AerSimulator(), seed_transpiler=0)
    tqc = pm.run(qc).assign_parameters(dict(zip(pm.run(qc).parameters, [0.7, -0.4, 0.3, 1.1])))
    probs = _probabilities(tqc.remove_final_measurements(inplace=False) if tqc.num_clbits else tqc)
    assert probs[_weights(n) != m].sum() < 1e-10


def test_injected_initial_state_equals_gate_level_preparation():
    n, m = 5, 2
    p = qblock.random_problem(n, m, seed=2)
    h, J, _ = ising_from_bqm(p.objective_bqm(), list(range(n)))
    full, g, b = build_qaoa_circuit(h, J, 1, num_ones=m)
    body, g2, b2 = build_qaoa_circuit(h, J, 1, num_ones=m, prepare=False)
    vals = {"gamma[0]": 0.4, "beta[0]": 0.9}
    full = full.assign_parameters({q: vals[q.name] for q in full.parameters})
    body = body.assign_parameters({q: vals[q.name] for q in body.parameters})
    from qiskit.quantum_info import Statevector

    a = Statevector(full).probabilities()
    c = Statevector(_initial_state(n, m)).evolve(body).probabilities()
    assert np.allclose(a, c, atol=1e-12)


def test_sampled_shots_agree_with_statevector_expectation():
    """The measured circuit must run at the optimised angles (parameter order!)."""
    p = qblock.random_problem(8, 3, seed=5)
    ss = QAOASampler().sample(p.objective_bqm(), num_remove=3, reps=1, seed=3, shots=20000, maxiter=40)
    occ = ss.record.num_occurrences
    assert occ.sum() == 20000
    mean = float((ss.record.energy * occ).sum() / occ.sum())
    sd = float(np.sqrt(((ss.record.energy - mean) ** 2 * occ).sum() / occ.sum()))
    assert abs(mean - ss.info["optimal_expectation"]) < 5 * sd / math.sqrt(20000)
    assert ss.info["optimum_frequency"] == pytest.approx(ss.info["optimum_probability"], abs=0.02)


def test_xy_qaoa_finds_optimum_among_five_lowest_for_90_percent_of_seeds():
    """Done-when criterion of the issue: N=10, M=3, 10 seeds, default parameters (XY ring, p=2)."""
    hits, gain = 0, []
    for s in range(10):
        p = qblock.random_problem(10, 3, seed=s)
        ss = qblock.solve(p, "qaoa", num_solutions=5, seed=s)
        best = qblock.solve(p, "exact", num_solutions=1).first.energy
        assert ss.info["feasible_fraction"] == 1.0
        hits += bool(np.any(np.abs(ss.record.energy - best) <= 1e-9 * max(1.0, abs(best))))
        gain.append(ss.info["approximation_ratio"] - ss.info["uniform_approximation_ratio"])
    assert hits >= 9, f"optimum among the five lowest for only {hits}/10 seeds"
    assert np.mean(gain) > 0.05, f"QAOA is no better than uniform sampling (mean ratio gain {np.mean(gain):.3f})"


def test_info_fields_and_reproducibility():
    p = qblock.random_problem(8, 2, seed=1)
    a = qblock.solve(p, "qaoa", num_solutions=4, seed=11, reps=1, maxiter=30)
    b = qblock.solve(p, "qaoa", num_solutions=4, seed=11, reps=1, maxiter=30)
    assert np.array_equal(a.record.sample, b.record.sample)
    info = a.info
    for key in ("reps", "optimal_gammas", "optimal_betas", "feasible_fraction", "optimum_probability",
                "approximation_ratio", "circuit_width", "circuit_depth", "circuit_evaluations", "timing_detail"):
        assert key in info, key
    assert info["circuit_width"] == 8 and info["reps"] == 1 and len(info["optimal_gammas"]) == 1
    assert info["num_infeasible"] == 0 and info["penalty"] is None


def test_x_mixer_on_penalised_qubo_counts_infeasible_and_repairs():
    p = qblock.random_problem(8, 3, seed=3)
    ss = qblock.solve(p, "qaoa", mixer="x", num_solutions=5, seed=2, reps=1, maxiter=30)
    assert ss.info["mixer"] == "x" and ss.info["repaired"] is True
    assert 0.0 < ss.info["feasible_fraction"] < 1.0  # the X mixer leaves the feasible subspace
    assert ss.info["num_infeasible"] == round((1 - ss.info["feasible_fraction"]) * ss.info["shots"])
    assert ss.info["penalty"] == pytest.approx(p.safe_penalty())
    assert np.all(p.states_from_sampleset(ss).sum(axis=1) == 3)


@pytest.mark.parametrize("opts", [
    {"optimizer": "Nelder-Mead", "init": "random"},
    {"optimizer": "Powell", "xy_topology": "complete", "restarts": 1},
    {"method": "matrix_product_state", "shots": 512},
])
def test_variants_run_and_stay_feasible(opts):
    p = qblock.random_problem(6, 2, seed=8)
    ss = qblock.solve(p, "qaoa", num_solutions=5, seed=1, reps=1, maxiter=15, **opts)
    assert len(ss) >= 1 and np.all(p.states_from_sampleset(ss).sum(axis=1) == 2)
    if opts.get("method") == "matrix_product_state":
        assert ss.info["expectation_mode"].startswith("mean energy of 512 shots")


def test_qubit_limit_error_states_memory():
    p = qblock.random_problem(12, 3, seed=0)
    with pytest.raises(QubitLimitError, match=r"16 bytes \* 2\^12 = 64\.0 KiB") as err:
        qblock.solve(p, "qaoa", max_qubits=10)
    assert "--param max_qubits=12 or --param method=matrix_product_state" in str(err.value)  # the CLI's words too
    with pytest.raises(ValueError, match="mixer"):
        qblock.solve(p, "qaoa", mixer="zz")
    with pytest.raises(ValueError, match="optimizer"):
        qblock.solve(p, "qaoa", optimizer="adam")


def test_conformance_small():
    check_backend("qaoa", problems=conformance_problems(max_blocks=10), num_solutions=10, seed=7)


@pytest.mark.slow
def test_conformance_default_instances():
    check_backend("qaoa")


def test_quadratic_program_agrees_with_problem_energy_on_feasible_states():
    from qblock.testing import brute_force_topk

    p = qblock.random_problem(8, 3, linear=True, seed=9)
    qp = p.to_quadratic_program()
    X, e = brute_force_topk(p, 56)
    assert len(X) == 56
    for x, ex in zip(X, e):
        assert qp.objective.evaluate([int(v) for v in x]) == pytest.approx(ex, rel=1e-12, abs=1e-12)
        assert qp.is_feasible([int(v) for v in x])


def test_one_variable_with_a_zero_objective():
    # no circuit parameter is left: the empty index array must still be an index
    ss = qblock.solve(qblock.BlockRemovalProblem([[0.0]], 1), "qaoa", num_solutions=1, seed=0)
    assert ss.first.energy == 0.0 and list(ss.first.sample.values()) == [1]
