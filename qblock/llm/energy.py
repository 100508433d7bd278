"""Energy models: from gate gradients (or measured losses) to a :class:`~qblock.BlockRemovalProblem`.

``x_i = 1`` means "remove variable i", i.e. its gate moves from ``a_i = 1`` to ``0`` (``delta a = -x``).
With ``A[s, i] = d l_s / d a_i`` at ``a = 1`` (``m`` samples):

* ``fisher`` (the paper's): ``E(x) = x^T H x`` with ``H = A^T A / m`` (empirical Fisher /
  Gauss-Newton), no linear term.
* ``fisher+grad``: the second-order Taylor expansion with its first-order term kept,
  ``E(x) = -g^T x + 1/2 x^T H x`` with ``g = mean_s A[s]`` (first-order loss change ``g^T delta a``).
* ``pairwise``: measured, forward-only: the mean calibration loss with nothing, each single variable
  and each pair removed, fitted exactly at the 0/1/2-removal level
  (``E(e_i) = L_i - L_0``, ``E(e_i + e_j) = L_ij - L_0``).

Example:
    >>> import numpy as np
    >>> A = np.array([[1.0, 0.0], [1.0, 2.0]])
    >>> p = fisher_problem(A, num_remove=1)
    >>> p.H.tolist()
    [[1.0, 1.0], [1.0, 2.0]]
    >>> q = fisher_grad_problem(A, num_remove=1)
    >>> q.energy([1, 0]), q.energy([0, 1])    # -g_i + H_ii / 2
    (-0.5, 0.0)
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import numpy as np

from qblock.problems.block_removal import BlockRemovalProblem

__all__ = [
    "ENERGY_MODELS",
    "fisher_problem",
    "fisher_grad_problem",
    "pairwise_problem",
    "build_problem",
    "extract",
    "subset_losses",
    "measured_energy_problem",
]

from qblock._energies import ENERGY_MODELS  # noqa: E402  (the registry lives where the CLI can read it without torch)


def _as_A(A: Any) -> np.ndarray:
    arr = np.asarray(A, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"A must be a 2-D (samples x blocks) array with at least one row, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("A contains non-finite values (NaN/inf gradients); check the model and dtype")
    return arr


def _meta(metadata: Mapping[str, Any] | None, **ours: Any) -> dict[str, Any]:
    out = dict(ours)
    out.update(dict(metadata or {}))
    if "energy" in ours:
        out["energy"] = ours["energy"]  # the energy name always describes this H
    return out


def fisher_problem(
    A: Any,
    num_remove: int | None = None,
    labels: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    keep_A: bool = True,
) -> BlockRemovalProblem:
    """The paper's energy ``E(x) = x^T (A^T A / m) x``.

    Args:
        A: ``(m, N)`` gate gradients.
        num_remove: blocks to remove (may be set later with ``with_num_remove``).
        labels: variable names.
        metadata: extra provenance merged into the problem's metadata.
        keep_A: store ``A`` in ``problem.arrays["A"]`` so other energies can be derived later.

    Example:
        >>> p = fisher_problem([[3.0, 4.0]], num_remove=2)
        >>> p.energy([1, 1])    # (3 + 4)^2
        49.0
    """
    A = _as_A(A)
    H = A.T @ A / A.shape[0]
    return BlockRemovalProblem(
        H, num_remove, labels=labels, metadata=_meta(metadata, energy="fisher", num_samples=int(A.shape[0])),
        arrays={"A": A} if keep_A else None,
    )


def fisher_grad_problem(
    A: Any,
    num_remove: int | None = None,
    labels: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    keep_A: bool = True,
) -> BlockRemovalProblem:
    """Second-order Taylor energy with the gradient term: ``E(x) = -g^T x + 1/2 x^T H x``.

    Removing variable ``i`` moves ``a_i`` from 1 to 0 (``delta a = -x``), so the first-order loss change
    is ``g^T delta a = -g^T x`` with ``g = mean_s A[s]``; ``H = A^T A / m`` as in :func:`fisher_problem`.

    Example:
        >>> p = fisher_grad_problem([[2.0, 0.0]], num_remove=1)
        >>> p.energy([1, 0])    # -2 + 4 / 2
        0.0
    """
    A = _as_A(A)
    g = A.mean(axis=0)
    H = A.T @ A / A.shape[0]
    return BlockRemovalProblem(
        H / 2.0, num_remove, linear=-g, labels=labels,
        metadata=_meta(metadata, energy="fisher+grad", num_samples=int(A.shape[0])),
        arrays={"A": A} if keep_A else None,
    )


def build_problem(
    A: Any,
    energy: str = "fisher",
    num_remove: int | None = None,
    labels: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    keep_A: bool = True,
) -> BlockRemovalProblem:
    """Build the problem of a gradient-based energy model (``"fisher"`` or ``"fisher+grad"``) from ``A``.

    Example:
        >>> build_problem([[1.0, 2.0]], "fisher+grad").metadata["energy"]
        'fisher+grad'
    """
    if energy == "fisher":
        return fisher_problem(A, num_remove, labels, metadata, keep_A)
    if energy == "fisher+grad":
        return fisher_grad_problem(A, num_remove, labels, metadata, keep_A)
    if energy in ("pairwise", "measured"):
        raise ValueError(f"the {energy!r} energy is measured on the model, not built from A: use "
                         "extract(model, samples, energy=...)")
    raise ValueError(f"unknown energy model {energy!r}; choose one of {list(ENERGY_MODELS)}")


def subset_losses(
    model,
    samples: Sequence[Any],
    subsets: Sequence[Sequence[int]],
    gate: str = "layer",
    granularity: str = "block",
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "masked losses",
) -> np.ndarray:
    """Mean calibration loss (mean over samples of each sample's mean next-token CE) per removal subset.

    Forward passes only (no gradients), one per batch per subset, with :func:`qblock.llm.mask_blocks`.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
        >>> subset_losses(m, [torch.tensor([1, 2, 3])], [[], [0]], progress=False).shape
        (2,)
    """
    from tqdm.auto import tqdm

    from qblock._lazy import require

    from qblock.llm.gates import mask_blocks
    from qblock.llm.gradients import _pad_id, as_token_tensors, batches_by_length, pad_batch, sample_losses, scoring_mode

    torch = require("torch", "llm")
    samples = as_token_tensors(samples)
    out = np.zeros(len(subsets), dtype=np.float64)
    with scoring_mode(model, freeze=False) as (in_dev, _), torch.no_grad():
        batches = [
            pad_batch([samples[i] for i in idx], _pad_id(model), in_dev)
            for idx in batches_by_length([int(s.numel()) for s in samples], batch_size)
        ]
        for k, removed in enumerate(tqdm(subsets, desc=desc, unit="subset", disable=not progress, dynamic_ncols=True)):
            total = 0.0
            with mask_blocks(model, removed, gate=gate, granularity=granularity):
                for ids, mask in batches:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    total += float(sample_losses(logits, ids, mask).double().sum())
            out[k] = total / len(samples)
    return out


def pairwise_problem(
    model,
    samples: Sequence[Any],
    num_remove: int | None = None,
    gate: str = "layer",
    granularity: str = "block",
    batch_size: int = 8,
    labels: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> BlockRemovalProblem:
    """Measured energy: exact quadratic fit of the calibration loss at the 0/1/2-removal level.

    With ``L_0`` the loss of the full model, ``L_i`` with variable ``i`` removed and ``L_ij`` with
    ``i`` and ``j`` removed: ``linear_i = L_i - L_0`` and ``H_ij = H_ji = (L_ij - L_i - L_j + L_0) / 2``
    (zero diagonal), so ``E(e_i) = L_i - L_0`` and ``E(e_i + e_j) = L_ij - L_0`` exactly. Costs
    ``1 + N(N+1)/2`` masked forward passes over ``samples`` (use a small subset for large ``N``).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2))
        >>> p = pairwise_problem(m, [torch.tensor([1, 2, 3, 4])], num_remove=1, progress=False)
        >>> p.metadata["energy"], p.num_blocks
        ('pairwise', 3)
    """
    from qblock.llm.gates import gate_sites

    sites = gate_sites(model, gate=gate, granularity=granularity)
    n = len(sites)
    pairs = list(itertools.combinations(range(n), 2))
    subsets = [[]] + [[i] for i in range(n)] + [list(p) for p in pairs]
    losses = subset_losses(model, samples, subsets, gate, granularity, batch_size, progress, desc="pairwise losses")
    L0, single = losses[0], losses[1 : n + 1]
    pair = np.diag(single).astype(np.float64)
    H = np.zeros((n, n))
    for (i, j), Lij in zip(pairs, losses[n + 1 :]):
        pair[i, j] = pair[j, i] = Lij
        H[i, j] = H[j, i] = (Lij - single[i] - single[j] + L0) / 2.0
    md = _meta(
        metadata, energy="pairwise", gate=gate, granularity=granularity, num_samples=len(samples),
        base_loss=float(L0), forward_passes_per_sample=len(subsets),
    )
    return BlockRemovalProblem(
        H, num_remove, linear=single - L0, labels=labels or [s.label for s in sites], metadata=md,
        arrays={"single_losses": single, "pair_losses": pair},
    )


def measured_energy_problem(model, samples: Sequence[Any], num_remove: int | None = None, *, gate: str = "layer",
                            pool_size: int | None = None, batch_size: int = 8, labels: Sequence[str] | None = None,
                            metadata: Mapping[str, Any] | None = None, progress: bool = True,
                            executor: Any = None) -> BlockRemovalProblem:
    """The measured QUBO of :func:`qblock.select.measured_problem` on a real model (block granularity).

    Single removals of every block and pairs inside a pool of the most removable ones, measured on
    ``samples`` with a prefix cache; a QUBO any backend can solve (and :func:`qblock.select.refine` can
    refine for one M). ``executor`` (:mod:`qblock.executor`) measures the singles and the pairs in
    parallel (Ray: model actors; the same numbers).
    """
    from qblock.llm.measured import CalibrationLoss, _Bar
    from qblock.select import measured_problem

    oracle = CalibrationLoss(model, samples, gate=gate, batch_size=batch_size, executor=executor)
    bar = _Bar(oracle, progress)
    try:
        p = measured_problem(bar, len(labels) if labels else _num_blocks(model), pool_size=pool_size,
                             num_remove=num_remove, labels=labels)
    finally:
        bar.close()
    md = _meta(metadata, energy="measured", num_samples=len(samples))
    md["selection"] = p.metadata["selection"]
    return BlockRemovalProblem(p.H, num_remove, linear=p.linear, labels=p.labels, metadata=md, arrays=p.arrays)


def _num_blocks(model) -> int:
    from qblock.llm.blocks import find_blocks

    return len(find_blocks(model))


def _model_id(model) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "") or type(model).__name__)


def extract(
    model,
    samples: Sequence[Any],
    energy: str = "fisher",
    gate: str = "layer",
    granularity: str = "block",
    batch_size: int = 8,
    num_remove: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
    *,
    dtype=None,
    device=None,
    keep_A: bool = True,
) -> BlockRemovalProblem:
    """Gate gradients (or measured losses, for ``"pairwise"``) and an energy model, as a problem.

    Args:
        model: a causal LM (Hugging Face style, returning ``.logits``).
        samples: 1-D token-id tensors (calibration data).
        energy: one of :data:`ENERGY_MODELS`.
        gate, granularity: see :func:`qblock.llm.gated`.
        batch_size: samples per batched forward/backward.
        num_remove: blocks to remove (optional; can be set later).
        metadata: extra provenance (data source, splits, ...) merged over the computed metadata.
        progress: progress bars.
        dtype, device: see :func:`qblock.llm.gate_gradients`.
        keep_A: store ``A`` in the problem (gradient energies).

    Returns:
        A :class:`~qblock.BlockRemovalProblem` labelled by block (or branch) names, with metadata
        ``model``, ``gate``, ``granularity``, ``energy``, ``num_samples``, ``num_tokens``, ``num_blocks``.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
        ...     bos_token_id=1, eos_token_id=2))
        >>> p = extract(m, [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7])], progress=False)
        >>> p.labels, p.metadata["num_tokens"]
        (('transformer.h.0', 'transformer.h.1', 'transformer.h.2'), 7)
    """
    from qblock._provenance import OBJECT_SPEC, Provenance, tokens_sha256
    from qblock.llm.blocks import find_blocks
    from qblock.llm.gates import gate_sites
    from qblock.llm.gradients import as_token_tensors, gate_gradients

    if energy not in ENERGY_MODELS:
        raise ValueError(f"unknown energy model {energy!r}; choose one of {list(ENERGY_MODELS)}")
    samples = as_token_tensors(samples)
    labels = [s.label for s in gate_sites(model, gate=gate, granularity=granularity)]
    # the one provenance record of qblock.llm.pipeline too (an in-memory model has no loadable spec)
    prov = Provenance(model={"id": _model_id(model), "spec": OBJECT_SPEC}, gate=gate, granularity=granularity,
                      num_samples=len(samples), num_tokens=int(sum(int(s.numel()) for s in samples)),
                      tokens_sha256=tokens_sha256(samples), num_blocks=len(find_blocks(model)))
    md = _meta(metadata, **prov.metadata(), energy=energy)
    if energy == "pairwise":
        return pairwise_problem(model, samples, num_remove, gate, granularity, batch_size, labels, md, progress)
    if energy == "measured":
        if granularity != "block":
            raise ValueError("the 'measured' energy removes whole blocks: use granularity='block'")
        return measured_energy_problem(model, samples, num_remove, gate=gate, batch_size=batch_size, labels=labels,
                                       metadata=md, progress=progress)
    A = gate_gradients(model, samples, gate=gate, granularity=granularity, batch_size=batch_size,
                       dtype=dtype, device=device, progress=progress)
    return build_problem(A, energy, num_remove, labels, md, keep_A)
