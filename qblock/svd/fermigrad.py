"""FermiGrad: global rank selection by gradient descent on Fermi-function "chemical potentials".

Each matrix ``l`` keeps its singular values through a Fermi function of their index ``i`` (0-based):
``f_(l,i) = 1 / (1 + exp((i + 1/2 - mu_l) / T))``, so ``W_l = U diag(s * f_l) B`` and its soft rank is
``r_l = sum_i f_(l,i)``. The potentials ``mu_l`` are learned by Adam on the calibration loss of the model
with these weights. After every step the budget is enforced by one common shift ``delta`` of all
potentials, found by bisection, so that the soft storage ``sum_l r_l (m_l + n_l) - r_l^2`` equals the
budget. The temperature is annealed geometrically from ``t_start`` to ``t_end`` (in units of one
singular-value index), so the soft selection hardens into a step. At the end the hard ranks are
``#{i : i + 1/2 < mu_l}`` and, if rounding overshot the budget, the smallest last kept values are
dropped until it fits (:func:`qblock.svd.allocate.fit_budget`).

Schedule (defaults): ``mu`` starts at the uniform ranks; ``steps = 20``; ``lr = 0.01 * max rank``;
``t_start = 0.02 * max rank``, ``t_end = 0.05``; each step uses ``batch`` calibration samples drawn
with the seeded generator (``seed``), so a run is reproducible.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from qblock.svd.allocate import budget_of, fit_budget, uniform_ranks
from qblock.svd.factors import Factorisation, find_linears

__all__ = ["fermigrad", "soft_ranks", "hard_ranks", "project_budget"]


def soft_ranks(mu, idx, T: float):
    """``[sum_i f_(l,i)]`` and the Fermi factors themselves, for potentials ``mu``."""
    import torch

    fs = [torch.sigmoid((m - i - 0.5) / T) for m, i in zip(mu, idx)]
    return torch.stack([f.sum() for f in fs]), fs


def _soft_cost(mu, idx, T, mn) -> float:
    import torch

    r, _ = soft_ranks(mu, idx, T)
    return float((r * mn[:, 0] - r * r).sum()) if torch.is_tensor(r) else 0.0


def project_budget(mu, idx, T: float, shapes: Sequence[tuple[int, int]], budget: int, iters: int = 50):
    """The common shift ``delta`` with soft storage of ``mu + delta`` equal to ``budget`` (bisection)."""
    import torch

    mn = torch.tensor([[m + n] for m, n in shapes], dtype=torch.float64)
    top = float(max(len(i) for i in idx)) + 10 * T + 1
    lo, hi = -top - float(mu.max()), top - float(mu.min())
    for _ in range(iters):
        mid = (lo + hi) / 2
        if _soft_cost(mu + mid, idx, T, mn) > budget:
            hi = mid
        else:
            lo = mid
    return lo


def hard_ranks(mu, fs: Sequence[Factorisation]) -> list[int]:
    """``#{i : i + 1/2 < mu_l}``, clipped to ``0 .. rank``."""
    return [int(min(max(math.ceil(float(m) - 0.5), 0), f.rank)) for m, f in zip(mu, fs)]


def fermigrad(model, fs: Sequence[Factorisation], samples: Sequence[Any], ratio: float, *, steps: int = 20,
              lr: float | None = None, t_start: float | None = None, t_end: float = 0.05, batch: int = 1,
              seed: int = 0, progress: bool = False) -> tuple[list[int], dict[str, Any]]:
    """Learn the potentials on ``samples`` and return ``(ranks, info)`` within the budget.

    Args:
        model: the model whose decoder linears ``fs`` factorise (its weights are not changed).
        fs: factorisations of every decoder linear (:func:`qblock.svd.factors.factorise`).
        samples: calibration token tensors.
        ratio: fraction of the decoder-linear parameters kept (PivGa storage).
        steps, lr, t_start, t_end, batch, seed: the schedule (see the module docstring).
        progress: show a progress bar with the loss and temperature.

    Returns:
        ranks per matrix and ``info`` (schedule, loss per step, final soft and hard storage).
    """
    import torch
    from tqdm.auto import tqdm

    budget = budget_of(fs, ratio)
    top = max(f.rank for f in fs)
    lr = 0.01 * top if lr is None else float(lr)
    t_start = 0.02 * top if t_start is None else float(t_start)
    shapes = [f.shape for f in fs]
    names = [f.name + ".weight" for f in fs]
    U = [f.U.float() for f in fs]
    B = [f.B.float() for f in fs]
    S = [f.s.float() for f in fs]
    idx = [torch.arange(f.rank, dtype=torch.float64) for f in fs]
    mu = torch.tensor(uniform_ranks(fs, ratio), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([mu], lr=lr)
    temps = np.geomspace(t_start, t_end, max(steps, 1))
    rng = np.random.default_rng(seed)
    find_linears(model)  # fails early, with a clear message, on a model without decoder linears
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    losses = []
    bar = tqdm(range(steps), desc="FermiGrad", disable=not progress, leave=False)
    try:
        for t in bar:
            T = float(temps[t])
            pick = rng.choice(len(samples), size=min(batch, len(samples)), replace=False)
            ids = torch.stack([torch.as_tensor(samples[k]).reshape(-1) for k in pick])
            _, fermi = soft_ranks(mu, idx, T)
            weights = {n: (u * (s * f.float())) @ b for n, u, s, f, b in zip(names, U, S, fermi, B)}
            loss = torch.func.functional_call(model, weights, args=(), kwargs={
                "input_ids": ids, "labels": ids, "use_cache": False}, strict=False).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                mu += project_budget(mu.detach(), idx, T, shapes, budget)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", T=f"{T:.3g}")
    finally:
        for p, fl in zip(model.parameters(), flags):
            p.requires_grad_(fl)
    ranks = fit_budget(fs, hard_ranks(mu.detach(), fs), budget)
    info = {"steps": int(steps), "lr": lr, "t_start": t_start, "t_end": float(t_end), "batch": int(batch),
            "seed": int(seed), "losses": losses, "mu": [float(m) for m in mu.detach()]}
    return ranks, info
