"""Low-bit matmul kernels: ``quantized_matmul`` with XLA, Pallas TPU, Pallas GPU and interpreter
backends (see :mod:`qjax.kernels.api`). Which (weight, activation) pairs run the integer kind, and
the integer product of the ``"xla"`` backend, are :mod:`qjax.int8`'s (shared with QAT)."""

from qjax.kernels.activation import activation_codes, quantize_rows, row_block
from qjax.kernels.api import BACKENDS, quantized_matmul, resolve_backend
from qjax.kernels.blocks import BlockSizes, default_block_sizes
from qjax.kernels.cases import Case, classify

__all__ = [
    "BACKENDS",
    "BlockSizes",
    "Case",
    "activation_codes",
    "classify",
    "default_block_sizes",
    "quantize_rows",
    "quantized_matmul",
    "resolve_backend",
    "row_block",
]
