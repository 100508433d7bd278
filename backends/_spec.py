"""What a backend is to the registry: :class:`BackendSpec`, the registry itself and :func:`register`.

Kept apart from :mod:`qblock.backends` so that the modules registering backends
(:mod:`qblock.backends._optional`, a plug-in of your own) import this small module, not the package
that imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from qblock.backends._params import Param

__all__ = ["BackendSpec", "register", "PENALTY_PARAMS"]


@dataclass(frozen=True)
class BackendSpec:
    """How to build one backend."""

    name: str
    target: str  # "module:attribute" of the sampler class (or factory)
    kind: str  # "constrained" | "penalty" | "cqm"
    description: str
    requires: tuple[str, ...] = ()
    extra: str | None = None
    runner: str | None = None  # optional "module:function" that replaces the default solve path
    check: str | None = None  # optional "module:function" -> (ok, reason) for run-time conditions (tokens)
    defaults: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = True
    #: every keyword the backend takes (besides ``num_solutions`` and ``seed``); others are rejected
    params: dict[str, Param] = field(default_factory=dict)
    #: the problem kinds it solves (``problem.kind``); :func:`qblock.solve` refuses others in one line
    problems: tuple[str, ...] = ("block_removal",)
    #: ``{problem kind: "module:function"}``: a runner for that kind replacing the default path
    problem_runners: dict[str, str] = field(default_factory=dict)
    #: ``max_variables(params)``: the most variables it takes with those parameters (None: no bound), or None
    max_variables: Callable[[dict[str, Any]], int | None] | None = None

    def accepts(self, kind: str) -> bool:
        """Whether this backend solves problems of ``kind``.

        Example:
            >>> from qblock.backends import get_spec
            >>> get_spec("sa").accepts("rank_selection"), get_spec("qaoa").accepts("rank_selection")
            (True, False)
        """
        return kind in self.problems


_REGISTRY: dict[str, BackendSpec] = {}


def register(spec: BackendSpec, *, replace: bool = False) -> None:
    """Add a backend to the registry.

    ``spec.params`` must list every keyword the backend takes: :func:`qblock.solve` rejects any other.
    """
    if spec.kind not in ("constrained", "penalty", "cqm"):
        raise ValueError(f"unknown backend kind {spec.kind!r}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"backend {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


#: what :func:`qblock.solve`'s penalty pipeline takes, for every backend of kind "penalty"
PENALTY_PARAMS: dict[str, Param] = {
    "penalty": Param("float", low=0, none=True, doc="one penalty strength instead of the scan"),
    "penalty_scan": Param("floats", low=0, low_open=True, none=True,
                          doc="fractions of the safe penalty strength, e.g. [0.02, 1.0]"),
    "repair": Param("bool", doc="make infeasible reads feasible by greedy add/drop"),
    "polish": Param("bool", doc="finish every read with swap descent"),
}

#: the problem kinds of the built-in core backends
_BOTH = ("block_removal", "rank_selection")
