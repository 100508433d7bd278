"""Problem formulations (installed as ``qblock.problems``)."""

from qblock.problems.block_removal import BlockRemovalProblem
from qblock.problems.synthetic import paper_structure_A, random_problem

__all__ = ["BlockRemovalProblem", "random_problem", "paper_structure_A"]
