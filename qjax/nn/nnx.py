"""Quantized Flax NNX layers: ``QDense``, ``QEinsum``, ``QConv``, ``QEmbed``, and the wrapper
:class:`QuantizedLayer` that :func:`qjax.nn.quantize_model` puts around existing NNX layers.

Parameters mirror the Linen layers of :mod:`qjax.nn.linen` (``kernel``, ``bias``, ``embedding``,
``kernel_scale``, ``input_scale``), so the same values give the same outputs in both APIs. Each
module has a plain attribute ``qat`` (default True); :func:`set_qat` flips it on every quantized
layer of a model, so a run can train in float first and switch to QAT later.

Layers with a quantized backward (``backward="int8"``) key their stochastic rounding from an
``nnx.Rngs`` given by :func:`set_quant_rngs` (stream ``"quant"``, else ``"default"``): every
call draws the next key of the stream, so successive training steps get new noise and the same
seed replays the same gradients.
"""

from qjax._src.nn.nnx import (
    FrozenWeight,
    LowRankLayer,
    MultiPrecisionLayer,
    QConv,
    QDense,
    QEinsum,
    QEmbed,
    QuantizedLayer,
    set_bits,
    set_qat,
    set_quant_rngs,
)

__all__ = [
    "FrozenWeight",
    "LowRankLayer",
    "MultiPrecisionLayer",
    "QConv",
    "QDense",
    "QEinsum",
    "QEmbed",
    "QuantizedLayer",
    "set_bits",
    "set_qat",
    "set_quant_rngs",
]
