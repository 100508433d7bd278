"""Blocks found by structure, reversible masking and gating on tiny models of nine families.

The tiny models come from ``tiny_model`` in ``conftest.py`` (shared by every test that needs one).
"""

import doctest
import importlib

import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from qblock.llm import block_labels, find_blocks, gate_sites, gated, mask_blocks  # noqa: E402

from conftest import ARCHS, VOCAB, random_samples, tiny_model  # noqa: E402,F401  (the shared tiny-model factory)


IDS = torch.tensor([[1, 5, 7, 9, 11, 3, 2, 8], [4, 4, 6, 1, 0, 9, 12, 30]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def no_hooks_left(model):
    return all(not m._forward_hooks and "forward" not in m.__dict__ for m in model.modules())


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param)


def test_find_blocks_structure(model):
    blocks = find_blocks(model)
    assert len(blocks) == 4
    names = [n for n, _ in blocks]
    assert names[0].endswith(".0") and names[3].endswith(".3")
    assert all(model.get_submodule(n) is b for n, b in blocks)
    assert len({type(b) for _, b in blocks}) == 1
    assert block_labels(model) == names


def test_layer_gates_at_one_are_exact_and_at_zero_equal_mask(model):
    base = logits(model)
    with gated(model, torch.ones(4)):
        assert torch.equal(logits(model), base)
    a = torch.ones(4)
    a[[1, 2]] = 0
    with gated(model, a):
        zero = logits(model)
    with mask_blocks(model, [2, 1]) as idx:
        masked = logits(model)
    assert idx == [1, 2]
    assert torch.equal(masked, zero)
    assert not torch.allclose(masked, base)
    assert torch.equal(logits(model), base)
    assert no_hooks_left(model)


def test_branch_gates_sublayer_labels_and_exactness(model):
    base = logits(model)
    labels = block_labels(model, "sublayer")
    blocks = [n for n, _ in find_blocks(model)]
    assert labels == [f"{b}.{k}" for b in blocks for k in ("attn", "mlp")]
    with gated(model, torch.ones(len(labels)), gate="branch", granularity="sublayer"):
        assert torch.equal(logits(model), base)
    with gated(model, torch.ones(4), gate="branch"):
        assert torch.equal(logits(model), base)
    # a block with both branches gated off is the identity, same as the layer-mode mask
    a = torch.ones(len(labels))
    a[[2, 3]] = 0
    with gated(model, a, gate="branch", granularity="sublayer"):
        both_off = logits(model)
    with mask_blocks(model, [1]):
        assert torch.allclose(both_off, logits(model), atol=1e-6)
    with mask_blocks(model, [2], gate="branch", granularity="sublayer"):
        attn_off = logits(model)
    assert not torch.allclose(attn_off, both_off) and not torch.allclose(attn_off, base)
    assert no_hooks_left(model)


@pytest.mark.parametrize("gate,granularity,n", [("layer", "block", 4), ("branch", "block", 4), ("branch", "sublayer", 8)])
def test_per_sample_gates_match_separate_runs(gate, granularity, n):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    rows = torch.rand(2, n, generator=g)
    with gated(model, rows, gate=gate, granularity=granularity):
        both = logits(model)
    for b in range(2):
        with gated(model, rows[b], gate=gate, granularity=granularity):
            single = logits(model, IDS[b : b + 1])
        assert torch.allclose(both[b], single[0], atol=1e-5)


def test_gemma3_branch_ends_are_post_norms():
    model = tiny_model("gemma3")
    sites = gate_sites(model, gate="branch", granularity="sublayer")
    block = find_blocks(model)[0][1]
    assert sites[0].modules[0] is block.post_attention_layernorm
    assert sites[1].modules[0] is block.post_feedforward_layernorm


def test_branch_mode_rejects_post_norm_blocks():
    model = tiny_model("opt", do_layer_norm_before=False)
    with pytest.raises(ValueError, match="gate='layer'"):
        gate_sites(model, gate="branch")
    with gated(model, torch.ones(4)):  # the layer mode still works
        logits(model)


def test_mask_restored_after_error():
    model = tiny_model("llama")
    base = logits(model)
    with pytest.raises(RuntimeError, match="boom"):
        with mask_blocks(model, [0, 3]):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with gated(model, torch.zeros(4)):
            raise RuntimeError("boom")
    assert torch.equal(logits(model), base)
    assert no_hooks_left(model)


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(IndexError, match="out of range"):
        with mask_blocks(model, [4]):
            pass
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        with gated(model, torch.ones(5)):
            pass
    with pytest.raises(ValueError, match="needs gate='branch'"):
        gate_sites(model, gate="layer", granularity="sublayer")
    with pytest.raises(ValueError, match="gate must be one of"):
        gate_sites(model, gate="nope")


def test_find_blocks_picks_outer_stack_not_nested_lists():
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(8)])  # longer than the stack

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.stack = nn.ModuleList([Block() for _ in range(3)])
            self.heads = nn.ModuleList([nn.Linear(4, 10), nn.Identity()])  # mixed classes: rejected

    assert [n for n, _ in find_blocks(Net())] == ["stack.0", "stack.1", "stack.2"]


def test_find_blocks_error_names_what_was_searched():
    nn = torch.nn

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])

    with pytest.raises(ValueError, match=r"searched every nn.ModuleList.*mixed \(mixed classes"):
        find_blocks(Flat())
    with pytest.raises(TypeError):
        find_blocks("not a model")


@pytest.mark.parametrize("name", ["qblock.llm.blocks", "qblock.llm.gates", "qblock.validate.oracle"])
def test_docstring_examples(name):
    failures, _ = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert failures == 0
