"""The energy models qblock can build, by name: one registry, importable without torch (the CLI reads it)."""

from __future__ import annotations

__all__ = ["ENERGY_MODELS", "SCORED_ENERGY_MODELS"]

#: energy model name -> one-line description
ENERGY_MODELS = {
    "fisher": "x^T H x with H = A^T A / m (empirical Fisher; the paper's energy)",
    "fisher+grad": "-g^T x + 1/2 x^T H x with g = mean of A (first-order term kept)",
    "pairwise": "measured loss increases of single and pairwise removals (forward-only, N(N+1)/2 passes)",
    "measured": "measured single removals and pairs inside a pool of the most removable blocks (forward-only, "
                "about N + P^2/2 passes; qblock.select.measured_problem)",
}

#: the energy models ``qblock validate`` / ``run --energies`` can score candidates with (``measured`` is
#: built by the selection itself, not scored)
SCORED_ENERGY_MODELS = ("fisher", "fisher+grad", "pairwise")
