"""Double Rounding: one model, several weight bit widths, served from one integer checkpoint.

A layer keeps its float kernel and a learned scale ``s_h`` of its highest precision ``h``
(the storage precision, e.g. int8). Its weight at a precision ``l <= h`` is rounded twice, in the
kernel's matrix view ``(K, N)`` (:class:`qjax.nn.KernelLayout`):

    q_h = clip(round(W / s_h), qmin_h, qmax_h)
    q_l = clip(round(q_h / 2^(h-l)), qmin_l, qmax_l)
    W_l = q_l * (s_h * 2^(h-l))

so every lower precision is a shift of the stored ``q_h`` (a right shift with rounding in
hardware) and uses its whole range (``q_h / 2^(h-l)`` spans ``[qmin_l, qmax_l + 1)``). Both
roundings are straight-through inside their ranges (zero gradient outside), so ``s_h`` learns as
an LSQ step through every precision; it is initialized to ``max|W| / qmax_h`` per block, the full
``h``-bit range. Training runs one forward per precision and sums the losses
(:func:`joint_loss`); the precision of a forward is chosen at apply time (``bits=``). Serving
converts to ``h``-bit codes once and derives any lower precision from them
(:func:`lower_precision`), exactly the weights QAT used at that precision.

The paper's Adaptive Learning Rate Scaling of the scales per precision is not implemented.

References:
  Huang et al., 2025, "Nearly Lossless Adaptive Bit Switching" (arXiv 2502.01199).
"""

from qjax._src.nn.double_rounding import (
    DoubleRounding,
    codes,
    double_round,
    init_scale,
    joint_loss,
    lower_precision,
)

__all__ = [
    "codes",
    "double_round",
    "DoubleRounding",
    "init_scale",
    "joint_loss",
    "lower_precision",
]
