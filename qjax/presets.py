"""Deployment presets: :class:`~qjax.QuantSpec` objects that reproduce other runtimes' quantizers.

Train with the numerics of the format you deploy to. Each preset is an ordinary, frozen spec, so it
works in :func:`~qjax.fake_quant` (straight-through backward), :func:`~qjax.quantize` /
:func:`~qjax.dequantize` (``fake_quant == dequantize(quantize(...))`` bit for bit) and as the
``weight=`` / ``activation=`` spec of the Flax layers and of ``quantize_model`` rules
(``LayerQuant(weight=gguf_q4_0(axis=0))`` for a Flax kernel ``(K, N)``).

``axis`` is the contraction axis the blocks (groups) run along: -1 for weights stored ``(N, K)``
as torch and GGUF store them, 0 for a Flax kernel ``(K, N)``.

llama.cpp (GGUF) block formats, blocks of 32 along ``axis``, float16 block scale ``d``:

* :func:`gguf_q8_0`: ``d = max|x| / 127``, ``q = roundf(x * (1/d))`` (half away from zero),
  value ``q * fp16(d)``.
* :func:`gguf_q4_0`: ``d = x_e / -8`` with ``x_e`` the block's element of largest magnitude,
  ``q = min(15, (int)(x * (1/d) + 8.5)) - 8``, value ``q * fp16(d)`` (``d`` may be negative).

Codes use the float32 ``d`` and values the fp16 one, as in llama.cpp; ``QArray.scale`` holds the
fp16-rounded ``d`` (an all-zero block stores 0), so ``QArray`` codes and scales are GGUF's.
Known differences, both outside float16's range: blocks with ``max|x| < 127 * 2^-126`` (Q8_0) or
``8 * 2^-126`` (Q4_0) get their codes from the smallest normal scale (XLA on CPU flushes
denormals; the values are 0 in both, the fp16 scale being 0), and a ``d`` beyond 65504 is
saturated there (llama.cpp overflows to inf and NaN).

torchao QAT fake quantizers (``IntxFakeQuantizeConfig``, ``Int8DynActInt4WeightQATQuantizer``):

* :func:`torchao_int8_per_token_activation`: int8 ``[-128, 127]``, per token, asymmetric:
  ``scale = max((hi - lo) / 255, eps)``, ``zp = clip(-128 - round(lo / scale), -128, 127)``,
  with ``lo = min(min x, 0)``, ``hi = max(max x, 0)`` and ``eps`` the input dtype's epsilon.
* :func:`torchao_intx_weight` (``torchao_int4_weight``): signed ``bits`` per group, symmetric:
  ``scale = max(amax / ((qmax - qmin) / 2), 2^-23)`` (``amax / 7.5`` for int4), no zero point.

Both compute their qparams in the input's dtype (bfloat16 for bfloat16 input) and then use a
float32 scale: ``q = clip(round(x * (1/scale)) + zp)``, half to even; value ``(q - zp) * scale``
in float32, cast to the input dtype. The backward is torchao's mask, the rounded code inside the
range (``ClippedSTE(on_codes=True)``).

References:
  llama.cpp ``ggml/src/ggml-quants.c`` (``quantize_row_q8_0_ref``, ``quantize_row_q4_0_ref``);
  gguf-py ``gguf/quants.py``. torchao ``torchao/quantization/quant_primitives.py``
  (``_choose_qparams_affine``, ``_quantize_affine_no_dtype_cast``,
  ``fake_quantize_affine_cachemask``), ``torchao/quantization/qat/fake_quantizer.py``.
"""

from qjax._src.presets import (
    GGUF_BLOCK,
    gguf_q4_0,
    gguf_q8_0,
    torchao_int4_weight,
    torchao_int8_per_token_activation,
    torchao_intx_weight,
)

__all__ = [
    "GGUF_BLOCK",
    "gguf_q4_0",
    "gguf_q8_0",
    "torchao_int4_weight",
    "torchao_int8_per_token_activation",
    "torchao_intx_weight",
]
