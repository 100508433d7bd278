"""The solutions JSON of ``qblock solve --json``: its one writer and its one reader.

Written by ``qblock solve --json`` (:func:`solutions_payload`), read by ``qblock validate --solutions``
and ``qblock prune --solutions`` (:func:`read_solutions_file`). The file is a JSON object::

    {"num_blocks": N, "num_remove": M, "labels": [...], "metadata": {...}, "info": {...},
     "solutions": [{"rank": 1, "energy": E, "removed": [i, ...], "removed_labels": [...],
                    "num_occurrences": 1}, ...]}

Readers take the solutions in the order of their ``"rank"`` (then energy), never their list position.

Example:
    >>> import json, os, tempfile, qblock
    >>> p = qblock.random_problem(8, 2, seed=0)
    >>> ss = qblock.solve(p, "exact", num_solutions=3)
    >>> path = os.path.join(tempfile.mkdtemp(), "s.json")
    >>> with open(path, "w") as f:
    ...     json.dump(solutions_payload(p, ss), f)
    >>> sols = read_solutions_file(path)
    >>> sols.num_remove, len(sols.removed), sols.removed[0] == p.removed_blocks(ss.first.sample)
    (2, 3, True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SolutionsFileError", "Solutions", "solutions_payload", "read_solutions_file"]


class SolutionsFileError(ValueError):
    """A solutions file that cannot be read; the message is one line naming the file."""


@dataclass(frozen=True)
class Solutions:
    """What a solutions file holds, in rank order.

    Attributes:
        path: the file read.
        num_blocks: ``N`` recorded by the writer (``None`` when absent or not a whole number).
        num_remove: ``M`` recorded by the writer (``None`` when absent).
        removed: the removed block indices of each solution, as written (not sorted, repeats kept:
            the consumer decides what a repeat means), in rank order.
    """

    path: Path
    num_blocks: int | None
    num_remove: int | None
    removed: list[list[int]]


def solutions_payload(problem, ss) -> dict:
    """JSON-ready description of a result (read back by :func:`read_solutions_file`)."""
    if problem.kind == "rank_selection":
        return _rank_payload(problem, ss)
    sols = []
    for rank, (sample, energy, occ) in enumerate(ss.data(["sample", "energy", "num_occurrences"]), start=1):
        removed = problem.removed_blocks(sample)
        sols.append({
            "rank": rank,
            "energy": float(energy),
            "removed": removed,
            "removed_labels": [problem.labels[i] for i in removed],
            "num_occurrences": int(occ),
        })
    info = {k: v for k, v in ss.info.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}
    return {
        "num_blocks": problem.num_blocks,
        "num_remove": problem.num_remove,
        "labels": list(problem.labels),
        "metadata": problem.metadata,
        "info": info,
        "solutions": sols,
    }


def _rank_payload(problem, ss) -> dict:
    """JSON-ready description of a rank-selection result: kept groups, groups per matrix, cost."""
    sols = []
    for rank, (sample, energy) in enumerate(ss.data(["sample", "energy"]), start=1):
        y = [int(sample[i]) for i in range(problem.num_variables)]
        sols.append({"rank": rank, "energy": float(energy), "kept": [i for i, v in enumerate(y) if v],
                     "groups_per_matrix": problem.ranks_of(y), "cost": int(problem.total_costs(y)[0])})
    info = {k: v for k, v in ss.info.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}
    return {"problem_kind": problem.kind, "num_variables": problem.num_variables, "budget": problem.budget,
            "matrix_names": list(problem.matrix_names), "metadata": problem.metadata, "info": info,
            "solutions": sols}


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    s = json.dumps(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _rank_key(sol: dict) -> tuple[int, float]:
    try:
        return int(sol.get("rank", 0)), float(sol.get("energy", 0.0))
    except (TypeError, ValueError):
        return 0, 0.0


def read_solutions_file(path: str | Path) -> Solutions:
    """Read and check a ``qblock solve --json`` file: every solution a list of whole block numbers.

    Raises:
        SolutionsFileError: no such file, not JSON, no ``"solutions"`` list of objects, or a
            ``"removed"`` that is not a list of whole numbers (one line naming the file and solution).
    """
    p = Path(path)
    if not p.is_file():
        raise SolutionsFileError(f"solutions file not found: {path}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SolutionsFileError(f"{path} is not a solutions file from `qblock solve --json` (not JSON)") from None
    sols = data.get("solutions") if isinstance(data, dict) else None
    if not isinstance(sols, list) or not all(isinstance(s, dict) for s in sols):
        raise SolutionsFileError(f'{path} is not a solutions file from `qblock solve --json` (no "solutions" list)')
    sols = sorted(sols, key=_rank_key)
    removed = []
    for pos, sol in enumerate(sols, start=1):
        r = sol.get("removed")
        if not isinstance(r, list) or not all(_whole(i) for i in r):
            raise SolutionsFileError(f'{path} solution {pos}: "removed" must be a list of whole block numbers, '
                                     f"got {_short(r)}")
        removed.append(list(r))
    num_blocks = data.get("num_blocks")
    num_remove = data.get("num_remove")
    return Solutions(path=p, num_blocks=num_blocks if _whole(num_blocks) else None,
                     num_remove=num_remove if _whole(num_remove) else None, removed=removed)
