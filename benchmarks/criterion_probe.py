"""Which calibration criterion ranks removal sets as held-out loss does, on how few samples?

qblock chooses removal sets by their next-token NLL on calibration samples. A lower-variance criterion is
``KL(full model || pruned model)`` per predicted token: the expected excess NLL if the text followed the
full model, averaged over the whole vocabulary instead of read off one token (EvoPress searches on it).
It is biased wherever the full model is wrong about the text. This measures both on the same samples.

The sets are the competitive ones qblock and the baselines produced: every set in the given reports'
``candidates.csv`` except the full model, random sets and the Fisher QUBO's states, plus ``--neighbours``
random one-swap neighbours of them per M (the near ties a final choice has to break). Each set is measured
once, per sample, on ``--calib-samples`` calibration samples (NLL and KL) and ``--heldout-samples``
held-out samples (NLL: the truth), split with ``--split-seed`` (a split no report used). From random
subsets of n calibration samples it reports, per M and n, for each criterion: Spearman with held-out loss
over the sets, the held-out regret of the set the criterion ranks first (its held-out loss minus the
lowest held-out loss, itself a noisy minimum over many sets), and the share of the pairs that held-out data
resolve (more than two standard errors apart) which the criterion orders the same way. A last table is a
simplified version of qblock's two stages (the top 6 only; no one-pass sets, no race): the 6 best sets by the
criterion on ``--loop-samples`` samples (the loop), then the lowest NLL among them on ``--confirm-samples``
others (the confirmation); beside it, what choosing by held-out loss itself on as many held-out samples
regrets, judged on the other held-out samples: the noise a choice on that many samples cannot avoid.

    python benchmarks/criterion_probe.py benchmarks/results/quick_default_seed* --out benchmarks/results/criterion_probe_default
    python benchmarks/criterion_probe.py benchmarks/results/quick_gemma3-270m_seed* --model gemma3-270m \\
        --out benchmarks/results/criterion_probe_gemma3-270m

Writes ``STEM.npz`` (per-sample losses ``nll_calib``, ``kl_calib``, ``nll_heldout``, sets x samples; ``sets``,
``methods``, ``settings`` as JSON text: all ``--reanalyse STEM`` needs to recompute the tables without the
model, e.g. with other ``--draws``, ``--loop-samples`` or ``--confirm-samples``), ``STEM.json`` (settings,
per-set means, tables) and ``STEM.md``; an existing STEM is not overwritten (except by ``--reanalyse``).
Cost: one forward pass per set over every sample, bf16, on 2 cores with native bf16 and 64 + 128 samples:
about 10 s per set for SmolLM2-135M (17 min for its 100 sets), 20-40 s for Gemma-3-270M, whose 262k-token
vocabulary dominates (about 35 min for its 73).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

SUBSETS = (4, 8, 16, 24, 32)
SKIPPED = ("full", "random", "qubo")  # the full model, random sets, the Fisher QUBO's states
ANALYSIS = {"draws": 300, "loop_samples": 8, "confirm_samples": 24}  # defaults of the options --reanalyse may change


def report_sets(folders: list[Path]) -> dict[int, dict[tuple[int, ...], str]]:
    """``{M: {set: method}}`` of every competitive set in the reports (the first method seen names it)."""
    out: dict[int, dict[tuple[int, ...], str]] = {}
    for folder in folders:
        with open(folder / "candidates.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                if row["method"] in SKIPPED or not row["removed"].strip():
                    continue
                key = tuple(sorted(int(x) for x in row["removed"].split()))
                out.setdefault(len(key), {}).setdefault(key, row["method"])
    return out


def add_neighbours(sets: dict[int, dict[tuple[int, ...], str]], num_blocks: int, count: int, seed: int) -> None:
    """Add ``count`` random one-swap neighbours of the sets per M (labelled ``neighbour``), in place.

    Example:
        >>> s = {2: {(0, 1): "sleb"}}
        >>> add_neighbours(s, 4, 3, seed=0)
        >>> sorted(s[2].values()), all(len(set(k) & {0, 1}) == 1 for k in s[2] if k != (0, 1))
        (['neighbour', 'neighbour', 'neighbour', 'sleb'], True)
    """
    rng = np.random.default_rng(seed)
    for m, found in sets.items():
        base, added, tries = sorted(found), 0, 0
        while added < count and tries < 100 * count:
            tries += 1
            s = list(base[rng.integers(len(base))])
            s[rng.integers(m)] = int(rng.choice([b for b in range(num_blocks) if b not in s]))
            key = tuple(sorted(s))
            if key not in found:
                found[key], added = "neighbour", added + 1


def measure(model, samples, teacher: list | None = None, keep: bool = False, batch_size: int = 8):
    """Per-sample mean NLL and (with ``teacher``) mean ``KL(teacher || model)``; ``keep``: also return the
    model's log-probabilities per batch in bf16 (the teacher of later calls)."""
    import torch

    nll, kl, logps = [], [], []
    with torch.inference_mode():
        for j in range(0, len(samples), batch_size):
            ids = torch.stack(samples[j: j + batch_size])
            lp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
            nll.append(-lp.gather(-1, ids[:, 1:, None])[..., 0].mean(1))
            if keep:
                logps.append(lp.to(torch.bfloat16))
            if teacher is not None:
                t = teacher[j // batch_size].float()
                kl.append((t.exp() * (t - lp)).sum(-1).mean(1))
    return (torch.cat(nll).double().numpy(), torch.cat(kl).double().numpy() if kl else None, logps)


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


def resolved_pairs(heldout: np.ndarray) -> list[tuple[int, int, float]]:
    """Pairs of rows whose per-sample held-out difference is resolved (more than two standard errors from 0,
    qblock's one rule: :func:`qblock.validate.stats.paired_difference`), with the sign of ``row a - row b``.

    Example:
        >>> resolved_pairs(np.array([[1.0, 1.1, 0.9], [2.0, 2.2, 1.9], [2.0, 1.0, 1.5]]))
        [(0, 1, -1.0)]
    """
    from qblock.validate.stats import _resolved, paired_difference

    out = []
    for a in range(len(heldout)):
        for b in range(a + 1, len(heldout)):
            d = paired_difference(heldout[a], heldout[b])
            if _resolved(d["diff"], d["se"]):
                out.append((a, b, float(np.sign(d["diff"]))))
    return out


def ranking_table(crit: dict[str, np.ndarray], heldout: np.ndarray, draws: int, seed: int) -> list[dict]:
    """For each n in :data:`SUBSETS` (below the sample count) and all samples: each criterion's mean Spearman,
    first-ranked regret and resolved-pair agreement over ``draws`` random subsets of n samples.

    Example:
        >>> heldout = np.array([[1.0, 1.2], [2.0, 2.1], [3.0, 2.9]])  # 3 sets x 2 held-out samples
        >>> calib = np.repeat([[1.0], [2.0], [3.0]], 5, axis=1)  # ranks them as held-out data do
        >>> [(r["n"], r["nll_spearman"], r["nll_regret"], r["nll_agreement"])
        ...  for r in ranking_table({"nll": calib}, heldout, draws=2, seed=0)]
        [(4, 1.0, 0.0, 1.0), (5, 1.0, 0.0, 1.0)]
    """
    rng = np.random.default_rng(seed)
    truth, pairs = heldout.mean(1), resolved_pairs(heldout)
    n_all = next(iter(crit.values())).shape[1]
    rows = []
    for n in [k for k in SUBSETS if k < n_all] + [n_all]:
        acc = {name: ([], [], []) for name in crit}
        for _ in range(draws if n < n_all else 1):
            sub = rng.choice(n_all, n, replace=False)
            for name, x in crit.items():
                c = x[:, sub].mean(1)
                acc[name][0].append(_spearman(c, truth))
                acc[name][1].append(truth[np.argmin(c)] - truth.min())
                if pairs:
                    acc[name][2].append(np.mean([np.sign(c[a] - c[b]) == s for a, b, s in pairs]))
        rows.append({"n": n, "pairs": len(pairs), **{
            f"{name}_{what}": (float(np.mean(v)) if v else None)
            for name, vals in acc.items() for what, v in zip(("spearman", "regret", "agreement"), vals)}})
    return rows


def two_stage(crit: dict[str, np.ndarray], heldout: np.ndarray, loop: int, confirm: int, top: int,
              draws: int, seed: int) -> dict:
    """qblock's two stages on random disjoint draws: the ``top`` best by each criterion on ``loop`` samples,
    then the lowest NLL among them on ``confirm`` others; mean held-out regret of the best set among the
    finalists and of the one chosen; ``heldout_floor``: the regret of choosing by held-out loss on ``confirm``
    held-out samples, judged on the other held-out samples (what noise alone costs a choice on that many)."""
    rng = np.random.default_rng(seed)
    truth = heldout.mean(1)
    n_all = crit["nll"].shape[1]
    out = {name: {"finalists": [], "chosen": []} for name in crit}
    for _ in range(draws):
        perm = rng.permutation(n_all)
        first, then = perm[:loop], perm[loop: loop + confirm]
        for name, x in crit.items():
            fin = np.argsort(x[:, first].mean(1), kind="stable")[:top]
            out[name]["finalists"].append(truth[fin].min() - truth.min())
            out[name]["chosen"].append(truth[fin[np.argmin(crit["nll"][fin][:, then].mean(1))]] - truth.min())
    floor = []  # the truth's own noise: choose on `confirm` held-out samples, judge on the others
    for _ in range(draws):
        perm = rng.permutation(heldout.shape[1])
        a, b = perm[:confirm], perm[confirm:]
        judged = heldout[:, b].mean(1)
        floor.append(judged[np.argmin(heldout[:, a].mean(1))] - judged.min())
    return {**{name: {k: float(np.mean(v)) for k, v in d.items()} for name, d in out.items()},
            "heldout_floor": float(np.mean(floor))}


def shift_check(calib: np.ndarray, heldout: np.ndarray) -> dict:
    """Do calibration and held-out samples order the sets alike, up to their noise?

    For every pair of sets: ``z`` = (calibration difference - held-out difference) / the standard error of
    that gap (the two paired standard errors of :func:`qblock.validate.stats.paired_difference` in
    quadrature). If both kinds of samples come from one distribution, each ``z`` is about standard normal:
    its standard deviation near 1 and about 5 % beyond 2. Far more would mean the calibration text misleads
    (a shift no number of its samples cures), not noise. The pairs share sets, so they are not independent.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> base = np.array([[0.0], [0.2], [0.4], [0.6]])
        >>> r = shift_check(base + rng.normal(size=(4, 400)), base + rng.normal(size=(4, 400)))
        >>> r["pairs"], r["z_sd"] < 2, r["worst"]["sets"] in ([0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3])
        (6, True, True)
        >>> shifted = base[::-1] + rng.normal(size=(4, 400))  # held-out samples order them the other way
        >>> shift_check(base + rng.normal(size=(4, 400)), shifted)["beyond_3"]
        1.0
    """
    from qblock.validate.stats import paired_difference

    zs, worst = [], None
    for a in range(len(calib)):
        for b in range(a + 1, len(calib)):
            c, h = paired_difference(calib[a], calib[b]), paired_difference(heldout[a], heldout[b])
            se = float(np.hypot(c["se"], h["se"]))
            if se > 0:
                z = (c["diff"] - h["diff"]) / se
                zs.append(z)
                if worst is None or abs(z) > abs(worst["z"]):
                    worst = {"sets": [a, b], "z": z, "calib_diff": c["diff"], "heldout_diff": h["diff"]}
    z = np.asarray(zs)
    return {"pairs": len(z), "z_sd": float(z.std()) if len(z) else None,
            "beyond_2": float(np.mean(np.abs(z) > 2)) if len(z) else None,
            "beyond_3": float(np.mean(np.abs(z) > 3)) if len(z) else None, "worst": worst}


def analyse(settings: dict, num_blocks: int, sets: list[tuple[int, ...]], methods: list[str],
            nll_c: np.ndarray, kl_c: np.ndarray, nll_h: np.ndarray) -> dict:
    """The result (settings, each set's means, the tables per M) from the per-sample losses (sets x samples)."""
    result = {"settings": settings, "num_blocks": num_blocks, "per_m": {}}
    for m in sorted({len(k) for k in sets}):
        rows = [i for i, k in enumerate(sets) if len(k) == m]
        crit = {"nll": nll_c[rows], "kl": kl_c[rows]}
        result["per_m"][str(m)] = {
            "sets": [{"removed": list(sets[i]), "method": methods[i], "calib_nll": float(nll_c[i].mean()),
                      "calib_kl": float(kl_c[i].mean()), "heldout_nll": float(nll_h[i].mean())} for i in rows],
            "ranking": ranking_table(crit, nll_h[rows], settings["draws"], seed=m),
            "two_stage": two_stage(crit, nll_h[rows], settings["loop_samples"], settings["confirm_samples"], 6,
                                   settings["draws"], seed=m),
            "shift": shift_check(nll_c[rows], nll_h[rows])}
        worst = result["per_m"][str(m)]["shift"]["worst"]
        if worst is not None:  # row numbers within this M -> the sets themselves
            worst["sets"] = [list(sets[rows[i]]) for i in worst["sets"]]
    return result


def _file(stem: Path, ext: str) -> Path:
    return stem.parent / (stem.name + ext)  # not with_suffix: a stem may hold a dot


def reanalyse(stem: Path, changes: dict) -> dict:
    """The result again from a probe's ``STEM.npz`` alone (no model), with ``changes`` to the analysis settings."""
    arrays = np.load(_file(stem, ".npz"))
    settings = json.loads(str(arrays["settings"])) | changes
    sets = [tuple(int(b) for b in k.split()) for k in arrays["sets"]]
    return analyse(settings, int(arrays["num_blocks"]), sets, [str(m) for m in arrays["methods"]],
                   arrays["nll_calib"], arrays["kl_calib"], arrays["nll_heldout"])


def _check(args) -> str | None:
    """What is wrong with the command line, in one line (None: nothing)."""
    given = {k: getattr(args, k) for k in ANALYSIS if getattr(args, k) is not None}
    if any(v < 1 for v in given.values()):
        return "--draws, --loop-samples and --confirm-samples must be at least 1"
    if args.reanalyse is not None:
        if args.reports or args.out:
            return "--reanalyse takes no report folders and no --out"
        if not _file(args.reanalyse, ".npz").is_file():
            return f"--reanalyse: no {_file(args.reanalyse, '.npz')}"
        return None
    if not args.reports or args.out is None:
        return "give report folders and --out (or --reanalyse STEM)"
    missing = [str(f) for f in args.reports if not (f / "candidates.csv").is_file()]
    if missing:
        return f"no candidates.csv in {', '.join(missing)}"
    other = sorted({s for f in args.reports if (s := _report_model(f)) not in (None, args.model)})
    if other:
        return f"the reports are of {', '.join(other)}, not --model {args.model}"
    existing = [str(f) for f in (_file(args.out, x) for x in (".npz", ".json", ".md")) if f.exists()]
    if existing:
        return f"--out {args.out}: {existing[0]} exists (choose another stem)"
    if not args.out.parent.is_dir():
        return f"--out {args.out}: no folder {args.out.parent}"
    a = ANALYSIS | given
    if a["loop_samples"] + a["confirm_samples"] > args.calib_samples or a["confirm_samples"] >= args.heldout_samples:
        return ("--loop-samples + --confirm-samples must not exceed --calib-samples, and --confirm-samples must be "
                "below --heldout-samples")
    return None


def _report_model(folder: Path) -> str | None:
    """The model spec a report was run with (None where its summary does not say)."""
    try:
        return json.loads((folder / "summary.json").read_text())["problem"]["model"]["spec"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="*", type=Path, help="qblock run output folders (their candidates.csv)")
    p.add_argument("--model", default="default")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--heldout-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--split-seed", type=int, default=11, help="seed of the calibration/held-out split")
    p.add_argument("--neighbours", type=int, default=6, help="random one-swap neighbours added per M")
    p.add_argument("--draws", type=int, default=None, help=f"random sample subsets per n (default {ANALYSIS['draws']})")
    p.add_argument("--loop-samples", type=int, default=None, help=f"default {ANALYSIS['loop_samples']}")
    p.add_argument("--confirm-samples", type=int, default=None, help=f"default {ANALYSIS['confirm_samples']}")
    p.add_argument("--out", type=Path, help="output stem (STEM.npz, STEM.json, STEM.md; an existing one is refused)")
    p.add_argument("--reanalyse", type=Path, metavar="STEM",
                   help="recompute the tables of an earlier probe from its STEM.npz (no model; rewrites STEM.json "
                        "and STEM.md)")
    args = p.parse_args(argv)
    problem = _check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    changes = {k: getattr(args, k) for k in ANALYSIS if getattr(args, k) is not None}
    if args.reanalyse is not None:
        return _write(args.reanalyse, reanalyse(args.reanalyse, changes))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("reports", "reanalyse", *ANALYSIS)} | ANALYSIS | changes
    settings["reports"] = [str(f) for f in args.reports]
    sets = report_sets(args.reports)
    if not sets:
        print("error: the reports hold no set to compare", file=sys.stderr)
        return 2
    keys, n_blocks, losses = _measure_all(args, sets)
    methods = [sets[len(k)][k] for k in keys]
    np.savez(_file(args.out, ".npz"), **losses, sets=np.array([" ".join(map(str, k)) for k in keys]),
             methods=np.array(methods), settings=np.array(json.dumps(settings)), num_blocks=np.array(n_blocks))
    return _write(args.out, analyse(settings, n_blocks, keys, methods, losses["nll_calib"], losses["kl_calib"],
                                    losses["nll_heldout"]))


def _measure_all(args, sets: dict) -> tuple[list[tuple[int, ...]], int, dict[str, np.ndarray]]:
    """Load the model, add the neighbours, measure every set: ``(sets in order, N, per-sample losses)``."""
    import torch
    from tqdm.auto import tqdm

    from qblock.llm.blocks import find_blocks
    from qblock.llm.data import calibration_and_eval
    from qblock.llm.gates import mask_blocks
    from qblock.llm.models import cast_for_eval, load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model, quiet=True)
    model = cast_for_eval(model.eval(), torch.bfloat16)
    n_blocks = len(find_blocks(model))
    if any(b >= n_blocks for found in sets.values() for k in found for b in k):
        raise SystemExit(f"error: the reports remove blocks the model ({n_blocks} blocks) does not have")
    calib, heldout, _ = calibration_and_eval(tok, num_calib=args.calib_samples, num_eval=args.heldout_samples,
                                             seq_len=args.seq_len, seed=args.split_seed)
    add_neighbours(sets, n_blocks, args.neighbours, seed=args.split_seed)
    keys = [k for m in sorted(sets) for k in sorted(sets[m])]
    _, _, teacher = measure(model, calib, keep=True)  # the full model: the teacher of the KL
    nll_c, kl_c, nll_h = [], [], []
    for k in tqdm(keys, desc="sets", unit="set"):
        with mask_blocks(model, k):
            c, kl, _ = measure(model, calib, teacher)
            h, _, _ = measure(model, heldout)
        nll_c.append(c), kl_c.append(kl), nll_h.append(h)
    return keys, n_blocks, {"nll_calib": np.array(nll_c), "kl_calib": np.array(kl_c), "nll_heldout": np.array(nll_h)}


def _write(stem: Path, result: dict) -> int:
    _file(stem, ".json").write_text(json.dumps(result, indent=1) + "\n")
    _file(stem, ".md").write_text(render(result))
    print(render(result))
    return 0


def render(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Calibration criterion probe ({s['model']})", "",
             f"Sets from {len(s['reports'])} reports plus {s['neighbours']} one-swap neighbours per M; "
             f"{s['calib_samples']} calibration and {s['heldout_samples']} held-out samples x {s['seq_len']} tokens "
             f"(split seed {s['split_seed']}), bf16; means over {s['draws']} random subsets of n calibration samples. "
             "Regret: held-out loss of the set ranked first minus the lowest held-out loss (nats/token). "
             "Agreement: share of the held-out-resolved pairs ordered the same way.", "",
             "| M | sets | n | Spearman NLL | Spearman KL | regret NLL | regret KL | agreement NLL | agreement KL |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for m, e in result["per_m"].items():
        for r in e["ranking"]:
            lines.append(f"| {m} | {len(e['sets'])} | {r['n']} | {f(r['nll_spearman'])} | {f(r['kl_spearman'])} | "
                         f"{f(r['nll_regret'])} | {f(r['kl_regret'])} | {f(r['nll_agreement'])} | "
                         f"{f(r['kl_agreement'])} ({r['pairs']} pairs) |")
    lines += ["", f"Two stages: the 6 best by the criterion on {s['loop_samples']} samples, then the lowest NLL among "
              f"them on {s['confirm_samples']} others (held-out regret of the best finalist / of the set chosen); last "
              f"column: the lowest held-out loss on {s['confirm_samples']} held-out samples, judged on the other "
              f"{s['heldout_samples'] - s['confirm_samples']} (the noise a choice on that many samples cannot avoid).", "",
              "| M | loop on NLL: best finalist | chosen | loop on KL: best finalist | chosen | chosen by held-out loss |",
              "|---|---|---|---|---|---|"]
    for m, e in result["per_m"].items():
        t = e["two_stage"]
        lines.append(f"| {m} | {t['nll']['finalists']:.4f} | {t['nll']['chosen']:.4f} | "
                     f"{t['kl']['finalists']:.4f} | {t['kl']['chosen']:.4f} | {t['heldout_floor']:.4f} |")
    lines += ["", "Calibration against held-out samples, every pair of sets of an M: z = (calibration difference - "
              "held-out difference) / its standard error (about standard normal where both come from one "
              "distribution: sd near 1, about 5 % beyond 2); the pair of largest |z| with both differences.", "",
              "| M | pairs | sd of z | share beyond 2 | share beyond 3 | largest |z|: sets, calibration / held-out difference |",
              "|---|---|---|---|---|---|"]
    for m, e in result["per_m"].items():
        t = e.get("shift")
        if t is None or t["worst"] is None:
            continue
        w = t["worst"]
        pair = " vs ".join(",".join(map(str, k)) for k in w["sets"])
        lines.append(f"| {m} | {t['pairs']} | {t['z_sd']:.2f} | {t['beyond_2']:.3f} | {t['beyond_3']:.3f} | "
                     f"{abs(w['z']):.1f}: {pair}, {w['calib_diff']:+.4f} / {w['heldout_diff']:+.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
