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
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SolutionsFileError", "Solutions", "solutions_payload", "read_solutions_file", "check_removed"]


class SolutionsFileError(ValueError):
    """A solutions file that cannot be read; the message is one line naming the file."""


@dataclass(frozen=True)
class Solutions:
    """What a solutions file holds, in rank order.

    Attributes:
        path: the file read.
        num_blocks: ``N`` recorded by the writer (``None`` when absent or not a whole number).
        num_remove: ``M`` recorded by the writer (``None`` when absent).
        removed: the removed block indices of each solution, sorted (checked by :func:`check_removed`:
            whole numbers, none negative, none repeated), in rank order.
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
    return {
        "num_blocks": problem.num_blocks,
        "num_remove": problem.num_remove,
        "labels": list(problem.labels),
        "metadata": problem.metadata,
        "info": _json_info(ss.info),
        "solutions": sols,
    }


def _json_info(info: dict) -> dict:
    """A result's info entries that JSON can hold; a non-finite number (e.g. an unknown ``gap``, ``inf``)
    becomes ``null``, as strict JSON readers refuse ``Infinity`` and ``NaN``.

    Example:
        >>> _json_info({"gap": float("inf"), "bounds": [1.0, float("nan")], "sampler": object()})
        {'gap': None, 'bounds': [1.0, None]}
    """
    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list):
            return [finite(x) for x in v]
        return {k: finite(x) for k, x in v.items()} if isinstance(v, dict) else v

    return {k: finite(v) for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}


def _rank_payload(problem, ss) -> dict:
    """JSON-ready description of a rank-selection result: kept groups, groups per matrix, cost."""
    sols = []
    for rank, (sample, energy) in enumerate(ss.data(["sample", "energy"]), start=1):
        y = [int(sample[i]) for i in range(problem.num_variables)]
        sols.append({"rank": rank, "energy": float(energy), "kept": [i for i, v in enumerate(y) if v],
                     "groups_per_matrix": problem.ranks_of(y), "cost": int(problem.total_costs(y)[0])})
    return {"problem_kind": problem.kind, "num_variables": problem.num_variables, "budget": problem.budget,
            "matrix_names": list(problem.matrix_names), "metadata": problem.metadata, "info": _json_info(ss.info),
            "solutions": sols}


def _whole(value: Any) -> bool:
    # numpy integers count (a library caller's array); bools and floats such as 1.9 do not
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _short(value: Any) -> str:
    s = json.dumps(value, default=repr)
    return s if len(s) <= 60 else s[:57] + "..."


def _rank_key(sol: dict) -> tuple[int, float]:
    try:
        return int(sol.get("rank", 0)), float(sol.get("energy", 0.0))
    except (TypeError, ValueError):
        return 0, 0.0


def check_removed(removed: Any, where: str, *, num_blocks: int | None = None,
                  num_remove: int | None = None) -> list[int]:
    """A removal set, checked: the one rule for every set a user or a file gives (``qblock prune``,
    ``validate --solutions``, ``show --removed``, a report's recommended sets).

    Args:
        removed: the set as given; must be a list of whole block numbers.
        where: what gave it (a flag, or a file and entry), the start of the message.
        num_blocks: the blocks of the model or problem (``None``: range not known yet).
        num_remove: the set's required size ``M`` (``None``: any size).

    Returns:
        The block indices, sorted.

    Raises:
        ValueError: one line: not a list of whole numbers, a block listed twice (it would be counted
            twice in a report), out of range, every block, or not ``num_remove`` blocks.

    Example:
        >>> check_removed([3, 1], "--remove", num_blocks=4)
        [1, 3]
        >>> check_removed([1, 1], "--remove")
        Traceback (most recent call last):
        ...
        ValueError: --remove: block 1 is listed more than once
    """
    if not isinstance(removed, list) or not all(_whole(i) for i in removed):
        raise ValueError(f'{where}: "removed" must be a list of whole block numbers, got {_short(removed)}')
    removed = [int(i) for i in removed]
    seen = [i for k, i in enumerate(removed) if i in removed[:k]]
    if seen:
        raise ValueError(f"{where}: block {seen[0]} is listed more than once")
    bad = [i for i in removed if i < 0 or (num_blocks is not None and i >= num_blocks)]
    if bad:
        span = f"; the model has {num_blocks} blocks (0..{num_blocks - 1})" if num_blocks is not None else ""
        raise ValueError(f"{where}: block {bad[0]} out of range{span}")
    if num_blocks is not None and len(removed) >= num_blocks:
        raise ValueError(f"{where}: cannot remove all {num_blocks} blocks")
    if num_remove is not None and len(removed) != num_remove:
        raise ValueError(f"{where}: {len(removed)} block(s) listed, not M = {num_remove}")
    return sorted(removed)


def read_solutions_file(path: str | Path) -> Solutions:
    """Read and check a ``qblock solve --json`` file: every solution a set of distinct, non-negative
    whole block numbers (:func:`check_removed`).

    Raises:
        SolutionsFileError: no such file, not JSON, no ``"solutions"`` list of objects, or a
            ``"removed"`` that is not such a set (one line naming the file and solution).
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
        try:
            removed.append(check_removed(sol.get("removed"), f"{path} solution {pos}"))
        except ValueError as exc:
            raise SolutionsFileError(str(exc)) from None
    num_blocks = data.get("num_blocks")
    num_remove = data.get("num_remove")
    return Solutions(path=p, num_blocks=num_blocks if _whole(num_blocks) else None,
                     num_remove=num_remove if _whole(num_remove) else None, removed=removed)
