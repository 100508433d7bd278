"""Backend parameters: each backend declares what it takes, and :func:`validate` checks it, one rule for all.

Every backend spec lists its parameters as :class:`Param` entries (type, range, choices, whether
``None`` is allowed). :func:`qblock.solve` validates the keyword arguments against that list before
anything runs, so every backend rejects unknown names, wrong types and out-of-range values the same
way, with one line that names the parameter, the backend and what is allowed. Values are never
rounded (``num_reads=1.5`` is an error) and nothing falls back silently (``penalty_scan=[]`` is an
error).

Example:
    >>> spec = {"num_reads": Param("int", low=1, doc="independent reads")}
    >>> validate("demo", spec, {"num_reads": 8.0})
    {'num_reads': 8}
    >>> validate("demo", spec, {"num_reads": 1.5})
    Traceback (most recent call last):
    ...
    ValueError: backend 'demo': parameter 'num_reads' must be an integer >= 1 (independent reads), got 1.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["Param", "validate", "describe_param"]

_KINDS = ("int", "float", "bool", "choice", "floats", "pair", "any")


@dataclass(frozen=True)
class Param:
    """One backend parameter.

    Attributes:
        kind: ``"int"``, ``"float"``, ``"bool"``, ``"choice"`` (one of ``choices``), ``"floats"`` (a
            non-empty list of numbers, each in range), ``"pair"`` (two numbers, each in range) or
            ``"any"`` (passed through unchecked: callables, client objects).
        low: smallest allowed value (numbers), or ``None``.
        high: largest allowed value, or ``None``.
        low_open: ``low`` itself is not allowed (``> low`` instead of ``>= low``).
        choices: allowed values of a ``"choice"``.
        none: ``None`` (JSON ``null``) is allowed and means the documented default.
        doc: a few words on the meaning or unit, repeated in error messages.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[Any, ...] = ()
    none: bool = False
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown parameter kind {self.kind!r}; use one of {', '.join(_KINDS)}")


def _range_text(p: Param) -> str:
    parts = []
    if p.low is not None:
        parts.append(f"{'>' if p.low_open else '>='} {p.low:g}")
    if p.high is not None:
        parts.append(f"<= {p.high:g}")
    return " and ".join(parts)


def describe_param(p: Param) -> str:
    """What a value of ``p`` must be, in words (``"an integer >= 1"``)."""
    rng = _range_text(p)
    what = {
        "int": "an integer",
        "float": "a finite number",
        "bool": "true or false",
        "choice": "one of " + ", ".join(repr(c) for c in p.choices),
        "floats": "a non-empty list of numbers",
        "pair": "a list of two numbers",
        "any": "any value",
    }[p.kind]
    if rng:
        what += (" " if p.kind in ("int", "float") else ", each ") + rng
    if p.none:
        what += ", or null for the default"
    if p.doc:
        what += f" ({p.doc})"
    return what


def _is_number(v: Any) -> bool:
    try:
        import numpy as np

        numeric = (int, float, np.integer, np.floating)
    except ImportError:  # pragma: no cover - numpy is a core dependency
        numeric = (int, float)
    return isinstance(v, numeric) and not isinstance(v, bool)


def _in_range(p: Param, x: float) -> bool:
    if not math.isfinite(x):
        return False
    if p.low is not None and (x <= p.low if p.low_open else x < p.low):
        return False
    return p.high is None or x <= p.high


def _number(p: Param, v: Any) -> float | None:
    """``v`` as a float in range, or ``None`` if it is not one."""
    if not _is_number(v):
        return None
    x = float(v)
    return x if _in_range(p, x) else None


def _check(p: Param, v: Any) -> tuple[bool, Any]:
    """``(ok, normalised value)``."""
    if v is None:
        return p.none, None
    if p.kind == "any":
        return True, v
    if p.kind == "bool":
        import numpy as np

        return (isinstance(v, (bool, np.bool_)), bool(v) if isinstance(v, (bool, np.bool_)) else v)
    if p.kind == "choice":
        return (isinstance(v, (str, int)) and not isinstance(v, bool) and v in p.choices), v
    if p.kind == "int":
        x = _number(p, v)
        # an integral float such as 8.0 (JSON 8.0 or 1e3) is accepted; 1.5 is not rounded
        return (x is not None and x == int(x)), (int(x) if x is not None and x == int(x) else v)
    if p.kind == "float":
        x = _number(p, v)
        return x is not None, (x if x is not None else v)
    # lists: "floats" (non-empty, any length) and "pair" (exactly two)
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or not hasattr(v, "__iter__"):
        return False, v
    items = [_number(p, x) for x in v]
    ok = len(items) > 0 and all(x is not None for x in items)
    if p.kind == "pair":
        ok = ok and len(items) == 2
    return ok, (tuple(items) if ok else v)


def validate(backend: str, spec: Mapping[str, Param], params: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``params`` against a backend's declared parameters and return them normalised.

    Integral numbers become ``int``, numbers ``float``, lists ``tuple``; everything else is unchanged.

    Raises:
        ValueError: one line naming the backend, the parameter and what is allowed.
    """
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name not in spec:
            allowed = ", ".join(sorted(spec)) or "none"
            raise ValueError(f"backend {backend!r}: unknown parameter {name!r}; its parameters are: {allowed}")
        p = spec[name]
        ok, norm = _check(p, value)
        if not ok:
            raise ValueError(f"backend {backend!r}: parameter {name!r} must be {describe_param(p)}, got {value!r}")
        out[name] = norm
    return out
