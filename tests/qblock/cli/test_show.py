"""qblock show: every picture is a non-empty PNG; the removal set and the embedding are right."""

from __future__ import annotations

import itertools
import json

import pytest

import qblock
from qblock import viz
from qblock.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def _png_ok(path) -> bool:
    data = path.read_bytes()
    return len(data) > 2000 and data[:8] == PNG


@pytest.fixture(scope="module")
def problem_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("show") / "p.npz"
    qblock.random_problem(14, 4, seed=11).save(path)
    return path


def test_show_cli_writes_every_picture(problem_file, tmp_path, capsys):
    pytest.importorskip("dwave.system")
    pytest.importorskip("minorminer")
    assert main(["show", str(problem_file), "--out", str(tmp_path)]) == 0
    for name in ("hessian", "depth_graph", "block_costs", "embedding"):
        assert _png_ok(tmp_path / f"{name}.png"), name
    meta = json.loads((tmp_path / "show.json").read_text())
    # the highlighted set is the certified optimum (N=14 is small enough for exact)
    p = qblock.BlockRemovalProblem.load(problem_file)
    best = qblock.solve(p, "exact", num_solutions=1)
    assert meta["removal"]["certified"] and meta["removal"]["backend"] == "exact"
    assert meta["removal"]["removed"] == p.removed_blocks(best.first.sample)
    assert meta["removal"]["energy"] == pytest.approx(best.first.energy)
    assert len(meta["embedding"]["chain_lengths"]) == 14 and min(meta["embedding"]["chain_lengths"]) >= 1
    assert "certified optimum" in capsys.readouterr().out
    # drawn again without the embedding, the folder keeps no embedding of the earlier run
    assert main(["show", str(problem_file), "--no-embedding", "--out", str(tmp_path), "-q"]) == 0
    assert not (tmp_path / "embedding.png").exists() and "embedding" not in json.loads((tmp_path / "show.json").read_text())


def test_show_given_removal_set_and_no_embedding(problem_file, tmp_path):
    assert main(["show", str(problem_file), "-M", "3", "--removed", "0,5,13", "--no-embedding", "--out", str(tmp_path),
                 "-q"]) == 0
    meta = json.loads((tmp_path / "show.json").read_text())
    assert meta["removal"]["removed"] == [0, 5, 13] and meta["removal"]["backend"] == "given"
    assert not (tmp_path / "embedding.png").exists()
    for name in ("hessian", "depth_graph", "block_costs"):
        assert _png_ok(tmp_path / f"{name}.png")


def test_show_without_dwave_records_why(monkeypatch, tmp_path):
    monkeypatch.setattr(viz, "embedding_available", lambda: (False, "missing dwave-networkx (pip install 'qblock[leap]')"))
    p = qblock.random_problem(9, None, seed=0)  # num_remove N//4 = 2
    paths = viz.show(p, tmp_path)
    assert "embedding" not in paths
    assert "dwave-networkx" in json.loads((tmp_path / "show.json").read_text())["embedding"]["skipped"]


def test_show_problem_without_m_draws_without_highlight(tmp_path):
    p = qblock.BlockRemovalProblem([[2.0, 0.5, 0.0], [0.5, 1.0, -0.2], [0.0, -0.2, 3.0]], None, labels=["a", "b", "c"])
    paths = viz.show(p, tmp_path, embedding=False)
    assert set(paths) == {"hessian", "depth_graph", "block_costs", "json"}
    assert "removal" not in json.loads((tmp_path / "show.json").read_text())
    assert _png_ok(paths["depth_graph"])


def test_cli_show_says_when_it_draws_no_removal_set(tmp_path, capsys):
    from qblock.cli import main

    f = qblock.BlockRemovalProblem([[2.0, 0.5], [0.5, 1.0]], None).save(tmp_path / "p.npz")
    assert main(["show", str(f), "--no-embedding", "--out", str(tmp_path / "s")]) == 0
    assert "no removal set drawn: the file has no M" in capsys.readouterr().out


@pytest.mark.parametrize("topology", ["pegasus", "zephyr"])
def test_embedding_is_a_valid_clique_minor(topology):
    pytest.importorskip("dwave.system")
    pytest.importorskip("minorminer")
    p = qblock.random_problem(10, 3, seed=0)
    info = viz.embedding_for(p, topology)
    G = info.pop("_graph")
    chains = {int(k): v for k, v in info["embedding"].items()}
    assert sorted(chains) == list(range(10))
    used = [q for c in chains.values() for q in c]
    assert len(used) == len(set(used))  # chains are disjoint
    for c in chains.values():  # each chain is connected on the hardware graph
        assert G.subgraph(c).number_of_nodes() == len(c)
        import networkx as nx

        assert nx.is_connected(G.subgraph(c))
    for a, b in itertools.combinations(range(10), 2):  # every pair of blocks can couple (dense H)
        assert any(G.has_edge(u, v) for u in chains[a] for v in chains[b]), (a, b)
    assert info["chain_lengths"] == [len(chains[i]) for i in range(10)]


def test_show_errors(problem_file, tmp_path, capsys):
    assert main(["show", str(problem_file), "--removed", "1,99", "--out", str(tmp_path / "o")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["show", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["show", str(problem_file), "--removed", "a,b", "--out", str(tmp_path / "o")]) == 2
