"""Depth-pruning baselines the QUBO method is compared against.

Every baseline runs on the same model and calibration samples as the QUBO extraction and returns
the blocks it removes together with its measured cost (forward passes over its calibration samples,
counted as they happen, and seconds):

=====================  ==========================================================================
``shortgpt``           ShortGPT block influence ``BI_i = 1 - mean_tokens cos(h_in_i, h_out_i)``;
                       remove the M lowest at once (1 pass).
``shortgpt_iterative`` remove the lowest BI, recompute on the pruned model, repeat (M passes).
``angular``            Gromov et al.: ``d(l) = mean_samples arccos(cos(h_in_l, h_in_{l+M})) / pi`` on
                       the last token; remove blocks ``l* .. l*+M-1``, ``l* = argmin d`` (1 pass).
                       The "input" of block ``N`` is the output of the last block.
``sleb``               SLEB greedy: remove the block whose removal raises calibration loss least,
                       recompute, M times; as its reference implementation, never the first or last
                       block (``(N-2) + (N-3) + ... + (N-M-1)`` passes; M <= N - 2).
``norm_ratio``         mean over tokens of ``||h_out_i|| / ||h_in_i||``; remove the M lowest (1 pass).
``random``             uniformly random M-subsets, one per seed (no passes).
=====================  ==========================================================================

Hidden states are captured with forward hooks on the modules returned by
:func:`qblock.llm.blocks.find_blocks` (not ``output_hidden_states``, whose last entry is taken after
the final norm). Greedy methods are computed once for the largest M; the first M steps of that run
*are* the run for a smaller M, and its cost is the cost of those M steps.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> torch.manual_seed(0) and None
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=2)).eval()
    >>> calib = [torch.randint(0, 50, (16,)) for _ in range(4)]
    >>> res = run_baselines(model, calib, [1, 2], methods=["shortgpt", "angular"])
    >>> sorted({(r.method, r.num_remove, len(r.removed)) for r in res})
    [('angular', 1, 1), ('angular', 2, 2), ('shortgpt', 1, 1), ('shortgpt', 2, 2)]
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from qblock._lazy import require
from qblock.problems.block_removal import removal_key

__all__ = [
    "BASELINE_METHODS",
    "BaselineResult",
    "block_statistics",
    "shortgpt",
    "shortgpt_iterative",
    "angular_distance",
    "angular",
    "sleb",
    "norm_ratio",
    "random_sets",
    "run_baselines",
]

BASELINE_METHODS = ("shortgpt", "shortgpt_iterative", "angular", "sleb", "norm_ratio")


@dataclass
class BaselineResult:
    """One baseline's choice for one M and what it cost.

    Attributes:
        method: baseline name (see :data:`BASELINE_METHODS`, or ``"random"``).
        num_remove: M.
        removed: sorted removed block indices.
        forward_passes: forward passes over the method's calibration samples that produced this choice.
        calib_samples: how many calibration samples each pass covered.
        seconds: wall time of those passes (and the selection).
        order: removal order for greedy methods.
        scores: the per-block (or per-window) scores a one-shot method ranked.
        seed: the seed of a random set.
    """

    method: str
    num_remove: int
    removed: list[int]
    forward_passes: int
    calib_samples: int
    seconds: float
    order: list[int] | None = None
    scores: list[float] | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _torch():
    return require("torch", "llm")


def _as_samples(samples):
    torch = _torch()
    out = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in samples]
    out = [s for s in out if s.numel() >= 2]  # as every pass that predicts (forward_tokens counts the same)
    if not out:
        raise ValueError("baselines need at least one calibration sample of two or more tokens")
    return out


def block_statistics(model, samples: Sequence[Any], *, removed: Iterable[int] = (), batch_size: int = 8,
                     progress: bool = False, desc: str = "block statistics") -> dict[str, Any]:
    """One forward pass over ``samples`` (optionally with ``removed`` blocks masked) measuring per block:

    * ``bi``: ``1 - mean cos(h_in, h_out)`` over real tokens (ShortGPT block influence),
    * ``norm_ratio``: mean ``||h_out|| / ||h_in||`` over real tokens,
    * ``last``: ``(S, N+1, d)`` float64 last-token hidden states: the inputs of blocks ``0..N-1`` and
      the output of block ``N-1``,
    * ``tokens``: how many tokens were measured.

    Sums are accumulated in float64; padding tokens are excluded.
    """
    from qblock.llm.blocks import find_blocks, first_tensor, hidden_from_call
    from qblock.llm.gates import mask_blocks
    from qblock.validate.evaluate import _batches, _pad, model_device

    torch = _torch()
    samples = _as_samples(samples)
    blocks = find_blocks(model)
    n = len(blocks)
    cos_sum = np.zeros(n)
    ratio_sum = np.zeros(n)
    tokens = 0
    last: list[np.ndarray] = []
    state: dict[str, Any] = {}

    def make_hook(i: int):
        def hook(module, args, kwargs, output):
            h_in = hidden_from_call(args, kwargs).detach()
            h_out = first_tensor(output).detach()
            valid = state["valid"]
            a = h_in[valid].double()
            b = h_out.to(a.device)[valid].double()
            na, nb = a.norm(dim=-1), b.norm(dim=-1)
            cos = (a * b).sum(-1) / (na * nb).clamp_min(1e-30)
            cos_sum[i] += float(cos.sum())
            ratio_sum[i] += float((nb / na.clamp_min(1e-30)).sum())
            rows = torch.arange(h_in.shape[0], device=h_in.device)
            state["last"][:, i] = h_in[rows, state["last_idx"].to(h_in.device)].double().cpu().numpy()
            if i == n - 1:
                state["last"][:, n] = h_out.to(h_in.device)[rows, state["last_idx"].to(h_in.device)].double().cpu().numpy()
        return hook

    handles = [mod.register_forward_hook(make_hook(i), with_kwargs=True) for i, (_, mod) in enumerate(blocks)]
    dev = model_device(model)
    batches = list(_batches([s.numel() for s in samples], batch_size, None))
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, unit="batch", leave=False)
    order: list[int] = []
    try:
        with mask_blocks(model, list(removed)), torch.inference_mode():
            for b in it:
                ids, mask = _pad([samples[i] for i in b])
                state["valid"] = mask.bool().to(dev)
                state["last_idx"] = mask.sum(1) - 1
                state["last"] = np.zeros((len(b), n + 1, int(_hidden_size(model, blocks))))
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
                tokens += int(mask.sum())
                last.append(state["last"])
                order.extend(b)
    finally:
        for h in handles:
            h.remove()
    last_arr = np.concatenate(last)[np.argsort(order)]
    return {"bi": 1.0 - cos_sum / tokens, "norm_ratio": ratio_sum / tokens, "last": last_arr, "tokens": tokens,
            "num_blocks": n}


def _hidden_size(model, blocks) -> int:
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    text_cfg = getattr(cfg, "text_config", None)
    if text_cfg is not None and isinstance(getattr(text_cfg, "hidden_size", None), int):
        return text_cfg.hidden_size
    raise ValueError("could not read the hidden size from the model config")


def _lowest(scores: np.ndarray, m: int, exclude: Iterable[int] = ()) -> list[int]:
    ex = set(int(i) for i in exclude)
    order = [int(i) for i in np.argsort(scores, kind="stable") if int(i) not in ex]
    return order[:m]


def angular_distance(last: np.ndarray, m: int) -> np.ndarray:
    """``d(l) = mean_s arccos(cos(x_s[l], x_s[l+m])) / pi`` for ``l = 0 .. N-m`` from ``last`` (S, N+1, d)."""
    a, b = last[:, : last.shape[1] - m], last[:, m:]
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)
    return (np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi).mean(axis=0)


def _check_m(method: str, m: int, n: int) -> None:
    """The baselines' one rule for M (a larger M silently gave N blocks labelled M)."""
    if not 1 <= int(m) <= n:
        raise ValueError(f"{method} needs 1 <= M <= N = {n}, got {m}")


def shortgpt(stats: dict[str, Any], m: int, calib_samples: int, seconds: float = 0.0) -> BaselineResult:
    """ShortGPT one-shot: the ``m`` blocks of lowest block influence (from :func:`block_statistics`)."""
    _check_m("shortgpt", m, len(stats["bi"]))
    return BaselineResult("shortgpt", m, sorted(_lowest(stats["bi"], m)), 1, calib_samples, seconds,
                          scores=[float(v) for v in stats["bi"]])


def norm_ratio(stats: dict[str, Any], m: int, calib_samples: int, seconds: float = 0.0) -> BaselineResult:
    """The ``m`` blocks of lowest mean ``||h_out|| / ||h_in||``."""
    _check_m("norm_ratio", m, len(stats["norm_ratio"]))
    return BaselineResult("norm_ratio", m, sorted(_lowest(stats["norm_ratio"], m)), 1, calib_samples, seconds,
                          scores=[float(v) for v in stats["norm_ratio"]])


def angular(stats: dict[str, Any], m: int, calib_samples: int, seconds: float = 0.0) -> BaselineResult:
    """Gromov et al.: the window of ``m`` consecutive blocks with the smallest last-token angular distance."""
    _check_m("angular", m, int(stats["num_blocks"]))
    d = angular_distance(stats["last"], m)
    start = int(np.argmin(np.nan_to_num(np.asarray(d, dtype=np.float64), nan=np.inf)))  # a broken window (NaN) is last
    return BaselineResult("angular", m, list(range(start, start + m)), 1, calib_samples, seconds,
                          scores=[float(v) for v in d], extra={"start": start})


def shortgpt_iterative(model, samples: Sequence[Any], max_remove: int, *, batch_size: int = 8,
                       progress: bool = False) -> list[BaselineResult]:
    """Iterative ShortGPT: remove the lowest-BI block, recompute BI on the pruned model, repeat.

    Returns one result per M = 1..max_remove (the first M steps; cost M passes each).
    """
    from qblock.llm.blocks import find_blocks

    _check_m("shortgpt_iterative", max_remove, len(find_blocks(model)))
    samples = _as_samples(samples)
    removed: list[int] = []
    out = []
    t0 = time.perf_counter()
    it = range(max_remove)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="ShortGPT iterative", unit="step", leave=False)
    for step in it:
        st = block_statistics(model, samples, removed=removed, batch_size=batch_size)
        nxt = _lowest(st["bi"], 1, exclude=removed)[0]
        removed.append(nxt)
        out.append(BaselineResult("shortgpt_iterative", step + 1, sorted(removed), step + 1, len(samples),
                                  time.perf_counter() - t0, order=list(removed)))
    return out


#: SLEB's reference implementation never removes the first and the last block (its ``early_barrier`` and
#: ``latter_barrier``, both 1 by default)
SLEB_BARRIERS = (1, 1)


def sleb_kept(num_blocks: int, barriers: tuple[int, int] = SLEB_BARRIERS) -> set[int]:
    """The blocks SLEB never removes: the first ``barriers[0]`` and the last ``barriers[1]`` (they always
    survive, so they are the first and last surviving ones at every step).

    Example:
        >>> sorted(sleb_kept(30))
        [0, 29]
    """
    early, late = (int(b) for b in barriers)
    if min(early, late) < 0:
        raise ValueError(f"SLEB's barriers must be non-negative, got {tuple(barriers)}")
    return set(range(min(early, num_blocks))) | set(range(max(0, num_blocks - late), num_blocks))


def sleb_reach(num_blocks: int, barriers: tuple[int, int] = SLEB_BARRIERS) -> int:
    """The most blocks SLEB's code can remove: all but :func:`sleb_kept`.

    Example:
        >>> sleb_reach(30), sleb_reach(30, (0, 0))
        (28, 30)
    """
    return num_blocks - len(sleb_kept(num_blocks, barriers))


def sleb(model, samples: Sequence[Any], max_remove: int, *, barriers: tuple[int, int] = SLEB_BARRIERS,
         start: Sequence[int] = (), batch_size: int = 8, progress: bool = False, pool: Any = None,
         book: Any = None) -> list[BaselineResult]:
    """SLEB greedy: at each step remove the block whose removal gives the lowest calibration loss.

    Returns one result per M = 1..max_remove; the cost of M is the candidate passes of its first M
    steps (``(N-2) + (N-3) + ... + (N-M-1)`` with the default ``barriers``: the first ``barriers[0]`` and
    the last ``barriers[1]`` surviving blocks are never candidates, as in SLEB's own code; ``(0, 0)``
    searches every block). The losses come from a
    :class:`qblock.validate.oracle.CalibrationLoss` on ``samples``: one recorded pass of the full model, and
    each candidate computes only the blocks from its first difference with the set measured before it
    (:class:`qblock.validate.evaluate.PrefixCache`; the losses are those of plain masked passes).

    ``pool`` (a :mod:`qblock.executor` executor) spreads each step's candidates over model actors; the
    losses, the choice and the counted passes are the same as here. ``book`` (an
    :class:`qblock.validate.oracle.OracleBook`) shares the oracle with other methods of a run on the same
    samples (qblock's screen walks much of the same chain): a set measured by either is computed once, and the
    counted passes are still SLEB's own.

    ``start``: the first steps of a path already taken (its blocks in the order removed, e.g. SLEB's own
    ``order`` on the same samples): the search continues from them, and only the results for M above
    ``len(start)`` are returned, with the passes of the new steps.
    """
    from qblock.llm.blocks import find_blocks
    from qblock.validate.oracle import OracleBook

    samples = _as_samples(samples)
    n = len(find_blocks(model))
    early, late = (int(b) for b in barriers)
    reach = sleb_reach(n, barriers)
    if max_remove > reach:
        raise ValueError(f"SLEB keeps the first {early} and the last {late} block(s): it can remove at most "
                         f"{reach} of {n} blocks, not {max_remove}")
    removed = [int(i) for i in start]
    if len(set(removed)) != len(removed) or not all(0 <= i < n for i in removed) or len(removed) > max_remove:
        raise ValueError(f"start must be distinct blocks of 0..{n - 1}, at most max_remove = {max_remove}, "
                         f"got {list(start)}")
    oracle = (book or OracleBook(model, batch_size=batch_size, executor=pool)).oracle(samples)
    passes = 0
    out = []
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(n - early - late - k for k in range(len(removed), max_remove)), desc="SLEB",
                   unit="pass", leave=False)
    try:
        for step in range(len(removed), max_remove):
            alive = [i for i in range(n) if i not in removed]
            cands = alive[early:len(alive) - late]
            ticked = [0]  # the bar moves as each new set finishes, then by those another method measured

            def tick(*_: Any) -> None:
                ticked[0] += 1
                if bar is not None:
                    bar.update(1)

            losses = oracle.loss_many([removed + [i] for i in cands], on_result=tick)
            passes += len(cands)
            if bar is not None:
                bar.update(len(cands) - ticked[0])
            # the first of equal losses (ties keep the lowest index); a removal that breaks the model (NaN) is last
            k = int(np.argmin(np.nan_to_num(np.asarray(losses, dtype=np.float64), nan=np.inf)))
            removed.append(cands[k])
            out.append(BaselineResult("sleb", step + 1, sorted(removed), passes, len(samples),
                                      time.perf_counter() - t0, order=list(removed),
                                      extra={"calib_loss": float(losses[k])}))
    finally:
        if bar is not None:
            bar.close()
        oracle.release()  # the recorded block outputs; the measured losses stay (shared through a book)
    return out


def random_sets(num_blocks: int, m: int, count: int, seed: int = 0) -> list[BaselineResult]:
    """``count`` distinct uniformly random M-subsets; set k comes from ``default_rng(seed + k)`` (skipping repeats)."""
    import math

    count = min(int(count), math.comb(num_blocks, m))
    out, seen = [], set()
    s = int(seed)
    while len(out) < count:
        rng = np.random.default_rng(s)
        sel = removal_key(rng.choice(num_blocks, size=m, replace=False))
        if sel not in seen:
            seen.add(sel)
            out.append(BaselineResult("random", m, list(sel), 0, 0, 0.0, seed=s))
        s += 1
    return out


def run_baselines(model, samples: Sequence[Any], num_removes: Sequence[int], *,
                  methods: Sequence[str] = BASELINE_METHODS, greedy_samples: Sequence[Any] | None = None,
                  batch_size: int = 8, progress: bool = False, pool: Any = None,
                  book: Any = None) -> list[BaselineResult]:
    """Run the chosen baselines for every M in ``num_removes``, sharing work between them.

    Args:
        model: the model (unchanged on return).
        samples: calibration samples (the same as the QUBO extraction's).
        num_removes: the values of M.
        methods: subset of :data:`BASELINE_METHODS`.
        greedy_samples: calibration samples for the greedy methods (``sleb``, ``shortgpt_iterative``),
            which cost many passes; default ``samples``.
        batch_size: forward batch size.
        progress: show progress bars.
        pool: a :mod:`qblock.executor` executor for SLEB's candidate passes (``None``: here).
        book: an :class:`qblock.validate.oracle.OracleBook` SLEB measures through (shared with other
            methods of a run; see :func:`sleb`).

    Returns:
        A list of :class:`BaselineResult`, method-major, in the order of ``num_removes``.
    """
    unknown = [m for m in methods if m not in BASELINE_METHODS]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINE_METHODS)}")
    samples = _as_samples(samples)
    greedy = _as_samples(greedy_samples) if greedy_samples is not None else samples
    ms = [int(m) for m in num_removes]
    if not ms:
        return []
    out: list[BaselineResult] = []
    one_shot = [m for m in methods if m in ("shortgpt", "angular", "norm_ratio")]
    if one_shot:
        t0 = time.perf_counter()
        st = block_statistics(model, samples, batch_size=batch_size, progress=progress)
        dt = time.perf_counter() - t0
        fn = {"shortgpt": shortgpt, "angular": angular, "norm_ratio": norm_ratio}
        for name in one_shot:
            for m in ms:
                r = fn[name](st, m, len(samples), dt)
                r.extra["shared_pass"] = len(one_shot) > 1
                out.append(r)
    if "shortgpt_iterative" in methods:
        path = shortgpt_iterative(model, greedy, max(ms), batch_size=batch_size, progress=progress)
        out.extend(path[m - 1] for m in ms if m >= 1)
    if "sleb" in methods:
        from qblock.llm.blocks import find_blocks

        n = len(find_blocks(model))
        fits = [m for m in ms if 1 <= m <= sleb_reach(n)]  # no SLEB row for an M it cannot reach
        if fits:
            path = sleb(model, greedy, max(fits), batch_size=batch_size, progress=progress, pool=pool, book=book)
            out.extend(path[m - 1] for m in fits)
    order = {name: k for k, name in enumerate(methods)}
    out.sort(key=lambda r: (order[r.method], ms.index(r.num_remove)))
    return out
