"""Where independent pieces of work run: in this process (``local``) or on a Ray cluster (``ray``).

qblock's expensive loops are embarrassingly parallel: many solver runs in a comparison study, many
masked forward passes over candidate removal sets (validation, the measured QUBO, the refinement
loop's rounds, SLEB's candidates). One small interface covers both kinds:

* :meth:`Executor.map`: pure functions over items (a solver run per item), results in item order;
  on Ray each item is a task (retried when its worker dies).
* :meth:`Executor.bind_model` -> :class:`ModelWorkers`: work that needs the model. On Ray each of
  ``workers`` actors holds one replica of the model (on its own GPU where the cluster has GPUs);
  ``setup(model)`` builds per-actor state once (e.g. an evaluator with its prefix cache) and
  ``fn(state, item)`` runs per item.

Results are the same as the local executor's (each item's computation is the same code on the same
inputs, whatever the order), progress is reported through ``on_result(index, result)`` as items
complete, an item whose task or actor died is run again (each index is collected exactly once, so
nothing is lost or counted twice) and Ctrl-C propagates at once; closing the executor (the end of its
``with`` block) then stops the actors and the Ray session it started, and with them the outstanding work.
In a Ray session the caller started, closing kills the actors only: tasks still running finish there.

Example:
    >>> ex = open_executor("local")
    >>> ex.map(abs, [-2, 3, -4])
    [2, 3, 4]
    >>> def square_plus(model, x):   # model-bound work: the "model" here is a number
    ...     return model + x * x
    >>> ex.bind_model(10).map(square_plus, [1, 2, 3])
    [11, 14, 19]
    >>> describe("ray:10.0.0.1:6379")
    'ray (cluster at 10.0.0.1:6379)'
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from typing import Any, Callable, Iterable, Sequence

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "ModelWorkers", "open_executor", "parse_spec",
           "describe", "ExecutorError", "RAY_INSTALL"]

#: how to install Ray (named in every error about it)
RAY_INSTALL = "pip install 'qblock[ray]'"

OnResult = Callable[[int, Any], None]
#: states (evaluators, prefix caches) a model actor keeps; older ones are rebuilt when needed again
_MAX_STATES = 4


class ExecutorError(ValueError):
    """A bad ``--executor`` value or an executor that cannot start (one-line message)."""


def parse_spec(spec: str | None) -> tuple[str, str | None]:
    """``"local"`` -> ``("local", None)``; ``"ray"`` -> ``("ray", None)`` (a local Ray instance);
    ``"ray:ADDRESS"`` -> ``("ray", ADDRESS)`` (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``).

    Example:
        >>> parse_spec("ray:auto"), parse_spec(None)
        (('ray', 'auto'), ('local', None))
        >>> parse_spec("spark")
        Traceback (most recent call last):
        ...
        qblock.executor.ExecutorError: unknown executor 'spark': use local, ray or ray:ADDRESS
    """
    s = "local" if spec is None else str(spec).strip()
    kind, _, address = s.partition(":")
    if kind == "local" and not address:
        return "local", None
    if kind == "ray":
        return "ray", (address.strip() or None)
    raise ExecutorError(f"unknown executor {s!r}: use local, ray or ray:ADDRESS")


def describe(spec: str | None) -> str:
    """A human name of an executor spec (for logs and reports)."""
    kind, address = parse_spec(spec)
    if kind == "local":
        return "local (this process)"
    return f"ray (cluster at {address})" if address else "ray (local instance)"


class Executor:
    """The interface; see the module docstring. Use as a context manager (closes what it started)."""

    name = "executor"
    #: how many items run at once
    workers = 1

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], *, on_result: OnResult | None = None) -> list[Any]:
        """``[fn(x) for x in items]``, in item order; ``on_result(i, result)`` as each finishes."""
        raise NotImplementedError

    def bind_model(self, model: Any) -> "ModelWorkers":
        """Workers that each hold ``model`` (one replica per worker)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what this executor started (a local Ray instance, its actors)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ModelWorkers:
    """Workers bound to one model; :meth:`map` runs ``fn(state, item)`` with ``state = setup(model)``.

    ``setup`` runs once per worker and ``key`` (default: ``setup`` itself); ``setup=None`` gives the
    model as the state.
    """

    def map(self, fn: Callable[[Any, Any], Any], items: Iterable[Any], *, setup: Callable[[Any], Any] | None = None,
            key: Any = None, on_result: OnResult | None = None) -> list[Any]:  # pragma: no cover - interface
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ local
class LocalExecutor(Executor):
    """Everything in this process, in order: today's behaviour, the default."""

    name = "local"
    workers = 1

    def map(self, fn, items, *, on_result=None):
        out = []
        for i, x in enumerate(items):
            out.append(fn(x))
            if on_result is not None:
                on_result(i, out[-1])
        return out

    def bind_model(self, model):
        return _LocalModel(model)


class _LocalModel(ModelWorkers):
    def __init__(self, model: Any) -> None:
        self.model = model
        self._states: dict[Any, Any] = {}

    def map(self, fn, items, *, setup=None, key=None, on_result=None):
        k = key if key is not None else setup
        if setup is None:
            state = self.model
        else:
            if k not in self._states:
                self._states[k] = setup(self.model)
            state = self._states[k]
        out = []
        for i, x in enumerate(items):
            out.append(fn(state, x))
            if on_result is not None:
                on_result(i, out[-1])
        return out


# ------------------------------------------------------------------------------------------ ray
def _ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


class RayExecutor(Executor):
    """Ray: solver runs as tasks, model-bound work in actors each holding one model replica.

    Args:
        address: a running cluster (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``), or None to start a
            local Ray instance (stopped again by :meth:`close`).
        num_cpus: CPUs of a local instance (default: all).
        workers: model actors (default: the cluster's GPUs if it has any, else its CPUs).
        threads: torch threads per model actor (1: results then match a 1-thread local run bitwise).
        max_retries: how often an item whose task or actor died is run again.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, workers: int | None = None,
                 threads: int = 1, max_retries: int = 3) -> None:
        ray = _ray()
        self._started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
            if address is None:
                kw["num_cpus"] = int(num_cpus or os.cpu_count() or 1)
            else:
                _check_reachable(address)  # Ray itself retries an unreachable address for minutes
            try:
                ray.init(address=address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise ExecutorError(f"could not start or reach {where}: {str(exc).splitlines()[0]}") from None
            self._started = True
        res = ray.cluster_resources()
        self.gpus = int(res.get("GPU", 0))
        self.cpus = int(res.get("CPU", 1))
        self.workers = int(workers or (self.gpus or self.cpus) or 1)
        self.threads = int(threads)
        self.max_retries = int(max_retries)
        self.address = address
        self._bound: list[_RayModel] = []

    # -- tasks
    def map(self, fn, items, *, on_result=None):
        """Solver runs as tasks (one CPU each). Model actors bound earlier are stopped first: they hold
        CPUs the tasks need (the next model-bound call starts them again)."""
        ray = _ray()
        for w in self._bound:
            w.close()
        task = ray.remote(_call).options(num_cpus=1, max_retries=self.max_retries, retry_exceptions=False)
        fn_ref = ray.put(fn)
        items = list(items)
        refs = {task.remote(fn_ref, x): i for i, x in enumerate(items)}
        return _collect(ray, refs, len(items), on_result)

    # -- actors
    def bind_model(self, model):
        """Actors holding ``model``: the same ones for the same model object. Binding another model
        stops the previous model's actors first (their CPUs or GPUs are needed for the new replicas)."""
        for w in self._bound:
            if w.model is model:
                return w
        for w in self._bound:
            w.close()
        self._bound = [_RayModel(self, model)]
        return self._bound[0]

    def close(self) -> None:
        if "ray" not in sys.modules:
            return
        ray = sys.modules["ray"]
        for w in self._bound:
            w.close()
        self._bound = []
        if self._started and ray.is_initialized():
            ray.shutdown()
            self._started = False


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with what to do, when ``HOST:PORT`` (or ``ray://HOST:PORT``) does not answer.

    Example:
        >>> _check_reachable("127.0.0.1:1")
        Traceback (most recent call last):
        ...
        qblock.executor.ExecutorError: no Ray cluster answers at 127.0.0.1:1 (connection refused); start one with `ray start --head` there or fix the address
    """
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms: Ray resolves them itself
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as exc:
        why = "connection refused" if isinstance(exc, ConnectionRefusedError) else (exc.strerror or str(exc))
        raise ExecutorError(f"no Ray cluster answers at {address} ({why}); start one with `ray start --head` "
                            "there or fix the address") from None


def _call(fn, x):
    return fn(x)


def _collect(ray, refs: dict, n: int, on_result: OnResult | None) -> list[Any]:
    """Results of ``refs`` (ref -> index) in index order, each index once."""
    out: list[Any] = [None] * n

    def take(ref: Any, i: int) -> None:
        out[i] = ray.get(ref)
        if on_result is not None:
            on_result(i, out[i])

    _drain(ray, refs, take)
    return out


def _drain(ray, refs: dict, take: Callable[[Any, Any], None]) -> None:
    """Hand each finished ref of ``refs`` (ref -> key) to ``take(ref, key)`` as it finishes, until none
    is in flight (``take`` may submit more).

    An exception (Ctrl-C included) propagates at once and cancels nothing: ``ray.cancel`` racing a task
    that is just finishing aborts the driver inside Ray's core worker (Ray 2.60: "Tried to complete task
    that was not pending": 3 of 5 interrupted studies here, 1 of 6 without ``force``). The executor's
    ``close`` stops the work instead: it kills the model actors and ends the Ray session qblock started,
    which stops its tasks.
    """
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        take(ready[0], refs.pop(ready[0]))


class _RayModel(ModelWorkers):
    """``workers`` actors, each with one replica of the model (put once into the object store)."""

    def __init__(self, ex: RayExecutor, model: Any) -> None:
        self.ex = ex
        self.model = model  # kept: identifies the binding (and its id cannot be reused meanwhile)
        self.model_ref = None
        self.actors: list[Any] = []
        #: items run again because their actor died (for tests and logs)
        self.resubmitted = 0

    def _start(self) -> None:
        ray = _ray()
        if self.model_ref is None:
            self.model_ref = ray.put(self.model)
        while len(self.actors) < self.ex.workers:
            self.actors.append(self._new_actor())

    def _new_actor(self):
        ray = _ray()
        opts: dict[str, Any] = {"num_cpus": 1, "max_restarts": self.ex.max_retries,
                                "max_task_retries": self.ex.max_retries}
        if self.ex.gpus:
            opts["num_gpus"] = 1
        return ray.remote(_ModelActor).options(**opts).remote(self.model_ref, self.ex.threads)

    def map(self, fn, items, *, setup=None, key=None, on_result=None):
        from collections import deque

        ray = _ray()
        self._start()
        items = list(items)
        skey = None if setup is None else _state_key(key if key is not None else setup)
        setup_ref = None if setup is None else ray.put(setup)
        fn_ref = ray.put(fn)
        out: list[Any] = [None] * len(items)
        retries = [0] * len(items)
        pending = deque(range(len(items)))
        refs: dict[Any, tuple[int, int]] = {}  # in flight: ref -> (item, actor slot); one per actor

        def submit(i: int, a: int) -> None:
            refs[self.actors[a].run.remote(fn_ref, items[i], setup_ref, skey)] = (i, a)

        for a in range(len(self.actors)):
            if pending:
                submit(pending.popleft(), a)

        def take(ref: Any, slot: tuple[int, int]) -> None:
            i, a = slot
            try:
                out[i] = ray.get(ref)
            except ray.exceptions.RayActorError:
                # the actor died for good (Ray's own restarts exhausted or disabled): replace it and
                # run the item again; each index is stored once, so nothing is counted twice
                retries[i] += 1
                if retries[i] > self.ex.max_retries:
                    raise ExecutorError(f"item {i} failed {retries[i]} times: its model actor keeps dying") from None
                self.resubmitted += 1
                self.actors[a] = self._new_actor()
                submit(i, a)
                return
            if pending:  # the actor that finished takes the next item (dynamic load balancing)
                submit(pending.popleft(), a)
            if on_result is not None:
                on_result(i, out[i])

        _drain(ray, refs, take)
        return out

    def close(self) -> None:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            for a in self.actors:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self.actors = []


def _state_key(k: Any) -> str:
    name = getattr(k, "__qualname__", None)
    return f"{getattr(k, '__module__', '')}.{name}:{id(k)}" if name else repr(k)


class _ModelActor:
    """One model replica (moved to this actor's GPU if it has one) and the states built from it."""

    def __init__(self, model, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.model = model
        try:
            import ray

            if ray.get_gpu_ids() and torch.cuda.is_available():
                self.model = self.model.to("cuda")
        except Exception:  # noqa: BLE001 - no GPU: stay on the CPU
            pass
        self.states: OrderedDict[str, Any] = OrderedDict()

    def run(self, fn, item, setup, key):
        if setup is None:
            return fn(self.model, item)
        if key not in self.states:
            self.states[key] = setup(self.model)
            while len(self.states) > _MAX_STATES:  # e.g. one prefix cache per SLEB step: keep the newest
                self.states.popitem(last=False)
        self.states.move_to_end(key)
        return fn(self.states[key], item)

    def pid(self) -> int:
        return os.getpid()


# ------------------------------------------------------------------------------------------ opening
def open_executor(spec: str | Executor | None = "local", **kwargs: Any) -> Executor:
    """An executor from ``"local"``, ``"ray"`` or ``"ray:ADDRESS"`` (an :class:`Executor` passes through).

    Keyword arguments go to :class:`RayExecutor` (``num_cpus``, ``workers``, ``threads``, ``max_retries``).

    Raises:
        ExecutorError: an unknown spec, Ray not installed (the message names ``pip install 'qblock[ray]'``)
            or a cluster that cannot be reached.
    """
    if isinstance(spec, Executor):
        return spec
    kind, address = parse_spec(spec)
    if kind == "local":
        return LocalExecutor()
    return RayExecutor(address, **kwargs)


def is_local(executor: Executor | None) -> bool:
    """True for None and the local executor (callers then keep their plain in-process loop)."""
    return executor is None or isinstance(executor, LocalExecutor)


def run_all(executor: Executor | None, fn: Callable[[Any], Any], items: Sequence[Any],
            on_result: OnResult | None = None) -> list[Any]:
    """``executor.map`` with ``None`` meaning local."""
    return (executor or LocalExecutor()).map(fn, items, on_result=on_result)
