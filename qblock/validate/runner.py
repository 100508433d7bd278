"""The validation pipeline shared by ``qblock validate`` and ``qblock run``.

:func:`validate` takes a problem, the loaded model, calibration and held-out samples, and:

1. gets the K lowest-energy states per M (from a backend via :func:`qblock.solve`, or from a
   solutions file written by ``qblock solve --json``), R random sets and every baseline;
2. evaluates each distinct removal set once on held-out samples (masking, no reloading), and the
   benchmarks on the full model, the best few QUBO states and every baseline;
3. scores every candidate under each available energy model (``fisher``, ``fisher+grad`` from the
   stored ``A``; ``pairwise`` on request), so the proxies can be compared;
4. writes the per-candidate table (JSON, CSV, markdown), ``summary.json`` (settings, statistics,
   timings), ``report.md`` and PNG plots; every statistic is recomputed from the table by
   :func:`qblock.validate.stats.summarize`.

Example:
    >>> import torch, tempfile
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from qblock.llm.gradients import gate_gradients
    >>> from qblock.llm.energy import build_problem
    >>> torch.manual_seed(0) and None
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=2)).eval()
    >>> calib = [torch.randint(0, 40, (12,)) for _ in range(6)]
    >>> evals = [torch.randint(0, 40, (12,)) for _ in range(4)]
    >>> p = build_problem(gate_gradients(model, calib, progress=False), energy="fisher")
    >>> res = validate(p, model, None, calib, evals, ValidationSettings(num_removes=[2], top_k=3,
    ...     num_random=2, backend="exact", n_boot=50, progress=False), out_dir=tempfile.mkdtemp())
    >>> sorted({r["method"] for r in res["rows"]})
    ['angular', 'full', 'measured', 'norm_ratio', 'qblock', 'qubo', 'random', 'shortgpt', 'shortgpt_iterative', 'sleb']
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from qblock._io import json_default as _json_default
from qblock._provenance import Provenance, tokens_sha256
from qblock.validate.baselines import BASELINE_METHODS, sleb_reach
from qblock.validate.evaluate import forward_tokens
from qblock.validate.report import runner_up_text
from qblock.validate.stats import (MEASURED_METHOD, QUBO_METHOD, RANDOM_METHOD, REFERENCE_METHOD, SELECT_METHOD,
                                   is_baseline, summarize)

__all__ = ["ValidationSettings", "validate", "selection_split", "data_for_problem", "read_solutions", "energy_column",
           "apply_threads", "print_summary", "ValidationError", "write_summary_json"]


class ValidationError(ValueError):
    """A validation input problem the user must fix (one-line message)."""


@dataclass
class ValidationSettings:
    """What :func:`validate` evaluates.

    Attributes:
        num_removes: the values of M.
        top_k: lowest-energy states per M.
        backend: solver backend for the top-k (ignored for an M given in ``solutions``); ``"auto"``:
            ``exact`` (certified top-k) when ``C(N, M) <= 6e7``
            (:func:`qblock.backends.exact.auto_backend`), else ``swap``.
        backend_params: extra keyword arguments for :func:`qblock.solve`.
        solve_seed: solver seed.
        num_random: random removal sets per M.
        random_seed: seed of the first random set (set k uses ``random_seed + k``, repeats skipped).
        baselines: baseline methods (subset of :data:`qblock.validate.baselines.BASELINE_METHODS`).
        greedy_samples: calibration samples used by the greedy baselines (SLEB, iterative ShortGPT),
            the first ones of the calibration set; ``None`` for all.
        tasks: benchmark names (see :func:`qblock.llm.data.load_benchmark`); empty for none.
        task_limit: items per benchmark (seeded subset); ``None`` for all.
        bench_top: how many QUBO states per M (best by held-out loss) get the benchmarks; the full
            model and every baseline always do.
        harness: ``"native"`` (:func:`qblock.validate.evaluate.multiple_choice`) or ``"lm-eval"``
            (lm-evaluation-harness through :mod:`qblock.validate.lmeval`; WinoGrande not supported).
        energy_models: extra energy models to score candidates with: ``"auto"`` (fisher and
            fisher+grad when ``A`` is stored, plus pairwise when ``N <= pairwise_max_blocks``), or a list.
        pairwise_samples: calibration samples for the pairwise energy (its cost is N(N+1)/2 passes).
        pairwise_max_blocks: largest N for which ``"auto"`` includes the pairwise energy.
        select: run qblock's selection (measured QUBO refined per M; the ``qblock`` rows and the
            ``recommended`` sets); see :func:`qblock.llm.measured.select_removals`.
        select_samples: calibration samples its measurements use (the first ones); ``None`` for all.
        select_pool: blocks whose pairwise removals are measured (default ``max(8, N/2)``).
        select_pair_samples: those pairs measured on the first this many selection samples only
            (``None``: on all of them).
        select_evaluations: refinement budget per M, in evaluations of the selection samples.
        select_batch: sets measured per refinement round.
        select_backend: the solver in the refinement loop (any backend name).
        select_confirm: finalists per M measured again on ``select_confirm_samples`` calibration samples,
            the lowest of them recommended (``0``: recommend the loop's lowest; see
            :func:`qblock.select.confirm`).
        select_confirm_samples: calibration samples of the confirmation: the ones after the loop's
            (:func:`selection_split`; ``None`` for all the rest); no confirmation when the loop uses
            every calibration sample.
        select_screen: calibration samples (the first ones) of a greedy removal chain that proposes one
            starting set per M to the loop (:func:`qblock.select.greedy_chain`); ``0``: none.
        select_one_pass: the one-pass baselines' sets (ShortGPT, angular window) from one statistics
            pass over the selection samples start the loop and are always confirmed
            (:func:`qblock.llm.measured.one_pass_sets`).
        select_race: the confirmation races on the calibration samples after the loop's and its own, in chunks of
            ``select_confirm_samples``: the finalists the samples so far do not resolve from the lowest are
            measured again on each chunk (:func:`qblock.select.confirm`), and the lowest by the mean over all
            their samples is recommended.
        select_heldout: measured sets per M (lowest calibration loss first, the recommended one
            included) also evaluated on held-out data, for the correlations.
        n_boot: bootstrap resamples for the correlation intervals.
        stats_seed: bootstrap seed.
        batch_size: evaluation batch size.
        progress: progress bars and messages on stderr.
    """

    num_removes: list[int]
    top_k: int = 10
    backend: str = "auto"
    backend_params: dict[str, Any] = field(default_factory=dict)
    solve_seed: int = 0
    num_random: int = 5
    random_seed: int = 0
    baselines: list[str] = field(default_factory=lambda: list(BASELINE_METHODS))
    greedy_samples: int | None = None
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = 100
    bench_top: int = 2
    harness: str = "native"
    energy_models: Any = "auto"
    pairwise_samples: int = 8
    pairwise_max_blocks: int = 12
    select: bool = True
    select_samples: int | None = 8
    select_pool: int | None = None
    select_pair_samples: int | None = None
    select_evaluations: int = 24
    select_batch: int = 4
    select_backend: str = "exact"
    select_confirm: int = 6
    select_confirm_samples: int | None = 32
    select_screen: int = 2
    select_one_pass: bool = True
    select_race: bool = True
    select_heldout: int = 5
    n_boot: int = 2000
    stats_seed: int = 0
    batch_size: int = 8
    progress: bool = True


def apply_threads(threads: str | int | None = "auto", quiet: bool = True) -> int:
    """Set torch's CPU thread count: a number, or ``"auto"``: every core on an idle machine (see
    :func:`machine_load`: under 0.5 busy cores), else the cores the load leaves free, at least 1.

    Intra-op threads wait on each other when one is descheduled, so a thread more than the free cores
    costs far more than it gains: on a shared 2-core machine (load average 7) a 2x128-token forward of
    the default model took 35 s with 2 threads and 4.6 s with 1, and with one other job running the quick
    run's calibration-loss evaluations took 2-5 s each with 2 threads (about 0.7 s with 1 on an idle core).

    Returns:
        the thread count in use.
    """
    import os

    import torch

    if threads is None or str(threads) == "auto":
        cores = os.cpu_count() or 1
        load = machine_load(cores)
        n = auto_threads(cores, load)
        if n < torch.get_num_threads():
            torch.set_num_threads(n)
            _log(f"machine busy ({load:.1f} of {cores} cores in use): using {n} torch thread(s) "
                 "(--threads N to override)", not quiet)
        return torch.get_num_threads()
    try:
        n = int(threads)
    except ValueError:
        raise ValueError(f"--threads must be a number or 'auto', got {threads!r}") from None
    if n < 1:
        raise ValueError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n


def machine_load(cores: int, interval: float = 0.5) -> float:
    """Busy cores now, from ``/proc/stat`` sampled over ``interval`` seconds (the load average where that
    file is missing).

    The 1-minute load average lags both ways: just after another job ends it still reads 0.7 on an idle
    2-core machine (a run started then took one thread throughout, about 1.5x slower in fp32), and 20 s
    after a busy loop starts it reads 0.3 (two threads beside it would make every pass several times
    slower).

    Example:
        >>> 0.0 <= machine_load(2, interval=0.05) <= 2.0
        True
    """
    import os
    import time

    try:
        first = _cpu_times()
        time.sleep(interval)
        idle, total = (b - a for a, b in zip(first, _cpu_times()))
        if total > 0:
            return max(0.0, min(float(cores), cores * (1.0 - idle / total)))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not on every platform
        return 0.0


def _cpu_times() -> tuple[int, int]:
    """``(idle, total)`` jiffies over all cores from ``/proc/stat`` (idle counts iowait too)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def auto_threads(cores: int, load: float) -> int:
    """Threads for ``--threads auto``: all ``cores`` if ``load < 0.5``, else ``cores - ceil(load)``, at least 1.

    Example:
        >>> auto_threads(2, 0.1), auto_threads(2, 0.7), auto_threads(16, 3.2), auto_threads(4, 9.0)
        (2, 1, 12, 1)
    """
    if load < 0.5:
        return max(1, int(cores))
    return max(1, int(cores) - math.ceil(load))


def energy_column(name: str) -> str:
    """Table column of an energy model: ``fisher+grad`` -> ``energy_fisher_grad``."""
    return "energy_" + name.replace("+", "_").replace("-", "_")


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"qblock: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- inputs
def read_solutions(path: str | Path) -> tuple[int | None, list[list[int]]]:
    """``(num_remove, [removed, ...])`` from a ``qblock solve --json`` file, in rank order (each set sorted).

    The file is read by :func:`qblock._solutions.read_solutions_file` (the one reader of the format,
    which refuses a block listed twice or a negative one); here the states must all remove
    ``num_remove`` blocks.
    """
    from qblock._solutions import SolutionsFileError, read_solutions_file

    try:
        sols = read_solutions_file(path)
    except SolutionsFileError as exc:
        raise ValidationError(str(exc)) from None
    p = sols.path
    if not sols.removed:
        raise ValidationError(f'{p} has no solutions (expected the output of qblock solve --json)')
    sets = sols.removed  # each sorted and checked by the reader
    sizes = {len(s) for s in sets}
    if len(sizes) != 1:
        raise ValidationError(f"{p}: solutions remove different numbers of blocks {sorted(sizes)}")
    m = sols.num_remove if sols.num_remove is not None else sizes.pop()
    if any(len(s) != m for s in sets):
        raise ValidationError(f"{p}: num_remove is {m} but the solutions remove {sorted({len(s) for s in sets})}")
    return m, sets


def data_for_problem(problem, tokenizer, *, num_eval: int | None = None, eval_seq_len: int | None = None,
                     eval_text: str | None = None, calibration: str | None = None,
                     num_calib: int | None = None, seq_len: int | None = None, seed: int | None = None):
    """The problem's calibration samples (re-made from its provenance) and disjoint held-out samples.

    The calibration samples are rebuilt with :func:`qblock.llm.data.calibration_and_eval` from the
    source, counts and seed recorded in the problem metadata, and checked against the token hash the
    extraction recorded. Held-out samples come from the same split's evaluation side (passages never
    used for calibration, checked), or from ``eval_text`` (a .txt/.jsonl file or a built-in source's name,
    :data:`qblock.llm.data.TEXT_SOURCES`).

    Returns:
        ``(calibration, evaluation, provenance)``.
    """
    from qblock.llm import data as qdata

    meta = problem.metadata or {}
    dmeta = meta.get("data") or {}
    if calibration is None:
        if not dmeta:
            raise ValidationError("the problem file records no calibration data; pass --calibration FILE "
                                  "(the text the problem was extracted from)")
        calibration = qdata.source_of(dmeta)
        if dmeta.get("sha256") and calibration:
            import hashlib

            if not Path(calibration).is_file():
                raise ValidationError(f"calibration file {calibration} recorded in the problem is missing; "
                                      "pass --calibration FILE")
            if hashlib.sha256(Path(calibration).read_bytes()).hexdigest() != dmeta["sha256"]:
                raise ValidationError(f"calibration file {calibration} changed since extraction (sha256 differs)")
    num_calib = int(num_calib or meta.get("num_samples") or 0)
    seq_len = int(seq_len or meta.get("seq_len") or 0)
    if num_calib < 1 or seq_len < 2:
        raise ValidationError("calibration sample count/length unknown: the problem's metadata has no num_samples/seq_len "
                              "(extract it with `qblock extract`, or pass num_calib= and seq_len= to data_for_problem)")
    seed = int(seed if seed is not None else meta.get("seed", dmeta.get("seed", 0)))
    manifest = (meta.get("extraction") or {}).get("manifest") or {}
    reserved = int(manifest.get("num_eval", dmeta.get("evaluation", {}).get("num_samples", 0)) or 0)
    eval_seq_len = int(eval_seq_len or seq_len)
    num_eval = int(num_eval if num_eval is not None else (reserved or 16))
    try:
        calib, ev, prov = qdata.calibration_and_eval(tokenizer, calibration, num_calib=num_calib,
                                                     num_eval=reserved, seq_len=seq_len, seed=seed)
    except qdata.DataError as exc:
        raise ValidationError(str(exc)) from None
    want = Provenance.of(meta).tokens_sha256
    if want:
        if tokens_sha256(calib) != want:
            raise ValidationError("re-made calibration samples differ from the extraction's (token hash mismatch): "
                                  "use the same model/tokenizer and calibration text as the extraction")
    provenance: dict[str, Any] = {"calibration": {k: v for k, v in prov.items() if k != "evaluation"}}
    cal_passages = set(prov["calibration"]["passages"])
    if eval_text is not None:
        try:
            same = qdata.text_source(eval_text) == qdata.text_source(calibration)
            texts, tprov = qdata.load_texts(eval_text)
        except qdata.DataError as exc:
            raise ValidationError(str(exc)) from None
        if same:
            raise ValidationError("--eval-text is the calibration text; omit it to use the disjoint held-out split")
        try:
            ev = qdata.make_samples(tokenizer, texts, num_eval, eval_seq_len, seed=seed)
        except qdata.DataError as exc:
            raise ValidationError(str(exc)) from None
        provenance["evaluation"] = dict(tprov, num_samples=len(ev), seq_len=eval_seq_len, seed=seed)
        return calib, ev, provenance
    if num_eval <= len(ev) and eval_seq_len == seq_len:
        ev = ev[:num_eval]
        eprov = dict(prov["evaluation"])
    else:
        try:
            _, ev, prov2 = qdata.calibration_and_eval(tokenizer, calibration, num_calib=0, num_eval=num_eval,
                                                      seq_len=eval_seq_len, seed=seed)
        except qdata.DataError as exc:
            raise ValidationError(str(exc)) from None
        eprov = dict(prov2["evaluation"])
    overlap = cal_passages & set(eprov.get("passages", []))
    if overlap:
        raise ValidationError(f"held-out samples would share {len(overlap)} passages with the calibration data; "
                              "use fewer --eval-samples or --eval-text FILE")
    eprov.update(num_samples=len(ev), seq_len=eval_seq_len, source=prov.get("name"), seed=seed,
                 disjoint_from_calibration=True)
    provenance["evaluation"] = eprov
    return calib, ev, provenance


# ------------------------------------------------------------------------------------------- energies
def _energy_problems(problem, model, calib, settings: ValidationSettings, notes: list[str]) -> dict[str, Any]:
    """Energy models to score candidates with: name -> BlockRemovalProblem."""
    wanted = settings.energy_models
    n = problem.num_blocks
    has_a = "A" in problem.arrays
    if wanted == "auto":
        wanted = (["fisher", "fisher+grad"] if has_a else []) + (["pairwise"] if n <= settings.pairwise_max_blocks else [])
    out: dict[str, Any] = {}
    for name in wanted or []:
        try:
            if name == "pairwise":
                from qblock.llm.energy import pairwise_problem

                sub = list(calib[: settings.pairwise_samples])
                t0 = time.perf_counter()
                _log(f"pairwise energy: {n * (n + 1) // 2 + 1} masked passes on {len(sub)} samples", settings.progress)
                out[name] = pairwise_problem(model, sub, progress=settings.progress)
                notes.append(f"pairwise energy measured on {len(sub)} calibration samples "
                             f"({n * (n + 1) // 2 + 1} forward passes, {time.perf_counter() - t0:.1f} s)")
            else:
                if not has_a:
                    notes.append(f"energy model {name} skipped: the problem file does not hold A")
                    continue
                from qblock.llm.energy import build_problem

                out[name] = build_problem(problem.arrays["A"], energy=name)
        except ImportError as exc:
            notes.append(f"energy model {name} unavailable ({exc})")
    return out


# ------------------------------------------------------------------------------------------- selection
#: SLEB's usual calibration (its paper: 128 samples of 2048 tokens), the reference of the cost column
SLEB_USUAL_TOKENS_PER_PASS = 128 * 2048


def sleb_passes(num_blocks: int, m: int) -> int:
    """Candidate passes SLEB spends to remove ``m`` of ``num_blocks`` blocks (each step, every surviving block
    but the first and the last: :func:`qblock.validate.baselines.sleb_reach`).

    Example:
        >>> sleb_passes(30, 9)  # 28 + 27 + ... + 20
        216
    """
    reach = sleb_reach(num_blocks)
    if not 0 <= int(m) <= reach:
        raise ValueError(f"SLEB removes 0 to {reach} of {num_blocks} blocks, not {m}")
    return sum(reach - k for k in range(int(m)))


def selection_split(calib: Sequence[Any], settings: ValidationSettings) -> tuple[list, list | None, list]:
    """The calibration samples of qblock's loop, its confirmation and its race, in that order and disjoint.

    The loop takes the first ``select_samples``, the confirmation the next ``select_confirm_samples``
    (``None``: all the rest), the race what is left. Disjoint because the loop chose its finalists for
    being low on its own samples: measured there again, the luckiest of them would look better than
    the rest by their luck, a bias the size of the differences the confirmation has to resolve.

    Returns:
        ``(loop, confirmation or None, race)``; no confirmation when ``select_confirm`` is 0 or the
        loop uses every sample, no race unless ``select_race``.

    Example:
        >>> s = ValidationSettings(num_removes=[3], select_samples=2, select_confirm_samples=3)
        >>> [x if x is None else len(x) for x in selection_split(list(range(10)), s)]
        [2, 3, 5]
        >>> [x if x is None else len(x) for x in selection_split(list(range(2)), s)]
        [2, None, 0]
    """
    n = settings.select_samples or len(calib)
    loop, rest = list(calib[:n]), list(calib[n:])
    cs = settings.select_confirm_samples
    checks = (rest[:cs] if cs else rest) if settings.select_confirm > 0 else []
    race = rest[len(checks):] if checks and settings.select_race else []
    return loop, checks or None, race


def _select(model, calib: Sequence[Any], ms: Sequence[int], settings: ValidationSettings, gate: str,
            timings: dict[str, float], executor: Any = None, book: Any = None) -> dict[str, Any]:
    """qblock's selection on the calibration samples of :func:`selection_split` (never held-out data)."""
    from qblock.llm.measured import select_removals

    samples, checks, race = selection_split(calib, settings)
    if not samples:
        raise ValidationError("qblock's selection needs calibration samples")
    _log(f"qblock selection: measured QUBO on {len(samples)} calibration samples"
         + _pair_note(settings.select_pair_samples, len(samples))
         + f", refined per M with {settings.select_backend} ({settings.select_evaluations} evaluations per M)"
         + _loop_starts(settings.select_screen, settings.select_one_pass)
         + (f", best {settings.select_confirm} confirmed on {len(checks)} samples" if checks else "")
         + (f", racing on {len(race)} more" if race else ""),
         settings.progress)
    t0 = time.perf_counter()
    try:
        sel = select_removals(model, samples, ms, gate=gate, pool_size=settings.select_pool,
                              evaluations_per_m=settings.select_evaluations, batch=settings.select_batch,
                              backend=settings.select_backend, seed=settings.solve_seed,
                              batch_size=settings.batch_size, confirm_samples=checks,
                              confirm_top=settings.select_confirm, screen_samples=settings.select_screen,
                              one_pass=settings.select_one_pass, race_samples=race,
                              pair_samples=settings.select_pair_samples,
                              progress=settings.progress, executor=executor, book=book)
    except ValueError as exc:
        raise ValidationError(f"qblock selection: {exc}") from None
    timings["selection"] = time.perf_counter() - t0
    sel["num_samples"] = len(samples)
    own = sel["prior"].metadata["selection"].get("pairs_own_samples")
    sel["pair_samples"] = settings.select_pair_samples if own else len(samples)  # own: fewer than the loop's
    sel["confirm_samples"] = len(checks) if checks else 0
    sel["race_samples"] = len(race)
    sel["screen_samples"] = min(int(settings.select_screen), len(samples))
    sel["one_pass"] = bool(settings.select_one_pass)
    return sel


def _pair_note(pair_samples: int | None, loop: int) -> str:
    """What the log says of ``--select-pair-samples`` (nothing when not given).

    Example:
        >>> _pair_note(None, 8), _pair_note(4, 8)
        ('', ', pairs on the first 4 of them')
        >>> _pair_note(16, 8)
        ', pairs on all 8 (--select-pair-samples 16 is not fewer)'
    """
    if pair_samples is None:
        return ""
    if pair_samples >= loop:
        return f", pairs on all {loop} (--select-pair-samples {pair_samples} is not fewer)"
    return f", pairs on the first {pair_samples} of them"


def _pairs_on(sel: Mapping[str, Any]) -> str:
    """How many samples the pairs were measured on, for a note ("" when on all the loop's)."""
    k = sel.get("pair_samples")
    return f" on {k} samples" if k and k < sel.get("num_samples", 0) else ""


def _raced(ref) -> str:
    """How far the confirmation raced, for a candidate's note ("" when it did not)."""
    rounds = ref.confirm_rounds
    if len(rounds) < 2:
        return ""
    return (f", the lowest and {' then '.join(str(len(r) - 1) for r in rounds[1:])} not resolved from it raced on "
            f"up to {max(ref.finalist_samples.values())}")


def _loop_starts(screen_samples: int | None, one_pass: bool | None) -> str:
    """How the loop was started, in the words of the log, the candidates' notes and the report settings."""
    return ((f", started from a greedy chain on {screen_samples} samples (above N/2 also one keeping blocks)"
             if screen_samples else "")
            + (" and the one-pass baselines' sets" if one_pass else ""))


def _selection_rows(sel: Mapping[str, Any], settings: ValidationSettings) -> list[dict[str, Any]]:
    """The recommended set (``qblock``) and the next measured sets (``measured``) of every M.

    Order: the recommended set, the other confirmed finalists (:meth:`qblock.select.Refinement.confirmed`:
    racing's survivors first), then the loop's other sets (lowest loss first). ``calib_loss`` is always on
    the loop's samples (the column the baselines are measured on too); ``confirm_loss`` on the
    confirmation's (``confirm_samples`` of them), where measured. The cost in passes is the forward
    tokens in passes over the selection samples (the confirmation's passes are larger, the screen's
    smaller), so passes x samples x length is the tokens.
    """
    prior, per_eval = sel["prior"], sel["tokens_per_evaluation"]
    rows = []
    for m, ref in sel["refinements"].items():
        loop = dict(ref.ranked())
        fin = ref.confirmed()
        order = fin + [k for k in loop if k not in ref.finalists]
        tokens = sel["shared_tokens"] + ref.tokens + ref.confirm_tokens
        cost = {"cost_forward_passes": -(-tokens // per_eval), "cost_backward_passes": 0,
                "cost_calib_samples": sel["num_samples"], "cost_seconds": sel["seconds"],
                "cost_backward_tokens": 0, "cost_forward_tokens": tokens}
        note = (f"measured QUBO (pairs in a pool of {len(prior.metadata['selection']['pool'])}"
                + _pairs_on(sel) + ") refined with "
                f"{ref.backend} in the loop" + _solved_on(ref)
                + _loop_starts(sel.get("screen_samples"), sel.get("one_pass"))
                + (f"; {len(fin)} finalists confirmed on {sel['confirm_samples']} calibration sample"
                   + ("s" if sel["confirm_samples"] != 1 else "")
                   + _raced(ref) if fin else ""))
        mine = [{"num_remove": m, "method": SELECT_METHOD if rank == 1 else MEASURED_METHOD,
                 "rank": None if rank == 1 else rank, "removed": list(key), "calib_loss": loop[key],
                 "confirm_loss": ref.finalists.get(key), "confirm_samples": ref.finalist_samples.get(key),
                 "source": ref.source(key), "note": note, **cost}
                for rank, key in enumerate(order[: max(1, settings.select_heldout)], start=1)]
        if ref.runner_up is not None:  # how firmly the confirmation's samples chose (stats.recommended)
            up = ref.runner_up
            mine[0].update(runner_up=up["removed"], runner_up_margin=up["margin"], runner_up_margin_se=up["se"],
                           runner_up_samples=up["samples"])
        rows += mine
    return rows


def _selection_energies(rows: list[dict[str, Any]], sel: Mapping[str, Any]) -> None:
    """Every row's energy under the measured QUBO and under the refined surrogate of its M."""
    for r in rows:
        r["energy_measured"] = sel["prior"].energy_of(r["removed"])
        ref = sel["refinements"].get(int(r["num_remove"]))
        if ref is not None:
            r["energy_refined"] = ref.surrogate.energy_of(r["removed"])


def _selection_summary(sel: Mapping[str, Any], n: int, ms: Sequence[int]) -> dict[str, Any]:
    meta = sel["prior"].metadata["selection"]
    return {
        "pool": meta["pool"], "shared_tokens": sel["shared_tokens"], "tokens_per_evaluation": sel["tokens_per_evaluation"],
        "num_samples": sel["num_samples"], "seconds": sel["seconds"], "coupling_rule": meta["coupling_rule"],
        "confirm_samples": sel.get("confirm_samples", 0), "race_samples": sel.get("race_samples", 0),
        "screen_samples": sel.get("screen_samples", 0), "pair_samples": sel.get("pair_samples"),
        "one_pass": bool(sel.get("one_pass")),
        "per_m": {str(m): {"backend": r.backend, "rounds": r.rounds, "evaluations": len(r.history),
                           "tokens": r.tokens, "solver_repeats": r.repeats, "finalists": len(r.finalists),
                           "confirm_tokens": r.confirm_tokens, "confirm_evaluations": r.confirm_evaluations,
                           "surrogate_ridge": r.surrogate.metadata.get("ridge"), "solve_blocks": r.solve_blocks,
                           "confirm_rounds": [[dict(e, loss=e["loss"] if math.isfinite(e["loss"]) else None) for e in rnd]
                                              for rnd in r.confirm_rounds]}
                  for m, r in sel["refinements"].items()},
        "sleb_usual_tokens": {str(m): sleb_passes(n, m) * SLEB_USUAL_TOKENS_PER_PASS for m in ms
                              if m <= sleb_reach(n)},  # SLEB's code cannot remove more
        "sleb_usual_settings": "128 samples x 2048 tokens per candidate pass",
    }


# ------------------------------------------------------------------------------------------- main
def _qubo_states(problem, m: int, settings: ValidationSettings, solutions: Mapping[int, list[list[int]]],
                 timings: dict[str, float], solved: dict[int, dict[str, Any]]) -> list[list[int]]:
    if m in solutions:
        solved[m] = {"backend": "solutions file", "certified_optimal": None, "num_states": len(solutions[m])}
        return [list(s) for s in solutions[m][: settings.top_k]]
    import qblock

    backend = settings.backend
    if backend == "auto":
        from qblock.backends.exact import auto_backend

        backend = auto_backend(problem.num_blocks, m)
    t0 = time.perf_counter()
    ss = qblock.solve(problem.with_num_remove(m), backend=backend, num_solutions=settings.top_k,
                      seed=settings.solve_seed, **settings.backend_params)
    timings[f"solve_M{m}"] = time.perf_counter() - t0
    solved[m] = {"backend": backend, "certified_optimal": bool(ss.info.get("certified_optimal")),
                 "seconds": timings[f"solve_M{m}"], "num_states": len(ss)}
    return [problem.removed_blocks(s) for s in ss.samples()]


def validate(problem, model, tokenizer, calib: Sequence[Any], evals: Sequence[Any], settings: ValidationSettings,
             out_dir: str | Path, *, solutions: Mapping[int, list[list[int]]] | None = None,
             report_settings: Mapping[str, Any] | None = None, title: str = "qblock validation",
             notes: Sequence[str] = (), executor: Any = None, write_summary: bool = True) -> dict[str, Any]:
    """Evaluate QUBO top-k, random sets and baselines for every M; write the table, report and plots.

    Args:
        problem: the :class:`qblock.BlockRemovalProblem` (its energy is the ``energy`` column).
        model, tokenizer: the loaded model (never modified on return) and its tokenizer (benchmarks only).
        calib: calibration samples (the extraction's; used by the baselines).
        evals: held-out samples, disjoint from ``calib``.
        settings: :class:`ValidationSettings`.
        out_dir: output directory.
        solutions: optional ``{M: [removed, ...]}`` to evaluate instead of solving.
        report_settings: extra key/values listed in the report's settings section.
        title: report title.
        notes: extra lines for the report's notes.
        executor: where the model-bound work runs (:mod:`qblock.executor`): held-out losses of the
            candidates, SLEB's candidate passes and qblock's selection measurements. ``None``: here; Ray:
            model actors with one replica each, the same table.
        write_summary: write ``summary.json`` now; ``False`` leaves it to a caller that adds to
            ``result["summary_json"]`` first (healing, the whole job's timings) and then writes the
            file once with :func:`write_summary_json`.

    Returns:
        ``{"rows", "summary", "paths", "timings", "notes", "summary_json"}`` (the last: what
        ``summary.json`` holds).
    """
    t_all = time.perf_counter()
    out = Path(out_dir)
    notes = list(notes)
    timings: dict[str, float] = {}
    ms = sorted({int(m) for m in settings.num_removes})
    n = problem.num_blocks
    for m in ms:
        if not 1 <= m < n:
            raise ValidationError(f"M must satisfy 1 <= M < N = {n}, got {m}")
    model.eval()
    meta = problem.metadata or {}
    gate = meta.get("gate", "layer")
    if meta.get("granularity", "block") != "block":
        raise ValidationError("validation evaluates block removal; this problem has one variable per branch "
                              f"(granularity {meta.get('granularity')!r})")
    if settings.harness not in ("native", "lm-eval"):
        raise ValidationError(f"harness must be 'native' or 'lm-eval', got {settings.harness!r}")
    if settings.select:
        from qblock.select import check_backend_size

        try:  # here, before the baselines' passes, not after them
            check_backend_size(settings.select_backend, None, n, ms)
        except ValueError as exc:
            raise ValidationError(f"qblock selection: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no folder behind

    # 1. candidates: the QUBO's top-k, the baselines, qblock's selection, random sets, the full model
    solved: dict[int, dict[str, Any]] = {}
    rows = _qubo_rows(problem, ms, calib, settings, dict(solutions or {}), timings, solved)
    from qblock.validate.oracle import OracleBook

    # SLEB and qblock's screen walk greedy chains on the same first samples: a set is measured once
    book = OracleBook(model, batch_size=settings.batch_size, executor=executor)
    baseline_details = _baseline_rows(model, calib, ms, settings, timings, rows, executor, book)
    selection = _select(model, calib, ms, settings, gate, timings, executor, book) if settings.select else None
    if selection is not None:
        rows += _selection_rows(selection, settings)
    rows += _random_and_reference_rows(n, ms, settings)
    # 2. energies of every candidate under the problem's and the other energy models
    others = _energy_columns(problem, model, calib, settings, notes, rows, selection)
    # 3. held-out loss of every distinct set
    evaluator, benchmarks = _heldout_losses(model, tokenizer, evals, settings, gate, rows, timings, executor)
    # 4. benchmarks on the full model, the best QUBO states and the baselines
    if benchmarks:
        _benchmark_rows(model, tokenizer, evaluator, benchmarks, ms, settings, gate, rows, timings)
    # 5. statistics, files
    rows.sort(key=lambda r: (r["num_remove"], _method_order(r["method"]), r.get("rank") or 0, r.get("seed") or 0))
    summary = summarize(rows, n_boot=settings.n_boot, seed=settings.stats_seed)
    paths, plot_paths = _write_tables_and_plots(rows, ms, others, out)
    timings["total_validate"] = time.perf_counter() - t_all
    settings_view = dict(report_settings or {})
    settings_view.update(_settings_view(problem, ms, settings, solved, selection, others, benchmarks, calib, evals))
    full = {
        "settings": _jsonable(asdict(settings)),
        "report_settings": _jsonable(settings_view),
        "problem": {"num_blocks": n, "labels": list(problem.labels), "energy": meta.get("energy"),
                    "model": meta.get("model"), "num_samples": meta.get("num_samples"), "seq_len": meta.get("seq_len")},
        "recommended": summary["recommended"],
        "summary": summary,
        "selection": _selection_summary(selection, n, ms) if selection is not None else None,
        "solver": {str(m): v for m, v in solved.items()},
        "timings_seconds": dict(timings),
        "baseline_details": _jsonable(baseline_details),
        "notes": notes,
        "files": {"table": dict(paths), "plots": plot_paths, "report": str(out / "report.md")},
    }
    _write_report(rows, summary, title, settings_view, plot_paths, notes, out)
    if write_summary:
        write_summary_json(out, full)
    paths.update(report=str(out / "report.md"), summary=str(out / "summary.json"))
    return {"rows": rows, "summary": summary, "paths": paths, "plots": plot_paths, "timings": timings, "notes": notes,
            "summary_json": full}


def _qubo_rows(problem, ms: Sequence[int], calib: Sequence[Any], settings: ValidationSettings,
               solutions: Mapping[int, list[list[int]]], timings: dict[str, float],
               solved: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Step 1a: the K lowest-energy states per M (solved, or from a solutions file), costed as one
    extraction; how each M's states were found goes into ``solved``."""
    meta = problem.metadata or {}
    n_calib = int(meta.get("num_samples") or len(calib))
    tokens = forward_tokens(calib)  # one forward and one backward pass over them, whatever the state
    rows = []
    for m in ms:
        for rank, removed in enumerate(_qubo_states(problem, m, settings, solutions, timings, solved), start=1):
            rows.append({"num_remove": m, "method": QUBO_METHOD, "rank": rank, "removed": sorted(removed),
                         "cost_forward_passes": 1, "cost_backward_passes": 1, "cost_calib_samples": n_calib,
                         "cost_seconds": (meta.get("extraction") or {}).get("seconds_this_run"),
                         "cost_forward_tokens": tokens, "cost_backward_tokens": tokens})
    return rows


def _baseline_rows(model, calib: Sequence[Any], ms: Sequence[int], settings: ValidationSettings,
                   timings: dict[str, float], rows: list[dict[str, Any]], executor: Any = None,
                   book: Any = None) -> list[dict[str, Any]]:
    """Step 1b: every baseline's set per M, appended to ``rows`` with its cost; returns the baselines' details."""
    from qblock.validate.baselines import run_baselines

    details: list[dict[str, Any]] = []
    if not settings.baselines:
        return details
    if not calib:
        raise ValidationError("baselines need calibration samples")
    greedy = list(calib[: settings.greedy_samples]) if settings.greedy_samples else list(calib)
    tokens = {"calib": forward_tokens(calib), "greedy": forward_tokens(greedy)}
    t0 = time.perf_counter()
    _log(f"baselines {', '.join(settings.baselines)} for M = {ms} ({len(calib)} calibration samples, "
         f"greedy methods on {len(greedy)})", settings.progress)
    res = run_baselines(model, calib, ms, methods=settings.baselines, greedy_samples=greedy,
                        batch_size=settings.batch_size, progress=settings.progress, pool=executor, book=book)
    timings["baselines"] = time.perf_counter() - t0
    for r in res:
        per_pass = tokens["greedy"] if r.method in ("sleb", "shortgpt_iterative") else tokens["calib"]
        rows.append({"num_remove": r.num_remove, "method": r.method, "removed": sorted(r.removed),
                     "cost_forward_passes": r.forward_passes, "cost_backward_passes": 0,
                     "cost_calib_samples": r.calib_samples, "cost_seconds": r.seconds,
                     "cost_forward_tokens": r.forward_passes * per_pass, "cost_backward_tokens": 0})
        details.append(r.to_dict())
    return details


def _random_and_reference_rows(n: int, ms: Sequence[int], settings: ValidationSettings) -> list[dict[str, Any]]:
    """Step 1c: R seeded random sets per M and the full model (nothing removed), at no cost."""
    from qblock.validate.baselines import random_sets

    free = {"cost_forward_passes": 0, "cost_backward_passes": 0, "cost_calib_samples": 0, "cost_seconds": 0.0,
            "cost_forward_tokens": 0, "cost_backward_tokens": 0}
    rows = [{"num_remove": m, "method": RANDOM_METHOD, "seed": r.seed, "removed": r.removed, **free}
            for m in ms for r in random_sets(n, m, settings.num_random, seed=settings.random_seed)]
    rows.append({"num_remove": 0, "method": REFERENCE_METHOD, "removed": [], **free})
    return rows


def _energy_columns(problem, model, calib: Sequence[Any], settings: ValidationSettings, notes: list[str],
                    rows: list[dict[str, Any]], selection: Mapping[str, Any] | None) -> dict[str, Any]:
    """Step 2: every row's energy under the problem and the other energy models (returned by name)."""
    others = _energy_problems(problem, model, calib, settings, notes)
    for r in rows:
        r["energy"] = problem.energy_of(r["removed"])
        for name, p in others.items():
            r[energy_column(name)] = p.energy_of(r["removed"])
    if selection is not None:
        _selection_energies(rows, selection)
        for r in rows:  # reported, not used to choose: the baselines' sets on the same calibration tokens
            if is_baseline(r["method"]) and "calib_loss" not in r:
                r["calib_loss"] = selection["oracle"].loss(r["removed"])
    return others


def _progress_iter(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="model")


def _heldout_losses(model, tokenizer, evals: Sequence[Any], settings: ValidationSettings, gate: str,
                    rows: list[dict[str, Any]], timings: dict[str, float], executor: Any = None):
    """Step 3: the held-out loss of every distinct candidate, into its rows; ``(evaluator, benchmarks)``."""
    from qblock.validate.evaluate import CandidateEvaluator

    benchmarks = {}
    if settings.tasks:
        from qblock.llm.data import load_benchmark

        for t in settings.tasks:
            benchmarks[t] = load_benchmark(t, limit=settings.task_limit, seed=0)
    evaluator = CandidateEvaluator(model, evals, tokenizer=tokenizer, benchmarks=benchmarks,
                                   batch_size=settings.batch_size, gate=gate)
    distinct = list(dict.fromkeys(tuple(r["removed"]) for r in rows))
    t0 = time.perf_counter()
    _log(f"held-out loss of {len(distinct)} distinct candidates on {len(evals)} samples", settings.progress)
    bar = None
    if settings.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(distinct), desc="evaluating candidates", unit="model")
    try:  # on a Ray executor the candidates spread over model actors; the bar advances as each finishes
        evaluator.evaluate_many(distinct, executor=executor, on_result=lambda *_: bar.update(1) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    timings["heldout_eval"] = time.perf_counter() - t0
    for r in rows:
        r.update(evaluator.evaluate(r["removed"]))
        r.pop("eval_seconds", None)
        # per sample, for the paired standard error of a margin (stats.best_vs_baseline)
        r["heldout_sample_losses"] = evaluator.sample_losses(r["removed"])
        r["heldout_sample_tokens"] = list(evaluator.sample_tokens)
    return evaluator, benchmarks


def _benchmark_rows(model, tokenizer, evaluator, benchmarks: Mapping[str, Any], ms: Sequence[int],
                    settings: ValidationSettings, gate: str, rows: list[dict[str, Any]],
                    timings: dict[str, float]) -> None:
    """Step 4: benchmark accuracies of the full model, the best QUBO states per M and the baselines."""
    chosen: list[tuple[int, ...]] = [()]
    for m in ms:
        q = sorted((r for r in rows if r["num_remove"] == m and r["method"] == QUBO_METHOD),
                   key=lambda r: r["heldout_loss"])
        chosen += [tuple(r["removed"]) for r in q[: settings.bench_top]]
        chosen += [tuple(r["removed"]) for r in rows if r["num_remove"] == m and is_baseline(r["method"])]
    chosen = list(dict.fromkeys(chosen))
    t0 = time.perf_counter()
    _log(f"benchmarks {', '.join(benchmarks)} ({', '.join(str(len(v)) for v in benchmarks.values())} items) "
         f"on {len(chosen)} models", settings.progress)
    for key in _progress_iter(chosen, settings.progress, "benchmarks"):
        if settings.harness == "lm-eval":
            from qblock.validate.lmeval import run_lm_eval

            h = run_lm_eval(model, tokenizer, benchmarks, removed=key, batch_size=settings.batch_size, gate=gate)
            res = {}
            for t, v in h.items():
                res[f"acc_{t}"], res[f"acc_norm_{t}"] = v["acc"], v["acc_norm"]
        else:
            res = evaluator.evaluate(key, tasks=True)
        for r in rows:
            if tuple(r["removed"]) == key:
                r.update({k: v for k, v in res.items() if k.startswith("acc_")})
    timings["benchmarks"] = time.perf_counter() - t0


def _write_tables_and_plots(rows: list[dict[str, Any]], ms: Sequence[int], others: Mapping[str, Any],
                            out: Path) -> tuple[dict[str, str], list]:
    """Step 5a: the candidate table (JSON/CSV/markdown) and the plots."""
    from qblock.validate import plots, report

    paths = {k: str(v) for k, v in report.write_table(rows, out).items()}
    plot_paths = plots.plot_energy_vs_loss(rows, out)
    lvm = plots.plot_loss_vs_m(rows, out) if len(ms) > 1 else None
    plot_paths += [lvm] if lvm else []
    for name in others:
        col = energy_column(name)
        sub = out / "energy_models"
        plot_paths += plots.plot_energy_vs_loss([dict(r, energy=r[col]) for r in rows], sub / name.replace("+", "_"))
    _remove_stale_plots(out, plot_paths)
    return paths, plot_paths


def _solved_on(ref) -> str:
    """The note's words for a loop whose backend saw only some blocks (:func:`qblock.select.solve_blocks`)."""
    return "" if ref.solve_blocks is None else (" (on the best sets' and the most removable blocks, "
                                                 f"{len(ref.solve_blocks)} in all)")


def _remove_stale_plots(out: Path, written: Sequence[str]) -> None:
    """Remove the plots an earlier report in ``out`` left that this one did not write (another M, a single M's
    missing ``loss_vs_m.png``, an energy model not scored now), so the folder shows one report."""
    from qblock._io import remove_stale

    remove_stale(out, ["loss_vs_m.png", "energy_vs_loss_M*.png", "energy_models/*/energy_vs_loss_M*.png"], written)


def _settings_view(problem, ms: Sequence[int], settings: ValidationSettings, solved: Mapping[int, Any],
                   selection: Mapping[str, Any] | None, others: Mapping[str, Any], benchmarks: Mapping[str, Any],
                   calib: Sequence[Any], evals: Sequence[Any]) -> dict[str, Any]:
    """Step 5b: the report's settings section (what was compared, on what)."""
    meta = problem.metadata or {}
    return {
        "blocks N": problem.num_blocks, "M": ", ".join(map(str, ms)),
        "QUBO candidates": f"top-{settings.top_k} per M: " + "; ".join(
            f"M={m} {v['backend']}" + (" (certified lowest)" if v.get("certified_optimal") else "")
            for m, v in sorted(solved.items())),
        "random sets": f"{settings.num_random} per M (seeds from {settings.random_seed})",
        "baselines": ", ".join(settings.baselines) or "none",
        "held-out samples": f"{len(evals)} x {max(len(s) for s in evals)} tokens",
        "calibration samples (baselines)": f"{len(calib)}; greedy methods on the first "
                                           f"{settings.greedy_samples or len(calib)}",
        "qblock selection": ("off" if selection is None else
                             f"measured QUBO on {selection['num_samples']} calibration samples "
                             f"({selection['tokens_per_evaluation']} tokens per evaluation; pairs in a pool of "
                             f"{len(selection['prior'].metadata['selection']['pool'])} blocks"
                             + _pairs_on(selection) + "), refined with "
                             f"{settings.select_backend} for {settings.select_evaluations} evaluations per M"
                             + _loop_starts(selection.get("screen_samples"), selection.get("one_pass"))
                             + (f"; finalists confirmed on {selection['confirm_samples']} samples"
                                if selection.get("confirm_samples") else "")
                             + (f", those not resolved from the lowest raced on {selection['race_samples']} more"
                                if selection.get("race_samples") else "")
                             + "; the recommended set is the lowest confirmed calibration loss (racing: of the "
                               "last ones raced, on every sample they were measured on; no confirmation: the lowest "
                               "measured)"),
        "energy models compared": ", ".join(["problem (" + str(meta.get("energy", "?")) + ")"] + list(others)),
        "benchmarks": (", ".join(f"{t} ({len(v)} items)" for t, v in benchmarks.items()) +
                       f", zero-shot log-likelihood scoring by {settings.harness}" if benchmarks else "none"),
    }


def _write_report(rows, summary, title: str, settings_view: Mapping[str, Any], plot_paths: list,
                  notes: list[str], out: Path) -> None:
    """Step 5c: report.md, written atomically."""
    from qblock._io import atomic_write_bytes
    from qblock.validate import report

    md = report.render_report(rows, summary, title=title, settings=settings_view,
                              plots=[str(Path(p).relative_to(out)) for p in plot_paths], notes=notes)
    atomic_write_bytes(out / "report.md", md.encode())


def write_summary_json(out_dir: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` (atomically): the one writer of the file, called once per run.

    Args:
        out_dir: the report folder.
        data: what :func:`validate` returned as ``result["summary_json"]``, with anything added since.

    Returns:
        The path written.
    """
    from qblock._io import atomic_write_bytes

    return atomic_write_bytes(Path(out_dir) / "summary.json",
                              (json.dumps(data, indent=1, default=_json_default) + "\n").encode())


@contextlib.contextmanager
def summary_if_failed(out_dir: str | Path, result: Mapping[str, Any]):
    """Around work after :func:`validate` (healing): if it fails, the validation's ``summary.json`` is still
    written (then the error goes on), so a report folder never has tables without their summary.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> try:
        ...     with summary_if_failed(d, {"summary_json": {"ok": 1}}):
        ...         raise KeyboardInterrupt
        ... except KeyboardInterrupt:
        ...     print((Path(d) / "summary.json").read_text().split())
        ['{', '"ok":', '1', '}']
    """
    try:
        yield
    except BaseException:
        write_summary_json(out_dir, result["summary_json"])
        raise


_ORDER = {SELECT_METHOD: -0.5, QUBO_METHOD: 0, **{m: k + 1 for k, m in enumerate(BASELINE_METHODS)},
          MEASURED_METHOD: 80, RANDOM_METHOD: 90, REFERENCE_METHOD: -1}


def _method_order(method: str) -> float:
    return _ORDER.get(method, 50)


def _jsonable(o: Any) -> Any:
    return json.loads(json.dumps(o, default=_json_default))


def print_summary(result: Mapping[str, Any], file=None) -> None:
    """Print, per M, the candidates side by side (method, removed, energy, loss, ppl) and the statements."""
    file = file or sys.stdout
    rows = result["rows"]
    ref = [r for r in rows if r["method"] == REFERENCE_METHOD]
    accs = sorted({k for r in rows for k in r if k.startswith("acc_") and not k.startswith("acc_norm_")
                   and r.get(k) is not None})
    rec = result["summary"].get("recommended") or {}
    if rec:
        print("qblock recommends (chosen on calibration loss; held-out loss only reported):", file=file)
        for m_key, v in rec.items():
            print(f"  M = {m_key}: remove {v['removed']}  calibration loss {v['calibration_loss']:.4f}, "
                  f"held-out loss {v['heldout_loss']:.4f}, {v['selection_tokens']:,} forward tokens to choose", file=file)
            if v.get("runner_up"):
                print(f"    runner-up on the {v['confirmation_samples']} confirmation samples: "
                      f"{runner_up_text(v['runner_up'])}", file=file)
        print(file=file)
    if ref:
        print(f"full model: held-out loss {ref[0]['heldout_loss']:.4f}, ppl {ref[0]['perplexity']:.2f}"
              + "".join(f", {a[4:]} {ref[0][a]:.3f}" for a in accs if ref[0].get(a) is not None), file=file)
    for m_key, s in result["summary"]["per_m"].items():
        m = int(m_key)
        print(f"\nM = {m}", file=file)
        head = f"  {'candidate':<20} {'removed':<28} {'energy':>11} {'loss':>8} {'ppl':>9}" + "".join(
            f" {a[4:]:>10}" for a in accs)
        print(head, file=file)
        for r in rows:
            if r["num_remove"] != m:
                continue
            name = r["method"]
            if name == QUBO_METHOD:
                name = f"QUBO #{r['rank']}"
            elif name == MEASURED_METHOD:
                name = f"measured #{r['rank']}"
            elif name == RANDOM_METHOD:
                name = f"random s{r['seed']}"
            rem = ",".join(map(str, r["removed"]))
            line = f"  {name:<20} {rem:<28} {r['energy']:>11.5g} {r['heldout_loss']:>8.4f} {r['perplexity']:>9.2f}"
            line += "".join(f" {r[a]:>10.3f}" if r.get(a) is not None else f" {'-':>10}" for a in accs)
            print(line, file=file)
        c = s["correlations"].get("energy", {})
        if c.get("spearman") is not None:
            ci = c.get("spearman_ci") or [math.nan, math.nan]
            print(f"  Spearman(energy, loss) = {c['spearman']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}], "
                  f"Kendall = {c['kendall']:+.3f} over {c['n']} distinct candidates", file=file)
        for col, cc in s["correlations"].items():
            if col != "energy" and cc.get("spearman") is not None:
                print(f"    {col[7:].replace('_grad', '+grad')}: Spearman {cc['spearman']:+.3f}, Kendall {cc['kendall']:+.3f}", file=file)
        print(f"  {s['best']['statement']}", file=file)
        rec_m = rec.get(m_key)
        sleb = [r for r in rows if r["num_remove"] == m and r["method"] == "sleb"]
        if rec_m and sleb and sleb[0].get("cost_forward_tokens"):
            print(f"  selection cost: qblock {rec_m['selection_tokens']:,} forward tokens; SLEB as run "
                  f"{int(sleb[0]['cost_forward_tokens']):,} ({sleb[0]['cost_forward_passes']} passes), "
                  f"at its usual 128 x 2048 tokens {int(sleb[0]['cost_forward_passes']) * SLEB_USUAL_TOKENS_PER_PASS:,}",
                  file=file)
