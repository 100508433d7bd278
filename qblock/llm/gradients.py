"""Per-sample gate gradients ``A[s, i] = d l_s / d a_i`` at ``a = 1``, one batched backward per batch.

``l_s`` is the mean next-token cross-entropy over the real tokens of sample ``s``. Each sample of a
batch gets its own row of a ``(B, N)`` gate tensor; sample ``s`` only ever touches row ``s`` (causal
attention with a padding mask, no cross-sample interaction), so the gradient of the SUM of the
per-sample losses with respect to that tensor holds the ``B`` per-sample gradient rows at once.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> torch.manual_seed(0) and None
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2))
    >>> samples = [torch.randint(0, 64, (n,)) for n in (5, 9, 7)]
    >>> A = gate_gradients(m, samples, batch_size=2, progress=False)
    >>> A.shape, A.dtype
    ((3, 3), dtype('float64'))
    >>> R = gate_gradients_reference(m, samples, progress=False)
    >>> bool(abs(A - R).max() <= 1e-5 * abs(R).max())
    True
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from qblock._lazy import require
from qblock.llm.gates import _input_device, gate_sites, gated

__all__ = ["gate_gradients", "gate_gradients_reference", "as_token_tensors", "sample_losses", "nll_sums",
           "batches_by_length"]


def as_token_tensors(samples: Sequence[Any]) -> list:
    """Validate ``samples`` as 1-D integer token-id tensors of at least two tokens each."""
    torch = require("torch", "llm")
    if len(samples) == 0:
        raise ValueError("samples is empty: pass a list of 1-D token-id tensors")
    out = []
    for k, s in enumerate(samples):
        t = s if isinstance(s, torch.Tensor) else torch.as_tensor(np.asarray(s))
        if t.ndim != 1:
            raise ValueError(f"sample {k} must be a 1-D tensor of token ids, got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"sample {k} must hold integer token ids, got dtype {t.dtype}")
        if t.numel() < 2:
            raise ValueError(f"sample {k} has {t.numel()} token(s); next-token loss needs at least 2")
        out.append(t.long())
    return out


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first) to limit padding.

    Example:
        >>> batches_by_length([3, 10, 4, 9], 2)
        [[1, 3], [2, 0]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(samples: Sequence[Any], pad_id: int, device) -> tuple[Any, Any]:
    """Right-pad token tensors into ``(input_ids, attention_mask)`` of shape ``(B, max_len)``."""
    torch = require("torch", "llm")
    width = max(int(s.numel()) for s in samples)
    ids = torch.full((len(samples), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : s.numel()] = s
        mask[b, : s.numel()] = 1
    return ids.to(device), mask.to(device)


def nll_sums(logits, input_ids, attention_mask):
    """Per-sample sums of next-token NLLs over real (unpadded) targets and their counts, shape ``(B,)`` each.

    The one home of the next-token loss: :func:`sample_losses` (gradients, measured energies) and
    :func:`qblock.validate.evaluate.heldout_loss` (calibration and held-out losses) both use it. Row by row,
    ``logsumexp - target logit`` in at least fp32: no log-softmax of the whole batch (tokens x vocabulary),
    which took a quarter of a calibration-loss evaluation. Differentiable.

    Example:
        >>> import torch
        >>> logits = torch.zeros(2, 3, 4)  # uniform over 4 tokens: log 4 per prediction
        >>> sums, counts = nll_sums(logits, torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [1, 1, 0]]))
        >>> [round(float(x), 4) for x in sums / counts], counts.tolist()
        ([1.3863, 1.3863], [2.0, 1.0])
    """
    torch = require("torch", "llm")
    valid = attention_mask[:, 1:].to(logits.device).bool()
    targets = input_ids[:, 1:].to(logits.device)
    counts = valid.sum(dim=1)
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.float32), counts.float()
    # right padding (pad_batch): each row's targets are a prefix, sliced as views; else its real positions
    prefix = bool((valid == (torch.arange(valid.shape[1], device=valid.device) < counts[:, None])).all())
    sums = []
    for r, n in enumerate(counts.tolist()):
        lg, tgt = (logits[r, :n], targets[r, :n]) if prefix else (logits[r, :-1][valid[r]], targets[r][valid[r]])
        if lg.dtype not in (torch.float32, torch.float64):
            lg = lg.float()  # half-precision logits: take the softmax in fp32
        sums.append((torch.logsumexp(lg, dim=-1) - lg.gather(-1, tgt[:, None])[:, 0]).sum())
    sums = torch.stack(sums)
    return sums, counts.to(sums.dtype)


def sample_losses(logits, input_ids, attention_mask):
    """Per-sample mean next-token cross-entropy over real (unpadded) targets, shape ``(B,)`` (>= fp32)."""
    sums, counts = nll_sums(logits, input_ids, attention_mask)
    return sums / counts.clamp_min(1.0)


def _pad_id(model) -> int:
    cfg = getattr(model, "config", None)
    pad = getattr(cfg, "pad_token_id", None)
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(pad, int) and pad >= 0 and (vocab is None or pad < vocab):
        return pad
    return 0  # any valid id: padded positions are masked out of attention and loss


@contextlib.contextmanager
def scoring_mode(model, dtype=None, device=None, freeze: bool = True) -> Iterator[tuple[Any, Any]]:
    """Eval mode, frozen weights and optional autocast for the duration; everything restored after.

    Yields ``(input_device, autocast_context_factory)``.
    """
    torch = require("torch", "llm")
    if isinstance(device, str) and device in ("auto", "balanced", "balanced_low_0", "sequential"):
        device = None  # a device-map name: the model is already spread out; inputs go where it starts
    if device is not None:
        device = torch.device(device)
        if getattr(model, "hf_device_map", None) is None:
            p = next(model.parameters(), None)
            if p is not None and p.device != device:
                model.to(device)  # single-device model: moved where the user asked
    in_dev = device if device is not None else _input_device(model)
    p = next(model.parameters(), None)
    param_dtype = p.dtype if p is not None else torch.float32
    if dtype is not None and not isinstance(dtype, torch.dtype):
        dtype = getattr(torch, str(dtype).replace("torch.", ""), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError("dtype must be a torch dtype or one of 'float32', 'bfloat16', 'float16'")
    if dtype is None or dtype == param_dtype:

        def autocast():
            return contextlib.nullcontext()

    elif dtype in (torch.bfloat16, torch.float16):

        def autocast():
            return torch.autocast(device_type=in_dev.type, dtype=dtype)

    else:
        raise ValueError(
            f"dtype {dtype} is wider than the model's weights ({param_dtype}); load the model in {dtype} instead"
        )
    saved = [(q, q.requires_grad) for q in model.parameters()] if freeze else []
    was_training = model.training
    try:
        for q, _ in saved:
            q.requires_grad_(False)
        model.eval()
        yield in_dev, autocast
    finally:
        model.train(was_training)
        for q, flag in saved:
            q.requires_grad_(flag)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, dynamic_ncols=True)


def gate_gradients(
    model,
    samples: Sequence[Any],
    gate: str = "layer",
    granularity: str = "block",
    batch_size: int = 8,
    dtype=None,
    device=None,
    progress: bool = True,
    callback: Callable[[list[int], np.ndarray], None] | None = None,
) -> np.ndarray:
    """The per-sample gate-gradient matrix ``A`` (``m x N``, float64), batched.

    Args:
        model: a causal LM returning ``.logits`` (Hugging Face style); any device placement,
            including ``device_map`` models.
        samples: ``m`` 1-D token-id tensors of any lengths (at least 2 tokens each).
        gate: ``"layer"`` or ``"branch"`` (see :mod:`qblock.llm.gates`).
        granularity: ``"block"`` or ``"sublayer"`` (branch mode: one column per residual branch).
        batch_size: samples per forward/backward; samples are bucketed by length and right-padded.
        dtype: ``None`` (the model's own dtype; fp32 recommended on CPU) or ``torch.bfloat16`` /
            ``torch.float16`` to run under autocast (the gradients are returned in float64 either way).
        device: where inputs go (default: the device of the input embeddings). A single-device model
            on another device is moved there.
        progress: show a tqdm progress bar.
        callback: called after every batch with ``(sample_indices, rows)`` (rows in that order), e.g.
            to checkpoint partial results.

    Returns:
        ``A`` with ``A[s, i] = d l_s / d a_i`` at ``a = 1``, rows in the input order.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
        ...     bos_token_id=1, eos_token_id=2))
        >>> gate_gradients(m, [torch.tensor([1, 2, 3, 4])], progress=False).shape
        (1, 2)
    """
    torch = require("torch", "llm")
    samples = as_token_tensors(samples)
    n = len(gate_sites(model, gate=gate, granularity=granularity))
    A = np.zeros((len(samples), n), dtype=np.float64)
    pad = _pad_id(model)
    with scoring_mode(model, dtype=dtype, device=device) as (in_dev, autocast), torch.enable_grad():
        bar = _progress(len(samples), f"gate gradients ({gate}/{granularity}, batch {batch_size})", progress)
        try:
            for idx in batches_by_length([int(s.numel()) for s in samples], batch_size):
                ids, mask = pad_batch([samples[i] for i in idx], pad, in_dev)
                gates = torch.ones(len(idx), n, dtype=torch.float32, device=in_dev, requires_grad=True)
                with gated(model, gates, gate=gate, granularity=granularity), autocast():
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                # rows are independent: sample b's loss depends on gates[b] only
                sample_losses(logits, ids, mask).sum().backward()
                rows = gates.grad.detach().to(torch.float64).cpu().numpy()
                A[idx] = rows
                del logits, gates
                if callback is not None:
                    callback(list(idx), rows)
                bar.update(len(idx))
        finally:
            bar.close()
    return A


def gate_gradients_reference(
    model,
    samples: Sequence[Any],
    gate: str = "layer",
    granularity: str = "block",
    dtype=None,
    device=None,
    progress: bool = True,
) -> np.ndarray:
    """The same ``A`` computed the straightforward way: one forward and backward per sample.

    This is how the reference implementation computes it (batch size 1, one shared gate vector);
    kept for tests and the speed benchmark.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
        ...     bos_token_id=1, eos_token_id=2))
        >>> gate_gradients_reference(m, [torch.tensor([1, 2, 3, 4])], progress=False).shape
        (1, 2)
    """
    torch = require("torch", "llm")
    F = require("torch.nn.functional", "llm")
    samples = as_token_tensors(samples)
    n = len(gate_sites(model, gate=gate, granularity=granularity))
    A = np.zeros((len(samples), n), dtype=np.float64)
    with scoring_mode(model, dtype=dtype, device=device) as (in_dev, autocast), torch.enable_grad():
        bar = _progress(len(samples), f"gate gradients, batch size 1 ({gate}/{granularity})", progress)
        try:
            for s, tokens in enumerate(samples):
                ids = tokens.to(in_dev).unsqueeze(0)
                gates = torch.ones(n, dtype=torch.float32, device=in_dev, requires_grad=True)
                with gated(model, gates, gate=gate, granularity=granularity), autocast():
                    logits = model(input_ids=ids, use_cache=False).logits
                flat = logits[0, :-1]
                flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
                loss = F.cross_entropy(flat, ids[0, 1:].to(logits.device))
                loss.backward()
                A[s] = gates.grad.detach().to(torch.float64).cpu().numpy()
                bar.update(1)
        finally:
            bar.close()
    return A
