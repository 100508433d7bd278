"""Tests of the D-Wave Leap backends, offline: dwave-system's MockDWaveSampler for the QPU path (real
embedding, chains, unembedding), fake hybrid samplers for the cloud solvers, a local socket that never
answers for the timeout bound. Live tests (marker ``live``) need a Leap token and are opt-in."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import dimod
import numpy as np
import pytest

pytest.importorskip("dwave.system")

import qblock  # noqa: E402
from qblock.backends import leap  # noqa: E402
from qblock.testing import check_backend, conformance_problems  # noqa: E402


# ---------------------------------------------------------------------------- fakes
class FakeLeapHybridSampler:
    """Stands in for LeapHybridSampler: solves with dwave-samplers' tabu, answers with Leap-like info."""

    instances: list["FakeLeapHybridSampler"] = []

    def __init__(self, **config):
        self.config = config
        self.closed = False
        self.submitted: list[dict] = []
        FakeLeapHybridSampler.instances.append(self)

    parameters = {"time_limit": [], "label": []}
    properties = {"category": "hybrid", "minimum_time_limit": [[1, 3.0]]}

    def sample(self, bqm, time_limit=None, label=None):
        from dwave.samplers import TabuSampler

        self.submitted.append({"time_limit": time_limit, "label": label, "num_variables": bqm.num_variables})
        ss = TabuSampler().sample(bqm, num_reads=4, timeout=20, seed=1234)
        ss = ss.aggregate().truncate(1)
        ss.info.update(problem_id=str(uuid.UUID(int=len(self.submitted))), problem_label=label,
                       timing={"qpu_access_time": 0, "run_time": int((time_limit or 3) * 1e6),
                               "charge_time": int((time_limit or 3) * 1e6)})
        return ss

    def close(self):
        self.closed = True


class FakeLeapHybridCQMSampler:
    """Stands in for LeapHybridCQMSampler: a seeded tabu on the CQM's penalised BQM; returns feasible
    and infeasible samples with ``is_feasible`` as Leap does."""

    def __init__(self, **config):
        self.config = config

    def sample_cqm(self, cqm, time_limit=None, label=None):
        from dwave.samplers import TabuSampler

        bqm, _ = dimod.cqm_to_bqm(cqm, lagrange_multiplier=10.0 * max(1.0, max(abs(b) for b in cqm.objective.linear.values())))
        good = TabuSampler().sample(bqm, num_reads=8, timeout=30, seed=99)
        rng = np.random.default_rng(5)
        bad = rng.integers(0, 2, (4, len(cqm.variables)))  # some infeasible noise, like a real answer
        # cqm_to_bqm adds slack variables for inequalities (rank problems); answers hold the CQM's own
        samples = [{v: s[v] for v in cqm.variables} for s in good.samples()] + \
            [dict(zip(cqm.variables, row)) for row in bad]
        ss = dimod.SampleSet.from_samples_cqm(samples, cqm)
        ss.info.update(problem_id="fake-cqm", timing={"run_time": int((time_limit or 5) * 1e6)})
        return ss


class FakeLeapHybridNLSampler:
    """Stands in for LeapHybridNLSampler: evaluates candidate permutations with the model itself and
    keeps the best few as the model's states (Leap returns a handful of states)."""

    def __init__(self, num_remove: int, keep: int = 6):
        self.num_remove = num_remove
        self.keep = keep

    def sample(self, model, time_limit=None, label=None):
        from concurrent.futures import Future

        (order,) = list(model.iter_decisions())
        n = order.shape()[0]
        perms = []
        for c in itertools.combinations(range(n), self.num_remove):
            rest = [i for i in range(n) if i not in c]
            perms.append(list(c) + rest)
        model.states.resize(len(perms))
        for i, perm in enumerate(perms):
            order.set_state(i, perm)
        obj = np.array([model.objective.state(i) for i in range(len(perms))])
        best = [perms[i] for i in np.argsort(obj, kind="stable")[: self.keep]]
        model.states.resize(len(best))
        for i, perm in enumerate(best):
            order.set_state(i, perm)
        fut: Future = Future()
        fut.set_result(type("SampleResult", (), {"info": {"problem_id": "fake-nl", "timing": {"run_time": 5e6}}})())
        return fut


def mock_qpu_factory(**config):
    from dwave.system.testing import MockDWaveSampler

    return MockDWaveSampler(topology_type="pegasus", topology_shape=[4], substitute_kwargs={"seed": 3},
                            parameter_warnings=False)


@pytest.fixture(autouse=True)
def _no_token(monkeypatch, tmp_path):
    """No Leap token and a private cache, whatever the developer's machine has configured."""
    monkeypatch.delenv("DWAVE_API_TOKEN", raising=False)
    empty = tmp_path / "dwave.conf"
    empty.write_text("[defaults]\n")
    monkeypatch.setenv("DWAVE_CONFIG_FILE", str(empty))
    monkeypatch.setenv("QBLOCK_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------- token, errors, timeouts
def test_check_token_without_and_with_token(monkeypatch):
    ok, reason = leap.check_token()
    assert not ok and "dwave setup" in reason
    assert qblock.backends.available()["leap-cqm"]["available"] is False
    monkeypatch.setenv("DWAVE_API_TOKEN", "DEV-abc")
    ok, reason = leap.check_token()
    assert ok and "DWAVE_API_TOKEN" in reason


@pytest.mark.parametrize("backend", ["leap-hybrid", "leap-cqm", "leap-nl", "dwave-qpu"])
def test_missing_token_is_one_clear_error(backend, tmp_path):
    p = qblock.random_problem(6, 2, seed=0)
    with pytest.raises(leap.LeapError, match="dwave setup") as err:
        qblock.solve(p, backend, num_solutions=3, seed=1)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert "token" in str(err.value).lower()
    # nothing was sent, so no run folder was made
    assert not (tmp_path / "cache" / "leap").exists() or not any((tmp_path / "cache" / "leap").iterdir())


def test_unanswering_endpoint_fails_within_bounded_time():
    """A server that accepts connections and never replies: bounded by request_timeout and retries."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    held = []

    def accept():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    p = qblock.random_problem(6, 2, seed=0)
    try:
        with pytest.raises(leap.LeapError, match="dwave setup") as err:
            qblock.solve(p, "leap-cqm", num_solutions=3, token="DEV-fake", endpoint=f"http://127.0.0.1:{port}/sapi/v2/",
                         request_timeout=1.0, http_retry_total=1)
    finally:
        server.close()
        for c in held:
            c.close()
    # the request timeout, not a hang or another error, ended the call
    assert "did not answer in time" in str(err.value)


def test_client_config_is_explicit():
    cfg = leap.client_config()
    assert cfg["request_timeout"] == leap.DEFAULT_REQUEST_TIMEOUT
    assert cfg["http_retry_total"] == leap.DEFAULT_HTTP_RETRY_TOTAL
    assert cfg["polling_timeout"] == leap.DEFAULT_POLLING_TIMEOUT
    FakeLeapHybridSampler.instances.clear()
    qblock.solve(qblock.random_problem(6, 2, seed=0), "leap-hybrid", num_solutions=2, seed=0,
                 sampler_factory=FakeLeapHybridSampler, request_timeout=7, http_retry_total=0)
    inst = FakeLeapHybridSampler.instances[-1]
    assert inst.config == {"request_timeout": 7.0, "http_retry_total": 0, "polling_timeout": leap.DEFAULT_POLLING_TIMEOUT}
    assert inst.closed


# ---------------------------------------------------------------------------- QPU through MockDWaveSampler
def test_qpu_mock_on_a_problem_whose_chains_are_single_qubits():
    p = qblock.random_problem(4, 2, seed=0)  # dwave-system leaves the chain strength None: nothing to couple
    ss = qblock.solve(p, "dwave-qpu", num_solutions=2, seed=0, sampler_factory=mock_qpu_factory, num_reads=10)
    assert ss.first.energy == pytest.approx(qblock.solve(p, "exact", num_solutions=1).first.energy)
    assert all("chain_strength" not in s or s["chain_strength"] > 0 for s in ss.info["leap"]["submissions"])


def test_qpu_mock_embeds_reports_chains_and_saves(tmp_path):
    p = qblock.random_problem(10, 3, seed=2)
    ss = qblock.solve(p, "dwave-qpu", num_solutions=5, seed=4, sampler_factory=mock_qpu_factory, num_reads=20)
    best = qblock.solve(p, "exact", num_solutions=1).first.energy
    assert ss.first.energy == pytest.approx(best)
    info = ss.info
    assert info["chain_strength_method"].startswith("uniform_torque_compensation")
    subs = info["leap"]["submissions"]
    assert len(subs) == len(info["penalty_scan"]) and all(s["chain_strength"] > 0 for s in subs)
    assert all(s["physical_qubits"] >= 10 and s["max_chain_length"] >= 2 for s in subs)  # a real embedding
    assert 0.0 <= info["chain_break_fraction"] <= 1.0
    assert info["num_reads"] == 20 * len(subs)
    assert info["qpu_access_time_us"] > 0
    run = Path(info["run_dir"])
    assert run.parent == tmp_path / "cache" / "leap" and run.name.endswith("-dwave-qpu")
    # the submitted BQMs and the answers are on disk in dimod's own formats
    with open(run / "bqm-0.bqm", "rb") as fh:
        bqm0 = dimod.BinaryQuadraticModel.from_file(fh)
    assert bqm0 == p.to_bqm(penalty=info["penalty_scan"][0]["penalty"])
    raw = dimod.SampleSet.from_serializable(json.loads((run / "result-0.json").read_text()))
    assert "chain_break_fraction" in raw.record.dtype.names
    assert qblock.BlockRemovalProblem.load(run / "problem.npz").H.tolist() == p.H.tolist()
    final = dimod.SampleSet.from_serializable(json.loads((run / "final.json").read_text()))
    assert np.array_equal(final.record.sample, ss.record.sample)


def test_qpu_weak_chains_break_and_are_reported():
    p = qblock.random_problem(10, 3, seed=2)
    ss = qblock.solve(p, "dwave-qpu", num_solutions=3, seed=4, sampler_factory=mock_qpu_factory,
                      num_reads=20, chain_strength=1e-4, penalty_scan=(1.0,))
    assert ss.info["chain_strength"] == pytest.approx(1e-4)
    assert ss.info["chain_strength_method"] == "given"
    assert ss.info["chain_break_fraction"] > 0


def test_qpu_mock_conformance():
    check_backend("dwave-qpu", problems=conformance_problems(max_blocks=12), sampler_factory=mock_qpu_factory,
                  num_reads=20)


def test_qpu_mock_conformance_on_rank_problems(tmp_path):
    """The rank-selection problem's penalised BQM (groups + slack bits) through the QPU path, mocked."""
    from qblock.testing import rank_conformance_problems

    check_backend("dwave-qpu", problems=rank_conformance_problems(), sampler_factory=mock_qpu_factory,
                  num_reads=20, save_dir=str(tmp_path))


# ---------------------------------------------------------------------------- hybrid samplers (fakes)
def test_hybrid_fake_conformance_and_time_limit():
    FakeLeapHybridSampler.instances.clear()
    check_backend("leap-hybrid", sampler_factory=FakeLeapHybridSampler, time_limit=4)
    inst = FakeLeapHybridSampler.instances[-1]
    assert inst.submitted and inst.submitted[0]["time_limit"] == 4.0


def test_hybrid_saves_every_submission():
    p = qblock.random_problem(8, 3, seed=1)
    ss = qblock.solve(p, "leap-hybrid", num_solutions=3, seed=0, sampler_factory=FakeLeapHybridSampler,
                      penalty_scan=(0.2, 1.0), label="qblock-test")
    run = Path(ss.info["run_dir"])
    names = sorted(f.name for f in run.iterdir())
    assert names == ["bqm-0.bqm", "bqm-1.bqm", "final.json", "problem.npz", "request-0.json", "request-1.json",
                     "request.json", "result-0.json", "result-1.json"]
    req = json.loads((run / "request-1.json").read_text())
    assert req["parameters"]["label"] == "qblock-test" and req["num_variables"] == 8
    subs = ss.info["leap"]["submissions"]
    assert [s["problem_label"] for s in subs] == ["qblock-test", "qblock-test"]
    assert subs[0]["timing"]["charge_time"] > 0


def test_cqm_fake_conformance_and_infeasible_count():
    check_backend("leap-cqm", problems=conformance_problems(), sampler_factory=FakeLeapHybridCQMSampler)
    p = qblock.random_problem(10, 4, seed=3)
    ss = qblock.solve(p, "leap-cqm", num_solutions=5, seed=0, sampler_factory=FakeLeapHybridCQMSampler)
    run = Path(ss.info["run_dir"])
    with open(run / "model.cqm", "rb") as fh:
        cqm = dimod.ConstrainedQuadraticModel.from_file(fh)
    assert list(cqm.constraints) == ["remove_exactly_M"]
    raw = dimod.SampleSet.from_serializable(json.loads((run / "result-0.json").read_text()))
    assert ss.info["num_infeasible"] == int((~raw.record.is_feasible).sum())
    assert ss.info["num_infeasible"] >= 1  # the fake adds infeasible noise; it must be dropped
    assert ss.info["repaired"] is False


def test_nl_model_energies_match_problem():
    p = qblock.random_problem(9, 3, linear=True, seed=6)
    p = qblock.BlockRemovalProblem(p.H, 3, linear=p.linear, offset=0.25)
    rng = np.random.default_rng(0)
    perms = np.array([rng.permutation(9) for _ in range(25)])
    e = leap.nl_energies(p, perms)
    expect = [p.energy_of(perm[:3]) for perm in perms]
    assert np.allclose(e, expect, rtol=1e-12, atol=1e-12)
    model, _ = leap.build_nl_model(p)
    assert model.num_constraints() == 0


def test_nl_fake_conformance():
    for prob in conformance_problems():
        m = prob.num_remove
        check_backend("leap-nl", problems=[prob], sampler_factory=lambda m=m, **cfg: FakeLeapHybridNLSampler(m))
    p = qblock.random_problem(8, 2, seed=0)
    ss = qblock.solve(p, "leap-nl", num_solutions=10, seed=0, sampler_factory=lambda **c: FakeLeapHybridNLSampler(2))
    assert len(ss) == 6  # the solver's own states only, unless polish=True
    from dwave.optimization import Model

    with open(Path(ss.info["run_dir"]) / "model.nl", "rb") as fh:
        assert Model.from_file(fh).num_decisions() == 1
    more = qblock.solve(p, "leap-nl", num_solutions=10, seed=0, polish=True,
                        sampler_factory=lambda **c: FakeLeapHybridNLSampler(2))
    assert len(more) == 10


# ---------------------------------------------------------------------------- dry run
@pytest.mark.parametrize("backend", ["leap-hybrid", "leap-cqm", "leap-nl", "dwave-qpu"])
def test_dry_run_plan_makes_no_network_call(backend, monkeypatch):
    import dwave.cloud

    def boom(*a, **k):
        raise AssertionError("dry run must not touch the network")

    monkeypatch.setattr(dwave.cloud.Client, "from_config", boom)
    p = qblock.random_problem(20, 5, seed=0)
    plan = leap.dry_run_plan(p, backend, time_limit=7 if backend != "dwave-qpu" else None)
    assert plan["num_variables"] == 20
    assert plan["num_interactions"] == 190
    json.dumps(plan)
    text = leap.format_plan(plan)
    assert text.startswith(f"dry run: {backend} would send") and "num_variables" in text
    if backend == "leap-cqm":
        assert plan["num_constraints"] == 1 and plan["time_limit_s"] == 7.0
    if backend == "dwave-qpu":
        assert plan["estimated_qpu_access_time_us"] > 0 and plan["estimated_physical_qubits"] >= 20
        assert plan["submissions"] == len(plan["penalty_strengths"])
    assert not (Path(os.environ["QBLOCK_CACHE"]) / "leap").exists()


def test_dry_run_rejects_non_leap_backend():
    with pytest.raises(ValueError, match="Leap backends"):
        leap.dry_run_plan(qblock.random_problem(6, 2, seed=0), "swap")


# ---------------------------------------------------------------------------- CLI (once `qblock solve` exists)
def _cli_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DWAVE_")}
    conf = tmp_path / "empty.conf"
    conf.write_text("[defaults]\n")
    env.update(DWAVE_CONFIG_FILE=str(conf), HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "xdg"),
               QBLOCK_CACHE=str(tmp_path / "cache"))
    return env


def test_cli_leap_cqm_without_token_one_line_nonzero(tmp_path):
    prob = tmp_path / "P.npz"
    qblock.random_problem(10, 3, seed=0).save(prob)
    out = subprocess.run([sys.executable, "-m", "qblock", "solve", str(prob), "--remove", "3", "--backend", "leap-cqm"],
                         capture_output=True, text=True, env=_cli_env(tmp_path), timeout=60)
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert "dwave setup" in lines[0]


def test_cli_dry_run_prints_plan(tmp_path):
    env = _cli_env(tmp_path)
    helptext = subprocess.run([sys.executable, "-m", "qblock", "solve", "--help"], capture_output=True, text=True, env=env).stdout
    assert "--dry-run" in helptext
    prob = tmp_path / "P.npz"
    qblock.random_problem(10, 3, seed=0).save(prob)
    out = subprocess.run([sys.executable, "-m", "qblock", "solve", str(prob), "--remove", "3", "--backend", "leap-cqm",
                          "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "num_variables" in out.stdout and "no network call" in out.stdout


# ---------------------------------------------------------------------------- live (opt-in)
@pytest.fixture
def live_token(monkeypatch):
    monkeypatch.undo()  # the real configuration
    ok, reason = leap.check_token()
    if not ok:
        pytest.skip(reason)


@pytest.mark.live
@pytest.mark.parametrize("backend", ["leap-cqm", "leap-hybrid", "leap-nl", "dwave-qpu"])
def test_live_small_problem(backend, live_token):
    p = qblock.random_problem(12, 4, seed=0)
    ss = qblock.solve(p, backend, num_solutions=5, seed=1, label=f"qblock live test {backend}")
    best = qblock.solve(p, "exact", num_solutions=1).first.energy
    assert ss.first.energy == pytest.approx(best, rel=1e-6)
    assert Path(ss.info["run_dir"]).is_dir()
