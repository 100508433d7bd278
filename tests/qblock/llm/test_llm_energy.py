"""Energy models: Fisher, Fisher + gradient (sign checked against the model), measured pairwise, extract."""

import doctest
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qblock import BlockRemovalProblem  # noqa: E402
from qblock.llm import ENERGY_MODELS, build_problem, extract, gated, mask_blocks  # noqa: E402
from qblock.llm.energy import fisher_grad_problem, fisher_problem, pairwise_problem, subset_losses  # noqa: E402
from qblock.llm.gradients import as_token_tensors, sample_losses  # noqa: E402

from conftest import random_samples, tiny_model  # noqa: E402


def all_states(n):
    return np.array(list(itertools.product([0, 1], repeat=n)), dtype=float)


def test_fisher_energy_is_mean_squared_projection():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(7, 5))
    p = fisher_problem(A, num_remove=2, labels=list("abcde"), metadata={"data": "x"})
    X = all_states(5)
    assert np.allclose(p.energies(X), ((X @ A.T) ** 2).mean(axis=1))
    assert not np.any(p.linear)
    assert p.metadata == {"energy": "fisher", "num_samples": 7, "data": "x"}
    assert np.array_equal(p.arrays["A"], A) and p.labels == tuple("abcde")
    assert "A" not in fisher_problem(A, keep_A=False).arrays


def test_fisher_grad_energy_formula():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(6, 4))
    p = fisher_grad_problem(A, num_remove=1)
    g, H = A.mean(0), A.T @ A / 6
    X = all_states(4)
    want = -(X @ g) + 0.5 * np.einsum("ki,ij,kj->k", X, H, X)
    assert np.allclose(p.energies(X), want)
    assert p.metadata["energy"] == "fisher+grad"


def test_fisher_grad_sign_matches_the_models_first_order_loss_change():
    """Shrinking gate i from 1 to 1 - d changes the loss by about -g_i d = linear_i * d."""
    model = tiny_model("llama").double()
    samples = as_token_tensors(random_samples(3, lo=8, hi=12))
    p = extract(model, samples, energy="fisher+grad", progress=False)

    def mean_loss(a):
        with torch.no_grad(), gated(model, a):
            return float(np.mean([float(sample_losses(model(s[None], use_cache=False).logits, s[None],
                                                      torch.ones_like(s[None]))[0]) for s in samples]))

    d = 1e-3
    for i in range(4):  # a central difference: a one-sided one used 85 % of the tolerance on its own
        lo, hi = torch.ones(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        lo[i], hi[i] = 1 - d, 1 + d
        assert (mean_loss(lo) - mean_loss(hi)) / (2 * d) == pytest.approx(p.linear[i], rel=2e-3, abs=1e-6)


def test_build_problem_dispatch_and_errors():
    A = np.ones((2, 3))
    assert set(ENERGY_MODELS) == {"fisher", "fisher+grad", "pairwise", "measured"}
    assert build_problem(A, "fisher").metadata["energy"] == "fisher"
    assert build_problem(A, "fisher+grad").metadata["energy"] == "fisher+grad"
    with pytest.raises(ValueError, match="measured on the model"):
        build_problem(A, "pairwise")
    with pytest.raises(ValueError, match="unknown energy"):
        build_problem(A, "magic")
    with pytest.raises(ValueError, match="2-D"):
        fisher_problem(np.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        fisher_problem([[np.nan, 1.0]])


@pytest.mark.parametrize("gate,granularity,n", [("layer", "block", 4), ("branch", "sublayer", 6)])
def test_pairwise_is_exact_at_one_and_two_removals(gate, granularity, n):
    model = tiny_model("llama", layers=4 if granularity == "block" else 3)
    samples = random_samples(3)
    p = pairwise_problem(model, samples, num_remove=2, gate=gate, granularity=granularity, batch_size=4, progress=False)
    assert p.num_blocks == n
    assert isinstance(p, BlockRemovalProblem) and p.metadata["energy"] == "pairwise"
    assert np.allclose(np.diag(p.H), 0.0)
    # the measured losses, recomputed the same way: the fit must reproduce them exactly
    subsets = [()] + [(i,) for i in range(n)] + list(itertools.combinations(range(n), 2))
    L = dict(zip(subsets, subset_losses(model, samples, subsets, gate, granularity, 4, progress=False)))
    L0 = L[()]
    assert p.metadata["base_loss"] == L0
    assert np.array_equal(p.arrays["single_losses"], [L[(i,)] for i in range(n)])
    for i in range(n):
        assert p.energy_of([i]) == pytest.approx(L[(i,)] - L0, rel=1e-12, abs=1e-12)
    for i, j in itertools.combinations(range(n), 2):
        assert p.energy_of([i, j]) == pytest.approx(L[(i, j)] - L0, rel=1e-12, abs=1e-12)
    assert len({round(v, 9) for k, v in L.items() if len(k) == 2}) > 1  # the couplings are not all equal


def test_subset_loss_uses_the_mask():
    model = tiny_model("gpt2")
    samples = as_token_tensors(random_samples(2))
    got = subset_losses(model, samples, [[1, 3]], progress=False)[0]
    with torch.no_grad(), mask_blocks(model, [1, 3]):
        want = np.mean([float(sample_losses(model(s[None], use_cache=False).logits, s[None], torch.ones_like(s[None]))[0])
                        for s in samples])
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("energy", ["fisher", "fisher+grad", "pairwise"])
def test_extract_metadata_and_labels(energy):
    model = tiny_model("gemma3")
    samples = random_samples(4)
    p = extract(model, samples, energy=energy, num_remove=1, metadata={"data": {"source": "test"}}, progress=False)
    assert p.labels == tuple(f"model.layers.{i}" for i in range(4))
    md = p.metadata
    assert md["energy"] == energy and md["gate"] == "layer" and md["granularity"] == "block"
    assert md["num_samples"] == 4 and md["num_tokens"] == sum(len(s) for s in samples)
    assert md["num_blocks"] == 4 and md["data"] == {"source": "test"} and md["model"]
    assert p.num_remove == 1
    if energy != "pairwise":
        assert p.arrays["A"].shape == (4, 4)


def test_extract_sublayer_labels():
    p = extract(tiny_model("qwen3_moe"), random_samples(3), gate="branch", granularity="sublayer", progress=False)
    assert p.labels[:2] == ("model.layers.0.attn", "model.layers.0.mlp") and p.num_blocks == 8
    assert p.metadata["num_blocks"] == 4


def test_docstring_examples():
    import qblock.llm
    import qblock.llm.energy as mod

    for m in (mod, qblock.llm):
        failures, _ = doctest.testmod(m, optionflags=doctest.ELLIPSIS)
        assert failures == 0
