"""Per-sample gate gradients: batched == batch-size-1 reference, == finite differences, input order kept."""

import doctest

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qblock.llm import gated  # noqa: E402
from qblock.llm.gradients import batches_by_length, gate_gradients, gate_gradients_reference, nll_sums, sample_losses  # noqa: E402

from conftest import random_samples, tiny_model  # noqa: E402


def assert_rel_close(A, R, rtol=1e-5):
    """Equal within ``rtol`` relative to the matrix scale (entries near zero are not over-weighted)."""
    assert A.shape == R.shape
    np.testing.assert_allclose(A, R, rtol=rtol, atol=rtol * np.abs(R).max())


@pytest.mark.parametrize(
    "arch,gate,granularity",
    [
        ("llama", "layer", "block"),
        ("llama", "branch", "block"),
        ("llama", "branch", "sublayer"),
        ("gpt2", "layer", "block"),
        ("gemma3", "layer", "block"),
        ("qwen3_moe", "layer", "block"),
        ("mixtral", "layer", "block"),
    ],
)
def test_batched_equals_batch_size_one(arch, gate, granularity):
    model = tiny_model(arch)
    samples = random_samples(10)
    A = gate_gradients(model, samples, gate=gate, granularity=granularity, batch_size=4, progress=False)
    R = gate_gradients_reference(model, samples, gate=gate, granularity=granularity, progress=False)
    n = 8 if granularity == "sublayer" else 4
    assert A.shape == (10, n) and A.dtype == np.float64
    assert np.abs(R).max() > 0
    assert_rel_close(A, R, 1e-5)


def test_second_llama_config_and_batch_sizes():
    model = tiny_model("llama", layers=6, seed=3, hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    samples = random_samples(9, lo=2, hi=33, seed=5)
    R = gate_gradients_reference(model, samples, gate="branch", progress=False)
    for bs in (1, 3, 16):
        assert_rel_close(gate_gradients(model, samples, gate="branch", batch_size=bs, progress=False), R)


def test_matches_finite_differences_in_float64():
    model = tiny_model("llama").double()
    sample = random_samples(1, lo=12, hi=13, seed=2)[0]
    A = gate_gradients(model, [sample], progress=False)[0]
    ids = sample.unsqueeze(0)
    mask = torch.ones_like(ids)

    def loss(a):
        with torch.no_grad(), gated(model, a.double()):
            return float(sample_losses(model(ids, use_cache=False).logits, ids, mask)[0])

    # parts of the model (rotary tables, RMSNorm) compute in fp32 even in a float64 model, so use a
    # step where the O(eps^2) truncation error (not fp32 rounding) dominates
    eps = 1e-3
    for i in range(4):
        e = torch.zeros(4, dtype=torch.float64)
        e[i] = eps
        fd = (loss(1 + e) - loss(1 - e)) / (2 * eps)
        assert fd == pytest.approx(A[i], rel=1e-3, abs=1e-7)


def test_rows_in_input_order_and_model_state_restored():
    model = tiny_model("qwen3").train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # one frozen by the user stays frozen
    flags = [p.requires_grad for p in model.parameters()]
    samples = random_samples(7)
    A = gate_gradients(model, samples, batch_size=3, progress=False)
    B = gate_gradients(model, samples[::-1], batch_size=3, progress=False)
    assert_rel_close(B, A[::-1])
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_callback_sees_every_row_once():
    model = tiny_model("gpt2")
    samples = random_samples(5)
    seen = {}
    A = gate_gradients(model, samples, batch_size=2, progress=False, callback=lambda idx, rows: seen.update(zip(idx, rows)))
    assert sorted(seen) == list(range(5))
    assert np.array_equal(np.stack([seen[i] for i in range(5)]), A)


def test_padding_does_not_leak_into_loss():
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    with torch.no_grad():
        per = sample_losses(model(ids, attention_mask=mask, use_cache=False).logits, ids, mask)
        alone = sample_losses(model(ids[:1, :4], use_cache=False).logits, ids[:1, :4], mask[:1, :4])
    assert float(per[0]) == pytest.approx(float(alone[0]), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nll_sums_match_cross_entropy_for_any_mask_with_gradients(dtype):
    """Right-padded, left-padded and empty rows: the sums equal cross-entropy over the real targets, and so do
    their gradients; half-precision logits are scored in fp32."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g).to(dtype).requires_grad_(True)
    ids = torch.randint(0, 11, (3, 6), generator=g)
    masks = {"right": torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]),
             "left": torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])}
    for mask in masks.values():
        sums, counts = nll_sums(logits, ids, mask)
        keep = mask[:, 1:].bool()
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="none")
        want = (ce.view(3, 5) * keep).sum(dim=1)
        assert sums.dtype == torch.float32 and counts.tolist() == keep.sum(dim=1).tolist()
        assert torch.allclose(sums, want, atol=1e-5)
        got = torch.autograd.grad(sums.sum(), logits)[0]
        ref = torch.autograd.grad(want.sum(), logits)[0]
        assert torch.allclose(got.float(), ref.float(), atol=1e-6)
    assert nll_sums(logits[:0], ids[:0], masks["right"][:0])[0].shape == (0,)


def test_bucketing_and_input_errors():
    assert batches_by_length([3, 10, 4, 9, 9], 2) == [[1, 3], [4, 2], [0]]
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="at least 2"):
        gate_gradients(model, [torch.tensor([3])], progress=False)
    with pytest.raises(ValueError, match="1-D"):
        gate_gradients(model, [torch.ones(2, 3, dtype=torch.long)], progress=False)
    with pytest.raises(ValueError, match="empty"):
        gate_gradients(model, [], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        gate_gradients(model, [torch.tensor([1, 2])], batch_size=0, progress=False)


def test_bf16_autocast_runs_and_is_close():
    model = tiny_model("llama")
    samples = random_samples(4)
    A = gate_gradients(model, samples, progress=False)
    B = gate_gradients(model, samples, dtype=torch.bfloat16, progress=False)
    assert np.abs(A - B).max() <= 0.1 * np.abs(A).max()
    with pytest.raises(ValueError, match="wider"):
        gate_gradients(model.to(torch.bfloat16), samples, dtype=torch.float32, progress=False)


def test_docstring_examples():
    import qblock.llm.gradients as mod

    failures, _ = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert failures == 0


def test_works_through_accelerate_device_hooks():
    """device_map models run blocks through accelerate's forward wrappers; gates and masks must compose."""
    hooks = pytest.importorskip("accelerate.hooks")
    from qblock.llm import find_blocks, mask_blocks

    model = tiny_model("llama")
    samples = random_samples(4)
    want = {g: gate_gradients(model, samples, gate=g, progress=False) for g in ("layer", "branch")}
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad(), mask_blocks(model, [1]):
        masked = model(ids, use_cache=False).logits
    for _, block in find_blocks(model):
        hooks.add_hook_to_module(block, hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True))
    wrapped = find_blocks(model)[1][1].forward
    for g in ("layer", "branch"):
        assert np.array_equal(gate_gradients(model, samples, gate=g, progress=False), want[g])
    with torch.no_grad(), mask_blocks(model, [1]):
        assert torch.equal(model(ids, use_cache=False).logits, masked)
    assert find_blocks(model)[1][1].forward is wrapped  # accelerate's wrapper is restored
