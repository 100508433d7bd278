"""Statistics of a validation run, computed *only* from the per-candidate table.

Every number the validator reports (rank correlations, bootstrap intervals, the "best candidate"
statement) is a pure function of the rows written to ``candidates.csv`` / ``candidates.json``, so it
can be recomputed by anyone from those files (a test does exactly that).

A row is a dict with at least ``num_remove``, ``method``, ``removed`` (list of block indices),
``energy`` and ``heldout_loss``; see :data:`qblock.validate.report.BASE_COLUMNS` for the full set.

Example:
    >>> rows = [
    ...     {"num_remove": 1, "method": "qubo", "rank": 1, "removed": [2], "energy": 0.1, "heldout_loss": 2.0},
    ...     {"num_remove": 1, "method": "qubo", "rank": 2, "removed": [1], "energy": 0.2, "heldout_loss": 2.2},
    ...     {"num_remove": 1, "method": "shortgpt", "rank": None, "removed": [0], "energy": 0.5,
    ...      "heldout_loss": 2.5},
    ... ]
    >>> s = summarize(rows, n_boot=200, seed=0)
    >>> s["per_m"]["1"]["correlations"]["energy"]["spearman"]
    1.0
    >>> s["per_m"]["1"]["best"]["statement"].split(":")[0]
    'M=1'
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from qblock.problems.block_removal import removal_key

__all__ = [
    "QUBO_METHOD",
    "SELECT_METHOD",
    "MEASURED_METHOD",
    "RANDOM_METHOD",
    "REFERENCE_METHOD",
    "is_baseline",
    "energy_columns",
    "unique_candidates",
    "rank_correlation",
    "correlations",
    "paired_difference",
    "best_vs_baseline",
    "summarize",
    "recommended",
    "parse_removed",
]

QUBO_METHOD = "qubo"
#: qblock's recommended set per M: the lowest measured calibration loss of the refinement loop
SELECT_METHOD = "qblock"
#: other sets the refinement loop measured (ranked by calibration loss), evaluated for the correlations
MEASURED_METHOD = "measured"
RANDOM_METHOD = "random"
#: the unpruned model; listed in the table for reference, never part of a statistic
REFERENCE_METHOD = "full"


def is_baseline(method: str) -> bool:
    """True for a selection baseline (ShortGPT, angular, SLEB, norm ratio); false for qblock's own
    candidates (QUBO states, the recommended and measured sets), random sets and the full model."""
    return method not in (QUBO_METHOD, SELECT_METHOD, MEASURED_METHOD, RANDOM_METHOD, REFERENCE_METHOD)


def _finite(v: Any) -> bool:
    """A finite real number, Python's or numpy's (``np.int64`` from a pandas row too); not None."""
    return v is not None and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v))


def energy_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Energy columns present in the table: ``energy`` (the problem's model) then ``energy_<model>``."""
    cols: list[str] = []
    for r in rows:
        for k in r:
            if (k == "energy" or k.startswith("energy_")) and k not in cols:
                cols.append(k)
    cols.sort(key=lambda k: (k != "energy", k))
    return cols


def unique_candidates(rows: Sequence[Mapping[str, Any]], num_remove: int) -> list[Mapping[str, Any]]:
    """Rows at ``num_remove`` with a measured held-out loss, one per distinct removal set.

    A set proposed by several methods (e.g. QUBO rank 1 and ShortGPT) is one candidate model, so it
    is counted once in a correlation (the first row in table order is kept).
    """
    seen: set[tuple[int, ...]] = set()
    out = []
    for r in rows:
        if int(r["num_remove"]) != int(num_remove) or r["method"] == REFERENCE_METHOD:
            continue
        if not _finite(r.get("heldout_loss")):
            continue
        key = removal_key(r["removed"])
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out


def rank_correlation(x: Sequence[float], y: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, Any]:
    """Spearman and Kendall rank correlation of ``x`` and ``y`` with percentile bootstrap intervals.

    The bootstrap resamples the (x, y) pairs with replacement ``n_boot`` times using
    ``numpy.random.default_rng(seed)``; resamples in which either variable is constant have no
    correlation and are skipped (their number is reported as ``n_boot_used``).

    Returns:
        ``{"n", "spearman", "spearman_p", "spearman_ci", "kendall", "kendall_p", "kendall_ci",
        "n_boot", "n_boot_used", "seed", "level"}``; correlations are ``None`` for fewer than 3
        points or constant input.

    Example:
        >>> r = rank_correlation([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0], n_boot=100)
        >>> round(r["spearman"], 6), round(r["kendall"], 6)
        (0.8, 0.666667)
    """
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = int(x.size)
    out: dict[str, Any] = {"n": n, "spearman": None, "spearman_p": None, "spearman_ci": None,
                           "kendall": None, "kendall_p": None, "kendall_ci": None,
                           "n_boot": int(n_boot), "n_boot_used": 0, "seed": int(seed), "level": float(level)}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    sp = stats.spearmanr(x, y)
    kt = stats.kendalltau(x, y)
    out.update(spearman=float(sp.statistic), spearman_p=float(sp.pvalue),
               kendall=float(kt.statistic), kendall_p=float(kt.pvalue))
    rng = np.random.default_rng(seed)
    boot_s, boot_k = [], []
    for _ in range(int(n_boot)):
        idx = rng.integers(0, n, size=n)
        bx, by = x[idx], y[idx]
        if np.ptp(bx) == 0 or np.ptp(by) == 0:
            continue
        boot_s.append(stats.spearmanr(bx, by).statistic)
        boot_k.append(stats.kendalltau(bx, by).statistic)
    if boot_s:
        lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
        out["spearman_ci"] = [float(np.nanpercentile(boot_s, lo)), float(np.nanpercentile(boot_s, hi))]
        out["kendall_ci"] = [float(np.nanpercentile(boot_k, lo)), float(np.nanpercentile(boot_k, hi))]
    out["n_boot_used"] = len(boot_s)
    return out


def correlations(rows: Sequence[Mapping[str, Any]], num_remove: int, *, n_boot: int = 2000, seed: int = 0,
                 loss_key: str = "heldout_loss") -> dict[str, dict[str, Any]]:
    """Rank correlation between each energy column and the held-out loss over the distinct candidates at M."""
    cands = unique_candidates(rows, num_remove)
    out = {}
    for col in energy_columns(cands):
        pts = [(float(r[col]), float(r[loss_key])) for r in cands if _finite(r.get(col))]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        out[col] = rank_correlation(xs, ys, n_boot=n_boot, seed=seed)
    return out


def _describe(r: Mapping[str, Any]) -> str:
    method = str(r["method"])
    if method == QUBO_METHOD and r.get("rank") not in (None, ""):
        method = f"QUBO rank {int(r['rank'])}"
    elif method == SELECT_METHOD:
        method = "qblock's recommended set"
    elif method == MEASURED_METHOD and r.get("rank") not in (None, ""):
        method = f"measured set #{int(r['rank'])}"
    elif method == RANDOM_METHOD and r.get("seed") not in (None, ""):
        method = f"random (seed {int(r['seed'])})"
    blocks = ",".join(str(int(i)) for i in sorted(int(i) for i in r["removed"]))
    return f"{method} removing [{blocks}]"


def paired_difference(a: Sequence[float], b: Sequence[float],
                      weights: Sequence[float] | None = None) -> dict[str, Any]:
    """Difference of two sets' losses measured on the same samples, with its standard error.

    ``diff`` is the mean of the per-sample differences ``a - b``, weighted by ``weights`` (each sample's
    token count: then it equals the difference of the token-weighted losses); ``se`` treats the samples
    as independent (the ratio estimator's error where weights differ; the plain standard error of the
    mean where they are equal); ``wins``: samples where ``a`` is lower.

    Example:
        >>> r = paired_difference([1.0, 2.0, 3.0], [1.5, 2.0, 2.0])
        >>> round(r["diff"], 4), round(r["se"], 4), r["wins"], r["n"]
        (0.1667, 0.441, 1, 3)
        >>> round(paired_difference([1.0, 2.0], [0.0, 0.0], weights=[1, 3])["diff"], 4)  # (1*1 + 3*2) / 4
        1.75
    """
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    w = [1.0] * len(d) if weights is None else [float(x) for x in weights]
    n, total = len(d), sum(w)
    if len(w) != n or n == 0 or total <= 0:
        raise ValueError("paired_difference needs as many positive weights as samples, at least one sample")
    mu = sum(wi * di for wi, di in zip(w, d)) / total
    se = math.sqrt(n / (n - 1) * sum((wi * (di - mu)) ** 2 for wi, di in zip(w, d))) / total if n > 1 else math.nan
    return {"diff": mu, "se": se, "wins": sum(x < 0 for x in d), "n": n}


def _resolved(margin: float, se: float) -> bool:
    """The rule every "resolved" verdict uses: a margin more than twice its standard error."""
    return abs(margin) > 2 * se


def samples_to_resolve(margin: float, se: float, samples: int) -> int | None:
    """About how many samples would resolve (:func:`_resolved`) a margin of this size, were it the truth.

    The standard error of a mean shrinks as one over the square root of the sample count, so ``samples``
    samples with error ``se`` become ``2 se`` against ``|margin|`` at ``samples * (2 se / |margin|)^2``,
    given to two significant figures. An extrapolation from a noisy margin: ``None`` where the margin is
    within one standard error (its size is then mostly noise; it would take more than 4x the samples), zero,
    or a number is missing.

    Example:
        >>> samples_to_resolve(0.0235, 0.0136, 24)  # a runner-up +0.0235 ± 0.0136 on 24 samples
        33
        >>> samples_to_resolve(0.0264, 0.0204, 24)  # 57.3: two significant figures
        58
        >>> samples_to_resolve(0.0014, 0.0072, 112) is None  # within one standard error
        True
    """
    if not (samples and _finite(margin) and _finite(se)) or abs(margin) <= se:
        return None
    need = samples * (2 * se / abs(margin)) ** 2
    step = 10 ** max(0, math.floor(math.log10(need)) - 1)  # two significant figures, rounded up
    return int(math.ceil(need / step) * step)


def _resolution(rec: Mapping[str, Any], bb: Mapping[str, Any]) -> dict[str, Any] | None:
    """The paired difference of the recommended set's and the best baseline's per-sample held-out losses
    (``heldout_sample_losses``, weighted by ``heldout_sample_tokens``), or None where they are the same
    set or either lacks them."""
    a, b = rec.get("heldout_sample_losses"), bb.get("heldout_sample_losses")
    w = rec.get("heldout_sample_tokens")
    lists = all(isinstance(x, (list, tuple)) for x in (a, b, w))
    if (removal_key(rec["removed"]) == removal_key(bb["removed"]) or not lists or w != bb.get("heldout_sample_tokens")
            or not len(a) == len(b) == len(w) or len(a) < 2):
        return None
    return paired_difference(a, b, weights=w)


def best_vs_baseline(rows: Sequence[Mapping[str, Any]], num_remove: int) -> dict[str, Any]:
    """Which candidate at M is best on held-out loss, and how the best QUBO state compares to the best baseline.

    Ties on loss are broken by table order. The margin is ``loss(best baseline) - loss(best QUBO)``
    (positive: QUBO better) and the perplexity ratio ``ppl(best baseline) / ppl(best QUBO)``. Where the
    rows carry per-sample held-out losses (``heldout_sample_losses`` and ``heldout_sample_tokens``), the
    recommended set's margin over the best baseline comes with its paired standard error
    (``recommended_margin_se``), and the statement says whether the margin is more than twice it: 12
    held-out samples do not resolve 0.02 nats/token. The best baseline is the lowest of several on these
    very samples, so a margin against it leans its way.
    """
    m = int(num_remove)
    cands = [r for r in rows if int(r["num_remove"]) == m and r["method"] != REFERENCE_METHOD
             and _finite(r.get("heldout_loss"))]
    out: dict[str, Any] = {"num_remove": m, "best": None, "best_qubo": None, "best_baseline": None,
                           "best_random": None, "margin_loss": None, "ppl_ratio": None, "statement": None,
                           "recommended": None, "recommended_margin_loss": None, "recommended_margin_se": None,
                           "recommended_margin_samples": None}
    if not cands:
        out["statement"] = f"M={m}: no evaluated candidates"
        return out

    def pick(pred):
        sel = [r for r in cands if pred(r)]
        return min(sel, key=lambda r: float(r["heldout_loss"])) if sel else None

    best = pick(lambda r: True)
    bq = pick(lambda r: r["method"] == QUBO_METHOD)
    bb = pick(lambda r: is_baseline(str(r["method"])))
    br = pick(lambda r: r["method"] == RANDOM_METHOD)

    def brief(r):
        if r is None:
            return None
        return {"method": r["method"], "rank": r.get("rank"), "removed": [int(i) for i in r["removed"]],
                "heldout_loss": float(r["heldout_loss"]), "perplexity": math.exp(float(r["heldout_loss"])),
                "description": _describe(r)}

    rec = pick(lambda r: r["method"] == SELECT_METHOD)
    out.update(best=brief(best), best_qubo=brief(bq), best_baseline=brief(bb), best_random=brief(br),
               recommended=brief(rec))
    parts = [f"M={m}: best on held-out data is {_describe(best)} "
             f"(loss {float(best['heldout_loss']):.4f}, ppl {math.exp(float(best['heldout_loss'])):.2f})"]
    if rec is not None and bb is not None:
        margin = float(bb["heldout_loss"]) - float(rec["heldout_loss"])
        out["recommended_margin_loss"] = margin
        res = _resolution(rec, bb)
        sure = ""
        if res is not None and margin != 0 and math.isfinite(res["se"]):
            out.update(recommended_margin_se=res["se"], recommended_margin_samples=res["n"])
            resolved = _resolved(margin, res["se"])
            sure = (f" ({'more than' if resolved else 'within'} twice the paired standard error "
                    f"{res['se']:.4f} over {res['n']} held-out samples" + ("" if resolved else ": not resolved") + ")")
        parts.append(f"qblock's recommended set (loss {float(rec['heldout_loss']):.4f}) "
                     + (f"beats the best baseline ({_describe(bb)}) by {margin:.4f} nats/token{sure}" if margin > 0 else
                        f"loses to the best baseline ({_describe(bb)}) by {-margin:.4f} nats/token{sure}" if margin < 0
                        else f"ties the best baseline ({_describe(bb)})"))
    if bq is not None and bb is not None:
        margin = float(bb["heldout_loss"]) - float(bq["heldout_loss"])
        ratio = math.exp(margin)
        out.update(margin_loss=margin, ppl_ratio=ratio)
        if margin > 0:
            verdict = (f"the best QUBO candidate ({_describe(bq)}) beats the best baseline "
                       f"({_describe(bb)}) by {margin:.4f} nats/token (perplexity {ratio:.3f}x lower)")
        elif margin < 0:
            verdict = (f"the best baseline ({_describe(bb)}) beats the best QUBO candidate "
                       f"({_describe(bq)}) by {-margin:.4f} nats/token (perplexity {1 / ratio:.3f}x lower)")
        else:
            verdict = f"the best QUBO candidate and the best baseline ({_describe(bb)}) tie"
        parts.append(verdict)
    if br is not None:
        parts.append(f"best random set loss {float(br['heldout_loss']):.4f}")
    out["statement"] = "; ".join(parts)
    return out


def recommended(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """qblock's recommendation per M, from the table's ``qblock`` rows (chosen on calibration loss only).

    Returns:
        ``{"<M>": {"removed", "method", "source", "calibration_loss", "confirmation_loss",
        "confirmation_samples", "heldout_loss", "selection_tokens", "selection_backward_tokens",
        "runner_up"}}`` (``source``: where the set came from, e.g. ``solver``, ``neighbour``,
        ``start:greedy``, ``start:shortgpt``; ``calibration_loss`` on the selection samples,
        ``confirmation_loss`` on the ``confirmation_samples`` calibration samples the confirmation measured
        it on, ``None`` without one; ``runner_up``: the confirmation's second set, ``{"removed",
        "calibration_margin"`` (its confirmed loss minus the recommendation's), ``"calibration_margin_se"``
        (paired), ``"resolved"`` (the margin above twice that), ``"samples"`` (how many it is paired over),
        ``"samples_to_resolve"`` (where not resolved: about how many would resolve a margin that size, see
        :func:`samples_to_resolve`)}, or ``None``).

    Example:
        >>> recommended([{"num_remove": 2, "method": "qblock", "removed": [3, 4], "calib_loss": 2.5,
        ...               "heldout_loss": 2.7, "cost_forward_tokens": 9000, "note": "refined with exact"}])["2"]["removed"]
        [3, 4]
    """
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["method"] != SELECT_METHOD:
            continue
        out[str(int(r["num_remove"]))] = {
            "removed": sorted(int(i) for i in r["removed"]),
            "method": str(r.get("note") or "measured QUBO, refined"),
            "source": r.get("source"),
            "calibration_loss": float(r["calib_loss"]) if _finite(r.get("calib_loss")) else None,
            "confirmation_loss": float(r["confirm_loss"]) if _finite(r.get("confirm_loss")) else None,
            "confirmation_samples": int(r["confirm_samples"]) if _finite(r.get("confirm_samples")) else None,
            "heldout_loss": float(r["heldout_loss"]) if _finite(r.get("heldout_loss")) else None,
            "selection_tokens": int(r["cost_forward_tokens"]) if _finite(r.get("cost_forward_tokens")) else None,
            "selection_backward_tokens": int(r.get("cost_backward_tokens") or 0),
            "runner_up": _runner_up(r),
        }
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _runner_up(r: Mapping[str, Any]) -> dict[str, Any] | None:
    """The confirmation's second set against the recommended one, on the confirmation's samples."""
    if not r.get("runner_up") or not _finite(r.get("runner_up_margin")):
        return None
    se = float(r["runner_up_margin_se"]) if _finite(r.get("runner_up_margin_se")) else None
    margin = float(r["runner_up_margin"])
    n = int(r["runner_up_samples"]) if _finite(r.get("runner_up_samples")) else None
    resolved = se is not None and _resolved(margin, se)
    return {"removed": sorted(int(i) for i in r["runner_up"]), "calibration_margin": margin,
            "calibration_margin_se": se, "resolved": resolved, "samples": n,
            "samples_to_resolve": None if resolved else samples_to_resolve(margin, se, n)}


def summarize(rows: Sequence[Mapping[str, Any]], *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """All reported statistics, per M: correlations of every energy column and the best-candidate statement."""
    ms = sorted({int(r["num_remove"]) for r in rows if r["method"] != REFERENCE_METHOD})
    per_m = {}
    for m in ms:
        per_m[str(m)] = {
            "num_candidates": len(unique_candidates(rows, m)),
            "correlations": correlations(rows, m, n_boot=n_boot, seed=seed),
            "best": best_vs_baseline(rows, m),
        }
    return {"per_m": per_m, "recommended": recommended(rows), "n_boot": int(n_boot), "seed": int(seed)}


def parse_removed(value: Any) -> list[int]:
    """Removal set from a table cell: a list, or a string like ``"3 4 5"`` / ``"[3, 4, 5]"``."""
    if isinstance(value, (list, tuple)):
        return [int(i) for i in value]
    s = str(value).strip().strip("[]").replace(",", " ")
    return [int(t) for t in s.split()] if s else []

