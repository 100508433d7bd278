"""qblock._io: a result replaces an earlier one in its folder whole or not at all."""

from __future__ import annotations

import os

import pytest

from qblock import _io
from qblock._io import staged_folder


def _tree(folder):
    return {str(p.relative_to(folder)): (p.read_text() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _weights(p):
    return p.name.startswith("model") and p.is_file()


@pytest.fixture
def earlier(tmp_path):
    """A folder holding an earlier sharded model, a sub-folder the new result replaces and a user's file."""
    out = tmp_path / "out"
    (out / "tok").mkdir(parents=True)
    for name, text in {"config.json": "old", "model.safetensors.index.json": "old index",
                       "model-00001-of-00002.safetensors": "old 1", "model-00002-of-00002.safetensors": "old 2",
                       "notes.txt": "mine", "tok/vocab.txt": "old vocab"}.items():
        (out / name).write_text(text)
    return out


def _write_new(folder):
    (folder / "config.json").write_text("new")
    (folder / "model.safetensors").write_text("new weights")
    (folder / "tok").mkdir()
    (folder / "tok" / "vocab.txt").write_text("new vocab")


@pytest.mark.parametrize("when", ["moving the new weights in", "moving an old shard aside"])
def test_a_move_interrupted_half_way_puts_the_earlier_result_back(earlier, monkeypatch, when):
    before = _tree(earlier)
    real = os.replace

    def interrupted(src, dst):
        if when == "moving the new weights in" and ".qblock-staging-" in str(src) and str(dst).endswith("model.safetensors"):
            raise KeyboardInterrupt  # Ctrl-C after config.json has moved in, before the weights
        if when == "moving an old shard aside" and str(src).endswith("00002-of-00002.safetensors"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(_io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(earlier, stale=_weights) as d:
            _write_new(d)
    assert _tree(earlier) == before  # the old config with the old shards, nothing hidden left behind


def test_the_new_result_replaces_the_old_one_whole(earlier):
    with staged_folder(earlier, stale=_weights) as d:
        _write_new(d)
    assert _tree(earlier) == {"config.json": "new", "model.safetensors": "new weights", "notes.txt": "mine",
                              "tok": None, "tok/vocab.txt": "new vocab"}
