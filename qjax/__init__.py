"""qjax: quantization-aware training for JAX.

The public API: the numerics core re-exported here (formats, granularities, scale rules,
estimator specs, ``quantize`` / ``dequantize`` / ``fake_quant``, ``QArray``, Hadamard
transforms) and the public modules ``qjax.nn``, ``qjax.convert``, ``qjax.kernels``,
``qjax.methods``, ``qjax.precision``, ``qjax.models``, ``qjax.estimators``, ``qjax.optim``,
``qjax.presets``, ``qjax.sharding``, ``qjax.diagnostics``, ``qjax.attention``,
``qjax.checkpoint``, ``qjax.data``, ``qjax.config`` and ``qjax.train`` (the training program).
The implementation lives in ``qjax._src``, which is private: its layout may change between
releases; nothing is defined in the public files.
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
from qjax._src.formats import POST, FloatFormat, IntFormat, Midrise, Ternary
from qjax._src.granularity import PerAxis, PerGroup, PerRow, PerTensor
from qjax._src.hadamard import hadamard_matrix, hadamard_transform, random_signs
from qjax._src.qarray import QArray, pack_bits, unpack_bits
from qjax._src.quantize import compute_scale, dequantize, fake_quant, quantize
from qjax._src.scales import (
    AbsMax,
    GgmlMax,
    MeanAbs,
    MseSearch,
    Percentile,
    RmsGaussian,
    TorchAOAffine,
    gaussian_clip,
    lsq_init,
    optimal_gaussian_clip,
)
from qjax._src.spec import LSQ, PACT, STE, ClippedSTE, QuantSpec, Trust

__version__ = "0.1.0"
from qjax._src.qarray import relayout

__all__ = [
    "relayout",
    "AbsMax",
    "ClippedSTE",
    "FloatFormat",
    "GgmlMax",
    "IntFormat",
    "LSQ",
    "MeanAbs",
    "Midrise",
    "PACT",
    "POST",
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
    "sharding",
    "unpack_bits",
]
