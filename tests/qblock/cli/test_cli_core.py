import json
import os
import subprocess
import sys

import numpy as np
import pytest

import qblock
from qblock.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qblock", *args], capture_output=True, text=True, timeout=120)


def test_random_problem_then_solve_json(tmp_path, capsys):
    f = tmp_path / "p.npz"
    assert main(["random-problem", "--blocks", "16", "--remove", "4", "--seed", "3", "--out", str(f)]) == 0
    out = tmp_path / "s.json"
    assert main(["solve", str(f), "--backend", "exact", "--top", "5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "certified optimal" in printed and "rank" in printed
    data = json.loads(out.read_text())
    assert [s["rank"] for s in data["solutions"]] == [1, 2, 3, 4, 5]
    p = qblock.BlockRemovalProblem.load(f)
    for s in data["solutions"]:
        assert len(s["removed"]) == 4
        assert p.energy_of(s["removed"]) == pytest.approx(s["energy"])
    energies = [s["energy"] for s in data["solutions"]]
    assert energies == sorted(energies)


def test_solve_remove_overrides_and_params(tmp_path, capsys):
    f = tmp_path / "p.npz"
    qblock.random_problem(12, 3, seed=1).save(f)
    assert main(["solve", str(f), "-M", "5", "-b", "swap", "-k", "3", "--seed", "2", "--param", "num_reads=4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "remove M=5" in lines[0]
    assert len(lines[2].split()) == 2 + 5  # rank, energy, five blocks


@pytest.mark.parametrize(
    "args, needle",
    [
        (["solve", "/nonexistent/p.npz"], "problem file not found"),
        (["solve", "{f}", "--backend", "nope"], "unknown backend"),
        (["solve", "{f}", "--remove", "99"], "0 <= M <= N"),
        (["solve", "{f}", "--top", "0"], "--top must be at least 1"),
        (["solve", "{f}", "--param", "oops"], "KEY=VALUE"),
        (["solve", "{f}", "--backend", "swap", "--param", "bogus=1"], "unknown parameter 'bogus'"),
        # argparse's own errors: one line too (it printed the usage block first), pointing at --help
        (["solve", "{f}", "--remove", "2.5"], "invalid int value: '2.5' (see 'qblock solve --help')"),
        (["solve", "{f}", "--bogus"],
         "qblock solve: error: unrecognized arguments: --bogus (see 'qblock solve --help')"),
        (["nosuch"], "invalid choice: 'nosuch'"),
    ],
)
def test_errors_are_one_line_and_nonzero(tmp_path, args, needle):
    f = tmp_path / "p.npz"
    qblock.random_problem(8, 2, seed=0).save(f)
    out = tmp_path / "never.json"
    r = run_cli(*[a.format(f=f) for a in args], "--json", str(out))
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0], r.stderr
    assert not out.exists()  # nothing written on failure


def test_existing_output_replaced_atomically(tmp_path):
    f = tmp_path / "p.npz"
    qblock.random_problem(10, 2, seed=0).save(f)
    out = tmp_path / "s.json"
    out.write_text("old")
    assert main(["solve", str(f), "-b", "exact", "-k", "2", "--json", str(out), "-q"]) == 0
    assert json.loads(out.read_text())["num_remove"] == 2
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_backends_command(capsys):
    assert main(["backends"]) == 0
    text = capsys.readouterr().out
    for name in ("exact", "swap", "sa", "tabu", "steepest", "qaoa", "leap-cqm"):
        assert name in text
    assert main(["backends", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["swap"]["available"] is True


def test_import_is_light():
    code = (
        "import sys, qblock, qblock.backends, qblock.problems, qblock.cli; "
        "heavy = [m for m in ('torch', 'transformers', 'qiskit', 'dwave.system', 'matplotlib') if m in sys.modules]; "
        "print(heavy)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_packages_install_under_qblock_namespace():
    import qblock.backends
    import qblock.problems

    assert qblock.backends.__name__ == "qblock.backends"
    r = subprocess.run([sys.executable, "-c", "import backends"], capture_output=True, text=True,
                       cwd=os.path.expanduser("~"))
    assert r.returncode != 0  # no generic top-level package


def test_missing_extra_error_names_install_command(monkeypatch):
    from qblock import backends
    from qblock._lazy import MissingDependencyError

    spec = backends.BackendSpec("fake-q", "nonexistent_mod:Sampler", "penalty", "fake", requires=("nonexistent_mod",), extra="qaoa")
    backends.register(spec)
    try:
        av = backends.available()["fake-q"]
        assert not av["available"] and "pip install 'qblock[qaoa]'" in av["install"]
        with pytest.raises(MissingDependencyError, match=r"qblock\[qaoa\]"):
            qblock.solve(qblock.random_problem(6, 2, seed=0), "fake-q")
    finally:
        backends._REGISTRY.pop("fake-q")
