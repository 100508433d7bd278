"""An exclusive, non-blocking lock on an output file (``<out>.lock``), safe between processes.

Kept free of heavy imports (no torch) so the lock can be exercised by many processes cheaply.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl  # POSIX
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class LockBusy(RuntimeError):
    """The lock is held by another process (``pid`` is its owner, or ``None`` if not yet known)."""

    def __init__(self, lock: Path, pid: int | None) -> None:
        super().__init__(f"{lock} is held by {'pid ' + str(pid) if pid else 'another process'}")
        self.lock = lock
        self.pid = pid


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike) -> Iterator[Path]:
    """Hold ``lock`` exclusively for the ``with`` block, or raise :class:`LockBusy` at once.

    The old scheme (create the file, then write the pid) let a reader see an empty file, take
    pid 0 as a dead owner and delete a live lock; the pid file plus stale-lock takeover is racy
    however it is ordered. The pid stays in the file for messages only.
    """
    lock = Path(lock)
    release = acquire(lock)
    try:
        yield lock
    finally:
        release()


def acquire(lock: str | os.PathLike) -> Callable[[], None]:
    """Take ``lock`` now or raise :class:`LockBusy`; return the function that releases it.

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "out.npz.lock")
        >>> release = acquire(f)
        >>> try:
        ...     acquire(f)
        ... except LockBusy as e:
        ...     print(e.pid == os.getpid())
        True
        >>> release(); os.path.exists(f)
        False
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - Windows; the fallback is tested by calling it directly
        return _acquire_pidfile(lock)
    return _acquire_flock(lock)


def _read_pid(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip()) or None
    except (OSError, ValueError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _acquire_flock(lock: Path) -> Callable[[], None]:
    """``flock`` on ``lock``: the kernel drops it when its owner exits, so no lock is ever stale."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(lock, _read_pid(lock)) from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, lock):
            break
        # the previous owner removed the path after we opened it: this lock is on an orphaned
        # file that a newcomer would not see, so start again on whatever the path is now
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())

    def release() -> None:
        try:
            # removed while still held, so a process that opened the old file sees the mismatch
            if _same_file(fd, lock):
                lock.unlink(missing_ok=True)
        finally:
            os.close(fd)

    return release


def _acquire_pidfile(lock: Path) -> Callable[[], None]:
    """Without ``flock`` (Windows): the lock file appears atomically *with* the owner's pid in it
    (hard link of a finished temporary file), so a reader never sees it empty.

    A dead owner's lock is taken over; that step is not atomic (two processes taking over the same
    stale lock at the same instant can both win), a case the ``flock`` path does not have.
    """
    tmp = lock.with_name(f".{lock.name}.{os.getpid()}.{id(lock):x}")
    tmp.write_text(str(os.getpid()))
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)
                break
            except FileExistsError:
                pid = _read_pid(lock)
                if pid is None and not lock.exists():
                    continue  # released between our link and our read: try again
                if pid is None or _alive(pid):
                    # no pid cannot be a half-written file (it is linked complete): never take it
                    raise LockBusy(lock, pid) from None
                lock.unlink(missing_ok=True)  # stale: its owner is gone
        else:
            raise LockBusy(lock, _read_pid(lock))
    finally:
        tmp.unlink(missing_ok=True)

    def release() -> None:
        if _read_pid(lock) == os.getpid():
            lock.unlink(missing_ok=True)

    return release


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # pragma: no cover - e.g. pid out of range
        return False
    return True
