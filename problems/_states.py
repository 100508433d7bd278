"""Rules shared by every problem class: what a batch of states is, and a quadratic objective over it."""

from __future__ import annotations

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


def quadratic_energies(Xf: np.ndarray, H: np.ndarray, linear: np.ndarray, offset: float) -> np.ndarray:
    """``x^T H x + linear . x + offset`` of every row of ``Xf``, vectorised.

    Example:
        >>> quadratic_energies(np.array([[1.0, 1.0]]), np.eye(2), np.zeros(2), 0.5)
        array([2.5])
    """
    return np.einsum("ki,ij,kj->k", Xf, H, Xf) + Xf @ linear + offset
