"""Low-bit matmul kernels: ``quantized_matmul`` with XLA, Pallas TPU, Pallas GPU and interpreter
backends (see docs/design.md, "Kernels"). Which (weight, activation) pairs run the integer kind,
and
the integer product of the ``"xla"`` backend, are the same rule as QAT's integer forward."""

from qjax._src.kernels.activation import activation_codes
from qjax._src.kernels.api import BACKENDS, quantized_matmul, resolve_backend
from qjax._src.kernels.blocks import BlockSizes, default_hadamard_blocks
from qjax._src.kernels.cases import Case, classify

__all__ = [
    "activation_codes",
    "Case",
    "classify",
    "BACKENDS",
    "BlockSizes",
    "default_hadamard_blocks",
    "quantized_matmul",
    "resolve_backend",
]
