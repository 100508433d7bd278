"""The LLM side of qblock: block gates, per-sample gate gradients, energy models and export.

Importing this package imports torch (``import qblock`` alone does not). The pieces:

* :func:`find_blocks`, :func:`block_labels`, :func:`mask_blocks` - the decoder blocks, found by
  structure, and reversible block removal;
* :func:`gated` - scalar gates (``layer`` or ``branch`` mode, per block or per residual branch);
* :func:`gate_gradients` - the ``(m, N)`` matrix ``A[s, i] = d l_s / d a_i`` with one batched backward
  per batch;
* :func:`extract` - ``A`` then an energy model, giving a :class:`qblock.BlockRemovalProblem`;
* :func:`remove_blocks` / :func:`save_pruned` - a pruned copy of the model without the chosen blocks;
* :func:`load_model` / :func:`load_default_model` - model loading (:mod:`qblock.llm.models`).

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from qblock.llm import extract
    >>> torch.manual_seed(0) and None
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2))
    >>> samples = [torch.randint(0, 64, (12,)) for _ in range(6)]
    >>> p = extract(m, samples, num_remove=1, progress=False)
    >>> p.num_blocks, p.labels[0], p.metadata["energy"]
    (4, 'model.layers.0', 'fisher')
"""

from __future__ import annotations

from typing import Any

from qblock._lazy import require

require("torch", "llm")

from qblock.llm.blocks import find_blocks  # noqa: E402
from qblock.llm.gates import block_labels, gate_sites, gated, mask_blocks  # noqa: E402

__all__ = [
    "find_blocks",
    "block_labels",
    "mask_blocks",
    "gated",
    "gate_sites",
    "gate_gradients",
    "gate_gradients_reference",
    "extract",
    "build_problem",
    "ENERGY_MODELS",
    "remove_blocks",
    "save_pruned",
    "load_model",
    "load_default_model",
    "extract_problem",
    "calibration_and_eval",
    "load_benchmark",
]

_LAZY = {
    "gate_gradients": "qblock.llm.gradients",
    "gate_gradients_reference": "qblock.llm.gradients",
    "extract": "qblock.llm.energy",
    "build_problem": "qblock.llm.energy",
    "ENERGY_MODELS": "qblock.llm.energy",
    "fisher_problem": "qblock.llm.energy",
    "fisher_grad_problem": "qblock.llm.energy",
    "pairwise_problem": "qblock.llm.energy",
    "remove_blocks": "qblock.llm.export",
    "save_pruned": "qblock.llm.export",
    "load_model": "qblock.llm.models",
    "load_default_model": "qblock.llm.models",
    "extract_problem": "qblock.llm.pipeline",
    "calibration_and_eval": "qblock.llm.data",
    "load_benchmark": "qblock.llm.data",
}


def __getattr__(name: str) -> Any:
    # submodules are imported on first use: models (written separately) pulls in data/caching code
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qblock.llm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
