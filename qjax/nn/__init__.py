"""Flax integration: quantized Linen and NNX layers, and quantizing an existing model.

* :func:`quantize_model`: quantize a Linen or NNX model by path rules; :func:`sites` lists the
  quantized layers (path, recipe, kernel layout, stacked axes).
* :class:`Method` / :class:`LayerQuant`: how a layer is quantized; :func:`resolve` fits one to
  a layer's :class:`KernelLayout`.
* :mod:`qjax.nn.linen` / :mod:`qjax.nn.nnx`: explicit quantized layers.
* :mod:`qjax.nn.ops`: the quantized-op core all of them call.
* :mod:`qjax.nn.lowrank`: LR-QAT and QALoRA recipes (``lr_qat(spec, rank=8)``) for pretrained
  weights; :func:`init_from_float` starts them from a float checkpoint (Linen).
"""

from qjax._src.nn.layout import (
    KernelLayout,
    conv_layout,
    dense_layout,
    einsum_layout,
    embed_layout,
    general_layout,
)
from qjax._src.nn.lowrank import LowRankQAT, lr_qat, qalora
from qjax._src.nn.pretrained import init_from_float
from qjax._src.nn.recipe import METHODS, LayerQuant, Method, default_hadamard_block, resolve
from qjax._src.nn.rewrite import QuantizedLinenModel, quantize_model, sites
from qjax._src.nn.site import Site
from qjax.nn import double_rounding, linen, lowrank, nnx, ops

__all__ = [
    "double_rounding",
    "METHODS",
    "KernelLayout",
    "LayerQuant",
    "LowRankQAT",
    "Method",
    "QuantizedLinenModel",
    "Site",
    "conv_layout",
    "default_hadamard_block",
    "dense_layout",
    "einsum_layout",
    "embed_layout",
    "general_layout",
    "init_from_float",
    "linen",
    "lowrank",
    "lr_qat",
    "nnx",
    "ops",
    "qalora",
    "quantize_model",
    "resolve",
    "sites",
]
