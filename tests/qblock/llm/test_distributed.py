"""Data-parallel extraction under torchrun (2 processes, gloo on CPU): the rows of A equal one process's.

Marked ``cluster`` (it starts processes; ``python -m pytest -m cluster``, run by CI).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qblock.problems.block_removal import BlockRemovalProblem  # noqa: E402

from conftest import ROOT  # noqa: E402  (the repository root)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, calibration file) for a 4-block Llama with a word-level tokenizer."""
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers

    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "model")
    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i + 2 for i in range(62)}}
    t = Tokenizer(tmodels.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(
        root / "model")
    rng = np.random.default_rng(0)
    paras = [" ".join(f"w{k}" for k in rng.integers(0, 62, size=rng.integers(5, 30))) for _ in range(200)]
    (root / "calib.txt").write_text("\n\n".join(paras) + "\n")
    return root / "model", root / "calib.txt"


def _extract(tiny, out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    model_dir, calib = tiny
    args = ["-m", "qblock", "extract", "--model", str(model_dir), "--calibration", str(calib), "--samples", "11",
            "--seq-len", "12", "--batch-size", "3", "--seed", "1", "--eval-samples", "4",
            "--checkpoint-every", "3", "--out", str(out), "-q", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.cluster
def test_two_gloo_processes_give_the_single_process_rows(tiny, tmp_path):
    one = _extract(tiny, tmp_path / "one.npz", 1)
    assert one.returncode == 0, one.stderr
    two = _extract(tiny, tmp_path / "two.npz", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a = BlockRemovalProblem.load(tmp_path / "one.npz").arrays["A"]
    b = BlockRemovalProblem.load(tmp_path / "two.npz").arrays["A"]
    assert a.shape == (11, 4)
    np.testing.assert_array_equal(a, b)  # bitwise: the same batches, the same code
    assert not (tmp_path / "two.partial.npz").exists()


@pytest.mark.cluster
def test_distributed_run_resumes_a_single_process_checkpoint(tiny, tmp_path):
    from qblock.llm import pipeline

    one = _extract(tiny, tmp_path / "one.npz", 1)
    assert one.returncode == 0, one.stderr
    a = BlockRemovalProblem.load(tmp_path / "one.npz").arrays["A"]
    # a checkpoint of the first 6 rows, as an interrupted single-process run leaves it
    out = tmp_path / "p.npz"
    two = _extract(tiny, out, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    man = BlockRemovalProblem.load(out).metadata["extraction"]["manifest"]
    out.unlink()
    full_manifest = dict(man, labels=[f"model.layers.{i}" for i in range(4)], batch_size=3)
    pipeline._save_partial(pipeline.partial_path(out), a[:6], full_manifest)
    res = _extract(tiny, out, 2)
    assert res.returncode == 0, res.stderr[-3000:]
    q = BlockRemovalProblem.load(out)
    assert q.metadata["extraction"]["resumed_from"] == 6
    np.testing.assert_array_equal(q.arrays["A"], a)


@pytest.mark.cluster
def test_measured_energy_on_ray_equals_local(tiny, tmp_path):
    pytest.importorskip("ray")
    one = _extract(tiny, tmp_path / "local.npz", 1, "--energy", "measured")
    assert one.returncode == 0, one.stderr[-3000:]
    ray_ = _extract(tiny, tmp_path / "ray.npz", 1, "--energy", "measured", "--executor", "ray")
    assert ray_.returncode == 0, ray_.stderr[-3000:]
    a, b = (BlockRemovalProblem.load(tmp_path / f) for f in ("local.npz", "ray.npz"))
    np.testing.assert_array_equal(a.H, b.H)
    np.testing.assert_array_equal(a.linear, b.linear)
    assert a.metadata["selection"] == b.metadata["selection"]


def test_extract_executor_only_for_the_measured_energy(tmp_path, capsys):
    from qblock.cli import main

    assert main(["extract", "--model", "default", "--out", str(tmp_path / "p.npz"), "--executor", "ray", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--executor applies to --energy measured" in err[0] and "torchrun" in err[0], err
