"""qblock's selection on a real model: the measured QUBO, refined per M with any backend in the loop.

The loss oracle it measures with, :class:`CalibrationLoss`, and the :class:`OracleBook` that shares
oracles with SLEB's baseline live in :mod:`qblock.validate.oracle` (re-exported here).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from qblock.validate.oracle import CalibrationLoss, OracleBook

__all__ = ["CalibrationLoss", "OracleBook", "select_removals", "one_pass_sets"]


def select_removals(model, samples: Sequence[Any], num_removes: Sequence[int], *, gate: str = "layer",
                    pool_size: int | None = None, evaluations_per_m: int = 24, batch: int = 4,
                    backend: str = "exact", backend_params: dict[str, Any] | None = None, seed: int = 0,
                    batch_size: int = 8, confirm_samples: Sequence[Any] | None = None, confirm_top: int = 6,
                    screen_samples: int = 0, one_pass: bool = True, race_samples: Sequence[Any] = (),
                    pair_samples: int | None = None, progress: bool = False, executor: Any = None,
                    book: OracleBook | None = None) -> dict[str, Any]:
    """qblock's recommended removal sets: the measured QUBO, refined for each M with ``backend`` in the loop.

    Args:
        model: the causal LM (unchanged on return).
        samples: calibration samples for every measurement (never held-out ones).
        num_removes: the values of M.
        gate: masking mode.
        pool_size: blocks whose pairs are measured (see :func:`qblock.select.measured_problem`).
        pair_samples: measure those pairs on the first ``pair_samples`` of ``samples`` only (the full
            model and the pool's singles are measured there again, so that each coupling is a
            difference on one set of samples; measured here, not on ``executor``); ``None`` or
            ``len(samples)``: on all of them. The pairs are then not candidates at M = 2 (their losses
            are on other samples): the loop measures its own.
        evaluations_per_m: refinement budget per M, in evaluations of ``samples`` (tokens = this x
            the samples' tokens).
        batch: sets measured per refinement round.
        backend, backend_params, seed: the solver in the loop (any :func:`qblock.solve` backend; one that
            takes fewer than N variables, as QAOA, solves the surrogate on the best measured sets' and the
            most removable blocks: :func:`qblock.select.solve_blocks`).
        batch_size: forward batch size.
        confirm_samples: other calibration samples on which the ``confirm_top`` best sets of each M are
            measured again, the lowest recommended (:func:`qblock.select.confirm`); ``None``: no
            confirmation. Best disjoint from ``samples``: the loop chose its finalists for being low
            there, and measured there again the luckiest would look best
            (:func:`qblock.validate.runner.selection_split`).
        race_samples: further calibration samples, disjoint from ``confirm_samples``, cut into chunks of
            ``len(confirm_samples)``: the confirmation races on them (the finalists not resolved from the
            lowest are measured again on each chunk; :func:`qblock.select.confirm`; measured here, not on
            ``executor``).
            ``()``: no racing.
        confirm_top: finalists per M chosen by the loop's ranking (the one-pass sets may add up to two).
        screen_samples: if positive, a greedy removal chain (:func:`qblock.select.greedy_chain`) on the
            first ``screen_samples`` samples proposes one starting set per M for the loop, and for M above
            N / 2 a chain keeping blocks from the empty model (:func:`qblock.select.keep_chain`) one more (their
            tokens count as shared); ``0``: none.
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
            (SLEB's baseline on the same samples walks much of the same chain, while the two paths agree:
            such sets are not computed again; the screen's tokens are still all it asked for).

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
    from qblock.select import check_backend_size, confirm, measured_problem, refine

    t0 = time.perf_counter()
    n = len(find_blocks(model))
    check_backend_size(backend, backend_params, n, num_removes)  # before any measurement
    oracle = CalibrationLoss(model, samples, gate=gate, batch_size=batch_size, executor=executor)
    checker = (CalibrationLoss(model, confirm_samples, gate=gate, batch_size=batch_size, executor=executor)
               if confirm_samples and int(confirm_top) > 0 else None)
    size, rest = len(confirm_samples or ()), list(race_samples or ())
    # here, not on the executor: the few sets still racing per chunk and M, and more keyed states would evict
    # the actors' others
    racers = ([CalibrationLoss(model, rest[i:i + size], gate=gate, batch_size=batch_size)
               for i in range(0, len(rest), size)] if checker is not None else [])
    confirmers = [checker, *racers] if checker is not None else []
    # here, not on the executor (as the racers): its keyed state would stay on the actors for the whole loop
    pairer = _pair_oracle(model, samples, pair_samples, gate=gate, batch_size=batch_size)
    bar = _Bar(oracle, progress)
    try:
        prior = measured_problem(bar, n, pool_size=pool_size,
                                 pair_oracle=_Bar(pairer, False, bar.bar) if pairer is not None else None)
        shared = oracle.tokens + (pairer.tokens if pairer is not None else 0)
        if pairer is not None:
            pairer.release()  # its recorded outputs; the couplings are in the prior
        for o in confirmers:
            o.loss(())  # its recorded full-model pass serves every M
            shared += o.tokens
        cheap = one_pass_sets(model, samples, num_removes, batch_size=batch_size, progress=progress) if one_pass else {}
        if cheap:
            shared += oracle.tokens_per_pass
        chains, screened = {}, 0
        if int(screen_samples) > 0 and num_removes:
            book = book or OracleBook(model, batch_size=batch_size, executor=executor)
            chains, screened = _screen(book.view(list(samples)[: int(screen_samples)], gate), bar, prior, n,
                                       num_removes)
        shared += screened
        refinements = {}
        for m in sorted({int(m) for m in num_removes}):
            starts = {**{label: c[m] for label, c in chains.items() if m in c}, **cheap.get(m, {})}
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


def _screen(screen, bar, prior, n: int, num_removes: Sequence[int]) -> tuple[dict[str, dict], int]:
    """The screen's starting sets, ``{"greedy": chain, "keep": chain}`` (:func:`qblock.select.greedy_chain`;
    :func:`qblock.select.keep_chain` for M above N / 2, nearer the empty model), and the tokens it spent."""
    from qblock.select import greedy_chain, keep_chain

    singles = {i: float(v) for i, v in enumerate(prior.arrays["single_losses"])}
    chains = {"greedy": greedy_chain(_Bar(screen, False, bar.bar), n, max(int(m) for m in num_removes),
                                     singles=singles)}
    far = [int(m) for m in num_removes if 2 * int(m) > n]
    if far:
        chains["keep"] = keep_chain(_Bar(screen, False, bar.bar), n, min(far))
    screen.oracle.release()  # its recorded outputs; the losses stay in the book
    return chains, screen.tokens


def _pair_oracle(model, samples: Sequence[Any], pair_samples: int | None, **kw: Any) -> CalibrationLoss | None:
    """The oracle of :func:`select_removals`'s pairs: ``None`` (the loop's own) unless fewer samples are asked for."""
    if pair_samples is None or int(pair_samples) >= len(samples):
        return None
    if int(pair_samples) < 1:
        raise ValueError(f"pair_samples must be at least 1, got {pair_samples}")
    return CalibrationLoss(model, list(samples)[: int(pair_samples)], **kw)


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

    @property
    def sample_tokens(self) -> list[int]:  # the confirmation's paired comparisons (which sets race on)
        return self.oracle.sample_tokens

    def sample_losses(self, removed: Iterable[int]) -> list[float]:
        return self.oracle.sample_losses(removed)

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
