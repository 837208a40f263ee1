"""Published QAT methods built from qjax's pieces, one module per method."""

from qjax.methods import quest, scaling_law

__all__ = ["quest", "scaling_law"]
