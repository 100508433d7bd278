"""Small file helpers shared across qblock: atomic writes and JSON for numpy values."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

__all__ = ["atomic_write_bytes", "write_json_atomic", "json_default", "file_in_the_way", "staged_folder", "remove_stale"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename).

    A crash or error never leaves half a file, and an existing file is replaced in one step.

    Raises:
        IsADirectoryError: ``path`` is a folder (or is spelled like one, ending in a separator).
        OSError: ``path`` exists but is not a regular file (a device such as ``/dev/full`` would be
            replaced, not written, by the rename), or the write failed (permission denied,
            read-only file system, disk full, ...); ``filename`` is always ``path``, never the
            temporary file.

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "x.txt")
        >>> _ = atomic_write_bytes(f, b"hello")
        >>> open(f, "rb").read()
        b'hello'
    """
    spelled = os.fspath(path)
    path = Path(path)
    if spelled.endswith(("/", os.sep)) or path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory", spelled)
    if path.exists() and not path.is_file():
        raise OSError(errno.EINVAL, "Not a regular file; refusing to replace it", spelled)
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        raise NotADirectoryError(errno.ENOTDIR, f"{blocker} is a file, not a folder", spelled)
    try:
        _replace_with(path, data)
    except OSError as exc:
        # report the file the caller asked for, not our temporary name
        raise type(exc)(exc.errno, exc.strerror or str(exc), spelled) from None
    return path


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The nearest existing ancestor of ``folder`` (itself included) if that is not a folder, else None.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp(); f = os.path.join(d, "x.npz"); _ = open(f, "w").close()
        >>> file_in_the_way(os.path.join(f, "sub")) == Path(f), file_in_the_way(d)
        (True, None)
    """
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return None if p.is_dir() else p


def _replace_with(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates 0600; give the file the permissions a plain open() would
    umask = os.umask(0)
    os.umask(umask)
    with replacing(path, suffix=".tmp", mode=0o666 & ~umask) as fh:
        fh.write(data)


@contextlib.contextmanager
def replacing(path: Path, *, suffix: str = "", mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary temporary file next to ``path`` that replaces ``path`` if the block ends without error
    and is removed otherwise, so no reader ever sees half a file.

    Args:
        path: the file to write (its folder must exist).
        suffix: ending of the temporary name.
        mode: permissions set before the rename (``None`` keeps ``mkstemp``'s private 0600).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, stale: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A hidden folder inside ``out`` to write a result into: its entries move into ``out`` only if the
    block ends without error; otherwise it is removed, and so is ``out`` if this call created it.

    A failed write (an error, a failed check, Ctrl-C) thus leaves nothing that looks like a result, and
    the files of an existing ``out`` as they were. The staging folder is inside ``out``, not beside it,
    so the moves are renames on one file system even where ``out`` is a mount point. The entries the
    result replaces, and those ``stale`` marks (an earlier result's files this one did not write), are
    moved aside before the result moves in and come back if a move fails, so ``out`` never mixes the two.

    Args:
        out: the output folder.
        stale: ``stale(path)`` for an entry of ``out`` the result does not write: True removes it with the
            replaced ones (default: none).

    Example:
        >>> import tempfile, os
        >>> out = Path(tempfile.mkdtemp()) / "m"
        >>> try:
        ...     with staged_folder(out) as d:
        ...         _ = (d / "a.json").write_text("{}")
        ...         raise ValueError("check failed")
        ... except ValueError:
        ...     pass
        >>> out.exists()
        False
        >>> with staged_folder(out) as d:
        ...     _ = (d / "a.json").write_text("{}")
        >>> with staged_folder(out, stale=lambda p: p.suffix == ".json") as d:
        ...     _ = (d / "b.json").write_text("{}")
        >>> sorted(os.listdir(out))
        ['b.json']
    """
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".qblock-staging-", dir=out))
    try:
        yield stage
        _move_in(stage, out, stale)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    stage.rmdir()


def _move_in(stage: Path, out: Path, stale: Callable[[Path], bool] | None) -> None:
    """Move every entry of ``stage`` into ``out``, the entries it replaces (and the ``stale`` ones) aside first;
    a failed move puts everything back, so ``out`` holds the old result or the new one, not a mix."""
    new = sorted(p.name for p in stage.iterdir())
    old = [n for n in new if os.path.lexists(out / n)]
    if stale is not None:
        old += sorted(p.name for p in out.iterdir()
                      if p.name not in new and not p.name.startswith(".qblock-") and stale(p))
    aside = Path(tempfile.mkdtemp(prefix=".qblock-previous-", dir=out))
    try:
        for n in old:
            os.replace(out / n, aside / n)  # a folder too: renamed to a free name, never deleted first
        for n in new:
            os.replace(stage / n, out / n)
    except BaseException:
        # back by what is where (an interrupt may land between a move and its record), each step best-effort
        for n in new:
            if not os.path.lexists(stage / n) and os.path.lexists(out / n):
                with contextlib.suppress(OSError):
                    os.replace(out / n, stage / n)
        for entry in list(aside.iterdir()):
            with contextlib.suppress(OSError):
                os.replace(entry, out / entry.name)
        with contextlib.suppress(OSError):
            aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)  # the result is in place: a leftover must not report failure


def remove_stale(out: str | os.PathLike, patterns: Iterable[str], written: Iterable[Any]) -> list[Path]:
    """Remove the files an earlier run left in ``out`` under ``patterns`` that this run did not write, so a
    folder written again shows one result; the one rule for every command that writes plots with variable
    names. Files matching no pattern are never touched, and a folder left empty by it is removed.

    Args:
        out: the output folder.
        patterns: glob patterns relative to ``out`` (``"energy_vs_loss_M*.png"``, ``"sub/*/x_*.png"``).
        written: the paths this run wrote (any iterable of paths).

    Returns:
        The files removed.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> for name in ("plot_1.png", "plot_2.png", "mine.txt"):
        ...     _ = (out / name).write_text("")
        >>> [p.name for p in remove_stale(out, ["plot_*.png"], [out / "plot_1.png"])]
        ['plot_2.png']
        >>> sorted(p.name for p in out.iterdir())
        ['mine.txt', 'plot_1.png']
    """
    out = Path(out)
    keep = {Path(p).resolve() for p in written}
    gone, folders = [], set()
    for pattern in patterns:
        for f in sorted(out.glob(pattern)):
            if f.is_file() and not f.is_symlink() and f.resolve() not in keep:
                f.unlink()
                gone.append(f)
                folders.update(d for d in f.parents if out in d.parents)
    for d in sorted(folders, key=lambda d: len(d.parts), reverse=True):  # deepest first
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return gone


def npz_path(out: str | os.PathLike | None) -> Path | None:
    """The problem file written for ``out``: ``.npz`` is added when missing (``extract``, ``random-problem``).

    Example:
        >>> str(npz_path("e4")), str(npz_path("p.npz"))
        ('e4.npz', 'p.npz')
    """
    if out is None:
        return None
    p = Path(out)
    return p if p.name.lower().endswith(".npz") else p.with_name(p.name + ".npz")


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays, sets and tuples (others as ``str``)."""
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=json_default) + "\n").encode())
