"""Convert trained QAT params to packed serving params; serve, save, export them.

* :func:`convert`: quantized kernels -> packed :class:`~qjax.QArray` ``(N, K)`` (``packed=False``:
  sub-byte codes one per byte; ``k_major=True``: the Pallas kernels' layout; or
  :func:`relayout_params` afterwards).
* :func:`serve`: the serving forward of the same Flax model (dequantized or int8 matmul).
* :func:`serving_matmul`: the matmul it uses (``backend="xla"``).
* :func:`save` / :func:`restore`: Orbax checkpoints of serving params (atomic, checksummed).
* :func:`export_serving` / :func:`load_exported`: the serving forward as StableHLO (jax.export).
* :func:`export_gguf`: a GGUF file (a llama.cpp ``llama`` model for the reference Llama).
* :func:`export_gguf_bert`: the BERT encoder and its WordPiece tokenizer as a llama.cpp ``bert``
  embedding model.
"""

from qjax._src.convert.gguf_bert import export_gguf_bert
from qjax._src.convert.gguf_export import export_gguf, gguf_tensor, llama_tensors, rope_permutation
from qjax._src.convert.io import (
    export_serving,
    from_arrays,
    load_exported,
    restore,
    save,
    to_arrays,
)
from qjax._src.convert.nnx_serving import ServingKernel, ServingLayer, serving_model
from qjax._src.convert.serve import (
    BACKENDS,
    conv_config,
    integer_product,
    serve,
    serve_layer,
    serving_matmul,
    uses_integer_matmul,
)
from qjax._src.convert.weights import (
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
    "from_arrays",
    "to_arrays",
    "BACKENDS",
    "ServingKernel",
    "ServingLayer",
    "conv_config",
    "convert_layer",
    "dequantize_kernel",
    "integer_product",
    "layer_to_qarray",
    "serve_layer",
    "serving_model",
    "convert",
    "export_gguf",
    "export_gguf_bert",
    "gguf_tensor",
    "llama_tensors",
    "rope_permutation",
    "export_serving",
    "load_exported",
    "restore",
    "save",
    "kernel_to_qarray",
    "serve",
    "serving_layers",
    "serving_matmul",
    "serving_spec",
    "relayout_params",
    "uses_integer_matmul",
]
