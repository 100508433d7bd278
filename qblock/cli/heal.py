"""``qblock heal``: retrain a pruned model briefly by distillation from the unpruned one.

Example::

    qblock prune --model default --remove 10,12,14,16,18,20 --out pruned/
    qblock heal pruned/ --out healed/                 # teacher: the model recorded by qblock prune
    qblock heal pruned/ --teacher default --out healed/ --tokens 200000 --mode lora

Interrupt it and run the same command again to resume; ``--out`` keeps a checkpoint until the
healed model is saved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from qblock.cli import CliError

#: defaults shown in --help, kept here so that ``qblock --help`` needs no torch (a test checks they
#: equal :class:`qblock.llm.heal.HealSettings`' own)
DEFAULTS = {"tokens": 32 * 4 * 256, "batch_size": 4, "micro_batch_size": 1, "seq_len": 256, "warmup": 0.1, "min_lr_ratio": 0.1,
            "weight_decay": 0.0, "clip": 1.0, "ce_weight": 0.0, "temperature": 1.0, "last_layers": 2,
            "lora_rank": 16, "lora_alpha": 32.0}
DEFAULT_LR = {"full": 3e-4, "lora": 1e-3, "last": 5e-4}
#: the held-out split always reserved (never trained on): qblock run's full preset at the same seed, so
#: a later ``qblock run`` / ``validate`` evaluates on text the healed model never saw
RESERVED_HELDOUT = 32


def register(sub: argparse._SubParsersAction) -> None:
    d = argparse.Namespace(**DEFAULTS)
    p = sub.add_parser(
        "heal",
        help="heal a pruned model by distillation from the unpruned model",
        description=(
            "Retrain PRUNED_DIR (written by qblock prune) so that its next-token distributions match the unpruned "
            "model's: KL(teacher || student) per token (plus --ce-weight times cross-entropy) on calibration text "
            "whose passages are disjoint from the held-out split, with AdamW, warmup and cosine decay, gradient "
            "clipping and a token budget. Writes a Hugging Face model directory with qblock.json (teacher, removed "
            "blocks, data, steps, tokens, losses, held-out loss before and after). Interrupted runs resume when the "
            "same command is run again. Example: qblock heal pruned/ --out healed/"
        ),
    )
    p.add_argument("pruned", metavar="PRUNED_DIR", help="pruned model directory (from qblock prune)")
    p.add_argument("--teacher", default=None, metavar="MODEL",
                   help="the unpruned model: 'default', a local HF directory, a .gguf file or a hub id (default: the "
                        "model recorded in PRUNED_DIR/qblock_pruned.json by qblock prune)")
    p.add_argument("--out", "-o", required=True, help="output directory (also holds the checkpoint while it runs)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, discarding a checkpoint or healed model there")
    p.add_argument("--mode", default="auto", choices=("auto", "full", "lora", "last"),
                   help="what is trained: full (every weight), lora (adapters, merged on save; pip install "
                        "'qblock[heal]'), last (the last --last-layers blocks, final norm and output head); auto "
                        "(default): full up to 1.5B parameters, else lora")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=int, default=None,
                        help=f"training budget in tokens (default {d.tokens:,}: "
                             f"{d.tokens // (d.batch_size * d.seq_len)} steps of {d.batch_size} x {d.seq_len})")
    budget.add_argument("--steps", type=int, default=None, help="training budget in optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"samples per step (default {d.batch_size})")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size,
                   help="samples per forward pass, gradients accumulated over the step (default 1: least memory)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sample (default {d.seq_len})")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--warmup", type=float, default=d.warmup, help=f"warmup fraction of the steps (default {d.warmup})")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help=f"the cosine decay ends at lr times this (default {d.min_lr_ratio})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)")
    p.add_argument("--clip", type=float, default=d.clip, help=f"gradient-norm clipping, 0 for none (default {d.clip})")
    p.add_argument("--ce-weight", type=float, default=d.ce_weight,
                   help="weight of the next-token cross-entropy added to the KL (default 0: distillation only)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="distillation temperature (default 1)")
    p.add_argument("--last-layers", type=int, default=d.last_layers,
                   help=f"blocks trained in --mode last (default {d.last_layers})")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"LoRA rank (default {d.lora_rank})")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"LoRA alpha (default {d.lora_alpha:g})")
    p.add_argument("--calibration", default=None, metavar="FILE|NAME",
                   help="training text (.txt paragraphs or .jsonl 'text'), or a built-in source: lambada (default, "
                        "book passages), wikipedia, stories, code")
    p.add_argument("--seed", type=int, default=0, help="data split/order and initialisation seed (default 0)")
    p.add_argument("--eval-samples", type=int, default=16,
                   help="held-out samples evaluated before and after healing (default 16): the first of the held-out "
                        f"split, max(this, {RESERVED_HELDOUT}) samples of --eval-seq-len tokens packed from passages "
                        "that are never trained on (with 256 tokens and seed 0, qblock run's held-out split)")
    p.add_argument("--eval-seq-len", type=int, default=256, help="tokens per held-out sample (default 256)")
    p.add_argument("--eval-every", type=int, default=0, metavar="STEPS",
                   help="also evaluate on the held-out samples every STEPS steps (default 0: before and after only)")
    p.add_argument("--no-eval", action="store_true", help="reserve the held-out split but do not evaluate it")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="checkpoint every STEPS steps (default 0: every --checkpoint-minutes)")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="checkpoint at least this often (default 5)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--dtype", default=None, help="fp32 (default), bf16 or fp16 for student and teacher")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads: a number, or 'auto' (default: 1 when the machine is busy)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def _settings(args):
    from qblock.cli._common import check_at_least, check_seed
    from qblock.llm.heal import HealError, HealSettings

    check_seed(args.seed)
    s = HealSettings(mode=args.mode, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                     seq_len=args.seq_len, lr=args.lr,
                     warmup=args.warmup, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                     clip=args.clip, ce_weight=args.ce_weight, temperature=args.temperature,
                     last_layers=args.last_layers, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                     seed=args.seed)
    if args.tokens is not None:
        s.tokens = args.tokens
    if args.steps is not None:
        s.steps = args.steps
    try:
        s.check()
    except HealError as exc:
        raise CliError(f"--{str(exc).replace('_', '-')}") from None
    check_at_least(("--eval-samples", args.eval_samples, 0), ("--eval-seq-len", args.eval_seq_len, 2),
                   ("--eval-every", args.eval_every, 0), ("--checkpoint-every", args.checkpoint_every, 0))
    if not args.checkpoint_minutes > 0:
        raise CliError(f"--checkpoint-minutes must be positive, got {args.checkpoint_minutes}")
    return s


def _out_state(out: Path, overwrite: bool) -> str:
    """``"fresh"``, ``"resume"`` (a checkpoint is there) or ``"finished"`` (a healed model is there)."""
    from qblock.llm.heal import CHECKPOINT_DIR

    if not out.exists() or not any(out.iterdir()):
        return "fresh"
    if overwrite:
        return "overwrite"
    if (out / CHECKPOINT_DIR / "state.json").is_file():
        return "resume"
    if (out / "qblock.json").is_file():
        return "finished"
    raise CliError(f"--out {out} exists and is not empty; pass --overwrite to write into it")


def _load_student(path: Path, dtype, device, quiet: bool):
    """The pruned model and its tokenizer (``None`` if PRUNED_DIR has none)."""
    from qblock.llm.models import ModelLoadError, load_model

    try:
        return load_model(str(path), dtype=dtype, device=device, quiet=True)
    except ModelLoadError as exc:
        if "tokenizer" not in str(exc):
            raise CliError(str(exc)) from None
    import transformers

    from qblock.llm.models import _resolve_dtype

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=_resolve_dtype(dtype),
                                                              local_files_only=True)
    if device is not None:
        model.to(device)
    return model.eval(), None


def _weights_sha256(path: Path) -> str:
    """One digest over the weight files of a model directory (identifies the student of a checkpoint)."""
    h = hashlib.sha256()
    files = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _check_pair(student, teacher, pruned_info: dict[str, Any], teacher_spec: str) -> None:
    from qblock.llm.blocks import find_blocks

    vs = student.get_output_embeddings().weight.shape[0]
    vt = teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise CliError(f"teacher {teacher_spec} predicts {vt} tokens but the pruned model {vs}: not the same "
                       "vocabulary; pass the model it was pruned from with --teacher")
    n_t, n_s = len(find_blocks(teacher)), len(find_blocks(student))
    removed = pruned_info.get("removed") or []
    want = pruned_info.get("original_num_blocks")
    if want is not None and n_t != want:
        raise CliError(f"teacher {teacher_spec} has {n_t} blocks but PRUNED_DIR was pruned from a {want}-block "
                       "model; pass that model with --teacher")
    if removed and n_s != n_t - len(removed):
        raise CliError(f"the pruned model has {n_s} blocks, not {n_t} - {len(removed)}: its qblock_pruned.json "
                       "does not match it")


def run(args: argparse.Namespace) -> int:
    from qblock._lazy import require

    require("torch", "llm")
    require("transformers", "llm")
    settings = _settings(args)
    if settings.mode == "lora":
        require("peft", "heal")
    pruned, out = Path(args.pruned), Path(args.out)
    if not pruned.is_dir() or not (pruned / "config.json").is_file():
        raise CliError(f"PRUNED_DIR {pruned} is not a Hugging Face model directory (no config.json)")
    from qblock.cli._common import check_output, text_files, text_sources
    from qblock.llm.heal import recorded_teacher

    # the one --out rule of every sub-command (not a file, writable, never one of the inputs); the teacher
    # qblock prune recorded is an input as much as a --teacher (heal P --out TEACHER --overwrite replaced it)
    teacher = args.teacher or recorded_teacher(pruned)
    check_output(args.out, "--out", inputs=[args.pruned, *text_files(text_sources(args, "calibration")), teacher],
                 folder=True)
    state = _out_state(out, args.overwrite)
    threads = _threads(args)
    t_start = time.perf_counter()
    m = _load_models(args, pruned, teacher)
    from qblock.llm import heal as H

    settings.mode = H.resolve_mode(settings.mode, sum(p.numel() for p in m["student"].parameters()))
    if settings.mode == "lora":
        require("peft", "heal")
    train, held, dprov = _data(args, m["tok"], settings)
    if args.no_eval:  # reserved but not evaluated: recorded as 0 evaluated samples, not as the split's size
        held = []
    fingerprint = {
        "student": {"dir": str(pruned.resolve()), "weights_sha256": _weights_sha256(pruned)},
        "teacher": m["provenance"],
        "dtype": str(args.dtype or "fp32"),
        "data": {k: dprov.get(k) for k in ("name", "file", "sha256", "seed")},
        "held_out": {**{k: dprov["held_out"][k] for k in ("num_samples", "seq_len")}, "evaluated": len(held)},
    }
    progress = not args.quiet
    if state == "finished":
        return _finished(out, fingerprint, settings, progress)
    if state == "overwrite":
        H.remove_checkpoint(out)
        (out / "qblock.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if progress and state != "resume":  # a resumed run says so itself, once its checkpoint is found to match
        _announce(settings, pruned, m, dprov, len(held), args.eval_seq_len, threads)
    try:
        result = H.heal(m["student"], m["teacher"], train, settings, checkpoint_dir=out / H.CHECKPOINT_DIR,
                        fingerprint=fingerprint, checkpoint_every=args.checkpoint_every,
                        checkpoint_seconds=60.0 * args.checkpoint_minutes,
                        eval_samples=held, eval_every=args.eval_every, progress=progress)
    except H.HealError as exc:
        raise CliError(str(exc)) from None
    info = _info(result, settings, m["teacher_spec"], pruned, m["pruned_info"], dprov, fingerprint, threads, args,
                 time.perf_counter() - t_start)
    H.save_healed(result.model, m["tok"], out, info, m["pruned_info"] or None)
    H.remove_checkpoint(out)
    if progress:
        _print(info, out)
    return 0


def _threads(args) -> int:
    """Check ``--device``, then set torch's threads as every model command does (:func:`setup_torch`)."""
    from qblock.cli._common import setup_torch
    from qblock.llm.models import check_device

    try:
        check_device(args.device)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return setup_torch(args)


def _load_models(args, pruned: Path, spec: str | None) -> dict[str, Any]:
    """Student (the pruned model), teacher ``spec`` (given, or recorded by qblock prune), tokenizer; checked as a pair."""
    from qblock.llm.cache import CacheError
    from qblock.llm.models import ModelLoadError, load_model, model_provenance

    student, tok = _load_student(pruned, args.dtype, args.device, args.quiet)
    pruned_info = _read_pruned_info(pruned)
    if not spec:
        raise CliError(f"{pruned} records no teacher (no qblock_pruned.json from qblock prune); pass --teacher MODEL")
    try:
        # quiet: transformers' weight-loading bars are noise here (downloads are announced regardless)
        teacher, t_tok = load_model(spec, dtype=args.dtype, device=args.device, quiet=True)
    except (ModelLoadError, CacheError) as exc:
        raise CliError(f"teacher: {exc}") from None
    _check_pair(student, teacher, pruned_info, spec)
    return {"student": student, "teacher": teacher, "tok": tok or t_tok, "teacher_spec": spec,
            "provenance": model_provenance(spec), "pruned_info": pruned_info}


def _data(args, tok, settings):
    """Training samples and the evaluated held-out samples (the first of the reserved split)."""
    from qblock.llm.cache import CacheError
    from qblock.llm.data import DataError
    from qblock.llm.heal import HealError, heal_data

    try:
        train, held, dprov = heal_data(tok, args.calibration, num_samples=settings.num_steps() * settings.batch_size,
                                       seq_len=settings.seq_len, seed=settings.seed,
                                       eval_samples=max(args.eval_samples, RESERVED_HELDOUT),
                                       eval_seq_len=args.eval_seq_len)
    except (DataError, CacheError, HealError) as exc:
        raise CliError(str(exc)) from None
    return train, held[:args.eval_samples], dprov  # packed from the same end: the first k are a k-sample split


def _announce(settings, pruned: Path, m: dict[str, Any], dprov, n_held: int, held_len: int, threads: int) -> None:
    steps = settings.num_steps()
    tokens = steps * settings.batch_size * settings.seq_len
    print(f"qblock heal: {settings.mode} fine-tuning of {pruned} ({len(m['pruned_info'].get('removed') or [])} "
          f"blocks removed) from teacher {m['teacher_spec']}: {steps} steps x {settings.batch_size} x "
          f"{settings.seq_len} = {tokens:,} tokens from {dprov['train']['num_samples']} samples "
          f"({dprov.get('name')}); held-out {n_held} x {held_len} tokens; {threads} torch thread(s)",
          file=sys.stderr, flush=True)


def _read_pruned_info(pruned: Path) -> dict[str, Any]:
    p = pruned / "qblock_pruned.json"
    if not p.is_file():
        return {}
    try:
        info = json.loads(p.read_text())
    except ValueError:
        raise CliError(f"{p} is not JSON (written by qblock prune?)") from None
    return info if isinstance(info, dict) else {}


def _finished(out: Path, fingerprint: dict[str, Any], settings, progress: bool) -> int:
    """A re-run of a finished heal: nothing to do when it was the same heal, else refuse."""
    from dataclasses import asdict

    from qblock.llm.heal import _jsonable

    try:
        info = json.loads((out / "qblock.json").read_text())
    except ValueError:
        info = {}
    same = info.get("fingerprint") == _jsonable(fingerprint) and info.get("settings") == _jsonable(asdict(settings))
    if not same:
        raise CliError(f"--out {out} holds a healed model of different settings or inputs; pass --overwrite to "
                       "heal again into it")
    if progress:
        print(f"qblock heal: {out} already holds this heal (qblock.json); nothing to do", file=sys.stderr)
    return 0


def _peak_rss_gb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
    except (ImportError, OSError):  # pragma: no cover - not on every platform
        return None


def _info(result, settings, teacher_spec, pruned, pruned_info, dprov, fingerprint, threads, args, seconds):
    from dataclasses import asdict

    from qblock import __version__
    evals = result.evals
    held: dict[str, Any] = {"num_samples": fingerprint["held_out"]["evaluated"], "seq_len": dprov["held_out"]["seq_len"],
                            "reserved_samples": dprov["held_out"]["num_samples"],
                            "reserved_passages": dprov["held_out"]["num_passages"], "curve": evals}
    if evals:
        before, after = evals[0], evals[-1]
        gap = before["heldout_loss"] - before["teacher_loss"]
        held.update(teacher_loss=before["teacher_loss"], before={"loss": before["heldout_loss"], "kl": before["kl"]},
                    after={"loss": after["heldout_loss"], "kl": after["kl"]},
                    gap_closed=(before["heldout_loss"] - after["heldout_loss"]) / gap if gap > 0 else None)
    hist = result.history
    return {
        "format": "qblock.heal",
        "qblock_version": __version__,
        "teacher": {"spec": teacher_spec, **fingerprint["teacher"]},
        "student": {"pruned_dir": str(pruned.resolve()), "removed": pruned_info.get("removed"),
                    "removed_labels": pruned_info.get("removed_labels"),
                    "original_num_blocks": pruned_info.get("original_num_blocks")},
        "mode": result.mode, "lr": result.lr, "trainable_params": result.trainable_params,
        "settings": asdict(settings),
        "data": {k: v for k, v in dprov.items() if k not in ("train", "held_out")} | {
            "train": {k: v for k, v in dprov["train"].items() if k != "passages"},
            "held_out": {k: v for k, v in dprov["held_out"].items() if k != "passages"}},
        "steps": result.steps, "tokens": result.tokens,
        "losses": {"first": hist[0]["loss"] if hist else None, "last": hist[-1]["loss"] if hist else None,
                   "last10_mean": sum(h["loss"] for h in hist[-10:]) / max(1, len(hist[-10:])), "history": hist},
        "heldout": held,
        "resumed_from": result.resumed_from,
        "seconds": {"training_this_run": result.seconds, "total_this_run": seconds},
        "device": str(args.device or "cpu"), "dtype": str(args.dtype or "fp32"), "torch_threads": threads,
        "peak_rss_gb": _peak_rss_gb(),
        "fingerprint": fingerprint,
    }


def _print(info: dict[str, Any], out: Path) -> None:
    h = info["heldout"]
    print(f"healed {info['steps']} steps, {info['tokens']:,} tokens ({info['mode']}, peak lr {info['lr']:g}); "
          f"training loss {info['losses']['first']:.4f} -> {info['losses']['last']:.4f}")
    if "before" in h:
        gc = h.get("gap_closed")
        print(f"held-out ({h['num_samples']} x {h['seq_len']} tokens): teacher {h['teacher_loss']:.4f}, pruned "
              f"{h['before']['loss']:.4f} -> healed {h['after']['loss']:.4f} nats/token; KL to teacher "
              f"{h['before']['kl']:.4f} -> {h['after']['kl']:.4f}"
              + (f"; {100 * gc:.1f}% of the gap closed" if gc is not None else ""))
    print(f"saved to {out}  (AutoModelForCausalLM.from_pretrained({str(out)!r}); qblock.json records the run)")
