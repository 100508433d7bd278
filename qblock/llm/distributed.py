"""Data-parallel extraction: the rows of ``A`` computed by K processes (``torchrun``), gathered on rank 0.

Each calibration sample's row ``A[s, :]`` is independent of every other sample's, so the samples split
over processes with no communication but the final gather. The batches are exactly the single-process
batches of :func:`qblock.llm.pipeline.compute_rows` (batch ``b`` holds samples ``b*B .. (b+1)*B - 1``)
and batch ``b`` runs on rank ``b mod K``; so every row is computed by the same code on the same inputs
as in one process, and the gathered ``A`` equals the single-process ``A``.

Launch ``qblock extract`` under torchrun; it notices ``WORLD_SIZE > 1``, joins the process group (gloo,
which runs on CPUs and carries the gathered rows whatever device the model is on) and only rank 0
reads checkpoints, writes them and writes the output::

    torchrun --nproc-per-node 4 -m qblock extract --model default --samples 128 --out smol.npz
    torchrun --nproc-per-node 8 -m qblock extract --device cuda ...   # rank r uses cuda:LOCAL_RANK

Checkpoints stay resumable: after every round of K batches rank 0 holds a contiguous prefix of rows and
checkpoints it as a single process would; a resumed run (with any number of processes) starts after the
rows in the checkpoint.

Example:
    >>> world()                       # not under torchrun
    (0, 1)
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["world", "is_distributed", "in_group", "init", "leave", "compute_rows_distributed"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: from torch.distributed if it is initialised, else from
    the ``RANK`` / ``WORLD_SIZE`` variables torchrun sets, else ``(0, 1)``."""
    if in_group():
        import torch.distributed as dist

        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_distributed() -> bool:
    """True under a launcher with more than one process."""
    return world()[1] > 1


def in_group() -> bool:
    """Whether this process has joined a process group (torch.distributed is initialised)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - the core install has no torch
        return False
    return dist.is_available() and dist.is_initialized()


def leave(synchronize: bool = True) -> None:
    """Leave the process group, if any. Gloo's worker threads must stop before the interpreter does: a rank
    that exits without this can abort at exit ("terminate called without an active exception").

    With ``synchronize`` (the work ended well on this rank) every rank first waits at a barrier, so none tears
    gloo down while another still talks to it: a rank that finished first still aborted now and then (once in
    a local ``.ci/run``, on a loaded machine). After an error there is no barrier: the other ranks may never
    reach it, and the launcher stops them.
    """
    if in_group():
        import torch.distributed as dist

        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def init(device: Any = None) -> tuple[int, int, Any]:
    """Join the process group (gloo) if torchrun started several processes; ``(rank, world, device)``.

    With ``device`` ``"cuda"`` each rank takes ``cuda:LOCAL_RANK``.
    """
    import torch.distributed as dist

    rank, size = world()
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        rank, size = dist.get_rank(), dist.get_world_size()
    if device is not None and str(device) == "cuda" and size > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return rank, size, device


def _gather(obj: Any, rank: int, size: int) -> list[Any] | None:
    import torch.distributed as dist

    out = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _broadcast(value: Any, rank: int) -> Any:
    import torch.distributed as dist

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def compute_rows_distributed(model, samples: Sequence, rows: np.ndarray | None = None, *, gate: str = "layer",
                             granularity: str = "block", batch_size: int = 8, checkpoint_every: int | None = None,
                             on_checkpoint: Callable[[np.ndarray], None] | None = None, progress: bool = True,
                             device: Any = None) -> np.ndarray | None:
    """:func:`qblock.llm.pipeline.compute_rows` over the ranks of the process group.

    Every rank calls it with the same samples; ``rows`` (already computed rows, from a checkpoint) is
    read on rank 0 only and its length broadcast. Rank 0 returns the whole ``A`` and is the only one
    that calls ``on_checkpoint`` (every ``checkpoint_every`` samples, whole rounds, and once more if
    interrupted); the other ranks return None. With one process it is ``compute_rows``.
    """
    from qblock.llm.gradients import gate_gradients
    from qblock.llm._rows import DEFAULT_CHECKPOINT_EVERY, ExtractError, RowProgress, compute_rows

    rank, size = world()
    if size == 1:
        return compute_rows(model, samples, rows, gate=gate, granularity=granularity, batch_size=batch_size,
                            checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint, progress=progress,
                            device=device)
    if batch_size < 1:
        raise ExtractError(f"batch_size must be >= 1, got {batch_size}")
    m = len(samples)
    done = _broadcast(0 if rows is None else int(len(rows)), rank)
    if done > m:
        raise ExtractError(f"{done} rows already computed but only {m} samples")
    starts = list(range(done, m, batch_size)) if done % batch_size == 0 else \
        [done] + list(range((done // batch_size + 1) * batch_size, m, batch_size))
    every = max(batch_size, checkpoint_every or DEFAULT_CHECKPOINT_EVERY)
    bar = _bar(m, done, samples, progress and rank == 0)
    # rank 0 holds the rows and checkpoints them; the other ranks only compute their batches
    with RowProgress(rows if rank == 0 else None, m, every, on_checkpoint if rank == 0 else None, bar) as state:
        for r0 in range(0, len(starts), size):
            mine = starts[r0 + rank] if r0 + rank < len(starts) else None
            result = None
            if mine is not None:  # the same batch a single process runs (it ends at the next multiple)
                stop = min(m, (mine // batch_size + 1) * batch_size)
                A = gate_gradients(model, list(samples[mine:stop]), gate=gate, granularity=granularity,
                                   batch_size=batch_size, device=device, progress=False)
                result = (mine, np.asarray(A, dtype=np.float64))
            got = _gather(result, rank, size)
            if rank == 0:
                state.add(*(block for _, block in sorted(g for g in got if g is not None)))
    return state.rows() if rank == 0 else None


def _bar(m: int, done: int, samples: Sequence, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    tokens = int(sum(len(s) for s in samples[:1])) if m else 0
    return tqdm(total=m, initial=done, unit="sample", dynamic_ncols=True,
                desc=f"gate gradients, {world()[1]} processes ({tokens} tok/sample)")
