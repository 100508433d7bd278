"""Validation: does low energy mean a better pruned model?

* :mod:`qblock.validate.evaluate` - held-out perplexity and multiple-choice accuracy of a removal set,
  by masking blocks on one loaded model;
* :mod:`qblock.validate.baselines` - ShortGPT (one-shot and iterative), angular distance, SLEB, norm
  ratio and random sets, with their cost in forward passes;
* :mod:`qblock.validate.stats` - rank correlations with bootstrap intervals and the best-candidate
  statement, computed only from the per-candidate table;
* :mod:`qblock.validate.report` / :mod:`qblock.validate.plots` - table files, markdown report, PNGs;
* :mod:`qblock.validate.runner` - the pipeline behind ``qblock validate`` and ``qblock run``;
* :mod:`qblock.validate.lmeval` - optional lm-evaluation-harness adapter (``qblock[eval]``).

Importing this package does not import torch; the submodules that need it import it on use.

Example:
    >>> from qblock.validate import summarize
    >>> rows = [{"num_remove": 1, "method": "qubo", "rank": k, "removed": [k], "energy": float(k),
    ...          "heldout_loss": 2.0 + k} for k in range(4)]
    >>> summarize(rows, n_boot=100)["per_m"]["1"]["correlations"]["energy"]["kendall"]
    1.0
"""

from __future__ import annotations

from qblock.validate.stats import best_vs_baseline, correlations, rank_correlation, summarize

__all__ = ["summarize", "correlations", "rank_correlation", "best_vs_baseline"]
