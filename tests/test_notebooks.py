"""Execute the notebooks with small settings (QBLOCK_NB_QUICK=1) through nbclient.

01 and 03 and 04 (offline: dry run and MockDWaveSampler) run by default; 02 needs the real default
model and is marked ``real_model``. Each notebook must write at least one picture.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PNG = b"\x89PNG\r\n\x1a\n"


def _needs(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _execute(name: str, tmp_path: Path, monkeypatch, timeout: int = 120, **env: str):
    missing = _needs("nbclient", "nbformat", "ipykernel")
    assert not missing, f"notebook tests need {', '.join(missing)} (pip install 'qblock[test]')"
    import nbformat
    from nbclient import NotebookClient

    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    # committed without outputs: the repository holds code, not results
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
        f"{name} is committed with outputs; clear them"
    out = tmp_path / "out"
    monkeypatch.setenv("QBLOCK_NB_QUICK", "1")
    monkeypatch.setenv("QBLOCK_NB_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # run the kernel on this interpreter (the one with qblock installed), whatever kernelspecs exist:
    # JUPYTER_PATH is searched before the user's and the system's kernel folders
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "qblock test kernel", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    pngs = [p for p in out.rglob("*.png") if p.read_bytes()[:8] == PNG and p.stat().st_size > 2000]
    assert pngs, f"{name} drew no picture"
    return nb, out


def _text(nb) -> str:
    # a print may arrive as several stream messages ("blocks:" then " 30 -> 24"): stream text is joined
    # as written, every other output on its own line
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream":
                parts.append(o.get("text", ""))
            else:
                data = o.get("data", {})
                parts.append("\n" + str(data.get("text/plain", "")) + str(data.get("text/markdown", "")) + "\n")
        parts.append("\n")
    return "".join(parts)


def test_01_quickstart(tmp_path, monkeypatch):
    nb, out = _execute("01_quickstart.ipynb", tmp_path, monkeypatch)
    assert (out / "depth_graph.png").exists() and (out / "hessian.png").exists()
    assert "swap found" in _text(nb)


def test_03_backend_comparison(tmp_path, monkeypatch):
    nb, out = _execute("03_backend_comparison.ipynb", tmp_path, monkeypatch, timeout=180)
    assert (out / "single" / "compare.json").exists() and (out / "sweep" / "tts.png").exists()
    text = _text(nb)
    assert "certified optimum" in text
    if not _needs("qiskit", "qiskit_aer"):
        assert "| qaoa | 3 |" in text  # QAOA ran at the small N


def test_04_dwave_leap_offline(tmp_path, monkeypatch):
    missing = _needs("dwave.system", "minorminer")
    assert not missing, f"needs dwave-system and minorminer (pip install 'qblock[leap]'); missing: {missing}"
    monkeypatch.delenv("DWAVE_API_TOKEN", raising=False)
    nb, out = _execute("04_dwave_leap.ipynb", tmp_path, monkeypatch, QBLOCK_NB_LIVE="0")
    assert (out / "embedding.png").exists()
    text = _text(nb)
    assert "dry run: leap-cqm would send" in text and "live cell skipped" in text


@pytest.mark.real_model
def test_02_real_model(tmp_path, monkeypatch):
    nb, out = _execute("02_real_model.ipynb", tmp_path, monkeypatch, timeout=900)
    assert (out / "problem.npz").exists() and (out / "pruned" / "config.json").exists()
    text = _text(nb)
    assert "blocks: 30 -> 24" in text and "best baseline" in text

