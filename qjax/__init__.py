"""qjax: quantization-aware training for JAX.

The public API is re-exported here; nothing is defined in this file. Implementation modules
(``qjax.int8``, ``qjax.qdot``, ``qjax.typed_sharding``, ``qjax.formats``, ``qjax.scales``, ...)
stay importable by their full names but are not part of the top-level surface.
"""

from qjax import (
    convert,
    diagnostics,
    estimators,
    kernels,
    methods,
    nn,
    optim,
    precision,
    presets,
    sharding,
)
from qjax.formats import FloatFormat, IntFormat, Midrise, Ternary
from qjax.granularity import PerAxis, PerGroup, PerRow, PerTensor
from qjax.hadamard import hadamard_matrix, hadamard_transform, random_signs
from qjax.qarray import QArray, pack_bits, unpack_bits
from qjax.quantize import compute_scale, dequantize, fake_quant, quantize, scale_shape
from qjax.scales import (
    AbsMax,
    GgmlMax,
    MseSearch,
    Percentile,
    RmsGaussian,
    TorchAOAffine,
    gaussian_clip,
    lsq_init,
    optimal_gaussian_clip,
)
from qjax.spec import LSQ, PACT, STE, ClippedSTE, QuantSpec, Trust

__version__ = "0.1.0"

__all__ = [
    "AbsMax",
    "ClippedSTE",
    "FloatFormat",
    "GgmlMax",
    "IntFormat",
    "LSQ",
    "Midrise",
    "PACT",
    "MseSearch",
    "PerAxis",
    "PerGroup",
    "PerRow",
    "PerTensor",
    "Percentile",
    "QArray",
    "QuantSpec",
    "RmsGaussian",
    "STE",
    "Ternary",
    "TorchAOAffine",
    "Trust",
    "compute_scale",
    "convert",
    "diagnostics",
    "dequantize",
    "estimators",
    "fake_quant",
    "gaussian_clip",
    "hadamard_matrix",
    "hadamard_transform",
    "kernels",
    "lsq_init",
    "methods",
    "nn",
    "optim",
    "optimal_gaussian_clip",
    "pack_bits",
    "precision",
    "presets",
    "quantize",
    "random_signs",
    "scale_shape",
    "sharding",
    "unpack_bits",
]
