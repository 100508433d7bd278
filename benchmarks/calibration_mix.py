"""Which calibration text for a pruned model meant for any text? qblock's sets chosen on one kind of text or on a mix.

qblock chooses on calibration loss, so its set fits the calibration text (see ``domain_transfer.py``:
chosen on LAMBADA book passages, a set can lose on code). This measures what the choice of calibration text
does. The passages of each built-in text (``lambada``, ``wikipedia``, ``stories``, ``code``;
:data:`qblock.llm.data.TEXT_SOURCES`) are split by index parity: the even ones may calibrate, the odd ones
only judge. Calibration sources: each text's even half alone, and ``mix``, the even halves of all four, each
cut to the same number of characters (the shortest half's), so no text dominates. For each source

    qblock run --quick --calibration SOURCE.jsonl --remove M,... --baselines none --top 1 --random 0 --tasks none

chooses qblock's recommended set per M as a user would; every chosen set is then measured on ``--samples``
samples of each text's odd half (packed as calibration text is), one loss per sample, and each source's set
is compared with the mix's, paired over samples (mean difference ± standard error).

    python benchmarks/calibration_mix.py --model default --remove 3,6,9,12,15 --out benchmarks/results/calibration_mix_default

Writes ``STEM.json`` and ``STEM.md``; the calibration files live in a temporary folder (no text is kept).
Cost: five ``qblock run --quick`` selections without baselines and one prefix-cached pass per distinct set
and text (SmolLM2-135M, bf16, 2 cores: about 15 minutes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from selection_paired import paired, write_results  # noqa: E402  (one home for the paired statistics)

TEXTS = ("lambada", "wikipedia", "stories", "code")


def halves() -> dict[str, tuple[list[str], list[str]]]:
    """``{text: (even passages, odd passages)}``: the first may calibrate, the second only judges."""
    from qblock.llm.data import load_texts

    return {t: (p[0::2], p[1::2]) for t in TEXTS for p in [load_texts(t)[0]]}


def calibration_files(parts: dict[str, tuple[list[str], list[str]]], folder: Path) -> dict[str, Path]:
    """One ``.jsonl`` per text (its even half) and ``mix.jsonl`` (every even half cut to the same characters)."""
    files = {}
    cap = min(sum(map(len, even)) for even, _ in parts.values())
    mix = []
    for t, (even, _) in parts.items():
        files[t] = _write(folder / f"{t}.jsonl", even)
        kept, size = [], 0
        for p in even:
            if size >= cap:
                break
            kept.append(p)
            size += len(p)
        mix += kept
    files["mix"] = _write(folder / "mix.jsonl", mix)
    return files


def _write(path: Path, passages: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    return path


def choose(model: str, calibration: Path, ms: str, seed: int, out: Path, threads: int) -> dict[str, dict]:
    """qblock's recommended sets (``summary.json``'s ``recommended``) of one ``qblock run --quick``."""
    cmd = [sys.executable, "-m", "qblock", "run", "--quick", "--model", model, "--calibration", str(calibration),
           "--remove", ms, "--baselines", "none", "--top", "1", "--random", "0", "--tasks", "none",
           "--seed", str(seed), "--threads", str(threads), "--quiet", "--out", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads((out / "summary.json").read_text())["recommended"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--remove", default="3,6,9,12,15", help="values of M (default 3,6,9,12,15)")
    ap.add_argument("--samples", type=int, default=128, help="judging samples per text (default 128)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per judging sample (the quick preset's, 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="of the judging passes")
    ap.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.md")
    args = ap.parse_args(argv)
    if args.samples < 2:
        ap.error(f"--samples must be at least 2, got {args.samples}")

    import torch

    from qblock.llm.models import eval_dtype, load_model
    from qblock.validate.evaluate import PrefixCache, prefix_order

    torch.set_num_threads(args.threads)
    parts = halves()
    chosen = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = calibration_files(parts, Path(tmp))
        for source, f in files.items():
            print(f"choosing on {source} ...", flush=True)
            rec = choose(args.model, f, args.remove, args.seed, Path(tmp) / f"run_{source}", args.threads)
            chosen[source] = {m: sorted(r["removed"]) for m, r in rec.items()}
    model, tok = load_model(args.model, quiet=True, dtype=eval_dtype(args.dtype))
    out = {"model": args.model, "seed": args.seed, "samples": args.samples, "seq_len": args.seq_len,
           "chosen": chosen, "judged": {}}
    keys = prefix_order({tuple(s) for per in chosen.values() for s in per.values()})
    for text, (_, odd) in parts.items():
        samples = _up_to(tok, odd, args.samples, args.seq_len, args.seed)
        cache = PrefixCache(model, samples)
        losses = {k: cache.sample_losses(k) for k in keys}
        out.setdefault("judged_samples", {})[text] = len(samples)
        out["judged"][text] = {m: _compare(losses, {s: chosen[s][m] for s in chosen}) for m in chosen["mix"]}
        print(text, json.dumps(out["judged"][text]), flush=True)
    stem = Path(args.out)
    write_results(stem, out, _markdown(out))
    return 0


def _up_to(tok, passages: list[str], n: int, seq_len: int, seed: int) -> list:
    """``n`` samples, or as many as the passages hold (the odd half of ``code`` holds about 100 of 128 tokens)."""
    from qblock.llm.data import DataError, make_samples

    while True:
        try:
            return make_samples(tok, passages, n, seq_len, seed=seed)
        except DataError:
            if n <= 2:
                raise
            n = int(n * 0.9)


def _compare(losses: dict, sets: dict[str, list[int]]) -> dict:
    """Each source's mean loss on one text at one M, and its set minus the mix's, paired over samples."""
    mix = losses[tuple(sets["mix"])]
    row = {"loss": {s: round(sum(losses[tuple(v)]) / len(mix), 4) for s, v in sets.items()}}
    row["minus_mix"] = {s: paired(losses[tuple(v)], mix) for s, v in sets.items() if s != "mix"}
    return row


def _markdown(out: dict) -> str:
    sources = list(out["chosen"])
    counts = ", ".join(f"{t} {n}" for t, n in out["judged_samples"].items())
    lines = [f"# Which calibration text: {out['model']}", "",
             f"qblock's recommended set per M chosen by `qblock run --quick --seed {out['seed']}` on each calibration "
             "source (the even passages of one text, or `mix`: all four, equal characters each), judged on "
             f"{out['seq_len']}-token samples of each text's odd passages ({counts}). Cells: held-out loss "
             "(nats/token), then that set minus the mix's set, paired (mean ± standard error, samples where it "
             "is lower); 'same' where the sets are equal.", "", "## Sets chosen", "",
             "| M | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    for m in out["chosen"]["mix"]:
        lines.append(f"| {m} | " + " | ".join(",".join(map(str, out["chosen"][s][m])) for s in sources) + " |")
    lines += ["", "## Over all four texts", "", "Mean held-out loss over the texts / the most the set loses, on any one "
              "text, to the best of the five sets there (regret).", "",
              "| M | " + " | ".join(f"chosen on {s}" for s in sources) + " |", "|---|" + "---|" * len(sources)]
    for m in out["chosen"]["mix"]:
        per_text = [out["judged"][t][m]["loss"] for t in out["judged"]]
        cells = [f"{sum(r[s] for r in per_text) / len(per_text):.4f} / {max(r[s] - min(r.values()) for r in per_text):.3f}"
                 for s in sources]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for text, per_m in out["judged"].items():
        lines += ["", f"## Judged on {text}", "", "| M | " + " | ".join(f"chosen on {s}" for s in sources) + " |",
                  "|---|" + "---|" * len(sources)]
        for m, r in per_m.items():
            cells = []
            for s in sources:
                d = r["minus_mix"].get(s)
                diff = "" if d is None else (" (same)" if d["se"] == 0 and d["diff"] == 0 else
                                             f" ({d['diff']:+.4f} ± {d['se']:.4f}, {d['wins']}/{d['n']})")
                cells.append(f"{r['loss'][s]:.4f}{diff}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
