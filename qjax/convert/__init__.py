"""Convert trained QAT params to packed serving params; serve, save, export them.

* :func:`convert`: quantized kernels -> packed :class:`~qjax.QArray` ``(N, K)`` (``packed=False``:
  sub-byte codes one per byte; ``k_major=True``: the Pallas kernels' layout; or
  :func:`relayout_params` afterwards).
* :func:`serve`: the serving forward of the same Flax model (dequantized or int8 matmul).
* :func:`serving_matmul`: the matmul it uses (``backend="xla"``).
* :func:`save` / :func:`restore`: Orbax checkpoints of serving params (atomic, checksummed).
* :func:`export_serving` / :func:`load_exported`: the serving forward as StableHLO (jax.export).
* :func:`export_gguf`: a GGUF file (a llama.cpp ``llama`` model for the reference Llama).
"""

from qjax.convert.gguf_export import export_gguf
from qjax.convert.io import (
    directory_bytes,
    export_serving,
    from_arrays,
    load_exported,
    restore,
    save,
    to_arrays,
)
from qjax.convert.nnx_serving import ServingKernel, ServingLayer, serving_model
from qjax.convert.serve import (
    BACKENDS,
    conv_config,
    integer_product,
    serve,
    serve_layer,
    serving_matmul,
    uses_integer_matmul,
)
from qjax.convert.weights import (
    check_layer_params,
    convert,
    convert_layer,
    dequantize_kernel,
    kernel_to_qarray,
    layer_to_qarray,
    relayout_params,
    serving_layers,
    serving_spec,
)

__all__ = [
    "BACKENDS",
    "ServingKernel",
    "ServingLayer",
    "check_layer_params",
    "conv_config",
    "convert_layer",
    "dequantize_kernel",
    "integer_product",
    "layer_to_qarray",
    "serve_layer",
    "serving_model",
    "convert",
    "directory_bytes",
    "export_gguf",
    "export_serving",
    "from_arrays",
    "load_exported",
    "restore",
    "save",
    "to_arrays",
    "kernel_to_qarray",
    "serve",
    "serving_layers",
    "serving_matmul",
    "serving_spec",
    "relayout_params",
    "uses_integer_matmul",
]
