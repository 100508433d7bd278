"""Export: a pruned copy of a model with the chosen decoder blocks dropped, saved as a normal HF model.

The copy keeps every other weight untouched; ``num_hidden_layers`` and every per-layer config list
(``layer_types`` and any other list with one entry per block) are updated, and each kept module's
``layer_idx`` is renumbered so the KV cache indexes the kept layers ``0 .. N-M-1``. The result equals
the original model with those blocks' layer gates at zero.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2)).eval()
    >>> small = remove_blocks(m, [1, 2])
    >>> small.config.num_hidden_layers, len(small.model.layers), small.model.layers[1].self_attn.layer_idx
    (2, 2, 1)
    >>> from qblock.llm import mask_blocks
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> with mask_blocks(m, [1, 2]):
    ...     gated_logits = m(ids, use_cache=False).logits
    >>> bool(torch.allclose(small(ids, use_cache=False).logits, gated_logits, atol=1e-6))
    True
"""

from __future__ import annotations

import copy
import json
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from qblock._lazy import require
from qblock.llm.blocks import _block_stack, find_blocks

__all__ = ["remove_blocks", "save_pruned", "check_reloadable", "save_model_folder"]


def _configs(model) -> list[Any]:
    """The model's config and its nested sub-configs (e.g. ``text_config``), each once."""
    root = getattr(model, "config", None)
    if root is None:
        return []
    seen, out, todo = set(), [], [root]
    while todo:
        cfg = todo.pop()
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        out.append(cfg)
        for value in list(vars(cfg).values()):
            if hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a nested config object
                todo.append(value)
    return out


def _normalise(idx: Iterable[int], n: int) -> list[int]:
    """Sorted, checked block indices: whole numbers (numpy integers too), each once, in ``0..n-1``."""
    idx = list(idx)
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in idx):
        raise ValueError(f"block indices must be integers, got {idx!r}")
    removed = [int(i) for i in idx]
    twice = sorted({i for i in removed if removed.count(i) > 1})
    if twice:
        raise ValueError(f"block indices {twice} are listed more than once")
    bad = [i for i in removed if not 0 <= i < n]
    if bad:
        raise IndexError(f"block indices {bad} out of range for a model with {n} blocks (0..{n - 1})")
    if len(removed) >= n:
        raise ValueError(f"cannot remove all {n} blocks; keep at least one")
    return sorted(removed)


def remove_blocks(model, idx: Iterable[int]):
    """A deep copy of ``model`` without the blocks ``idx`` (the original is not modified).

    Args:
        model: a causal LM whose blocks :func:`qblock.llm.find_blocks` finds.
        idx: block indices to drop (0-based, as in the problem's variables).

    Returns:
        The pruned model (same class), with ``config.num_hidden_layers`` and per-layer config lists
        updated, ``layer_idx`` renumbered, and ``config.qblock_pruned`` recording what was removed.

    Raises:
        IndexError: an index out of range. ValueError: removing every block.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
        ...     bos_token_id=1, eos_token_id=2))
        >>> remove_blocks(m, [0]).config.n_layer
        2
    """
    nn = require("torch.nn", "llm")
    blocks = find_blocks(model)
    n = len(blocks)
    removed = _normalise(idx, n)
    keep = [i for i in range(n) if i not in removed]
    pruned = copy.deepcopy(model)
    stack_name, stack = _block_stack(pruned)
    kept = [stack[i] for i in keep]
    new_stack = nn.ModuleList(kept)
    if stack_name:
        parent_name, _, attr = stack_name.rpartition(".")
        setattr(pruned.get_submodule(parent_name) if parent_name else pruned, attr, new_stack)
    else:
        raise ValueError("the model itself is the block list; wrap it in a module to prune it")
    # KV caches index layers by layer_idx: renumber so kept layer j writes cache slot j
    for j, block in enumerate(kept):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = j
    for cfg in _configs(pruned):
        if getattr(cfg, "num_hidden_layers", None) != n:
            continue
        for key, value in list(vars(cfg).items()):
            if key.startswith("__") or key == "architectures":
                continue
            if isinstance(value, (list, tuple)) and len(value) == n:
                setattr(cfg, key, type(value)(value[i] for i in keep))
        cfg.num_hidden_layers = len(keep)
    labels = [blocks[i][0] for i in removed]
    pruned.config.qblock_pruned = {"removed": removed, "removed_labels": labels, "original_num_blocks": n}
    return pruned


def _drop_gguf_markers(model) -> None:
    """A GGUF-loaded model holds fp32 weights but keeps quantizer markers that block saving."""
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)).lower() == "gguf":
        from qblock.llm._hf import drop_gguf_markers

        drop_gguf_markers(model)


def check_reloadable(model, out_dir: str | os.PathLike, shown: str | os.PathLike | None = None) -> None:
    """Rebuild the saved config's model on the meta device and compare parameter names and shapes.

    Catches configs whose layer structure depends on the layer index in ways a block list cannot
    express (e.g. MoE layers every k-th block), without loading any weights. ``shown``: the folder
    the message names (default ``out_dir``; :func:`save_pruned` checks its staging folder).
    """
    torch = require("torch", "llm")
    transformers = require("transformers", "llm")
    cfg = transformers.AutoConfig.from_pretrained(out_dir)
    with torch.device("meta"):
        fresh = transformers.AutoModelForCausalLM.from_config(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or extra or shapes:
        raise ValueError(
            f"the pruned model for {shown or out_dir} would not reload cleanly: its config rebuilds a different "
            f"architecture (missing {missing[:3]}, unexpected {extra[:3]}, shape mismatch {shapes[:3]}); this model "
            f"family ties layer structure to the layer index"
        )


def save_pruned(model, tokenizer, idx: Iterable[int], out_dir: str | os.PathLike, check: bool = True,
                provenance: dict[str, Any] | None = None, quiet: bool = False) -> Path:
    """Prune ``model`` (a copy) and save it with its tokenizer as a Hugging Face model directory.

    Args:
        model: the model.
        tokenizer: its tokenizer (saved alongside), or ``None``.
        idx: block indices to drop.
        out_dir: output directory (created); a failed save or reload check leaves nothing there
            (:func:`save_model_folder`).
        check: rebuild the saved config on the meta device to confirm it reloads (no weights loaded).
        provenance: what the model is (e.g. :func:`qblock.llm.models.model_provenance` of its spec), recorded
            as ``"model"`` in ``qblock_pruned.json``; ``qblock heal`` takes its default teacher from there.
        quiet: no progress bar from transformers while writing.

    Returns:
        ``Path(out_dir)``; it reloads with ``AutoModelForCausalLM.from_pretrained(out_dir)``.

    Example:
        >>> import tempfile
        >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save_pruned(m, None, [0], d)
        ...     AutoModelForCausalLM.from_pretrained(d).config.num_hidden_layers
        2
    """
    out = Path(out_dir)
    pruned = remove_blocks(model, idx)
    info = dict(pruned.config.qblock_pruned)
    info["source"] = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    if provenance is not None:
        info["model"] = dict(provenance)

    def finish(folder: Path) -> None:
        (folder / "qblock_pruned.json").write_text(json.dumps(info, indent=2) + "\n")
        if check:  # before the files reach out: a model that would not reload is never left there
            check_reloadable(pruned, folder, shown=out)

    return save_model_folder(pruned, tokenizer, out, finish, quiet=quiet)


def save_model_folder(model, tokenizer, out_dir: str | os.PathLike, finish: Callable[[Path], None] | None = None,
                      quiet: bool = True) -> Path:
    """Save ``model`` (Hugging Face format), its tokenizer and what ``finish(folder)`` adds, all or nothing.

    The one way qblock writes a model folder (``prune``, ``heal``, ``svd``): everything goes into a staging
    folder (:func:`qblock._io.staged_folder`) and reaches ``out_dir`` only if the save and ``finish``
    (extra files, checks) succeed, so a failure leaves neither a half-written model nor a new ``out_dir``,
    and the files of an existing one untouched. A model loaded from GGUF loses its quantizer markers
    first (its weights are fp32 already; transformers refuses to save it with them).

    Args:
        model: the model to save.
        tokenizer: saved alongside, or ``None``.
        out_dir: the output folder (created).
        finish: called with the staging folder after the model is written; its error aborts the save.
        quiet: no progress bar from transformers while writing.

    Returns:
        ``Path(out_dir)``.
    """
    from qblock._io import staged_folder
    from qblock.llm._hf import _no_bars, _transformers

    _drop_gguf_markers(model)
    with staged_folder(out_dir, stale=_old_weights) as folder:
        with _no_bars(_transformers(), quiet):
            model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if finish is not None:
            finish(folder)
    return Path(out_dir)


def _old_weights(f: Path) -> bool:
    """A weight file an earlier model left in ``out`` (an ``--overwrite`` target) that this save did not write.

    ``save_pretrained`` removes them itself only in the folder it writes, here the staging folder; left in
    ``out``, an old shard index would make transformers load the old shards beside the new weights.
    """
    weights = f.name.startswith(("model", "pytorch_model")) and f.name.endswith((".safetensors", ".bin", ".json"))
    return weights and f.is_file()
