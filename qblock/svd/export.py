"""Write a compressed model and read its factorised form back.

:func:`export` writes a Hugging Face directory holding

* the model with every decoder linear replaced by its dense rank-``r`` reconstruction (loads with
  ``AutoModelForCausalLM.from_pretrained``);
* ``lowrank.safetensors``: the PivGa gauge-fixed factors, per matrix ``<name>.pivots`` (``r`` row
  indices), ``<name>.C`` (``(m - r) x r``) and ``<name>.B`` (``r x n``): ``r (m + n) - r^2`` numbers;
* ``svd.json``: ranks, parameter counts before and after, the method and the data.

The dense weights are computed from the very factors that are stored, so :func:`load_lowrank`, which
rebuilds the model with :class:`PivGaLinear` layers (two thin matmuls each), gives the same logits
up to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from qblock.svd.factors import Factorisation, find_linears, pivga, pivga_count, pivga_weight

__all__ = ["PivGaLinear", "apply_ranks", "export", "load_lowrank", "LOWRANK_FILE", "INFO_FILE"]

LOWRANK_FILE = "lowrank.safetensors"
INFO_FILE = "svd.json"


def _nn():
    from qblock._lazy import require

    return require("torch.nn", "llm")


def _layer_class():
    nn = _nn()
    import torch

    class PivGaLinear(nn.Module):
        """``y = x W^T + b`` with ``W`` held as gauge-fixed factors: rows ``P`` of ``W`` are ``B``, the others ``C B``."""

        def __init__(self, pivots, C, B, bias=None) -> None:
            super().__init__()
            m = int(pivots.numel() + C.shape[0])
            self.in_features, self.out_features = int(B.shape[1]), m
            rest = sorted(set(range(m)) - set(pivots.tolist()))
            self.register_buffer("pivots", pivots.long().clone())
            self.register_buffer("rest", torch.as_tensor(rest, dtype=torch.long))
            self.C = nn.Parameter(C.clone())
            self.B = nn.Parameter(B.clone())
            self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

        def forward(self, x):
            z = x @ self.B.T
            out = x.new_zeros(x.shape[:-1] + (self.out_features,))
            out[..., self.pivots] = z
            out[..., self.rest] = z @ self.C.T
            return out if self.bias is None else out + self.bias

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.B.shape[0]}"

    return PivGaLinear


def __getattr__(name: str):
    if name == "PivGaLinear":
        return _layer_class()
    raise AttributeError(name)


def apply_ranks(model, fs: Sequence[Factorisation], ranks: Sequence[int]) -> dict[str, Any]:
    """Set every decoder linear to its rank-``r`` weight, computed from its fp32 PivGa factors.

    Returns:
        ``{name: (pivots, C, B)}`` (float32 factors) for :func:`export`.
    """
    import torch

    mods = dict(find_linears(model))
    factors = {}
    with torch.no_grad():
        for f, r in zip(fs, ranks):
            r = int(r)
            if not 0 <= r <= f.rank:
                raise ValueError(f"rank {r} of {f.name} is outside 0 .. {f.rank}")
            P, C, B = pivga(f.U[:, :r] * f.s[:r], f.B[:r])
            C, B = C.float().contiguous(), B.float().contiguous()
            mod = mods[f.name]
            W = pivga_weight(P, C.double(), B.double(), f.shape[0])
            mod.weight.copy_(W.to(mod.weight.dtype))
            factors[f.name] = (P, C, B)
    return factors


def export(model, tokenizer, fs: Sequence[Factorisation], ranks: Sequence[int], out: str | Path,
           info: dict[str, Any], quiet: bool = False) -> Path:
    """Apply ``ranks`` and write the dense model, ``lowrank.safetensors`` and ``svd.json`` to ``out``
    (``quiet``: no progress bar from transformers while writing); a failure leaves nothing there
    (:func:`qblock.llm.export.save_model_folder`)."""
    from safetensors.torch import save_file

    from qblock.llm.export import save_model_folder

    out = Path(out)
    factors = apply_ranks(model, fs, ranks)
    tensors = {}
    for name, (P, C, B) in factors.items():
        tensors[f"{name}.pivots"], tensors[f"{name}.C"], tensors[f"{name}.B"] = P, C, B
    before = sum(m * n for m, n in (f.shape for f in fs))
    after = sum(pivga_count(int(r), *f.shape) for f, r in zip(fs, ranks))
    record = {
        **info,
        "matrices": [{"name": f.name, "shape": list(f.shape), "rank": int(r), "max_rank": f.rank,
                      "stored": pivga_count(int(r), *f.shape)} for f, r in zip(fs, ranks)],
        "parameters_before": before,
        "parameters_after": after,
        "kept_fraction": after / before,
        "stored_factor_numbers": int(sum(C.numel() + B.numel() for _, C, B in factors.values())),
    }

    def finish(folder: Path) -> None:
        save_file(tensors, str(folder / LOWRANK_FILE))
        (folder / INFO_FILE).write_text(json.dumps(record, indent=1) + "\n")

    return save_model_folder(model, tokenizer, out, finish, quiet=quiet)


def load_lowrank(path: str | Path, dtype: Any = None):
    """The factorised model of an :func:`export` directory: each compressed linear a :class:`PivGaLinear`.

    Raises:
        FileNotFoundError: ``path`` has no ``lowrank.safetensors``.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / LOWRANK_FILE).exists():
        raise FileNotFoundError(f"{path} has no {LOWRANK_FILE}; write one with `qblock svd --out DIR`")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    tensors = load_file(str(path / LOWRANK_FILE))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    layer = _layer_class()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        C, B = tensors[f"{name}.C"].to(old.weight.dtype), tensors[f"{name}.B"].to(old.weight.dtype)
        setattr(parent, child, layer(tensors[f"{name}.pivots"], C, B, old.bias))
    return model.eval()
