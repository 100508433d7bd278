"""Statistics and table files of the validator: everything reported is recomputable from the table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy")
from scipy import stats as sst  # noqa: E402

from qblock.validate import report, stats  # noqa: E402


def _table(seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = [{"num_remove": 0, "method": "full", "rank": None, "seed": None, "removed": [], "energy": 0.0,
             "heldout_loss": 2.0, "perplexity": math.exp(2.0)}]
    for m in (2, 3):
        for k in range(1, 7):
            e = 0.1 * k + 0.01 * m
            loss = 2.5 + 0.05 * k + rng.normal(0, 0.1) + 0.1 * m
            rows.append({"num_remove": m, "method": "qubo", "rank": k, "seed": None,
                         "removed": sorted(rng.choice(10, m, replace=False).tolist()), "energy": e,
                         "heldout_loss": loss, "perplexity": math.exp(loss), "energy_fisher_grad": -e + rng.normal(0, 0.1)})
        for meth, e, loss in (("shortgpt", 0.9, 3.1), ("sleb", 0.5, 2.62 + 0.1 * m), ("angular", 1.2, 3.3)):
            rows.append({"num_remove": m, "method": meth, "rank": None, "seed": None,
                         "removed": list(range(m)), "energy": e, "heldout_loss": loss, "perplexity": math.exp(loss)})
        rows.append({"num_remove": m, "method": "random", "rank": None, "seed": 4, "removed": [7, 8, 9][:m],
                     "energy": 2.0, "heldout_loss": 4.0, "perplexity": math.exp(4.0)})
    return rows


def test_roundtrip_csv_and_json_exact(tmp_path):
    rows = _table()
    paths = report.write_table(rows, tmp_path)
    for key in ("csv", "json"):
        back = report.read_table(paths[key])
        assert len(back) == len(rows)
        for a, b in zip(rows, back):
            for k, v in a.items():
                assert b[k] == v, (key, k)
    assert "| M |" in paths["md"].read_text()


def test_summary_recomputed_from_written_table(tmp_path):
    rows = _table()
    s = stats.summarize(rows, n_boot=300, seed=1)
    report.write_table(rows, tmp_path)
    back = report.read_table(tmp_path / "candidates.csv")
    assert stats.summarize(back, n_boot=300, seed=1) == s


def test_correlations_match_scipy_over_distinct_candidates():
    rows = _table()
    # the SLEB set [0, 1] duplicates the ShortGPT set: a distinct candidate is counted once (first row)
    c = stats.correlations(rows, 2, n_boot=200, seed=0)["energy"]
    cands = stats.unique_candidates(rows, 2)
    assert c["n"] == len(cands) == 6 + 1 + 1  # six QUBO states, one baseline set, one random set
    x = [r["energy"] for r in cands]
    y = [r["heldout_loss"] for r in cands]
    assert c["spearman"] == pytest.approx(sst.spearmanr(x, y).statistic)
    assert c["kendall"] == pytest.approx(sst.kendalltau(x, y).statistic)
    lo, hi = c["spearman_ci"]
    assert -1 <= lo <= hi <= 1 and lo < hi
    assert c["n_boot_used"] <= 200
    # seeded: the same interval twice, another seed another interval
    assert stats.correlations(rows, 2, n_boot=200, seed=0)["energy"] == c
    assert stats.correlations(rows, 2, n_boot=200, seed=5)["energy"]["spearman_ci"] != c["spearman_ci"]
    # an extra energy column is correlated on the rows that have it
    assert stats.correlations(rows, 2, n_boot=50)["energy_fisher_grad"]["n"] == 6


def test_best_vs_baseline_statement():
    rows = _table()
    b = stats.best_vs_baseline(rows, 3)
    q = min((r for r in rows if r["num_remove"] == 3 and r["method"] == "qubo"), key=lambda r: r["heldout_loss"])
    base = min((r for r in rows if r["num_remove"] == 3 and stats.is_baseline(r["method"])),
               key=lambda r: r["heldout_loss"])
    assert b["best_qubo"]["heldout_loss"] == q["heldout_loss"]
    assert b["best_baseline"]["method"] == base["method"] == "sleb"
    assert b["margin_loss"] == pytest.approx(base["heldout_loss"] - q["heldout_loss"])
    assert b["ppl_ratio"] == pytest.approx(math.exp(b["margin_loss"]))
    word = "beats the best baseline" if b["margin_loss"] > 0 else "beats the best QUBO candidate"
    assert word in b["statement"] and b["statement"].startswith("M=3: best on held-out data is ")
    # a baseline that wins is reported as winning
    rows2 = [dict(r) for r in rows]
    for r in rows2:
        if r["method"] == "shortgpt" and r["num_remove"] == 3:
            r["heldout_loss"] = 1.0
    b2 = stats.best_vs_baseline(rows2, 3)
    assert b2["best"]["method"] == "shortgpt" and b2["margin_loss"] < 0
    assert "the best baseline (shortgpt removing [0,1,2]) beats the best QUBO candidate" in b2["statement"]


def test_recommended_margin_has_a_paired_standard_error_from_per_sample_losses(tmp_path):
    """With per-sample held-out losses in the rows, the recommended set's margin over the best baseline
    says whether it is more than twice its paired standard error, and survives the CSV round trip."""
    def rows(noise):
        base = [3.0 + 0.1 * k for k in range(12)]
        ours = [v - 0.02 + noise * (-1) ** k for k, v in enumerate(base)]
        toks = [127] * 12
        return [{"num_remove": 2, "method": "qblock", "rank": None, "seed": None, "removed": [1, 2], "energy": 0.1,
                 "heldout_loss": sum(ours) / 12, "perplexity": 1.0, "heldout_sample_losses": ours,
                 "heldout_sample_tokens": toks},
                {"num_remove": 2, "method": "sleb", "rank": None, "seed": None, "removed": [2, 3], "energy": 0.2,
                 "heldout_loss": sum(base) / 12, "perplexity": 1.0, "heldout_sample_losses": base,
                 "heldout_sample_tokens": toks}]
    sure, noisy = stats.best_vs_baseline(rows(0.001), 2), stats.best_vs_baseline(rows(0.1), 2)
    assert sure["recommended_margin_loss"] == pytest.approx(0.02)
    assert sure["recommended_margin_samples"] == 12 and sure["recommended_margin_se"] < 0.001
    assert "beats the best baseline" in sure["statement"] and "more than twice the paired standard error" in sure["statement"]
    assert noisy["recommended_margin_se"] > 0.02 and "not resolved" in noisy["statement"]
    report.write_table(rows(0.1), tmp_path)
    back = report.read_table(tmp_path / "candidates.csv")
    assert back[0]["heldout_sample_losses"] == rows(0.1)[0]["heldout_sample_losses"]
    assert back[0]["heldout_sample_tokens"] == rows(0.1)[0]["heldout_sample_tokens"]
    assert stats.best_vs_baseline(back, 2) == noisy
    # the same set, or no per-sample losses: no standard error, the statement as before
    plain = [{k: v for k, v in r.items() if k != "heldout_sample_tokens"} for r in rows(0.1)]
    assert stats.best_vs_baseline(plain, 2)["recommended_margin_se"] is None
    assert "standard error" not in stats.best_vs_baseline(plain, 2)["statement"]


def test_recommended_carries_the_runner_up_and_survives_the_csv(tmp_path):
    row = {"num_remove": 2, "method": "qblock", "rank": None, "seed": None, "removed": [4, 1], "energy": 0.1,
           "heldout_loss": 3.0, "perplexity": 20.0, "calib_loss": 2.9, "confirm_loss": 2.95, "confirm_samples": 16,
           "cost_forward_tokens": 1000, "runner_up": [2, 1], "runner_up_margin": 0.03, "runner_up_margin_se": 0.02,
           "runner_up_samples": 16}
    other = dict(row, method="sleb", removed=[2, 3], runner_up=None, runner_up_margin=None, runner_up_margin_se=None,
                 runner_up_samples=None)
    up = stats.recommended([row, other])["2"]["runner_up"]
    # 2 x 0.02 against 0.03 on 16 samples: (0.04 / 0.03)^2 x 16 = 28.4 samples would resolve a margin that size
    assert up == {"removed": [1, 2], "calibration_margin": 0.03, "calibration_margin_se": 0.02, "resolved": False,
                  "samples": 16, "samples_to_resolve": 29}
    resolved = stats.recommended([dict(row, runner_up_margin_se=0.01)])["2"]["runner_up"]
    assert resolved["resolved"] is True and resolved["samples_to_resolve"] is None
    older = stats.recommended([dict(row, runner_up_samples=None)])["2"]["runner_up"]  # a report from before the count
    assert older["samples"] is None and older["samples_to_resolve"] is None
    assert stats.recommended([dict(row, runner_up=None)])["2"]["runner_up"] is None
    report.write_table([row, other], tmp_path)
    back = report.read_table(tmp_path / "candidates.csv")
    assert back[1]["runner_up"] is None and stats.recommended(back) == stats.recommended([row, other])
    text = report.render_report([row, other], stats.summarize([row, other], n_boot=50))
    assert "| 1,2: +0.0300 ± 0.0200, not resolved (about 29 samples would) |" in text


def test_paired_difference_weighted_by_tokens_is_the_margin_of_token_weighted_losses():
    rng = np.random.default_rng(0)
    toks = rng.integers(2, 200, 20).tolist()
    a, b = rng.normal(4, 0.3, 20).tolist(), rng.normal(4, 0.3, 20).tolist()
    weighted = lambda xs: sum(x * t for x, t in zip(xs, toks)) / sum(toks)  # noqa: E731  (heldout_loss's mean)
    r = stats.paired_difference(a, b, weights=toks)
    assert r["diff"] == pytest.approx(weighted(a) - weighted(b)) and r["n"] == 20 and 0 < r["se"] < 1
    same = stats.paired_difference(a, b, weights=[7] * 20)  # equal weights: the plain standard error of the mean
    d = np.subtract(a, b)
    assert same["diff"] == pytest.approx(d.mean()) and same["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(20))
    with pytest.raises(ValueError):
        stats.paired_difference([1.0], [2.0, 3.0])


def test_degenerate_inputs():
    assert stats.rank_correlation([1, 2], [3, 4])["spearman"] is None
    assert stats.rank_correlation([1, 1, 1], [1, 2, 3])["kendall"] is None
    rows = [{"num_remove": 1, "method": "qubo", "rank": 1, "removed": [0], "energy": 0.0, "heldout_loss": None}]
    s = stats.summarize(rows, n_boot=10)
    assert s["per_m"]["1"]["num_candidates"] == 0
    assert "no evaluated candidates" in s["per_m"]["1"]["best"]["statement"]
    assert stats.parse_removed("3 4 5") == stats.parse_removed("[3, 4, 5]") == [3, 4, 5]
    assert stats.parse_removed("") == []


def test_report_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from qblock.validate import plots

    rows = _table()
    s = stats.summarize(rows, n_boot=100)
    ps = plots.plot_energy_vs_loss(rows, tmp_path) + [plots.plot_loss_vs_m(rows, tmp_path)]
    assert sorted(p.split("/")[-1] for p in ps) == ["energy_vs_loss_M2.png", "energy_vs_loss_M3.png", "loss_vs_m.png"]
    for p in ps:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = report.render_report(rows, s, settings={"model": "toy"}, plots=ps)
    assert "## Remove M = 2 blocks" in md and "## Remove M = 3 blocks" in md
    assert s["per_m"]["3"]["best"]["statement"] in md
    assert "QUBO #1" in md and "sleb" in md and "random s4" in md
    json.dumps(s)  # JSON-ready


def test_a_report_written_again_leaves_no_plot_of_the_earlier_one(tmp_path):
    """Written again into the same folder for fewer M and without an energy model, the folder shows the new
    report only; files qblock does not name are kept."""
    pytest.importorskip("matplotlib")
    from qblock.validate.runner import _write_tables_and_plots

    rows = [dict(r, energy_fisher_grad=r.get("energy")) for r in _table()]
    _write_tables_and_plots(rows, [2, 3], {"fisher+grad": None}, tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    assert (tmp_path / "energy_models" / "fisher_grad" / "energy_vs_loss_M3.png").is_file()
    again = [r for r in rows if int(r["num_remove"]) in (0, 2)]
    _, written = _write_tables_and_plots(again, [2], {}, tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.suffix in (".png", ".txt"))
    assert left == ["energy_vs_loss_M2.png", "notes.txt"] == sorted(
        [Path(p).name for p in written] + ["notes.txt"])
    assert not (tmp_path / "energy_models").exists()


@pytest.mark.parametrize("name", ["qblock.validate", "qblock.validate.stats", "qblock.validate.report",
                                  "qblock.validate.plots", "qblock.validate.evaluate",
                                  "qblock.validate.baselines", "qblock.validate.runner"])
def test_docstring_examples(name):
    import doctest
    import importlib

    if name in ("qblock.validate.evaluate", "qblock.validate.baselines", "qblock.validate.runner"):
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
    mod = importlib.import_module(name)
    failures, tried = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failures == 0 and tried > 0


def test_machine_load_reads_the_cores_now_not_the_lagging_average(monkeypatch):
    """A finished job's load average lingers and a new one's shows late; /proc/stat says what runs now."""
    import os

    from qblock.validate import runner

    monkeypatch.setattr(os, "getloadavg", lambda: (0.7, 0.9, 0.9))
    ticks = iter([(100, 200), (190, 300)])  # 90 of 100 jiffies idle: 0.2 of 2 cores busy
    monkeypatch.setattr(runner, "_cpu_times", lambda: next(ticks))
    assert runner.machine_load(2, interval=0) == pytest.approx(0.2)
    assert runner.auto_threads(2, 0.2) == 2

    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.1, 0.1))
    ticks = iter([(100, 200), (150, 300)])  # half idle: one of 2 cores busy (a job that just started)
    monkeypatch.setattr(runner, "_cpu_times", lambda: next(ticks))
    assert runner.machine_load(2, interval=0) == pytest.approx(1.0)
    assert runner.auto_threads(2, 1.0) == 1

    def missing():
        raise OSError("no /proc/stat")

    monkeypatch.setattr(runner, "_cpu_times", missing)
    assert runner.machine_load(2, interval=0) == 0.3  # the load average, where nothing better exists
