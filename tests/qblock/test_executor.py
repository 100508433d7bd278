"""The executor abstraction: local (default) and Ray.

The default run checks the local executor and every hook's local path (fast, no cluster). Tests
marked ``cluster`` start a local Ray instance with 2 CPUs (``python -m pytest -m cluster``; CI runs
them): validation on a tiny model and ``qblock compare`` on a synthetic problem give the same tables as
the local executor, and killing a model actor mid-run still completes with identical results.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import qblock
from qblock.compare import compare_backends, summarize
from qblock.executor import ExecutorError, LocalExecutor, open_executor, parse_spec

# what may differ between two runs of the same study: wall-clock times
_TIMES = {"wall_time", "timing", "time_per_run", "tts99", "cost_seconds", "eval_seconds"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _TIMES}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------ default
def test_parse_spec_and_errors():
    assert parse_spec("local") == ("local", None)
    assert parse_spec("ray") == ("ray", None)
    assert parse_spec("ray:10.0.0.1:6379") == ("ray", "10.0.0.1:6379")
    assert parse_spec("ray:ray://head:10001") == ("ray", "ray://head:10001")
    for bad in ("dask", "local:x", ""):
        with pytest.raises(ExecutorError, match="unknown executor"):
            parse_spec(bad)


def test_local_map_and_model_workers_report_progress_in_order():
    ex = open_executor("local")
    seen = []
    assert ex.map(lambda x: x * 2, [1, 2, 3], on_result=lambda i, r: seen.append((i, r))) == [2, 4, 6]
    assert seen == [(0, 2), (1, 4), (2, 6)]
    calls = []

    def setup(model):
        calls.append(model)
        return model * 10

    w = ex.bind_model(3)
    assert w.map(lambda s, x: s + x, [1, 2], setup=setup, key="k") == [31, 32]
    assert w.map(lambda s, x: s - x, [1], setup=setup, key="k") == [29]
    assert calls == [3]  # the state is built once per key


def test_ray_missing_is_one_line_naming_the_install(monkeypatch, capsys):
    from qblock.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ExecutorError, match=r"pip install 'qblock\[ray\]'"):
        open_executor("ray")
    assert main(["compare", "--blocks", "8", "--backends", "swap", "--repeats", "1", "--executor", "ray", "-q",
                 "--out", "unused-out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "qblock[ray]" in err[0], err


@pytest.mark.parametrize("spec, words", [("dask", "unknown executor 'dask'"),
                                         ("ray:127.0.0.1:1", "no Ray cluster answers at 127.0.0.1:1")])
def test_bad_executor_is_one_line_before_any_work(spec, words, capsys, tmp_path):
    from qblock.cli import main

    if spec.startswith("ray"):
        pytest.importorskip("ray")
    assert main(["compare", "--blocks", "8", "--backends", "swap", "--repeats", "1", "--executor", spec, "-q",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o" / "compare.json").exists()


class _FakeRay:
    """What ``_collect`` uses of Ray: refs finish in the order given, ``get`` may fail, ``cancel`` is recorded."""

    def __init__(self, order, fail=None):
        self.order, self.fail, self.cancelled = list(order), fail, []

    def wait(self, refs, num_returns=1):
        ref = next(r for r in self.order if r in refs)
        return [ref], [r for r in refs if r != ref]

    def get(self, ref):
        if ref == self.fail:
            raise KeyboardInterrupt
        return ref.upper()

    def cancel(self, ref, force=False):
        self.cancelled.append(ref)


def test_collect_keeps_index_order_and_leaves_stopping_to_close_on_an_error():
    from qblock.executor import _collect

    seen = []
    ray = _FakeRay(["c", "a", "b"])
    assert _collect(ray, {"a": 0, "b": 1, "c": 2}, 3, lambda i, v: seen.append((i, v))) == ["A", "B", "C"]
    assert seen == [(2, "C"), (0, "A"), (1, "B")] and ray.cancelled == []
    ray = _FakeRay(["c", "a", "b"], fail="a")
    with pytest.raises(KeyboardInterrupt):
        _collect(ray, {"a": 0, "b": 1, "c": 2}, 3, None)
    # no ray.cancel: racing a finishing task it aborts the driver (Ray 2.60); close() stops the work
    assert ray.cancelled == []


def test_compare_with_the_local_executor_equals_the_default():
    p = qblock.random_problem(10, 3, seed=4)
    a = compare_backends(p, ["swap", "tabu"], repeats=2, seed=3, progress=False)
    b = compare_backends(p, ["swap", "tabu"], repeats=2, seed=3, progress=False, executor=LocalExecutor())
    assert _strip(a["runs"]) == _strip(b["runs"])


def test_batched_measurements_equal_single_ones():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from qblock.llm.measured import CalibrationLoss
    from qblock.validate.evaluate import CandidateEvaluator

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                     num_attention_heads=2, num_key_value_heads=2)).eval()
    xs = [torch.randint(0, 40, (10,)) for _ in range(3)]
    sets = [(1,), (0, 2), (1,), (3,)]
    one, many = CalibrationLoss(m, xs), CalibrationLoss(m, xs, executor=LocalExecutor())
    singles = [one.loss(s) for s in sets]
    assert many.loss_many(sets) == singles
    assert (many.tokens, many.evaluations) == (one.tokens, one.evaluations) == (4 * 30, 4)
    ev1, ev2 = CandidateEvaluator(m, xs), CandidateEvaluator(m, xs)
    assert [ev1.evaluate(s)["heldout_loss"] for s in sets] == [r["heldout_loss"] for r in ev2.evaluate_many(sets)]


# ------------------------------------------------------------------------------------------ cluster
@pytest.fixture(scope="module")
def ray_executor():
    pytest.importorskip("ray")
    with open_executor("ray", num_cpus=2) as ex:
        yield ex


def _tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    calib = [torch.randint(0, 40, (12,)) for _ in range(10)]
    evals = [torch.randint(0, 40, (12,)) for _ in range(4)]
    return model, calib, evals


@pytest.mark.cluster
def test_ray_compare_equals_local(ray_executor):
    p = qblock.random_problem(12, 3, seed=0)
    args = dict(repeats=3, seed=1, progress=False)
    loc = compare_backends(p, ["swap", "sa", "tabu"], **args)
    ray_ = compare_backends(p, ["swap", "sa", "tabu"], executor=ray_executor, **args)
    assert _strip(loc["runs"]) == _strip(ray_["runs"])
    assert _strip(summarize(loc)) == _strip(summarize(ray_))
    assert loc["reference"] == ray_["reference"]


@pytest.mark.cluster
def test_cli_compare_with_ray_writes_the_local_table(ray_executor, tmp_path):
    from qblock.cli import main

    base = ["compare", "--blocks", "10", "--backends", "exact,swap,steepest", "--repeats", "2", "-q"]
    assert main([*base, "--out", str(tmp_path / "local")]) == 0
    assert main([*base, "--executor", "ray", "--out", str(tmp_path / "ray")]) == 0
    a, b = (json.loads((tmp_path / d / "compare.json").read_text()) for d in ("local", "ray"))
    assert _strip(a["studies"]) == _strip(b["studies"])
    cols = lambda t: [line.split("|")[:8] for line in t.splitlines() if line.startswith("|")]  # noqa: E731
    assert cols((tmp_path / "local" / "compare.md").read_text()) == cols((tmp_path / "ray" / "compare.md").read_text())


@pytest.mark.cluster
def test_ray_validation_table_equals_local(ray_executor, tmp_path):
    pytest.importorskip("torch")
    from qblock.llm.energy import build_problem
    from qblock.llm.gradients import gate_gradients
    from qblock.validate.runner import ValidationSettings, validate

    model, calib, evals = _tiny_model()
    p = build_problem(gate_gradients(model, calib, progress=False), energy="fisher")
    settings = ValidationSettings(num_removes=[2], top_k=3, num_random=2, backend="exact", n_boot=50,
                                  progress=False, select_samples=4, select_evaluations=6,
                                  select_confirm_samples=8, select_confirm=2)
    loc = validate(p, model, None, calib, evals, settings, tmp_path / "local")
    ray_ = validate(p, model, None, calib, evals, settings, tmp_path / "ray", executor=ray_executor)
    assert _strip(loc["rows"]) == _strip(ray_["rows"])
    assert loc["summary"]["recommended"] == ray_["summary"]["recommended"]


@pytest.mark.cluster
def test_killing_a_model_actor_mid_run_completes_identically(ray_executor):
    import ray

    from qblock.validate.evaluate import CandidateEvaluator

    model, _, evals = _tiny_model()
    sets = [(i,) for i in range(6)] + [(i, i + 1) for i in range(5)]
    want = [r["heldout_loss"] for r in CandidateEvaluator(model, evals).evaluate_many(sets)]
    ev = CandidateEvaluator(model, evals)
    done = []

    def kill_once(k, r):
        done.append(k)
        if len(done) == 2:  # one actor dies with work in flight; Ray must not restart it (no_restart)
            ray.kill(ev._workers[1].actors[0], no_restart=True)

    got = ev.evaluate_many(sets, executor=ray_executor, on_result=kill_once)
    assert [r["heldout_loss"] for r in got] == want
    assert sorted(done) == list(range(len(sets)))  # every set reported exactly once
    assert ev.num_evaluations == len(sets)
    assert ev._workers[1].resubmitted >= 1


@pytest.mark.cluster
def test_sleb_on_ray_equals_local(ray_executor):
    from qblock.validate.baselines import sleb

    model, calib, _ = _tiny_model()
    a = sleb(model, calib[:4], 3)
    b = sleb(model, calib[:4], 3, pool=ray_executor)
    assert [(r.removed, r.forward_passes, r.extra["calib_loss"]) for r in a] == \
           [(r.removed, r.forward_passes, r.extra["calib_loss"]) for r in b]
    assert np.isfinite(b[-1].extra["calib_loss"])


@pytest.mark.cluster
def test_ctrl_c_stops_a_ray_compare_cleanly(tmp_path):
    """SIGINT mid-study: exit 130 promptly with the one-line message (Ray stopped with its tasks)."""
    import os
    import re
    import signal
    import subprocess
    import threading
    import time

    pytest.importorskip("ray")
    from conftest import ROOT as root
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    # far more runs than any machine finishes before the interrupt (601 runs of about a second each)
    p = subprocess.Popen([sys.executable, "-m", "qblock", "compare", "--blocks", "60", "--backends", "swap,sa,tabu",
                          "--repeats", "200", "--executor", "ray", "--out", str(tmp_path / "o")], cwd=root, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(p.stderr.fileno(), 4096), b"")),
                              daemon=True)
    reader.start()
    try:
        # interrupt once the progress bar shows a finished run, not after a guessed start-up time
        deadline = time.time() + 180
        while not re.search(rb"\b[1-9][0-9]*/[0-9]+ \[", b"".join(chunks)) and p.poll() is None:
            assert time.time() < deadline, b"".join(chunks)[-2000:].decode(errors="replace")
            time.sleep(0.2)
        assert p.poll() is None, "the study ended before it could be interrupted: " + \
            b"".join(chunks)[-2000:].decode(errors="replace")
        t0 = time.time()
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
        took = time.time() - t0
    finally:
        if p.poll() is None:
            p.kill()
        reader.join(timeout=30)
    err = b"".join(chunks).decode(errors="replace")
    assert p.returncode == 130, err[-2000:]
    assert took < 30 and "qblock: interrupted" in err
    assert not (tmp_path / "o" / "compare.json").exists()


@pytest.mark.cluster
def test_tasks_after_model_actors_do_not_wait_for_their_cpus(ray_executor):
    import operator

    w = ray_executor.bind_model(5)  # any picklable object serves as the "model"
    assert w.map(operator.add, [1, 2]) == [6, 7]
    assert ray_executor.map(abs, [-1, -2, 3]) == [1, 2, 3]  # would hang if the actors kept both CPUs
    assert w.map(operator.mul, [3]) == [15]  # the actors start again


def _die_once(path: str) -> str:
    """Kill the worker process running it the first time (a machine that goes away), succeed after."""
    import os
    from pathlib import Path

    marker = Path(path)
    if not marker.exists():
        marker.write_text("died once")
        os._exit(1)
    return "ran again"


@pytest.mark.cluster
def test_a_task_whose_worker_dies_is_run_again_once(ray_executor, tmp_path):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    seen = []
    out = ray_executor.map(_die_once, [str(tmp_path / "m0"), str(tmp_path / "m1")],
                           on_result=lambda i, r: seen.append(i))
    assert out == ["ran again", "ran again"]
    assert sorted(seen) == [0, 1]  # each result reported once
