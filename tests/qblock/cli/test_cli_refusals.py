"""Refusals found by a CLI review: each is one ``qblock: error:`` line, checked before a model is
loaded or an output folder made, and nothing is written or overwritten."""

import json
import math

import numpy as np
import pytest

import qblock
from qblock.cli import main

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import save_tiny_llama  # noqa: E402


def cli(capsys, *argv):
    """Run the CLI in-process; (exit code, stderr lines)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line(code, err, needle):
    assert code == 2
    assert len(err) == 1 and err[0].startswith("qblock: error: ") and needle in err[0], err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random 3-block Llama with its tokenizer, saved once (seeded)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", layers=3, seed=0)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the refusal must come first."""
    from qblock.llm import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded before the refusal"))


@pytest.fixture
def problem_file(tmp_path):
    path = tmp_path / "p.npz"
    qblock.random_problem(8, 3, seed=0).save(path)
    return path


def _weights(folder):
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.suffix == ".safetensors"}


# ------------------------------------------------------------------------------ prune and svd: --out
def test_prune_never_overwrites_its_input_model(model_dir, capsys):
    before = _weights(model_dir)
    code, err = cli(capsys, "prune", "--model", model_dir, "--remove", "1", "-o", model_dir, "--overwrite", "-q")
    assert_one_line(code, err, f"--out {model_dir} would overwrite the input {model_dir}")
    assert _weights(model_dir) == before


def test_quiet_prune_prints_nothing(model_dir, tmp_path, capfd):
    assert main(["prune", "--model", str(model_dir), "--remove", "1", "-o", str(tmp_path / "p"), "-q"]) == 0
    out, err = capfd.readouterr()  # transformers' "Writing model shards" bar went to stderr
    assert (out, err) == ("", "") and (tmp_path / "p" / "config.json").is_file()


def test_svd_never_overwrites_its_input_nor_a_full_folder(model_dir, tmp_path, capsys, no_model):
    code, err = cli(capsys, "svd", "--model", model_dir, "--ratio", "0.8", "-o", model_dir)
    assert_one_line(code, err, "would overwrite the input")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep")
    code, err = cli(capsys, "svd", "--model", model_dir, "--ratio", "0.8", "-o", full)
    assert_one_line(code, err, "exists and is not empty; pass --overwrite")
    assert [f.name for f in full.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------ prune --recommended
def _report(tmp_path, recommended, num_blocks=None):
    report = tmp_path / "report"
    report.mkdir()
    problem = {} if num_blocks is None else {"num_blocks": num_blocks}
    (report / "summary.json").write_text(json.dumps({"problem": problem, "recommended": recommended}))
    return report


def test_prune_recommended_refuses_a_report_of_another_block_count(model_dir, tmp_path, capsys):
    report = _report(tmp_path, {"1": {"removed": [0]}}, num_blocks=6)
    out = tmp_path / "out"
    code, err = cli(capsys, "prune", "--recommended", report, "-M", "1", "--model", model_dir, "-o", out, "-q")
    assert_one_line(code, err, "was made for a model of 6 blocks but this model has 3 blocks")
    assert not out.exists()


@pytest.mark.parametrize("entry, needle", [
    ({"x": [1, 2]}, 'has no "removed" list'),
    ([1, 2], 'has no "removed" list'),
    ({"removed": ["a", 1]}, "whole block numbers"),
    ({"removed": [1.9, 0]}, "whole block numbers"),
    ({"removed": [1]}, "1 block(s) listed, not M = 2"),
])
def test_prune_recommended_reads_a_damaged_summary_in_one_line(tmp_path, capsys, no_model, entry, needle):
    report = _report(tmp_path, {"2": entry})
    code, err = cli(capsys, "prune", "--recommended", report, "-M", "2", "--model", "default", "-o", tmp_path / "o")
    assert_one_line(code, err, needle)
    assert str(report / "summary.json") in err[0]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ validate and show: sets
def test_validate_solutions_with_a_repeated_block_is_refused(problem_file, tmp_path, capsys, no_model):
    sols = tmp_path / "sols.json"
    sols.write_text(json.dumps({"num_remove": 2, "solutions": [{"rank": 1, "removed": [1, 1]}]}))
    code, err = cli(capsys, "validate", problem_file, "--solutions", sols, "--model", "default",
                    "-o", tmp_path / "o", "-q")
    assert_one_line(code, err, "block 1 is listed more than once")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--removed", "1,1,2"], "--removed: block 1 is listed more than once"),
    (["--removed", "1,2"], "--removed: 2 block(s) listed, not M = 3"),
    (["--removed", "1,2,3", "-M", "2"], "--removed: 3 block(s) listed, not M = 2"),
    (["--max-edges", "-3"], "max_edges must be at least 0, got -3"),
])
def test_show_refuses_a_bad_set_or_edge_count(problem_file, tmp_path, capsys, argv, needle):
    code, err = cli(capsys, "show", problem_file, *argv, "--no-embedding", "-o", tmp_path / "o")
    assert_one_line(code, err, needle)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ compare
@pytest.mark.parametrize("argv, needle", [
    (["--param", "swap.bogus=1"], "backend 'swap': unknown parameter 'bogus'"),
    (["--exact-time-limit", "-1"], "--exact-time-limit must be positive"),
    (["--time-limit", "nan"], "--time-limit must be positive"),
    (["--rtol", "-1"], "--rtol must be at least 0"),
    (["--atol", "nan"], "--atol must be at least 0"),
])
def test_compare_refuses_bad_settings_before_running(tmp_path, capsys, argv, needle):
    code, err = cli(capsys, "compare", "--blocks", "8", "--backends", "swap", "--repeats", "1", *argv,
                    "-o", tmp_path / "o", "-q")
    assert_one_line(code, err, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("doc, needle", [
    ({}, 'no "studies" list'),
    ({"studies": [{"problem": {"name": "x"}}]}, "missing key 'settings'"),
    ({"format_version": "one", "studies": []}, "format_version='one'"),
])
def test_compare_from_json_checks_the_file_before_making_the_folder(tmp_path, capsys, doc, needle):
    saved = tmp_path / "compare.json"
    saved.write_text(json.dumps({"format": "qblock.compare", "format_version": 1, **doc}))
    code, err = cli(capsys, "compare", "--from-json", saved, "-o", tmp_path / "o")
    assert_one_line(code, err, needle)
    assert str(saved) in err[0] and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ heal: finite numbers
@pytest.mark.parametrize("flag, value", [("--ce-weight", "nan"), ("--weight-decay", "nan"), ("--clip", "inf"),
                                         ("--temperature", "inf"), ("--lora-alpha", "nan")])
def test_heal_refuses_non_finite_numbers(tmp_path, capsys, flag, value):
    code, err = cli(capsys, "heal", tmp_path / "pruned", flag, value, "-o", tmp_path / "o")
    assert_one_line(code, err, f"{flag} must be a finite number, got {value}")
    assert not (tmp_path / "o").exists()


def test_heal_settings_refuse_nan_in_the_library():
    from qblock.llm.heal import HealError, HealSettings

    with pytest.raises(HealError, match="ce_weight must be a finite number"):
        HealSettings(ce_weight=math.nan).check()


# ------------------------------------------------------------------------------ seeds and counts
@pytest.mark.parametrize("argv", [
    ["extract", "--model", "{model}", "-o", "{tmp}/e.npz"],
    ["svd", "--model", "{model}", "--ratio", "0.8", "-o", "{tmp}/o"],
    ["heal", "{tmp}/pruned", "-o", "{tmp}/o"],
    ["run", "--model", "{model}", "-o", "{tmp}/o"],
    ["validate", "{problem}", "-o", "{tmp}/o"],
])
def test_negative_seed_is_refused_up_front(tmp_path, problem_file, capsys, no_model, argv):
    fill = {"model": tmp_path / "no-such-model", "tmp": tmp_path, "problem": problem_file}
    code, err = cli(capsys, *[a.format(**fill) for a in argv], "--seed", "-1", "-q")
    assert_one_line(code, err, "--seed must be a non-negative integer, got -1")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["p.npz"]


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("flag", ["--random", "--bootstrap", "--greedy-samples", "--task-limit"])
def test_negative_counts_are_refused_up_front(tmp_path, problem_file, capsys, no_model, command, flag):
    first = ["run", "--model", str(tmp_path / "no-such-model")] if command == "run" else ["validate", problem_file]
    code, err = cli(capsys, *first, flag, "-2", "-o", tmp_path / "o", "-q")
    assert_one_line(code, err, f"{flag} must be at least 0, got -2")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--bench-top", "-1"], "--bench-top must be at least 0"),
    (["--backend", "nosuch"], "--backend 'nosuch' is not a backend"),
    (["-M", "9"], "--remove values must be between 1 and 7 for this 8-block model, got [9]"),
    (["--seq-len", "1"], "--seq-len must be at least 2"),
    (["--eval-samples", "0"], "--eval-samples must be at least 1"),
])
def test_validate_refuses_before_loading_the_model_or_making_out(problem_file, tmp_path, capsys, no_model, argv,
                                                                   needle):
    code, err = cli(capsys, "validate", problem_file, *argv, "-o", tmp_path / "o", "-q")
    assert_one_line(code, err, needle)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ extract names its file
def test_extract_names_the_npz_it_wrote(model_dir, tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(" ".join(f"w{k}" for k in rng.integers(0, 62, size=20)) for _ in range(40)))
    monkeypatch.chdir(tmp_path)
    assert main(["extract", "--model", str(model_dir), "--samples", "2", "--seq-len", "8", "--eval-samples", "0",
                 "--calibration", str(calib), "-M", "1", "-o", "e4"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "e4.npz").is_file() and not (tmp_path / "e4").exists()
    assert out.startswith("e4.npz: ") and "next: qblock solve e4.npz\n" in out


# ------------------------------------------------------------------------------ out of memory
def test_out_of_memory_is_one_line(monkeypatch, capsys):
    from qblock.cli import backends_cmd

    def exhausted(args):
        raise MemoryError

    monkeypatch.setattr(backends_cmd, "run", exhausted)
    code, err = cli(capsys, "backends")
    assert_one_line(code, err, "out of memory")
