"""Backend comparison studies: run several backends on the same problems and measure them.

A *study* runs every requested backend ``repeats`` times (distinct seeds) on one problem and keeps
every run's raw record (wall time, reads, infeasible reads, the returned top-k states and energies).
Everything reported - the table, the CSV, the plots - is computed from those records by
:func:`summarize` and the ``plot_*`` functions, which take only the JSON-ready dictionaries. So every
figure can be recomputed from the JSON file that :func:`write_outputs` writes.

Per backend a study reports:

* ``best_energy``: the lowest energy over all runs;
* ``gap``: ``best_energy - E_ref`` (and relative to ``|E_ref|``), where ``E_ref`` is the *certified*
  optimum when the exact solver could run (and finished), otherwise the *best known* energy over every
  run of every backend; ``reference.kind`` says which;
* ``p_success``: the fraction of runs whose best energy is within ``rtol * |E_ref| + atol`` of
  ``E_ref``;
* ``feasible_rate``: ``1 - sum(num_infeasible) / sum(num_reads)``, the share of raw reads that were
  feasible *before* repair (constrained backends are always 1);
* ``topk_overlap``: mean over runs of ``|top-k(run) & top-k(ref)| / |top-k(ref)|``;
* ``time_per_run``: mean wall time of one run (seconds, measured around :func:`qblock.solve`);
* ``tts99``: time to solution at 99 % confidence, ``t * ln(0.01) / ln(1 - p)``, infinite when
  ``p = 0``; as at least one run is always needed it is never below ``t`` (so ``t`` when ``p >= 0.99``).

Example:
    >>> import qblock
    >>> from qblock.compare import compare_backends, summarize
    >>> p = qblock.random_problem(12, 3, seed=0)
    >>> study = compare_backends(p, ["exact", "swap"], repeats=2, seed=1, progress=False)
    >>> study["reference"]["kind"]
    'certified'
    >>> [(r["backend"], r["p_success"]) for r in summarize(study)]
    [('exact', 1.0), ('swap', 1.0)]
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from qblock._provenance import Provenance
from qblock.problems.block_removal import BlockRemovalProblem, removal_key

__all__ = [
    "FORMAT",
    "DEFAULT_BACKENDS",
    "tts99",
    "run_seeds",
    "compare_backends",
    "compare_problems",
    "synthetic_problems",
    "reference_from_runs",
    "summarize",
    "format_markdown",
    "format_csv",
    "plot_energy_distributions",
    "plot_tts",
    "write_outputs",
    "render",
    "load_result",
]

FORMAT = "qblock.compare"
FORMAT_VERSION = 1
DEFAULT_BACKENDS = ("exact", "swap", "sa", "tabu", "steepest")

#: summary columns, in table order: (key, header)
COLUMNS = (
    ("backend", "backend"),
    ("runs", "runs"),
    ("best_energy", "best energy"),
    ("gap", "gap"),
    ("rel_gap", "rel. gap"),
    ("p_success", "p success"),
    ("feasible_rate", "feasible"),
    ("topk_overlap", "top-k overlap"),
    ("time_per_run", "time/run [s]"),
    ("tts99", "TTS99 [s]"),
    ("note", "note"),
)


# ---------------------------------------------------------------------------------------- metrics
def tts99(t: float, p: float) -> float:
    """Time to solution at 99 % confidence from the time ``t`` of one run and success probability ``p``.

    ``TTS99 = t * ln(0.01) / ln(1 - p)``; ``inf`` when ``p = 0``; never below ``t`` (one run is the
    least one can do), so it equals ``t`` when ``p >= 0.99``.

    Example:
        >>> tts99(2.0, 1.0), tts99(2.0, 0.0)
        (2.0, inf)
        >>> round(tts99(1.0, 0.5), 3)
        6.644
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    if p <= 0.0:
        return math.inf
    if p >= 0.99:
        return float(t)
    return float(t) * math.log(0.01) / math.log1p(-p)


def run_seeds(seed: int | None, repeats: int) -> list[int]:
    """``repeats`` distinct seeds drawn from ``seed`` (the same list for every backend of a study).

    Example:
        >>> a = run_seeds(0, 5)
        >>> len(set(a)) == 5 and a == run_seeds(0, 5)
        True
    """
    rng = np.random.default_rng(seed)
    seeds: list[int] = []
    while len(seeds) < repeats:
        s = int(rng.integers(0, 2**31 - 1))
        if s not in seeds:
            seeds.append(s)
    return seeds


def reference_from_runs(runs: Sequence[Mapping[str, Any]], top_k: int) -> dict[str, Any]:
    """The reference a study is measured against, from its raw run records only.

    If a run is certified optimal (the exact solver finished), its top-k is the reference
    (``kind="certified"``). Otherwise the reference is the best known: the ``top_k`` lowest distinct
    states found by any run of any backend (``kind="best_known"``).
    """
    usable = [r for r in runs if r.get("states")]
    certified = [r for r in usable if r.get("certified_optimal")]
    if certified:
        r = certified[0]
        return {
            "kind": "certified",
            "source": f"{r['backend']} (certified top-{len(r['states'])})",
            "energy": float(r["energies"][0]),
            "states": [list(removal_key(s)) for s in r["states"][:top_k]],
            "energies": [float(e) for e in r["energies"][:top_k]],
        }
    pool: dict[tuple[int, ...], float] = {}
    for r in usable:
        for s, e in zip(r["states"], r["energies"]):
            k = removal_key(s)
            pool[k] = min(float(e), pool.get(k, math.inf))
    if not pool:
        return {"kind": "none", "source": "no backend returned a solution", "energy": None, "states": [], "energies": []}
    best = sorted(pool.items(), key=lambda kv: (kv[1], kv[0]))[:top_k]
    sources = sorted({r["backend"] for r in usable})
    return {
        "kind": "best_known",
        "source": "best found over all runs of " + ", ".join(sources),
        "energy": best[0][1],
        "states": [list(k) for k, _ in best],
        "energies": [e for _, e in best],
    }


def summarize(study: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One summary row per backend of a study, computed from its raw records only.

    Args:
        study: a study dictionary (as returned by :func:`compare_backends` or read from the JSON).

    Returns:
        Rows with the keys of :data:`COLUMNS` (skipped backends carry only ``backend``, ``runs=0`` and
        ``note``).
    """
    top_k = int(study["settings"]["top_k"])
    rtol, atol = float(study["tolerance"]["rtol"]), float(study["tolerance"]["atol"])
    ref = reference_from_runs(study["runs"], top_k)
    e_ref = ref["energy"]
    ref_set = {removal_key(s) for s in ref["states"]}
    rows = []
    for backend in study["backends"]:
        if backend in study.get("skipped", {}):
            rows.append({"backend": backend, "runs": 0, "note": "skipped: " + study["skipped"][backend]})
            continue
        runs = [r for r in study["runs"] if r["backend"] == backend and r.get("role", "compared") == "compared"]
        runs_ok = [r for r in runs if r.get("states")]
        if not runs_ok:
            # ran but returned nothing (e.g. exact's branch-and-bound stopped by its time limit): it did
            # not reach E_ref, so p = 0 and TTS99 is infinite
            t = float(np.mean([float(r["wall_time"]) for r in runs]))
            rows.append({"backend": backend, "runs": len(runs), "p_success": 0.0, "time_per_run": t,
                         "tts99": math.inf, "note": f"no feasible solution returned (after {t:.3g} s per run)"})
            continue
        bests = np.array([float(r["energies"][0]) for r in runs_ok])
        best = float(bests.min())
        tol = rtol * abs(e_ref) + atol
        succ = [float(r["energies"][0]) <= e_ref + tol if r.get("states") else False for r in runs]
        p = float(np.mean(succ))
        reads = sum(int(r["num_reads"] or 0) for r in runs)
        infeasible = sum(int(r["num_infeasible"] or 0) for r in runs)
        overlap = float(np.mean([
            len({removal_key(s) for s in r.get("states", [])} & ref_set) / len(ref_set) for r in runs
        ]))
        t = float(np.mean([float(r["wall_time"]) for r in runs]))
        notes = []
        if len(runs) < study["settings"]["repeats"] and any(r.get("stopped_early") for r in runs):
            notes.append(f"time limit: {len(runs)} of {study['settings']['repeats']} runs")
        if len(runs) == 1 and study["settings"]["repeats"] > 1 and not any(r.get("stopped_early") for r in runs):
            notes.append("deterministic: 1 run")
        if any(r.get("certified_optimal") for r in runs):
            notes.append("certified")
        rows.append({
            "backend": backend,
            "runs": len(runs),
            "best_energy": best,
            "gap": best - e_ref,
            "rel_gap": (best - e_ref) / abs(e_ref) if e_ref else None,
            "p_success": p,
            "feasible_rate": (1.0 - infeasible / reads) if reads else None,
            "topk_overlap": overlap,
            "time_per_run": t,
            "tts99": tts99(t, p),
            "note": "; ".join(notes),
        })
    return rows


# ---------------------------------------------------------------------------------------- running
def _problem_record(problem: BlockRemovalProblem, name: str | None) -> dict[str, Any]:
    return {
        "name": name or problem.metadata.get("name") or Provenance.of(problem.metadata).model_name
        or problem.metadata.get("source", "problem"),
        "num_blocks": problem.num_blocks,
        "num_remove": problem.num_remove,
        "num_states": problem.num_states,
        "linear": bool(np.any(problem.linear)),
        "labels": list(problem.labels),
        "metadata": problem.metadata,
    }


def _run_once(problem: BlockRemovalProblem, backend: str, seed: int | None, top_k: int, params: Mapping[str, Any]) -> dict[str, Any]:
    import qblock

    t0 = time.perf_counter()
    ss = qblock.solve(problem, backend=backend, num_solutions=top_k, seed=seed, **params)
    wall = time.perf_counter() - t0
    states = [problem.removed_blocks(s) for s in ss.samples()]
    info = ss.info
    return {
        "backend": backend,
        "seed": seed,
        "wall_time": wall,
        "timing": float(info.get("timing") or wall),
        "num_reads": None if info.get("num_reads") is None else int(info["num_reads"]),
        "num_infeasible": None if info.get("num_infeasible") is None else int(info["num_infeasible"]),
        "penalty": None if info.get("penalty") is None else float(info["penalty"]),
        "certified_optimal": bool(info.get("certified_optimal", False)),
        "energies": [float(e) for e in ss.record.energy],
        "states": states,
    }


def _skip_reason(exc: BaseException) -> str:
    if isinstance(exc, _Failed):
        return exc.reason
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()


class _Failed(Exception):
    """A run that raised on a worker, with the reason as the local run would have recorded it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _job(job: tuple) -> dict[str, Any]:
    """One solver run on a worker: the record, or ``{"failed": reason}`` (as a skip would record it)."""
    problem, backend, seed, top_k, params = job
    try:
        return _run_once(problem, backend, seed, top_k, params)
    except Exception as exc:  # noqa: BLE001 - recorded as the local loop records it
        return {"failed": _skip_reason(exc)}


def _runner(executor: Any, problem: BlockRemovalProblem, jobs: Sequence[tuple[str, int, Any, Mapping]],
            top_k: int, bar: Any):
    """``run(backend, repeat, seed, params) -> record`` for the study's loop.

    Local: each call runs :func:`qblock.solve` here, when the loop asks. Another executor: every run of
    ``jobs`` is submitted at once (solver runs as tasks, the bar advancing as they finish) and the loop
    replays these records, so skips, time limits and the reference are decided exactly as when the runs
    happen one after another.
    """
    from qblock.executor import is_local

    if is_local(executor):
        return lambda b, r, s, p: _run_once(problem, b, s, top_k, p)

    def done(i: int, rec: Mapping[str, Any]) -> None:
        bar.set_postfix_str(f"{jobs[i][0]} run {jobs[i][1] + 1} done")
        bar.update(1)

    recs = executor.map(_job, [(problem, b, s, top_k, dict(p)) for b, _, s, p in jobs], on_result=done)
    ready = {(b, r): rec for (b, r, _, _), rec in zip(jobs, recs)}
    bar.update = lambda *a, **k: None  # counted as the runs finished

    def replay(b: str, r: int, s: Any, p: Mapping[str, Any]) -> dict[str, Any]:
        rec = dict(ready[(b, r)])
        if "failed" in rec:
            raise _Failed(rec["failed"])
        return rec

    return replay


def compare_backends(
    problem: BlockRemovalProblem,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    repeats: int = 5,
    seed: int | None = 0,
    *,
    top_k: int = 10,
    time_limit: float | None = None,
    exact_reference: bool = True,
    exact_time_limit: float | None = 60.0,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    name: str | None = None,
    progress: bool = True,
    executor: Any = None,
) -> dict[str, Any]:
    """Run each backend ``repeats`` times (distinct seeds) on ``problem`` and record every run.

    Args:
        problem: the problem (``num_remove`` set).
        backends: backend names; unavailable ones (missing package, no token, too many qubits) are
            skipped and the reason recorded in ``study["skipped"]``.
        repeats: runs per stochastic backend (deterministic backends such as ``exact`` run once).
        seed: master seed; run ``r`` of every backend uses ``run_seeds(seed, repeats)[r]``.
        top_k: how many distinct solutions each run returns (and the size of the reference top-k).
        time_limit: seconds per backend: no new repeat starts once a backend has used this much
            (recorded as ``stopped_early``); it also bounds the exact solver's branch-and-bound.
        exact_time_limit: seconds for the exact solver's branch-and-bound when ``time_limit`` is not
            given (enumeration is not interrupted; ``None``: no bound).
        exact_reference: run the exact solver for a certified reference even when ``"exact"`` is not
            among ``backends`` (its run is kept with ``role="reference"``). When it cannot run or does
            not finish, the reference is the best known energy, and ``reference.kind`` says so.
        rtol, atol: a run succeeds when its best energy is ``<= E_ref + rtol*|E_ref| + atol``.
        params: per-backend sampler parameters, e.g. ``{"sa": {"num_reads": 64}}``. A cloud backend
            given a ``sampler_factory`` (e.g. one returning ``MockDWaveSampler()``) runs without a token.
        name: a name for the problem in tables.
        progress: show a progress bar.
        executor: where the runs happen (:mod:`qblock.executor`); ``None`` or local: one after another
            here. On Ray every run is a task, all submitted at once; the records (and so every table entry
            except wall times) are the same as the local executor's. With ``time_limit`` the rule "no new
            repeat after the limit" is applied to the finished runs in repeat order.

    Returns:
        A JSON-ready study dictionary: ``problem``, ``settings``, ``tolerance``, ``backends``,
        ``skipped``, ``runs`` (raw records), ``reference`` and ``summary`` (both recomputable from
        ``runs`` with :func:`reference_from_runs` and :func:`summarize`).

    Example:
        >>> import qblock
        >>> s = compare_backends(qblock.random_problem(10, 3, seed=2), ["swap", "tabu"], repeats=2, progress=False)
        >>> s["reference"]["kind"], len(s["runs"])
        ('certified', 5)
    """
    from qblock import backends as registry

    backends, params = _checked_settings(problem, backends, repeats, top_k, params)
    avail = registry.available()
    seeds = run_seeds(seed, repeats)
    skipped: dict[str, str] = {}
    runs: list[dict[str, Any]] = []
    todo = [b for b in backends if _runnable(avail[b], params.get(b, {}))]
    for b in backends:
        if b not in todo:
            a = avail[b]
            skipped[b] = "unavailable: " + a["reason"] + (f" ({a['install']})" if a.get("install") else "")
    steps = sum(1 if not registry.get_spec(b).stochastic else repeats for b in todo)
    want_ref = exact_reference and "exact" not in backends and avail.get("exact", {}).get("available", False)
    bar = _progress(steps + int(want_ref), progress, f"compare N={problem.num_blocks} M={problem.num_remove}")
    exact_limit = time_limit if time_limit is not None else exact_time_limit
    notes: list[str | None] = []  # about the exact solver: the last one stands
    jobs = [("exact", -1, None, _exact_params(params, exact_limit))] if want_ref else []
    for b in todo:
        b_seeds = seeds if registry.get_spec(b).stochastic else [None]
        p = _exact_params(params, exact_limit) if b == "exact" else params.get(b, {})
        jobs += [(b, r, s, p) for r, s in enumerate(b_seeds)]
    try:
        run = _runner(executor, problem, jobs, top_k, bar)
        if want_ref:
            notes.append(_reference_run(run, _exact_params(params, exact_limit), runs, bar))
        for b in todo:
            b_seeds = seeds if registry.get_spec(b).stochastic else [None]
            p = _exact_params(params, exact_limit) if b == "exact" else params.get(b, {})
            notes.append(_backend_runs(run, b, b_seeds, p, time_limit, runs, skipped, bar))
    finally:
        bar.close()
    study: dict[str, Any] = {
        "problem": _problem_record(problem, name),
        "settings": {"repeats": int(repeats), "seed": seed, "top_k": int(top_k), "time_limit": time_limit,
                     "params": params, "exact_reference": bool(exact_reference),
                     "exact_time_limit": exact_time_limit},
        "tolerance": {"rtol": float(rtol), "atol": float(atol)},
        "backends": backends,
        "skipped": skipped,
        "runs": runs,
    }
    study["reference"] = reference_from_runs(runs, top_k)
    reference_note = next((n for n in reversed(notes) if n), None)
    if reference_note:
        study["reference"]["note"] = reference_note
    study["summary"] = summarize(study)
    return study


def require_block_removal(problem: Any, name: str = "this") -> None:
    """Comparisons are of block-removal problems: refuse another kind in one line (``name``: the file)."""
    if getattr(problem, "kind", None) != "block_removal":
        kind = str(getattr(problem, "kind", type(problem).__name__)).replace("_", "-")
        raise ValueError(f"{name} is a {kind} problem; comparisons take block-removal problems "
                         "(qblock solve / qblock.solve take this one)")


def _checked_settings(problem: BlockRemovalProblem, backends: Sequence[str], repeats: int, top_k: int,
                      params: Mapping[str, Mapping[str, Any]] | None) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The distinct backend names and per-backend parameters of a comparison, checked before any run."""
    from qblock import backends as registry

    require_block_removal(problem)
    problem._require_m()
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    backends = list(dict.fromkeys(backends))
    if not backends:
        raise ValueError("give at least one backend")
    for b in backends:
        registry.get_spec(b)  # unknown names are a user error, not a skip
    params = {k: dict(v) for k, v in (params or {}).items()}
    for b in params:
        if b not in backends and b != "exact":
            raise ValueError(f"--param for backend {b!r}, which is not compared ({', '.join(backends)})")
    return backends, params


def _runnable(avail: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    # a cloud backend handed a sampler_factory (e.g. MockDWaveSampler) needs no token
    return avail["available"] or (not avail.get("install") and "sampler_factory" in params)


def _exact_params(params: Mapping[str, Mapping[str, Any]], limit: float | None) -> dict[str, Any]:
    p = dict(params.get("exact", {}))
    if limit is not None:
        p.setdefault("time_limit", float(limit))
    return p


def _reference_run(run, params: Mapping[str, Any], runs: list[dict[str, Any]], bar) -> str | None:
    """One exact run kept as ``role="reference"``; a note when it is not a certified reference."""
    bar.set_postfix_str("exact (reference)")
    note = None
    try:
        rec = run("exact", -1, None, params)
        rec.update(role="reference", repeat=0)
        runs.append(rec)
        if not rec["certified_optimal"]:
            note = "exact did not finish within the time limit"
    except Exception as exc:  # noqa: BLE001 - any failure of the reference falls back to best known
        note = "exact could not run: " + _skip_reason(exc)
    bar.update(1)
    return note


def _backend_runs(run, b: str, seeds: Sequence[int | None], params: Mapping[str, Any],
                  time_limit: float | None, runs: list[dict[str, Any]], skipped: dict[str, str], bar) -> str | None:
    """The repeats of one compared backend, appended to ``runs``; a note about ``exact`` if there is one.

    ``run(backend, repeat, seed, params)`` gives a run's record (see :func:`_runner`).

    No new repeat starts once the backend has used ``time_limit`` seconds (its runs are marked
    ``stopped_early``); a failing run skips the backend (its earlier runs are dropped, the reason kept).
    """
    note = None
    used = 0.0
    for r, s in enumerate(seeds):
        if time_limit is not None and r > 0 and used >= time_limit:
            for rec in runs:
                if rec["backend"] == b and rec.get("role") == "compared":
                    rec["stopped_early"] = True
            bar.update(len(seeds) - r)
            break
        bar.set_postfix_str(f"{b} run {r + 1}/{len(seeds)}")
        try:
            rec = run(b, r, s, params)
        except Exception as exc:  # noqa: BLE001 - e.g. qaoa above its qubit limit, exact too large
            skipped[b] = _skip_reason(exc)
            runs[:] = [x for x in runs if not (x["backend"] == b and x.get("role") == "compared")]
            if b == "exact":
                note = "exact could not run: " + _skip_reason(exc)
            bar.update(len(seeds) - r)
            break
        rec.update(role="compared", repeat=r)
        runs.append(rec)
        used += rec["wall_time"]
        if b == "exact" and not rec["certified_optimal"]:
            note = "exact did not finish within the time limit"
        bar.update(1)
    return note


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm  # the text bar: tqdm.auto would warn in notebooks without ipywidgets

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)


def synthetic_problems(
    blocks: Iterable[int],
    remove_fraction: float = 0.25,
    *,
    seed: int | None = 0,
    linear: bool = False,
) -> list[BlockRemovalProblem]:
    """Paper-structure instances (``H = A^T A / m``) for a scaling sweep, ``M = round(N * fraction)``.

    Example:
        >>> [(p.num_blocks, p.num_remove) for p in synthetic_problems([16, 32])]
        [(16, 4), (32, 8)]
    """
    from qblock.problems.synthetic import random_problem

    if not 0.0 < remove_fraction < 1.0:
        raise ValueError(f"remove_fraction must lie in (0, 1), got {remove_fraction}")
    out = []
    for i, n in enumerate(blocks):
        n = int(n)
        if n < 2:
            raise ValueError(f"a sweep needs at least 2 blocks per problem, got {n}")
        m = max(1, min(n - 1, int(round(n * remove_fraction))))
        out.append(random_problem(n, m, seed=None if seed is None else seed + i, linear=linear))
    return out


def compare_problems(
    problems: Sequence[BlockRemovalProblem],
    backends: Sequence[str] = DEFAULT_BACKENDS,
    repeats: int = 5,
    seed: int | None = 0,
    *,
    names: Sequence[str] | None = None,
    progress: bool = True,
    executor: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """A comparison over several problems (a scaling sweep); one study per problem.

    ``executor`` (:mod:`qblock.executor`) runs each study's solver runs (see :func:`compare_backends`).

    Returns:
        ``{"format": "qblock.compare", "format_version", "qblock_version", "created", "environment",
        "studies": [...]}``, the document :func:`write_outputs` saves as JSON.

    Example:
        >>> res = compare_problems(synthetic_problems([8, 12]), ["exact", "swap"], repeats=2, progress=False)
        >>> [s["problem"]["num_blocks"] for s in res["studies"]]
        [8, 12]
    """
    import qblock

    studies = []
    for i, p in enumerate(problems):
        nm = names[i] if names else None
        studies.append(compare_backends(p, backends, repeats, seed, name=nm, progress=progress, executor=executor,
                                        **kwargs))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qblock_version": qblock.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": {"python": platform.python_version(), "machine": platform.machine(),
                        "system": platform.system(), "cpu_count": os.cpu_count()},
        "studies": studies,
    }


# ---------------------------------------------------------------------------------------- formatting
def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        if key in ("p_success", "feasible_rate", "topk_overlap"):
            return f"{v:.2f}"
        if key in ("time_per_run", "tts99"):
            return f"{v:.3g}"
        if key == "rel_gap":
            return f"{v:.2e}"
        return f"{v:.6g}"
    return str(v)


def _study_title(study: Mapping[str, Any]) -> str:
    pr = study["problem"]
    return f"{pr['name']}: N={pr['num_blocks']}, M={pr['num_remove']}"


def _reference_line(study: Mapping[str, Any]) -> str:
    ref = study["reference"]
    if ref["kind"] == "none":
        return "Reference: none (no backend returned a solution)."
    kind = "certified optimum" if ref["kind"] == "certified" else "best known (NOT certified)"
    line = f"Reference: {kind} E = {ref['energy']:.10g} from {ref['source']}."
    if ref.get("note"):
        line += f" ({ref['note']})"
    return line


def format_markdown(result: Mapping[str, Any]) -> str:
    """A markdown report with one table per study (recomputed from the raw runs)."""
    parts = []
    for study in result["studies"]:
        rows = summarize(study)
        st = study["settings"]
        parts.append(f"### {_study_title(study)}\n")
        parts.append(_reference_line(study) + f" top-k = {st['top_k']}, repeats = {st['repeats']}, "
                     f"seed = {st['seed']}, success tolerance = {study['tolerance']['rtol']:g}*|E_ref| + "
                     f"{study['tolerance']['atol']:g}.\n")
        parts.append("| " + " | ".join(h for _, h in COLUMNS) + " |")
        parts.append("|" + "|".join("---" if k in ("backend", "note") else "---:" for k, _ in COLUMNS) + "|")
        for row in rows:
            parts.append("| " + " | ".join(_fmt(k, row.get(k)) for k, _ in COLUMNS) + " |")
        parts.append("")
    return "\n".join(parts)


def format_csv(result: Mapping[str, Any]) -> str:
    """One CSV row per (problem, backend), recomputed from the raw runs."""
    buf = io.StringIO()
    keys = [k for k, _ in COLUMNS]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["problem", "num_blocks", "num_remove", "reference_kind", "reference_energy"] + keys)
    for study in result["studies"]:
        pr, ref = study["problem"], study["reference"]
        for row in summarize(study):
            w.writerow([pr["name"], pr["num_blocks"], pr["num_remove"], ref["kind"], repr(ref["energy"])]
                       + [repr(row[k]) if isinstance(row.get(k), float) else ("" if row.get(k) is None else row[k])
                          for k in keys])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_energy_distributions(study: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Energies returned per backend (all top-k states of all runs: box, whiskers at min and max; each run's best: dots),
    with the reference energy as a line. Uses only the study's raw records."""
    plt = _pyplot()
    ref = reference_from_runs(study["runs"], int(study["settings"]["top_k"]))
    names = list(study["backends"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 4.2))
    rng = np.random.default_rng(0)  # jitter only; fixed so the picture is reproducible
    labelled = False
    for i, b in enumerate(names):
        runs = [r for r in study["runs"] if r["backend"] == b and r.get("role", "compared") == "compared" and r.get("states")]
        if b in study.get("skipped", {}) or not runs:
            ax.text(i, 0.5, "skipped" if b in study.get("skipped", {}) else "no result", rotation=90,
                    transform=ax.get_xaxis_transform(), ha="center", va="center", color="0.5", fontsize=8)
            continue
        allE = np.concatenate([np.asarray(r["energies"], dtype=float) for r in runs])
        ax.boxplot([allE], positions=[i], widths=0.5, whis=(0, 100), showfliers=False, patch_artist=True,
                   boxprops={"facecolor": "#cfe2f3", "edgecolor": "#3d85c6"}, medianprops={"color": "#3d85c6"})
        best = np.array([r["energies"][0] for r in runs], dtype=float)
        ax.scatter(i + rng.uniform(-0.15, 0.15, best.size), best, s=16, color="#cc0000", zorder=3,
                   label=None if labelled else "best of each run")
        labelled = True
    if ref["energy"] is not None:
        ax.axhline(ref["energy"], color="k", lw=1, ls="--",
                   label=("certified optimum" if ref["kind"] == "certified" else "best known"))
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_ylabel("energy of returned states")
    ax.set_title(_study_title(study) + f", top-{study['settings']['top_k']} per run", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return _save(fig, path)


def plot_tts(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """TTS99 and success probability against problem size (N, or M when N does not vary), one line
    per backend, recomputed from the raw records. Infinite TTS (never successful) is drawn as an
    ``x`` on the top edge."""
    plt = _pyplot()
    studies = list(result["studies"])
    ns = [s["problem"]["num_blocks"] for s in studies]
    xkey, xlabel = ("num_blocks", "N (blocks)") if len(set(ns)) > 1 or len(studies) == 1 else ("num_remove", "M (removed)")
    backends = list(dict.fromkeys(b for s in studies for b in s["backends"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for b in backends:
        xs, ts, ps, inf_x = [], [], [], []
        for s in studies:
            row = next((r for r in summarize(s) if r["backend"] == b), None)
            if row is None or row.get("tts99") is None:
                continue
            x = s["problem"][xkey]
            ps.append((x, row["p_success"]))
            if math.isinf(row["tts99"]):
                inf_x.append(x)
            else:
                xs.append(x)
                ts.append(row["tts99"])
        if not ps:
            continue
        (line,) = ax1.plot(xs, ts, marker="o", label=b)
        if inf_x:
            ax1.scatter(inf_x, [1.0] * len(inf_x), marker="x", color=line.get_color(),
                        transform=ax1.get_xaxis_transform(), clip_on=False)
        ps.sort()
        ax2.plot([x for x, _ in ps], [p for _, p in ps], marker="o", color=line.get_color(), label=b)
    ax1.set_yscale("log")
    xs_all = sorted({s["problem"][xkey] for s in studies})
    if xs_all and xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 4:  # doubling sweeps read best on log2
        for ax in (ax1, ax2):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all, [str(x) for x in xs_all])
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("TTS99 [s]  (x on top: never reached E_ref)")
    ax1.set_title("time to solution (99 %)", fontsize=10)
    ax2.set_xlabel(xlabel)
    ax2.set_ylabel("success probability")
    ax2.set_ylim(-0.03, 1.03)
    ax2.set_title("runs reaching the reference energy", fontsize=10)
    kinds = [f"{s['problem'][xkey]}: {s['reference']['kind'].replace('_', ' ')}" for s in studies]
    fig.suptitle("reference energy per problem (" + xlabel.split()[0] + "): " + ", ".join(kinds), fontsize=9)
    if ax2.get_legend_handles_labels()[1]:
        ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    for x in sorted({s["problem"][xkey] for s in studies}):
        ax1.axvline(x, color="0.9", lw=0.5, zorder=0)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    from qblock._io import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------- files
def _slug(study: Mapping[str, Any]) -> str:
    pr = study["problem"]
    return f"N{pr['num_blocks']}_M{pr['num_remove']}"


def render(result: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the table (markdown, CSV) and the plots of ``result`` into ``out_dir``, using only the
    JSON document (so this also re-renders a saved ``compare.json``)."""
    from qblock._io import atomic_write_bytes, remove_stale

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    atomic_write_bytes(out / "compare.md", format_markdown(result).encode())
    paths["markdown"] = out / "compare.md"
    atomic_write_bytes(out / "compare.csv", format_csv(result).encode())
    paths["csv"] = out / "compare.csv"
    slugs: dict[str, int] = {}
    for study in result["studies"]:
        slug = _slug(study)
        slugs[slug] = slugs.get(slug, 0) + 1
        if slugs[slug] > 1:
            slug += f"_{slugs[slug]}"
        paths[f"energies_{slug}"] = plot_energy_distributions(study, out / f"energies_{slug}.png")
    if len(result["studies"]) > 1:
        paths["tts"] = plot_tts(result, out / "tts.png")
    # a comparison of other problems drawn here before leaves no plot that this table does not have
    remove_stale(out, ["energies_N*_M*.png", "tts.png"], paths.values())
    return paths


def write_outputs(result: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Save ``compare.json`` (with every raw run) and everything :func:`render` draws from it."""
    import json

    from qblock._io import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "compare.json", (json.dumps(_jsonable(result), indent=1, allow_nan=False) + "\n").encode())
    # render from the saved file, not from memory: what is drawn is exactly what the JSON holds
    paths = render(load_result(out / "compare.json"), out)
    paths["json"] = out / "compare.json"
    return paths


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``compare.json`` written by :func:`write_outputs` (checks the format)."""
    import json

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"comparison file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path} is not a qblock comparison (not JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a qblock comparison (format={got!r})")
    version = data.get("format_version", 0)
    if not isinstance(version, int):
        raise ValueError(f"{path} is not a qblock comparison (format_version={version!r})")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer qblock (format {version})")
    _check_complete(data, path)
    return data


def _check_complete(data: Mapping[str, Any], path: Path) -> None:
    """Refuse a comparison of the right format that lacks what the table and plots read (cut short or
    edited by hand): one line naming the file, raised before any output folder is made."""
    if not isinstance(data.get("studies"), list) or not data["studies"]:
        raise ValueError(f'{path} is not a complete qblock comparison (no "studies" list)')
    try:  # the tables read every field the plots read (summarize, titles, references)
        format_markdown(data)
        format_csv(data)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"{path} is not a complete qblock comparison ({what})") from None


def _jsonable(o: Any) -> Any:
    if isinstance(o, Mapping):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (float, np.floating)):
        # strict JSON has no infinity; TTS99 of a backend that never succeeds is written as "inf"
        return float(o) if math.isfinite(o) else ("inf" if o > 0 else "-inf" if o < 0 else "nan")
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if o is None or isinstance(o, (str, int)):
        return o
    return repr(o)  # e.g. a sampler_factory callable in the settings: recorded, not executable
