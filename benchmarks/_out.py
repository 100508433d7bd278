"""The one output rule of the benchmark scripts: ``STEM.json`` and ``STEM.md`` side by side."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(stem: str | Path, out: dict, markdown: str, *, echo: bool = False) -> None:
    """Write ``out`` to ``STEM.json`` and ``markdown`` to ``STEM.md`` (the folder made if needed); print the
    markdown with ``echo``, else the two paths.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> write_results(d / "sub" / "r", {"x": 1.5}, "| x |\\n")  # doctest: +ELLIPSIS
        wrote .../sub/r.json and .../sub/r.md
        >>> json.loads((d / "sub" / "r.json").read_text())
        {'x': 1.5}
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    stem.with_suffix(".md").write_text(markdown)
    print(markdown if echo else f"wrote {stem}.json and {stem}.md")
