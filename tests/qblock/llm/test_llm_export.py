"""Export: pruned copy == gated model with those gates at 0; saves, reloads and generates with a KV cache."""

import doctest
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qblock.llm import find_blocks, gated, mask_blocks, remove_blocks  # noqa: E402
from qblock.llm.export import save_pruned  # noqa: E402

from conftest import VOCAB, tiny_model  # noqa: E402

IDS = torch.tensor([[3, 9, 27, 81, 5, 15, 45, 37, 14, 42, 29, 87], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary ``t0 .. t96``, built offline."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "qwen3_moe"])
def test_pruned_equals_gated_model(arch):
    model = tiny_model(arch, layers=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = torch.ones(6)
    a[[1, 2, 4]] = 0
    with gated(model, a):
        want = logits(model)
    pruned = remove_blocks(model, [4, 1, 2])
    assert torch.allclose(logits(pruned), want, atol=1e-6)
    assert len(find_blocks(pruned)) == 3 and pruned.config.num_hidden_layers == 3
    assert pruned.config.qblock_pruned["removed"] == [1, 2, 4]
    # the original is untouched
    assert len(find_blocks(model)) == 6 and model.config.num_hidden_layers == 6
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    idx = [m.layer_idx for _, b in find_blocks(pruned) for m in b.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted(set(idx)) == [0, 1, 2]


def test_gemma3_layer_types_follow_the_kept_blocks():
    model = tiny_model("gemma3", layers=6)  # sliding_window_pattern=2: S F S F S F
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    pruned = remove_blocks(model, [1, 2, 4])  # keeps 0, 3, 5
    assert pruned.config.layer_types == ["sliding_attention", "full_attention", "full_attention"]
    assert [b.self_attn.is_sliding for _, b in find_blocks(pruned)] == [True, False, False]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_save_reload_generate(arch, tmp_path):
    model = tiny_model(arch, layers=6)
    tok = tiny_tokenizer()
    out = save_pruned(model, tok, [1, 2, 4], tmp_path / "pruned")
    info = json.loads((out / "qblock_pruned.json").read_text())
    assert info["removed"] == [1, 2, 4] and info["original_num_blocks"] == 6
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 3
    with mask_blocks(model, [1, 2, 4]):
        want = logits(model)
    assert torch.allclose(logits(reloaded), want, atol=1e-6)
    tok2 = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tok2("t5 t9 t33 t70 t11 t3", return_tensors="pt")
    with torch.no_grad():
        cached = reloaded.generate(**prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=1)
        uncached = reloaded.generate(**prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=1)
    assert cached.shape == (1, prompt["input_ids"].shape[1] + 10)
    assert torch.equal(cached, uncached)  # the KV cache indexes the renumbered layers correctly


def test_bad_indices():
    model = tiny_model("llama", layers=3)
    with pytest.raises(IndexError, match="out of range"):
        remove_blocks(model, [3])
    with pytest.raises(ValueError, match="keep at least one"):
        remove_blocks(model, [0, 1, 2])
    with pytest.raises(ValueError, match="integers"):
        remove_blocks(model, ["a"])


def test_reload_check_catches_index_dependent_structure(tmp_path):
    """Qwen3-MoE with MoE only on every 2nd block: dropping block 0 shifts the pattern; must be refused."""
    model = tiny_model("qwen3_moe", layers=4)
    model = transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(**{**model.config.to_dict(), "decoder_sparse_step": 2})
    ).eval()
    with pytest.raises(ValueError, match="would not reload cleanly"):
        save_pruned(model, None, [0], tmp_path / "bad")


def test_a_failed_prune_leaves_nothing_in_out(tmp_path, capsys):
    """The reload check runs before the files reach --out: no folder that loads with wrong weights, and an
    existing --out (with --overwrite) keeps its files."""
    from qblock.cli import main

    model = tiny_model("qwen3_moe", layers=4)
    transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(**{**model.config.to_dict(), "decoder_sparse_step": 2})).save_pretrained(tmp_path / "src")
    assert main(["prune", "--model", str(tmp_path / "src"), "--remove", "0", "--out", str(tmp_path / "out"), "-q"]) == 2
    assert "would not reload cleanly" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "config.json").write_text("{}")
    assert main(["prune", "--model", str(tmp_path / "src"), "--remove", "0", "--out", str(kept), "--overwrite", "-q"]) == 2
    assert sorted(f.name for f in kept.iterdir()) == ["config.json"] and (kept / "config.json").read_text() == "{}"


def test_an_overwritten_model_folder_keeps_no_shard_of_the_old_model(tmp_path):
    from qblock.llm.export import save_model_folder

    old = tiny_model("llama", layers=4)
    old.save_pretrained(tmp_path / "out", max_shard_size="20KB")  # an earlier, sharded model in the folder
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    new = tiny_model("llama", layers=2)
    save_model_folder(new, None, tmp_path / "out")
    names = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "notes.txt"], names
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.config.num_hidden_layers == 2


@pytest.mark.parametrize("name", ["qblock.llm.export", "qblock.cli.prune"])
def test_docstring_examples(name):
    import importlib

    failures, _ = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert failures == 0


def _saved_tiny(tmp_path, arch="llama"):
    src = tmp_path / "src"
    tiny_model(arch, layers=5).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    return src


def test_cli_prune_indices_and_labels(tmp_path, capsys):
    from qblock.cli import main

    src = _saved_tiny(tmp_path)
    out = tmp_path / "out"
    assert main(["prune", "--model", str(src), "--remove", "1,layers.3", "--out", str(out)]) == 0
    assert "removed 2 of 5 blocks: 1, 3" in capsys.readouterr().out
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    with mask_blocks(original, [1, 3]):
        assert torch.allclose(logits(reloaded), logits(original), atol=1e-6)
    assert (out / "tokenizer.json").exists()
    # a non-empty --out is refused; bad indices are one-line errors
    assert main(["prune", "--model", str(src), "--remove", "0", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["prune", "--model", str(src), "--remove", "7", "--out", str(tmp_path / "x")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["prune", "--model", str(src), "--remove", "0,1,2,3,4", "--out", str(tmp_path / "x")]) == 2
    assert "cannot remove all" in capsys.readouterr().err


def test_cli_prune_from_solutions_file(tmp_path):
    from qblock.cli import main

    src = _saved_tiny(tmp_path)
    sols = tmp_path / "sols.json"
    sols.write_text(json.dumps({"solutions": [{"rank": 1, "removed": [0, 4]}, {"rank": 2, "removed": [2]}]}))
    out = tmp_path / "out"
    assert main(["prune", "--model", str(src), "--solutions", str(sols), "--rank", "2", "--out", str(out), "-q"]) == 0
    assert json.loads((out / "qblock_pruned.json").read_text())["removed"] == [2]
    assert main(["prune", "--model", str(src), "--solutions", str(sols), "--rank", "3", "--out", str(tmp_path / "y")]) == 2


def test_cli_prune_recommended_set_from_a_report(tmp_path, capsys):
    from qblock.cli import main

    src = _saved_tiny(tmp_path)
    report = tmp_path / "report"
    report.mkdir()
    (report / "summary.json").write_text(json.dumps({
        "problem": {"model": {"id": "tiny", "spec": str(src)}},
        "recommended": {"1": {"removed": [3]}, "2": {"removed": [1, 4]}}}))
    out = tmp_path / "out"
    # the model recorded in the report is used when --model is not given
    assert main(["prune", "--recommended", str(report), "--remove-count", "2", "--out", str(out), "-q"]) == 0
    assert json.loads((out / "qblock_pruned.json").read_text())["removed"] == [1, 4]
    assert main(["prune", "--recommended", str(report), "--remove-count", "3", "--out", str(tmp_path / "y")]) == 2
    assert "only for M = 1, 2" in capsys.readouterr().err
    assert main(["prune", "--recommended", str(report), "--out", str(tmp_path / "y")]) == 2
    assert "needs --remove-count" in capsys.readouterr().err
    assert main(["prune", "--recommended", str(tmp_path), "--remove-count", "2", "--out", str(tmp_path / "y")]) == 2
    assert "no summary.json" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("removed, fragment", [
    ([1, 1, 2], "block 1 is listed more than once"),
    ([-1], "block -1 out of range"),
    ([1.7], "whole block numbers"),
    (["a"], "whole block numbers"),
    ([True], "whole block numbers"),
    ("1,2", "whole block numbers"),
])
def test_cli_prune_rejects_bad_solution_before_loading_the_model(tmp_path, capsys, monkeypatch, removed, fragment):
    from qblock.cli import main
    from qblock.llm import models

    def must_not_load(*a, **k):
        raise AssertionError("a bad solutions file must be refused before the model is loaded")

    monkeypatch.setattr(models, "load_model", must_not_load)
    sols = tmp_path / "sols.json"
    sols.write_text(json.dumps({"solutions": [{"rank": 1, "removed": removed}]}))
    out = tmp_path / "out"
    assert main(["prune", "--model", "default", "--solutions", str(sols), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qblock: error:") and fragment in err, err
    assert not out.exists()


@pytest.mark.parametrize("content", ['{"solutions": [5]}', '{"solutions": {}}', "[1, 2]", "\x00\x01binary"])
def test_cli_prune_rejects_foreign_solutions_files(tmp_path, capsys, monkeypatch, content):
    from qblock.cli import main
    from qblock.llm import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded for a bad file"))
    sols = tmp_path / "sols.json"
    sols.write_text(content)
    assert main(["prune", "--model", "default", "--solutions", str(sols), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(sols) in err, err


def test_cli_prune_repeated_block_and_mismatched_problem(tmp_path, capsys):
    from qblock.cli import main

    src = _saved_tiny(tmp_path)
    out = tmp_path / "out"
    assert main(["prune", "--model", str(src), "--remove", "1,layers.1", "--out", str(out)]) == 2
    assert "block 1 is listed more than once" in capsys.readouterr().err
    # a solutions file of a problem with another number of variables (another model, or sub-layer gates)
    sols = tmp_path / "sols.json"
    sols.write_text(json.dumps({"num_blocks": 10, "solutions": [{"rank": 1, "removed": [1, 2]}]}))
    assert main(["prune", "--model", str(src), "--solutions", str(sols), "--out", str(out)]) == 2
    assert "solved for 10 variables but this model has 5 blocks" in capsys.readouterr().err
    assert not out.exists()
    # the report counts what was removed: 2 blocks of 5, and the parameter share of exactly those
    sols.write_text(json.dumps({"num_blocks": 5, "solutions": [{"rank": 1, "removed": [2, 1]}]}))
    assert main(["prune", "--model", str(src), "--solutions", str(sols), "--out", str(out)]) == 0
    report = capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in find_blocks(model)[1][1].parameters())
    assert "removed 2 of 5 blocks: 1, 2" in report
    assert f"({100.0 * 2 * block / total:.1f}% fewer)" in report


def test_remove_blocks_rejects_repeats_and_non_integers():
    import numpy as np

    model = tiny_model("llama", layers=3)
    with pytest.raises(ValueError, match="more than once"):
        remove_blocks(model, [1, 1])
    with pytest.raises(ValueError, match="integers"):
        remove_blocks(model, [1.7])
    assert remove_blocks(model, np.array([2])).config.num_hidden_layers == 2  # numpy integers are fine


def test_cli_prune_recommended_set_with_a_repeat_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    from qblock.cli import main
    from qblock.llm import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded for a bad report"))
    report = tmp_path / "report"
    report.mkdir()
    (report / "summary.json").write_text(json.dumps({"recommended": {"2": {"removed": [3, 3]}}}))
    assert main(["prune", "--recommended", str(report), "--remove-count", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "block 3 is listed more than once" in err
