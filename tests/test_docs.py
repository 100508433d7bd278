"""The documentation runs: docstring examples of the core and the README's Python quick start."""

import doctest
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PACKAGES = {"qblock": ROOT / "qblock", "qblock.backends": ROOT / "backends", "qblock.problems": ROOT / "problems"}


def package_modules() -> list[str]:
    """Every module of the package (``backends/`` and ``problems/`` install as ``qblock.backends`` and
    ``qblock.problems``), found on disk: a new module's examples run without being listed here."""
    names = []
    for pkg, folder in PACKAGES.items():
        for f in sorted(folder.rglob("*.py")):
            parts = [p for p in f.relative_to(folder).with_suffix("").parts if p != "__init__"]
            if parts[-1:] != ["__main__"]:
                names.append(".".join([pkg, *parts]))
    return names


@pytest.mark.parametrize("name", package_modules())
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    try:
        mod = importlib.import_module(name)
    except ImportError as exc:  # an optional extra that is not installed here (MissingDependencyError too)
        pytest.skip(f"{name} needs what is not installed: {exc}")
    failures, tried = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failures == 0, f"{failures} of {tried} examples of {name} failed (printed above)"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if ">>>" in p.read_text()))
def test_benchmark_docstring_examples(script, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the scripts import each other by file name
    mod = importlib.import_module(script[:-3])
    failures, tried = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert tried and failures == 0, f"{failures} of {tried} examples of benchmarks/{script} failed (printed above)"


def test_every_module_is_found():
    names = package_modules()
    for name in ("qblock", "qblock._solve", "qblock.backends.bnb", "qblock.llm.pipeline", "qblock.problems.synthetic"):
        assert name in names


SKIP = "<!-- not run by the tests"


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = []
    for m in re.finditer(r"(<!--[^\n]*-->\n)?```python\n(.*?)```", text, flags=re.S):
        if m.group(1) and m.group(1).startswith(SKIP):
            continue
        blocks.append(m.group(2))
    return blocks


def test_readme_python_blocks_run(tmp_path):
    # the README's examples build on each other, so they run as one script, in order
    blocks = readme_python_blocks()
    assert len(blocks) >= 5, "README lost its python examples"
    script = "\n".join(blocks)
    # a cache of their own: the mock QPU's example saves its run folder there, not in the user's cache
    env = dict(os.environ, MPLBACKEND="Agg", HF_HUB_OFFLINE="1", QBLOCK_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert r.returncode == 0, f"README examples failed:\n{r.stderr[-3000:]}"


def test_readme_quickstart_shell_commands(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"### Solve a problem with two backends.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    for line in block.strip().splitlines():
        cmd = line.split("#")[0].strip()
        assert cmd.startswith("qblock ")
        args = cmd.split()[1:]
        r = subprocess.run([sys.executable, "-m", "qblock", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert r.returncode == 0, f"{cmd}: {r.stderr}"
    assert (tmp_path / "swap.json").exists()


def test_readme_documents_every_backend_and_command():
    from qblock import backends
    from qblock.cli import SUBCOMMANDS

    text = (ROOT / "README.md").read_text()
    for name in backends.names():
        assert f"`{name}`" in text, f"backend {name} is not documented in README"
    for cmd in SUBCOMMANDS:
        word = {"backends_cmd": "backends", "random_problem": "random-problem"}.get(cmd, cmd)
        assert f"qblock {word}" in text, f"command qblock {word} is not documented in README"
