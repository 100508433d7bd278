"""qblock compare: metrics, skipping, reference fallback, and every figure recomputable from the JSON."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

import qblock
from qblock.cli import main
from qblock.compare import (
    _jsonable,
    compare_backends,
    format_markdown,
    load_result,
    reference_from_runs,
    summarize,
    tts99,
    write_outputs,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _png_ok(path) -> bool:
    data = path.read_bytes()
    return len(data) > 2000 and data[:8] == PNG


# ------------------------------------------------------------------------------ TTS99 and metrics
def test_tts99_formula_and_limits():
    assert tts99(3.0, 0.0) == math.inf
    assert tts99(3.0, 1.0) == 3.0
    assert tts99(3.0, 0.995) == 3.0  # never below one run
    assert tts99(2.0, 0.5) == pytest.approx(2.0 * math.log(0.01) / math.log(0.5))
    assert tts99(1.0, 0.1) == pytest.approx(math.log(0.01) / math.log(0.9))
    with pytest.raises(ValueError, match="p must lie"):
        tts99(1.0, 1.5)


def _hand_study(runs, backends=("a", "b"), top_k=2, repeats=4):
    return {
        "problem": {"name": "hand", "num_blocks": 4, "num_remove": 2},
        "settings": {"repeats": repeats, "seed": 0, "top_k": top_k, "time_limit": None, "params": {}},
        "tolerance": {"rtol": 1e-6, "atol": 1e-9},
        "backends": list(backends),
        "skipped": {},
        "runs": runs,
    }


def _run(backend, energies, states, t=1.0, reads=10, infeasible=0, certified=False):
    return {"backend": backend, "role": "compared", "wall_time": t, "num_reads": reads, "num_infeasible": infeasible,
            "certified_optimal": certified, "energies": energies, "states": states}


def test_summary_metrics_from_hand_made_runs():
    # best known optimum: E=1 at {0,1}; second best E=2 at {0,2}
    runs = [
        _run("a", [1.0, 2.0], [[0, 1], [0, 2]], t=1.0, reads=10, infeasible=5),
        _run("a", [2.0, 3.0], [[0, 2], [1, 2]], t=3.0, reads=10, infeasible=1),
        _run("b", [3.0], [[1, 2]], t=0.5, reads=4, infeasible=4),
        _run("b", [2.0 + 1e-3], [[2, 3]], t=0.5, reads=4, infeasible=0),
    ]
    study = _hand_study(runs)
    ref = reference_from_runs(runs, 2)
    assert ref["kind"] == "best_known" and ref["energy"] == 1.0 and ref["states"] == [[0, 1], [0, 2]]
    a, b = summarize(study)
    assert a["p_success"] == 0.5 and a["best_energy"] == 1.0 and a["gap"] == 0.0
    assert a["feasible_rate"] == pytest.approx(1 - 6 / 20)
    assert a["topk_overlap"] == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert a["time_per_run"] == 2.0
    assert a["tts99"] == pytest.approx(2.0 * math.log(0.01) / math.log(0.5))
    assert b["p_success"] == 0.0 and b["tts99"] == math.inf
    assert b["gap"] == pytest.approx(1.0 + 1e-3) and b["rel_gap"] == pytest.approx(1.0 + 1e-3)
    assert b["feasible_rate"] == 0.5 and b["topk_overlap"] == 0.0
    # a certified run defines the reference even when another backend found nothing better
    runs.append(dict(_run("a", [0.5], [[1, 3]], certified=True), role="reference"))
    assert reference_from_runs(runs, 2)["kind"] == "certified"
    assert summarize(_hand_study(runs))[0]["p_success"] == 0.0  # the reference run is not one of a's runs


# ------------------------------------------------------------------------------ the 30-block study
@pytest.fixture(scope="module")
def study30(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp30")
    prob = out / "p30.npz"
    qblock.random_problem(30, 8, seed=5).save(prob)
    code = main([
        "compare", str(prob), "--remove", "8", "--backends", "exact,swap,sa,tabu,steepest,qaoa,leap-hybrid",
        "--repeats", "2", "--top", "5", "--seed", "3", "--out", str(out / "res"), "--quiet",
        "--param", "tabu.num_reads=4", "--param", "swap.num_reads=16", "--param", "sa.num_reads=16",
    ])
    assert code == 0
    return out / "res"


def test_compare_30_blocks_writes_table_json_csv_and_plot(study30):
    for name in ("compare.json", "compare.md", "compare.csv"):
        assert (study30 / name).stat().st_size > 0
    assert _png_ok(study30 / "energies_N30_M8.png")
    res = load_result(study30 / "compare.json")
    (study,) = res["studies"]
    assert study["reference"]["kind"] == "certified"
    assert study["problem"]["num_blocks"] == 30 and study["problem"]["num_remove"] == 8
    # qaoa (30 qubits) and the cloud backend cannot run here: skipped, with the reason recorded
    assert "qaoa" in study["skipped"] and study["skipped"]["qaoa"]
    assert "leap-hybrid" in study["skipped"] and study["skipped"]["leap-hybrid"]
    seeds = {r["seed"] for r in study["runs"] if r["backend"] == "swap"}
    assert len(seeds) == 2  # distinct seeds per repeat
    md = (study30 / "compare.md").read_text()
    assert "certified optimum" in md and "skipped" in md


def test_figures_and_table_recomputed_from_json_alone(study30, tmp_path):
    """Recompute every summary number from the raw runs in the JSON, independently of qblock.compare."""
    res = json.loads((study30 / "compare.json").read_text())
    (study,) = res["studies"]
    runs = study["runs"]
    exact = [r for r in runs if r["certified_optimal"]]
    e_ref = exact[0]["energies"][0]
    ref_set = {tuple(s) for s in exact[0]["states"][:5]}
    rows = {r[0]: r for r in csv.reader((study30 / "compare.csv").read_text().splitlines())}
    header = rows.pop("problem")
    col = {h: i for i, h in enumerate(header)}
    done = 0
    for backend in ("exact", "swap", "sa", "tabu", "steepest"):
        mine = [r for r in runs if r["backend"] == backend and r["role"] == "compared"]
        assert mine, backend
        best = min(r["energies"][0] for r in mine)
        psucc = np.mean([r["energies"][0] <= e_ref + 1e-6 * abs(e_ref) + 1e-9 for r in mine])
        t = np.mean([r["wall_time"] for r in mine])
        feas = 1 - sum(r["num_infeasible"] for r in mine) / sum(r["num_reads"] for r in mine)
        overlap = np.mean([len({tuple(s) for s in r["states"]} & ref_set) / len(ref_set) for r in mine])
        tts = math.inf if psucc == 0 else (t if psucc >= 0.99 else t * math.log(0.01) / math.log(1 - psucc))
        line = next(r for r in csv.reader((study30 / "compare.csv").read_text().splitlines()) if r[col["backend"]] == backend)
        assert float(line[col["best_energy"]]) == pytest.approx(best, rel=1e-12)
        assert float(line[col["p_success"]]) == pytest.approx(psucc)
        assert float(line[col["time_per_run"]]) == pytest.approx(t)
        assert float(line[col["feasible_rate"]]) == pytest.approx(feas)
        assert float(line[col["topk_overlap"]]) == pytest.approx(overlap)
        assert float(line[col["tts99"]]) == pytest.approx(tts)
        done += 1
    assert done == 5
    # every returned state is feasible and its energy is the problem's
    prob = qblock.BlockRemovalProblem.load(study30.parent / "p30.npz").with_num_remove(8)
    for r in runs:
        for s, e in zip(r["states"], r["energies"]):
            assert len(s) == 8 and prob.energy_of(s) == pytest.approx(e, rel=1e-9, abs=1e-12)
    # the stored summary equals a recomputation, and re-rendering from the JSON gives the same files
    assert _jsonable(summarize(study)) == study["summary"]
    assert main(["compare", "--from-json", str(study30 / "compare.json"), "--out", str(tmp_path), "-q"]) == 0
    assert (tmp_path / "compare.md").read_text() == (study30 / "compare.md").read_text()
    assert (tmp_path / "compare.csv").read_text() == (study30 / "compare.csv").read_text()
    assert _png_ok(tmp_path / "energies_N30_M8.png")


# ------------------------------------------------------------------------------ sweeps, fallbacks, errors
def test_sweep_writes_tts_plot_and_reference_kinds(tmp_path):
    code = main(["compare", "--blocks", "8,12,16", "--backends", "swap,steepest", "--repeats", "2",
                 "--out", str(tmp_path), "-q", "--param", "swap.num_reads=8"])
    assert code == 0
    res = load_result(tmp_path / "compare.json")
    assert [s["problem"]["num_blocks"] for s in res["studies"]] == [8, 12, 16]
    assert [s["problem"]["num_remove"] for s in res["studies"]] == [2, 3, 4]
    # exact was not compared but ran as the certified reference (role "reference")
    assert all(s["reference"]["kind"] == "certified" for s in res["studies"])
    assert all(any(r["role"] == "reference" for r in s["runs"]) for s in res["studies"])
    assert _png_ok(tmp_path / "tts.png")
    for n, m in ((8, 2), (12, 3), (16, 4)):
        assert _png_ok(tmp_path / f"energies_N{n}_M{m}.png")
    # a one-problem comparison written into the same folder leaves none of the sweep's plots behind
    (tmp_path / "mine.png").write_bytes(b"")
    p = tmp_path / "p.npz"
    qblock.random_problem(10, 2, seed=0).save(p)
    assert main(["compare", str(p), "--backends", "swap", "--repeats", "1", "--out", str(tmp_path), "-q"]) == 0
    assert sorted(f.name for f in tmp_path.glob("*.png")) == ["energies_N10_M2.png", "mine.png"]
    # the same file twice and the same M twice are one study, not three copies of it
    again = str(p.parent / "." / p.name)  # another spelling of the same file
    assert main(["compare", str(p), again, "-M", "2,2", "--backends", "swap", "--repeats", "1", "--out",
                 str(tmp_path / "twice"), "-q"]) == 0
    assert len(json.loads((tmp_path / "twice" / "compare.json").read_text())["studies"]) == 1


def test_reference_falls_back_to_best_known_and_says_so():
    p = qblock.random_problem(12, 3, seed=1)
    # an exact solver that cannot run (here: a bad option) must not stop the study
    s = compare_backends(p, ["swap", "exact"], repeats=2, seed=0, progress=False, params={"exact": {"strategy": "nope"}})
    assert s["reference"]["kind"] == "best_known"
    assert "exact could not run" in s["reference"]["note"]
    assert "exact" in s["skipped"]
    md = format_markdown({"studies": [s]})
    assert "best known (NOT certified)" in md
    # the best known energy is swap's best, and swap's success is measured against it
    row = summarize(s)[0]
    assert row["backend"] == "swap" and row["gap"] == 0.0 and row["p_success"] > 0


def test_time_limit_stops_repeats_and_inf_is_strict_json(tmp_path):
    p = qblock.random_problem(10, 3, seed=2)
    s = compare_backends(p, ["swap"], repeats=4, seed=0, time_limit=1e-9, progress=False)
    swap_runs = [r for r in s["runs"] if r["backend"] == "swap"]
    assert len(swap_runs) == 1 and swap_runs[0]["stopped_early"]
    assert "time limit: 1 of 4 runs" in summarize(s)[0]["note"]
    # a backend that never reaches the optimum has TTS99 = inf, written as the string "inf"
    s["runs"][1]["energies"] = [e + 1.0 for e in s["runs"][1]["energies"]]
    s["summary"] = summarize(s)
    assert s["summary"][0]["tts99"] == math.inf
    res = {"format": "qblock.compare", "format_version": 1, "studies": [s]}
    write_outputs(res, tmp_path)
    text = (tmp_path / "compare.json").read_text()
    assert "Infinity" not in text and '"inf"' in text
    assert "| inf |" in (tmp_path / "compare.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--blocks", "8", "--backends", "nosuch"], "unknown backend"),
    ([], "give a problem file"),
    (["--blocks", "8,x"], "comma-separated integers"),
    (["--blocks", "8", "--repeats", "0"], "--repeats"),
    (["--blocks", "8", "--param", "num_reads=3"], "BACKEND.KEY=VALUE"),
])
def test_cli_errors_are_one_line(argv, message, capsys, tmp_path):
    assert main(["compare", *argv, "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_backend_that_returns_nothing_counts_as_never_successful():
    runs = [_run("a", [1.0], [[0, 1]]), _run("b", [], [], t=2.5)]
    a, b = summarize(_hand_study(runs, repeats=1))
    assert a["p_success"] == 1.0
    assert b["p_success"] == 0.0 and b["tts99"] == math.inf and b["time_per_run"] == 2.5
    assert "no feasible solution" in b["note"]
