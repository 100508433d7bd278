"""How fast is gate-gradient extraction? Batched per-sample gates vs a batch-size-1 loop vs the plain limit.

Times, on the same calibration tokens:

* ``batched``  - :func:`qblock.llm.gradients.gate_gradients`: one forward+backward per batch, each sample
  with its own gate row, giving B rows of A per backward;
* ``loop``     - :func:`qblock.llm.gradients.gate_gradients_reference`: one forward+backward per sample
  (how the reference implementation computes A);
* ``plain``    - a plain batched forward+backward of the same tokens with the same per-sample loss and
  all weights frozen, differentiating w.r.t. the input embeddings instead of gates (no gates at all):
  the practical floor for anything that needs gradients through every block;
* ``forward``  - a batched forward without gradients, for scale.

The methods run interleaved, batch by batch in rotating order, so that load changes on a shared
machine affect all of them alike. It also checks that the batched and loop ``A`` agree. Results (per-sample seconds, ratios, the machine)
go to ``benchmarks/results/extract_speed.json``. The default settings run in a few minutes on 2 CPU
cores; use the flags for larger runs.

Usage::

    python benchmarks/extract_speed.py                       # default model, 16 x 128 tokens, batch 8
    python benchmarks/extract_speed.py --samples 64 --seq-len 256 --device cuda --out r.json
    python benchmarks/extract_speed.py --random-weights       # same architecture, no download needed
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine_info(torch, device) -> dict:
    from bnb_topk import cpu_model  # one description of the machine for every benchmark

    info = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def load(args, torch):
    from qblock.llm.data import lambada_passages, make_samples

    if args.random_weights:
        import transformers

        from qblock.llm import models

        # the default model's architecture with random weights: same compute, no weights needed
        cfg_path = models.default_model_dir() / "config.json"
        if args.config:
            cfg = transformers.AutoConfig.from_pretrained(args.config)
        elif cfg_path.is_file():
            cfg = transformers.AutoConfig.from_pretrained(str(cfg_path.parent))
        else:
            sys.exit("--random-weights needs --config DIR (a config.json) or a converted default model")
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float32).eval()
        g = torch.Generator().manual_seed(args.seed)
        samples = [torch.randint(0, cfg.vocab_size, (args.seq_len,), generator=g) for _ in range(args.samples)]
        name = f"random weights, config of {cfg_path.parent.name if not args.config else args.config}"
    else:
        from qblock.llm.models import load_model, model_provenance

        model, tok = load_model(args.model, dtype=args.dtype, quiet=False)
        samples = make_samples(tok, lambada_passages(), args.samples, args.seq_len, seed=args.seed)
        name = model_provenance(args.model)["id"]
    if args.device:
        model.to(args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, samples, name


def plain_forward_backward(model, samples, batch_size, device, torch):
    """Same tokens, same per-sample loss, frozen weights; gradient w.r.t. the input embeddings."""
    from qblock.llm.gradients import sample_losses

    emb = model.get_input_embeddings()
    for i in range(0, len(samples), batch_size):
        ids = torch.stack(samples[i:i + batch_size]).to(device)
        mask = torch.ones_like(ids)
        x = emb(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=x, attention_mask=mask, use_cache=False).logits
        sample_losses(logits, ids, mask).sum().backward()
        del logits, x


def plain_forward(model, samples, batch_size, device, torch):
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            ids = torch.stack(samples[i:i + batch_size]).to(device)
            model(input_ids=ids, use_cache=False)


def timed(fn, torch, device):
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="model spec (default: the default model)")
    ap.add_argument("--random-weights", action="store_true",
                    help="use the default model's architecture with random weights (no weights needed)")
    ap.add_argument("--config", default=None, help="with --random-weights: a directory holding config.json")
    ap.add_argument("--samples", type=int, default=16, help="samples (default 16)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default 128)")
    ap.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    ap.add_argument("--loop-samples", type=int, default=None,
                    help="samples for the batch-size-1 loop (default: all; the loop is the slow one)")
    ap.add_argument("--gate", default="layer", choices=("layer", "branch"))
    ap.add_argument("--granularity", default="block", choices=("block", "sublayer"))
    ap.add_argument("--dtype", default=None, help="model dtype (default float32)")
    ap.add_argument("--device", default=None, help="torch device (default cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=1, help="timed repetitions; the minimum is kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "extract_speed.json"))
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from qblock.llm.gradients import gate_gradients, gate_gradients_reference

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else torch.device("cpu")
    machine = machine_info(torch, device)  # load average before the heavy work
    model, samples, name = load(args, torch)
    m, bs = len(samples), args.batch_size
    loop_m = min(m, args.loop_samples or m)
    gkw = dict(gate=args.gate, granularity=args.granularity, device=device, progress=False)

    print(f"model {name}: {m} samples x {args.seq_len} tokens, batch {bs}, {args.gate}/{args.granularity}, "
          f"{device}, {torch.get_num_threads()} threads", flush=True)
    # warm-up on one small batch each (allocator, gate discovery probe, kernels)
    warm = samples[: min(2, m)]
    gate_gradients(model, warm, batch_size=len(warm), **gkw)
    gate_gradients_reference(model, warm[:1], **gkw)
    plain_forward_backward(model, warm, len(warm), device, torch)

    # Interleaved batch by batch (batched, plain, forward, loop on the same B samples, in rotating
    # order), so that load changes on a shared machine hit every method alike.
    runs: dict[str, list[float]] = {"batched": [], "loop": [], "plain": [], "forward": []}
    per_batch: dict[str, list[float]] = {k: [] for k in runs}  # seconds per sample of each batch
    A = np.zeros((m, 0))
    R = None
    for rep in range(args.repeats):
        tot = {k: 0.0 for k in runs}
        rows, ref_rows, loop_done = [], [], 0
        for b, i in enumerate(range(0, m, bs)):
            chunk = samples[i:i + bs]
            loop_chunk = chunk[: max(0, loop_m - loop_done)]
            jobs = [
                ("batched", len(chunk), lambda: rows.append(gate_gradients(model, chunk, batch_size=bs, **gkw))),
                ("plain", len(chunk), lambda: plain_forward_backward(model, chunk, bs, device, torch)),
                ("forward", len(chunk), lambda: plain_forward(model, chunk, bs, device, torch)),
                ("loop", len(loop_chunk),
                 lambda: loop_chunk and ref_rows.append(gate_gradients_reference(model, loop_chunk, **gkw))),
            ]
            for name_, n_, job in jobs[b % 4:] + jobs[: b % 4]:
                if n_ == 0:
                    continue
                t, _ = timed(job, torch, device)
                tot[name_] += t
                per_batch[name_].append(t / n_)
            loop_done += len(loop_chunk)
            print(f"  batch {b + 1}/{-(-m // bs)}: " + ", ".join(
                f"{k} {per_batch[k][-1]:.2f}" for k in runs if per_batch[k]) + " s/sample", flush=True)
        A, R = np.concatenate(rows), np.concatenate(ref_rows)
        for k in runs:
            runs[k].append(tot[k] / (loop_m if k == "loop" else m))
        print("  run mean: " + ", ".join(f"{k} {runs[k][-1]:.3f}" for k in runs) + " s/sample", flush=True)

    # On a shared machine other processes only ever add time: the least-disturbed batch (the minimum,
    # as timeit does) estimates the method's own cost best; the means are kept too.
    best = {k: min(v) for k, v in per_batch.items()}
    mean = {k: float(np.mean(v)) for k, v in runs.items()}
    rel = float(np.abs(A[:loop_m] - R).max() / max(np.abs(R).max(), 1e-30))
    result = {
        "benchmark": "extract_speed",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
        "settings": {
            "model": name, "samples": m, "loop_samples": loop_m, "seq_len": args.seq_len, "batch_size": bs,
            "gate": args.gate, "granularity": args.granularity, "num_gates": int(A.shape[1]),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "repeats": args.repeats,
        },
        "seconds_per_sample_best_batch": {k: round(v, 5) for k, v in best.items()},
        "seconds_per_sample_mean": {k: round(v, 5) for k, v in mean.items()},
        "per_batch_seconds_per_sample": {k: [round(x, 5) for x in v] for k, v in per_batch.items()},
        "ratios": {
            "batched_over_plain_fwd_bwd": round(best["batched"] / best["plain"], 3),
            "loop_over_batched": round(best["loop"] / best["batched"], 3),
            "plain_fwd_bwd_over_forward": round(best["plain"] / best["forward"], 3),
        },
        "ratios_of_means": {
            "batched_over_plain_fwd_bwd": round(mean["batched"] / mean["plain"], 3),
            "loop_over_batched": round(mean["loop"] / mean["batched"], 3),
            "plain_fwd_bwd_over_forward": round(mean["plain"] / mean["forward"], 3),
        },
        "max_relative_difference_batched_vs_loop": rel,
    }
    if hasattr(os, "getloadavg"):
        result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    r = result["ratios"]
    print(f"batched / plain fwd+bwd = {r['batched_over_plain_fwd_bwd']:.2f}x; loop / batched = "
          f"{r['loop_over_batched']:.2f}x; max relative difference of A = {rel:.1e}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
