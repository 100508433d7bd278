"""D-Wave Leap backends: hybrid BQM, hybrid CQM, hybrid nonlinear (NL) and the QPU, behind qblock.solve.

* ``leap-hybrid``: :class:`dwave.system.LeapHybridSampler` on the PyQUBO-penalised BQM, through
  :func:`qblock._solve.penalty_pipeline` (penalty strength, greedy repair, swap polish).
* ``leap-cqm``: :class:`dwave.system.LeapHybridCQMSampler` on :meth:`BlockRemovalProblem.to_cqm`
  (the cardinality constraint is native); infeasible samples are dropped.
* ``leap-nl``: :class:`dwave.system.LeapHybridNLSampler` on a dwave-optimization nonlinear model
  (:func:`build_nl_model`): a list (permutation) variable whose first ``M`` entries are the removed
  blocks, so every state is feasible and no constraint is needed.
* ``dwave-qpu``: :class:`dwave.system.DWaveSampler` inside :class:`dwave.system.EmbeddingComposite`
  on the penalised BQM; the chain strength is chosen by uniform torque compensation (or given) and
  reported with the chain-break fraction.

Credentials come from Ocean's own configuration (``DWAVE_API_TOKEN`` or ``dwave setup`` / ``dwave
config``); qblock never stores a token. Network waits are bounded: every sampler is built with explicit
``request_timeout`` (seconds per HTTP request), ``http_retry_total`` and ``polling_timeout``. A missing
token, an unreachable endpoint or a timeout raises :class:`LeapError` (a ``ValueError``: the CLI
prints it as one line and exits non-zero).

Every run writes, *before* anything is sent, the problem (``problem.npz``), the model in dimod's own
serialisation (``bqm-<k>.bqm`` / ``model.cqm``) or dwave-optimization's (``model.nl``) and the request
parameters (``request.json``) to ``$QBLOCK_CACHE/leap/<timestamp>-<backend>/`` (default
``~/.cache/qblock/leap/...``), then each answer as ``SampleSet.to_serializable()`` JSON
(``result-<k>.json``) as soon as it arrives, and the final top-k (``final.json``).

:func:`dry_run_plan` says what would be sent (variables, couplers, constraints, time limit, an
estimate of QPU access time) without any network call; :func:`format_plan` renders it.

Every runner takes ``sampler_factory=`` (``callable(**client_config) -> sampler``) so that tests can
inject :class:`dwave.system.testing.MockDWaveSampler` or a fake hybrid sampler.

Example (offline, with dwave-system's mock QPU):
    >>> import qblock
    >>> from dwave.system.testing import MockDWaveSampler
    >>> p = qblock.random_problem(8, 2, seed=0)
    >>> ss = qblock.solve(p, "dwave-qpu", seed=1, sampler_factory=lambda **cfg: MockDWaveSampler(),
    ...                   save_dir=__import__("tempfile").mkdtemp())  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import dimod
import numpy as np

from qblock._io import json_default as _json_default

__all__ = [
    "LeapError",
    "check_token",
    "client_config",
    "make_sampler",
    "RunStore",
    "default_store_root",
    "dry_run_plan",
    "format_plan",
    "build_nl_model",
    "nl_energies",
    "run_hybrid",
    "run_cqm",
    "run_nl",
    "run_qpu",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_HTTP_RETRY_TOTAL",
    "DEFAULT_POLLING_TIMEOUT",
]

#: seconds per HTTP request (Ocean's default is 60 s with 10 retries: over 10 minutes against an
#: endpoint that never answers); connection attempts take at most (retries + 1) * timeout
DEFAULT_REQUEST_TIMEOUT = 15.0
DEFAULT_HTTP_RETRY_TOTAL = 2
#: seconds to wait for a submitted problem's answer (hybrid runs take their time limit plus queueing)
DEFAULT_POLLING_TIMEOUT = 900.0

_SETUP_HINT = "configure a Leap API token with `dwave setup` (or set DWAVE_API_TOKEN)"

#: the cloud sampler class of each backend (module:attribute)
_SAMPLER_CLASSES = {
    "leap-hybrid": ("dwave.system", "LeapHybridSampler"),
    "leap-cqm": ("dwave.system", "LeapHybridCQMSampler"),
    "leap-nl": ("dwave.system", "LeapHybridNLSampler"),
    "dwave-qpu": ("dwave.system", "DWaveSampler"),
}

# Typical Advantage timing, for the offline (dry-run) estimate only; a live solver's
# ``estimate_qpu_access_time`` uses its own ``problem_timing_data``.
_TYPICAL_PROGRAMMING_US = 15_000.0
_TYPICAL_PROGRAMMING_THERMALIZATION_US = 1_000.0
_TYPICAL_ANNEAL_US = 20.0
_TYPICAL_READOUT_US = 120.0
_TYPICAL_DELAY_US = 21.0
#: Leap's smallest hybrid time limits (seconds) for small problems; the solver's own property wins
_MIN_TIME_LIMIT = {"leap-hybrid": 3.0, "leap-cqm": 5.0, "leap-nl": 5.0}


class LeapError(ValueError):
    """D-Wave Leap could not be used (no token, unreachable endpoint, timeout, rejected problem).

    A ``ValueError``, so ``qblock``'s CLI prints the message as one line and exits with status 2.
    The message always names ``dwave setup``.
    """


# ---------------------------------------------------------------------------- configuration
def check_token() -> tuple[bool, str]:
    """Whether a Leap API token is configured (environment or Ocean config file). No network call.

    Returns:
        ``(ok, reason)``; ``reason`` says where the token comes from or what to do.

    Example:
        >>> ok, reason = check_token()
        >>> isinstance(ok, bool) and isinstance(reason, str)
        True
    """
    if os.environ.get("DWAVE_API_TOKEN", "").strip():
        return True, "token from DWAVE_API_TOKEN (not verified until a problem is sent)"
    try:
        from dwave.cloud.config import load_config

        cfg = load_config()
    except Exception as exc:  # a broken config file must not break `qblock backends`
        return False, f"cannot read the D-Wave config ({exc}); {_SETUP_HINT}"
    if str(cfg.get("token") or "").strip():
        return True, "token from the Ocean config file (not verified until a problem is sent)"
    return False, f"no D-Wave Leap API token; {_SETUP_HINT}"


def client_config(
    request_timeout: float | None = None,
    http_retry_total: int | None = None,
    polling_timeout: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Keyword arguments for Ocean samplers with explicit, bounded network waits.

    Token, endpoint, region and solver still come from Ocean's configuration unless given in ``extra``.
    """
    cfg = {
        "request_timeout": float(DEFAULT_REQUEST_TIMEOUT if request_timeout is None else request_timeout),
        "http_retry_total": int(DEFAULT_HTTP_RETRY_TOTAL if http_retry_total is None else http_retry_total),
        "polling_timeout": float(DEFAULT_POLLING_TIMEOUT if polling_timeout is None else polling_timeout),
    }
    cfg.update({k: v for k, v in extra.items() if v is not None})
    return cfg


def _leap_error(exc: BaseException, backend: str, stage: str) -> LeapError:
    """One readable line for any failure talking to Leap."""
    text = str(exc).strip() or type(exc).__name__
    name = type(exc).__name__
    if "token" in text.lower() and ("not defined" in text.lower() or "invalid" in text.lower()):
        why = f"no valid Leap API token ({text})"
    elif "timeout" in name.lower() or "timed out" in text.lower():
        why = f"the Leap endpoint did not answer in time ({name}: {text})"
    elif "connection" in name.lower() or "connection" in text.lower():
        why = f"cannot reach the Leap endpoint ({name}: {text})"
    elif "solvernotfound" in name.lower():
        why = f"no suitable solver available to this token ({text})"
    elif "auth" in name.lower() or "401" in text:
        why = f"the Leap API token was rejected ({text})"
    else:
        why = f"{name}: {text}"
    why = " ".join(why.split())
    hint = _SETUP_HINT if why.startswith("no valid Leap API token") else f"{_SETUP_HINT} and check the network"
    return LeapError(f"{backend}: {stage} failed: {why}; {hint}")


def make_sampler(backend: str, *, sampler_factory: Callable[..., Any] | None = None, **config: Any):
    """The cloud sampler of ``backend``, built with :func:`client_config` settings.

    Any failure (no token, unreachable endpoint, timeout) becomes a :class:`LeapError`.
    ``sampler_factory(**config)`` replaces the real class (tests, other clients).
    """
    if sampler_factory is None:
        if backend not in _SAMPLER_CLASSES:
            raise ValueError(f"unknown Leap backend {backend!r}")
        import importlib

        from qblock._lazy import require

        require("dwave.system", "leap")
        module, attr = _SAMPLER_CLASSES[backend]
        sampler_factory = getattr(importlib.import_module(module), attr)
    try:
        return sampler_factory(**config)
    except LeapError:
        raise
    except Exception as exc:  # Ocean raises ValueError, RequestError (OSError), SolverNotFoundError, ...
        raise _leap_error(exc, backend, "connecting to D-Wave Leap") from exc


# ---------------------------------------------------------------------------- what is saved
def default_store_root() -> Path:
    """``$QBLOCK_CACHE/leap`` or ``~/.cache/qblock/leap``."""
    base = os.environ.get("QBLOCK_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "qblock") / "leap"


class RunStore:
    """A folder holding one Leap run: problem, models, request and every answer, written atomically.

    Example:
        >>> import tempfile, qblock
        >>> st = RunStore("leap-cqm", root=tempfile.mkdtemp())
        >>> p = qblock.random_problem(6, 2, seed=0)
        >>> _ = st.save_problem(p); _ = st.save_model("model.cqm", p.to_cqm())
        >>> sorted(f.name for f in st.path.iterdir())
        ['model.cqm', 'problem.npz']
    """

    def __init__(self, backend: str, root: str | os.PathLike | None = None) -> None:
        root = Path(root) if root is not None else default_store_root()
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        path = root / f"{stamp}-{backend}"
        k = 1
        while True:
            try:
                path.mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:
                k += 1
                path = root / f"{stamp}-{backend}-{k}"
        self.path = path
        self.backend = backend

    def _write(self, name: str, data: bytes) -> Path:
        from qblock._io import atomic_write_bytes

        target = self.path / name
        atomic_write_bytes(target, data)
        return target

    def save_problem(self, problem) -> Path:
        return problem.save(self.path / "problem.npz")

    def save_model(self, name: str, model: Any) -> Path:
        """A BQM / CQM (dimod's ``to_file``) or a dwave-optimization model (its ``to_file``)."""
        with model.to_file() as fh:
            fh.seek(0)
            data = fh.read()
        return self._write(name, data)

    def save_json(self, name: str, obj: Any) -> Path:
        return self._write(name, (json.dumps(obj, indent=1, default=_json_default) + "\n").encode())

    def save_sampleset(self, name: str, sampleset: dimod.SampleSet) -> Path:
        return self.save_json(name, sampleset.to_serializable())


# ---------------------------------------------------------------------------- recording wrapper
class _RecordingSampler(dimod.Sampler):
    """Wraps a BQM sampler: saves each submitted BQM before sending it and each answer on arrival,
    and keeps per-call statistics (timing, problem ids, chain strength, chain breaks)."""

    def __init__(self, inner: dimod.Sampler, store: RunStore, backend: str, fixed: dict[str, Any]) -> None:
        self.inner = inner
        self.store = store
        self.backend = backend
        self.fixed = dict(fixed)
        self.calls: list[dict[str, Any]] = []

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self.inner.parameters)

    @property
    def properties(self) -> dict[str, Any]:
        return {}

    def sample(self, bqm: dimod.BinaryQuadraticModel, **kwargs: Any) -> dimod.SampleSet:
        k = len(self.calls)
        kw = {**self.fixed, **kwargs}
        self.store.save_model(f"bqm-{k}.bqm", bqm)
        self.store.save_json(f"request-{k}.json", {
            "backend": self.backend, "num_variables": bqm.num_variables,
            "num_interactions": bqm.num_interactions,
            "parameters": {key: (repr(v) if callable(v) else v) for key, v in kw.items()},
            "sent_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        })
        ss, wall = _timed_submit(lambda: _resolved(self.inner.sample(bqm, **kw)), self.backend)
        self.store.save_sampleset(f"result-{k}.json", ss)
        call = _call_record(ss.info, wall, len(ss))
        info = ss.info
        ctx = info.get("embedding_context") or {}
        if ctx.get("chain_strength") is not None:  # None where every chain is one qubit (dwave-system skips it)
            call["chain_strength"] = float(ctx["chain_strength"])
        if ctx.get("embedding"):
            emb = ctx["embedding"]
            lengths = [len(c) for c in emb.values()]
            call["physical_qubits"] = int(sum(lengths))
            call["max_chain_length"] = int(max(lengths))
        if "chain_break_fraction" in ss.record.dtype.names:
            cbf = np.asarray(ss.record.chain_break_fraction, dtype=float)
            occ = np.asarray(ss.record.num_occurrences, dtype=float)
            call["chain_break_fraction"] = float((cbf * occ).sum() / max(occ.sum(), 1.0))
            call["reads_with_chain_breaks"] = float(occ[cbf > 0].sum() / max(occ.sum(), 1.0))
        self.calls.append(call)
        return ss


def _resolved(sampleset: Any) -> Any:
    sampleset.resolve()  # a cloud SampleSet is a future until resolved
    return sampleset


def _timed_submit(submit: Callable[[], Any], backend: str, client: Any = None) -> tuple[Any, float]:
    """``submit()`` timed, with cloud and network failures (and token errors) raised as :class:`LeapError`.

    Args:
        submit: sends the problem and waits for the answer.
        backend: named in the error.
        client: a sampler to close afterwards, whatever happened (its close is timed too).

    Returns:
        ``(answer, wall seconds)``.
    """
    t0 = time.perf_counter()
    try:
        answer = submit()
    except LeapError:
        raise
    except Exception as exc:
        if _is_network_error(exc) or "token" in str(exc).lower():
            raise _leap_error(exc, backend, "sampling") from exc
        raise
    finally:
        if client is not None:
            _close(client)
    return answer, time.perf_counter() - t0


def _call_record(info: Any, wall: float, num_samples: int) -> dict[str, Any]:
    """Per-submission statistics kept in ``info['leap']['submissions']``: time, size and Leap's ids."""
    call: dict[str, Any] = {"wall_seconds": wall, "num_samples": num_samples}
    for key in ("problem_id", "problem_label", "timing"):
        if key in info:
            call[key] = info[key]
    return call


def _is_network_error(exc: BaseException) -> bool:
    """Errors of the cloud client or the HTTP stack (reported as LeapError); others propagate."""
    for c in type(exc).__mro__:
        if c.__module__.split(".")[0] in ("requests", "urllib3") or c.__module__.startswith("dwave.cloud"):
            return True
        if c.__name__ in ("ConnectionError", "TimeoutError", "RequestTimeout", "PollingTimeout"):
            return True
    return False


def _prepare(problem, backend: str, save_dir, request: dict[str, Any]) -> RunStore:
    store = RunStore(backend, save_dir)
    store.save_problem(problem)
    store.save_json("request.json", {
        "backend": backend, "num_blocks": problem.num_blocks, "num_remove": getattr(problem, "num_remove", None),
        "problem_kind": problem.kind,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "parameters": {k: (repr(v) if callable(v) else v) for k, v in request.items()},
    })
    return store


def _config_from(params: dict[str, Any]) -> dict[str, Any]:
    """Pop the client settings out of ``params``."""
    keys = ("request_timeout", "http_retry_total", "polling_timeout", "token", "endpoint", "region",
            "solver", "profile", "config_file")
    return client_config(**{k: params.pop(k) for k in keys if k in params})


def _sampler_for(backend: str, sampler: Any, sampler_factory: Callable[..., Any] | None,
                 params: dict[str, Any]) -> Any:
    """``sampler`` if given, else a new cloud client; the client settings are popped out of ``params`` either way."""
    config = _config_from(params)
    return sampler if sampler is not None else make_sampler(backend, sampler_factory=sampler_factory, **config)


def _finish_leap(problem, result: dimod.SampleSet, store: RunStore, calls: list[dict[str, Any]]) -> dimod.SampleSet:
    result.info["leap"] = {"run_dir": str(store.path), "submissions": calls}
    result.info["run_dir"] = str(store.path)
    store.save_sampleset("final.json", result)
    return result


# ---------------------------------------------------------------------------- runners
def run_hybrid(
    problem,
    sampler: Any = None,
    *,
    num_solutions: int,
    seed: int | None,
    time_limit: float | None = None,
    penalty: float | None = None,
    penalty_scan: tuple[float, ...] | None = (1.0,),
    repair: bool = True,
    polish: bool = True,
    sampler_factory: Callable[..., Any] | None = None,
    save_dir: str | os.PathLike | None = None,
    label: str | None = None,
    **params: Any,
) -> dimod.SampleSet:
    """``leap-hybrid``: LeapHybridSampler on the penalised BQM (one submission per penalty strength).

    Args:
        time_limit: seconds per submission (default: the solver's minimum for the problem size).
        penalty_scan: fractions of the safe strength (default only the safe one: each submission costs
            at least the minimum time limit of Leap time).
        sampler_factory: ``callable(**config) -> sampler`` replacing LeapHybridSampler (tests).
        save_dir: root folder for the saved run (default :func:`default_store_root`).
        request_timeout, http_retry_total, polling_timeout: network bounds (see :func:`client_config`).
    """
    from qblock._solve import penalty_pipeline

    inner = _sampler_for("leap-hybrid", sampler, sampler_factory, params)
    store = _prepare(problem, "leap-hybrid", save_dir, {"time_limit": time_limit, "penalty": penalty,
                                                        "penalty_scan": penalty_scan, **params})
    fixed: dict[str, Any] = {}
    if time_limit is not None:
        fixed["time_limit"] = float(time_limit)
    if label is not None:
        fixed["label"] = label
    rec = _RecordingSampler(inner, store, "leap-hybrid", fixed)
    try:
        result = penalty_pipeline(problem, rec, num_solutions=num_solutions, seed=seed, penalty=penalty,
                                  penalty_scan=penalty_scan, repair=repair, polish=polish, **params)
    finally:
        _close(inner)
    return _finish_leap(problem, result, store, rec.calls)


def run_cqm(
    problem,
    sampler: Any = None,
    *,
    num_solutions: int,
    seed: int | None,
    time_limit: float | None = None,
    sampler_factory: Callable[..., Any] | None = None,
    save_dir: str | os.PathLike | None = None,
    label: str | None = None,
    repair: bool = True,
    **params: Any,
) -> dimod.SampleSet:
    """``leap-cqm``: LeapHybridCQMSampler on the CQM with the native equality constraint.

    Feasible samples are kept (``num_infeasible`` counts the others). Only if the solver returned no
    feasible sample at all are the infeasible ones repaired greedily (``info['repaired']``), so
    that a result always exists.
    """
    inner = _sampler_for("leap-cqm", sampler, sampler_factory, params)
    store = _prepare(problem, "leap-cqm", save_dir, {"time_limit": time_limit, **params})
    cqm = problem.to_cqm()
    store.save_model("model.cqm", cqm)
    kw = dict(params)
    if time_limit is not None:
        kw["time_limit"] = float(time_limit)
    if label is not None:
        kw["label"] = label
    raw, wall = _timed_submit(lambda: _resolved(inner.sample_cqm(cqm, **kw)), "leap-cqm", client=inner)
    store.save_sampleset("result-0.json", raw)
    return _decode_constrained(problem, raw, store, num_solutions, wall, repair, "leap-cqm")


def _decode_constrained(problem, raw, store, num_solutions, wall, repair, backend) -> dimod.SampleSet:
    from qblock._solve import finish

    X = problem.states_from_sampleset(raw)
    X = np.repeat(X, np.asarray(raw.record.num_occurrences), axis=0)
    if "is_feasible" in raw.record.dtype.names:
        ok = np.repeat(np.asarray(raw.record.is_feasible, bool), np.asarray(raw.record.num_occurrences))
    else:
        ok = np.ones(len(X), bool)
    ok &= problem.feasible_mask(X)
    info: dict[str, Any] = {"repaired": False}
    if ok.any() or not repair:
        Xk = X[ok]
    else:
        Xk = problem.repair_states(X)
        info["repaired"] = True
    result = finish(problem, Xk, info, num_solutions, num_reads=len(X), num_infeasible=int((~ok).sum()), penalty=None)
    return _finish_leap(problem, result, store, [_call_record(raw.info, wall, len(raw))])


def run_qpu(
    problem,
    sampler: Any = None,
    *,
    num_solutions: int,
    seed: int | None,
    num_reads: int = 100,
    chain_strength: float | None = None,
    chain_strength_prefactor: float = 1.414,
    annealing_time: float | None = None,
    penalty: float | None = None,
    penalty_scan: tuple[float, ...] | None = None,
    repair: bool = True,
    polish: bool = True,
    sampler_factory: Callable[..., Any] | None = None,
    save_dir: str | os.PathLike | None = None,
    label: str | None = None,
    **params: Any,
) -> dimod.SampleSet:
    """``dwave-qpu``: DWaveSampler + EmbeddingComposite on the penalised BQM, over the penalty scan.

    The chain strength is ``chain_strength`` if given, else uniform torque compensation
    (``dwave.embedding.chain_strength.uniform_torque_compensation``, ``prefactor`` 1.414) of each
    submitted BQM; ``info['leap']['submissions']`` holds, per submission, the chain strength used,
    the mean chain-break fraction, the physical qubits and the QPU timing; ``info`` also has their
    summary (``chain_strength``, ``chain_break_fraction``). The minor embedding is seeded with
    ``seed`` (same seed, same embedding).
    """
    from functools import partial

    from dwave.embedding.chain_strength import uniform_torque_compensation
    from dwave.system import EmbeddingComposite

    from qblock._solve import penalty_pipeline

    child = _sampler_for("dwave-qpu", sampler, sampler_factory, params)
    store = _prepare(problem, "dwave-qpu", save_dir, {
        "num_reads": num_reads, "chain_strength": chain_strength, "annealing_time": annealing_time,
        "chain_strength_prefactor": chain_strength_prefactor, "penalty": penalty, "penalty_scan": penalty_scan, **params})
    composite = EmbeddingComposite(child)
    fixed: dict[str, Any] = {
        "return_embedding": True,
        "chain_strength": float(chain_strength) if chain_strength is not None
        else partial(uniform_torque_compensation, prefactor=float(chain_strength_prefactor)),
    }
    if seed is not None:
        fixed["embedding_parameters"] = {"random_seed": int(seed) % (2**31)}
    if annealing_time is not None:
        fixed["annealing_time"] = float(annealing_time)
    if label is not None:
        fixed["label"] = label
    rec = _RecordingSampler(composite, store, "dwave-qpu", fixed)
    try:
        result = penalty_pipeline(problem, rec, num_solutions=num_solutions, seed=seed, penalty=penalty,
                                  penalty_scan=penalty_scan, repair=repair, polish=polish,
                                  num_reads=int(num_reads), **params)
    finally:
        _close(child)
    cs = [c["chain_strength"] for c in rec.calls if "chain_strength" in c]
    cbf = [c["chain_break_fraction"] for c in rec.calls if "chain_break_fraction" in c]
    result.info["chain_strength"] = cs[0] if len(cs) == 1 else cs
    result.info["chain_strength_method"] = "given" if chain_strength is not None else \
        f"uniform_torque_compensation(prefactor={chain_strength_prefactor})"
    result.info["chain_break_fraction"] = float(np.mean(cbf)) if cbf else None
    qpu_us = [float(c["timing"].get("qpu_access_time", 0.0)) for c in rec.calls if isinstance(c.get("timing"), dict)]
    result.info["qpu_access_time_us"] = float(sum(qpu_us)) if qpu_us else None
    return _finish_leap(problem, result, store, rec.calls)


def _close(sampler: Any) -> None:
    close = getattr(sampler, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # closing must never hide the real result or error
            pass


# ---------------------------------------------------------------------------- nonlinear model
def build_nl_model(problem):
    """A dwave-optimization nonlinear model of the problem, with no constraint.

    The decision is a list (permutation) variable ``order`` of ``range(N)``; its first ``M`` entries
    are the removed blocks. The objective is
    ``sum_{a,b<M} H[order[a], order[b]] + sum_{a<M} linear[order[a]] + offset``,
    i.e. ``x^T H x + h^T x + c`` of the removal vector, for every permutation.

    Returns:
        ``(model, order)``; the model is locked (ready to evaluate states or to upload).

    Example:
        >>> import qblock, numpy as np
        >>> p = qblock.random_problem(6, 2, seed=0)
        >>> perms = np.array([[3, 1, 0, 2, 4, 5], [0, 5, 1, 2, 3, 4]])
        >>> np.allclose(nl_energies(p, perms), [p.energy_of([3, 1]), p.energy_of([0, 5])])
        True
    """
    from qblock._lazy import require

    require("dwave.optimization", "leap")
    from dwave.optimization import Model

    n, m = problem.num_blocks, problem._require_m()
    if m < 1:
        raise ValueError("leap-nl needs num_remove >= 1 (with M = 0 there is nothing to choose)")
    model = Model()
    H = model.constant(np.asarray(problem.H, dtype=np.float64))
    order = model.list(n)
    removed = order[:m]
    ia = model.constant(np.repeat(np.arange(m), m).astype(np.float64))
    ib = model.constant(np.tile(np.arange(m), m).astype(np.float64))
    objective = H[removed[ia], removed[ib]].sum()
    if np.any(problem.linear):
        objective = objective + model.constant(np.asarray(problem.linear, dtype=np.float64))[removed].sum()
    if problem.offset:
        objective = objective + model.constant(float(problem.offset))
    model.minimize(objective)
    model.lock()
    return model, order


def nl_energies(problem, permutations: Any, model_and_order=None) -> np.ndarray:
    """Objective values of the NL model at the given permutations (rows), evaluated offline."""
    model, order = model_and_order or build_nl_model(problem)
    P = np.asarray(permutations, dtype=np.float64).reshape(-1, problem.num_blocks)
    model.states.resize(len(P))
    for i, perm in enumerate(P):
        order.set_state(i, perm)
    return np.array([model.objective.state(i) for i in range(len(P))])


def _nl_states(problem, model, order) -> np.ndarray:
    m = problem._require_m()
    X = np.zeros((len(model.states), problem.num_blocks), dtype=np.int8)
    for i in range(len(model.states)):
        perm = np.asarray(order.state(i), dtype=np.int64)
        X[i, perm[:m]] = 1
    return X


def run_nl(
    problem,
    sampler: Any = None,
    *,
    num_solutions: int,
    seed: int | None,
    time_limit: float | None = None,
    sampler_factory: Callable[..., Any] | None = None,
    save_dir: str | os.PathLike | None = None,
    label: str | None = None,
    polish: bool = False,
    **params: Any,
) -> dimod.SampleSet:
    """``leap-nl``: LeapHybridNLSampler on :func:`build_nl_model` (every state feasible).

    The solver returns up to a few states (the model's ``states``); each becomes a removal vector.
    With ``polish`` the states are also improved by 1-in/1-out swap descent and their swap
    neighbours added (useful for a longer top-k; off by default so the result is the solver's own).
    """
    from qblock._solve import enrich_with_neighbours, finish

    model, order = build_nl_model(problem)
    inner = _sampler_for("leap-nl", sampler, sampler_factory, params)
    store = _prepare(problem, "leap-nl", save_dir, {"time_limit": time_limit, "polish": polish, **params})
    store.save_model("model.nl", model)
    kw = dict(params)
    if label is not None:
        kw["label"] = label

    def submit():
        future = inner.sample(model, time_limit=time_limit, **kw)
        return future.result() if hasattr(future, "result") else future

    res, wall = _timed_submit(submit, "leap-nl", client=inner)
    resolve = getattr(model.states, "resolve", None)
    if callable(resolve):
        resolve()  # the answer is loaded into model.states by a hook on the future
    X = _nl_states(problem, model, order)
    objective = [float(model.objective.state(i)) for i in range(len(model.states))]
    res_info = dict(getattr(res, "info", {}) or {})
    store.save_json("result-0.json", {"states": X.tolist(), "objective": objective, "info": res_info})
    info: dict[str, Any] = {"nl_objective": objective, "polished": bool(polish)}
    if polish and len(X):
        from qblock.backends.local_search import swap_descent

        Xp, _ = swap_descent(problem.H, problem.linear, X)
        X = enrich_with_neighbours(problem, np.concatenate([X, Xp]), num_solutions)
    result = finish(problem, X, info, num_solutions, num_reads=len(objective), num_infeasible=0, penalty=None)
    return _finish_leap(problem, result, store, [_call_record(res_info, wall, len(objective))])


# ---------------------------------------------------------------------------- dry run
def dry_run_plan(problem, backend: str, **params: Any) -> dict[str, Any]:
    """What ``backend`` would send for ``problem``, computed offline (no network call, no token needed).

    Returns:
        A JSON-ready dict: ``backend``, ``solver_class``, ``num_variables``, ``num_interactions``
        (couplers of the BQM / quadratic terms of the objective), ``num_constraints``,
        ``submissions`` (one per penalty strength for BQM backends), ``time_limit_s`` (given or
        Leap's smallest), and for ``dwave-qpu`` an estimate of physical qubits (clique embedding on
        an Advantage Pegasus P16 graph), chain length and QPU access time (typical timing constants;
        the solver's own estimate may differ), plus where the run would be saved.

    Example:
        >>> import qblock
        >>> plan = dry_run_plan(qblock.random_problem(12, 4, seed=0), "leap-cqm")
        >>> plan["num_variables"], plan["num_constraints"], plan["network"]
        (12, 1, 'none (dry run)')
    """
    from qblock._solve import DEFAULT_PENALTY_SCAN

    if backend not in _SAMPLER_CLASSES:
        raise ValueError(f"dry run is for the Leap backends {', '.join(_SAMPLER_CLASSES)}; got {backend!r}")
    n = problem.num_blocks
    m = problem._require_m() if problem.kind == "block_removal" else None
    params = dict(params)
    time_limit = params.get("time_limit")
    plan: dict[str, Any] = {
        "backend": backend,
        "solver_class": ".".join(_SAMPLER_CLASSES[backend]),
        "num_blocks": n,
        "num_remove": m,
        "network": "none (dry run)",
        "token": check_token()[1],
        "save_dir": str(Path(params["save_dir"]) if params.get("save_dir") else default_store_root()) + f"/<timestamp>-{backend}/",
        "client": {k: v for k, v in client_config(**{k: params.get(k) for k in
                                                     ("request_timeout", "http_retry_total", "polling_timeout")}).items()},
    }
    if backend in ("leap-hybrid", "dwave-qpu"):
        bqm = problem.to_bqm(penalty=params.get("penalty"))
        if params.get("penalty") is not None:
            scan = [float(params["penalty"])]
        else:
            default_scan = (1.0,) if backend == "leap-hybrid" else DEFAULT_PENALTY_SCAN
            fracs = params.get("penalty_scan") or default_scan
            scan = [float(f) * problem.safe_penalty() for f in fracs]
        plan.update({
            "model": "penalised BQM (PyQUBO)",
            "num_variables": bqm.num_variables,
            "num_interactions": bqm.num_interactions,
            "num_constraints": 0,
            "penalty_strengths": scan,
            "submissions": len(scan),
        })
    elif backend == "leap-cqm":
        cqm = problem.to_cqm()
        plan.update({
            "model": "CQM (objective + equality constraint 'remove_exactly_M')" if m is not None
            else "CQM (objective + knapsack inequality 'budget' and prefix inequalities)",
            "num_variables": len(cqm.variables),
            "num_interactions": cqm.objective.num_interactions,
            "num_constraints": len(cqm.constraints),
            "submissions": 1,
        })
    else:  # leap-nl
        n_terms = m * m
        plan.update({
            "model": f"nonlinear model: list variable of {n}, first {m} entries removed (no constraint)",
            "num_variables": n,
            "decision": f"list({n})",
            "num_interactions": int(np.count_nonzero(np.triu(problem.H, 1))),
            "indexed_pair_terms": n_terms,
            "num_constraints": 0,
            "submissions": 1,
        })
    if backend == "dwave-qpu":
        reads = int(params.get("num_reads", 100))
        anneal = float(params.get("annealing_time") or _TYPICAL_ANNEAL_US)
        per_submission = (_TYPICAL_PROGRAMMING_US + _TYPICAL_PROGRAMMING_THERMALIZATION_US
                          + reads * (anneal + _TYPICAL_READOUT_US + _TYPICAL_DELAY_US))
        plan.update({
            "num_reads": reads,
            "annealing_time_us": anneal,
            "estimated_qpu_access_time_us": per_submission * plan["submissions"],
            "qpu_time_model": ("typical Advantage constants: programming 15 ms + thermalisation 1 ms + "
                               "reads * (anneal + 120 us readout + 21 us delay)"),
        })
        plan.update(_clique_embedding_estimate(n))
        plan["time_limit_s"] = None
    else:
        minimum = _MIN_TIME_LIMIT[backend]
        plan["time_limit_s"] = float(time_limit) if time_limit is not None else minimum
        plan["time_limit_note"] = "given" if time_limit is not None else (
            f"solver minimum for small problems (about {minimum:g} s; the solver's own rule decides)")
        plan["estimated_leap_time_s"] = plan["time_limit_s"] * plan["submissions"]
    return plan


def _clique_embedding_estimate(n: int) -> dict[str, Any]:
    """Physical qubits of a clique embedding of ``K_n`` on an Advantage-like Pegasus P16 (offline)."""
    try:
        import dwave.graphs as dg
        import minorminer.busclique as bc

        emb = bc.find_clique_embedding(n, dg.pegasus_graph(16))
    except Exception as exc:  # the estimate is optional
        return {"embedding_estimate": f"unavailable ({type(exc).__name__}: {exc})"}
    if not emb:
        return {"embedding_estimate": f"K_{n} does not fit on Pegasus P16"}
    lengths = [len(c) for c in emb.values()]
    return {
        "embedding_estimate": "clique embedding on Pegasus P16 (Advantage); EmbeddingComposite may find a smaller one",
        "estimated_physical_qubits": int(sum(lengths)),
        "estimated_max_chain_length": int(max(lengths)),
    }


def format_plan(plan: dict[str, Any]) -> str:
    """A readable multi-line rendering of :func:`dry_run_plan`'s result.

    Example:
        >>> import qblock
        >>> print(format_plan(dry_run_plan(qblock.random_problem(8, 2, seed=0), "leap-cqm")).splitlines()[0])
        dry run: leap-cqm would send (no network call made)
    """
    lines = [f"dry run: {plan['backend']} would send (no network call made)"]
    order = ["solver_class", "model", "num_variables", "num_interactions", "num_constraints", "submissions",
             "penalty_strengths", "time_limit_s", "time_limit_note", "estimated_leap_time_s", "num_reads",
             "annealing_time_us", "estimated_physical_qubits", "estimated_max_chain_length",
             "estimated_qpu_access_time_us", "qpu_time_model", "embedding_estimate", "decision",
             "indexed_pair_terms", "client", "token", "save_dir"]
    width = max(len(k) for k in order)
    for key in order:
        if key not in plan or plan[key] is None:
            continue
        v = plan[key]
        if isinstance(v, float):
            v = f"{v:.6g}"
        elif isinstance(v, list):
            v = ", ".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in v)
        elif isinstance(v, dict):
            v = ", ".join(f"{k}={x}" for k, x in v.items())
        lines.append(f"  {key:<{width}}  {v}")
    return "\n".join(lines)
