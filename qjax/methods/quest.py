"""QuEST: Hadamard normalization, MSE-optimal Gaussian scales and the trust gradient estimator.

Per row (per token for activations, per output channel for weights) of the rotated values:
``std = sqrt(mean(x^2))``, ``c = a_b * std + 1e-8``, ``step = 2c / (2^b - 1)``; the midrise grid
``xq = round(clip(x, -c, c)/step + 1/2) * step - step/2``; backward ``g * 1[|xq - x| <= m*step/2]``
(the trust mask; ``m`` the trust multiplier) or, with ``clip_ratio``,
``g * 1[|x| <= clip_ratio * c]``.

Hadamard modes (``hadamard_mode``, blocks of ``hadamard_block``): ``"half"`` returns the rotated
quantized values (for a matmul both operands are rotated along the contraction axis, so
``(xH)(WH)^T = x W^T``); ``"full"`` rotates back; ``None`` skips the rotation.

``scale_rule=`` replaces the RMS rule (an extension, not the paper's method): ``"mse:8:0.6"`` picks,
per row, the clip with least squared error among 8 fractions of the row's absmax in [0.6, 1]
(:class:`~qjax.MseSearch`), which follows rows that training has made heavier-tailed than a
Gaussian.

References:
  Panferov et al., 2025. QuEST: Stable Training of LLMs with 1-Bit Weights and Activations.
"""

from qjax._src.methods.quest import (
    HADAMARD_MODES,
    dense,
    fake_quant,
    quantize_dense_operands,
    spec,
)

__all__ = [
    "dense",
    "fake_quant",
    "HADAMARD_MODES",
    "quantize_dense_operands",
    "spec",
]
