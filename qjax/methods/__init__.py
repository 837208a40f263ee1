"""Published QAT methods built from qjax's pieces, one module per method."""

from qjax.methods import (
    compute_optimal,
    distill,
    ofq,
    oscillation,
    quest,
    scaling_law,
    zeroqat,
)

__all__ = ["compute_optimal", "distill", "ofq", "oscillation", "quest", "scaling_law", "zeroqat"]
