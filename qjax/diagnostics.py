"""Diagnostics for QAT: gradient alignment and the quantization error on real activations.

:func:`gradient_cosine` evaluates the gradient of a loss twice on the same parameters and batch,
once with quantization (the estimators' backward rules) and once in float, and returns the cosine
similarity per layer. An estimator whose gradient points where the float gradient points lets QAT
follow the float optimisation path; QuEST's trust estimator is meant to align better than STE at
low bit widths.

:func:`dense_inputs` captures what every linear layer of a Linen model sees, and
:func:`clip_error` measures a QuEST-style quantizer's relative error on such inputs as the clip
(in RMS units) varies: whether the Gaussian-optimal clip is also the best one on real data.
"""

from qjax._src.diagnostics import (
    clip_error,
    dense_inputs,
    gradient_cosine,
)

__all__ = [
    "clip_error",
    "dense_inputs",
    "gradient_cosine",
]
