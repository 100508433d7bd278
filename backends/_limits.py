"""Size guard: estimate a solve's memory from N, M and the top-k before any work, and refuse what cannot fit.

The estimates are deliberately simple upper-end figures for the large arrays each path allocates
(dense ``N x N`` matrices, the SDP of the certified search, the reads, the top-k states); they are
compared with a budget, by default 80 % of the memory available now (``MemAvailable``), or the
``QBLOCK_MEMORY_LIMIT`` environment variable (bytes, or with a suffix: ``512M``, ``8G``).

Example:
    >>> need = estimate("swap", 80, 20, 20, {})
    >>> 0 < sum(b for _, b in need) < 2**30
    True
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

__all__ = ["memory_limit", "estimate", "check", "human_bytes", "MEMORY_ENV"]

#: environment variable that sets the memory budget of one solve
MEMORY_ENV = "QBLOCK_MEMORY_LIMIT"
_FALLBACK = 4 * 2**30  # when the machine cannot tell (not Linux, no sysconf)
_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _parse_bytes(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in _SUFFIX else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{MEMORY_ENV}={text!r} is not a memory size; use bytes or e.g. 512M, 8G")
    return int(value * _SUFFIX[unit])


def _available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return _FALLBACK


def memory_limit() -> tuple[int, str]:
    """``(bytes, where the figure comes from)``: ``QBLOCK_MEMORY_LIMIT`` or 80 % of the available memory."""
    env = os.environ.get(MEMORY_ENV, "").strip()
    if env:
        return _parse_bytes(env), f"{MEMORY_ENV}={env}"
    return int(0.8 * _available()), f"80% of the memory available now; set {MEMORY_ENV} to change it"


def estimate(backend: str, n: int, m: int, k: int, params: Mapping[str, Any], kind: str = "") -> list[tuple[str, int]]:
    """The large allocations of one solve, as ``[(what, bytes), ...]``.

    Args:
        backend: backend name.
        n, m: blocks and blocks to remove.
        k: number of solutions (already capped at ``C(N, M)``).
        params: the validated backend parameters.
        kind: the backend's kind (``"constrained"``, ``"penalty"``, ``"cqm"``).
    """
    parts: list[tuple[str, int]] = []
    if kind == "penalty":
        # the penalised BQM (dimod keeps every coupling twice) and the sampler's own copy of it
        parts.append(("the penalised BQM (dense N x N couplings)", 64 * n * n))
    else:
        parts.append(("the objective as a BQM and a dense matrix", 40 * n * n))
    if backend == "exact":
        from qblock.backends.bnb import LEVEL_CACHE_BYTES

        if _exact_uses_bnb(n, m, params):
            # Gram matrix of the SDP constraints (2N+2)^2 and its eigenvectors, ~10 (N+1)^2 ADMM matrices,
            # and the per-depth matrices of the tree (capped)
            sdp = 3 * 8 * (2 * n + 2) ** 2 + 10 * 8 * (n + 1) ** 2
            parts.append(("the SDP bound of the certified search", sdp))
            parts.append(("the per-depth matrices of the tree", min(8 * n**3 // 3, LEVEL_CACHE_BYTES)))
        else:
            parts.append(("the enumeration blocks", 4 * 8 * 4_000_000 + 200_000 * (n + 8) * 8))
    if kind == "penalty" or backend == "swap":
        reads = int(params.get("num_reads") or 64)
        parts.append(("the reads", 10 * 8 * reads * n))
        from qblock.backends.local_search import DESCENT_CHUNK_ENTRIES

        parts.append(("the swap descent", 4 * 8 * max(DESCENT_CHUNK_ENTRIES, n * n)))
    # the returned states and their sorting copies: int8 rows plus energies and counts
    parts.append((f"the top {k:,} states", 4 * k * (n + 24)))
    return parts


def _exact_uses_bnb(n: int, m: int, params: Mapping[str, Any]) -> bool:
    from qblock.backends.exact import ENUMERATION_LIMIT

    strategy = params.get("strategy", "auto")
    return strategy == "bnb" or (strategy == "auto" and math.comb(n, m) > ENUMERATION_LIMIT)


def check(backend: str, n: int, m: int, k: int, params: Mapping[str, Any], kind: str = "",
          requested: int | None = None) -> None:
    """Refuse a solve that cannot fit, before any work, in one line with the limit and a hint.

    Checks the size limit of the certified search (:data:`qblock.backends.exact.BNB_MAX_BLOCKS`) and
    the estimated memory against :func:`memory_limit`. Arguments as for :func:`estimate`, plus
    ``requested``: the number of solutions asked for, when ``k`` was capped at ``C(N, M)``.

    Raises:
        ValueError: e.g. ``"backend 'swap': N=..., M=..., top ... needs about X of memory (mostly Y),
            above the limit of Z (...); hint"``.
    """
    if backend == "exact" and _exact_uses_bnb(n, m, params):
        from qblock.backends.exact import check_bnb_size

        check_bnb_size(n)
    parts = estimate(backend, n, m, k, params, kind)
    need = sum(b for _, b in parts)
    limit, source = memory_limit()
    if need <= limit:
        return
    what, biggest = max(parts, key=lambda p: p[1])
    top = f"top {k:,}"
    if requested is not None and requested > k:
        top += f" (all C({n},{m}) feasible states; {requested:,} were asked for)"
    if what.startswith("the top"):
        hint = "ask for fewer solutions (--top / num_solutions)"
    elif backend == "exact":
        hint = "use a heuristic backend such as 'swap', or fewer blocks"
    else:
        hint = "use fewer reads or fewer blocks"
    raise ValueError(
        f"backend {backend!r}: N={n}, M={m}, {top} needs about {human_bytes(need)} of memory "
        f"(mostly {what}: {human_bytes(biggest)}), above the limit of {human_bytes(limit)} ({source}); {hint}"
    )
