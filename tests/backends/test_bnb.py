"""Branch-and-bound top-k (qblock.backends.bnb) against exhaustive enumeration, plus the MIQP backends."""

from __future__ import annotations

import math

import numpy as np
import pytest

import qblock
from qblock.backends import bnb
from qblock.backends.exact import ExactTopKSampler, enumerate_topk


def _instance(rng: np.random.Generator, n: int, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    if kind == "psd":
        A = rng.standard_normal((3 * n, n)) * rng.lognormal(0, 0.5, n)
        return A.T @ A / (3 * n), None
    if kind == "psd+linear":
        A = rng.standard_normal((3 * n, n))
        return A.T @ A / (3 * n), rng.standard_normal(n)
    if kind == "indefinite":
        H = rng.standard_normal((n, n))
        return (H + H.T) / 2, rng.standard_normal(n)
    raise AssertionError(kind)


def _assert_same(X, e, Xr, er):
    assert X.dtype == np.int8 and X.shape == Xr.shape
    np.testing.assert_allclose(e, er, rtol=0, atol=1e-9 * max(1.0, float(np.abs(er).max())))
    # states must agree wherever the energies are not (numerically) tied
    gaps = np.diff(er)
    distinct = np.ones(len(er), bool)
    distinct[1:] &= gaps > 1e-9
    distinct[:-1] &= gaps > 1e-9
    assert (X[distinct] == Xr[distinct]).all()


@pytest.mark.parametrize("bound", ["dnn", "qcr"])
@pytest.mark.parametrize("kind", ["psd", "psd+linear", "indefinite"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_enumeration(kind, seed, bound):
    rng = np.random.default_rng(1000 * seed + len(kind))
    n = int(rng.integers(8, 17))
    for M in sorted({1, 2, n // 3, n // 2, n - 2}):
        k = int(rng.integers(1, 21))
        H, lin = _instance(rng, n, kind)
        X, e, st = bnb.topk(H, lin, M, k, bound=bound)
        Xr, er, _ = enumerate_topk(H, np.zeros(n) if lin is None else lin, M, k)
        assert st["certified"] and st["gap"] == 0.0
        assert st["bound"] == f"{bound}-qp"
        _assert_same(X, e, Xr, er)
        # the energies are those of the returned states
        Xf = X.astype(float)
        lin0 = np.zeros(n) if lin is None else lin
        np.testing.assert_allclose(np.einsum("ij,ij->i", Xf @ H, Xf) + Xf @ lin0, e, atol=1e-9)
        assert (X.sum(axis=1) == M).all()


@pytest.mark.parametrize("options", [{"bound": "eig"}, {"bound": "qcr"}, {"refresh": 3}, {"bound": "qcr", "refresh": 3},
                                     {"order": "y"}, {"order": "fractional"},
                                     {"order": "decided"}, {"tighten": False, "leaf_states": 1},
                                     {"max_qp_iter": 2, "batch_size": 3}])
def test_options_stay_exact(options):
    rng = np.random.default_rng(7)
    H, lin = _instance(rng, 14, "psd+linear")
    X, e, st = bnb.topk(H, lin, 5, 20, **options)
    Xr, er, _ = enumerate_topk(H, lin, 5, 20)
    assert st["certified"]
    _assert_same(X, e, Xr, er)


def _brute_lex(H, lin, M, k):
    import itertools

    n = H.shape[0]
    X = np.zeros((math.comb(n, M), n), dtype=np.int8)
    for row, S in enumerate(itertools.combinations(range(n), M)):
        X[row, list(S)] = 1
    Xf = X.astype(float)
    e = np.einsum("ij,ij->i", Xf @ H, Xf) + Xf @ lin
    order = np.lexsort(tuple(X[:, ::-1].T) + (e,))[:k]
    return X[order], e[order]


def test_exact_ties_ordered_by_energy_then_lexicographic_state():
    # integer couplings make many energies exactly equal, also at the k-th place
    rng = np.random.default_rng(3)
    for _ in range(5):
        n = 12
        H = rng.integers(0, 3, (n, n)).astype(float)
        H = H + H.T
        lin = rng.integers(-2, 3, n).astype(float)
        for M in (3, 6):
            X, e, st = bnb.topk(H, lin, M, 20)
            Xr, er = _brute_lex(H, lin, M, 20)
            assert st["certified"]
            assert (np.diff(er) == 0).any()  # the instance really has ties
            np.testing.assert_array_equal(e, er)
            np.testing.assert_array_equal(X, Xr)


def test_all_zero_matrix_every_state_tied():
    X, e, st = bnb.topk(np.zeros((9, 9)), None, 3, 20)
    Xr, er = _brute_lex(np.zeros((9, 9)), np.zeros(9), 3, 20)
    np.testing.assert_array_equal(X, Xr)
    assert st["certified"] and (e == 0).all()


def test_edge_cases():
    H = np.array([[1.0, 2.0, 0.0], [2.0, 3.0, 1.0], [0.0, 1.0, 5.0]])
    X, e, st = bnb.topk(H, None, 0, 5)
    assert X.tolist() == [[0, 0, 0]] and e.tolist() == [0.0] and st["certified"]
    X, e, st = bnb.topk(H, None, 3, 5)
    assert X.tolist() == [[1, 1, 1]] and e.tolist() == [float(np.ones(3) @ H @ np.ones(3))]
    X, e, st = bnb.topk(H, np.array([0.0, -10.0, 0.0]), 1, 50)  # k larger than C(3, 1)
    assert X.shape == (3, 3) and st["certified"] and X[0].tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="num_remove"):
        bnb.topk(H, None, 4, 1)
    with pytest.raises(ValueError, match="k must"):
        bnb.topk(H, None, 1, 0)
    with pytest.raises(ValueError, match="square"):
        bnb.topk(np.zeros((2, 3)), None, 1, 1)
    with pytest.raises(ValueError, match="length"):
        bnb.topk(H, np.zeros(2), 1, 1)
    with pytest.raises(ValueError, match="unknown bound"):
        bnb.topk(H, None, 1, 1, bound="nope")


def test_time_limit_stops_uncertified():
    rng = np.random.default_rng(11)
    n = 100
    H = rng.standard_normal((n, n))
    H = (H + H.T) / 2  # dense indefinite: certifying takes about 10 s on a 2-core Xeon (n = 70: 1.4 s, too close)
    X, e, st = bnb.topk(H, None, 20, 20, time_limit=0.2)
    assert st["certified"] is False
    assert st["gap"] > 0
    assert X.shape[0] == 20 and (np.diff(e) >= 0).all()  # the best states known, uncertified
    assert len({x.tobytes() for x in X}) == 20 and (X.sum(axis=1) == 20).all()
    Xf = X.astype(float)
    np.testing.assert_allclose(np.einsum("ij,ij->i", Xf @ H, Xf), e, atol=1e-9)


def test_convexify_is_psd_on_complement():
    rng = np.random.default_rng(5)
    for kind in ("psd", "indefinite"):
        H, lin = _instance(rng, 20, kind)
        Q = H - np.diag(np.diag(H))
        c = np.diag(H) + (0 if lin is None else lin)
        B = bnb._complement_basis(20)
        for method in ("qcr", "eig", "dnn"):
            u, lam = bnb.convexify(Q, c, 6, method)
            assert np.linalg.eigvalsh(B.T @ (Q + np.diag(u)) @ B)[0] >= 0.0
            assert lam >= 0.0
        u, N, lam = bnb.convexify_nonneg(Q, c, 6)
        assert (N >= 0).all() and (np.diag(N) == 0).all() and np.array_equal(N, N.T)
        assert np.linalg.eigvalsh(B.T @ (Q - N + np.diag(u)) @ B)[0] >= 0.0 and lam >= 0.0


def test_nonneg_part_only_lowers_binary_energies():
    # the DNN bound drops x^T N x, which is >= 0 on binaries: check on every state of a small instance
    rng = np.random.default_rng(9)
    H, lin = _instance(rng, 10, "psd+linear")
    Q = H - np.diag(np.diag(H))
    c = np.diag(H) + lin
    u, N, _ = bnb.convexify_nonneg(Q, c, 4)
    assert N.max() > 0  # the instance really uses the non-negativity multipliers
    X = ((np.arange(2**10)[:, None] >> np.arange(10)) & 1).astype(float)
    exact = np.einsum("ij,ij->i", X @ Q, X) + X @ c
    relaxed = np.einsum("ij,ij->i", X @ (Q - N + np.diag(u)), X) + X @ (c - u)
    assert (relaxed <= exact + 1e-12).all()


def test_root_bounds_dnn_beats_qcr_beats_uniform_shift():
    from qblock.problems.synthetic import paper_structure_A

    A = paper_structure_A(30, 256, seed=2)
    H = A.T @ A / 256
    _, _, st_d = bnb.topk(H, None, 8, 5, bound="dnn")
    _, _, st_q = bnb.topk(H, None, 8, 5, bound="qcr")
    _, e, st_e = bnb.topk(H, None, 8, 5, bound="eig")
    assert st_d["root_bound"] > st_q["root_bound"] > st_e["root_bound"]
    assert st_d["root_bound"] <= e[0] + 1e-9
    assert st_d["nodes"] <= st_q["nodes"]


def test_projection_onto_capped_simplex():
    rng = np.random.default_rng(0)
    Z = rng.normal(0, 2, (50, 9))
    r = rng.integers(1, 9, 50)
    Y = bnb._project(Z, r)
    np.testing.assert_allclose(Y.sum(axis=1), r, atol=1e-12)
    assert (Y >= 0).all() and (Y <= 1).all()
    # optimality: y = clip(z - tau) for one tau per row (KKT of the projection)
    for z, y in zip(Z, Y):
        free = (y > 1e-12) & (y < 1 - 1e-12)
        if free.any():
            tau = (z - y)[free]
            np.testing.assert_allclose(tau, tau[0], atol=1e-9)
            np.testing.assert_allclose(y, np.clip(z - tau[0], 0, 1), atol=1e-9)


def test_sampler_and_solve_with_bnb_strategy():
    p = qblock.random_problem(16, 5, linear=True, seed=4)
    a = qblock.solve(p, "exact", num_solutions=12, strategy="bnb")
    b = qblock.solve(p, "exact", num_solutions=12, strategy="enumerate")
    assert a.info["certified_optimal"] is True and a.info["strategy"] == "bnb"
    assert a.info["bound"] == "dnn-qp" and a.info["nodes"] >= 1
    np.testing.assert_allclose(a.record.energy, b.record.energy, atol=1e-9)
    assert len(a) == 12
    ss = ExactTopKSampler().sample(p.objective_bqm(), num_remove=5, num_solutions=3, strategy="bnb", time_limit=30)
    assert ss.info["certified_optimal"] is True
    np.testing.assert_allclose(ss.record.energy, b.record.energy[:3] - 0.0, atol=1e-9)


def _small_problem():
    rng = np.random.default_rng(21)
    H, lin = _instance(rng, 10, "psd+linear")
    return H, lin


def test_scip_topk_matches_enumeration():
    pytest.importorskip("pyscipopt")
    from qblock.backends.miqp import topk_scip

    H, lin = _small_problem()
    X, e, st = topk_scip(H, lin, 4, 5)
    Xr, er, _ = enumerate_topk(H, lin, 4, 5)
    assert st["certified"]
    _assert_same(X, e, Xr, er)


@pytest.mark.parametrize("case", ["fisher-like at 1e-6", "couplings of -1e7 beside ones"])
def test_scip_certifies_the_true_top_k_at_any_energy_scale(case):
    pytest.importorskip("pyscipopt")
    rng = np.random.default_rng(0)
    if case.startswith("fisher"):  # SCIP's absolute tolerances swallowed the whole energy range
        A = rng.standard_normal((40, 10))
        p = qblock.BlockRemovalProblem(A.T @ A / 40 * 1e-6, 3)
    else:  # energies near -4e7 that differ by 0.05: the epigraph row's slack reordered them
        A = rng.standard_normal((14, 14))
        H = (A + A.T) / 2
        for i, j in rng.integers(0, 14, (4, 2)):
            H[i, j] = H[j, i] = -1e7
        p = qblock.BlockRemovalProblem(H, 5)
    ss = qblock.solve(p, "scip", num_solutions=3)
    ref = qblock.solve(p, "exact", num_solutions=3)
    assert ss.info["certified_optimal"]
    assert [p.removed_blocks(x) for x in ss.samples()] == [p.removed_blocks(x) for x in ref.samples()]


def test_scip_lower_bound_includes_the_offset():
    pytest.importorskip("pyscipopt")
    p = qblock.BlockRemovalProblem(np.diag([1.0, 2.0, 3.0]), 1, offset=-100.0)
    ss = qblock.solve(p, "scip", num_solutions=2)
    assert list(ss.record.energy) == [-99.0, -98.0]
    assert ss.info["lower_bound"] == pytest.approx(-98.0)  # the last proven optimum, with the offset


def test_gurobi_topk_matches_enumeration():
    pytest.importorskip("gurobipy")
    from qblock.backends.miqp import topk_gurobi

    H, lin = _small_problem()
    Q = H - np.diag(np.diag(H))  # the zero-diagonal BQM form: rewritten to a convex one inside
    try:
        X, e, st = topk_gurobi(Q, lin + np.diag(H), 4, 5, time_limit=60)
    except RuntimeError as exc:  # no usable licence on this machine
        pytest.skip(str(exc))
    Xr, er, _ = enumerate_topk(H, lin, 4, 5)
    assert st["certified"]
    _assert_same(X, e, Xr, er)


def test_miqp_samplers_through_dimod():
    pytest.importorskip("pyscipopt")
    import dimod

    from qblock.backends.miqp import SCIPTopKSampler

    bqm = dimod.BQM({0: 1.0, 1: 2.0, 2: 3.0}, {(0, 1): 5.0}, 0.5, "BINARY")
    ss = SCIPTopKSampler().sample(bqm, num_remove=2, num_solutions=3)
    assert list(ss.record.energy) == [4.5, 5.5, 8.5]
    assert ss.info["certified_optimal"] is True
    with pytest.raises(TypeError, match="unknown parameters"):
        SCIPTopKSampler().sample(bqm, num_remove=2, bogus=1)
    assert math.isfinite(ss.info["time"])


@pytest.mark.parametrize("deadline", [None, 0.0])  # 0.0: long past, so the QCR iterations stop at once
def test_convex_form_keeps_every_feasible_energy(deadline):
    from qblock.backends.miqp import _convex_form

    rng = np.random.default_rng(8)
    H, lin = _instance(rng, 9, "indefinite")
    Hc, lc, changed = _convex_form(H, lin, 3, deadline)
    assert changed and np.linalg.eigvalsh(Hc)[0] >= -1e-12
    Xr, er = _brute_lex(H, lin, 3, math.comb(9, 3))
    Xf = Xr.astype(float)
    np.testing.assert_allclose(np.einsum("ij,ij->i", Xf @ Hc, Xf) + Xf @ lc, er, atol=1e-9)


# ---------------------------------------------------------------------------- time limit of the whole solve
def _check_valid_states(X, e, H, lin, M, k):
    """k distinct feasible states, sorted, whose energies are the returned ones."""
    assert X.shape[0] == k and len({x.tobytes() for x in X}) == k and (X.sum(axis=1) == M).all()
    assert (np.diff(e) >= 0).all()
    Xf = X.astype(float)
    np.testing.assert_allclose(np.einsum("ij,ij->i", Xf @ H, Xf) + Xf @ lin, e, atol=1e-9)


@pytest.mark.parametrize("bound", ["dnn", "qcr", "eig"])
def test_time_limit_includes_convexification_and_seeding(bound):
    # a limit already reached at the start: the ADMM must not run (it used to run all its
    # iterations, then the local search, before the limit was first looked at: 0.01 s took 11 s);
    # the answer is still k valid states, labelled, with a finite and honest gap
    rng = np.random.default_rng(11)
    n, M, k = 40, 12, 20
    H, lin = _instance(rng, n, "psd+linear")
    X, e, st = bnb.topk(H, lin, M, k, time_limit=0.0, bound=bound)
    assert st["certified"] is False and st["time_limit_reached"] is True
    assert st["admm_iterations"] == 0 and st["nodes"] == 0
    assert 0 < st["gap"] < math.inf
    _check_valid_states(X, e, H, lin, M, k)
    Xr, er, st_full = bnb.topk(H, lin, M, k)
    assert st_full["certified"] and st_full["admm_iterations"] > 0
    assert er[-1] >= e[-1] - st["gap"] - 1e-9  # the true k-th best is at most `gap` lower


def test_admm_stops_at_its_deadline_and_the_repair_keeps_the_bound_valid():
    import time

    rng = np.random.default_rng(2)
    H, lin = _instance(rng, 12, "indefinite")
    Q, c = H - np.diag(np.diag(H)), lin + np.diag(H)
    u, N, its = bnb._shor_admm(Q, c, 4, iters=300, tol=0.0, nonneg=True, deadline=time.perf_counter() - 1.0)
    assert its == 0 and not u.any() and not N.any()
    u, N, lam, its = bnb._convexify(Q, c, 4, "dnn", 300, nonneg=True, deadline=time.perf_counter() - 1.0)
    assert its == 0 and lam > 0  # the exact eigenvalue shift made the relaxation convex anyway


def test_gram_matrix_in_closed_form_matches_the_constraint_operators():
    # the operators _shor_admm iterates with, applied to every unit vector (how the Gram matrix used to be built)
    n, M = 6, 2
    m = 2 * n + 2
    A_op, At_op = bnb._shor_operators(n, M)
    AA = np.stack([A_op(At_op(e)) for e in np.eye(m)], axis=1)
    np.testing.assert_allclose(bnb._gram(n, M), AA, atol=1e-12)
    np.testing.assert_allclose(bnb._pinv_psd(AA), np.linalg.pinv(AA), atol=1e-9)


def test_simple_bound_is_below_every_feasible_energy():
    rng = np.random.default_rng(4)
    for kind in ("psd", "psd+linear", "indefinite"):
        H, lin = _instance(rng, 9, kind)
        lin = np.zeros(9) if lin is None else lin
        Q, c = H - np.diag(np.diag(H)), lin + np.diag(H)
        for M in (1, 3, 8):
            _, er = _brute_lex(H, lin, M, 1)
            assert bnb._simple_bound(Q, c, M) <= er[0] + 1e-12


@pytest.mark.parametrize("strategy", ["enumerate", "bnb"])
def test_solve_time_limit_labels_an_out_of_time_result(strategy):
    # N=30, M=8 is enumerated (5.9 million states) by "auto": the limit used to be ignored there
    p = qblock.random_problem(30, 8, seed=3)
    ss = qblock.solve(p, "exact", num_solutions=10, strategy=strategy, time_limit=1e-9)
    assert ss.info["certified_optimal"] is False and ss.info["time_limit_reached"] is True
    assert 0 < ss.info["gap"] < math.inf
    X = p.states_from_sampleset(ss)
    _check_valid_states(X, ss.record.energy - p.offset, p.H, p.linear, 8, 10)
    full = qblock.solve(p, "exact", num_solutions=10)
    assert full.info["certified_optimal"] is True and full.info["time_limit_reached"] is False
    assert full.record.energy[-1] >= ss.record.energy[-1] - ss.info["gap"] - 1e-9


def test_cli_says_not_certified_plainly(tmp_path, capsys):
    from qblock.cli import main

    f = tmp_path / "p.npz"
    qblock.random_problem(30, 8, seed=3).save(f)
    assert main(["solve", str(f), "-b", "exact", "--top", "5", "--param", "time_limit=1e-9"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "(certified optimal)" not in out[0]
    assert out[1].startswith("NOT CERTIFIED: time limit reached; gap ")
    assert main(["solve", str(f), "-b", "exact", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "(certified optimal)" in out and "NOT CERTIFIED" not in out


def test_scip_time_limit_zero_is_an_error_and_a_tiny_one_a_labelled_result(tmp_path, capsys):
    # time_limit=0 used to return 0 solutions, exit 0, no message
    pytest.importorskip("pyscipopt")
    from qblock.cli import main

    p = qblock.random_problem(30, 8, seed=0)
    with pytest.raises(ValueError, match="backend 'scip': parameter 'time_limit' must be a finite number > 0"):
        qblock.solve(p, "scip", num_solutions=5, time_limit=0)
    ss = qblock.solve(p, "scip", num_solutions=5, time_limit=1e-9)
    assert len(ss) == 5 and ss.info["certified_optimal"] is False and ss.info["time_limit_reached"] is True
    assert 0 < ss.info["gap"] < math.inf
    _check_valid_states(p.states_from_sampleset(ss), ss.record.energy - p.offset, p.H, p.linear, 8, 5)
    f = tmp_path / "p.npz"
    p.save(f)
    assert main(["solve", str(f), "-b", "scip", "--top", "5", "--param", "time_limit=0"]) == 2
    assert "parameter 'time_limit'" in capsys.readouterr().err
    assert main(["solve", str(f), "-b", "scip", "--top", "5", "--param", "time_limit=1e-9"]) == 0
    assert "NOT CERTIFIED: time limit reached" in capsys.readouterr().out


@pytest.mark.slow  # waits for SCIP to be solving (a sleep): timing-dependent on a loaded machine, so opt-in
def test_ctrl_c_during_scip_interrupts_instead_of_returning_a_partial_list(tmp_path):
    # SCIP catches SIGINT itself and used to hand back a partial, unlabelled top-k with exit 0
    pytest.importorskip("pyscipopt")
    import signal
    import subprocess
    import sys
    import time

    f = tmp_path / "p.npz"
    qblock.random_problem(80, 24, seed=1).save(f)  # a certified top-20 takes SCIP minutes
    proc = subprocess.Popen([sys.executable, "-m", "qblock", "solve", str(f), "-b", "scip", "--top", "20",
                             "--param", "time_limit=600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # Ctrl-C reaches the child even when this run was started in the background
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(4.0)  # imports, model building, then SCIP is solving
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == "qblock: interrupted"
    assert "rank" not in out  # no partial table
