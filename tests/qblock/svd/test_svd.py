"""SVD compression on tiny models: PivGa factors, export and the factorised loader, allocations, CLI."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qblock.cli import main  # noqa: E402
from qblock.svd import allocate, factorise  # noqa: E402
from qblock.svd.allocate import budget_of, gate_gradients, stored, uniform_ranks  # noqa: E402
from qblock.svd.export import export, load_lowrank  # noqa: E402
from qblock.svd.factors import Factorisation, find_linears, pivga, pivga_weight  # noqa: E402


def tiny_model(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=40, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def calib(n=6, length=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 48, (length,), generator=g) for _ in range(n)]


@pytest.mark.parametrize("m,n,r", [(10, 6, 3), (6, 10, 6), (7, 7, 0), (12, 5, 5), (9, 4, 1)])
def test_pivga_is_lossless_and_stores_r_m_plus_n_minus_r2(m, n, r):
    g = torch.Generator().manual_seed(m * n + r)
    A, B = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)
    P, C, Bp = pivga(A, B)
    assert C.shape == (m - r, r) and Bp.shape == (r, n) and P.numel() == r
    assert C.numel() + Bp.numel() == r * (m + n) - r * r
    assert torch.allclose(pivga_weight(P, C, Bp, m), A @ B, atol=1e-10)


def test_whitened_truncation_has_lower_calibration_output_error_than_plain():
    """Eckart-Young on W S: the whitened rank-r weight minimises the output error under the (damped) moment."""
    model = tiny_model()
    samples = calib()
    plain, white = factorise(model, whiten=False), factorise(model, samples, whiten=True)
    from qblock.svd.factors import input_moments

    moments = input_moments(model, samples)
    for fp, fw in zip(plain, white):
        C = moments[fp.name]
        C = C + 1e-4 * float(C.diagonal().mean()) * torch.eye(C.shape[0], dtype=C.dtype)  # the damped moment
        r = max(1, fp.rank // 2)
        for f, other in ((fw, fp),):
            W = f.weight()
            assert torch.allclose(W, other.weight(), atol=1e-8)  # both exact at full rank
            err = lambda Wr: float(torch.trace((W - Wr) @ C @ (W - Wr).T))  # noqa: E731
            assert err(fw.truncated(r)) <= err(fp.truncated(r)) * (1 + 1e-6) + 1e-12


def test_export_dense_and_lowrank_give_the_same_logits(tmp_path):
    model = tiny_model(1)
    samples = calib()
    fs = factorise(model, samples, whiten=True)
    ranks, info = allocate(model, fs, 0.5, "global-threshold")
    out = export(model, None, fs, ranks, tmp_path / "m", info)
    dense = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    low = load_lowrank(out)
    ids = torch.randint(0, 48, (3, 11))
    with torch.no_grad():
        a, b = dense(ids).logits, low(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    rec = json.loads((out / "svd.json").read_text())
    expect = sum(r * (m + n) - r * r for r, (m, n) in zip(ranks, (f.shape for f in fs)))
    assert rec["stored_factor_numbers"] == rec["parameters_after"] == expect <= budget_of(fs, 0.5)
    assert rec["parameters_before"] == sum(m.weight.numel() for _, m in find_linears(model))
    lowrank_numbers = sum(p.numel() for n, p in low.named_parameters() if n.endswith((".C", ".B")))
    assert lowrank_numbers == expect


def test_a_failed_export_leaves_no_out(tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    model = tiny_model()
    fs = factorise(model, whiten=False)
    ranks, info = allocate(model, fs, 0.5, "uniform")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        export(model, None, fs, ranks, tmp_path / "o", info)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["uniform", "global-threshold", "fermigrad", "exact", "swap", "sa"])
@pytest.mark.parametrize("basis", ["plain", "whitened"])
def test_every_method_keeps_the_budget(method, basis):
    model = tiny_model(2)
    samples = calib(4)
    fs = factorise(model, samples, whiten=basis == "whitened")
    for ratio in (0.3, 0.7):
        ranks, info = allocate(model, fs, ratio, method, calibration=samples, group_size=4,
                               fermigrad={"steps": 3}, backend_params={"num_reads": 4} if method == "sa" else None)
        assert sum(stored(fs, ranks)) == info["stored"] <= budget_of(fs, ratio)
        assert all(0 <= r <= f.rank for r, f in zip(ranks, fs))


@pytest.mark.parametrize("samples", [None, []])
def test_whitening_without_samples_is_a_value_error(samples):
    with pytest.raises(ValueError, match="whitened SVD needs calibration samples"):
        factorise(tiny_model(), samples, whiten=True)


def test_uniform_ranks_never_exceed_the_integer_budget():
    """0.35 * 15 * 8 rounds above 42 in floats while the budget floors 0.35 * 360 to 125: 3 x 42 did not fit."""
    g = torch.Generator().manual_seed(0)
    fs = [Factorisation.plain(f"w{k}", torch.randn(15, 8, generator=g, dtype=torch.float64)) for k in range(3)]
    ranks, info = allocate(None, fs, 0.35, "uniform")
    assert info["stored"] <= info["budget"] == 125
    mixed = fs + [Factorisation.plain("x", torch.randn(12, 7, generator=g, dtype=torch.float64))]
    for k in range(1, 101):
        for group in (fs, mixed):
            assert sum(stored(group, uniform_ranks(group, k / 100))) <= budget_of(group, k / 100), k


def test_uniform_at_ratio_one_keeps_everything_and_fermigrad_is_seeded():
    model = tiny_model(3)
    fs = factorise(model, whiten=False)
    assert uniform_ranks(fs, 1.0) == [f.rank for f in fs]
    samples = calib(4)
    a = allocate(model, fs, 0.5, "fermigrad", calibration=samples, seed=4, fermigrad={"steps": 4})
    b = allocate(model, fs, 0.5, "fermigrad", calibration=samples, seed=4, fermigrad={"steps": 4})
    assert a[0] == b[0] and a[1]["fermigrad"]["losses"] == b[1]["fermigrad"]["losses"]


def test_group_gate_gradients_match_autograd_on_explicit_gates():
    model = tiny_model(4, layers=1)
    samples = calib(2)
    fs = factorise(model, samples, whiten=True)
    c = 3
    A = gate_gradients(model, fs, samples, c)
    ids = samples[0].reshape(1, -1)
    gates = [torch.ones(-(-f.rank // c), dtype=torch.float64, requires_grad=True) for f in fs]
    weights = {f.name + ".weight": f.weight(g.repeat_interleave(c)[: f.rank]).float() for f, g in zip(fs, gates)}
    loss = torch.func.functional_call(model, weights, args=(), kwargs={"input_ids": ids, "labels": ids}).loss
    grads = torch.autograd.grad(loss, gates)
    np.testing.assert_allclose(A[0], torch.cat(grads).numpy(), rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from conftest import word_tokenizer as tiny_tokenizer

    root = tmp_path_factory.mktemp("svd")
    tiny_model(5).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    paras = [" ".join(f"w{k}" for k in rng.integers(0, 46, size=rng.integers(5, 30))) for _ in range(100)]
    (root / "calib.txt").write_text("\n\n".join(paras) + "\n")
    return root


@pytest.mark.parametrize("method", ["uniform", "exact"])
def test_cli_svd_writes_a_loadable_directory(tiny_dir, tmp_path, method):
    out = tmp_path / "out"
    code = main(["svd", "--model", str(tiny_dir / "model"), "--calibration", str(tiny_dir / "calib.txt"),
                 "--samples", "4", "--seq-len", "12", "--ratio", "0.6", "--method", method, "--group-size", "4",
                 "--out", str(out), "-q"])
    assert code == 0
    rec = json.loads((out / "svd.json").read_text())
    assert rec["method"] == method and rec["basis"] == "whitened" and rec["parameters_after"] <= rec["budget"]
    transformers.AutoModelForCausalLM.from_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(out)
    assert load_lowrank(out) is not None


def test_a_zero_or_rank_deficient_matrix_factorises_at_its_numerical_rank():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 8, generator=g, dtype=torch.float64)
    moment = torch.eye(8, dtype=torch.float64)
    for W, rank in ((torch.zeros(12, 8), 0), (low, 3)):
        for f in (Factorisation.plain("w", W), Factorisation.whitened_by("w", W, moment)):
            assert f.rank == rank and torch.allclose(f.weight(), W.double(), atol=1e-10)
            P, C, B = pivga(f.U * f.s, f.B)  # A_P was singular: linalg.solve failed
            assert torch.allclose(pivga_weight(P, C, B, 12), W.double(), atol=1e-10)


@pytest.mark.parametrize("method", ["uniform", "exact"])
@pytest.mark.parametrize("basis", ["plain", "whitened"])
def test_cli_svd_compresses_a_model_with_a_zero_projection(tiny_dir, tmp_path, method, basis):
    """As when svd runs on its own output after a method emptied a matrix: rank 0, no traceback."""
    from conftest import word_tokenizer as tiny_tokenizer

    model = tiny_model(5)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    model.save_pretrained(tmp_path / "zero")
    tiny_tokenizer().save_pretrained(tmp_path / "zero")
    out = tmp_path / "out"
    assert main(["svd", "--model", str(tmp_path / "zero"), "--calibration", str(tiny_dir / "calib.txt"),
                 "--samples", "4", "--seq-len", "12", "--ratio", "0.6", "--method", method, "--basis", basis,
                 "--group-size", "4", "--out", str(out), "-q"]) == 0
    rec = json.loads((out / "svd.json").read_text())
    zero = [m for m in rec["matrices"] if m["name"] == "model.layers.0.self_attn.o_proj"]
    assert zero == [{"name": "model.layers.0.self_attn.o_proj", "shape": [16, 16], "rank": 0, "max_rank": 0,
                     "stored": 0}]
    assert rec["parameters_after"] <= rec["budget"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert not reloaded.model.layers[0].self_attn.o_proj.weight.any()


def _tiny_gguf(path):
    """A random tiny Llama written as a GGUF file (fp32 tensors, a 48-token vocabulary ``t0 .. t47``)."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    V, H, I, heads, kv = 48, 16, 24, 2, 1
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2), w.add_context_length(64), w.add_embedding_length(H), w.add_feed_forward_length(I)
    w.add_head_count(heads), w.add_head_count_kv(kv), w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(H // heads), w.add_vocab_size(V), w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(V)]), w.add_token_types([1] * V), w.add_token_scores([0.0] * V)
    w.add_bos_token_id(1), w.add_eos_token_id(2)
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "output.weight": (V, H)}
    for b in range(2):
        shapes.update({f"blk.{b}.attn_norm.weight": (H,), f"blk.{b}.ffn_norm.weight": (H,),
                       f"blk.{b}.attn_q.weight": (H, H), f"blk.{b}.attn_k.weight": (H * kv // heads, H),
                       f"blk.{b}.attn_v.weight": (H * kv // heads, H), f"blk.{b}.attn_output.weight": (H, H),
                       f"blk.{b}.ffn_gate.weight": (I, H), f"blk.{b}.ffn_up.weight": (I, H),
                       f"blk.{b}.ffn_down.weight": (H, I)})
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_cli_svd_of_a_gguf_model_saves_it(tmp_path):
    """A GGUF-loaded model keeps quantizer markers that transformers refuses to save: export drops them."""
    src = _tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "calib.txt").write_text("\n\n".join(" ".join(f"t{(7 * k + j) % 45 + 3}" for j in range(30))
                                                    for k in range(20)) + "\n")
    out = tmp_path / "out"
    assert main(["svd", "--model", str(src), "--calibration", str(tmp_path / "calib.txt"), "--samples", "2",
                 "--seq-len", "12", "--ratio", "0.6", "--basis", "plain", "--out", str(out), "-q"]) == 0
    assert load_lowrank(out).config.num_hidden_layers == 2


@pytest.mark.parametrize("argv,needle", [
    (["--ratio", "1.5", "--method", "uniform"], "--ratio must be in (0, 1]"),
    (["--ratio", "0.5", "--method", "qaoa"], "does not solve rank-selection"),
    (["--ratio", "0.5", "--method", "nope"], "--method 'nope' is unknown"),
])
def test_cli_svd_errors_are_one_line(tiny_dir, tmp_path, capsys, argv, needle):
    code = main(["svd", "--model", str(tiny_dir / "model"), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and "\n" not in err


@pytest.mark.parametrize("name", ["qblock.svd", "qblock.svd.factors", "qblock.svd.allocate"])
def test_docstring_examples(name):
    import doctest
    import importlib

    failures, _ = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert failures == 0
