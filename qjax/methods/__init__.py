"""Published QAT methods built from qjax's pieces, one module per method."""

from qjax.methods import quest

__all__ = ["quest"]
