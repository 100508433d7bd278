"""Rows of the gate-gradient matrix ``A``, batch by batch and resumable: :func:`compute_rows`.

The one computation under :func:`qblock.llm.extract_problem` (:mod:`qblock.llm.pipeline`, which
re-exports these names) and its torchrun variant (:mod:`qblock.llm.distributed`); kept apart so that
neither imports the other.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["ExtractError", "compute_rows", "DEFAULT_CHECKPOINT_EVERY"]

#: default checkpoint interval, in samples (rounded up to a whole number of batches)
DEFAULT_CHECKPOINT_EVERY = 32


class ExtractError(ValueError):
    """A resumable-extraction problem the user must resolve (one-line message)."""


class RowProgress:
    """The finished rows of ``A``, their progress bar and checkpoints, for :func:`compute_rows` and its
    torchrun variant: ``on_checkpoint(rows)`` every ``every`` samples and at the end, and once more
    when the ``with`` block stops on an exception (Ctrl-C included); the bar is closed either way.

    Args:
        rows: rows already computed (from a checkpoint) or None.
        total: how many rows the computation makes in all.
        every: checkpoint interval in samples.
        on_checkpoint: called with all finished rows, or None.
        bar: a tqdm bar, or None.
    """

    def __init__(self, rows: np.ndarray | None, total: int, every: int, on_checkpoint=None, bar=None):
        self.parts = [] if rows is None or len(rows) == 0 else [np.asarray(rows, dtype=np.float64)]
        self.done = self.last = 0 if rows is None else int(len(rows))
        self.total, self.every, self.on_checkpoint, self.bar = total, every, on_checkpoint, bar

    def add(self, *blocks: np.ndarray) -> None:
        """Append finished blocks of rows (one step: one batch, or one round of batches over the ranks)."""
        for block in blocks:
            self.parts.append(np.asarray(block, dtype=np.float64))
            self.done += len(block)
        if self.bar is not None:
            self.bar.update(self.done - self.bar.n)
        if self.on_checkpoint is not None and (self.done - self.last >= self.every or self.done == self.total):
            self.on_checkpoint(self.rows())
            self.last = self.done

    def rows(self) -> np.ndarray:
        if not self.parts:
            raise ExtractError("no samples to compute")
        return np.concatenate(self.parts, axis=0)

    def __enter__(self) -> "RowProgress":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None and self.on_checkpoint is not None and self.done > self.last:
                self.on_checkpoint(self.rows())  # keep what was computed before the interruption
        finally:
            if self.bar is not None:
                self.bar.close()
        return False


def compute_rows(model, samples: Sequence, rows: np.ndarray | None = None, *, gate: str = "layer",
                 granularity: str = "block", batch_size: int = 8, checkpoint_every: int | None = None,
                 on_checkpoint=None, progress: bool = True, device: Any = None) -> np.ndarray:
    """Rows of ``A`` for ``samples``, continuing after the rows already in ``rows``.

    Batches start at multiples of ``batch_size`` from the first sample, whatever was done before, so
    a resumed computation runs exactly the batches of an uninterrupted one. ``on_checkpoint(rows)`` is
    called with all finished rows every ``checkpoint_every`` samples and, if the loop is interrupted
    (``KeyboardInterrupt`` or any error), once more before the exception propagates.

    Example:
        >>> import torch, numpy as np
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> torch.manual_seed(0) and None
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2)).eval()
        >>> s = [torch.randint(0, 32, (8,)) for _ in range(5)]
        >>> full = compute_rows(m, s, batch_size=2, progress=False)
        >>> part = compute_rows(m, s[:2], batch_size=2, progress=False)
        >>> bool(np.allclose(compute_rows(m, s, part, batch_size=2, progress=False), full))
        True
    """
    from qblock.llm.gradients import gate_gradients

    m = len(samples)
    done = 0 if rows is None else int(len(rows))
    if batch_size < 1:
        raise ExtractError(f"batch_size must be >= 1, got {batch_size}")
    if done > m:
        raise ExtractError(f"{done} rows already computed but only {m} samples")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ExtractError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    every = checkpoint_every or DEFAULT_CHECKPOINT_EVERY
    every = max(batch_size, -(-every // batch_size) * batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        tokens = int(sum(len(s) for s in samples[:1])) if m else 0
        bar = tqdm(total=m, initial=done, unit="sample", desc=f"gate gradients ({tokens} tok/sample)",
                   dynamic_ncols=True, smoothing=0.1)
    with RowProgress(rows, m, every, on_checkpoint, bar) as state:
        start = done
        while start < m:
            stop = min(m, (start // batch_size + 1) * batch_size)
            state.add(gate_gradients(model, list(samples[start:stop]), gate=gate, granularity=granularity,
                                     batch_size=batch_size, device=device, progress=False))
            start = stop
    return state.rows()
