"""Optional dependencies are imported on first use, with an error that names the install command."""

from __future__ import annotations

import importlib
from types import ModuleType

#: extra -> what to tell the user
INSTALL_HINTS = {
    "llm": "pip install 'qblock[llm]'  (CPU torch: pip install torch==2.13.0 first)",
    "qaoa": "pip install 'qblock[qaoa]'",
    "leap": "pip install 'qblock[leap]'",
    "sqa": "pip install 'qblock[sqa]'",
    "miqp": "pip install 'qblock[miqp]'",
    "gurobi": "pip install 'qblock[gurobi]'  (the pip licence is size-limited)",
    "viz": "pip install 'qblock[viz]'",
    "eval": "pip install 'qblock[eval]'",
}


class MissingDependencyError(ImportError):
    """Raised when an optional dependency of qblock is not installed."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra to install.

    Example:
        >>> np = require("numpy", "llm")
        >>> np.__name__
        'numpy'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised through monkeypatching in tests
        hint = INSTALL_HINTS.get(extra, f"pip install 'qblock[{extra}]'")
        raise MissingDependencyError(
            f"{module!r} is needed for this feature but is not installed ({exc}). Install it with: {hint}"
        ) from exc


def is_installed(module: str) -> bool:
    """True if ``module`` can be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
