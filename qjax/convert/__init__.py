"""Convert trained QAT params to packed serving params; serve, save, export them.

* :func:`convert`: quantized kernels -> packed :class:`~qjax.QArray` ``(N, K)``.
* :func:`serve`: the serving forward of the same Flax model (dequantized or int8 matmul).
* :func:`serving_matmul`: the matmul it uses (``backend="xla"``).
"""

from qjax.convert.serve import BACKENDS, serve, serving_matmul, uses_integer_matmul
from qjax.convert.weights import convert, kernel_to_qarray, serving_layers, serving_spec

__all__ = [
    "BACKENDS",
    "convert",
    "kernel_to_qarray",
    "serve",
    "serving_layers",
    "serving_matmul",
    "serving_spec",
    "uses_integer_matmul",
]
