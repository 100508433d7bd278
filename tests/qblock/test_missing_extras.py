"""A core-only install (no extras): every command that needs an extra ends in one line naming it.

The extras are hidden from a fresh interpreter by ``sys.modules[name] = None`` (import then raises
ImportError as if the package were absent); the core's own dependencies stay importable.
"""

import os
import subprocess
import sys

import pytest

from qblock._lazy import MODULE_EXTRAS, MissingDependencyError, as_missing_dependency

from conftest import ROOT  # noqa: E402  (the repository root)

CORE_ONLY = (
    "import sys\n"
    "for m in {hidden!r}:\n"
    "    sys.modules[m] = None\n"
    "from qblock.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def run_core_only(args, cwd):
    code = CORE_ONLY.format(hidden=sorted(MODULE_EXTRAS))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    from qblock.problems.synthetic import random_problem

    path = tmp_path_factory.mktemp("core") / "p.npz"
    random_problem(6, 2, seed=0).save(path)
    return path


@pytest.mark.parametrize("args, extra", [
    (["solve", "{p}", "-b", "dwave-qpu"], "leap"),
    (["show", "{p}"], "viz"),
    (["compare", "{p}", "--backends", "exact", "--repeats", "1", "--out", "cmp"], "viz"),
    (["extract", "--out", "x.npz"], "llm"),
    (["prune", "--remove", "1", "--out", "pruned"], "llm"),
    (["heal", "pruned", "--out", "healed"], "llm"),
])
def test_core_only_command_ends_in_one_install_line(problem, tmp_path, args, extra):
    r = run_core_only([a.format(p=problem) for a in args], tmp_path)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert err and err[-1].startswith("qblock: error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert f"pip install 'qblock[{extra}]'" in err[-1]


def test_import_errors_map_to_their_extra_only_for_optional_modules():
    e = as_missing_dependency(ModuleNotFoundError("No module named 'matplotlib.colors'", name="matplotlib.colors"))
    assert isinstance(e, MissingDependencyError) and "qblock[viz]" in str(e) and "\n" not in str(e)
    # a core dependency or qblock itself missing is a broken install / a bug: not disguised as an extra
    for name in ("numpy", "dimod", "dwave.samplers", "qblock.nope", None):
        assert as_missing_dependency(ModuleNotFoundError("x", name=name)) is None
