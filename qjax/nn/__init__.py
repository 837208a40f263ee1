"""Flax integration: quantized Linen and NNX layers, and quantizing an existing model."""

from qjax.nn import linen, nnx
from qjax.nn.common import METHODS, LayerQuant, Method, resolve
from qjax.nn.rewrite import QuantizedLinenModel, quantize_model

__all__ = [
    "METHODS",
    "LayerQuant",
    "Method",
    "QuantizedLinenModel",
    "linen",
    "nnx",
    "quantize_model",
    "resolve",
]
