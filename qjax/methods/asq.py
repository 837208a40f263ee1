"""ASQ: adaptive step size activations and the POST (power-of-sqrt(2)) weight format.

The paper quantizes weights with POST and activations with ASQ.

**POST(b)** is a symmetric non-uniform grid, in units of a step ``s`` (values ``s * level``),
with ``K = 2^(b-1) - 1`` non-zero magnitudes, the largest 1::

  levels = {0} U {+-2^(-k/2) : k = 0, ..., K - 1}      (2K + 1 levels: 15 of 16 codes at 4 bits)
  3 bits: 0, +-1/2, +-2^(-1/2), +-1           4 bits: 0, +-2^(-k/2), k = 0..6 (down to 1/8)

So ``s`` is also the clipping value (the largest level is 1). Codes are signed int8 ``c`` in
``[-K, K]`` (they fit ``b``-bit two's complement; ``-2^(b-1)`` is unused) and stand for
``sign(c) * m[|c|]`` with ``m = [0, 2^(-(K-1)/2), ..., 2^(-1/2), 1]``. Rounding is to the nearest
level by table lookup: ``|c| = #{j : mid_j <= |v|}``, ``v = x * (1/s)``, with the ``K`` midpoints
``mid_j = (m_j + m_{j+1}) / 2`` rounded to float32 (``jnp.searchsorted(mid, |v|, "right")``).
**Ties** (``|v|`` equal to a float32 midpoint) go to the larger magnitude, i.e. away from zero,
for both signs; ``|v| >= 1`` gives ``+-1`` (the clip). Dequantization is ``levels[c + K] * s``.

Learned step (the released ``post_quantization``: clamp, STE rounding, LSQ gradient scale)::

  y     = s * level(clip(x/s, -1, 1))
  dx    = g * 1[|x/s| <= 1]
  ds    = sum g * (level - x/s * 1[|x/s| <= 1]) / sqrt(N)        (N: elements per step)

which is the exact derivative of the STE surrogate ``s * (level - c + c(s))``,
``c(s) = clip(x/s, -1, 1)`` with ``level - c`` held constant.

**ASQ** (activations): a uniform integer grid ``[n, p]`` (``uint b``: ``[0, 2^b - 1]``; signed:
``[-2^(b-1), 2^(b-1) - 1]``) with step ``s_a = s * beta(x)``, ``s`` a learned per-tensor step and
``beta`` the output of a small adapter network of the activation::

  y     = s_a * round(clip(x / s_a, n, p))                      (round half to even)
  t     = g * (round(clip(v, n, p)) - v * 1[n <= v <= p]),  v = x / s_a
  dx    = g * 1[n <= v <= p]
  ds    = sum t * beta / sqrt(N * p)       dbeta = sum_row t * s     (no gradient scale on beta)

``beta(x) = max(ReLU(W2 ReLU(W1 h + b1) + b2), 1e-8)`` with ``h`` the features (``x`` itself per
token, or the mean over ``pool_axes``, e.g. the spatial axes of a convolution's input),
``W1: (C, C/4)``; a single linear layer when ``C < 8``. ``W2 ~ N(0, 0.01)``, ``b2 = 1`` so that
``beta`` starts near 1; ``s`` starts at LSQ's ``2 mean|x| / sqrt(p)`` (:func:`asq_init_step`).

Both forwards clamp the step (``clamp_scale``) so a zero or negative step cannot give NaN; the
gradients are the formulas above at the clamped step. Inputs are float32, bfloat16 or float16,
computed in float32 and cast back saturating.

References:
  Zhou, W., Yu, Z., Liu, X., Yang, J., Xiao, R., Wang, T., Tang, C., Lv, J. (2025). Precision
  Neural Network Quantization via Learnable Adaptive Modules. arXiv:2504.17263 (code:
  github.com/SENGEL13/ASQ-POST, ``asq.py``, ``post.py``).
  Esser, S. K., et al. (2020). Learned Step Size Quantization. ICLR.
"""

from qjax._src.methods.asq import (
    BETA_MIN,
    POST,
    AdaptiveStep,
    ASQActivation,
    asq_fake_quant,
    asq_init_step,
    post_dequantize,
    post_fake_quant,
    post_init_step,
    post_quantize,
)

__all__ = [
    "AdaptiveStep",
    "asq_fake_quant",
    "asq_init_step",
    "ASQActivation",
    "BETA_MIN",
    "POST",
    "post_dequantize",
    "post_fake_quant",
    "post_init_step",
    "post_quantize",
]
