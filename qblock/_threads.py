"""One BLAS thread around small dense linear algebra.

The solvers work on matrices of tens to a few hundred rows. Multithreaded OpenBLAS/MKL only adds
contention there: on a busy 2-core machine one 81x81 ``eigh`` took 24-43 ms on two threads and 0.8 ms
on one. ``threadpoolctl`` is a core dependency, so this limit always applies.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from threadpoolctl import threadpool_limits


@contextmanager
def single_blas_thread() -> Iterator[None]:
    """Limit BLAS/OpenMP pools to one thread inside the block, restoring them after.

    Example:
        >>> import numpy as np
        >>> with single_blas_thread():
        ...     w = np.linalg.eigvalsh(np.eye(3))
        >>> w.tolist()
        [1.0, 1.0, 1.0]
    """
    with threadpool_limits(1):
        yield
