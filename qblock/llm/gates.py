"""Scalar gates on decoder blocks or on their residual branches, installed as reversible forward hooks.

Two gate modes (``a = 1`` is the unmodified model, ``a_i = 0`` removes variable ``i``):

* ``layer`` (any block): ``out = a_i * block(h) + (1 - a_i) * h``, i.e. ``h + a_i (block(h) - h)``
  written so that ``a = 1`` reproduces the model bit for bit and ``a = 0`` gives ``h`` exactly.
* ``branch`` (the paper's): each residual branch output (attention and MLP, after any post-branch
  norm) is multiplied by its gate, ``h = h + a * Attn(..)``, ``h = h + a * MLP(..)``.

Residual branches are found by data flow, not by names: one short probe forward records which direct
children of each block consume which other child's output; the chains of children that end in a
value no other child consumes are the branches. The plan is accepted only if gating all branch ends
to zero turns every block into the identity (which holds exactly for pre-norm residual blocks and
fails for post-norm ones); otherwise a clear error suggests ``gate="layer"``.

Gates are a 1-D tensor ``(N,)`` (one value per variable) or a per-sample tensor ``(B, N)`` whose row
``b`` gates sample ``b`` of the batch, so one backward pass yields per-sample gradients.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)).eval()
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> with gated(m, torch.ones(2)):
    ...     gated_logits = m(ids, use_cache=False).logits
    >>> bool(torch.equal(gated_logits, m(ids, use_cache=False).logits))
    True
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from qblock._lazy import require
from qblock.llm.blocks import (_passthrough_forward, find_blocks, first_tensor, hidden_from_call, patched_forwards,
                               replace_first)
from qblock.problems.block_removal import removal_key

__all__ = ["gated", "gate_sites", "GateSite", "num_gates", "mask_blocks", "block_labels", "GATE_MODES",
           "GRANULARITIES"]

GATE_MODES = ("layer", "branch")
GRANULARITIES = ("block", "sublayer")

# model -> per block: list of (child name, kind) branch ends, kind "attn" or "mlp"
_BRANCH_PLANS: "weakref.WeakKeyDictionary[Any, list[list[tuple[str, str]]]]" = weakref.WeakKeyDictionary()
_ATTENTION_KWARGS = ("attention_mask", "position_embeddings", "past_key_values", "position_ids", "past_key_value")


@dataclass
class GateSite:
    """One gate variable: its index, label, owning block and the modules whose outputs it scales."""

    index: int
    label: str
    block_index: int
    modules: list = field(default_factory=list)


def _input_device(model):
    torch = require("torch", "llm")
    try:
        emb = model.get_input_embeddings()
        if emb is not None and getattr(emb, "weight", None) is not None:
            return emb.weight.device
    except (AttributeError, NotImplementedError):
        pass
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _probe_ids(model):
    torch = require("torch", "llm")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 8
    return (torch.arange(1, 5) % max(int(vocab), 1)).unsqueeze(0).to(_input_device(model))


def _run_probe(model):
    """One short forward pass in eval mode without gradients (restores the training flag)."""
    torch = require("torch", "llm")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(_probe_ids(model), use_cache=False)
    finally:
        model.train(was_training)


def _same(a, b) -> bool:
    torch = require("torch", "llm")
    if a is b:
        return True
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    return a.device == b.device and a.shape == b.shape and a.numel() > 0 and a.data_ptr() == b.data_ptr()


def _discover_branches(model) -> list[list[tuple[str, str]]]:
    """Record the data flow among each block's direct children and return the branch ends."""
    torch = require("torch", "llm")
    blocks = find_blocks(model)
    calls: list[list[dict]] = [[] for _ in blocks]
    handles = []

    def recorder(bi, name):
        def hook(module, args, kwargs, output):
            try:
                inp = hidden_from_call(args, kwargs)
                out = first_tensor(output)
            except RuntimeError:
                return None
            calls[bi].append(
                {
                    "name": name,
                    "inp": inp,
                    "out": out,
                    "attn": isinstance(output, tuple) or any(k in kwargs for k in _ATTENTION_KWARGS),
                }
            )
            return None

        return hook

    try:
        for bi, (_, block) in enumerate(blocks):
            for name, child in block.named_children():
                handles.append(child.register_forward_hook(recorder(bi, name), with_kwargs=True))
        _run_probe(model)
    finally:
        for h in handles:
            h.remove()

    plan: list[list[tuple[str, str]]] = []
    for bi, recs in enumerate(calls):
        bname = blocks[bi][0]
        if not recs:
            raise ValueError(
                f"branch gates: block {bname} ({type(blocks[bi][1]).__name__}) was not called by a forward pass or "
                f"has no sub-modules; use gate='layer'"
            )
        parent = list(range(len(recs)))

        def root(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        consumed = [False] * len(recs)
        for j, rec in enumerate(recs):
            for k in range(j - 1, -1, -1):
                if _same(recs[k]["out"], rec["inp"]):
                    consumed[k] = True
                    parent[root(j)] = root(k)
                    break
        ends = [k for k in range(len(recs)) if not consumed[k]]
        kinds = {}
        for k in ends:
            chain = [i for i in range(len(recs)) if root(i) == root(k)]
            kinds[k] = "attn" if any(recs[i]["attn"] for i in chain) else "mlp"
        labels = [kinds[k] for k in ends]
        if len(set(labels)) != len(labels) or len({recs[k]["name"] for k in ends}) != len(ends):
            # not one attention and one MLP branch: name each branch by its last module
            labels = [recs[k]["name"] for k in ends]
        if len(set(labels)) != len(labels):
            raise ValueError(
                f"branch gates: block {bname} calls the same sub-module at several branch ends "
                f"({[recs[k]['name'] for k in ends]}); use gate='layer'"
            )
        plan.append([(recs[k]["name"], lab) for k, lab in zip(ends, labels)])

    # accept only if zeroing every branch end makes each block the identity (pre-norm residual form)
    zero_hooks, diffs = [], {}

    def zero(module, args, kwargs, output):
        return replace_first(output, first_tensor(output) * 0.0)

    def compare(bi):
        def hook(module, args, kwargs, output):
            h = hidden_from_call(args, kwargs)
            o = first_tensor(output)
            diffs[bi] = float((o.to(h.device).float() - h.float()).abs().max()) if o.shape == h.shape else float("inf")
            return None

        return hook

    try:
        for bi, (_, block) in enumerate(blocks):
            zero_hooks.append(block.register_forward_hook(compare(bi), with_kwargs=True))
            for name, _ in plan[bi]:
                zero_hooks.append(block.get_submodule(name).register_forward_hook(zero, with_kwargs=True))
        _run_probe(model)
    finally:
        for h in zero_hooks:
            h.remove()
    for bi, (bname, block) in enumerate(blocks):
        d = diffs.get(bi, float("inf"))
        if not d <= 1e-6:
            raise ValueError(
                f"branch gates are not supported for {type(block).__name__} (block {bname}): gating the outputs of "
                f"its branch ends {[n for n, _ in plan[bi]]} to zero does not make the block the identity (max "
                f"difference {d:.3g}); the branch mode needs pre-norm residual blocks h + f(h). Use gate='layer'."
            )
    return plan


def _branch_plan(model):
    plan = _BRANCH_PLANS.get(model)
    if plan is None:
        plan = _discover_branches(model)
        _BRANCH_PLANS[model] = plan
    return plan


def gate_sites(model, gate: str = "layer", granularity: str = "block") -> list[GateSite]:
    """The gate variables of ``model`` for a gate mode and granularity, in variable order.

    Args:
        model: the model.
        gate: ``"layer"`` (one gate wraps a whole block) or ``"branch"`` (gates scale residual branches).
        granularity: ``"block"`` (one variable per block) or ``"sublayer"`` (one per residual branch;
            branch mode only).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
        >>> [s.label for s in gate_sites(m, "branch", "sublayer")][:2]
        ['model.layers.0.attn', 'model.layers.0.mlp']
    """
    if gate not in GATE_MODES:
        raise ValueError(f"gate must be one of {GATE_MODES}, got {gate!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    blocks = find_blocks(model)
    if gate == "layer":
        if granularity != "block":
            raise ValueError("granularity='sublayer' needs gate='branch' (a layer gate wraps a whole block)")
        return [GateSite(i, name, i, [block]) for i, (name, block) in enumerate(blocks)]
    plan = _branch_plan(model)
    sites: list[GateSite] = []
    for bi, (bname, block) in enumerate(blocks):
        ends = [(block.get_submodule(n), lab) for n, lab in plan[bi]]
        if granularity == "block":
            sites.append(GateSite(len(sites), bname, bi, [m for m, _ in ends]))
        else:
            for m, lab in ends:
                sites.append(GateSite(len(sites), f"{bname}.{lab}", bi, [m]))
    return sites


def num_gates(model, gate: str = "layer", granularity: str = "block") -> int:
    """Number of gate variables (``N`` blocks, or the number of residual branches)."""
    return len(gate_sites(model, gate=gate, granularity=granularity))


def _gate_value(gates, k: int, like):
    """Gate ``k`` shaped to broadcast against ``like`` (scalar, or one value per sample)."""
    if gates.ndim == 1:
        return gates[k].to(device=like.device, dtype=like.dtype)
    col = gates[:, k].to(device=like.device, dtype=like.dtype)
    b = col.shape[0]
    lead = like.shape[0] if like.ndim else 0
    if lead == b:
        return col.view(b, *([1] * (like.ndim - 1)))
    if like.ndim == 2 and b > 0 and lead % b == 0:
        # some blocks flatten (B, T, D) to (B*T, D) inside a branch (OPT's MLP): rows are batch-major
        return col.repeat_interleave(lead // b).view(lead, 1)
    raise ValueError(f"per-sample gates have {b} rows but the gated tensor has shape {tuple(like.shape)}")


@contextlib.contextmanager
def gated(model, gates, gate: str = "layer", granularity: str = "block") -> Iterator[list[GateSite]]:
    """Install scalar gates on the model for the duration of the ``with`` block.

    Args:
        model: the model (any device placement, including ``device_map`` models: each gate value is
            moved to the device of the tensor it scales, differentiably).
        gates: tensor of shape ``(N,)`` or per-sample ``(B, N)``; it may require grad, in which case
            ``d loss / d gates`` is available after ``backward()``.
        gate: ``"layer"`` or ``"branch"`` (see the module docstring).
        granularity: ``"block"`` or ``"sublayer"`` (branch mode only; ``N`` is then the number of
            residual branches, usually ``2 * num_blocks``).

    Yields:
        The list of :class:`GateSite` (labels in variable order).

    Raises:
        ValueError: on a gate vector of the wrong length or an unsupported block structure.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)).eval()
        >>> a = torch.ones(2, 4, requires_grad=True)       # 2 samples, 4 branch gates
        >>> with gated(m, a, gate="branch", granularity="sublayer"):
        ...     m(torch.tensor([[1, 2, 3], [4, 5, 6]]), use_cache=False).logits.sum().backward()
        >>> a.grad.shape
        torch.Size([2, 4])
    """
    torch = require("torch", "llm")
    sites = gate_sites(model, gate=gate, granularity=granularity)
    if not isinstance(gates, torch.Tensor):
        gates = torch.as_tensor(gates, dtype=torch.float32)
    if gates.ndim not in (1, 2) or gates.shape[-1] != len(sites):
        raise ValueError(
            f"gates must have shape ({len(sites)},) or (batch, {len(sites)}) for {len(sites)} {gate}/{granularity} "
            f"gate variables, got {tuple(gates.shape)}"
        )

    def layer_hook(k):
        def hook(module, args, kwargs, output):
            h = hidden_from_call(args, kwargs)
            o = first_tensor(output)
            a = _gate_value(gates, k, o)
            # a*o + (1-a)*h: exact o at a=1 and exact h at a=0
            return replace_first(output, a * o + (1 - a) * h.to(o.device))

        return hook

    def branch_hook(k):
        def hook(module, args, kwargs, output):
            o = first_tensor(output)
            return replace_first(output, _gate_value(gates, k, o) * o)

        return hook

    handles = []
    try:
        for site in sites:
            make = layer_hook if gate == "layer" else branch_hook
            for module in site.modules:
                handles.append(module.register_forward_hook(make(site.index), with_kwargs=True))
        yield sites
    finally:
        for h in handles:
            h.remove()


def block_labels(model, granularity: str = "block", gate: str = "branch") -> list[str]:
    """Labels of the gate variables: block names, or ``<block>.attn`` / ``<block>.mlp`` per branch.

    Args:
        model: the model.
        granularity: ``"block"`` (one variable per block) or ``"sublayer"`` (one per residual branch;
            found by a short probe forward pass, see :func:`qblock.llm.gates.branch_sites`).
        gate: only used for ``"sublayer"``; sublayer variables exist in branch mode only.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
        >>> block_labels(m, "sublayer")
        ['model.layers.0.attn', 'model.layers.0.mlp', 'model.layers.1.attn', 'model.layers.1.mlp']
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "block":
        return [name for name, _ in find_blocks(model)]
    return [site.label for site in gate_sites(model, gate="branch", granularity="sublayer")]


@contextlib.contextmanager
def mask_blocks(model, removed: Iterable[int], gate: str = "layer", granularity: str = "block") -> Iterator[list[int]]:
    """Temporarily remove blocks (``a_i = 0``) for forward passes; nothing is deleted.

    In ``layer`` mode a removed block becomes a pass-through (its output is its input) and is not
    computed at all. In ``branch`` mode the residual branches of the removed blocks (or, with
    ``granularity="sublayer"``, the removed branches) are gated to zero. Everything is restored on exit,
    also on error. Use ``use_cache=False`` in forward passes made under the mask.

    Args:
        model: the model.
        removed: indices of the gate variables to remove (block indices, or branch indices in
            ``sublayer`` granularity).
        gate: ``"layer"`` or ``"branch"``.
        granularity: ``"block"`` or ``"sublayer"`` (branch mode only).

    Yields:
        The sorted list of removed indices.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2)).eval()
        >>> with mask_blocks(m, [0, 2]) as idx:
        ...     _ = m(torch.tensor([[1, 2]]), use_cache=False)
        >>> idx
        [0, 2]
    """
    if gate not in GATE_MODES:
        raise ValueError(f"gate must be one of {GATE_MODES}, got {gate!r}")
    removed = list(removal_key(removed))
    if gate == "branch" or granularity != "block":
        torch = require("torch", "llm")
        n = len(gate_sites(model, gate=gate, granularity=granularity))
        bad = [i for i in removed if not 0 <= i < n]
        if bad:
            raise IndexError(f"indices {bad} out of range for {n} gate variables")
        a = torch.ones(n)
        a[removed] = 0.0
        with gated(model, a, gate=gate, granularity=granularity):
            yield removed
        return
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    blocks = find_blocks(model)
    bad = [i for i in removed if not 0 <= i < len(blocks)]
    if bad:
        raise IndexError(f"block indices {bad} out of range for a model with {len(blocks)} blocks")
    patches = ((blocks[i][1], _passthrough_forward(blocks[i][1], blocks[i][1].forward)) for i in removed)
    with patched_forwards(patches):
        yield removed
