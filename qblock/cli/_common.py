"""Helpers shared by the sub-commands."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qblock._io import json_default as _json_default  # noqa: F401  (re-exported)
from qblock._io import write_json_atomic  # noqa: F401  (re-exported)
from qblock.cli import CliError


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    from qblock._io import atomic_write_bytes

    return atomic_write_bytes(Path(path), text.encode())


def load_problem(path: str, remove: int | None = None):
    """Load a problem file, optionally setting the number of blocks to remove."""
    from qblock.problems.block_removal import BlockRemovalProblem

    p = Path(path)
    if not p.exists():
        raise CliError(f"problem file not found: {path}")
    problem = BlockRemovalProblem.load(p)
    if remove is not None:
        problem = problem.with_num_remove(remove)
    elif problem.num_remove is None:
        raise CliError(f"{path} has no number of blocks to remove; pass --remove M")
    return problem


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are parsed as JSON when they can be (numbers, lists, true/false)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise CliError(f"--param expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
