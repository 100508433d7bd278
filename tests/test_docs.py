"""The documentation runs: docstring examples of the core and the README's Python quick start."""

import doctest
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CORE_MODULES = [
    "qblock",
    "qblock._lazy",
    "qblock.solve",
    "qblock.testing",
    "qblock.problems.block_removal",
    "qblock.problems.synthetic",
    "qblock.backends",
    "qblock.backends.exact",
    "qblock.backends.swap",
]


@pytest.mark.parametrize("name", CORE_MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    failures, tried = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failures == 0


def test_readme_python_blocks_run(tmp_path):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert r.returncode == 0, f"README example failed:\n{code}\n{r.stderr}"


def test_readme_quickstart_shell_commands(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    for line in block.strip().splitlines():
        cmd = line.split("#")[0].strip()
        assert cmd.startswith("qblock ")
        args = cmd.split()[1:]
        r = subprocess.run([sys.executable, "-m", "qblock", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert r.returncode == 0, f"{cmd}: {r.stderr}"
    assert (tmp_path / "swap.json").exists()
