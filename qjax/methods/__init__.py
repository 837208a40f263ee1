"""Published QAT methods built from qjax's pieces, one module per method."""

from qjax.methods import compute_optimal, distill, quest, scaling_law, zeroqat

__all__ = ["compute_optimal", "distill", "quest", "scaling_law", "zeroqat"]
