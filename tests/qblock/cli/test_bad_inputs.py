"""Bad input ends in one clear line, never a traceback, and never overwrites anything (issue 10).

Library: ``BlockRemovalProblem.load`` raises ``ValueError`` naming the file; the CLI prints one
``qblock: error:`` line and exits non-zero without writing.
"""

import errno
import io
import json
import os
import zipfile

import dimod
import numpy as np
import pytest

import qblock
from qblock import BlockRemovalProblem
from qblock._io import atomic_write_bytes
from qblock.cli import main


def cli(capsys, *argv):
    """Run the CLI in-process; (exit code, stderr lines)."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_one_line(code, err, needle):
    assert code != 0
    assert len(err) == 1 and err[0].startswith("qblock: error: ") and needle in err[0], err


@pytest.fixture
def pfile(tmp_path):
    f = tmp_path / "p.npz"
    qblock.random_problem(8, 2, seed=0).save(f)
    return f


def npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def header(**fields):
    h = {"format": "qblock.BlockRemovalProblem", "format_version": 1, "num_remove": 1}
    h.update(fields)
    return np.array(json.dumps(h))


def huge_member():
    """A valid archive whose H claims 10**6 x 10**6 float64 (8 TB) but holds a few bytes."""
    good = npz_bytes(H=np.eye(2), linear=np.zeros(2), header=header())
    hdr = "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000, 1000000), }".ljust(118) + "\n"
    fake = b"\x93NUMPY\x01\x00" + len(hdr).to_bytes(2, "little") + hdr.encode() + b"\0" * 32
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, fake if info.filename == "H.npy" else src.read(info))
    return out.getvalue()


def damaged_npy_header():
    """H.npy whose header dict lost its closing brace: numpy's fallback parser raises tokenize.TokenError."""
    hdr = "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2), ".ljust(118) + "\n"
    blob = b"\x93NUMPY\x01\x00" + len(hdr).to_bytes(2, "little") + hdr.encode() + np.eye(2).tobytes()
    good = npz_bytes(H=np.eye(2), linear=np.zeros(2), header=header())
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, blob if info.filename == "H.npy" else src.read(info))
    return out.getvalue()


BAD_FILES = {
    "empty": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],
    "random bytes": lambda good: np.random.default_rng(0).bytes(2000),
    "zip without arrays": lambda good: npz_bytes(),
    "missing H": lambda good: npz_bytes(linear=np.zeros(2), header=header()),
    "header is a list": lambda good: npz_bytes(H=np.eye(2), linear=np.zeros(2), header=np.array("[1, 2]")),
    "header is a number": lambda good: npz_bytes(H=np.eye(2), linear=np.zeros(2), header=np.array("5")),
    "header not JSON": lambda good: npz_bytes(H=np.eye(2), linear=np.zeros(2), header=np.array("{oops")),
    "header array": lambda good: npz_bytes(H=np.eye(2), linear=np.zeros(2), header=np.zeros((2, 2))),
    "num_remove Infinity": lambda good: npz_bytes(H=np.eye(2), linear=np.zeros(2),
                                                  header=np.array(json.dumps({**json.loads(str(header())), "num_remove": float("inf")}))),
    "num_remove NaN": lambda good: npz_bytes(H=np.eye(2), linear=np.zeros(2),
                                             header=np.array(json.dumps({**json.loads(str(header())), "num_remove": float("nan")}))),
    "num_remove 1.5": lambda good: npz_bytes(H=np.eye(2), linear=np.zeros(2), header=header(num_remove=1.5)),
    "num_remove text": lambda good: npz_bytes(H=np.eye(2), linear=np.zeros(2), header=header(num_remove="a")),
    "labels a number": lambda good: npz_bytes(H=np.eye(2), linear=np.zeros(2), header=header(labels=3)),
    "metadata a list": lambda good: npz_bytes(H=np.eye(2), linear=np.zeros(2), header=header(metadata=[1])),
    "format_version text": lambda good: npz_bytes(H=np.eye(2), linear=np.zeros(2), header=header(format_version="x")),
    "linear (2,3)": lambda good: npz_bytes(H=np.eye(6), linear=np.zeros((2, 3)), header=header()),
    "complex H": lambda good: npz_bytes(H=np.eye(2) * (1 + 1j), linear=np.zeros(2), header=header()),
    "pickled object": lambda good: _pickled(),
    "declares 8 TB": lambda good: huge_member(),
    "damaged npy header": lambda good: damaged_npy_header(),
}


def _pickled():
    buf = io.BytesIO()
    np.savez(buf, H=np.array([{"a": 1}], dtype=object), linear=np.zeros(1), header=header())
    return buf.getvalue()


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_load_bad_file_is_a_valueerror_naming_the_file(pfile, tmp_path, kind):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(BAD_FILES[kind](pfile.read_bytes()))
    with pytest.raises(ValueError) as info:
        BlockRemovalProblem.load(bad)
    assert str(bad) in str(info.value) and "not a qblock problem file" in str(info.value)


@pytest.mark.parametrize("special", ["/dev/null", "folder", "fifo"])
def test_load_special_paths_do_not_block_or_crash(tmp_path, special):
    path = {"/dev/null": "/dev/null", "folder": tmp_path, "fifo": tmp_path / "pipe.npz"}[special]
    if special == "fifo":
        os.mkfifo(path)  # reading a pipe with no writer would block forever
    with pytest.raises(ValueError, match="not a qblock problem file"):
        BlockRemovalProblem.load(path)


@pytest.mark.parametrize("kind", ["empty", "truncated", "header is a list", "num_remove Infinity"])
@pytest.mark.parametrize("command", [["solve", "-b", "exact"], ["show", "--no-embedding"], ["compare", "-b", "exact", "-r", "1"]])
def test_cli_bad_problem_file_is_one_line(pfile, tmp_path, capsys, kind, command):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(BAD_FILES[kind](pfile.read_bytes()))
    out = tmp_path / "out"
    code, err = cli(capsys, command[0], bad, *command[1:], "--out" if command[0] != "solve" else "--json", out)
    assert_one_line(code, err, str(bad))
    assert not out.exists()


@pytest.mark.parametrize("command", ["solve", "show", "compare"])
def test_cli_dev_null_is_one_line(capsys, tmp_path, command):
    code, err = cli(capsys, command, "/dev/null", "--out" if command != "solve" else "--json", tmp_path / "o")
    assert_one_line(code, err, "/dev/null")


# ------------------------------------------------------------------------------ output paths
def _same_bytes_after(path, fn):
    before = path.read_bytes()
    fn()
    assert path.read_bytes() == before


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dotted"])
def test_solve_json_never_overwrites_the_problem(pfile, capsys, how):
    target = {"same": pfile, "dotted": pfile.parent / "." / pfile.name,
              "symlink": pfile.parent / "link.npz", "hardlink": pfile.parent / "hard.npz"}[how]
    if how == "symlink":
        target.symlink_to(pfile)
    if how == "hardlink":
        os.link(pfile, target)

    def run():
        code, err = cli(capsys, "solve", pfile, "-b", "exact", "-q", "--json", target)
        assert_one_line(code, err, "would overwrite the input")

    _same_bytes_after(pfile, run)
    BlockRemovalProblem.load(pfile)


def test_folder_outputs_never_overwrite_an_input(tmp_path, capsys):
    # a problem file that happens to carry the name of a file compare / show writes
    cases = (("compare.csv", ["compare", "-b", "exact", "-r", "1"]), ("show.json", ["show", "--no-embedding"]))
    for name, command in cases:
        qblock.random_problem(6, 2, seed=0).save(tmp_path / "x.npz").rename(tmp_path / name)

        def run():
            code, err = cli(capsys, command[0], tmp_path / name, *command[1:], "--out", tmp_path)
            assert_one_line(code, err, "would overwrite the input")

        _same_bytes_after(tmp_path / name, run)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["solve", "{p}", "--json", "{d}/"], "is a folder"),
        (["solve", "{p}", "--json", "{d}"], "is a folder"),
        (["solve", "{p}", "--json", "{t}/new/"], "is a folder"),
        (["solve", "{p}", "--json", "{p}/x.json"], "is a file, not a folder"),
        (["solve", "{p}", "--json", ""], "--json is empty"),
        (["solve", "{p}", "--json", "{t}/pipe"], "not a regular file"),
        (["solve", "{p}", "--json", "{t}/out.npz"], "not a problem file; give a .json path"),
        (["solve", "{p}", "--param", "seed=3"], "--param seed: set it with --seed"),
        (["solve", "{p}", "--param", "num_solutions=5"], "--param num_solutions: set it with --top"),
        (["compare", "{p}", "-b", "swap", "--param", "swap.seed=1", "--out", "{t}/c"], "set it with --seed"),
        (["random-problem", "-N", "4", "--out", "{p}/x.npz"], "is a file, not a folder"),
        (["random-problem", "-N", "4", "--out", ""], "--out is empty"),
        (["random-problem", "-N", "4", "--out", "{d}/"], "is a folder"),
        (["compare", "{p}", "-b", "exact", "-r", "1", "--out", "{t}/existing.json"], "is an existing file"),
        (["compare", "{p}", "-b", "exact", "-r", "1", "--out", "{p}/sub"], "is a file, not a folder"),
        (["show", "{p}", "--out", "{t}/existing.json"], "is an existing file"),
        (["show", "{p}", "--out", ""], "--out is empty"),
    ],
)
def test_bad_output_paths_are_one_line_and_write_nothing(pfile, tmp_path, capsys, argv, needle):
    d = tmp_path / "d"
    d.mkdir()
    (tmp_path / "existing.json").write_text("{}")
    os.mkfifo(tmp_path / "pipe")
    before = sorted(os.listdir(tmp_path)), pfile.read_bytes()
    code, err = cli(capsys, *[a.format(p=pfile, d=d, t=tmp_path) for a in argv])
    assert_one_line(code, err, needle)
    assert (sorted(os.listdir(tmp_path)), pfile.read_bytes()) == before
    assert not os.listdir(d)
    assert (tmp_path / "existing.json").read_text() == "{}"


def test_unwritable_folder_is_refused_before_solving(pfile, tmp_path, capsys, monkeypatch):
    # root ignores permission bits, so simulate what a read-only mount or chmod 555 reports
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path) else real_access(p, mode, **kw))
    calls = []
    monkeypatch.setattr(qblock, "solve", lambda *a, **k: calls.append(1))
    code, err = cli(capsys, "solve", pfile, "-b", "exact", "--json", tmp_path / "s.json")
    assert_one_line(code, err, "cannot write in")
    assert not calls


@pytest.mark.parametrize("err_no, hint", [(errno.ENOSPC, "free some disk space"), (errno.EROFS, "read-only"),
                                          (errno.EACCES, "permissions")])
def test_write_failure_is_one_line_naming_the_output(pfile, tmp_path, capsys, monkeypatch, err_no, hint):
    out = tmp_path / "s.json"
    out.write_text("old")

    def failing_replace(src, dst):
        raise OSError(err_no, os.strerror(err_no), src)  # the temporary file, as the OS would say

    monkeypatch.setattr(os, "replace", failing_replace)
    code, err = cli(capsys, "solve", pfile, "-b", "exact", "-q", "--json", out)
    assert_one_line(code, err, f"{out}: {os.strerror(err_no)}")
    assert hint in err[0] and ".tmp" not in err[0]
    assert out.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["p.npz", "s.json"]


def test_atomic_write_refuses_to_replace_a_non_regular_file(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)  # stands for /dev/full or /dev/null: root's rename would replace the device
    with pytest.raises(OSError, match="Not a regular file"):
        atomic_write_bytes(pipe, b"x")
    assert not pipe.is_file()
    with pytest.raises(IsADirectoryError):
        atomic_write_bytes(tmp_path, b"x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        atomic_write_bytes(tmp_path / "pipe" / "x", b"x")


# ------------------------------------------------------------------------------ silently wrong input
@pytest.mark.parametrize("linear", [np.zeros((2, 3)), np.zeros((1, 6)), np.zeros((6, 1))])
def test_linear_must_be_a_vector_not_flattened(linear):
    with pytest.raises(ValueError, match="1-D vector of length N = 6"):
        BlockRemovalProblem(np.eye(6), 1, linear=linear)


@pytest.mark.parametrize("kwargs", [dict(H=np.eye(2) * (1 + 1j)), dict(H=np.eye(2), linear=[1j, 0]),
                                    dict(H=np.eye(2) + 0j)])
def test_complex_input_is_rejected_not_truncated(kwargs):
    with pytest.raises(ValueError, match="must be real"):
        BlockRemovalProblem(num_remove=1, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(H=[[1.0, 0.0], [0.0]]), dict(H=np.eye(2), linear=[[1.0], [1.0, 2.0]])])
def test_ragged_input_is_a_valueerror(kwargs):
    with pytest.raises(ValueError, match="must be a numeric array"):
        BlockRemovalProblem(num_remove=1, **kwargs)


@pytest.mark.parametrize("m", [float("inf"), float("nan"), 1.5, "1", [1], True])
def test_num_remove_must_be_a_whole_number(m):
    with pytest.raises(ValueError, match="must be a whole number"):
        BlockRemovalProblem(np.eye(3), m)
    assert BlockRemovalProblem(np.eye(3), 2.0).num_remove == 2


# ------------------------------------------------------------------------------ unclear messages
@pytest.mark.parametrize("command", [["solve", "{p}", "-b", "sa"], ["show", "{p}"], ["compare", "{p}", "-b", "exact"],
                                     ["random-problem", "-N", "4", "--out", "{t}/r.npz"]])
def test_negative_seed_is_one_clear_line(pfile, tmp_path, capsys, command):
    code, err = cli(capsys, *[a.format(p=pfile, t=tmp_path) for a in command], "--seed", "-1")
    assert_one_line(code, err, "--seed must be a non-negative integer, got -1")
    assert sorted(os.listdir(tmp_path)) == ["p.npz"]


def test_decode_names_what_it_expected():
    p = BlockRemovalProblem(np.eye(3), 1)
    with pytest.raises(TypeError, match="expected a dimod.SampleSet, got list"):
        p.decode([[1, 0, 0]])
    extra = dimod.SampleSet.from_samples([{0: 1, 1: 0, 2: 0, 3: 1}], "BINARY", [0.0])
    with pytest.raises(ValueError, match=r"exactly the N = 3 block variables 0..2; extra \[3\]"):
        p.decode(extra)
    twice = dimod.SampleSet.from_samples([{0: 1, 1: 0, 2: 0, "x[0]": 1}], "BINARY", [0.0])
    with pytest.raises(ValueError, match=r"given twice \[0\]"):
        p.decode(twice)
    with pytest.raises(ValueError, match="expected a block index"):
        p.decode(dimod.SampleSet.from_samples([{0: 1, 1: 0, "foo": 0}], "BINARY", [0.0]))


@pytest.mark.parametrize("argv, needle", [
    (["extract", "--out", "{p}/x.npz"], "is a file, not a folder"),
    (["extract", "--checkpoint-every", "0", "--out", "{p}.new.npz"], "--checkpoint-every must be at least 1, got 0"),
    # a problem file is no calibration text: refused before the overwrite rule would be reached
    (["extract", "--out", "{p}", "--calibration", "{p}"], "unsupported calibration file p.npz"),
    (["validate", "{p}", "--out", "{p}"], "is an existing file"),
    (["validate", "{p}", "--out", ""], "--out is empty"),
    (["run", "--quick", "--out", "{p}"], "is an existing file"),
])
def test_llm_commands_share_the_output_rule(pfile, capsys, argv, needle):
    before = pfile.read_bytes()
    code = main([a.format(p=pfile) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()  # validate/run may first note the thread count
    assert code != 0 and err[-1].startswith("qblock: error: ") and needle in err[-1], err
    assert pfile.read_bytes() == before


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("option, value, needle", [
    ("--select-screen", "-1", "--select-screen must be at least 0, got -1"),
    ("--select-samples", "0", "--select-samples must be at least 1, got 0"),
    ("--select-confirm", "-1", "--select-confirm must be at least 0, got -1"),
    ("--select-confirm-samples", "0", "--select-confirm-samples must be at least 1, got 0"),
    ("--select-pool", "-1", "--select-pool must be at least 0, got -1"),
    ("--select-pair-samples", "0", "--select-pair-samples must be at least 1, got 0"),
    ("--select-backend", "nope", "--select-backend 'nope' is not a backend"),
    ("--select-race --select-confirm", "0", "--select-race races the confirmation's finalists"),
])
def test_selection_options_are_checked_before_any_work(pfile, tmp_path, capsys, monkeypatch, command, option, value,
                                                       needle):
    from qblock.llm import models, pipeline

    def must_not_run(*a, **k):
        raise AssertionError("a bad option must be refused before the model is loaded or a problem extracted")

    monkeypatch.setattr(models, "load_model", must_not_run)
    monkeypatch.setattr(pipeline, "extract_problem", must_not_run)
    monkeypatch.setattr(BlockRemovalProblem, "load", must_not_run)
    head = ["run", "--quick", "--model", str(tmp_path / "no-such-model")] if command == "run" else ["validate", pfile]
    code, err = cli(capsys, *head, "--out", tmp_path / "out", *option.split(), value)
    assert code == 2 and err[-1].startswith("qblock: error: ") and needle in err[-1], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, race", [([], True), (["--quick"], True), (["--quick", "--no-select-race"], False),
                                        (["--no-select-race"], False), (["--select-confirm", "0"], False),
                                        (["--quick", "--select-confirm", "0"], False)])
def test_run_presets_race_the_confirmation_unless_told_not_to(argv, race):
    """Both presets race the confirmation (--quick on its 8 calibration samples after the confirmation's);
    --no-select-race confirms once; without a confirmation there is nothing to race."""
    import argparse

    from qblock.cli import run as run_cmd

    parser = argparse.ArgumentParser()
    run_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["run", *argv])
    run_cmd._checked_settings(args)
    assert args.select_race is race


def test_random_problem_adds_npz_as_extract_does(tmp_path, capsys):
    assert main(["random-problem", "-N", "6", "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p.npz").is_file() and not (tmp_path / "p").exists()
    assert main(["random-problem", "-N", "6", "--out", str(tmp_path / "Q.NPZ")]) == 0
    assert (tmp_path / "Q.NPZ").is_file() and not (tmp_path / "Q.NPZ.npz").exists()
