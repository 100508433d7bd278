"""Healing a pruned model: token-level distillation from the unpruned model, resumable.

A depth-pruned model is retrained briefly so that its next-token distributions match the
unpruned model's (the *teacher*): the loss is ``KL(teacher || student)`` per predicted token,
optionally plus ``ce_weight`` times the usual next-token cross-entropy. Three ways to train:

* ``full``: every parameter (the default for models up to 1.5B parameters);
* ``lora``: low-rank adapters on every linear layer of the blocks (``peft``, the ``heal`` extra),
  merged into the weights when the model is saved;
* ``last``: the last ``last_layers`` blocks, the final norm and the output head only. Gradients stop
  below those blocks (the input embeddings' output is detached), so a step costs little more than a
  forward pass. Where the output head is tied to the input embeddings (SmolLM2), training the head
  changes the embeddings too.

AdamW with linear warmup and cosine decay to ``min_lr_ratio`` of the peak, gradient-norm clipping,
a budget in tokens (or steps) over seeded packed samples, cycled in seeded epochs when the text is
shorter than the budget. A checkpoint (trainable weights, optimizer moments, the RNG state and the
step, which fixes the data position and the learning rate) lets an interrupted run resume and reach
the same weights as an uninterrupted one. Checkpoints are safetensors files plus a JSON manifest,
never pickle.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from qblock.llm.export import remove_blocks
    >>> torch.manual_seed(0) and None
    >>> teacher = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2)).eval()
    >>> student = remove_blocks(teacher, [1, 2])
    >>> data = [torch.randint(0, 40, (16,)) for _ in range(8)]
    >>> before = compare_to_teacher(student, teacher, data)["kl"]
    >>> res = heal(student, teacher, data, HealSettings(steps=20, batch_size=4, lr=3e-3), progress=False)
    >>> res.steps, res.tokens, compare_to_teacher(res.model, teacher, data)["kl"] < before
    (20, 1280, True)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from qblock._lazy import require

__all__ = [
    "HealError",
    "HealSettings",
    "HealResult",
    "MODES",
    "DEFAULT_TOKENS",
    "resolve_mode",
    "lr_at",
    "distill_loss",
    "compare_to_teacher",
    "heal_data",
    "heal",
    "recorded_teacher",
    "save_healed",
    "tokens_sha256",
]

MODES = ("full", "lora", "last")
#: default budget of ``qblock heal``: 32 steps of 4 x 256 tokens. The 135M default model and its teacher
#: took about 18 s a step on one core of a shared 2-core machine (load average 3-4), so the default run
#: with its held-out evaluations fits in 15 minutes there (README "Healing")
DEFAULT_TOKENS = 32 * 4 * 256
#: above this many parameters ``mode="auto"`` uses LoRA instead of full fine-tuning
FULL_MAX_PARAMS = 1_500_000_000
#: peak learning rates per mode (AdamW), used when ``HealSettings.lr`` is None
DEFAULT_LR = {"full": 3e-4, "lora": 1e-3, "last": 5e-4}
CHECKPOINT_DIR = "checkpoint"
_STATE = "state.json"
_FORMAT = "qblock.heal.checkpoint"


class HealError(ValueError):
    """A healing input or state the user must fix (one-line message)."""


@dataclass
class HealSettings:
    """How a pruned model is healed.

    Attributes:
        mode: ``"auto"`` (full fine-tuning up to 1.5B parameters, else LoRA), ``"full"``, ``"lora"``
            or ``"last"`` (the last ``last_layers`` blocks, final norm and output head).
        tokens: training budget in tokens (rounded up to whole steps); ignored when ``steps`` is set.
        steps: training budget in optimizer steps (each ``batch_size`` x ``seq_len`` tokens).
        batch_size: samples per step.
        micro_batch_size: samples per forward pass (gradients are accumulated over the step's batch): one
            sample of 256 tokens keeps the 135M default model's logits at 50 MB a tensor.
        seq_len: tokens per sample.
        lr: peak learning rate; ``None``: :data:`DEFAULT_LR` of the mode.
        warmup: fraction of the steps with a linear warmup from ``lr / warmup_steps``.
        min_lr_ratio: the cosine decay ends at ``lr * min_lr_ratio``.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        clip: gradient-norm clipping threshold (``0`` for none).
        ce_weight: weight of the next-token cross-entropy added to the KL term.
        temperature: distillation temperature (the KL is scaled by its square, as usual).
        last_layers: blocks trained in ``"last"`` mode.
        lora_rank, lora_alpha, lora_dropout: LoRA settings (``"lora"`` mode).
        seed: seeds the data order, LoRA initialisation and dropout.
    """

    mode: str = "auto"
    tokens: int = DEFAULT_TOKENS
    steps: int | None = None
    batch_size: int = 4
    micro_batch_size: int = 1
    seq_len: int = 256
    lr: float | None = None
    warmup: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    last_layers: int = 2
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    seed: int = 0

    def num_steps(self) -> int:
        """Optimizer steps of the budget: ``steps``, or ``ceil(tokens / (batch_size * seq_len))``.

        Example:
            >>> HealSettings(tokens=1000, batch_size=2, seq_len=256).num_steps()
            2
        """
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(int(self.tokens) / (self.batch_size * self.seq_len)))

    def check(self) -> None:
        """Raise :class:`HealError` on a setting that cannot work (one line naming it)."""
        if self.mode not in ("auto", *MODES):
            raise HealError(f"mode must be auto, {', '.join(MODES)}; got {self.mode!r}")
        # NaN passes every `v < 0` test below and inf every `v > 0` one: refuse both, for every number
        for name, v in asdict(self).items():
            if isinstance(v, float) and not math.isfinite(v):
                raise HealError(f"{name} must be a finite number, got {v}")
        positive = {"batch_size": self.batch_size, "micro_batch_size": self.micro_batch_size,
                    "last_layers": self.last_layers, "lora_rank": self.lora_rank,
                    "temperature": self.temperature}
        if self.steps is not None:
            positive["steps"] = self.steps
        else:
            positive["tokens"] = self.tokens
        for name, v in positive.items():
            if not v > 0:
                raise HealError(f"{name} must be positive, got {v}")
        if self.seq_len < 2:
            raise HealError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.lr is not None and not self.lr > 0:
            raise HealError(f"lr must be positive, got {self.lr}")
        for name, v in (("warmup", self.warmup), ("min_lr_ratio", self.min_lr_ratio),
                        ("lora_dropout", self.lora_dropout)):
            if not 0 <= v <= 1:
                raise HealError(f"{name} must be between 0 and 1, got {v}")
        for name, v in (("weight_decay", self.weight_decay), ("clip", self.clip), ("ce_weight", self.ce_weight)):
            if v < 0:
                raise HealError(f"{name} must be >= 0, got {v}")


@dataclass
class HealResult:
    """What :func:`heal` did.

    Attributes:
        model: the healed model (a plain ``...ForCausalLM``; LoRA merged), in eval mode.
        mode: the mode used.
        lr: the peak learning rate used.
        steps, tokens: optimizer steps and training tokens of the whole run (resumed parts included).
        history: one record per step: ``step``, ``tokens``, ``loss``, ``kl``, ``ce``, ``lr``, ``grad_norm``.
        evals: held-out evaluations: ``step``, ``tokens`` (trained so far), ``heldout_loss``, ``teacher_loss``,
            ``kl``, ``eval_tokens`` (predicted tokens evaluated) and ``seconds``.
        resumed_from: the steps at which this run (or an earlier one) resumed from a checkpoint.
        seconds: wall time of this call's training loop (evaluations during it included, each also in ``evals``).
        trainable_params: parameters trained.
    """

    model: Any
    mode: str
    lr: float
    steps: int
    tokens: int
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)
    seconds: float = 0.0
    trainable_params: int = 0


def _torch():
    return require("torch", "llm")


def _log(msg: str, on: bool = True) -> None:
    if on:
        print(f"qblock: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- settings
def resolve_mode(mode: str, num_params: int) -> str:
    """``"auto"`` -> ``"full"`` up to :data:`FULL_MAX_PARAMS` parameters, else ``"lora"``.

    Example:
        >>> resolve_mode("auto", 135_000_000), resolve_mode("auto", 7_000_000_000), resolve_mode("last", 1)
        ('full', 'lora', 'last')
    """
    if mode == "auto":
        return "full" if num_params <= FULL_MAX_PARAMS else "lora"
    if mode not in MODES:
        raise HealError(f"mode must be auto, {', '.join(MODES)}; got {mode!r}")
    return mode


def lr_at(step: int, steps: int, peak: float, warmup: float = 0.1, min_ratio: float = 0.1) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to ``peak * min_ratio``.

    A pure function of the step, so a resumed run needs no scheduler state beyond the step.

    Example:
        >>> [round(lr_at(k, 10, 1.0, warmup=0.2), 3) for k in (0, 1, 2, 9)]
        [0.5, 1.0, 1.0, 0.1]
    """
    n_warm = int(round(warmup * steps))
    if step < n_warm:
        return peak * (step + 1) / n_warm
    span = max(1, steps - n_warm - 1)
    progress = min(1.0, (step - n_warm) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------- losses
def distill_loss(student_logits, teacher_logits, targets=None, *, ce_weight: float = 0.0, temperature: float = 1.0):
    """``(loss, kl, ce)``: mean ``KL(teacher || student)`` per token (times ``T^2``) plus ``ce_weight * CE``.

    Args:
        student_logits, teacher_logits: ``(..., V)`` logits at the same positions.
        targets: next-token ids at those positions (needed when ``ce_weight > 0``; ``ce`` is ``None`` without).
        ce_weight: weight of the cross-entropy term.
        temperature: softens both distributions.

    Example:
        >>> import torch
        >>> t = torch.tensor([[2.0, 0.0, -1.0]])
        >>> loss, kl, ce = distill_loss(t.clone(), t)
        >>> round(float(kl), 6), ce is None
        (0.0, True)
    """
    torch = _torch()
    F = torch.nn.functional
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v).float()
    t = teacher_logits.reshape(-1, v).float()
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    # kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q): KL(teacher || student)
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    kl = kl * temperature ** 2
    ce = None
    if targets is not None:
        ce = F.cross_entropy(student_logits.reshape(-1, v).float(), targets.reshape(-1))
    loss = kl + ce_weight * ce if ce_weight and ce is not None else kl
    return loss, kl, ce


def compare_to_teacher(student, teacher, samples: Sequence[Any], *, batch_size: int = 2) -> dict[str, float]:
    """Held-out next-token NLL of student and teacher and ``KL(teacher || student)``, token-weighted.

    Every sample of length ``L`` contributes its ``L - 1`` predicted tokens (as
    :func:`qblock.validate.evaluate.heldout_loss` counts them).

    Returns:
        ``{"heldout_loss", "teacher_loss", "kl", "tokens"}``.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> m = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=16, n_layer=2, n_head=2)).eval()
        >>> r = compare_to_teacher(m, m, [torch.arange(10), torch.arange(6)])
        >>> r["tokens"], abs(r["kl"]) < 1e-6, r["heldout_loss"] == r["teacher_loss"]
        (14, True, True)
    """
    torch = _torch()
    F = torch.nn.functional
    from qblock.validate.evaluate import model_device

    samples = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in samples if len(s) >= 2]
    if not samples:
        raise HealError("comparing to the teacher needs samples of at least two tokens")
    dev_s, dev_t = model_device(student), model_device(teacher)
    was = student.training
    student.eval()
    sums = {"heldout_loss": 0.0, "teacher_loss": 0.0, "kl": 0.0}
    count = 0
    try:
        with torch.inference_mode():
            for k in range(0, len(samples), batch_size):
                chunk = samples[k:k + batch_size]
                for ids in _same_length_groups(chunk):
                    s = student(input_ids=ids.to(dev_s), use_cache=False).logits[:, :-1].float()
                    t = teacher(input_ids=ids.to(dev_t), use_cache=False).logits[:, :-1].float().to(s.device)
                    tgt = ids[:, 1:].reshape(-1).to(s.device)
                    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
                    sums["heldout_loss"] += float(F.cross_entropy(s, tgt, reduction="sum"))
                    sums["teacher_loss"] += float(F.cross_entropy(t, tgt, reduction="sum"))
                    sums["kl"] += float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                                                 reduction="sum"))
                    count += int(tgt.numel())
    finally:
        student.train(was)
    return {**{k: v / count for k, v in sums.items()}, "tokens": count}


def _same_length_groups(chunk):
    """Stack samples of equal length (packed samples all are); ragged ones go one by one (no padding)."""
    torch = _torch()
    by_len: dict[int, list] = {}
    for s in chunk:
        by_len.setdefault(int(s.numel()), []).append(s)
    for group in by_len.values():
        yield torch.stack(group)


# ------------------------------------------------------------------------------------------- data
def tokens_sha256(samples: Iterable[Any]) -> str:
    """Hash of token-id samples (identifies the training data in a checkpoint)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(np.asarray(s.cpu().numpy() if hasattr(s, "cpu") else s, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def heal_data(tokenizer, source: str | os.PathLike | None = None, *, num_samples: int, seq_len: int,
              seed: int = 0, eval_samples: int = 0, eval_seq_len: int | None = None,
              exclude: Iterable[int] = ()):
    """Training samples for healing and a held-out split on disjoint passages.

    The passages are shuffled with ``seed`` exactly as :func:`qblock.llm.data.calibration_and_eval`
    does; the held-out samples are packed from the back of that order (``eval_samples`` x
    ``eval_seq_len``: with the defaults of ``qblock run``, 32 x 256 at seed 0, the same passages its
    held-out split uses, and a superset of ``--quick``'s 12 x 128), the training samples from the
    front, skipping those passages and ``exclude``. Both are packed as calibration samples are (BOS
    first where the tokenizer's encoding starts with it). If the text holds fewer than ``num_samples``
    training samples, all there are are returned (training then cycles through them).

    Returns:
        ``(train, held_out, provenance)``.

    Raises:
        HealError: not even one training sample of ``seq_len`` tokens.

    Example:
        >>> class Tok:
        ...     eos_token_id = 0
        ...     def __call__(self, text, add_special_tokens=False):
        ...         return {"input_ids": [len(w) for w in text.split()]}
        >>> texts = ["a bb ccc dddd", "e ff ggg", "hh i jj", "kkk l m"]
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "t.txt"); _ = open(f, "w").write("\\n\\n".join(texts))
        >>> train, held, prov = heal_data(Tok(), f, num_samples=9, seq_len=3, eval_samples=1)
        >>> len(held), len(train), set(prov["train"]["passages"]) & set(prov["held_out"]["passages"])
        (1, 4, set())
    """
    from qblock.llm import data as qdata

    texts, prov = qdata.load_texts(source)
    perm = np.random.default_rng(seed).permutation(len(texts))
    eval_seq_len = int(eval_seq_len or seq_len)
    try:
        held, held_used = qdata._pack(tokenizer, texts, perm[::-1], int(eval_samples), eval_seq_len)
    except qdata.DataError as exc:
        raise HealError(f"held-out split: {exc}") from None
    skip = set(held_used) | {int(i) for i in exclude}
    front = [int(i) for i in perm if int(i) not in skip]
    try:  # packed as calibration samples are (BOS first where the tokenizer adds one), as many as there are
        chunks, used = qdata._pack(tokenizer, texts, front, int(num_samples), int(seq_len), fewer=True)
    except qdata.DataError as exc:
        raise HealError(f"training samples: {exc}") from None
    n = len(chunks)
    if n < 1:
        raise HealError(f"not enough text for one training sample of {seq_len} tokens after reserving "
                        f"{len(skip)} held-out passages; use --seq-len smaller or more text")
    train = qdata._to_tensors(chunks)
    out = {k: v for k, v in prov.items()}
    out.update({
        "seed": int(seed),
        "packing": "shuffled passages joined by eos, cut into seq_len-token samples; training from the front of "
                   "the permutation, held-out from the back (as qblock run splits calibration and held-out text)"
                   + ("; each sample starts with the tokenizer's BOS token" if qdata._bos_prefix(tokenizer) else ""),
        "train": {"num_samples": n, "seq_len": int(seq_len), "num_tokens": n * int(seq_len),
                  "num_passages": len(used), "passages": sorted(used), "tokens_sha256": tokens_sha256(train)},
        "held_out": {"num_samples": len(held), "seq_len": eval_seq_len, "num_passages": len(held_used),
                     "passages": sorted(int(i) for i in held_used)},
        "excluded_passages": len({int(i) for i in exclude}),
        "disjoint": True,
    })
    return train, qdata._to_tensors(held), out


def _sample_order(n: int, total: int, seed: int) -> np.ndarray:
    """``total`` sample indices: seeded permutations of ``0..n-1`` back to back (one per epoch)."""
    rng = np.random.default_rng([int(seed), 7])
    parts, have = [], 0
    while have < total:
        parts.append(rng.permutation(n))
        have += n
    return np.concatenate(parts)[:total]


# ------------------------------------------------------------------------------------------- the student
@dataclass
class _Trainable:
    model: Any                      # what is run (a peft wrapper in LoRA mode)
    params: list[tuple[str, Any]]   # trainable (name, parameter), in a fixed order
    finish: Callable[[], Any]       # -> the plain model to save (LoRA merged, hooks removed)
    undo: Callable[[], None]        # after a failure: hooks removed, LoRA unloaded unmerged


def _prepare(student, mode: str, settings: HealSettings) -> _Trainable:
    if mode == "lora":
        return _prepare_lora(student, settings)
    for p in student.parameters():
        p.requires_grad_(mode == "full")
    hooks = []
    if mode == "last":
        from qblock.llm.blocks import find_blocks

        blocks = find_blocks(student)
        k = min(int(settings.last_layers), len(blocks))
        train = [mod for _, mod in blocks[len(blocks) - k:]]
        head = student.get_output_embeddings()
        if head is not None:
            train.append(head)
        train += _final_norms(student, blocks)
        for mod in train:
            for p in mod.parameters():
                p.requires_grad_(True)
        emb = student.get_input_embeddings()
        if emb is not None:
            # a tied head makes the input embeddings trainable too; detaching their output keeps the
            # backward pass from running through every frozen block below the trained ones
            hooks.append(emb.register_forward_hook(lambda mod, args, out: out.detach()))
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]

    def undo():
        for h in hooks:
            h.remove()

    def finish():
        undo()
        for p in student.parameters():
            p.requires_grad_(False)
        return student

    return _Trainable(student, params, finish, undo)


def _final_norms(model, blocks) -> list[Any]:
    """Norm modules applied after the last block (``model.norm``, GPT-2's ``ln_f``)."""
    inside = {id(m) for _, b in blocks for m in b.modules()}
    out = []
    for name, mod in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if id(mod) not in inside and last in ("norm", "ln_f", "final_layer_norm", "final_layernorm") \
                and any(True for _ in mod.parameters()):
            out.append(mod)
    return out


def _prepare_lora(student, settings: HealSettings) -> _Trainable:
    peft = require("peft", "heal")
    for p in student.parameters():
        p.requires_grad_(False)
    cfg = peft.LoraConfig(r=int(settings.lora_rank), lora_alpha=float(settings.lora_alpha),
                          lora_dropout=float(settings.lora_dropout), target_modules="all-linear",
                          task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(student, cfg)
    params = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]

    def finish():
        merged = wrapped.merge_and_unload()
        for p in merged.parameters():
            p.requires_grad_(False)
        return merged

    return _Trainable(wrapped, params, finish, lambda: wrapped.unload())


# ------------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(ckpt: Path, step: int, tr: _Trainable, opt, rng_state, meta: dict[str, Any]) -> None:
    """Write the step's tensors, then the manifest that names them (the commit point), then prune."""
    torch = _torch()
    from safetensors.torch import save_file

    from qblock._io import atomic_write_bytes

    ckpt.mkdir(parents=True, exist_ok=True)
    weights = {n: p.detach().contiguous().cpu() for n, p in tr.params}
    state = opt.state_dict()["state"]
    moments = {}
    for i, (n, _) in enumerate(tr.params):
        for key, v in state.get(i, {}).items():
            if torch.is_tensor(v):
                moments[f"{n}::{key}"] = v.detach().contiguous().cpu()
    moments["__rng__"] = rng_state.contiguous().cpu()
    tag = f"{step:08d}"
    for stem, tensors in (("weights", weights), ("optimizer", moments)):
        tmp = ckpt / f".{stem}-{tag}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, ckpt / f"{stem}-{tag}.safetensors")
    atomic_write_bytes(ckpt / _STATE, (json.dumps({**meta, "format": _FORMAT, "step": step, "tag": tag},
                                                  indent=1) + "\n").encode())
    for f in ckpt.glob("*.safetensors"):
        if not f.name.endswith(f"-{tag}.safetensors"):
            f.unlink()


def read_checkpoint_state(ckpt: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a checkpoint folder, or ``None`` if there is none; a damaged one is a :class:`HealError`."""
    path = Path(ckpt) / _STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        raise HealError(f"checkpoint {path} is unreadable; delete {Path(ckpt)} (or pass --overwrite) to start over") \
            from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise HealError(f"{path} is not a qblock heal checkpoint; delete it or pass --overwrite")
    return state


def _differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{prefix}{k}: {_short(a)} (checkpoint) vs {_short(b)} (now)")
    return out


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 50 else s[:47] + "..."


def _load_checkpoint(ckpt: Path, state: dict[str, Any], tr: _Trainable, opt) -> Any:
    """Restore weights and optimizer moments in place; return the saved RNG state."""
    torch = _torch()
    from safetensors.torch import load_file

    tag = state["tag"]
    try:
        weights = load_file(str(ckpt / f"weights-{tag}.safetensors"))
        moments = load_file(str(ckpt / f"optimizer-{tag}.safetensors"))
    except (OSError, ValueError, RuntimeError) as exc:
        raise HealError(f"checkpoint in {ckpt} is damaged ({str(exc).splitlines()[0][:120]}); delete it or pass "
                        "--overwrite to start over") from None
    names = [n for n, _ in tr.params]
    if sorted(weights) != sorted(names):
        raise HealError(f"checkpoint in {ckpt} trains other parameters than this run; pass --overwrite to start over")
    with torch.no_grad():
        for n, p in tr.params:
            p.copy_(weights[n].to(p.device, p.dtype))
    sd = opt.state_dict()
    sd["state"] = {}
    for i, n in enumerate(names):
        entry = {key.split("::", 1)[1]: v for key, v in moments.items() if key.split("::", 1)[0] == n}
        if entry:
            sd["state"][i] = entry
    opt.load_state_dict(sd)
    return moments["__rng__"]


# ------------------------------------------------------------------------------------------- training
def heal(student, teacher, samples: Sequence[Any], settings: HealSettings | None = None, *,
         checkpoint_dir: str | os.PathLike | None = None, fingerprint: dict[str, Any] | None = None,
         checkpoint_every: int = 0, checkpoint_seconds: float = 300.0, eval_samples: Sequence[Any] = (),
         eval_every: int = 0, eval_batch_size: int = 2, progress: bool = True,
         on_step: Callable[[int, dict[str, Any]], None] | None = None) -> HealResult:
    """Distil ``teacher`` into ``student`` on ``samples``; resumable through ``checkpoint_dir``.

    Args:
        student: the pruned model (trained in place; in LoRA mode wrapped, then merged).
        teacher: the unpruned model (frozen; left as it was given).
        samples: training token-id tensors of ``settings.seq_len`` tokens (cycled in seeded epochs).
        settings: :class:`HealSettings` (default: the defaults).
        checkpoint_dir: where to checkpoint; a checkpoint already there is resumed when its
            ``fingerprint``, data and settings equal this call's (else :class:`HealError` lists the differences).
        fingerprint: JSON-ready identity of the inputs (models, data), stored with the checkpoint.
        checkpoint_every: also checkpoint every this many steps (0: only by time).
        checkpoint_seconds: checkpoint when this long has passed since the last one.
        eval_samples: held-out samples; evaluated before training, every ``eval_every`` steps and at the end.
        eval_every: steps between held-out evaluations (0: only before and after).
        eval_batch_size: batch size of those evaluations.
        progress: a progress bar (running loss, tokens, ETA) and messages on stderr.
        on_step: called as ``on_step(step, record)`` after every completed step (and its checkpoint).

    A ``KeyboardInterrupt`` between steps saves a checkpoint of the steps completed before it is
    re-raised; any other exception leaves the last periodic checkpoint. Either way the student is
    handed back without hooks or LoRA adapters (unmerged: its weights as given), with its
    ``requires_grad`` flags and train/eval mode as they were; in ``full`` and ``last`` mode its weights
    keep the completed steps' updates. Resuming restores the
    trainable weights, AdamW's moments, the RNG state and the step (which fixes the data position and
    the learning rate), so on CPU the final weights equal an uninterrupted run's.

    Returns:
        :class:`HealResult`. The checkpoint folder is left in place; delete it once the model is saved.
    """
    run = _Run(student, teacher, samples, settings or HealSettings(), checkpoint_dir, fingerprint)
    run.checkpoint_every, run.checkpoint_seconds = int(checkpoint_every), float(checkpoint_seconds)
    run.eval_samples, run.eval_every, run.eval_batch_size = list(eval_samples), int(eval_every), int(eval_batch_size)
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    was_training = teacher.training
    s_flags, s_training = [(p, p.requires_grad) for p in student.parameters()], student.training
    teacher.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        return run.train(progress, on_step)
    except BaseException:  # the student is the caller's model too: no hook, adapter or flag of ours left
        run.undo()
        for p, flag in s_flags:
            p.requires_grad_(flag)
        student.train(s_training)
        raise
    finally:  # the teacher is the caller's model: leave it as it was
        for p, flag in flags:
            p.requires_grad_(flag)
        teacher.train(was_training)


class _Run:
    """One healing run: settings checked, checkpoint matched, then :meth:`train`."""

    def __init__(self, student, teacher, samples, settings: HealSettings, checkpoint_dir, fingerprint) -> None:
        torch = _torch()
        settings.check()
        if not samples:
            raise HealError("healing needs at least one training sample")
        lengths = {int(torch.as_tensor(s).numel()) for s in samples}
        if len(lengths) != 1:
            raise HealError(f"training samples must all have the same length, got lengths {sorted(lengths)[:5]}")
        self.student, self.teacher, self.samples, self.settings = student, teacher, samples, settings
        self.mode = resolve_mode(settings.mode, sum(p.numel() for p in student.parameters()))
        self.peak = float(settings.lr if settings.lr is not None else DEFAULT_LR[self.mode])
        self.steps = settings.num_steps()
        self.seq = lengths.pop()
        self.order = _sample_order(len(samples), self.steps * settings.batch_size, settings.seed)
        self.ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.meta = {"settings": _jsonable({**asdict(settings), "mode": self.mode, "lr": self.peak,
                                            "num_steps": self.steps, "seq_len": self.seq}),
                     "fingerprint": _jsonable(fingerprint or {}), "data_sha256": tokens_sha256(samples)}
        self.saved = read_checkpoint_state(self.ckpt) if self.ckpt is not None else None
        if self.saved is not None:
            diff = _differences({k: self.saved.get(k) for k in self.meta}, self.meta)
            if diff:
                raise HealError(f"{self.ckpt} holds a checkpoint of a different heal ({'; '.join(diff[:3])}); "
                                "pass --overwrite (or delete it) to start over")
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.resumed: list[int] = []

    # -- setup -------------------------------------------------------------------------------------
    def undo(self) -> None:
        """After a failed :meth:`train`: the student without our hooks or LoRA adapters (if prepared, not finished)."""
        tr, self.tr = getattr(self, "tr", None), None
        if tr is not None:
            tr.undo()

    def _start(self, progress: bool) -> int:
        """Trainable parameters, optimizer, and the state of a matching checkpoint; returns the first step."""
        torch = _torch()
        self.tr = _prepare(self.student, self.mode, self.settings)
        if not self.tr.params:
            raise HealError("nothing to train: no parameter requires a gradient in this mode")
        self.opt = torch.optim.AdamW([p for _, p in self.tr.params], lr=self.peak, betas=tuple(self.settings.betas),
                                     weight_decay=float(self.settings.weight_decay), eps=1e-8)
        if self.saved is None:
            if self.eval_samples:
                _log(f"held-out loss and KL of student and teacher before healing ({len(self.eval_samples)} samples)",
                     progress)
                self._evaluate(0)
            return 0
        torch.set_rng_state(_load_checkpoint(self.ckpt, self.saved, self.tr, self.opt))
        start = int(self.saved["step"])
        self.history, self.evals = list(self.saved.get("history", [])), list(self.saved.get("evals", []))
        self.resumed = list(self.saved.get("resumed_from", [])) + [start]
        _log(f"resuming the heal in {self.ckpt.parent} at step {start} of {self.steps}", progress)
        return start

    def _evaluate(self, step: int) -> None:
        t0 = time.perf_counter()
        r = compare_to_teacher(self.tr.model, self.teacher, self.eval_samples, batch_size=self.eval_batch_size)
        self.evals.append({"step": step, "tokens": step * self.settings.batch_size * self.seq,
                           "heldout_loss": r["heldout_loss"], "teacher_loss": r["teacher_loss"], "kl": r["kl"],
                           "eval_tokens": r["tokens"], "seconds": time.perf_counter() - t0})

    def _save(self, step: int, rng) -> None:
        if self.ckpt is not None:
            _save_checkpoint(self.ckpt, step, self.tr, self.opt, rng,
                             {**self.meta, "history": self.history, "evals": self.evals, "resumed_from": self.resumed})

    # -- one step ----------------------------------------------------------------------------------
    def _gradients(self, step: int) -> tuple[float, float, float | None]:
        """Accumulate the step's gradients, one micro-batch at a time (bounds the logits' memory)."""
        torch = _torch()
        from qblock.validate.evaluate import model_device

        st, bs = self.settings, int(self.settings.batch_size)
        idx = self.order[step * bs:(step + 1) * bs]
        ids = torch.stack([torch.as_tensor(self.samples[int(i)], dtype=torch.long) for i in idx])
        dev, t_dev = model_device(self.student), model_device(self.teacher)
        self.opt.zero_grad(set_to_none=True)
        sums = [0.0, 0.0, 0.0]
        micro = max(1, min(int(st.micro_batch_size), bs))
        for k in range(0, bs, micro):
            part = ids[k:k + micro]
            with torch.no_grad():
                t_logits = self.teacher(input_ids=part.to(t_dev), use_cache=False).logits[:, :-1]
            s_logits = self.tr.model(input_ids=part.to(dev), use_cache=False).logits[:, :-1]
            loss, kl, ce = distill_loss(s_logits, t_logits.to(s_logits.device), part[:, 1:].to(dev),
                                        ce_weight=st.ce_weight, temperature=st.temperature)
            del t_logits, s_logits
            share = len(part) / bs  # equal-length samples: the mean over micro-batches is the batch mean
            (loss * share).backward()
            sums = [sums[0] + float(loss.detach()) * share, sums[1] + float(kl.detach()) * share,
                    sums[2] + float(ce.detach()) * share]
        return sums[0], sums[1], (sums[2] if st.ce_weight else None)

    # -- the loop ----------------------------------------------------------------------------------
    def train(self, progress: bool, on_step) -> HealResult:
        torch = _torch()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.settings.seed))
            start = self._start(progress)
            self.tr.model.train()
            t0 = time.perf_counter()
            self._loop(start, progress, on_step)
            seconds = time.perf_counter() - t0
            self.tr.model.eval()
            if self.eval_samples:
                self._evaluate(self.steps)
            n_train = sum(p.numel() for _, p in self.tr.params)
            model = self.tr.finish()
            self.tr = None  # finished: nothing for undo() to take back
        model.eval()
        return HealResult(model=model, mode=self.mode, lr=self.peak, steps=self.steps,
                          tokens=self.steps * self.settings.batch_size * self.seq, history=self.history,
                          evals=self.evals, resumed_from=self.resumed, seconds=seconds,
                          trainable_params=n_train)

    def _loop(self, start: int, progress: bool, on_step) -> None:
        torch = _torch()
        st = self.settings
        last_save = time.perf_counter()
        bar = _bar(self.steps, start, progress)
        rng_at_step, updating, step = torch.get_rng_state(), False, start
        try:
            for step in range(start, self.steps):
                rng_at_step = torch.get_rng_state()
                lr = lr_at(step, self.steps, self.peak, st.warmup, st.min_lr_ratio)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                loss, kl, ce = self._gradients(step)
                updating = True  # an interrupt from here on leaves a half-applied step: not saved
                gn = _clip([p for _, p in self.tr.params], st.clip)
                self.opt.step()
                rec = {"step": step + 1, "tokens": (step + 1) * st.batch_size * self.seq, "loss": loss, "kl": kl,
                       "ce": ce, "lr": lr, "grad_norm": gn}
                self.history.append(rec)
                updating = False  # weights and history agree again
                if self.eval_samples and self.eval_every and (step + 1) % self.eval_every == 0 \
                        and step + 1 < self.steps:
                    self._evaluate(step + 1)
                if (self.checkpoint_every and (step + 1) % self.checkpoint_every == 0) \
                        or time.perf_counter() - last_save >= self.checkpoint_seconds:
                    self._save(step + 1, torch.get_rng_state())
                    last_save = time.perf_counter()
                if bar is not None:  # postfix first: update() redraws the line with it
                    bar.set_postfix(loss=f"{_running(self.history):.4f}", tokens=f"{rec['tokens']:,}", refresh=False)
                    bar.update(1)
                if on_step is not None:
                    on_step(step + 1, rec)
        except KeyboardInterrupt:
            done = len(self.history)
            if not updating and done > start:
                # a step that had not finished starts again from its own RNG state
                self._save(done, torch.get_rng_state() if done == step + 1 else rng_at_step)
                _log(f"interrupted at step {done} of {self.steps}; checkpoint saved: run the same command again "
                     "to resume", progress)
            raise
        finally:
            if bar is not None:
                bar.close()


def _clip(params, max_norm: float) -> float:
    torch = _torch()
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0


def _running(history: Sequence[dict[str, Any]], k: int = 10) -> float:
    tail = [h["loss"] for h in history[-k:]]
    return sum(tail) / len(tail)


def _bar(total: int, initial: int, on: bool):
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="healing", unit="step", dynamic_ncols=True)


def _jsonable(o: Any) -> Any:
    from qblock._io import json_default

    return json.loads(json.dumps(o, default=json_default))


# ------------------------------------------------------------------------------------------- files
def recorded_teacher(pruned_dir: str | os.PathLike) -> str | None:
    """The model ``qblock prune`` recorded in ``PRUNED_DIR/qblock_pruned.json`` as a ``--model`` spec.

    ``"default"`` when it was the default model (recorded by spec, or by the path of the converted
    default model in any qblock cache); a local directory or hub id otherwise; ``None`` if nothing
    usable is recorded.

    Example:
        >>> import tempfile, json, os
        >>> d = tempfile.mkdtemp()
        >>> _ = open(os.path.join(d, "qblock_pruned.json"), "w").write(json.dumps({"model": {"spec": "default"}}))
        >>> recorded_teacher(d)
        'default'
    """
    p = Path(pruned_dir) / "qblock_pruned.json"
    try:
        info = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    model = info.get("model") if isinstance(info.get("model"), dict) else {}
    local = str(model.get("source") or "")
    if local.startswith("local:"):
        return local[len("local:"):]  # the resolved path: a relative --model spec depends on the cwd
    spec = model.get("spec")
    if spec and spec != "<object>":
        return str(spec)
    src = info.get("source")
    if not isinstance(src, str) or not src:
        return None
    from qblock.llm.models import DEFAULT_MODEL_ID, default_model_dir

    sp = Path(src)
    if src == DEFAULT_MODEL_ID or (sp.name == default_model_dir().name and sp.parent.name == "models"):
        return "default"  # the converted default model, in this cache or another
    return src


def save_healed(model, tokenizer, out_dir: str | os.PathLike, info: dict[str, Any],
                pruned_info: dict[str, Any] | None = None) -> Path:
    """Save the healed model (Hugging Face directory), its tokenizer, ``qblock.json`` and ``qblock_pruned.json``.

    ``qblock.json`` is written last, so its presence means the directory is complete; a failed save
    leaves the files already in ``out_dir`` (e.g. the checkpoint) as they were
    (:func:`qblock.llm.export.save_model_folder`).
    """
    from qblock._io import atomic_write_bytes
    from qblock.llm.export import save_model_folder

    out = Path(out_dir)

    def finish(folder: Path) -> None:
        if pruned_info is not None:
            atomic_write_bytes(folder / "qblock_pruned.json", (json.dumps(pruned_info, indent=2) + "\n").encode())

    # quiet: transformers' shard-writing bar is noise after the healing bar
    save_model_folder(model, tokenizer, out, finish, quiet=True)
    atomic_write_bytes(out / "qblock.json", (json.dumps(_jsonable(info), indent=1) + "\n").encode())
    return out


def remove_checkpoint(out_dir: str | os.PathLike) -> None:
    """Delete ``OUT/checkpoint`` (after the healed model is saved)."""
    shutil.rmtree(Path(out_dir) / CHECKPOINT_DIR, ignore_errors=True)
