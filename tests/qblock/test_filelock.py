"""The output lock of ``qblock extract`` (:mod:`qblock._filelock`): never two holders.

Regression for issue 10, item 5: the lock file used to be created empty and the pid written after;
a process reading it in between took pid 0 for a dead owner, deleted the live lock and took it too
(8 processes x 40 rounds: 3 rounds with two holders).
"""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

from qblock import _filelock

MECHANISMS = ["qblock._filelock:acquire", "qblock._filelock:_acquire_pidfile"]

# Each round must start in every worker at the same instant, or the tries never overlap. The parent
# holds an exclusive flock on two gate files; in round r the workers block on a shared flock of gate
# r % 2 and all wake together when the parent lets go of it (blocking, no polling: cheap on a loaded
# machine). A worker that holds the lock creates a marker with O_EXCL: failing means two holders.
WORKER = textwrap.dedent("""
    import fcntl, importlib, os, sys, time
    from pathlib import Path
    from qblock._filelock import LockBusy
    mod, fn = sys.argv[1].split(":")
    acquire = getattr(importlib.import_module(mod), fn)
    root, rounds = Path(sys.argv[2]), int(sys.argv[3])
    gates = [os.open(root / f"gate{k}", os.O_RDWR) for k in (0, 1)]
    print("ready", flush=True)
    for r in range(rounds):
        fcntl.flock(gates[r % 2], fcntl.LOCK_SH)
        try:
            release = acquire(root / "out.npz.lock")
        except LockBusy:
            result = "busy"
        else:
            try:
                fd = os.open(root / "inside", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                result = "overlap"
            else:
                os.close(fd)
                time.sleep(0.002)
                os.unlink(root / "inside")
                result = "held"
            release()
        fcntl.flock(gates[r % 2], fcntl.LOCK_UN)
        print(result, flush=True)
""")


def stress(tmp_path, mechanism, nproc=4, rounds=20, extra_path=None):
    """Counts of ``held``, ``busy`` and ``overlap`` over ``rounds`` rounds of ``nproc`` simultaneous tries."""
    import fcntl

    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    gates = [os.open(tmp_path / f"gate{k}", os.O_RDWR | os.O_CREAT) for k in (0, 1)]
    for g in gates:
        fcntl.flock(g, fcntl.LOCK_EX)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, mechanism, str(tmp_path), str(rounds)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(nproc)]
    counts = {"held": 0, "busy": 0, "overlap": 0}
    try:
        assert all(p.stdout.readline().strip() == "ready" for p in procs)
        for r in range(rounds):
            fcntl.flock(gates[r % 2], fcntl.LOCK_UN)  # everyone starts round r at once
            for p in procs:
                counts[p.stdout.readline().strip()] += 1
            fcntl.flock(gates[r % 2], fcntl.LOCK_EX)  # granted once all have left the gate
    finally:
        for g in gates:
            os.close(g)  # lets any worker still waiting run to its end
        for p in procs:
            p.wait(timeout=60)
    return counts["held"], counts["busy"], counts["overlap"]


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
        env={**os.environ, "PYTHONPATH": str(ROOT)})
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
