"""Published QAT methods built from qjax's pieces, one module per method."""

from qjax.methods import (
    asq,
    compute_optimal,
    distill,
    edgeqat,
    ifairy,
    ofq,
    oscillation,
    quest,
    scaling_law,
    zeroqat,
)

__all__ = ["asq", "compute_optimal", "distill", "edgeqat", "ifairy", "ofq", "oscillation", "quest",
           "scaling_law", "zeroqat"]
