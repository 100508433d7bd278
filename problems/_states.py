"""Rules shared by every problem class: what a batch of states is, a quadratic objective over it, its
qiskit-optimization form and how a problem file is written."""

from __future__ import annotations

import io
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np


def binary_states(X: Any, num_variables: int) -> np.ndarray:
    """``X`` as a float ``(k, n)`` array of 0/1 rows (one row accepted as a vector), or a one-line ValueError.

    Example:
        >>> binary_states([1, 0, 1], 3)
        array([[1., 0., 1.]])
    """
    X = np.asarray(X)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2 or X.shape[1] != num_variables:
        raise ValueError(f"states must have {num_variables} columns, got shape {X.shape}")
    if not np.all((X == 0) | (X == 1)):
        raise ValueError("states must be binary (0/1)")
    return X.astype(np.float64)


def check_num_remove(num_remove: Any, n: int, low: int = 0) -> int:
    """``num_remove`` (M) as an int in ``low..n``, or a one-line ValueError; the one home of that rule.

    Floats must be finite whole numbers (``2.0``, not ``2.5``).

    Example:
        >>> check_num_remove(2.0, 5)
        2
        >>> check_num_remove(9, 5)
        Traceback (most recent call last):
        ...
        ValueError: M (num_remove, the number of blocks to remove) must satisfy 0 <= M <= N = 5, got 9
    """
    ok = isinstance(num_remove, numbers.Integral) or (
        isinstance(num_remove, numbers.Real) and math.isfinite(num_remove) and float(num_remove).is_integer()
    )
    if not ok or isinstance(num_remove, (bool, np.bool_)):
        raise ValueError(f"M (num_remove, the number of blocks to remove) must be a whole number, got {num_remove!r}")
    if not low <= int(num_remove) <= n:
        raise ValueError(f"M (num_remove, the number of blocks to remove) must satisfy {low} <= M <= N = {n}, "
                         f"got {num_remove}")
    return int(num_remove)


def quadratic_energies(Xf: np.ndarray, H: np.ndarray, linear: np.ndarray, offset: float) -> np.ndarray:
    """``x^T H x + linear . x + offset`` of every row of ``Xf``, vectorised.

    Example:
        >>> quadratic_energies(np.array([[1.0, 1.0]]), np.eye(2), np.zeros(2), 0.5)
        array([2.5])
    """
    return np.einsum("ki,ij,kj->k", Xf, H, Xf) + Xf @ linear + offset


def save_npz(path: str | os.PathLike, payload: dict[str, np.ndarray]) -> Path:
    """Write ``payload`` as a compressed ``.npz`` atomically (``.npz`` appended where missing); return the path."""
    from qblock._io import atomic_write_bytes, npz_path

    path = npz_path(path)
    buf = io.BytesIO()
    np.savez_compressed(buf, **payload)
    atomic_write_bytes(path, buf.getvalue())
    return path


def binary_program(problem: Any, name: str, prefix: str):
    """A qiskit-optimization ``QuadraticProgram`` with binaries ``<prefix>0..<prefix>{n-1}`` minimising the
    problem's unpenalised objective (:meth:`objective_bqm`); the caller adds its constraints."""
    from qblock._lazy import require

    qp_mod = require("qiskit_optimization", "qaoa")
    bqm = problem.objective_bqm()
    qp = qp_mod.QuadraticProgram(name)
    for i in range(problem.num_variables):
        qp.binary_var(f"{prefix}{i}")
    qp.minimize(constant=float(bqm.offset), linear={f"{prefix}{i}": float(b) for i, b in bqm.linear.items()},
                quadratic={(f"{prefix}{u}", f"{prefix}{v}"): float(b) for (u, v), b in bqm.quadratic.items()})
    return qp
