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

CORE_MODULES = [
    "qblock",
    "qblock._lazy",
    "qblock._io",
    "qblock._solve",
    "qblock.testing",
    "qblock.problems.block_removal",
    "qblock.problems.synthetic",
    "qblock.problems.rank_selection",
    "qblock.backends.knapsack",
    "qblock.backends",
    "qblock.backends.exact",
    "qblock.backends.swap",
    "qblock.select",
    "qblock._threads",
    "qblock.executor",
]


@pytest.mark.parametrize("name", CORE_MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    failures, tried = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failures == 0


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
    env = dict(os.environ, MPLBACKEND="Agg", HF_HUB_OFFLINE="1")
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
