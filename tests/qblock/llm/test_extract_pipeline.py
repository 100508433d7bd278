"""Resumable extraction and ``qblock extract`` on a tiny model saved to a temporary directory."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qblock.cli import main  # noqa: E402
from qblock.llm import gradients, pipeline  # noqa: E402
from qblock.problems.block_removal import BlockRemovalProblem  # noqa: E402

from conftest import save_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, calibration file) for a 4-block Llama."""
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(root / "model", layers=4, max_position_embeddings=64)
    rng = np.random.default_rng(0)
    paras = [" ".join(f"w{k}" for k in rng.integers(0, 62, size=rng.integers(5, 30))) for _ in range(200)]
    (root / "calib.txt").write_text("\n\n".join(paras) + "\n")
    return root / "model", root / "calib.txt"


def run(tiny, out, **kw):
    model_dir, calib = tiny
    args = dict(model_spec=str(model_dir), num_samples=10, seq_len=12, batch_size=3, seed=1,
                calibration=str(calib), num_eval=4, out=out, progress=False, checkpoint_every=3)
    args.update(kw)
    return pipeline.extract_problem(**args)


def test_problem_file_contents(tiny, tmp_path):
    out = tmp_path / "p.npz"
    p = run(tiny, out, num_remove=1)
    q = BlockRemovalProblem.load(out)
    A = q.arrays["A"]
    assert A.shape == (10, 4) and q.labels == tuple(f"model.layers.{i}" for i in range(4))
    np.testing.assert_allclose(q.H, A.T @ A / 10, rtol=1e-12)
    md = q.metadata
    assert md["energy"] == "fisher" and md["gate"] == "layer" and md["granularity"] == "block"
    assert md["num_samples"] == 10 and md["seq_len"] == 12 and md["num_tokens"] == 120
    assert md["model"]["id"] == "model" and md["model"]["source"].startswith("local:")
    assert md["data"]["calibration"]["num_samples"] == 10 and md["data"]["evaluation"]["num_samples"] == 4
    assert not set(md["data"]["calibration"]["passages"]) & set(md["data"]["evaluation"]["passages"])
    assert md["data"]["sha256"] and q.num_remove == 1 and p.num_blocks == 4
    assert not pipeline.partial_path(out).exists()  # checkpoint removed once the output is written
    json.dumps(md)


def test_interrupted_then_resumed_equals_uninterrupted(tiny, tmp_path, monkeypatch):
    full = run(tiny, tmp_path / "full.npz").arrays["A"]

    real = gradients.gate_gradients
    calls = {"n": 0}

    def dies_on_third_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "p.npz"
    monkeypatch.setattr(gradients, "gate_gradients", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, out)
    assert not out.exists()
    with np.load(pipeline.partial_path(out), allow_pickle=False) as z:
        assert z["rows"].shape == (6, 4)  # two finished batches of 3 were checkpointed
        assert json.loads(str(z["manifest"]))["num_samples"] == 10

    seen = []

    def counting(model, samples, *a, **k):
        seen.append(len(samples))
        return real(model, samples, *a, **k)

    monkeypatch.setattr(gradients, "gate_gradients", counting)
    p = run(tiny, out)
    assert seen == [3, 1]  # only the missing batches were computed
    assert p.metadata["extraction"]["resumed_from"] == 6
    np.testing.assert_allclose(p.arrays["A"], full, rtol=1e-9, atol=0)
    assert not pipeline.partial_path(out).exists()


def test_changed_settings_are_refused_then_restart(tiny, tmp_path, monkeypatch):
    out = tmp_path / "p.npz"
    real = gradients.gate_gradients

    calls = {"n": 0}

    def one_then_die(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gradients, "gate_gradients", one_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, out)
    monkeypatch.setattr(gradients, "gate_gradients", real)
    with pytest.raises(pipeline.ExtractError, match=r"seq_len: 12 \(saved\) vs 10 \(now\).*--restart"):
        run(tiny, out, seq_len=10)
    with pytest.raises(pipeline.ExtractError, match="calibration tokens differ"):
        run(tiny, out, seed=2)
    p = run(tiny, out, seq_len=10, restart=True)
    assert p.metadata["seq_len"] == 10 and p.metadata["extraction"]["resumed_from"] == 0


def test_finished_output_is_reused_for_another_energy(tiny, tmp_path, monkeypatch):
    out = tmp_path / "p.npz"
    A = run(tiny, out).arrays["A"]

    def must_not_run(*a, **k):
        raise AssertionError("A should be reused, not recomputed")

    monkeypatch.setattr(gradients, "gate_gradients", must_not_run)
    p = run(tiny, out, energy="fisher+grad", num_remove=2)
    assert p.metadata["energy"] == "fisher+grad" and p.num_remove == 2
    np.testing.assert_array_equal(p.arrays["A"], A)
    np.testing.assert_allclose(p.linear, -A.mean(axis=0))
    with pytest.raises(pipeline.ExtractError, match="exists with other settings"):
        run(tiny, out, num_samples=9)


def test_cli_extract(tiny, tmp_path, capsys):
    model_dir, calib = tiny
    out = tmp_path / "cli.npz"
    argv = ["extract", "--model", str(model_dir), "--samples", "6", "--seq-len", "8", "--batch-size", "4",
            "--calibration", str(calib), "--eval-samples", "2", "--out", str(out), "--remove", "2", "-q"]
    assert main(argv) == 0
    p = BlockRemovalProblem.load(out)
    assert p.num_blocks == 4 and p.num_remove == 2 and p.arrays["A"].shape == (6, 4)
    # same command again: reuses the finished output; other settings: one-line error
    assert main(argv) == 0
    assert main(argv[:4] + ["7"] + argv[5:]) == 2
    err = capsys.readouterr().err
    assert "exists with other settings" in err and "--restart" in err and err.count("qblock: error") == 1
    assert err.strip() == err.strip().splitlines()[-1]  # nothing but the one-line error (quiet)
    assert main(["extract", "--model", str(tmp_path / "nope"), "--out", str(out), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_branch_sublayer_and_bad_flags(tiny, tmp_path, capsys):
    model_dir, calib = tiny
    out = tmp_path / "sub.npz"
    assert main(["extract", "--model", str(model_dir), "--samples", "4", "--seq-len", "8", "--gate", "branch",
                 "--granularity", "sublayer", "--calibration", str(calib), "--eval-samples", "0",
                 "--out", str(out), "-q"]) == 0
    p = BlockRemovalProblem.load(out)
    assert p.num_blocks == 8 and p.labels[1] == "model.layers.0.mlp"
    assert main(["extract", "--model", str(model_dir), "--granularity", "sublayer", "--out", str(out), "-q"]) == 2
    assert "needs --gate branch" in capsys.readouterr().err


def test_not_enough_calibration_text_is_one_line(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "w1 w2 w3"}\n')
    assert main(["extract", "--model", str(model_dir), "--samples", "4", "--seq-len", "8",
                 "--calibration", str(small), "--out", str(tmp_path / "x.npz"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "not enough text" in err and len(err.strip().splitlines()) == 1 and err.startswith("qblock: error")


def test_concurrent_run_on_same_output_is_refused(tiny, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "p.npz"
    lock = tmp_path / "p.npz.lock"
    # a live process holds the lock: refused with a clear message naming it
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, qblock._filelock as f; f.acquire({str(lock)!r}); "
                               "print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(pipeline.ExtractError, match=f"pid {holder.pid}"):
            run(tiny, out)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # a lock file left behind by a killed run is no obstacle, and is removed afterwards
    lock.write_text("999999999")
    run(tiny, out)
    assert out.exists() and not lock.exists()


def test_pairwise_energy(tiny, tmp_path):
    out = tmp_path / "pw.npz"
    p = run(tiny, out, energy="pairwise", num_samples=3, num_remove=1)
    q = BlockRemovalProblem.load(out)
    assert q.metadata["energy"] == "pairwise" and q.num_blocks == 4 and "A" not in q.arrays
    assert q.metadata["data"]["calibration"]["num_samples"] == 3 and p.num_remove == 1
    with pytest.raises(pipeline.ExtractError, match="exists"):
        run(tiny, out, energy="pairwise", num_samples=3)


def test_measured_energy_from_the_cli(tiny, tmp_path):
    from qblock.cli import main

    out = tmp_path / "m.npz"
    assert main(cli_args(tiny, out, "--energy", "measured")) == 0
    q = BlockRemovalProblem.load(out)
    assert q.metadata["energy"] == "measured" and q.num_blocks == 4 and "A" not in q.arrays
    sel = q.metadata["selection"]
    assert sel["pool"] == [0, 1, 2, 3] and sel["forward_tokens"] == (1 + 4 + 6) * 6 * 8
    assert q.linear.shape == (4,)


# ---------------------------------------------------------------------------------------- bad input: one line
def cli_args(tiny, out, *extra):
    model_dir, calib = tiny
    return ["extract", "--model", str(model_dir), "--samples", "6", "--seq-len", "8", "--batch-size", "3",
            "--calibration", str(calib), "--eval-samples", "2", "--out", str(out), "-q", *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qblock: error: "), err
    return err


def _truncated_npz(path, seed):
    good = path.with_name("good.npz")
    np.savez(good, rows=np.zeros((3, 4)), manifest=np.array("{}"))
    path.write_bytes(good.read_bytes()[:200])


DAMAGE = {
    "garbage": lambda p: p.write_text("not an npz\n"),
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: _truncated_npz(p, 0),
    "json list manifest": lambda p: np.savez(p, rows=np.zeros((3, 4)), manifest=np.array("[1, 2]")),
    "1-d rows": lambda p: np.savez(p, rows=np.zeros(3), manifest=np.array('{"format": "qblock.extract.partial"}')),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("which", ["checkpoint", "output"])
def test_damaged_checkpoint_or_output_reaches_the_restart_line(tiny, tmp_path, capsys, damage, which):
    out = tmp_path / "p.npz"
    victim = pipeline.partial_path(out) if which == "checkpoint" else out
    DAMAGE[damage](victim)
    before = victim.read_bytes()
    assert main(cli_args(tiny, out)) == 2
    err = one_error_line(capsys)
    assert str(victim) in err and "--restart" in err
    assert victim.read_bytes() == before  # nothing was overwritten
    assert main(cli_args(tiny, out, "--restart")) == 0
    assert BlockRemovalProblem.load(out).arrays["A"].shape == (6, 4)


def test_output_that_is_a_directory_is_refused_even_with_restart(tiny, tmp_path, capsys):
    out = tmp_path / "p.npz"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(cli_args(tiny, out, "--restart")) == 2
    assert "is a folder" in one_error_line(capsys) and (out / "keep.txt").exists()


def test_device_cuda_without_cuda_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    def must_not_load(*a, **k):
        raise AssertionError("the model must not be loaded for an unusable device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    assert main(cli_args(tiny, tmp_path / "p.npz", "--device", "cuda")) == 2
    err = one_error_line(capsys)
    assert "'cuda' is not available" in err and "--device cpu" in err
    assert main(cli_args(tiny, tmp_path / "p.npz", "--device", "warp9")) == 2
    assert "unknown device 'warp9'" in one_error_line(capsys)
    assert not (tmp_path / "p.npz").exists()


def test_device_index_past_the_last_gpu_is_one_line(tiny, tmp_path, capsys):
    # true on any machine: there is never a GPU number device_count()
    assert main(cli_args(tiny, tmp_path / "p.npz", "--device", f"cuda:{torch.cuda.device_count()}")) == 2
    assert "cuda:" in one_error_line(capsys)


@pytest.mark.parametrize("remove, fragment", [("99", "only 4 blocks"), ("-1", ">= 0")])
def test_remove_out_of_range_fails_before_any_gradient(tiny, tmp_path, capsys, monkeypatch, remove, fragment):
    def must_not_run(*a, **k):
        raise AssertionError("--remove must be checked before A is computed")

    monkeypatch.setattr(gradients, "gate_gradients", must_not_run)
    out = tmp_path / "p.npz"
    assert main(cli_args(tiny, out, "--remove", remove)) == 2
    assert fragment in one_error_line(capsys)
    assert not out.exists() and not pipeline.partial_path(out).exists()
    with pytest.raises(pipeline.ExtractError, match="whole number"):
        run(tiny, out, num_remove=1.5)


def test_binary_calibration_file_is_one_line_naming_it(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    binary = tmp_path / "calib.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    assert main(["extract", "--model", str(model_dir), "--calibration", str(binary), "--samples", "2",
                 "--seq-len", "4", "--out", str(tmp_path / "p.npz"), "-q"]) == 2
    err = one_error_line(capsys)
    assert str(binary) in err and ".txt" in err and ".jsonl" in err


@pytest.mark.parametrize("every", [0, -5])
def test_a_checkpoint_interval_below_one_is_refused(every):
    from qblock.llm._rows import ExtractError, compute_rows

    with pytest.raises(ExtractError, match=f"checkpoint_every must be at least 1, got {every}"):
        compute_rows(None, [], checkpoint_every=every, progress=False)
