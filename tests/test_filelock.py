"""The output lock of ``qblock extract`` (:mod:`qblock._filelock`): never two holders.

Regression for issue 10, item 5: the lock file used to be created empty and the pid written after;
a process reading it in between took pid 0 for a dead owner, deleted the live lock and took it too
(8 processes x 40 rounds: 3 rounds with two holders).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qblock import _filelock

MECHANISMS = ["qblock._filelock:acquire", "qblock._filelock:_acquire_pidfile"]

# each worker: per round, wait for all workers (file barrier), try the lock, and while holding it
# create a marker with O_EXCL; failing to create it means another process holds the lock too
WORKER = textwrap.dedent("""
    import importlib, os, sys, time
    from pathlib import Path
    from qblock._filelock import LockBusy
    mod, fn = sys.argv[1].split(":")
    acquire = getattr(importlib.import_module(mod), fn)
    root, me, nproc, rounds = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    held = busy = overlaps = 0
    for r in range(rounds):
        (root / f"ready.{r}.{me}").touch()
        while sum(1 for k in range(nproc) if (root / f"ready.{r}.{k}").exists()) < nproc:
            time.sleep(0.0002)
        try:
            release = acquire(root / "out.npz.lock")
        except LockBusy:
            busy += 1
            continue
        held += 1
        try:
            fd = os.open(root / "inside", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            overlaps += 1
        else:
            os.close(fd)
            time.sleep(0.001)
            os.unlink(root / "inside")
        release()
    print(held, busy, overlaps)
""")


def stress(tmp_path, mechanism, nproc=4, rounds=20, extra_path=None):
    env = dict(os.environ)
    paths = [str(Path(__file__).resolve().parents[1])] + ([str(extra_path)] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, mechanism, str(tmp_path), str(k), str(nproc),
                               str(rounds)], stdout=subprocess.PIPE, text=True, env=env) for k in range(nproc)]
    counts = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        counts.append([int(v) for v in out.split()])
    return [sum(c[i] for c in counts) for i in range(3)]  # held, busy, overlaps


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_never_two_holders_under_contention(tmp_path, mechanism):
    held, busy, overlaps = stress(tmp_path, mechanism)
    assert overlaps == 0, f"{overlaps} times two processes held the lock at once"
    assert held >= 20  # every round somebody got it
    assert not (tmp_path / "out.npz.lock").exists()


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_lock_file_without_pid_of_a_live_owner_is_respected(tmp_path, mechanism):
    # the window of the old bug, made deterministic: the owner is alive but its file shows no pid yet
    fn = mechanism.split(":")[1]
    acquire = getattr(_filelock, fn)
    lock = tmp_path / "out.npz.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, pathlib, qblock._filelock as f; r = f.{fn}(pathlib.Path({str(lock)!r})); "
                               "print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        lock.write_text("")  # flock: only the OS lock counts; pid file: a pid-less file is never stale
        with pytest.raises(_filelock.LockBusy):
            acquire(lock)
        assert lock.exists()  # a refused process never removes someone else's lock
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_lock_of_a_dead_owner_is_taken_over_and_released(tmp_path, mechanism):
    acquire = getattr(_filelock, mechanism.split(":")[1])
    lock = tmp_path / "out.npz.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(str(dead.pid))  # left behind by a killed run
    release = acquire(lock)
    assert lock.read_text() == str(os.getpid())
    with pytest.raises(_filelock.LockBusy) as e:  # a second taker in the same process is refused too
        acquire(lock)
    assert e.value.pid == os.getpid()
    release()
    assert not lock.exists()
    acquire(lock)()


def test_docstring_examples():
    import doctest

    failures, tried = doctest.testmod(_filelock)
    assert failures == 0 and tried > 0
