"""Calibration loss of removal sets on a real model: the loss oracle of :mod:`qblock.select` and of SLEB.

:class:`CalibrationLoss` measures sets on one list of calibration samples; :class:`OracleBook` shares one
per list of samples between the methods of a run (:mod:`qblock.llm.measured`'s selection,
:func:`qblock.validate.baselines.sleb`), so a set two of them ask for is computed once.

One recorded pass of the full model stores every block's output per batch
(:class:`qblock.validate.evaluate.PrefixCache`); a removal set then recomputes only the blocks from its
first removed block on. Every distinct set is measured once (cached), and the forward tokens spent are
counted as whole passes over the samples, as for every baseline, even where the prefix replay made a
pass cheaper (so the accounting never flatters qblock).

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> torch.manual_seed(0) and None
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2)).eval()
    >>> oracle = CalibrationLoss(m, [torch.randint(0, 50, (10,)) for _ in range(3)])
    >>> a = oracle.loss([2]); b = oracle.loss([2])    # the second is cached
    >>> a == b, oracle.tokens, oracle.evaluations    # base pass + one removal, 30 tokens each
    (True, 60, 2)
    >>> book = OracleBook(m)
    >>> calib = [torch.randint(0, 50, (10,)) for _ in range(2)]
    >>> x, y = book.view(calib), book.view([s.clone() for s in calib])  # the same tokens: one oracle
    >>> x.loss([1]) == y.loss([1]), x.oracle is y.oracle, x.oracle.tokens, y.tokens  # y counts its own
    (True, True, 40, 40)
"""

from __future__ import annotations

import functools
import uuid
from typing import Any, Callable, Iterable, Sequence

from qblock.problems.block_removal import removal_key
from qblock.validate.evaluate import forward_tokens, sample_tokens

__all__ = ["CalibrationLoss", "OracleBook"]


def _remote_prefix(model, *, samples, gate, batch_size, max_bytes):
    """A model actor's own recorded full-model pass (the same one :class:`CalibrationLoss` records)."""
    from qblock.validate.evaluate import PrefixCache

    return PrefixCache(model, samples, (), batch_size=batch_size, gate=gate, max_bytes=max_bytes)


def _remote_calib_loss(prefix, key: tuple[int, ...]) -> tuple[float, list[float]]:
    return float(prefix.loss(key)[0]), prefix.sample_losses(key)


class CalibrationLoss:
    """Token-weighted mean next-token NLL of the model with a set of blocks removed, on calibration samples.

    Args:
        model: a causal LM in eval mode (never modified on return: removal is reversible masking).
        samples: calibration token-id tensors (never the held-out ones).
        gate: ``"layer"`` or ``"branch"`` masking, as the problem's gates.
        batch_size: forward batch size.
        max_bytes: memory budget of the prefix cache (above it, passes are computed in full).
        executor: where :meth:`loss_many` measures (:mod:`qblock.executor`; ``None``: here).

    Attributes:
        tokens: forward tokens spent so far (each evaluation counts every sample token once).
        evaluations: distinct removal sets measured (the full model included).

    :meth:`sample_losses` gives a measured set's loss on each sample, for paired comparisons of two sets.
    """

    def __init__(self, model, samples: Sequence[Any], *, gate: str = "layer", batch_size: int = 8,
                 max_bytes: float = 2e9, executor: Any = None) -> None:
        if not samples:
            raise ValueError("CalibrationLoss needs at least one calibration sample")
        self._args = (model, list(samples), gate, int(batch_size), max_bytes)
        self._prefix = None  # recorded on first use: that pass is the full model's evaluation
        self._predicted = None  # next-token predictions per pass, known once recorded
        self.tokens_per_pass = forward_tokens(samples)
        self.num_samples = len(sample_tokens(samples))  # the samples a pass runs (two or more tokens)
        self._cache: dict[tuple[int, ...], float] = {}
        self._per_sample: dict[tuple[int, ...], list[float]] = {}
        self.tokens = 0
        self.evaluations = 0
        self.executor = executor
        self._workers = None  # model actors, bound on first remote use
        self._key = f"calib:{uuid.uuid4().hex}"

    def _record(self) -> None:
        from qblock.validate.evaluate import PrefixCache

        model, samples, gate, batch_size, max_bytes = self._args
        self._prefix = PrefixCache(model, samples, (), batch_size=batch_size, gate=gate, max_bytes=max_bytes)
        self._predicted = int(self._prefix.num_tokens)
        self.tokens += self.tokens_per_pass  # spent again after release(), but the full model is one set
        if () not in self._cache:
            self._cache[()] = float(self._prefix.base_loss)
            self._per_sample[()] = self._prefix.sample_losses(())
            self.evaluations += 1

    @property
    def predicted_tokens(self) -> int:
        """Next-token predictions a loss averages (what pooling losses over sample sets weighs by)."""
        if self._predicted is None:
            self._record()
        return self._predicted

    @property
    def sample_tokens(self) -> list[int]:
        """Next-token predictions of each sample that has any (the weights of :meth:`sample_losses`)."""
        return sample_tokens(self._args[1])

    def sample_losses(self, removed: Iterable[int]) -> list[float]:
        """The loss of a set on each sample (measured with :meth:`loss` if not yet), in sample order."""
        key = removal_key(removed)
        if key not in self._per_sample:
            self.loss(key)
        return list(self._per_sample[key])

    def release(self) -> None:
        """Free the recorded block outputs (measured losses stay cached; a new set records them again,
        counted as a pass)."""
        self._prefix = None

    def loss(self, removed: Iterable[int]) -> float:
        """The calibration loss with ``removed`` masked (measured once per distinct set)."""
        key = removal_key(removed)
        if key not in self._cache and self._prefix is None:
            self._record()  # first use, or after release()
        if key not in self._cache:
            self._cache[key] = float(self._prefix.loss(key)[0])
            self._per_sample[key] = self._prefix.sample_losses(key)  # the pass just made, not another
            self.tokens += self.tokens_per_pass
            self.evaluations += 1
        return self._cache[key]

    def loss_many(self, sets: Iterable[Iterable[int]], *,
                  on_result: Callable[[int, float], None] | None = None) -> list[float]:
        """The losses of many sets; the uncached ones run on :attr:`executor` (model actors on Ray).

        Tokens and evaluations are counted as by :meth:`loss` (one pass per distinct new set), and the
        values are the same whichever executor measured them. ``on_result(k, loss)`` is called as the
        k-th new set finishes.
        """
        from qblock.executor import is_local
        from qblock.validate.evaluate import prefix_order

        if self._predicted is None:
            self._record()  # the full model's pass, here, before any set (after release(): loss() records)
        keys = [removal_key(s) for s in sets]
        # in trie order: each pass replays the blocks it shares with the one before (PrefixCache)
        todo = prefix_order(k for k in dict.fromkeys(keys) if k not in self._cache)
        if is_local(self.executor):
            for j, k in enumerate(todo):
                v = self.loss(k)
                if on_result is not None:
                    on_result(j, v)
        elif todo:
            model, samples, gate, batch_size, max_bytes = self._args
            self._workers = self.executor.bind_model(model)  # the executor shares one set of actors per model
            setup = functools.partial(_remote_prefix, samples=samples, gate=gate, batch_size=batch_size,
                                      max_bytes=max_bytes)

            def done(j: int, v: tuple[float, list[float]]) -> None:
                self._cache[todo[j]], self._per_sample[todo[j]] = float(v[0]), list(v[1])
                self.tokens += self.tokens_per_pass
                self.evaluations += 1
                if on_result is not None:
                    on_result(j, float(v[0]))

            self._workers.map(_remote_calib_loss, todo, setup=setup, key=self._key, on_result=done)
        return [self._cache[k] for k in keys]

    def measured(self) -> dict[tuple[int, ...], float]:
        """Every set measured so far and its loss."""
        return dict(self._cache)


class OracleBook:
    """One :class:`CalibrationLoss` per list of samples, shared by every method of a run.

    SLEB's baseline and qblock's screen both walk a greedy removal chain on the first calibration
    samples; measured through one book, a set that either has measured is not computed again (one
    oracle, one loss), while each method counts the tokens it would have spent alone (:meth:`view`).

    Args:
        model: the causal LM.
        batch_size: forward batch size of every oracle.
        max_bytes: prefix-cache budget of each oracle.
        executor: where the oracles' :meth:`CalibrationLoss.loss_many` measures.

    Example: see the module's.
    """

    def __init__(self, model, *, batch_size: int = 8, max_bytes: float = 2e9, executor: Any = None) -> None:
        self._model, self._batch_size, self._max_bytes, self._executor = model, int(batch_size), max_bytes, executor
        self._oracles: dict[tuple[str, str], CalibrationLoss] = {}

    def oracle(self, samples: Sequence[Any], gate: str = "layer") -> CalibrationLoss:
        """The shared oracle of these samples (by their tokens) and masking mode."""
        from qblock._provenance import tokens_sha256

        key = (tokens_sha256(samples), str(gate))
        if key not in self._oracles:
            self._oracles[key] = CalibrationLoss(self._model, samples, gate=gate, batch_size=self._batch_size,
                                                 max_bytes=self._max_bytes, executor=self._executor)
        return self._oracles[key]

    def view(self, samples: Sequence[Any], gate: str = "layer") -> "_OwnTokens":
        """The shared oracle, counting only what this caller asks for (see :class:`_OwnTokens`)."""
        return _OwnTokens(self.oracle(samples, gate))

    def release(self) -> None:
        """Free every oracle's recorded block outputs (their measured losses stay)."""
        for o in self._oracles.values():
            o.release()


class _OwnTokens:
    """A caller's view of a shared :class:`CalibrationLoss`: the same losses, its own token count.

    ``tokens`` is what a private oracle would have spent on the sets this caller asked for: the full
    model's recorded pass, then one pass per distinct set, whoever measured it first.
    """

    def __init__(self, oracle: CalibrationLoss) -> None:
        self.oracle = oracle
        self.tokens_per_pass = oracle.tokens_per_pass
        self.num_samples = oracle.num_samples
        self._asked: set[tuple[int, ...]] | None = None  # None: never used (no pass spent yet)

    @property
    def tokens(self) -> int:
        return 0 if self._asked is None else (1 + len(self._asked - {()})) * self.tokens_per_pass

    @property
    def evaluations(self) -> int:
        """Distinct sets this caller asked for (the full model included)."""
        return 0 if self._asked is None else len(self._asked | {()})

    @property
    def predicted_tokens(self) -> int:
        return self.oracle.predicted_tokens

    def loss(self, removed: Iterable[int]) -> float:
        return self.loss_many([removed])[0]

    def loss_many(self, sets: Iterable[Iterable[int]], *,
                  on_result: Callable[[int, float], None] | None = None) -> list[float]:
        keys = [removal_key(s) for s in sets]
        self._asked = (self._asked or set()) | set(keys)
        return self.oracle.loss_many(keys, on_result=on_result)


