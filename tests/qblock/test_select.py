"""The measured QUBO and the refinement loop (qblock.select), on synthetic loss oracles: offline, seeded, fast."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import qblock
from conftest import small_llama
from qblock.select import measured_problem, refine, surrogate_problem


class Oracle:
    """A synthetic calibration loss: additive costs, banded pair interactions and a cubic term the QUBO cannot hold."""

    def __init__(self, n: int, seed: int = 0, tokens_per_eval: int = 64) -> None:
        rng = np.random.default_rng(seed)
        self.n = n
        self.cost = rng.uniform(0.05, 1.0, n)
        self.pair = np.zeros((n, n))
        for i in range(n - 1):
            self.pair[i, i + 1] = self.pair[i + 1, i] = rng.uniform(0.1, 0.6)
        self.tokens_per_eval = tokens_per_eval
        self.tokens = 0
        self.calls: list[tuple[int, ...]] = []

    def true_loss(self, removed) -> float:
        s = sorted(int(i) for i in removed)
        x = np.zeros(self.n)
        x[s] = 1
        return 2.0 + float(self.cost @ x + x @ np.triu(self.pair) @ x) + 0.02 * len(s) ** 3 / self.n

    def loss(self, removed) -> float:
        self.tokens += self.tokens_per_eval
        self.calls.append(tuple(sorted(int(i) for i in removed)))
        return self.true_loss(removed)


def test_measured_problem_is_exact_at_zero_one_two_removals_inside_the_pool():
    o = Oracle(9, seed=1)
    p = measured_problem(o, 9, pool_size=9)
    L0 = o.true_loss(())
    for i in range(9):
        assert p.energy_of([i]) == pytest.approx(o.true_loss([i]) - L0, abs=1e-12)
    for i, j in itertools.combinations(range(9), 2):
        assert p.energy_of([i, j]) == pytest.approx(o.true_loss([i, j]) - L0, abs=1e-12)
    # cost accounting: 1 + N singles + N(N-1)/2 pairs, each one evaluation
    evals = 1 + 9 + 36
    assert o.tokens == evals * o.tokens_per_eval == p.metadata["selection"]["forward_tokens"]
    assert p.metadata["selection"]["single_evaluations"] + p.metadata["selection"]["pair_evaluations"] == evals


def test_pool_holds_the_most_removable_blocks_and_couplings_outside_are_imputed_by_distance():
    o = Oracle(12, seed=2)
    p = measured_problem(o, 12, pool_size=5)
    single = np.array([o.true_loss([i]) for i in range(12)])
    pool = sorted(np.argsort(single)[:5].tolist())
    assert p.metadata["selection"]["pool"] == pool
    assert len(o.calls) == 1 + 12 + 10  # no pair outside the pool was measured
    pairs = p.arrays["pair_losses"]
    assert np.isnan(pairs).sum() == 12 * 12 - 5 * 4  # only the pool's off-diagonal pairs are measured
    J = 2 * p.H
    measured = ~np.isnan(pairs)
    iu, ju = np.triu_indices(12, 1)
    for i, j in zip(iu, ju):
        if measured[i, j]:
            continue
        same = [J[a, b] for a, b in zip(iu, ju) if measured[a, b] and b - a == j - i]
        want = np.median(same) if len(same) >= 2 else np.median(J[iu, ju][measured[iu, ju]])
        assert J[i, j] == pytest.approx(want)


def test_surrogate_interpolates_measured_sets_with_a_small_ridge():
    o = Oracle(8, seed=3)
    prior = measured_problem(o, 8, pool_size=4)
    sets = [(0, 1, 2), (1, 3, 5), (2, 4, 6), (0, 5, 7)]
    losses = [o.true_loss(s) for s in sets]
    sur = surrogate_problem(prior, sets, losses, prior.metadata["selection"]["base_loss"], 3, ridge=1e-10)
    for s, y in zip(sets, losses):
        assert sur.energy_of(s) == pytest.approx(y - o.true_loss(()), abs=1e-6)
    assert sur.metadata["refined_on"] == 4


@pytest.mark.parametrize("m", [2, 4, 6])
def test_loop_best_is_the_lowest_measured_loss_and_the_tokens_add_up(m):
    o = Oracle(12, seed=4)
    prior = measured_problem(o, 12, pool_size=8)
    before = o.tokens
    res = refine(o, prior, m, backend="exact", budget_tokens=20 * o.tokens_per_eval, batch=4)
    losses = {tuple(h["removed"]): h["loss"] for h in res.history}
    assert all(len(k) == m for k in losses)
    assert len(losses) == len(res.history)  # never measured twice
    assert res.best_loss == min(losses.values()) and tuple(res.best_removed) in losses
    assert res.tokens == o.tokens - before == len(res.history) * o.tokens_per_eval <= 20 * o.tokens_per_eval
    assert res.best_loss == pytest.approx(o.true_loss(res.best_removed))


def test_refinement_reaches_the_true_optimum_on_a_small_instance():
    o = Oracle(10, seed=5)
    prior = measured_problem(o, 10, pool_size=10)
    true = min(itertools.combinations(range(10), 5), key=o.true_loss)
    res = refine(o, prior, 5, backend="exact", budget_tokens=60 * o.tokens_per_eval, batch=4)
    assert res.best_loss == pytest.approx(o.true_loss(true))


def test_a_solver_that_repeats_itself_is_topped_up_with_unseen_neighbours(monkeypatch):
    o = Oracle(10, seed=6)
    prior = measured_problem(o, 10, pool_size=6)
    real_solve = qblock.solve

    def stubborn(problem, backend, num_solutions=20, seed=None, **kw):  # always the same single state
        return real_solve(problem, backend, num_solutions=1, seed=seed, **kw)

    monkeypatch.setattr(qblock, "solve", stubborn)
    res = refine(o, prior, 3, backend="exact", budget_tokens=12 * o.tokens_per_eval, batch=3, local=0)
    assert len(res.history) == 12 and res.repeats >= 3
    assert {h["source"] for h in res.history} == {"solver", "neighbour"}
    assert len({tuple(h["removed"]) for h in res.history}) == 12


def test_without_local_moves_an_exact_solver_supplies_every_proposal():
    o = Oracle(10, seed=11)
    prior = measured_problem(o, 10, pool_size=6)
    res = refine(o, prior, 4, backend="exact", budget_tokens=12 * o.tokens_per_eval, batch=4, local=0)
    assert {h["source"] for h in res.history} == {"solver"} and len(res.history) == 12
    mixed = refine(Oracle(10, seed=11), prior, 4, backend="exact", budget_tokens=12 * o.tokens_per_eval, batch=4)
    assert [h["source"] for h in mixed.history].count("neighbour") == 4  # rounds 2 and 3: half of each


def test_loop_stops_when_every_state_is_measured():
    o = Oracle(5, seed=7)
    prior = measured_problem(o, 5, pool_size=5)
    res = refine(o, prior, 2, backend="exact", budget_tokens=10**9, batch=4, known=None)
    assert len(res.history) == math.comb(5, 2)


@pytest.mark.parametrize("backend,params", [
    ("exact", {}), ("swap", {}), ("sa", {}), ("tabu", {}), ("steepest", {}),
])
def test_loop_runs_with_any_classical_backend(backend, params):
    o = Oracle(10, seed=8)
    prior = measured_problem(o, 10, pool_size=6)
    res = refine(o, prior, 3, backend=backend, backend_params=params, budget_tokens=8 * o.tokens_per_eval, batch=4,
                 seed=1)
    assert res.backend == backend and len(res.history) == 8
    assert res.best_loss == min(h["loss"] for h in res.history)


def test_loop_runs_with_qaoa_on_a_small_problem():
    pytest.importorskip("qiskit_aer")
    o = Oracle(6, seed=9)
    prior = measured_problem(o, 6, pool_size=6)
    res = refine(o, prior, 2, backend="qaoa", budget_tokens=6 * o.tokens_per_eval, batch=3, seed=1)
    assert len(res.history) == 6 and res.backend == "qaoa"
    assert res.best_loss == min(h["loss"] for h in res.history)


def test_qaoa_in_the_loop_solves_on_the_most_removable_blocks_when_the_model_has_more():
    """A model with more blocks than QAOA simulates: the solver sees the pool (its proposals lie inside it), the
    swap neighbours range over every block, and an M the solver cannot choose is refused before any measurement."""
    pytest.importorskip("qiskit_aer")
    from qblock.select import check_backend_size

    o = Oracle(14, seed=11)
    prior = measured_problem(o, 14, pool_size=6)
    pool = prior.metadata["selection"]["pool"]
    known = {c: o.true_loss(c) for c in o.calls}  # every pair of the pool is measured already, as in a run
    res = refine(o, prior, 2, backend="qaoa", backend_params={"max_qubits": 8, "reps": 1, "maxiter": 20},
                 budget_tokens=9 * o.tokens_per_eval, batch=3, seed=1, known=known)
    assert len(res.history) == 9 and res.best_loss == min(v for _, v in res.ranked())
    # the pool's pairs all measured, the solver's blocks grow past the pool's size, never past the 8 it takes
    assert len(pool) < len(res.solve_blocks)
    assert len(qblock.select.solve_blocks(prior, 2, 8, measured=known, want=100)) == 8
    best = min(known, key=lambda k: (len(k) != 2, known[k]))  # the best known pair: its blocks are offered
    assert set(best) <= set(qblock.select.solve_blocks(prior, 2, 8, measured=known))
    assert all(set(h["removed"]) <= set(res.solve_blocks) for h in res.history if h["source"] == "solver")
    assert any(h["source"] == "solver" for h in res.history)
    # M + 2 blocks when the pool is smaller, never more than the solver takes
    assert len(qblock.select.solve_blocks(prior, 6, 8)) == 8 and qblock.select.solve_blocks(prior, 6, 20) is None
    with pytest.raises(ValueError, match="qaoa takes at most 8 variables, too few to choose M = 8 of the 14"):
        check_backend_size("qaoa", {"max_qubits": 8}, 14, [2, 8])


def test_keep_chain_walks_from_the_empty_model_and_costs_n_minus_m_steps():
    """Each step keeps the block whose return gives the least loss; it stops at the smallest M asked for."""
    from qblock.select import keep_chain

    o = Oracle(9, seed=12)
    chain = keep_chain(o, 9, 6)
    assert sorted(chain) == [6, 7, 8] and all(len(chain[m]) == m for m in chain)
    kept: set[int] = set()
    for m in (8, 7, 6):
        options = [tuple(sorted(set(range(9)) - kept - {j})) for j in range(9) if j not in kept]
        best = min(options, key=lambda k: (o.true_loss(k), k))
        assert chain[m] == best and (m == 8 or set(chain[m]) < set(chain[m + 1]))  # nested: blocks come back
        kept = set(range(9)) - set(best)
    assert len(o.calls) == 9 + 8 + 7  # one batch per step, every block not yet kept
    with pytest.raises(ValueError, match="min_remove"):
        keep_chain(o, 9, 0)


def test_loop_runs_with_the_mock_qpu():
    pytest.importorskip("dwave.system")
    from dwave.system.testing import MockDWaveSampler

    def factory(**config):
        return MockDWaveSampler(topology_type="pegasus", topology_shape=[4], substitute_kwargs={"seed": 3},
                                parameter_warnings=False)

    o = Oracle(8, seed=10)
    prior = measured_problem(o, 8, pool_size=5)
    res = refine(o, prior, 3, backend="dwave-qpu", backend_params={"sampler_factory": factory, "num_reads": 20},
                 budget_tokens=6 * o.tokens_per_eval, batch=3, seed=2)
    assert len(res.history) == 6 and res.best_loss == min(h["loss"] for h in res.history)


def test_bad_arguments_are_one_line_errors():
    o = Oracle(6)
    with pytest.raises(ValueError, match="pool_size"):
        measured_problem(o, 6, pool_size=7)
    prior = measured_problem(o, 6, pool_size=3)
    with pytest.raises(ValueError, match="num_remove"):
        refine(o, prior, 7, budget_tokens=100)
    with pytest.raises(ValueError, match="batch"):
        refine(o, prior, 2, budget_tokens=100, batch=0)


class _Broken(Oracle):
    """The synthetic loss, except that the model breaks (NaN or inf) without some sets of blocks."""

    def __init__(self, n: int, broken: dict[tuple[int, ...], float], seed: int = 0) -> None:
        super().__init__(n, seed=seed)
        self.broken = broken

    def true_loss(self, removed) -> float:
        key = tuple(sorted(int(i) for i in removed))
        return self.broken.get(key, Oracle.true_loss(self, key))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_removal_that_breaks_the_model_ranks_last_and_never_stops_the_search(bad):
    from qblock.select import confirm

    clean = Oracle(10, seed=12)
    best = min(itertools.combinations(range(10), 3), key=clean.true_loss)
    # the best set and a single removal break; the QUBO stays finite and the loop chooses among the rest
    o = _Broken(10, {best: bad, (best[0],): bad}, seed=12)
    prior = measured_problem(o, 10, pool_size=10)
    assert np.isfinite(prior.H).all() and np.isfinite(prior.linear).all()
    assert prior.energy_of([best[0]]) > max(prior.energy_of([i]) for i in range(10) if i != best[0])
    res = refine(o, prior, 3, budget_tokens=120 * o.tokens_per_eval, batch=4, starts=[best])
    assert best in {tuple(h["removed"]) for h in res.history} and math.isfinite(res.best_loss)
    assert res.ranked()[-1][0] == best  # measured, ranked last
    confirm(o, res, top=len(res.ranked()))  # the broken set is a finalist: never the recommendation
    assert res.confirmed()[-1] == best and math.isfinite(res.recommended[1])
    with pytest.raises(ValueError, match="full model"):
        measured_problem(_Broken(4, {(): bad}), 4)


def test_a_solver_proposing_the_wrong_size_is_not_measured(monkeypatch):
    o = Oracle(8, seed=13)
    prior = measured_problem(o, 8, pool_size=4)
    real_solve = qblock.solve

    def oversized(problem, backend, num_solutions=20, seed=None, **kw):  # states that remove M + 1 blocks
        return real_solve(problem.with_num_remove(problem.num_remove + 1), backend, num_solutions=num_solutions,
                          seed=seed, **kw)

    monkeypatch.setattr(qblock, "solve", oversized)
    with pytest.raises(ValueError, match="no set of size 3"):
        refine(o, prior, 3, budget_tokens=8 * o.tokens_per_eval, batch=4, local=0)
    assert all(len(c) != 4 for c in o.calls)
    res = refine(o, prior, 3, budget_tokens=8 * o.tokens_per_eval, batch=4, starts=[(0, 1, 2)])
    assert all(len(h["removed"]) == 3 for h in res.history) and len(res.history) == 8  # neighbours fill in


def test_the_full_models_pass_counts_when_the_prior_lacks_it():
    from qblock.problems.block_removal import BlockRemovalProblem

    o = Oracle(6, seed=14)
    res = refine(o, BlockRemovalProblem(np.zeros((6, 6)), 2), 2, budget_tokens=4 * o.tokens_per_eval, batch=4)
    assert o.calls[0] == () and res.tokens == o.tokens == 5 * o.tokens_per_eval


def test_measured_energy_on_a_tiny_model_equals_direct_masked_losses():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qblock.llm.energy import extract
    from qblock.validate.evaluate import heldout_loss
    from qblock.llm.gates import mask_blocks

    model = small_llama(5, vocab_size=40)
    samples = [torch.randint(0, 40, (12,)) for _ in range(3)]
    p = extract(model, samples, energy="measured", progress=False)
    pool = p.metadata["selection"]["pool"]
    assert p.metadata["energy"] == "measured" and len(pool) == 5  # max(8, N/2) capped at N

    def direct(removed):
        with mask_blocks(model, removed):
            return heldout_loss(model, samples)[0]

    L0 = direct([])
    for i in range(5):
        assert p.energy_of([i]) == pytest.approx(direct([i]) - L0, abs=1e-5)
    for i, j in itertools.combinations(pool, 2):
        assert p.energy_of([i, j]) == pytest.approx(direct([i, j]) - L0, abs=1e-5)
    # cost accounting: 1 + N + P(P-1)/2 evaluations of 3 x 12 tokens
    assert p.metadata["selection"]["forward_tokens"] == (1 + 5 + 10) * 36


class _Shifted(Oracle):
    """The same synthetic loss seen through a small sample: a per-set bias the larger sample does not have."""

    def __init__(self, base: Oracle, scale: float, seed: int = 3) -> None:
        self.__dict__.update(base.__dict__)
        self.tokens, self.calls = 0, []
        self.scale, self.rng_seed = scale, seed

    def true_loss(self, removed) -> float:
        key = tuple(sorted(int(i) for i in removed))
        bias = np.random.default_rng([self.rng_seed, *key]).normal(0.0, self.scale) if key else 0.0
        return Oracle.true_loss(self, key) + float(bias)


def test_confirm_remeasures_the_best_sets_and_recommends_the_lowest_confirmed():
    from qblock.select import confirm

    exact = Oracle(10, seed=4, tokens_per_eval=500)
    noisy = _Shifted(exact, scale=0.3)
    noisy.tokens_per_eval = 100
    prior = measured_problem(noisy, 10, pool_size=6)
    res = refine(noisy, prior, 3, budget_tokens=2000, batch=4)
    ranked = res.ranked()
    assert ranked[0] == (tuple(res.best_removed), res.best_loss)  # the loop's own choice, before confirming
    confirm(exact, res, top=5)
    assert list(res.finalists) == [k for k, _ in ranked[:5]]  # the five best of the loop, nothing else
    assert res.finalists == {k: pytest.approx(exact.true_loss(k)) for k in res.finalists}
    best = min(res.finalists, key=res.finalists.get)
    assert res.recommended == (list(best), res.finalists[best])
    assert res.confirm_tokens == exact.tokens == 5 * 500  # cost accounting: one larger pass per finalist
    assert confirm(exact, res, top=0).confirm_tokens == 5 * 500
    with pytest.raises(ValueError, match="top"):
        confirm(exact, res, top=-1)


def test_confirm_races_the_two_lowest_on_further_samples():
    """Oracles without per-sample losses (nothing to pair on): 8 finalists, then the two lowest on every
    further chunk; each set's loss is its sample-weighted mean over the chunks it was measured on; the lower
    of the last two wins."""
    from qblock.select import confirm

    exact = Oracle(12, seed=5, tokens_per_eval=100)
    noisy = _Shifted(exact, scale=0.3)
    prior = measured_problem(noisy, 12, pool_size=8)
    res = refine(noisy, prior, 4, budget_tokens=4000, batch=4)
    keys = [k for k, _ in res.ranked()[:8]]
    chunks = [_Shifted(exact, scale=0.2, seed=10 + c) for c in range(4)]
    for c, size in zip(chunks, (6, 6, 6, 3)):
        c.num_samples, c.tokens_per_eval = size, size * 10
    confirm(chunks[0], res, top=8, more=chunks[1:])
    assert [len(c.calls) for c in chunks] == [8, 2, 2, 2]
    assert sorted(res.finalist_samples[k] for k in keys) == [6] * 6 + [21] * 2
    for k in keys:
        seen = [c for c in chunks if k in c.calls]
        want = sum(c.num_samples * c.true_loss(k) for c in seen) / sum(c.num_samples for c in seen)
        assert res.finalists[k] == pytest.approx(want)
        assert all(k in c.calls for c in chunks[: len(seen)])  # dropped sets are never measured again
    # the two lowest on the first chunk race on every further one
    firsts = {k: chunks[0].true_loss(k) for k in keys}
    assert sorted(chunks[1].calls) == sorted(chunks[2].calls) == sorted(chunks[3].calls) \
        == sorted(sorted(keys, key=lambda k: (firsts[k], k))[:2])
    last = chunks[3].calls
    assert res.recommended == (list(min(last, key=lambda k: (res.finalists[k], k))), min(res.finalists[k] for k in last))
    assert res.confirmed()[:2] == sorted(last, key=lambda k: (res.finalists[k], k))
    assert res.confirm_tokens == sum(c.tokens for c in chunks) == 8 * 60 + 2 * 60 + 2 * 60 + 2 * 30
    assert res.confirm_evaluations == 14
    assert res.runner_up is None  # these oracles give no per-sample losses


class _Table:
    """A calibration chunk with given per-sample losses (equal tokens per sample): what racing pairs on."""

    def __init__(self, table: dict, tokens_per_sample: int = 10) -> None:
        self.table = {tuple(k): list(v) for k, v in table.items()}
        self.num_samples = len(next(iter(self.table.values())))
        self.sample_tokens = [tokens_per_sample] * self.num_samples
        self.tokens, self.calls = 0, []

    def loss(self, removed) -> float:
        key = tuple(sorted(removed))
        self.tokens += sum(self.sample_tokens)
        self.calls.append(key)
        return float(np.mean(self.table[key]))

    def sample_losses(self, removed) -> list[float]:
        return list(self.table[tuple(sorted(removed))])


def _four_finalists():
    from qblock.select import Refinement

    hist = [{"removed": [0, k], "loss": 1.0 + k / 100} for k in (1, 2, 3, 4)]
    return Refinement(2, [0, 1], 1.01, hist, None, 0, "exact", 1)


def test_confirm_races_every_finalist_the_samples_do_not_resolve_and_drops_the_rest():
    """F-Race: a set third on the first chunk by noise races on (and wins on more samples); a set resolved
    worse than the lowest is dropped after the first chunk; the recommendation is the lowest of the last raced."""
    from qblock.select import confirm
    from qblock.validate.stats import paired_difference

    a, b, c, d = (0, 1), (0, 2), (0, 3), (0, 4)
    first = _Table({a: [1.0, 1.1, 0.9, 1.0], b: [1.2, 1.0, 0.95, 1.05], c: [0.8, 1.5, 0.9, 1.2],
                    d: [2.0, 2.2, 1.9, 2.05]})
    second = _Table({a: [1.0, 1.05, 0.95, 1.0], b: [1.8, 1.9, 1.85, 1.8], c: [0.5, 0.55, 0.6, 0.5]})
    third = _Table({a: [1.0, 1.0], c: [0.6, 0.7]})
    # on the first chunk c is third and not resolved from a, d is resolved worse
    assert paired_difference(first.table[c], first.table[a])["diff"] > paired_difference(first.table[b], first.table[a])["diff"]
    res = confirm(first, _four_finalists(), top=4, more=[second, third])
    assert first.calls == [a, b, c, d] and sorted(second.calls) == [a, b, c] and sorted(third.calls) == [a, c]
    assert res.finalist_samples == {a: 10, b: 8, c: 10, d: 4}
    assert res.recommended == ([0, 3], pytest.approx((0.8 + 1.5 + 0.9 + 1.2 + 0.5 + 0.55 + 0.6 + 0.5 + 0.6 + 0.7) / 10))
    assert res.confirmed()[:2] == [c, a] and res.runner_up["removed"] == [0, 1] and res.runner_up["samples"] == 10
    assert res.confirm_tokens == 4 * 40 + 3 * 40 + 2 * 20 and res.confirm_evaluations == 9
    # the rounds as measured, lowest first: without racing a would have been recommended
    assert [[tuple(e["removed"]) for e in rnd] for rnd in res.confirm_rounds] == [[a, b, c, d], [c, a, b], [c, a]]
    assert res.confirm_rounds[-1][0]["loss"] == res.recommended[1]


def test_confirm_stops_racing_once_the_lowest_is_resolved_from_every_other():
    from qblock.select import confirm

    a, b, c, d = (0, 1), (0, 2), (0, 3), (0, 4)
    first = _Table({a: [1.0, 1.1, 0.9, 1.0], b: [1.5, 1.6, 1.4, 1.52], c: [2.0, 2.1, 1.9, 2.0], d: [1.3, 1.4, 1.2, 1.3]})
    spare = _Table({k: [1.0, 1.0] for k in (a, b, c, d)})
    res = confirm(first, _four_finalists(), top=4, more=[spare])
    assert spare.tokens == 0 and res.recommended[0] == [0, 1] and set(res.finalist_samples.values()) == {4}
    assert res.runner_up["removed"] == [0, 4] and res.runner_up["margin"] > 2 * res.runner_up["se"]


def test_survivors_pair_on_common_samples_and_never_race_a_broken_set():
    from qblock.select import _survivors

    a, b, c, d = (0, 1), (0, 2), (0, 3), (0, 4)
    per = {a: ([1.0, 1.1, 0.9], [2, 1, 1]), b: ([1.0, 1.3, 1.0], [2, 1, 1]),  # b: +0.075 +- 0.05 token-weighted
           c: ([float("nan"), 1.0, 1.0], [2, 1, 1]), d: ([1.2, 1.3], [2, 1])}  # d: measured on fewer samples
    assert _survivors([a, b, c, d], per) == [a, b]  # c broken, d resolved worse on the two samples it shares with a
    assert _survivors([a, (0, 5)], {a: ([1.0], [1]), (0, 5): ([9.0], [1])}) == [a, (0, 5)]  # one sample: unresolved
    assert _survivors([a, b, c], {a: per[a], b: per[b]}) == [a, b]  # a set without per-sample losses: the two lowest


def test_confirm_pairs_only_while_every_round_gave_per_sample_losses():
    """A further oracle without per-sample losses: the race falls back to the two lowest and states no runner-up."""
    from qblock.select import confirm

    a, b, c, d = (0, 1), (0, 2), (0, 3), (0, 4)
    first = _Table({a: [1.0, 1.1, 0.9, 1.0], b: [1.2, 1.0, 0.95, 1.05], c: [0.8, 1.5, 0.9, 1.2], d: [1.3, 1.0, 1.0, 1.1]})
    plain = Oracle(6, seed=1, tokens_per_eval=10)
    last = _Table({k: [1.0, 1.0] for k in (a, b, c, d)})
    res = confirm(first, _four_finalists(), top=4, more=[plain, last])
    assert len(res.confirm_rounds[1]) == 4 and len(last.calls) == 2  # all four unresolved, then the two lowest
    assert res.runner_up is None


def test_confirm_without_further_samples_or_with_one_finalist_does_not_race():
    from qblock.select import confirm

    exact = Oracle(10, seed=6, tokens_per_eval=100)
    prior = measured_problem(exact, 10, pool_size=6)
    res = refine(exact, prior, 3, budget_tokens=2000, batch=4)
    spare = Oracle(10, seed=6, tokens_per_eval=100)
    confirm(exact, res, top=1, more=[spare])
    assert spare.tokens == 0 and len(res.finalists) == 1 and res.confirm_evaluations == 1
    confirm(exact, res, top=3)  # a second confirmation replaces the first one's finalists
    assert len(res.finalists) == 3 and set(res.finalist_samples.values()) == {1}


def test_select_removals_confirms_on_more_samples_and_accounts_for_it():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qblock.llm.measured import CalibrationLoss, select_removals

    model = small_llama(6, vocab_size=40)
    samples = [torch.randint(0, 40, (12,)) for _ in range(6)]
    sel = select_removals(model, samples[:2], [2, 3], pool_size=4, evaluations_per_m=6, confirm_samples=samples,
                          confirm_top=3, one_pass=False)
    direct = CalibrationLoss(model, samples)
    checker = sel["confirm_oracle"]
    assert sel["shared_tokens"] == sel["prior"].metadata["selection"]["forward_tokens"] + 6 * 12
    for m, ref in sel["refinements"].items():
        assert list(ref.finalists) == [k for k, _ in ref.ranked()[:3]]
        for k, v in ref.finalists.items():
            assert v == pytest.approx(direct.loss(k), abs=1e-6)
        assert ref.confirm_tokens == 3 * 6 * 12
        assert ref.recommended[1] == min(ref.finalists.values())
    assert checker.tokens == 6 * 12 * (1 + 3 + 3)


def test_select_removals_measures_pairs_on_fewer_samples_with_consistent_couplings():
    """Pairs on the first k samples: each coupling is L_ij - L_i - L_j + L_0 all on those k samples, the
    singles stay on every sample, and the pair oracle's tokens count as shared."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qblock.llm.measured import CalibrationLoss, select_removals

    model = small_llama(6, vocab_size=40)
    samples = [torch.randint(0, 40, (12,)) for _ in range(4)]
    sel = select_removals(model, samples, [2], pool_size=3, evaluations_per_m=2, pair_samples=2, one_pass=False)
    prior, few, every = sel["prior"], CalibrationLoss(model, samples[:2]), CalibrationLoss(model, samples)
    pool = [int(i) for i in prior.arrays["pool"]]
    assert len(pool) == 3
    for i in range(6):
        assert prior.arrays["single_losses"][i] == pytest.approx(every.loss((i,)), abs=1e-6)
    for a, b in [(pool[0], pool[1]), (pool[0], pool[2]), (pool[1], pool[2])]:
        want = few.loss((a, b)) - few.loss((a,)) - few.loss((b,)) + few.loss(())
        assert 2 * prior.H[a, b] == pytest.approx(want, abs=1e-6)
        assert prior.arrays["pair_losses"][a, b] == pytest.approx(few.loss((a, b)), abs=1e-6)
    # singles and full model on 4 samples; the pair oracle's full model, 3 singles and 3 pairs on 2
    assert prior.metadata["selection"]["forward_tokens"] == 7 * 48 + 7 * 24
    assert sel["shared_tokens"] == prior.metadata["selection"]["forward_tokens"]
    # the pairs' own L_0 and singles are kept: the couplings can be rebuilt from the problem alone
    sel_meta, ps = prior.metadata["selection"], prior.arrays["pair_single_losses"]
    assert sel_meta["pairs_own_samples"] and sel_meta["pair_base_loss"] == pytest.approx(few.loss(()), abs=1e-6)
    assert np.isnan(ps[[i for i in range(6) if i not in pool]]).all()
    a, b = pool[:2]
    assert prior.arrays["pair_losses"][a, b] - ps[a] - ps[b] + sel_meta["pair_base_loss"] == pytest.approx(2 * prior.H[a, b])
    # M = 2: the pairs measured on 2 samples are not the loop's candidates; its sets are measured on all 4
    for key, loss in sel["refinements"][2].ranked():
        assert loss == pytest.approx(every.loss(key), abs=1e-6)
    # a pool without pairs spends nothing on the pair samples
    lone = select_removals(model, samples, [2], pool_size=1, evaluations_per_m=2, pair_samples=2, one_pass=False)
    assert not lone["prior"].metadata["selection"]["pairs_own_samples"]
    assert lone["prior"].metadata["selection"]["forward_tokens"] == 7 * 48
    with pytest.raises(ValueError, match="pair_samples"):
        select_removals(model, samples, [2], pool_size=3, evaluations_per_m=2, pair_samples=0, one_pass=False)


def test_select_removals_races_on_further_samples_with_exact_pooled_losses():
    """A raced finalist's loss is the calibration loss on every sample it was measured on, as if measured
    at once (samples of unequal length: chunks weigh by predicted tokens); the chunks' full-model passes
    are shared."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qblock.llm.measured import CalibrationLoss, select_removals

    model = small_llama(6, vocab_size=40)
    samples = [torch.randint(0, 40, (12,)) for _ in range(4)] + [torch.randint(0, 40, (6 + 3 * i,)) for i in range(6)]
    sel = select_removals(model, samples[:2], [2], pool_size=4, evaluations_per_m=6, confirm_samples=samples[:4],
                          race_samples=samples[4:], confirm_top=4, one_pass=False)
    assert [o.num_samples for o in sel["race_oracles"]] == [4, 2]
    chunk_tokens = [sum(len(s) for s in samples[i:i + 4]) for i in (4, 8)]  # 42 and 39
    assert sel["shared_tokens"] == sel["prior"].metadata["selection"]["forward_tokens"] + 4 * 12 + sum(chunk_tokens)
    ref = sel["refinements"][2]
    for k, n in ref.finalist_samples.items():
        assert ref.finalists[k] == pytest.approx(CalibrationLoss(model, samples[:n]).loss(k), abs=1e-6)
    # after each chunk exactly the sets not resolved from the lowest (on every sample so far) race on
    from qblock.select import _survivors

    counts = ref.finalist_samples
    for upto, after in ((4, 8), (8, 10)):
        cal = CalibrationLoss(model, samples[:upto])
        racing = sorted((k for k, c in counts.items() if c >= upto), key=lambda k: (cal.loss(k), k))
        per = {k: (cal.sample_losses(k), cal.sample_tokens) for k in racing}
        assert sorted(k for k, c in counts.items() if c >= after) == sorted(_survivors(racing, per) if len(racing) > 1 else [])
    raced = [sum(c >= n for c in counts.values()) for n in (8, 10)]
    assert len(counts) == 4 and raced[0] >= 2  # a tiny random model: its finalists are close
    assert ref.confirm_tokens == 4 * 4 * 12 + raced[0] * chunk_tokens[0] + raced[1] * chunk_tokens[1]
    assert ref.confirm_evaluations == 4 + sum(raced)
    # the runner-up: another racer, paired with the recommendation over the 10 samples both were measured on
    from qblock.validate.stats import paired_difference

    first, second = ref.confirmed()[:2]
    up, whole = ref.runner_up, CalibrationLoss(model, samples[:10])
    assert up["removed"] == list(second) and up["samples"] == 10
    assert up["margin"] == pytest.approx(ref.finalists[second] - ref.finalists[first], abs=1e-6)
    want = paired_difference(whole.sample_losses(second), whole.sample_losses(first), weights=whole.sample_tokens)
    assert up["se"] == pytest.approx(want["se"], abs=1e-6) and up["se"] > 0
    # the chunks' recorded outputs are freed after the loop; their losses stay, a new set records again
    race = sel["race_oracles"][0]
    before, known = race.tokens, next(iter(race.measured()))
    race.loss(known)
    assert race.tokens == before
    race.loss((0, 1, 2))
    assert race.tokens == before + 2 * chunk_tokens[0]


def test_one_pass_sets_start_the_loop_and_are_always_confirmed():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qblock.llm.measured import one_pass_sets, select_removals
    from qblock.validate.baselines import angular, block_statistics, shortgpt

    model = small_llama(6, vocab_size=40)
    samples = [torch.randint(0, 40, (12,)) for _ in range(6)]
    one = one_pass_sets(model, samples[:2], [2, 3])
    stats = block_statistics(model, samples[:2])
    for m in (2, 3):  # the baselines' own rules on the same samples
        assert one[m] == {"shortgpt": tuple(shortgpt(stats, m, 2).removed), "angular": tuple(angular(stats, m, 2).removed)}
    sel = select_removals(model, samples[:2], [2, 3], pool_size=4, evaluations_per_m=6, confirm_samples=samples,
                          confirm_top=1)
    # the statistics pass is one pass over the selection samples, shared by every M
    assert sel["shared_tokens"] == sel["prior"].metadata["selection"]["forward_tokens"] + 6 * 12 + 2 * 12
    confirmed = 0
    for m, ref in sel["refinements"].items():
        ranked = [k for k, _ in ref.ranked()]
        extra = [k for k in dict.fromkeys(one[m].values()) if k != ranked[0]]
        assert list(ref.finalists) == ranked[:1] + extra  # confirmed whatever their rank in the loop
        assert all(ref.source(k) in ("start:shortgpt", "start:angular") for k in extra)
        assert ref.confirm_tokens == len(ref.finalists) * 6 * 12
        confirmed += len(ref.finalists)
    assert sel["confirm_oracle"].tokens == 6 * 12 * (1 + confirmed)


def test_sets_measured_before_the_loop_are_candidates_too():
    """At M = 2 the measured QUBO's pairs are known before the loop: they rank and can be confirmed."""
    exact = Oracle(8, seed=3, tokens_per_eval=100)
    prior = measured_problem(exact, 8, pool_size=8)  # every pair measured
    known = {c: exact.true_loss(c) for c in exact.calls}
    res = refine(exact, prior, 2, budget_tokens=0, batch=2, known=known)
    pairs = {k: v for k, v in known.items() if len(k) == 2}
    assert len(pairs) == 28  # all of them: the loop has nothing left to measure
    assert dict(res.ranked()) == pairs and res.history == []
    assert res.ranked()[0][0] == tuple(res.best_removed)
    assert res.source(res.best_removed) == "known"


class _Masked(Oracle):
    """Block 0 is costly alone and cheap once three others are gone: no QUBO over singles and pairs sees it."""

    def true_loss(self, removed) -> float:
        s = set(int(i) for i in removed)
        base = super().true_loss(s - {0})
        return base + ((0.01 if len(s - {0}) >= 3 else 5.0) if 0 in s else 0.0)


def test_greedy_chain_steps_by_least_measured_loss_and_finds_what_the_qubo_cannot():
    from qblock.select import greedy_chain

    oracle = _Masked(10, seed=2)
    chain = greedy_chain(oracle, 10, 5)
    assert sorted(chain) == [1, 2, 3, 4, 5]
    for m in range(2, 6):  # each step adds one block, the one of least loss given the previous step
        prev, cur = set(chain[m - 1]), set(chain[m])
        assert prev < cur and len(cur) == m
        best = min((j for j in range(10) if j not in prev), key=lambda j: oracle.true_loss(prev | {j}))
        assert cur - prev == {best}
    assert 0 in chain[5]
    assert len(oracle.calls) == sum(10 - k for k in range(5))
    with pytest.raises(ValueError, match="max_remove"):
        greedy_chain(oracle, 10, 11)


def test_given_singles_spare_the_first_step_and_starts_are_measured_first():
    from qblock.select import greedy_chain

    oracle = _Masked(10, seed=2)
    singles = {i: oracle.true_loss((i,)) for i in range(10)}
    chain = greedy_chain(oracle, 10, 4, singles=singles)
    assert len(oracle.calls) == sum(10 - k for k in range(1, 4))
    prior = measured_problem(oracle, 10, pool_size=5)
    res = refine(oracle, prior, 4, budget_tokens=6 * 64, batch=3, starts=[chain[4], (1, 2)])
    first = res.history[0]
    assert first["source"] == "start" and tuple(first["removed"]) == chain[4]
    assert all(h["source"] != "start" for h in res.history[1:])  # the wrong-sized start is ignored
    assert res.best_loss <= oracle.true_loss(chain[4])


def test_select_removals_screens_with_a_chain_and_counts_its_tokens():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qblock.llm.measured import select_removals

    model = small_llama(6, vocab_size=40)
    samples = [torch.randint(0, 40, (12,)) for _ in range(3)]
    sel = select_removals(model, samples, [2, 3], pool_size=4, evaluations_per_m=4, screen_samples=1,
                          one_pass=False)
    chain_passes = (6 - 1) + (6 - 2)  # steps 2 and 3 (step 1 reuses the measured singles)
    screen_tokens = (1 + chain_passes) * 12  # its own full-model pass is recorded first
    assert sel["shared_tokens"] == sel["prior"].metadata["selection"]["forward_tokens"] + screen_tokens
    ref = sel["refinements"][3]  # (at M = 2 the chain's pair may be one the pool measured already)
    assert ref.history[0]["source"] == "start:greedy" and len(ref.history[0]["removed"]) == 3
    # above N / 2 the screen also walks from the empty model: N - M steps, its set a start of the loop
    far = select_removals(model, samples, [4], pool_size=4, evaluations_per_m=4, screen_samples=1, one_pass=False)
    removal_steps = (6 - 1) + (6 - 2) + (6 - 3)
    extra = far["shared_tokens"] - far["prior"].metadata["selection"]["forward_tokens"] - (1 + removal_steps) * 12
    # its 6 sets of 5 blocks are new; of its 5 sets of 4 those the removal chain asked for are charged once
    assert 6 * 12 <= extra <= (6 + 5) * 12
    from qblock.select import keep_chain
    from qblock.validate.oracle import CalibrationLoss

    kept = keep_chain(CalibrationLoss(model, samples[:1]), 6, 4)[4]
    starts = {tuple(h["removed"]): h["source"] for h in far["refinements"][4].history if h["round"] == 0}
    assert starts.get(kept) in ("start:keep", "start:greedy")  # measured first (labelled greedy if the same set)


def test_sleb_and_a_screen_through_one_book_measure_each_set_once_and_count_their_own_tokens():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qblock.llm.measured import OracleBook
    from qblock.select import greedy_chain
    from qblock.validate.baselines import sleb

    model = small_llama(6, vocab_size=40)
    samples = [torch.randint(0, 40, (12,)) for _ in range(2)]
    alone = sleb(model, samples, 3, barriers=(0, 0))  # every block a candidate, as in the screen's chain
    book = OracleBook(model)
    shared = sleb(model, samples, 3, barriers=(0, 0), book=book)
    assert [(r.removed, r.forward_passes, r.extra["calib_loss"]) for r in shared] == \
        [(r.removed, r.forward_passes, r.extra["calib_loss"]) for r in alone]  # bitwise the same losses
    oracle = book.oracle([s.clone() for s in samples])  # found by the samples' tokens
    assert oracle.evaluations == 1 + 6 + 5 + 4  # the full model, then every candidate of three steps
    screen = book.view(samples)
    chain = greedy_chain(screen, 6, 3)
    assert chain == {r.num_remove: tuple(r.removed) for r in shared}  # SLEB's own search order
    assert oracle.evaluations == 1 + 6 + 5 + 4  # nothing measured again
    assert screen.tokens == (1 + 6 + 5 + 4) * 2 * 12  # what the screen would have spent alone
    assert screen.evaluations == 1 + 6 + 5 + 4


def test_sleb_never_picks_a_removal_that_breaks_the_model(monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qblock.validate.baselines import sleb
    from qblock.validate.oracle import CalibrationLoss

    model = small_llama(5, vocab_size=40)
    samples = [torch.randint(0, 40, (12,)) for _ in range(2)]
    first = sleb(model, samples, 1)[0].removed
    real = CalibrationLoss.loss_many

    def broken(self, sets, **kw):  # the model breaks without SLEB's first choice
        return [math.nan if list(s) == first else v for s, v in zip(sets, real(self, sets, **kw))]

    monkeypatch.setattr(CalibrationLoss, "loss_many", broken)
    assert sleb(model, samples, 1)[0].removed != first


def test_starts_beyond_the_batch_are_all_measured_and_one_shot_iterators_work():
    o = Oracle(10, seed=5, tokens_per_eval=100)
    prior = measured_problem(o, 10, pool_size=6)
    starts = {"a": (0, 1, 2), "b": iter([3, 4, 5]), "c": [6, 7, 8], "wrong size": (1, 2)}
    res = refine(o, prior, 3, budget_tokens=200, batch=1, starts=starts)
    first = [h for h in res.history if h["round"] == 0]
    # every start in the first round (beyond the batch of 1 and the budget of 2 evaluations), nothing else
    assert [(tuple(h["removed"]), h["source"]) for h in first] == [
        ((0, 1, 2), "start:a"), ((3, 4, 5), "start:b"), ((6, 7, 8), "start:c")]
    assert all(len(k) == 3 for k, _ in res.ranked())


def test_confirming_extra_sets_also_confirms_the_loops_best():
    from qblock.select import confirm

    o = Oracle(10, seed=6, tokens_per_eval=100)
    prior = measured_problem(o, 10, pool_size=6)
    res = refine(o, prior, 3, budget_tokens=1200, batch=4, starts={"s": (7, 8, 9)})
    worst = res.ranked()[-1][0]
    confirm(o, res, top=0, also=[worst, (1, 2)])  # a wrong-sized extra set is skipped
    assert list(res.finalists) == [res.ranked()[0][0], worst]
    assert res.recommended[0] == list(res.ranked()[0][0])
