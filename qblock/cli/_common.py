"""Helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from qblock._io import json_default as _json_default  # noqa: F401  (re-exported)
from qblock._io import write_json_atomic  # noqa: F401  (re-exported)
from qblock.cli import CliError


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    from qblock._io import atomic_write_bytes

    return atomic_write_bytes(Path(path), text.encode())


def load_problem(path: str, remove: int | None = None):
    """Load a problem file of either kind, optionally setting the number of blocks to remove."""
    from qblock.problems.rank_selection import load_problem as load_any

    p = Path(path)
    if not p.exists():
        raise CliError(f"problem file not found: {path}")
    problem = load_any(p)
    if problem.kind == "rank_selection":
        if remove is not None:
            raise CliError(f"{path} is a rank-selection problem (a parameter budget); --remove is for block removal")
        return problem
    if remove is not None:
        problem = problem.with_num_remove(remove)
    elif problem.num_remove is None:
        raise CliError(f"{path} has no number of blocks to remove; pass --remove M")
    return problem


#: solver arguments that ``solve`` and ``compare`` set through their own options, never through --param
OWN_OPTIONS = {"seed": "--seed", "num_solutions": "--top", "num_remove": "--remove"}


def parse_params(items: list[str] | None, own: dict[str, str] | None = None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are parsed as JSON when they can be (numbers, lists, true/false).
    ``own``: keys the command sets through its own options (key -> option), refused with that option's name."""
    out: dict[str, Any] = {}
    for item in items or []:
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise CliError(f"--param expects KEY=VALUE, got {item!r}")
        if own and k.strip() in own:
            raise CliError(f"--param {k.strip()}: set it with {own[k.strip()]}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
        except RecursionError:  # "[[[[..." thousands deep: not a value anyone means
            raise CliError(f"--param {k}: the value is nested too deeply") from None
    return out


def check_output(
    path: str | os.PathLike | None,
    flag: str,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    folder: bool = False,
    writes: Sequence[str] = (),
) -> Path | None:
    """Refuse an output path that cannot be written or would overwrite an input; the one rule for
    every sub-command, checked before any work starts.

    Args:
        path: the output as the user spelled it; None means "not asked for" and passes.
        flag: the option that gave it (``"--json"``), for the message.
        inputs: the files the command reads; none of them may be overwritten.
        folder: ``path`` is a folder the command writes into (else a file).
        writes: with ``folder``, the names (glob patterns) of the files written into it.

    Returns:
        ``Path(path)``, or None when ``path`` is None.

    Raises:
        CliError: with one line saying what is wrong and what to do.

    Example:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp(); p = os.path.join(d, "p.npz"); open(p, "w").close()
        >>> check_output(p, "--json", inputs=[os.path.join(d, ".", "p.npz")])
        Traceback (most recent call last):
        ...
        qblock.cli.CliError: --json .../p.npz would overwrite the input .../p.npz (choose another file)
    """
    from qblock._io import file_in_the_way

    if path is None:
        return None
    spelled = os.fspath(path)
    kind = "folder" if folder else "file"
    if not spelled.strip():
        raise CliError(f"{flag} is empty (give a {kind} name)")
    p = Path(spelled)
    if folder and p.exists() and not p.is_dir():
        raise CliError(f"{flag} {spelled} is an existing file (give a folder to write into)")
    if not folder and (spelled.endswith(("/", os.sep)) or p.is_dir()):
        raise CliError(f"{flag} {spelled} is a folder (give a file name)")
    if not folder and p.exists() and not p.is_file():
        raise CliError(f"{flag} {spelled} is not a regular file (give a file name)")
    blocker = file_in_the_way(p if folder else p.parent)
    if blocker is not None:
        raise CliError(f"{flag} {spelled}: {blocker} is a file, not a folder (choose another {kind})")
    for inp in inputs:
        if inp is not None and _would_overwrite(p, Path(inp), folder, writes):
            raise CliError(f"{flag} {spelled} would overwrite the input {os.fspath(inp)} (choose another {kind})")
    _check_writable(p, flag, spelled, folder)
    return p


def _would_overwrite(out: Path, inp: Path, folder: bool, writes: Sequence[str]) -> bool:
    """Whether writing ``out`` (a file, or ``writes`` inside the folder ``out``) replaces ``inp``."""
    if not inp.exists():
        return False
    if not folder:
        return _same_file(out, inp)
    real = Path(os.path.realpath(inp))
    written_here = _same_file(out, real.parent) and any(fnmatch.fnmatch(real.name, w) for w in writes)
    return written_here or _same_file(out, real)


def _same_file(a: Path, b: Path) -> bool:
    """Same file by resolved path, or by inode (hard links, bind mounts)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _check_writable(p: Path, flag: str, spelled: str, folder: bool) -> None:
    """Fail now, not after a long solve, when the place the output goes cannot be written."""
    target = p if folder else p.parent
    target = target.absolute()
    while not target.exists() and target != target.parent:
        target = target.parent  # the folder that will be created lives here
    if not os.access(target, os.W_OK | os.X_OK):
        raise CliError(f"{flag} {spelled}: cannot write in {target} (permission denied or read-only file system)")


def check_fresh_folder(path: str | os.PathLike, flag: str, overwrite: bool) -> None:
    """Refuse writing into a non-empty existing folder without ``--overwrite``: a model folder with
    another model's files left in it would not reload as either."""
    p = Path(path)
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise CliError(f"{flag} {os.fspath(path)} exists and is not empty; pass --overwrite to write into it")


def check_at_least(*checks: tuple[str, float | None, float]) -> None:
    """Refuse a numeric option below its least value, before any work; ``None`` (not given) passes.

    Args:
        checks: ``(flag, value, least)`` each; NaN is refused too (it compares false to everything).

    Example:
        >>> check_at_least(("--random", 0, 0), ("--greedy-samples", None, 0))
        >>> check_at_least(("--bootstrap", -1, 0))
        Traceback (most recent call last):
        ...
        qblock.cli.CliError: --bootstrap must be at least 0, got -1
    """
    for flag, value, least in checks:
        if value is not None and not value >= least:
            raise CliError(f"{flag} must be at least {least}, got {value}")


#: counts of ``run`` and ``validate`` where 0 is meaningful (none, or all for --greedy-samples and
#: --task-limit) but a negative number is not (``calib[:-3]`` would silently drop samples)
COUNT_OPTIONS = ("random", "greedy_samples", "bootstrap", "task_limit", "bench_top")


def check_counts(values: dict[str, Any]) -> None:
    """Refuse a negative :data:`COUNT_OPTIONS` value; ``run`` passes its preset, ``validate`` its ``vars(args)``."""
    check_at_least(*((f"--{k.replace('_', '-')}", values.get(k), 0) for k in COUNT_OPTIONS))


def check_seed(seed: int | None, flag: str = "--seed") -> int | None:
    """A seed is None (fresh randomness) or a non-negative integer, as numpy and dwave-samplers need."""
    if seed is not None and seed < 0:
        raise CliError(f"{flag} must be a non-negative integer, got {seed} (e.g. {flag} 0)")
    return seed


def add_executor_option(p) -> None:
    """``--executor local|ray|ray:ADDRESS``, the same for every sub-command that can spread its work."""
    p.add_argument("--executor", default="local", metavar="local|ray[:ADDRESS]",
                   help="where independent work runs: local (default, this process), ray (a local Ray instance "
                        "on all cores) or ray:ADDRESS (a running cluster, e.g. ray:auto or ray:HEAD:6379); "
                        "needs pip install 'qblock[ray]'")


def check_executor(args) -> None:
    """Refuse a bad ``--executor`` (or Ray not installed) before any slow work; see :func:`open_executor`."""
    from qblock import executor as qex

    try:
        if qex.parse_spec(getattr(args, "executor", None))[0] == "ray":
            qex._ray()
    except qex.ExecutorError as exc:
        raise CliError(f"--executor: {exc}") from None


def open_executor(args, quiet: bool = False):
    """The executor ``args.executor`` names, as a context manager; a bad value or missing Ray is a
    :class:`CliError` (one line naming the install command), checked before any other work.

    Example:
        >>> import argparse
        >>> with open_executor(argparse.Namespace(executor="local")) as ex:
        ...     ex.name
        'local'
        >>> open_executor(argparse.Namespace(executor="dask"))
        Traceback (most recent call last):
        ...
        qblock.cli.CliError: --executor: unknown executor 'dask': use local, ray or ray:ADDRESS
    """
    import sys

    from qblock import executor as qex

    spec = getattr(args, "executor", None) or "local"
    try:
        kind, _ = qex.parse_spec(spec)
        if kind == "ray":
            qex._ray()  # fail now, with the install command, not after loading a model
            if not quiet:
                print(f"qblock: starting executor {qex.describe(spec)}", file=sys.stderr, flush=True)
        return qex.open_executor(spec)
    except qex.ExecutorError as exc:
        raise CliError(f"--executor: {exc}") from None


# ---------------------------------------------------------------------- options of `run` and `validate`
def add_evaluation_options(p: argparse.ArgumentParser) -> None:
    """The options ``qblock run`` and ``qblock validate`` share word for word: solver, benchmark harness,
    torch threads and device."""
    from qblock.backends.exact import ENUMERATION_LIMIT

    p.add_argument("--backend", default="auto",
                   help="solver backend for the top-k; 'auto' (default): exact (certified top-k) when C(N, M) <= "
                        f"{ENUMERATION_LIMIT:,}, else swap")
    p.add_argument("--harness", default="native", choices=("native", "lm-eval"),
                   help="benchmark scoring: qblock's own log-likelihood scoring (default) or lm-evaluation-harness "
                        "(pip install 'qblock[eval]') through generated local task files")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads: a number, or 'auto' (default): one per core on an idle machine, "
                        "else only the cores that are free right now (CPU use sampled over 0.5 s; at least 1): threads waiting on "
                        "each other on busy cores made forward passes up to 8x slower")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default cpu), or auto to spread a large model over all GPUs (device_map)")


def add_selection_options(p: argparse.ArgumentParser, samples: int | None = 8, evaluations: int | None = 24,
                          confirm_samples: int | None = 32, race: bool | None = True) -> None:
    """Options of qblock's selection (the measured QUBO refined per M), shared by ``validate`` and ``run``."""
    g = p.add_argument_group("qblock selection (the recommended set per M; calibration data only)")
    g.add_argument("--no-select", dest="select", action="store_false",
                   help="skip the selection (no recommended sets; only the QUBO states and baselines)")
    g.add_argument("--select-samples", type=int, default=samples, metavar="N",
                   help=f"calibration samples its measurements use (default {_or_preset(samples)})")
    g.add_argument("--select-evaluations", type=int, default=evaluations, metavar="E",
                   help=f"refinement budget per M in evaluations of those samples (default {_or_preset(evaluations)})")
    g.add_argument("--select-pool", type=int, default=None, metavar="P",
                   help="blocks whose pairwise removals are measured (default max(8, N/2); qblock run --quick: 10, "
                        "at most that default)")
    g.add_argument("--select-pair-samples", type=int, default=None, metavar="N",
                   help="measure those pairs on the first N of the selection samples only (default: all of them; "
                        "fewer tokens, but at M = 2 the loop then measures its candidate pairs itself)")
    g.add_argument("--select-backend", default="exact",
                   help="solver in the refinement loop: any backend name (default exact); one that takes fewer "
                        "variables than the model has blocks (qaoa: 22 qubits) solves on the best sets' and the most "
                        "removable blocks")
    g.add_argument("--select-confirm", type=int, default=6, metavar="K",
                   help="best sets per M measured again on more calibration samples, the lowest recommended "
                        "(default 6; 0 for none)")
    g.add_argument("--select-confirm-samples", type=int, default=confirm_samples, metavar="N",
                   help="calibration samples of that confirmation, the ones after the loop's (at most the rest; "
                        f"default {_or_preset(confirm_samples)})")
    g.add_argument("--select-screen", type=int, default=2, metavar="N",
                   help="calibration samples of a cheap greedy removal chain that gives the loop one starting set "
                        "per M (default 2; 0 for none)")
    g.add_argument("--no-select-one-pass", dest="select_one_pass", action="store_false",
                   help="do not add the one-pass baselines' sets (ShortGPT, angular window; one statistics pass) "
                        "to the loop's starts and the confirmed finalists")
    # None unless given, so that an explicit --select-race without a confirmation can be refused
    g.add_argument("--select-race", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the finalists not resolved from the lowest (margin within twice its standard "
                        "error) again on the calibration samples after the confirmation's, in chunks of its size, "
                        "until they run out or one is left (default "
                        + ("on" if race else "off" if race is False else "on") + ")")


def _or_preset(default: int | None) -> str:
    return "from the preset" if default is None else str(default)


def add_eval_dtype_option(p: argparse.ArgumentParser) -> None:
    """``--eval-dtype``, shared by ``validate`` and ``run``."""
    p.add_argument("--eval-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="dtype of the forward-only evaluations (selection, baselines, held-out loss): auto = bf16 "
                        "where the CPU/GPU runs it natively (about 3x faster on such CPUs), else fp32; extraction "
                        "and healing always run in fp32 (default auto)")


def apply_eval_dtype(model, args: argparse.Namespace, healing: bool) -> str:
    """Cast ``model`` to the evaluation dtype (after any gradient work); fp32 when healing follows."""
    from qblock.llm.models import cast_for_eval, eval_dtype

    if healing:
        if args.eval_dtype == "bf16":
            raise CliError("healing trains in fp32: drop --eval-dtype bf16 (or the --heal options)")
        return "fp32"
    name = eval_dtype(args.eval_dtype, getattr(args, "device", None))
    if name == "bf16":
        import torch

        cast_for_eval(model, torch.bfloat16)
    return name


def check_selection_options(args: argparse.Namespace) -> None:
    """Refuse out-of-range ``--select-*`` values and an unknown ``--select-backend`` in one line each;
    ``run`` and ``validate`` call it before loading a model or touching a problem file.

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser(); add_selection_options(p)
        >>> check_selection_options(p.parse_args(["--select-screen", "-1"]))
        Traceback (most recent call last):
        ...
        qblock.cli.CliError: --select-screen must be at least 0, got -1
    """
    for flag, v, low in (("--select-samples", args.select_samples, 1), ("--select-evaluations", args.select_evaluations, 0),
                         ("--select-pool", args.select_pool, 0), ("--select-confirm", args.select_confirm, 0),
                         ("--select-confirm-samples", args.select_confirm_samples, 1),
                         ("--select-screen", args.select_screen, 0),
                         ("--select-pair-samples", args.select_pair_samples, 1)):
        check_at_least((flag, v, low))
    if args.select_race and args.select_confirm == 0:
        raise CliError("--select-race races the confirmation's finalists: drop it or --select-confirm 0")
    check_backend_name(args.select_backend, "--select-backend")


def check_backend_name(name: str, flag: str, auto: bool = False) -> None:
    """Refuse a name that is no backend (``auto`` too, unless ``auto``), before any model is loaded."""
    from qblock import backends

    if not (auto and name == "auto") and name not in backends.names():
        raise CliError(f"{flag} {name!r} is not a backend; choose from {'auto, ' if auto else ''}"
                       f"{', '.join(backends.names())}")


def check_ms(ms: list[int], n: int) -> None:
    """Every ``--remove`` value leaves a block of the ``n``: ``1 <= M < n``."""
    bad = [m for m in ms if not 1 <= m < n]
    if bad:
        raise CliError(f"--remove values must be between 1 and {n - 1} for this {n}-block model, got {bad}")


def selection_settings(args: argparse.Namespace) -> dict:
    """The :class:`ValidationSettings` fields of the selection options, checked."""
    check_selection_options(args)
    return {"select": args.select, "select_samples": args.select_samples, "select_evaluations": args.select_evaluations,
            "select_pool": args.select_pool, "select_pair_samples": args.select_pair_samples,
            "select_backend": args.select_backend,
            "select_confirm": args.select_confirm, "select_confirm_samples": args.select_confirm_samples,
            "select_screen": args.select_screen, "select_one_pass": args.select_one_pass,
            "select_race": races(args.select_race, args.select_confirm)}


def races(select_race: bool | None, select_confirm: int) -> bool:
    """Whether the confirmation races: on unless turned off (``False``), and only with a confirmation to race.

    Example:
        >>> races(None, 6), races(True, 0), races(False, 6)
        (True, False, False)
    """
    return select_race is not False and select_confirm > 0


def parse_ms(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        ms = [int(v) for v in str(value).replace(" ", "").split(",") if v]
    except ValueError:
        raise CliError(f"--remove expects integers like 6 or 3,6,9, got {value!r}") from None
    if not ms:
        raise CliError("--remove is empty")
    return ms


def parse_list(value: str, allowed: tuple[str, ...] | None, flag: str, all_value: tuple[str, ...] = ()) -> list[str]:
    value = (value or "").strip()
    if value in ("", "none"):
        return []
    if value == "all":
        return list(all_value)
    items = [v.strip() for v in value.split(",") if v.strip()]
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise CliError(f"{flag}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def setup_torch(args: argparse.Namespace) -> int:
    """Check the llm extra is installed and set torch's threads (``--threads``); shared with ``qblock run``."""
    from qblock._lazy import require

    require("torch", "llm")
    require("scipy", "llm")
    from qblock.validate.runner import apply_threads

    try:
        return apply_threads(args.threads, quiet=args.quiet)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def describe_eval(data_provenance: dict) -> str:
    """The held-out data of a report in one phrase, e.g. "12 samples x 128 tokens from stories"."""
    e = data_provenance.get("evaluation", {})
    # a built-in source by its name, a user's file by its path
    src = (e.get("package") and e.get("name")) or e.get("file") or e.get("source") or e.get("name") or "?"
    extra = ", passages disjoint from calibration" if e.get("disjoint_from_calibration") else ""
    return f"{e.get('num_samples')} samples x {e.get('seq_len')} tokens from {src}{extra}"


def text_sources(args, *options: str) -> dict[str, str | None]:
    """Each text option's canonical source (a file's absolute path, a built-in source's name, ``None`` for
    LAMBADA), checked before any model is loaded: a bad one is a one-line :class:`CliError`."""
    from qblock.llm.data import DataError, text_source

    out = {}
    for option in options:
        try:
            out[option] = text_source(getattr(args, option))
        except DataError as exc:
            raise CliError(f"--{option.replace('_', '-')}: {exc}") from None
    return out


def text_files(sources: dict[str, str | None]) -> list[str]:
    """The user's files among canonical text sources (what :func:`check_output` must never overwrite)."""
    from qblock.llm.data import TEXT_SOURCES

    return [v for v in sources.values() if v is not None and v not in TEXT_SOURCES]


def benchmark_overlap(data_provenance: dict, tasks, quiet: bool = False) -> list[str]:
    """A report note (and a warning on stderr) where the calibration text holds a benchmark's own passages:
    ``wikipedia`` is BoolQ's, so BoolQ accuracy of sets chosen on it is not held-out."""
    from qblock.llm.data import source_of

    if "boolq" not in (tasks or ()) or source_of(data_provenance.get("calibration") or {}) != "wikipedia":
        return []
    note = ("the calibration text (wikipedia) is the BoolQ validation passages: BoolQ accuracy of sets chosen on it "
            "is not a held-out score")
    if not quiet:
        print(f"qblock: warning: {note}", file=sys.stderr, flush=True)
    return [note]
