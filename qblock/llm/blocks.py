"""Find the decoder blocks of a causal LM by structure; the plumbing of reversible forward patches.

The block list is located without looking at the model's name or class: it is the outermost
``nn.ModuleList`` whose entries all share one class and hold parameters, and among such lists the one
holding the most parameters (the decoder stack carries almost all weights of a causal LM; expert lists
inside MoE blocks are nested inside a block and so are never outermost).

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
    ...                   num_attention_heads=2, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> [name for name, _ in find_blocks(model)]
    ['model.layers.0', 'model.layers.1', 'model.layers.2']
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterable, Iterator

from qblock._lazy import require

__all__ = ["find_blocks", "hidden_from_call", "first_tensor", "replace_first", "patched_forwards"]

# block class -> ("tensor", 0) or ("tuple", length): what a block returns, learnt from a real call
_OUTPUT_KIND: "weakref.WeakKeyDictionary[type, tuple[str, int]]" = weakref.WeakKeyDictionary()


def _nn():
    return require("torch.nn", "llm")


def _param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model) -> list[tuple[str, Any]]:
    """The decoder blocks of ``model``, in execution order, as ``(qualified_name, module)`` pairs.

    Args:
        model: any ``torch.nn.Module`` holding a stack of repeated decoder blocks (a Hugging Face
            ``*ForCausalLM``, its inner ``*Model``, or a custom module).

    Returns:
        ``[(name, block), ...]`` where ``name`` is the block's qualified module name
        (``"model.layers.0"``, ``"transformer.h.0"``, ...).

    Raises:
        ValueError: when no ``nn.ModuleList`` of same-class, parameter-holding modules exists; the
            message lists the lists that were examined and why each was rejected.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
        ...     bos_token_id=1, eos_token_id=2))
        >>> [n for n, _ in find_blocks(m)]
        ['transformer.h.0', 'transformer.h.1']
    """
    nn = _nn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_blocks expects a torch.nn.Module, got {type(model).__name__}")
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)]
    rejected: list[str] = []
    candidates: list[tuple[str, Any]] = []
    for name, mod in lists:
        children = list(mod)
        label = name or "<root>"
        if not children:
            rejected.append(f"{label} (empty)")
            continue
        classes = {type(c) for c in children}
        if len(classes) != 1:
            rejected.append(f"{label} (mixed classes: {sorted(c.__name__ for c in classes)})")
            continue
        if any(_param_count(c) == 0 for c in children):
            rejected.append(f"{label} (entries without parameters)")
            continue
        candidates.append((name, mod))
    # outermost only: a list nested inside an entry of another candidate list (MoE experts, a block's
    # own sub-lists) is part of a block, not the block stack
    outer = [
        (name, mod)
        for name, mod in candidates
        if not any(other != name and (name.startswith(other + ".") or other == "") for other, _ in candidates)
    ]
    if not outer:
        searched = ", ".join(rejected) if rejected else "none found"
        raise ValueError(
            f"no decoder block stack found in {type(model).__name__}: searched every nn.ModuleList for one whose "
            f"entries share a class and hold parameters; lists examined: {searched}"
        )
    best_name, best = max(outer, key=lambda nm: (_param_count(nm[1]), len(nm[1])))
    prefix = f"{best_name}." if best_name else ""
    return [(f"{prefix}{i}", block) for i, block in enumerate(best)]


def _block_stack(model):
    """(qualified name of the ModuleList, the ModuleList) holding the blocks."""
    blocks = find_blocks(model)
    name = blocks[0][0].rsplit(".", 1)[0] if "." in blocks[0][0] else ""
    stack = model.get_submodule(name) if name else model
    return name, stack


def hidden_from_call(args: tuple, kwargs: dict):
    """The hidden-state tensor a block was called with (first positional tensor or ``hidden_states``)."""
    torch = require("torch", "llm")
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if "hidden_states" in kwargs and isinstance(kwargs["hidden_states"], torch.Tensor):
        return kwargs["hidden_states"]
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    for v in kwargs.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    raise RuntimeError("could not find the hidden-state tensor among the block's call arguments")


def first_tensor(output):
    """The hidden-state part of a block/sub-module output (the tensor itself or its first element)."""
    torch = require("torch", "llm")
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise RuntimeError(f"unsupported module output type {type(output).__name__}: expected a tensor or a tuple")


def replace_first(output, new):
    """``output`` with its hidden-state part replaced by ``new`` (same container type)."""
    torch = require("torch", "llm")
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    raise RuntimeError(f"unsupported module output type {type(output).__name__}")


def _passthrough_forward(block, original_forward):
    """A forward that returns its hidden-state input unchanged, in the block's output format."""

    def forward(*args, **kwargs):
        h = hidden_from_call(args, kwargs)
        kind = _OUTPUT_KIND.get(type(block))
        if kind is None:
            # learn the output format from one real call (HF v5 blocks return a tensor, older or remote
            # code blocks a tuple), then never compute this block again while masked
            out = original_forward(*args, **kwargs)
            if isinstance(out, tuple):
                _OUTPUT_KIND[type(block)] = ("tuple", len(out))
            else:
                _OUTPUT_KIND[type(block)] = ("tensor", 0)
            return replace_first(out, h.to(first_tensor(out).device))
        if kind[0] == "tensor":
            return h
        return (h,) + (None,) * (kind[1] - 1)

    return forward


@contextlib.contextmanager
def patched_forwards(patches: Iterable[tuple[Any, Callable]]) -> Iterator[None]:
    """Replace modules' ``forward`` for the duration, and put every one back on exit, also on error.

    ``patches`` yields ``(module, new_forward)`` pairs, consumed one at a time (so a new forward may
    wrap the module's current one). A module whose ``forward`` was its own attribute gets it back;
    otherwise the attribute is deleted and the class's method shows again. The one home of this
    restore rule: block masking (:func:`qblock.llm.gates.mask_blocks`) and the replayed prefix of
    :class:`qblock.validate.evaluate.PrefixCache` both use it.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> with patched_forwards([(lin, lambda x: x)]):
        ...     same = bool(torch.equal(lin(torch.ones(2)), torch.ones(2)))
        >>> same, "forward" in lin.__dict__
        (True, False)
    """
    saved: list[tuple[Any, bool, Any]] = []
    try:
        for module, forward in patches:
            saved.append((module, "forward" in module.__dict__, module.__dict__.get("forward")))
            module.forward = forward
        yield
    finally:
        for module, had_own, previous in reversed(saved):
            if had_own:
                module.forward = previous
            else:
                del module.forward
