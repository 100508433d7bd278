"""Global SVD compression of a model's decoder linears under one parameter budget.

Every attention and MLP projection of every decoder block is factorised by an SVD, plain or
activation-whitened (:mod:`qblock.svd.factors`), and given a rank by one of these methods:

* ``uniform``: every matrix keeps the same fraction of its own parameters;
* ``global-threshold``: one threshold on the singular values over all matrices;
* ``fermigrad``: Fermi-function relaxation learned on the calibration loss (:mod:`qblock.svd.fermigrad`);
* any backend name (``exact``, ``swap``, ``sa``, ``leap-cqm``, ...): the rank-selection QUBO
  (:class:`~qblock.problems.rank_selection.RankSelectionProblem`) built from per-sample gradients of
  singular-value group gates, solved through :func:`qblock.solve`.

The budget is ``ratio`` times the decoder-linear parameters, counted as the PivGa gauge-fixed factors
store them (``r (m + n) - r^2`` per matrix). :func:`qblock.svd.export.export` writes the result;
:func:`qblock.svd.export.load_lowrank` reads the factorised model back.

Example (a tiny random model):
    >>> import torch, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, num_key_value_heads=1)
    >>> model = transformers.LlamaForCausalLM(cfg).eval()
    >>> calib = [torch.randint(0, 48, (12,)) for _ in range(4)]
    >>> fs = factorise(model, calib, whiten=True)
    >>> ranks, info = allocate(model, fs, 0.5, "uniform")
    >>> info["stored"] <= info["budget"]
    True
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from qblock.svd.allocate import (budget_of, gate_gradients, rank_problem, ranks_from_state, stored,
                                 threshold_ranks, uniform_ranks)
from qblock.svd.factors import Factorisation, factorise, find_linears

__all__ = ["METHODS", "allocate", "factorise", "find_linears", "Factorisation", "budget_of"]

#: the allocation methods besides the backends
METHODS = ("uniform", "global-threshold", "fermigrad")


def allocate(model, fs: Sequence[Factorisation], ratio: float, method: str, *, calibration: Sequence[Any] = (),
             group_size: int = 32, energy: str = "fisher", couplings: str = "diagonal", gradients: Any = None,
             seed: int = 0, progress: bool = False, fermigrad: dict | None = None,
             backend_params: dict | None = None) -> tuple[list[int], dict[str, Any]]:
    """Ranks for every matrix of ``fs`` within the budget of ``ratio``, by ``method``.

    Args:
        model: the model (used by ``fermigrad`` and for the QUBO's gate gradients).
        fs: the factorisations (:func:`factorise`).
        ratio: fraction of the decoder-linear parameters kept, in ``(0, 1]``.
        method: ``"uniform"``, ``"global-threshold"``, ``"fermigrad"`` or a backend name.
        calibration: token tensors for ``fermigrad`` and the QUBO's gradients.
        group_size: singular values per QUBO variable.
        energy, couplings: the QUBO's energy (``fisher``/``fisher+grad``) and which couplings it keeps
            (``full``, ``matrix``, ``diagonal``; see :func:`~qblock.problems.rank_selection.from_gate_gradients`).
            Default ``fisher`` / ``diagonal``: on SmolLM2-135M (plain SVD, 80 % kept, 4 gradient samples) the
            exact optimum of the diagonal Fisher QUBO had held-out loss 5.41, of the within-matrix one 6.16
            (it emptied three matrices: cancelling first-order terms make large removals look free).
        gradients: precomputed group gate gradients (:func:`~qblock.svd.allocate.gate_gradients`) to reuse.
        seed: seed of FermiGrad and of stochastic backends.
        fermigrad: keyword arguments of :func:`qblock.svd.fermigrad.fermigrad`.
        backend_params: keyword arguments of the backend.

    Returns:
        ``(ranks, info)``; ``info`` has ``method``, ``budget``, ``stored``, ``seconds`` and method details.

    Raises:
        ValueError: an unknown method or backend, a ratio outside ``(0, 1]``, missing calibration data.
    """
    from qblock import backends

    budget = budget_of(fs, ratio)
    if method not in METHODS and method not in backends.names():
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)} or a backend "
                         f"({', '.join(backends.names())})")
    t0 = time.perf_counter()
    info: dict[str, Any] = {"method": method, "ratio": float(ratio), "budget": budget}
    if method == "uniform":
        ranks = uniform_ranks(fs, ratio)
    elif method == "global-threshold":
        ranks = threshold_ranks(fs, ratio)
    elif method == "fermigrad":
        if not calibration:
            raise ValueError("fermigrad needs calibration samples")
        from qblock.svd.fermigrad import fermigrad as run

        ranks, info["fermigrad"] = run(model, fs, calibration, ratio, seed=seed, progress=progress, **(fermigrad or {}))
    else:
        ranks, info["qubo"] = _solve_qubo(model, fs, ratio, method, calibration, group_size, energy, couplings,
                                          gradients, seed, progress, backend_params or {})
    info["seconds"] = time.perf_counter() - t0
    info["stored"] = int(sum(stored(fs, ranks)))
    if info["stored"] > budget:
        raise AssertionError(f"{method} exceeded the budget: {info['stored']} > {budget}")
    return ranks, info


def _solve_qubo(model, fs, ratio, backend, calibration, group_size, energy, couplings, gradients, seed,
                progress, params) -> tuple[list[int], dict[str, Any]]:
    import qblock

    if not any(f.rank for f in fs):  # every matrix is zero: nothing to choose (a problem needs a variable)
        return [0] * len(fs), {"backend": backend, "num_variables": 0}
    if gradients is None:
        if not calibration:
            raise ValueError(f"the QUBO method ({backend}) needs calibration samples for its gate gradients")
        gradients = gate_gradients(model, fs, calibration, group_size, progress=progress)
    problem = rank_problem(fs, gradients, ratio, group_size, energy=energy, couplings=couplings)
    t0 = time.perf_counter()
    spec = qblock.backends.get_spec(backend)
    ss = qblock.solve(problem, backend, num_solutions=1, seed=seed if spec.stochastic else None, **params)
    y = problem.states_from_sampleset(ss)[0]
    info = {"backend": backend, "energy": energy, "couplings": couplings, "group_size": int(group_size),
            "num_variables": problem.num_variables, "qubo_energy": float(ss.first.energy),
            "solve_seconds": time.perf_counter() - t0,
            "certified_optimal": bool(ss.info.get("certified_optimal"))}
    return ranks_from_state(problem, y), info
