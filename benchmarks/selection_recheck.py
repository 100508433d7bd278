"""Re-run only qblock's selection against a committed selection-quality study's baselines.

The baselines' removal sets and their held-out losses do not depend on qblock's selection method, so
after a change to the method only qblock's side needs measuring again: this script runs
:func:`qblock.llm.measured.select_removals` with the validator's current defaults on the study's
calibration samples (same model, data, seed and dtype as recorded in the study's JSON), evaluates each
recommended set on the study's held-out samples, re-measures every baseline set of the study on the same
held-out samples (so a baseline number that did not reproduce is visible, not assumed), and writes a table
per M: qblock now, qblock in the study, the best baseline, SLEB, with the tokens each spent.

    python benchmarks/selection_recheck.py --study benchmarks/results/selection_quality_gemma3-270m.json

Writes ``<study stem>_recheck.{json,md}`` next to the study (or ``--out STEM``). It takes the
selection's time plus one held-out pass per distinct set (about an hour for Gemma-3-270M on one
loaded CPU core, where the LM head over a 262k vocabulary dominates every pass).
"""

from __future__ import annotations

import argparse
import json
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _out import write_results  # noqa: E402  (the benchmarks' one output rule)

BASELINES = ("shortgpt", "shortgpt_iterative", "angular", "sleb", "norm_ratio")
QBLOCK = "qblock (measured QUBO, refined)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", required=True, help="a selection_quality_<model>.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="output stem (default: the study's stem + _recheck)")
    ap.add_argument("--confirm-samples", type=int, default=None, metavar="N",
                    help="calibration samples of the confirmation stage, after the loop's (default: the validator's "
                         "split of the study's calibration set); more than the study's extends its calibration data "
                         "from the same seeded stream (held-out samples do not depend on it)")
    ap.add_argument("--race-samples", type=int, default=None, metavar="N",
                    help="calibration samples after the loop's and the confirmation's that the finalists not "
                         "resolved from the lowest race on (default: the rest of the study's calibration set, as the validator does); more "
                         "than that extends the calibration data from the same seeded stream")
    args = ap.parse_args(argv)
    if args.race_samples is not None and args.race_samples < 0:
        ap.error(f"--race-samples must be at least 0, got {args.race_samples}")
    if args.confirm_samples is not None and args.confirm_samples < 1:
        ap.error(f"--confirm-samples must be at least 1, got {args.confirm_samples}")

    import torch

    from qblock.llm.data import calibration_and_eval
    from qblock.llm.measured import CalibrationLoss, select_removals
    from qblock.llm.models import load_model
    from qblock.validate.runner import ValidationSettings, selection_split

    torch.set_num_threads(args.threads)
    study_path = Path(args.study)
    study = json.loads(study_path.read_text())
    st, ms = study["settings"], [int(m) for m in study["M"]]
    d = ValidationSettings(num_removes=ms)
    model, tok = load_model(st["model"], quiet=True, dtype=st["dtype"])
    if args.confirm_samples is not None:
        d.select_confirm_samples = args.confirm_samples
    if args.race_samples is not None:  # exactly that many after the loop's and the confirmation's
        d.select_race = args.race_samples > 0
        n_calib = d.select_samples + d.select_confirm_samples + args.race_samples
    else:  # the validator's split of the study's calibration set (or of the confirmation's, if larger)
        n_calib = max(st["calib_samples"], d.select_samples + (args.confirm_samples or 0))
    calib, evals, _ = calibration_and_eval(tok, None, num_calib=max(st["calib_samples"], n_calib),
                                           num_eval=st["eval_samples"], seq_len=st["seq_len"], seed=st["seed"])
    loop, checks, race = selection_split(calib[:n_calib], d)
    checks, calib = checks or [], calib[: st["calib_samples"]]
    t0 = time.perf_counter()
    sel = select_removals(model, loop, ms, pool_size=d.select_pool,
                          evaluations_per_m=d.select_evaluations, batch=d.select_batch, backend=d.select_backend,
                          seed=d.solve_seed, batch_size=d.batch_size, confirm_samples=checks,
                          confirm_top=d.select_confirm, screen_samples=d.select_screen, one_pass=d.select_one_pass,
                          race_samples=race, progress=True)
    seconds = time.perf_counter() - t0
    held = CalibrationLoss(model, evals, batch_size=d.batch_size)
    out = {"study": study_path.name, "model": st["model"], "M": ms, "selection_seconds": seconds,
           "settings": {"select_samples": d.select_samples, "select_evaluations": d.select_evaluations,
                        "calibration_samples": len(loop) + len(checks) + len(race),
                        "select_confirm": d.select_confirm, "confirm_samples": len(checks), "race_samples": len(race),
                        "select_screen": d.select_screen, "select_one_pass": d.select_one_pass,
                        "select_backend": d.select_backend},
           "full_model_heldout": held.loss(()), "per_m": {}}
    for m in ms:
        ref = sel["refinements"][m]
        rec, conf = ref.recommended
        rows = {r["method"]: r for r in study["per_m"][str(m)]["table"]}
        base = {b: {"removed": rows[b]["removed"], "study_heldout": rows[b]["heldout_loss"],
                    "heldout": held.loss(rows[b]["removed"]), "fwd_tokens": rows[b]["fwd_tokens"]}
                for b in BASELINES if b in rows}
        out["per_m"][str(m)] = {
            "removed": rec, "source": ref.source(rec), "confirm_loss": conf, "loop_loss": sel["oracle"].loss(rec), "heldout": held.loss(rec),
            "fwd_tokens": sel["shared_tokens"] + ref.tokens + ref.confirm_tokens,
            "start": [h["removed"] for h in ref.history if h["source"].startswith("start")],
            "finalists": {",".join(map(str, k)): v for k, v in ref.finalists.items()},
            "finalist_samples": {",".join(map(str, k)): v for k, v in ref.finalist_samples.items()},
            "confirm_rounds": ref.confirm_rounds,  # the first round's first set: the pick without racing
            "study_qblock": {"removed": rows[QBLOCK]["removed"], "heldout": rows[QBLOCK]["heldout_loss"],
                             "fwd_tokens": rows[QBLOCK]["fwd_tokens"]},
            "baselines": base}
        print(m, rec, round(out["per_m"][str(m)]["heldout"], 4), flush=True)
    stem = Path(args.out) if args.out else study_path.with_name(study_path.stem + "_recheck")
    write_results(stem, out, _markdown(out))
    return 0


def _markdown(out: dict) -> str:
    lines = [f"# qblock's selection re-checked against `{out['study']}` ({out['model']})", "",
             f"Settings: {out['settings']}; selection took {out['selection_seconds']:.0f} s. Full model held-out "
             f"loss {out['full_model_heldout']:.4f}. Baselines re-measured on the same held-out samples "
             "(\"study\" = the number in the study).", "",
             "| M | qblock now | held-out | qblock in the study | held-out | best baseline | held-out (study) | SLEB held-out | "
             "qblock tokens now | SLEB tokens as run | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in out["per_m"].items():
        best = min(r["baselines"], key=lambda b: r["baselines"][b]["heldout"])
        b, sleb = r["baselines"][best], r["baselines"].get("sleb", {})
        diff = r["heldout"] - b["heldout"]
        verdict = "wins" if diff < -1e-4 else ("ties" if diff <= 1e-4 else ("within 0.01" if diff <= 0.01 else "loses"))
        lines.append(f"| {m} | {','.join(map(str, r['removed']))} | {r['heldout']:.4f} | "
                     f"{','.join(map(str, r['study_qblock']['removed']))} | {r['study_qblock']['heldout']:.4f} | "
                     f"{best} ({','.join(map(str, b['removed']))}) | {b['heldout']:.4f} ({b['study_heldout']:.4f}) | "
                     f"{sleb.get('heldout', float('nan')):.4f} | {r['fwd_tokens']:,} | {sleb.get('fwd_tokens') or 0:,} | "
                     f"{verdict} ({diff:+.4f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
