"""qblock: choose which transformer blocks to remove by constrained binary optimisation.

The problem ``min x^T H x (+ h^T x)  s.t.  sum(x) = M`` is written once
(:class:`~qblock.problems.BlockRemovalProblem`, built in PyQUBO) and solved by any backend through
:func:`qblock.solve`, which returns a ranked :class:`dimod.SampleSet` of distinct feasible states.

Example:
    >>> import qblock
    >>> p = qblock.random_problem(12, 4, seed=0)
    >>> best = qblock.solve(p, backend="exact", num_solutions=3)
    >>> len(best), bool(best.info["certified_optimal"])
    (3, True)

Heavy parts (torch/transformers, qiskit, dwave-system) are imported only when used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from qblock.problems.block_removal import BlockRemovalProblem
from qblock.problems.synthetic import random_problem
from qblock._solve import INFO_KEYS, solve

__all__ = ["BlockRemovalProblem", "INFO_KEYS", "random_problem", "solve", "__version__"]
