"""Solver backends (installed as ``qblock.backends``), looked up by name.

Every backend is a :class:`dimod.Sampler` (or uses one) and is imported only when first used.
There are three ways a backend sees the problem, its ``kind``:

* ``"constrained"``: the sampler takes the unpenalised objective BQM and ``num_remove=M`` and only
  ever returns states with exactly M ones (``exact``, ``swap``, QAOA with the XY mixer);
* ``"penalty"``: the sampler takes the penalised BQM built by PyQUBO (``sa``, ``tabu``, ``steepest``,
  D-Wave); :func:`qblock.solve` scans the penalty strength, repairs infeasible reads and polishes them
  with swap moves;
* ``"cqm"``: the sampler takes the :class:`dimod.ConstrainedQuadraticModel`.

A backend may also bring its own ``runner`` (``runner(problem, sampler, num_solutions, seed, **params)``).

Every backend declares its parameters (``BackendSpec.params``: type, range, choices, see
:class:`qblock.backends._params.Param`); :func:`validate_params` checks keyword arguments against
them, the same way for every backend, and :func:`qblock.solve` calls it before anything runs.

Example:
    >>> from qblock import backends
    >>> "exact" in backends.names()
    True
    >>> backends.available()["exact"]["available"]
    True
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from qblock._lazy import INSTALL_HINTS, is_installed
from qblock.backends._params import Param, validate
from qblock.backends._spec import _BOTH, _REGISTRY, PENALTY_PARAMS, BackendSpec, register

__all__ = ["BackendSpec", "Param", "register", "names", "get_spec", "get_sampler", "available", "describe",
           "validate_params", "variable_limit", "PENALTY_PARAMS"]


def names() -> list[str]:
    """Registered backend names, in registration order."""
    return list(_REGISTRY)


def get_spec(name: str) -> BackendSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


def variable_limit(name: str, params: dict[str, Any] | None = None) -> int | None:
    """The most variables backend ``name`` takes with ``params`` (its ``max_variables`` parameter), or None.

    Example:
        >>> variable_limit("qaoa"), variable_limit("qaoa", {"max_qubits": 12}), variable_limit("exact")
        (22, 12, None)
        >>> variable_limit("qaoa", {"method": "matrix_product_state"}) is None
        True
    """
    bound = get_spec(name).max_variables
    return None if bound is None else bound(dict(params or {}))


def validate_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The backend's defaults updated by ``params``, checked against its declared parameters.

    Raises:
        ValueError: unknown backend, unknown parameter, or a value of the wrong type or range (one
            line naming the backend, the parameter and what is allowed).

    Example:
        >>> validate_params("tabu", {"num_reads": 4})["num_reads"]
        4
        >>> validate_params("sa", {"num_reads": "abc"})
        Traceback (most recent call last):
        ...
        ValueError: backend 'sa': parameter 'num_reads' must be an integer >= 1 (independent reads per penalty strength), got 'abc'
    """
    spec = get_spec(name)
    return validate(name, spec.params, {**spec.defaults, **params})


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _missing(spec: BackendSpec) -> list[str]:
    return [m for m in spec.requires if not is_installed(m)]


def get_sampler(name: str, **kwargs: Any):
    """Instantiate the sampler of backend ``name`` (imports its dependencies now)."""
    from qblock._lazy import MissingDependencyError

    spec = get_spec(name)
    missing = _missing(spec)
    if missing:
        hint = INSTALL_HINTS.get(spec.extra or "", f"pip install {' '.join(missing)}")
        raise MissingDependencyError(
            f"backend {name!r} needs {', '.join(missing)}, which is not installed. Install it with: {hint}"
        )
    return _load(spec.target)(**kwargs)


def get_runner(name: str, kind: str = "block_removal") -> Callable | None:
    """The runner of backend ``name`` for problems of ``kind`` (``None``: the default path of its ``kind``)."""
    spec = get_spec(name)
    target = spec.problem_runners.get(kind, spec.runner)
    return _load(target) if target else None


def available() -> dict[str, dict[str, Any]]:
    """For every backend: whether it can run here and, if not, why and what to install.

    Returns:
        ``{name: {"available": bool, "reason": str, "install": str | None, "kind": str, "description": str}}``
    """
    out: dict[str, dict[str, Any]] = {}
    for spec in _REGISTRY.values():
        missing = _missing(spec)
        ok, reason, install = True, "", None
        if missing:
            ok = False
            reason = f"missing {', '.join(missing)}"
            install = INSTALL_HINTS.get(spec.extra or "", f"pip install {' '.join(missing)}")
        elif spec.check:
            try:
                ok, reason = _load(spec.check)()
            except Exception as exc:  # a broken check must not break the listing
                ok, reason = False, f"check failed: {exc}"
        out[spec.name] = {
            "available": bool(ok),
            "reason": reason,
            "install": install,
            "kind": spec.kind,
            "description": spec.description,
            "problems": list(spec.problems),
        }
    return out


def describe() -> str:
    """A readable table of backends and their availability."""
    rows = []
    for name, a in available().items():
        status = "yes" if a["available"] else "no"
        note = a["description"] if a["available"] else f"{a['reason']}" + (f"; {a['install']}" if a["install"] else "")
        rows.append((name, status, a["kind"], note))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'backend':<{w}}  ok   kind         notes", f"{'-' * w}  ---  -----------  -----"]
    lines += [f"{n:<{w}}  {s:<3}  {k:<11}  {d}" for n, s, k, d in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- built-in backends
_READS = Param("int", low=1, doc="independent reads per penalty strength")

_B = "qblock.backends"
#: the problem kinds every backend with a generic path (or a runner per kind) takes
register(BackendSpec("exact", f"{_B}.exact:ExactTopKSampler", "constrained",
                     "certified top-k: enumerates the C(N,M) feasible states (branch-and-bound when too many)",
                     stochastic=False, problems=_BOTH, problem_runners={"rank_selection": f"{_B}.knapsack:run_exact"},
                     params={
                         "strategy": Param("choice", choices=("auto", "enumerate", "bnb")),
                         "progress": Param("bool"),
                         "time_limit": Param("float", low=0, low_open=True, none=True,
                                             doc="seconds for the whole solve; the result is then uncertified"),
                     }))
register(BackendSpec("swap", f"{_B}.swap:SwapAnnealingSampler", "constrained",
                     "fixed-cardinality annealer (Kawasaki swap moves); every read feasible; default",
                     problems=_BOTH, problem_runners={"rank_selection": f"{_B}.knapsack:run_swap"}, params={
                         "num_reads": Param("int", low=1, doc="independent chains"),
                         "num_sweeps": Param("int", low=0, doc="sweeps of N proposed swaps per chain"),
                         "beta_range": Param("pair", low=0, low_open=True, none=True,
                                             doc="[hot, cold] inverse temperatures"),
                         "polish": Param("bool", doc="finish with swap descent"),
                     }))
register(BackendSpec("sa", "dwave.samplers:SimulatedAnnealingSampler", "penalty",
                     "dwave-samplers simulated annealing on the penalised QUBO (penalty scan + repair)",
                     requires=("dwave.samplers",), problems=_BOTH, params={
                         **PENALTY_PARAMS,
                         "num_reads": _READS,
                         "num_sweeps": Param("int", low=1),
                         "num_sweeps_per_beta": Param("int", low=1),
                         "beta_range": Param("pair", low=0, low_open=True, none=True,
                                             doc="[hot, cold] inverse temperatures"),
                         "beta_schedule_type": Param("choice", choices=("linear", "geometric", "custom")),
                         "beta_schedule": Param("floats", low=0, none=True, doc="with beta_schedule_type 'custom'"),
                         "randomize_order": Param("bool"),
                         "proposal_acceptance_criteria": Param("choice", choices=("Metropolis", "Gibbs")),
                     }))
# Tabu stops at the first of `timeout` (wall clock) and `num_restarts`; the default is a fixed number of
# restarts with the timeout only as a generous cap, so the same seed gives the same result on a busy
# machine too (a 20 ms default timeout made the reads depend on the load).
TABU_DEFAULTS = {"num_reads": 16, "num_restarts": 5, "timeout": 60_000}
register(BackendSpec("tabu", "dwave.samplers:TabuSampler", "penalty",
                     "dwave-samplers tabu search on the penalised QUBO (penalty scan + repair)",
                     requires=("dwave.samplers",), defaults=dict(TABU_DEFAULTS), problems=_BOTH, params={
                         **PENALTY_PARAMS,
                         "num_reads": _READS,
                         "num_restarts": Param("int", low=0, doc="restarts per read (deterministic work)"),
                         "timeout": Param("int", low=1, high=3_600_000,
                                          doc="milliseconds per read, a wall-clock cap; when it binds the "
                                              "result depends on the machine's speed"),
                         "tenure": Param("int", low=1, none=True, doc="tabu tenure, below N"),
                         "energy_threshold": Param("float", none=True),
                         "coefficient_z_first": Param("int", low=1, none=True),
                         "coefficient_z_restart": Param("int", low=1, none=True),
                         "lower_bound_z": Param("int", low=1, none=True),
                     }))
register(BackendSpec("steepest", "dwave.samplers:SteepestDescentSolver", "penalty",
                     "dwave-samplers steepest descent from random states (penalty scan + repair)",
                     requires=("dwave.samplers",), problems=_BOTH, params={
                         **PENALTY_PARAMS,
                         "num_reads": _READS,
                         "large_sparse_opt": Param("bool"),
                     }))

# Quantum and cloud backends: registered here by name only, so that `available()` can say what to
# install without importing anything heavy.
from qblock.backends import _optional  # noqa: E402,F401
