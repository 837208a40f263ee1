"""Quantized Flax Linen layers: ``QDense``, ``QEinsum``, ``QConv``, ``QEmbed``.

Each takes a weight spec and an activation spec (either may be None) or a ``method``
(``"quest"``, ``"lsq"``, ``"pact"``, ``"ste"`` or a :class:`~qjax.nn.Method`). Parameters have the
names and initializers of the matching Flax layer (``kernel``, ``bias``, ``embedding``) plus the
learned quantizer parameters ``kernel_scale`` / ``input_scale`` when the specs need them. Call with
``qat=False`` to run the float layer on the same parameters.

A ``QDense`` or ``QEinsum`` whose recipe has the quantized backward (``Method(...,
integer_forward=True, backward="int8")``) draws the key of its stochastic rounding from the
``"quant"`` rng stream of the ``apply`` (``rngs={"quant": key}``), as the layers of
:func:`qjax.nn.quantize_model` do; without that stream, differentiating it raises.
"""

from qjax._src.nn.linen import (
    QConv,
    QDense,
    QEinsum,
    QEmbed,
)

__all__ = [
    "QConv",
    "QDense",
    "QEinsum",
    "QEmbed",
]
