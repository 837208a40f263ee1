"""The quantized-op core every Flax front end calls: operands of a layer, quantized per recipe.

Functions of plain arrays, a :class:`~qjax.nn.LayerQuant` and a :class:`~qjax.nn.KernelLayout`:

* :func:`quantize_kernel`: the kernel as the layer's op should see it in QAT,
  ``from_matrix(fake_quant(to_matrix(kernel)))``, one quantization per ``(K, N)`` matrix (a stack
  of layers or an einsum's batch axes are never reduced over);
* :func:`quantize_input`: the input, fake-quantized (or only rotated) on its row view ``(..., K)``
  (dense layers) or as is (convolutions, channels last). Inside a trace, layers that quantize
  the same input array alike (attention's q, k and v; a SwiGLU's gate and up) share one result,
  so the quantizer's backward (trust mask, inverse rotation) runs once on their summed
  cotangent; not with a learned input scale or a stochastic-rounding key (both per layer);
* :func:`integer_dense`: QAT's integer forward of a dense layer, an int8 dot
  (the integer-forward matmul) on the row view and the matrix view, arranged back to the
  layer's
  output and plus its bias; with ``backward="int8"`` also its gradient matmuls, whose stochastic
  rounding takes a PRNG key given as ``key=`` or by the innermost :func:`key_source` (the Linen
  interceptor makes one per layer from the ``"quant"`` rng stream, :data:`QUANT_RNG`);
* :func:`init_kernel_scale` / :func:`init_input_scale`: initial learned steps (LSQ) or clipping
  levels (PACT);
* :func:`dense_op`, :func:`einsum_op`, :func:`conv_op`, :func:`embed_op`: whole layers for the
  explicit :mod:`qjax.nn.linen` / :mod:`qjax.nn.nnx` modules.

Linen interception and NNX wrapping (:func:`qjax.nn.quantize_model`) substitute
:func:`quantize_kernel`'s
output for the layer's kernel and run the layer's own op on :func:`quantize_input`'s output, so
any layer linear in its kernel and input keeps its exact semantics; serving
(:mod:`qjax.convert`) substitutes the dequantized kernel into the same op.

With QuEST's half Hadamard form the input is rotated along K and the kernel's matrix view along
K, so the layer's own op computes ``(x H)(H^T W) = x W``; an operand without a spec is still
rotated when the other one is.
"""

from qjax._src.nn.ops import (
    QUANT_RNG,
    backward_key,
    conv_op,
    dense_op,
    einsum_op,
    embed_op,
    init_input_scale,
    init_kernel_scale,
    qat_active,
    qat_scope,
    quantize_input,
    quantize_kernel,
)

__all__ = [
    "backward_key",
    "conv_op",
    "dense_op",
    "einsum_op",
    "embed_op",
    "init_input_scale",
    "init_kernel_scale",
    "qat_active",
    "qat_scope",
    "QUANT_RNG",
    "quantize_input",
    "quantize_kernel",
]
