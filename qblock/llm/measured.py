"""Calibration loss of removal sets on a real model: the loss oracle of :mod:`qblock.select`.

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
"""

from __future__ import annotations

import functools
import uuid
from typing import Any, Callable, Iterable, Sequence

__all__ = ["CalibrationLoss", "OracleBook"]


def _remote_prefix(model, *, samples, gate, batch_size, max_bytes):
    """A model actor's own recorded full-model pass (the same one :class:`CalibrationLoss` records)."""
    from qblock.validate.evaluate import PrefixCache

    return PrefixCache(model, samples, (), batch_size=batch_size, gate=gate, max_bytes=max_bytes)


def _remote_calib_loss(prefix, key: tuple[int, ...]) -> float:
    return float(prefix.loss(key)[0])


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
    """

    def __init__(self, model, samples: Sequence[Any], *, gate: str = "layer", batch_size: int = 8,
                 max_bytes: float = 2e9, executor: Any = None) -> None:
        if not samples:
            raise ValueError("CalibrationLoss needs at least one calibration sample")
        self._args = (model, list(samples), gate, int(batch_size), max_bytes)
        self._prefix = None  # recorded on first use: that pass is the full model's evaluation
        self._predicted = None  # next-token predictions per pass, known once recorded
        self.tokens_per_pass = int(sum(int(getattr(s, "numel", lambda: len(s))()) for s in samples))
        self.num_samples = len(samples)
        self._cache: dict[tuple[int, ...], float] = {}
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
            self.evaluations += 1

    @property
    def predicted_tokens(self) -> int:
        """Next-token predictions a loss averages (what pooling losses over sample sets weighs by)."""
        if self._predicted is None:
            self._record()
        return self._predicted

    def release(self) -> None:
        """Free the recorded block outputs (measured losses stay cached; a new set records them again,
        counted as a pass)."""
        self._prefix = None

    def loss(self, removed: Iterable[int]) -> float:
        """The calibration loss with ``removed`` masked (measured once per distinct set)."""
        key = tuple(sorted({int(i) for i in removed}))
        if key not in self._cache and self._prefix is None:
            self._record()  # first use, or after release()
        if key not in self._cache:
            self._cache[key] = float(self._prefix.loss(key)[0])
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
        keys = [tuple(sorted({int(i) for i in s})) for s in sets]
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

            def done(j: int, v: float) -> None:
                self._cache[todo[j]] = float(v)
                self.tokens += self.tokens_per_pass
                self.evaluations += 1
                if on_result is not None:
                    on_result(j, float(v))

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

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> torch.manual_seed(0) and None
        >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2)).eval()
        >>> book = OracleBook(m)
        >>> calib = [torch.randint(0, 50, (10,)) for _ in range(2)]
        >>> a, b = book.view(calib), book.view([s.clone() for s in calib])  # same tokens: one oracle
        >>> a.loss([1]) == b.loss([1]), a.oracle is b.oracle, a.oracle.tokens, b.tokens
        (True, True, 40, 40)
    """

    def __init__(self, model, *, batch_size: int = 8, max_bytes: float = 2e9, executor: Any = None) -> None:
        self._model, self._batch_size, self._max_bytes, self._executor = model, int(batch_size), max_bytes, executor
        self._oracles: dict[tuple[str, str], CalibrationLoss] = {}

    def oracle(self, samples: Sequence[Any], gate: str = "layer") -> CalibrationLoss:
        """The shared oracle of these samples (by their tokens) and masking mode."""
        import hashlib

        import numpy as np

        digest = hashlib.sha256()
        for s in samples:
            a = np.asarray(getattr(s, "numpy", lambda: s)(), dtype=np.int64).reshape(-1)
            digest.update(len(a).to_bytes(8, "little") + a.tobytes())
        key = (digest.hexdigest(), str(gate))
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
        keys = [tuple(sorted({int(i) for i in s})) for s in sets]
        self._asked = (self._asked or set()) | set(keys)
        return self.oracle.loss_many(keys, on_result=on_result)


def select_removals(model, samples: Sequence[Any], num_removes: Sequence[int], *, gate: str = "layer",
                    pool_size: int | None = None, evaluations_per_m: int = 24, batch: int = 4,
                    backend: str = "exact", backend_params: dict[str, Any] | None = None, seed: int = 0,
                    batch_size: int = 8, confirm_samples: Sequence[Any] | None = None, confirm_top: int = 6,
                    screen_samples: int = 0, one_pass: bool = True, race_samples: Sequence[Any] = (),
                    progress: bool = False, executor: Any = None, book: OracleBook | None = None) -> dict[str, Any]:
    """qblock's recommended removal sets: the measured QUBO, refined for each M with ``backend`` in the loop.

    Args:
        model: the causal LM (unchanged on return).
        samples: calibration samples for every measurement (never held-out ones).
        num_removes: the values of M.
        gate: masking mode.
        pool_size: blocks whose pairs are measured (see :func:`qblock.select.measured_problem`).
        evaluations_per_m: refinement budget per M, in evaluations of ``samples`` (tokens = this x
            the samples' tokens).
        batch: sets measured per refinement round.
        backend, backend_params, seed: the solver in the loop (any :func:`qblock.solve` backend).
        batch_size: forward batch size.
        confirm_samples: other calibration samples on which the ``confirm_top`` best sets of each M are
            measured again, the lowest recommended (:func:`qblock.select.confirm`); ``None``: no
            confirmation. Best disjoint from ``samples``: the loop chose its finalists for being low
            there, and measured there again the luckiest would look best
            (:func:`qblock.validate.runner.selection_split`).
        race_samples: further calibration samples, disjoint from ``confirm_samples``, cut into chunks of
            ``len(confirm_samples)``: the confirmation races on them (the two lowest finalists are measured
            again on each chunk; :func:`qblock.select.confirm`; measured here, not on ``executor``).
            ``()``: no racing.
        confirm_top: finalists per M chosen by the loop's ranking (the one-pass sets may add up to two).
        screen_samples: if positive, a greedy removal chain (:func:`qblock.select.greedy_chain`) on the
            first ``screen_samples`` samples proposes one starting set per M for the loop (its tokens
            count as shared); ``0``: none.
        one_pass: the sets of the one-pass baselines (ShortGPT's lowest block influence, the angular
            window; :func:`one_pass_sets`) from one statistics pass over ``samples`` (its tokens count as
            shared) start the loop for every M and are always among the confirmed finalists, so the
            recommendation is never worse on the first confirmation samples than those rules applied to
            ``samples``, or beat them on more (a report's ShortGPT and angular rows may use more samples
            and differ).
        progress: a progress bar over evaluations.
        executor: where each batch of measurements runs (:mod:`qblock.executor`; Ray: model actors,
            the same losses and token counts).
        book: an :class:`OracleBook` the screen measures through, shared with other methods of a run
            (SLEB's baseline on the same samples walks the same chain: its sets are not computed again;
            the screen's tokens are still all it asked for).

    Returns:
        ``{"prior": BlockRemovalProblem, "refinements": {M: Refinement}, "shared_tokens": int,
        "tokens_per_evaluation": int, "oracle": CalibrationLoss, "confirm_oracle": CalibrationLoss or None,
        "race_oracles": [CalibrationLoss], "seconds": float}``. ``shared_tokens`` counts what every M needs
        (the measured QUBO, the confirmation's and the racing chunks' full-model passes, the screen's chain
        and the one-pass statistics pass); each
        Refinement's ``tokens + confirm_tokens`` are its own.
    """
    import time

    from qblock.llm.blocks import find_blocks
    from qblock.select import confirm, greedy_chain, measured_problem, refine

    t0 = time.perf_counter()
    n = len(find_blocks(model))
    oracle = CalibrationLoss(model, samples, gate=gate, batch_size=batch_size, executor=executor)
    checker = (CalibrationLoss(model, confirm_samples, gate=gate, batch_size=batch_size, executor=executor)
               if confirm_samples and int(confirm_top) > 0 else None)
    size, rest = len(confirm_samples or ()), list(race_samples or ())
    # here, not on the executor: two sets per chunk and M, and more keyed states would evict the actors' others
    racers = ([CalibrationLoss(model, rest[i:i + size], gate=gate, batch_size=batch_size)
               for i in range(0, len(rest), size)] if checker is not None else [])
    confirmers = [checker, *racers] if checker is not None else []
    bar = _Bar(oracle, progress)
    try:
        prior = measured_problem(bar, n, pool_size=pool_size)
        shared = oracle.tokens
        for o in confirmers:
            o.loss(())  # its recorded full-model pass serves every M
            shared += o.tokens
        cheap = one_pass_sets(model, samples, num_removes, batch_size=batch_size, progress=progress) if one_pass else {}
        if cheap:
            shared += oracle.tokens_per_pass
        chain = {}
        if int(screen_samples) > 0 and num_removes:
            book = book or OracleBook(model, batch_size=batch_size, executor=executor)
            screen = book.view(list(samples)[: int(screen_samples)], gate)
            singles = {i: float(v) for i, v in enumerate(prior.arrays["single_losses"])}
            chain = greedy_chain(_Bar(screen, False, bar.bar), n, max(int(m) for m in num_removes), singles=singles)
            shared += screen.tokens
        refinements = {}
        for m in sorted({int(m) for m in num_removes}):
            starts = {**({"greedy": chain[m]} if m in chain else {}), **cheap.get(m, {})}
            refinements[m] = refine(bar, prior, m, backend=backend, backend_params=backend_params, seed=seed,
                                    budget_tokens=int(evaluations_per_m) * oracle.tokens_per_pass, batch=batch,
                                    known=oracle.measured(), starts=starts)
            if checker is not None:
                confirm(_Bar(checker, False, bar.bar), refinements[m], top=confirm_top,
                        also=cheap.get(m, {}).values(), more=[_Bar(o, False, bar.bar) for o in racers])
    finally:
        bar.close()
        for o in confirmers:
            o.release()  # their recorded outputs (up to max_bytes each) are not needed after the loop
    return {"prior": prior, "refinements": refinements, "shared_tokens": int(shared),
            "tokens_per_evaluation": oracle.tokens_per_pass, "oracle": oracle, "confirm_oracle": checker,
            "race_oracles": racers, "seconds": time.perf_counter() - t0}


def one_pass_sets(model, samples: Sequence[Any], num_removes: Sequence[int], *,
                  batch_size: int = 8, progress: bool = False) -> dict[int, dict[str, tuple[int, ...]]]:
    """``{M: {"shortgpt": set, "angular": set}}``: the one-pass baselines' sets from one statistics pass.

    The same rules as :mod:`qblock.validate.baselines` (ShortGPT's M blocks of lowest block influence,
    Gromov et al.'s window of M blocks of least angular distance), on ``samples``. Cheap and often strong
    at small M, where a loop that ranks on few samples can miss them. ``progress``: a bar over its batches.
    """
    from qblock.llm.blocks import find_blocks
    from qblock.validate.baselines import angular, block_statistics, shortgpt

    n = len(find_blocks(model))
    ms = sorted({int(m) for m in num_removes if 1 <= int(m) <= n})  # others: the loop says what is wrong
    if not ms:
        return {}
    stats = block_statistics(model, samples, batch_size=batch_size, progress=progress, desc="one-pass statistics")
    return {m: {"shortgpt": tuple(shortgpt(stats, m, len(samples)).removed),
                "angular": tuple(angular(stats, m, len(samples)).removed)} for m in ms}


class _Bar:
    """The oracle behind a tqdm counter of evaluations (the loop's length is not known in advance)."""

    def __init__(self, oracle: CalibrationLoss, enabled: bool, bar: Any = None) -> None:
        self.oracle = oracle
        self.bar = bar  # an existing bar to share (not closed here)
        self._own = bar is None and enabled
        if self._own:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc="qblock selection (calibration loss)", unit="set", leave=False)

    @property
    def tokens(self) -> int:
        return self.oracle.tokens

    @property
    def num_samples(self) -> int:  # racing (qblock.select.confirm) counts samples and weighs by predictions
        return self.oracle.num_samples

    @property
    def predicted_tokens(self) -> int:
        return self.oracle.predicted_tokens

    def loss(self, removed: Iterable[int]) -> float:
        before = self.oracle.evaluations
        out = self.oracle.loss(removed)
        if self.bar is not None and self.oracle.evaluations > before:
            self.bar.update(1)
        return out

    def loss_many(self, sets: Iterable[Iterable[int]]) -> list[float]:
        def tick(k: int, v: float) -> None:
            if self.bar is not None:
                self.bar.update(1)

        return self.oracle.loss_many(sets, on_result=tick)

    def close(self) -> None:
        if self._own and self.bar is not None:
            self.bar.close()
