"""Choosing removal sets from measured losses: a cheap measured QUBO, refined with any backend in the loop.

The paper's Fisher energy is a local model of a unit-size step and ranks removal sets poorly (see the
README). What depth-pruning methods that work rank by is the measured calibration loss of a removal.
This module keeps the QUBO and its backends and fits the QUBO to measured losses:

1. :func:`measured_problem`: the loss with each single block removed (``N + 1`` evaluations) and
   with each pair removed inside a *pool* of the most removable blocks (``P (P - 1) / 2``), fitted
   exactly at the 0/1/2-removal level. A coupling outside the pool is imputed from the measured
   couplings of blocks at the same distance in depth (couplings are banded: neighbours interact most).
2. :func:`refine`: a surrogate loop of the FMQA/BOCS family for one target M. Fit a correction to the
   measured QUBO on every measured set of size M (kernel ridge on pair indicators; on the slice
   ``sum(x) = M`` a linear term is a combination of couplings, so only couplings are fitted), solve the
   surrogate with ANY registered backend (:func:`qblock.solve`), measure the best distinct unseen
   proposals, refit, until the token budget is spent. Proposals the solver repeats are replaced by
   unseen swap neighbours of the best measured sets, ranked by the surrogate.
3. :func:`confirm` (optional, recommended): the best few measured sets are measured again on more
   calibration tokens and the lowest of those is recommended. The loop's many cheap measurements find
   the candidates; the few larger ones keep the choice from overfitting the small sample the loop used
   (racing, as in multi-fidelity optimisation). Either way the recommendation is a set of lowest
   *measured* calibration loss; held-out data is never touched here.

Everything here is model-agnostic: a loss oracle is any object with ``loss(removed) -> float`` and a
``tokens`` counter (:class:`qblock.validate.oracle.CalibrationLoss` is the one for a real model; the
tests use synthetic ones).

Example:
    >>> import numpy as np
    >>> class Toy:  # loss of a removal set: additive costs plus a penalty for adjacent removals
    ...     tokens = 0
    ...     def loss(self, removed):
    ...         self.tokens += 100
    ...         s = sorted(removed)
    ...         return 1.0 + sum(0.1 * (i % 5 + 1) for i in s) + sum(0.5 for a, b in zip(s, s[1:]) if b == a + 1)
    >>> oracle = Toy()
    >>> prior = measured_problem(oracle, 10, pool_size=6)
    >>> res = refine(oracle, prior, 3, backend="exact", budget_tokens=3000, batch=4)
    >>> res.best_removed, round(res.best_loss, 3)
    ([0, 2, 5], 1.5)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from qblock.problems._states import check_num_remove
from qblock.problems.block_removal import BlockRemovalProblem, removal_key

__all__ = ["LossOracle", "measure", "measured_problem", "refine", "Refinement", "surrogate_problem", "confirm",
           "greedy_chain", "keep_chain", "default_pool_size", "solve_blocks", "restrict", "check_backend_size"]


class LossOracle(Protocol):
    """Measures the calibration loss of a removal set and counts the forward tokens it spent."""

    tokens: int

    def loss(self, removed: Iterable[int]) -> float:  # pragma: no cover - a protocol
        ...


def measure(oracle: LossOracle, sets: Sequence[Iterable[int]]) -> list[float]:
    """The losses of ``sets`` in one batch: ``oracle.loss_many`` where the oracle has it (it may run them in
    parallel, see :mod:`qblock.executor`), else one :meth:`loss` after another. The values are the same.

    Example:
        >>> class Sum:
        ...     tokens = 0
        ...     def loss(self, removed): return float(sum(removed))
        >>> measure(Sum(), [(1, 2), (3,)])
        [3.0, 3.0]
    """
    many = getattr(oracle, "loss_many", None)
    if many is not None:
        return [float(v) for v in many(list(sets))]
    return [float(oracle.loss(s)) for s in sets]


def _rank(loss: float) -> float:
    """A loss as a sort key: a non-finite one (NaN or inf: the model broke without those blocks) ranks last.

    Example:
        >>> sorted([2.0, float("nan"), 1.0], key=_rank)
        [1.0, 2.0, nan]
    """
    return loss if math.isfinite(loss) else math.inf


def _by_loss(losses: Mapping[tuple[int, ...], float], keys: Iterable[tuple[int, ...]] | None = None
             ) -> list[tuple[int, ...]]:
    """``keys`` (default: all of ``losses``) lowest loss first, a broken model (:func:`_rank`) last, ties by set:
    the one order in which this module ranks measured sets.

    Example:
        >>> _by_loss({(2,): 1.0, (0,): float("nan"), (1,): 1.0})
        [(1,), (2,), (0,)]
    """
    return sorted(losses if keys is None else keys, key=lambda k: (_rank(losses[k]), k))


def _stand_in(losses: np.ndarray, ref: float) -> np.ndarray:
    """``losses`` with each non-finite entry replaced by ``ref`` plus twice the largest finite increase over
    ``ref``: a broken removal enters the QUBO as worse than anything measured, with finite coefficients."""
    bad = ~np.isfinite(losses)
    if not bad.any():
        return losses
    rise = losses[~bad] - ref
    return np.where(bad, ref + 2.0 * max(float(rise.max()) if rise.size else 0.0, 1.0), losses)


# ------------------------------------------------------------------------------ the measured QUBO
def measured_problem(oracle: LossOracle, num_blocks: int, *, pool_size: int | None = None,
                     pair_oracle: LossOracle | None = None, num_remove: int | None = None,
                     labels: Sequence[str] | None = None) -> BlockRemovalProblem:
    """Measured QUBO: single removals of every block, pair removals inside a pool of the most removable.

    With ``L_0`` the full model's loss, ``L_i`` with block ``i`` removed and ``L_ij`` with both removed:
    ``linear_i = L_i - L_0`` and coupling ``J_ij = L_ij - L_i - L_j + L_0`` (stored as
    ``H_ij = H_ji = J_ij / 2``), so ``E(S) = L(S) - L_0`` exactly for ``|S| <= 2`` inside the pool.

    Args:
        oracle: measures singles (and pairs unless ``pair_oracle`` is given).
        num_blocks: N.
        pool_size: P, the blocks of lowest single-removal loss whose pairs are measured; default
            ``min(N, max(8, ceil(N / 2)))``; ``0`` for none (couplings all imputed as zero).
        pair_oracle: a cheaper oracle for the pairs (e.g. fewer calibration tokens); its own ``L_0``
            and ``L_i`` of the pool are measured too, so each coupling is a difference on one data set
            (kept as ``metadata["selection"]["pair_base_loss"]`` and array ``pair_single_losses``, NaN
            outside the pool); unused when the pool has fewer than two blocks.
        num_remove: M of the returned problem (optional).
        labels: block names (progress is the oracle's to show, see :func:`qblock.llm.measured.select_removals`).

    Returns:
        A :class:`BlockRemovalProblem` with ``metadata["energy"] == "measured"``, arrays
        ``single_losses``, ``pair_losses`` (NaN where not measured), ``pool``, and
        ``metadata["selection"]`` recording evaluations and tokens.
    """
    n = int(num_blocks)
    if n < 1:
        raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
    P = default_pool_size(n) if pool_size is None else int(pool_size)
    if not 0 <= P <= n:
        raise ValueError(f"pool_size must be between 0 and N = {n}, got {pool_size}")
    tok0 = oracle.tokens
    L0 = _base_loss(oracle)
    single = _stand_in(np.array(measure(oracle, [(i,) for i in range(n)]), dtype=np.float64), L0)
    pool = sorted(np.argsort(single - L0, kind="stable")[:P].tolist())
    po = pair_oracle if pair_oracle is not None and len(pool) >= 2 else oracle  # no pairs: nothing to measure there
    ptok0 = po.tokens if po is not oracle else None
    if po is oracle:
        pL0, psingle = L0, single
    else:
        pL0 = _base_loss(po)
        psingle = single.copy()
        psingle[pool] = _stand_in(np.array(measure(po, [(i,) for i in pool])), pL0)
    pairs = np.full((n, n), np.nan)
    J = np.zeros((n, n))
    combos = list(itertools.combinations(pool, 2))
    for (i, j), v in zip(combos, _stand_in(np.array(measure(po, combos), dtype=np.float64), pL0)):
        pairs[i, j] = pairs[j, i] = v
        J[i, j] = J[j, i] = pairs[i, j] - psingle[i] - psingle[j] + pL0
    measured = ~np.isnan(pairs)
    J = _impute_couplings(J, measured)
    tokens = oracle.tokens - tok0 + (po.tokens - ptok0 if ptok0 is not None else 0)
    meta = {"energy": "measured",
            "selection": {"pool": pool, "pool_size": P, "single_evaluations": n + 1,
                          "pair_evaluations": len(pool) * (len(pool) - 1) // 2
                          + (0 if po is oracle else len(pool) + 1),
                          "forward_tokens": int(tokens), "base_loss": L0, "pairs_own_samples": po is not oracle,
                          "coupling_rule": "measured inside the pool; outside it the median of measured "
                                           "couplings at the same depth distance (all measured if none)"}}
    arrays = {"single_losses": single, "pair_losses": pairs, "pool": np.asarray(pool, dtype=np.int64)}
    if po is not oracle:  # the pairs' own L_0 and L_i, so that J can be rebuilt from the arrays
        meta["selection"]["pair_base_loss"] = pL0
        arrays["pair_single_losses"] = np.where(np.isin(np.arange(n), pool), psingle, np.nan)
    return BlockRemovalProblem(J / 2.0, num_remove, linear=single - L0, labels=labels, metadata=meta, arrays=arrays)


def _base_loss(oracle: LossOracle) -> float:
    """The full model's loss, which every energy is relative to (so it must be finite)."""
    v = float(oracle.loss(()))
    if not math.isfinite(v):
        raise ValueError(f"the full model's calibration loss is {v}: check the model, its dtype and the samples")
    return v


def default_pool_size(num_blocks: int) -> int:
    """The pool of :func:`measured_problem` when none is given: ``max(8, ceil(N / 2))`` blocks, at most N.

    Example:
        >>> default_pool_size(30), default_pool_size(18), default_pool_size(6)
        (15, 9, 6)
    """
    n = int(num_blocks)
    return min(n, max(8, math.ceil(n / 2)))


def _impute_couplings(J: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Fill unmeasured off-diagonal couplings with the median measured coupling at the same distance."""
    n = J.shape[0]
    iu, ju = np.triu_indices(n, 1)
    if not measured[iu, ju].any():
        return J
    dist = ju - iu
    m_d, m_v = dist[measured[iu, ju]], J[iu, ju][measured[iu, ju]]
    overall = float(np.median(m_v))
    out = J.copy()
    for d in np.unique(dist[~measured[iu, ju]]):
        vals = m_v[m_d == d]
        fill = float(np.median(vals)) if vals.size >= 2 else overall
        sel = (~measured[iu, ju]) & (dist == d)
        out[iu[sel], ju[sel]] = out[ju[sel], iu[sel]] = fill
    return out


# ------------------------------------------------------------------------------ the surrogate
def _features(sets: Sequence[tuple[int, ...]], n: int) -> np.ndarray:
    X = np.zeros((len(sets), n))
    for k, s in enumerate(sets):
        X[k, list(s)] = 1.0
    return X


def surrogate_problem(prior: BlockRemovalProblem, sets: Sequence[Iterable[int]], losses: Sequence[float],
                      base_loss: float, num_remove: int, *, ridge: float | None = None) -> BlockRemovalProblem:
    """The prior QUBO plus a kernel-ridge correction fitted to measured sets of size ``num_remove``.

    The correction is ``dE(S) = sum_i dh_i [i in S] + sum_{i<j} dJ_ij [i, j in S]`` with a Gaussian
    prior on every coefficient; its posterior mean is ``dh = X^T a``, ``dJ_ij = sum_k a_k x_ki x_kj``
    with ``a = (K + ridge I)^{-1} r``, ``K_kl = s + s (s - 1) / 2`` for ``s = |S_k & S_l|`` and ``r``
    the residuals ``L(S_k) - L_0 - E_prior(S_k)``. ``ridge`` defaults to the value of least
    leave-one-out error on a grid (closed form for kernel ridge).

    Example:
        >>> import numpy as np
        >>> prior = BlockRemovalProblem(np.zeros((4, 4)), 2, linear=np.zeros(4))
        >>> sur = surrogate_problem(prior, [(0, 1), (2, 3)], [1.0, 3.0], base_loss=0.0, num_remove=2, ridge=1e-9)
        >>> round(sur.energy_of([0, 1]), 6), round(sur.energy_of([2, 3]), 6)
        (1.0, 3.0)
    """
    n = prior.num_blocks
    keys = [removal_key(s) for s in sets]
    y = np.asarray(losses, dtype=np.float64) - float(base_loss)
    H = np.array(prior.H, dtype=np.float64)
    lin = np.array(prior.linear, dtype=np.float64)
    # a broken removal (non-finite loss) is not fitted: the loop never measures a set twice anyway
    sel = [k for k, s in enumerate(keys) if len(s) == num_remove and math.isfinite(y[k])]
    md = dict(prior.metadata or {}, energy="measured+refined", refined_on=len(sel))
    if sel:
        X = _features([keys[k] for k in sel], n)
        r = y[sel] - np.array([prior.energy_of(keys[k]) - prior.offset for k in sel])
        S = X @ X.T
        K = S + S * (S - 1) / 2.0
        lam = _loo_ridge(K, r) if ridge is None else float(ridge)
        a = np.linalg.solve(K + lam * np.eye(len(sel)), r)
        lin += X.T @ a
        dJ = (X * a[:, None]).T @ X
        np.fill_diagonal(dJ, 0.0)
        H += dJ / 2.0
        md["ridge"] = lam
    return BlockRemovalProblem(H, num_remove, linear=lin, offset=prior.offset, labels=prior.labels, metadata=md)


def _loo_ridge(K: np.ndarray, r: np.ndarray) -> float:
    """Ridge strength of least leave-one-out squared error (closed form) over a log grid."""
    scale = max(float(np.mean(np.diag(K))), 1e-12)
    best, best_err = scale, math.inf
    for f in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0):
        G = np.linalg.inv(K + f * scale * np.eye(len(r)))
        a = G @ r
        err = float(np.mean((a / np.diag(G)) ** 2))
        if err < best_err - 1e-15:
            best, best_err = f * scale, err
    return best


# ------------------------------------------------------------------------------ the loop
@dataclass
class Refinement:
    """What :func:`refine` measured and chose for one M.

    Attributes:
        num_remove: M.
        best_removed: the measured set of size M of lowest calibration loss.
        best_loss: its calibration loss.
        history: every measurement of size M, in order: ``{"removed", "loss", "round", "source"}``
            (``source``: ``"solver"`` for a backend proposal, ``"neighbour"`` for a swap neighbour of a
            best measured set, ranked by the surrogate, ``"start"`` or ``"start:<label>"`` for a given
            starting set).
        surrogate: the final surrogate QUBO (prior + correction fitted to every measurement).
        tokens: forward tokens this refinement spent (the prior's not included).
        backend: the solver backend used.
        rounds: rounds run.
        repeats: proposals of the solver that had been measured already (skipped).
        finalists: ``{removed: loss}`` re-measured by :func:`confirm` on more calibration tokens (empty
            when no confirmation ran): each the mean over every confirmation sample it was measured on.
        finalist_samples: ``{removed: samples}``: how many confirmation samples each finalist's loss
            averages (racing measures the better ones on more).
        confirm_tokens: forward tokens the confirmation spent for this M.
        confirm_evaluations: measurements the confirmation made for this M.
        known: sets of size M measured before the loop (``known`` of :func:`refine`, e.g. the measured
            QUBO's pairs at M = 2) with their losses: candidates like the loop's own.
        runner_up: the confirmation's second-lowest finalist against the recommendation, on the samples
            both were measured on: ``{"removed", "margin"`` (its loss minus the recommendation's),
            ``"se"`` (the paired standard error), ``"samples"}``; None without a confirmation of two or
            more sets, or where the oracles give no per-sample losses. A margin within twice its error
            means the calibration data do not tell the two apart.
        sources: ``{removed: label}`` of the given starting sets measured before the loop (those
            measured in the loop carry theirs in ``history``).
        confirm_rounds: the confirmation's rounds: for each, the sets it measured with their loss over
            every sample so far, lowest first (``[{"removed", "loss"}, ...]``); the first round's first set
            is the pick without racing.
        solve_blocks: every block the backend's surrogate was restricted to in some round
            (:func:`solve_blocks`), or None when it saw every block.
    """

    num_remove: int
    best_removed: list[int]
    best_loss: float
    history: list[dict[str, Any]]
    surrogate: BlockRemovalProblem
    tokens: int
    backend: str
    rounds: int
    repeats: int = 0
    finalists: dict[tuple[int, ...], float] = field(default_factory=dict)
    confirm_tokens: int = 0
    confirm_evaluations: int = 0
    finalist_samples: dict[tuple[int, ...], int] = field(default_factory=dict)
    known: dict[tuple[int, ...], float] = field(default_factory=dict)
    sources: dict[tuple[int, ...], str] = field(default_factory=dict)
    runner_up: dict[str, Any] | None = None
    confirm_rounds: list[list[dict[str, Any]]] = field(default_factory=list)
    solve_blocks: list[int] | None = None

    @property
    def recommended(self) -> tuple[list[int], float]:
        """The recommended set and its loss: the first of :meth:`confirmed` if confirmed, else ``best_removed``."""
        if self.finalists:
            key = self.confirmed()[0]
            return list(key), self.finalists[key]
        return list(self.best_removed), self.best_loss

    def confirmed(self) -> list[tuple[int, ...]]:
        """The finalists, those measured on the most confirmation samples first, each group by lowest loss
        (a racing round's survivors before the sets it dropped)."""
        return sorted(self.finalists, key=lambda k: (-self.finalist_samples.get(k, 0), _rank(self.finalists[k]), k))

    def ranked(self) -> list[tuple[tuple[int, ...], float]]:
        """Every measured set of size M with its loss on the loop's samples, lowest first (the loop's own
        measurements and the ones it was given)."""
        sized = {k: v for k, v in self.known.items() if len(k) == self.num_remove}
        sized.update((tuple(h["removed"]), h["loss"]) for h in self.history if len(h["removed"]) == self.num_remove)
        sized.setdefault(tuple(self.best_removed), self.best_loss)
        return [(k, sized[k]) for k in _by_loss(sized)]

    def source(self, removed: Iterable[int]) -> str:
        """Where a measured set came from: a history ``source``, a start's label, ``"known"`` (measured
        before the loop) or ``"unmeasured"``."""
        key = removal_key(removed)
        for h in self.history:
            if tuple(h["removed"]) == key:
                return h["source"]
        return self.sources.get(key, "known" if key in self.known else "unmeasured")


def refine(oracle: LossOracle, prior: BlockRemovalProblem, num_remove: int, *, backend: str = "exact",
           budget_tokens: int, batch: int = 4, seed: int = 0, backend_params: dict[str, Any] | None = None,
           known: dict[tuple[int, ...], float] | None = None, local: int = 50,
           starts: Sequence[Iterable[int]] | dict[str, Iterable[int]] = (), progress: Any = None) -> Refinement:
    """Surrogate refinement for one M: fit, solve with ``backend``, measure the best unseen, repeat.

    Args:
        oracle: the calibration-loss oracle (the same one that measured ``prior``, so losses compare).
        prior: the measured QUBO (:func:`measured_problem`); its ``metadata["selection"]["base_loss"]``
            is ``L_0``.
        num_remove: M.
        backend: any name of :func:`qblock.backends.names` (exact, swap, sa, tabu, qaoa, leap-*, ...).
        budget_tokens: forward tokens this loop may spend (it stops before exceeding it; at least one
            round always runs, and it measures every start, even beyond the budget).
        batch: sets measured per round.
        seed: solver seed (round ``t`` uses ``seed + t``).
        backend_params: extra keyword arguments for :func:`qblock.solve`.
        known: measured ``{removed: loss}`` of other sets (any size) to fit on too (e.g. from another M).
        local: percent of each round (after the first) given to the surrogate's best unseen one-swap
            neighbours of the best measured sets (a trust region around the incumbent); the rest are the
            backend's proposals. ``0``: backend proposals only (neighbours only replace repeats).
        starts: sets of size M all measured in the first round before any proposal (e.g. from
            :func:`greedy_chain` or one-pass baselines), or ``{label: set}`` to name their source
            (``"start:<label>"``); the surrogate is then fitted to them and searches around them too.
        progress: a callable ``progress(tokens_spent, budget)`` or None.

    A backend that takes fewer than N variables with ``backend_params`` (:func:`qblock.backends.variable_limit`:
    QAOA simulates 22 qubits unless told more) solves the surrogate on :func:`solve_blocks` only; the swap
    neighbours still range over every block.

    Returns:
        A :class:`Refinement`.

    Raises:
        ValueError: M out of range, a bad budget or batch, or a backend too small to choose M blocks.
    """
    import qblock
    from qblock.backends import variable_limit

    n = prior.num_blocks
    M = check_num_remove(num_remove, n, low=1)
    if int(batch) < 1 or int(budget_tokens) < 0:
        raise ValueError("batch must be at least 1 and budget_tokens non-negative")
    t0, rounds, repeats = oracle.tokens, 0, 0
    base = (prior.metadata.get("selection") or {}).get("base_loss")
    base = _base_loss(oracle) if base is None else float(base)
    seen: dict[tuple[int, ...], float] = {k: v for k, v in (known or {}).items()}
    history: list[dict[str, Any]] = []
    total = math.comb(n, M)
    per_eval = None  # tokens of one evaluation, learnt from the first
    labelled = starts.items() if isinstance(starts, dict) else [("", s) for s in starts]
    labels: dict[tuple[int, ...], str] = {}
    for label, s in labelled:
        k = removal_key(s)  # once: a start may be a one-shot iterator
        if len(k) == M:
            labels.setdefault(k, f"start:{label}" if label else "start")
    first = list(labels)
    sur = prior.with_num_remove(M)
    limit = variable_limit(backend, backend_params)
    offered = solve_blocks(prior, M, limit)  # refuses an M the backend cannot choose, before any measurement
    while True:
        sur = surrogate_problem(prior, list(seen), list(seen.values()), base, M)
        measured_m = sum(1 for k in seen if len(k) == M)
        if measured_m >= total:
            break
        want = min(batch, total - measured_m)
        if per_eval is not None:
            left = int(budget_tokens) - (oracle.tokens - t0)
            want = min(want, left // per_eval)
            if want < 1:
                break
        on = solve_blocks(prior, M, limit, measured=seen, want=want)  # follows the incumbents; wider once measured
        offered = None if on is None else sorted(set(offered) | set(on))
        target = sur if on is None else restrict(sur, on)
        inside = measured_m if on is None else sum(1 for s in seen if len(s) == M and set(s) <= set(on))
        k = min(math.comb(target.num_blocks, M), want + inside)
        ss = qblock.solve(target, backend, num_solutions=k, seed=seed + rounds, **(backend_params or {}))
        lift = (lambda r: r) if on is None else (lambda r: [on[i] for i in r])
        props = [p for p in (removal_key(lift(target.removed_blocks(x))) for x in ss.samples()) if len(p) == M]
        fresh = [p for p in dict.fromkeys(props) if p not in seen]
        repeats += len(props) - len(fresh)
        # the surrogate's global proposals, and (trust-region style) its best unseen swap neighbours of the
        # best measured sets; neighbours also stand in for proposals the solver repeats
        n_local = min(want - 1, want * local // 100) if rounds > 0 else 0
        picks = [(p, labels[p]) for p in first if p not in seen] if rounds == 0 else []
        picks += [(p, "solver") for p in fresh if p not in first][: max(0, want - n_local - len(picks))]
        picks += [(p, "neighbour") for p in _neighbours(sur, seen, M, max(0, want - len(picks)),
                                                       exclude=[p for p, _ in picks])]
        if not picks:
            break
        before = oracle.tokens
        losses = measure(oracle, [p for p, _ in picks])  # one batch: in parallel on a Ray executor
        per_eval = per_eval or max(1, (oracle.tokens - before) // len(picks))
        for (p, source), loss in zip(picks, losses):
            seen[p] = loss
            history.append({"removed": list(p), "loss": loss, "round": rounds, "source": source})
        rounds += 1
        if progress is not None:
            progress(oracle.tokens - t0, budget_tokens)
    sur = surrogate_problem(prior, list(seen), list(seen.values()), base, M)
    sized = {k: v for k, v in seen.items() if len(k) == M}
    if not sized:
        raise ValueError(f"no set of size {M} was measured (no start, and the backend {backend!r} proposed "
                         "none of that size within the token budget)")
    best = _by_loss(sized)[0]
    before = {k: v for k, v in (known or {}).items() if len(k) == M}
    return Refinement(M, list(best), sized[best], history, sur, oracle.tokens - t0, backend, rounds, repeats,
                      known=before, sources={k: labels[k] for k in first if k in before}, solve_blocks=offered)


def solve_blocks(prior: BlockRemovalProblem, num_remove: int, max_variables: int | None,
                 measured: Mapping[tuple[int, ...], float] | None = None, want: int = 1) -> list[int] | None:
    """The blocks :func:`refine` gives a backend that takes at most ``max_variables`` variables: None when
    all N fit; else as many as the pool (``metadata["selection"]["pool"]``, else :func:`default_pool_size`) or
    ``M + 2`` if more, and more while fewer than ``want`` of their sets of size M are unmeasured, at most
    ``max_variables``. First the blocks of the best measured sets of size M (``measured``: ``{removed: loss}``,
    lowest loss first), so the solver can always search around the incumbents; then the most removable
    (lowest single-removal energy of ``prior``: the measured QUBO's pool first).

    Raises:
        ValueError: ``max_variables`` leaves no choice of M blocks (M or fewer variables).

    Example:
        >>> import numpy as np
        >>> prior = BlockRemovalProblem(np.diag([5.0, 1, 4, 2, 3, 9, 8, 7, 6, 10]), 2)
        >>> solve_blocks(prior, 2, 22) is None, solve_blocks(prior, 2, 4), solve_blocks(prior, 3, 9)
        (True, [1, 2, 3, 4], [0, 1, 2, 3, 4, 6, 7, 8])
        >>> solve_blocks(prior, 2, 4, measured={(5, 9): 0.1, (1, 2): 0.3})  # the best sets' blocks first
        [1, 2, 5, 9]
        >>> solve_blocks(prior, 2, 9, measured={(1, 2): 1, (1, 3): 1, (2, 3): 1}, want=26)  # C(8, 2) - 3 < 26
        [0, 1, 2, 3, 4, 5, 6, 7, 8]
    """
    n, M = prior.num_blocks, int(num_remove)
    if max_variables is None or n <= int(max_variables):
        return None
    limit = int(max_variables)
    _check_fits(limit, n, M)
    pool = ((prior.metadata or {}).get("selection") or {}).get("pool")
    size = min(limit, max(len(pool) if pool else default_pool_size(n), M + 2))
    single = np.argsort([prior.energy_of([i]) for i in range(n)], kind="stable").tolist()
    sized = _by_loss({removal_key(k): v for k, v in (measured or {}).items() if len(removal_key(k)) == M})
    order = list(dict.fromkeys([i for k in sized for i in sorted(k, key=single.index)] + single))
    while size < limit and math.comb(size, M) - sum(set(k) <= set(order[:size]) for k in sized) < int(want):
        size += 1
    return sorted(order[:size])


def check_backend_size(backend: str, backend_params: dict[str, Any] | None, num_blocks: int,
                       num_removes: Iterable[int]) -> int | None:
    """Refuse, before anything is measured, a loop backend too small to choose every M of ``num_blocks``;
    returns its variable limit (None: none).

    Example:
        >>> check_backend_size("qaoa", None, 30, [3, 9]), check_backend_size("exact", None, 30, [29])
        (22, None)
        >>> check_backend_size("qaoa", {"max_qubits": 8}, 30, [3, 9])
        Traceback (most recent call last):
        ...
        ValueError: qaoa takes at most 8 variables, too few to choose M = 9 of the 30 blocks; choose another backend or a smaller M
    """
    from qblock.backends import variable_limit

    limit = variable_limit(backend, backend_params)
    if limit is not None and int(num_blocks) > limit:
        for m in sorted({int(m) for m in num_removes}):
            _check_fits(limit, int(num_blocks), m, backend)
    return limit


def _check_fits(limit: int, n: int, M: int, backend: str = "the backend") -> None:
    """The one rule of :func:`solve_blocks`: a solver of ``limit`` variables chooses M of more blocks only if M < limit."""
    if M >= limit:
        raise ValueError(f"{backend} takes at most {limit} variables, too few to choose M = {M} of the {n} blocks; "
                         "choose another backend or a smaller M")


def restrict(problem: BlockRemovalProblem, blocks: Sequence[int]) -> BlockRemovalProblem:
    """``problem`` on ``blocks`` only, every other block kept: the same energy for every set inside them
    (its removal set ``r`` is ``[blocks[i] for i in r]`` in the whole problem).

    Example:
        >>> import numpy as np
        >>> A = np.arange(16.0).reshape(4, 4) / 10
        >>> p = BlockRemovalProblem(A + A.T, 2, linear=np.array([1.0, 2, 3, 4]))
        >>> q = restrict(p, [1, 3])
        >>> q.num_blocks, bool(np.isclose(q.energy_of([0, 1]), p.energy_of([1, 3])))
        (2, True)
    """
    b = np.asarray(blocks, dtype=np.intp)
    return BlockRemovalProblem(np.asarray(problem.H)[np.ix_(b, b)], problem.num_remove,
                               linear=np.asarray(problem.linear)[b], offset=problem.offset,
                               labels=[problem.labels[i] for i in b],
                               metadata=dict(problem.metadata or {}, restricted_to=[int(i) for i in b]))


def _neighbours(sur: BlockRemovalProblem, seen: dict[tuple[int, ...], float], M: int, count: int,
                exclude: Sequence[tuple[int, ...]] = ()) -> list[tuple[int, ...]]:
    """Unseen one-swap neighbours of the best measured sets of size M, lowest surrogate energy first."""
    n = sur.num_blocks
    sized = _by_loss(seen, [k for k in seen if len(k) == M])[:5]
    cand: dict[tuple[int, ...], float] = {}
    skip = set(seen) | set(exclude)
    for s in sized:
        inside = set(s)
        for i in s:
            for j in range(n):
                if j in inside:
                    continue
                t = removal_key((inside - {i}) | {j})
                if t not in skip and t not in cand:
                    cand[t] = sur.energy_of(t)
    return sorted(cand, key=lambda t: (cand[t], t))[:count]


def confirm(oracle: LossOracle, refinement: Refinement, top: int = 6,
            also: Iterable[Iterable[int]] = (), more: Sequence[LossOracle] = ()) -> Refinement:
    """Re-measure the ``top`` best sets of a refinement on a larger calibration sample; recommend the lowest.

    The loop ranks many sets on a small sample, so its few best sets differ by less than that sample's
    noise; measuring only those again on more tokens is cheap and picks among them on firmer ground.
    With ``more`` it races (F-Race style, Birattari et al. 2002): after each round the lowest set goes on
    with every other set the samples so far do not resolve from it (its paired margin over the lowest is
    not more than twice its standard error, :func:`qblock.validate.stats.paired_difference`), and those
    are measured again on the next oracle's samples; a set resolved worse is dropped, and racing stops
    once only the lowest is left. Each set's loss is its mean over every sample it was measured on
    (oracles weighted by their ``predicted_tokens``, else their ``num_samples``, else 1: the pooled loss
    when they count predictions). Oracles without per-sample losses (no ``sample_losses``) race the two
    lowest instead. So the sets the calibration data cannot yet tell apart are compared on the most
    samples, and a set ranked third on the first samples by noise is not dropped for it.

    Args:
        oracle: a loss oracle on more calibration tokens than the loop's (e.g. every calibration sample;
            never held-out ones).
        refinement: the result of :func:`refine`; updated in place and returned.
        top: how many of its best measured sets to re-measure (``0``: none).
        also: sets re-measured whatever their rank, on top of the ``top`` (e.g. the one-pass baselines'
            sets, so the recommendation is never worse on the first confirmation samples than those, or,
            racing, beat them on more); the loop's best is then re-measured too,
            even with ``top = 0``; sets of another size or not measured by the loop are skipped.
        more: oracles on further calibration samples, disjoint from ``oracle``'s and from each other
            (``()``: one round, no racing).

    Returns:
        ``refinement`` with ``finalists``, ``finalist_samples``, ``confirm_tokens``,
        ``confirm_evaluations`` and (where the oracles have ``sample_losses``) ``runner_up`` set;
        ``refinement.recommended`` is then the lowest finalist of the last round.

    Example:
        >>> class Noisy:  # the loop's oracle ranks 0 and 1 the wrong way round
        ...     tokens = 0
        ...     def __init__(self, bias): self.bias = bias
        ...     def loss(self, removed):
        ...         self.tokens += 10
        ...         return 1.0 + 0.1 * sum(removed) + self.bias.get(tuple(removed), 0.0)
        >>> res = Refinement(1, [1], 1.05, [{"removed": [1], "loss": 1.05}, {"removed": [0], "loss": 1.08},
        ...                  {"removed": [2], "loss": 1.09}], None, 0, "exact", 1)
        >>> confirm(Noisy({}), res, top=2).recommended, res.confirm_tokens
        (([0], 1.0), 20)
        >>> race = confirm(Noisy({(2,): -0.25}), res, top=3, more=[Noisy({})])  # 2 looks best on the first
        >>> race.recommended, sorted(race.finalist_samples.items())  # 1 was dropped after one round
        (([0], 1.0), [((0,), 2), ((1,), 1), ((2,), 2)])
    """
    if int(top) < 0:
        raise ValueError(f"top must be non-negative, got {top}")
    ranked = [key for key, _ in refinement.ranked()]
    extra = [k for k in dict.fromkeys(removal_key(s) for s in also) if k in ranked]
    keys = ranked[: max(int(top), 1 if extra else 0)]  # never a choice among the extra sets alone
    keys += [k for k in extra if k not in keys]
    refinement.finalists, refinement.finalist_samples, refinement.confirm_rounds = {}, {}, []
    total: dict[tuple[int, ...], float] = {}
    weight: dict[tuple[int, ...], float] = {}
    per: dict[tuple[int, ...], tuple[list[float], list[int]]] = {}  # per-sample losses and their tokens
    paired = True  # every round so far gave per-sample losses (else the pooled losses cannot be paired)
    for r, orc in enumerate([oracle, *more]):
        if r and len(keys) < 2:  # one finalist, or the race is decided
            break
        t0, n = orc.tokens, int(getattr(orc, "num_samples", 1))
        paired = paired and hasattr(orc, "sample_losses")
        values = measure(orc, keys)
        w = float(getattr(orc, "predicted_tokens", n))
        for key, v in zip(keys, values):
            total[key] = total.get(key, 0.0) + w * v
            weight[key] = weight.get(key, 0.0) + w
            refinement.finalist_samples[key] = refinement.finalist_samples.get(key, 0) + n
            refinement.finalists[key] = total[key] / weight[key]
            if paired:
                losses, toks = per.setdefault(key, ([], []))
                losses += orc.sample_losses(key)
                toks += orc.sample_tokens
        refinement.confirm_tokens += orc.tokens - t0
        refinement.confirm_evaluations += len(keys)
        keys = _by_loss(refinement.finalists, keys)
        refinement.confirm_rounds.append([{"removed": list(k), "loss": refinement.finalists[k]} for k in keys])
        keys = _survivors(keys, per if paired else {})
    refinement.runner_up = _runner_up(refinement, per) if paired else None
    return refinement


def _survivors(keys: list[tuple[int, ...]], per: dict[tuple[int, ...], tuple[list[float], list[int]]]) -> list:
    """The sets that race on: the lowest (``keys`` come lowest first) and every set not resolved worse
    than it on their common samples (the rule of every "resolved" verdict); the two lowest where
    per-sample losses are missing.

    Example:
        >>> per = {(0,): ([1.0, 1.2, 1.1], [1, 1, 1]), (1,): ([1.1, 1.1, 1.2], [1, 1, 1]),
        ...        (2,): ([2.0, 2.1, 2.2], [1, 1, 1])}
        >>> _survivors([(0,), (1,), (2,)], per)  # (2,) is resolved worse than (0,), (1,) is not
        [(0,), (1,)]
        >>> _survivors([(0,), (1,), (2,)], {})
        [(0,), (1,)]
    """
    from qblock.validate.stats import _resolved

    if any(k not in per for k in keys) or not keys:
        return keys[:2]
    out = keys[:1]
    for k in keys[1:]:
        d = _margin(per, keys[0], k)
        if d is None:  # nothing to pair on: it races on
            out.append(k)
        elif math.isfinite(d["diff"]) and not (d["diff"] > 0 and _resolved(d["diff"], d["se"])):
            out.append(k)  # a broken set (non-finite margin) never races on
    return out


def _margin(per: dict[tuple[int, ...], tuple[list[float], list[int]]], lead: tuple[int, ...],
            other: tuple[int, ...]) -> dict | None:
    """``other``'s loss minus ``lead``'s, paired over the samples both were measured on (the first ones: every
    round measures its sets on the same samples); None where either has no per-sample losses or fewer than
    two shared samples."""
    from qblock.validate.stats import paired_difference

    if lead not in per or other not in per:
        return None
    (a, wa), (b, wb) = per[lead], per[other]
    n = min(len(a), len(b))
    if wa[:n] != wb[:n] or n < 2:
        return None
    return paired_difference(b[:n], a[:n], weights=wa[:n])


def _runner_up(refinement: Refinement, per: dict[tuple[int, ...], tuple[list[float], list[int]]]) -> dict | None:
    """The second confirmed finalist against the first, paired over the samples both were measured on (the
    last round's sets, so all of their samples)."""
    order = refinement.confirmed()
    d = _margin(per, order[0], order[1]) if len(order) >= 2 else None
    if d is None or not math.isfinite(d["diff"]):  # too few samples, or a broken set among the two
        return None
    return {"removed": list(order[1]), "margin": d["diff"], "se": d["se"], "samples": d["n"]}


def greedy_chain(oracle: LossOracle, num_blocks: int, max_remove: int, *,
                 singles: dict[int, float] | None = None, progress: Any = None) -> dict[int, tuple[int, ...]]:
    """Starting sets for the loop: remove blocks one at a time, each step the one of least measured loss.

    This is SLEB's search order without its barriers (any block may go); run on a *cheap* oracle (a few
    calibration samples) it costs a fraction of SLEB and only screens: its sets are measured again by the
    loop and must win there. It finds sets the QUBO cannot propose, where a block that is costly alone
    becomes cheap once others are gone (the loss is not quadratic in the removal set).

    Args:
        oracle: the screening oracle.
        num_blocks: N.
        max_remove: the largest M needed.
        singles: ``{block: loss}`` of single removals already measured (on any oracle) to take the first
            step from; measured with ``oracle`` when None.
        progress: a callable ``progress(step, max_remove)`` or None.

    Returns:
        ``{m: removal set of size m}`` for ``m = 1 .. max_remove``.

    Example:
        >>> class Toy:  # block 0 is costly alone but cheap once two others are removed
        ...     tokens = 0
        ...     def loss(self, removed):
        ...         s = set(removed)
        ...         return len(s) + (0.0 if len(s - {0}) >= 2 else 5.0) * (0 in s) + 0.1 * sum(s)
        >>> greedy_chain(Toy(), 5, 3)
        {1: (1,), 2: (1, 2), 3: (0, 1, 2)}
    """
    n, top = int(num_blocks), int(max_remove)
    if not 0 <= top <= n:
        raise ValueError(f"max_remove must be between 0 and N = {n}, got {max_remove}")
    chain: dict[int, tuple[int, ...]] = {}
    current: tuple[int, ...] = ()
    for m in range(1, top + 1):
        if m == 1 and singles:
            losses = {(i,): float(v) for i, v in singles.items()}
        else:
            nxt = [removal_key(current + (j,)) for j in range(n) if j not in current]
            losses = dict(zip(nxt, measure(oracle, nxt)))  # one batch: in parallel on a Ray executor
        current = _by_loss(losses)[0]
        chain[m] = current
        if progress is not None:
            progress(m, top)
    return chain


def keep_chain(oracle: LossOracle, num_blocks: int, min_remove: int, *,
               progress: Any = None) -> dict[int, tuple[int, ...]]:
    """Starting sets for M above half the blocks: :func:`greedy_chain` walked from the other end. From the model
    with every block removed, keep blocks one at a time, each step the one whose return gives the least measured
    loss; for ``M > N / 2`` that end is nearer, so its ``N - M`` steps cost fewer passes than the ``M`` of the
    removal chain, and it finds which few blocks carry the model, which removing one at a time need not.

    Args:
        oracle: the screening oracle.
        num_blocks: N.
        min_remove: the smallest M needed (the chain stops there).
        progress: a callable ``progress(step, steps)`` or None.

    Returns:
        ``{m: removal set of size m}`` for ``m = N - 1`` down to ``min_remove``.

    Example:
        >>> class Toy:  # blocks 1 and 3 carry the model together
        ...     tokens = 0
        ...     def loss(self, removed):
        ...         kept = set(range(5)) - set(removed)
        ...         return 10.0 - 2 * len(kept & {1, 3}) - 4 * ({1, 3} <= kept) - 0.1 * len(kept)
        >>> keep_chain(Toy(), 5, 3)
        {4: (0, 1, 2, 4), 3: (0, 2, 4)}
    """
    n, low = int(num_blocks), int(min_remove)
    if not 1 <= low <= n:
        raise ValueError(f"min_remove must be between 1 and N = {n}, got {min_remove}")
    chain: dict[int, tuple[int, ...]] = {}
    kept: set[int] = set()
    for step, m in enumerate(range(n - 1, low - 1, -1), 1):
        nxt = [removal_key(set(range(n)) - kept - {j}) for j in range(n) if j not in kept]
        losses = dict(zip(nxt, measure(oracle, nxt)))  # one batch: in parallel on a Ray executor
        best = _by_loss(losses)[0]
        kept = set(range(n)) - set(best)
        chain[m] = best
        if progress is not None:
            progress(step, n - low)
    return chain
