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
    "heal": "pip install 'qblock[heal]'",
}


#: optional modules (and sub-packages) -> the extra that installs them; used to turn an ImportError
#: raised by a plain ``import`` (not through :func:`require`) into the same one-line hint. Modules the
#: core pulls in (numpy, dimod, dwave.samplers, networkx, pyqubo, ...) are deliberately absent: their
#: absence is a broken install, not a missing extra.
MODULE_EXTRAS = {
    "torch": "llm", "transformers": "llm", "tokenizers": "llm", "gguf": "llm", "accelerate": "llm",
    "safetensors": "llm", "scipy": "llm", "pyarrow": "llm",
    "matplotlib": "viz",
    "dwave.system": "leap", "dwave.cloud": "leap", "dwave.embedding": "leap", "dwave.optimization": "leap",
    "minorminer": "leap",
    "qiskit": "qaoa", "qiskit_aer": "qaoa", "qiskit_optimization": "qaoa",
    "openjij": "sqa",
    "pyscipopt": "miqp",
    "gurobipy": "gurobi",
    "lm_eval": "eval",
    "peft": "heal",
}


class MissingDependencyError(ImportError):
    """Raised when an optional dependency of qblock is not installed."""


def _missing(module: str, extra: str, exc: BaseException) -> MissingDependencyError:
    hint = INSTALL_HINTS.get(extra, f"pip install 'qblock[{extra}]'")
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return MissingDependencyError(
        f"{module!r} is needed for this feature but is not installed ({reason}). Install it with: {hint}"
    )


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra to install.

    Example:
        >>> np = require("numpy", "llm")
        >>> np.__name__
        'numpy'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing(module, extra, exc) from exc


def as_missing_dependency(exc: ImportError) -> MissingDependencyError | None:
    """The :class:`MissingDependencyError` an ImportError of an optional module stands for, else ``None``.

    ``exc.name`` (the module that failed) is matched with its parents against :data:`MODULE_EXTRAS`,
    so ``matplotlib.colors`` maps to the ``viz`` extra; an ImportError of anything else (a bug, a
    broken core install) gives ``None`` and should propagate unchanged.

    Example:
        >>> as_missing_dependency(ModuleNotFoundError("No module named 'dwave.system'", name="dwave.system")).args[0]
        "'dwave.system' is needed for this feature but is not installed (No module named 'dwave.system'). Install it with: pip install 'qblock[leap]'"
        >>> as_missing_dependency(ModuleNotFoundError("No module named 'qblock.nope'", name="qblock.nope")) is None
        True
    """
    if isinstance(exc, MissingDependencyError):
        return exc
    parts = (getattr(exc, "name", None) or "").split(".")
    for k in range(len(parts), 0, -1):
        module = ".".join(parts[:k])
        if module in MODULE_EXTRAS:
            return _missing(module, MODULE_EXTRAS[module], exc)
    return None


def is_installed(module: str) -> bool:
    """True if ``module`` can be imported (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
