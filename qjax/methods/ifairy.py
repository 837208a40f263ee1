"""iFairy: 2-bit complex weights in ``{+-1, +-i}`` (PhaseQuant), QAT and addition-only serving.

**PhaseQuant.** A complex weight ``w = a + ib`` is mapped to the fourth root of unity ``i^q``
nearest in phase, the one whose quarter-plane sector holds ``theta = arg(w)``; the sectors are
half-open as in the released code (``real_pos: -pi/4 <= theta < pi/4`` and so on)::

  q = 0 (+1):  a > 0,  -a <= b <  a          q = 2 (-1):  a < 0,   a <  b <= -a
  q = 1 (+i):  b > 0,  -b <  a <= b          q = 3 (-i):  b < 0,   b <= a <  -b
  w = 0:       q = 0 (angle(0) = 0)

i.e. a point on a diagonal goes to the root counter-clockwise of it (``1 + 1j -> +i``). The
sectors are decided by exact comparisons of ``a`` and ``b``, not by a float ``atan2`` (whose
rounding near ``+-pi/4`` would move diagonal points). Per block (``granularity``), two scales::

  s_re = mean(|a|  over entries with q in {0, 2})       (0 if there are none)
  s_im = mean(|b|  over entries with q in {1, 3})
  W_q  = s_re (+1 | -1)  or  i s_im (+1 | -1)           (one of the four, by q)
  dL/dW = dL/dW_q                                        (identity straight-through estimator)

Blocks: ``"tensor"`` (the paper's per-tensor scales; every matrix of a stack ``(..., K, N)`` on its
own) or ``"channel"`` (per output feature, over ``K``). Worked example (``"tensor"``):
``W = [[1+0.5j, -3+1j], [0.2+2j, 0.5-4j]]`` has codes ``[[0, 2], [1, 3]]``, ``s_re = 2``,
``s_im = 3`` and ``W_q = [[2, -2], [3j, -3j]]``.

Differences from the released code: no ``1e-5`` floor on the scales (an all-zero block gives
zeros; the released code gives ``1e-5``, and NaN when no entry has a real code, since
``mean`` of nothing is NaN there); signed zeros (``atan2(+-0, -0) = +-pi``) count as zero.

**Complex gradients.** For a real loss ``L`` of complex ``w = a + ib``, ``jax.grad`` returns
``dL/da - i dL/db``, the conjugate of the steepest-ascent direction. The STE passes this cotangent
unchanged, which is the released code's ``(grad_real, grad_imag) -> (grad_real, grad_imag)``.
Optax applies updates as given, so gradient descent on complex parameters needs the conjugate:
chain :func:`conjugate_gradients` in front of the optimizer.

**Serving.** Each code makes the product ``x w_q`` a swap or negation of ``(x_re, x_im)``:
``x * 1 = (x_re, x_im)``, ``x * (-1) = (-x_re, -x_im)``, ``x * i = (-x_im, x_re)``,
``x * (-i) = (x_im, -x_re)``. :func:`ifairy_serve` sums these (additions only) into one
accumulator for the real codes and one for the imaginary codes, and applies ``s_re`` and ``s_im``
once per output.

References:
  Wang, F., Wang, G., Zhang, Y., Wang, S., Li, W., Huang, B., Chen, S., Jiang, Z., Xu, R.,
  Yang, T. (2025). iFairy: the First 2-bit Complex LLM with All Parameters in {+-1, +-i}.
  arXiv:2508.05571 (code: github.com/PKU-LLM-DS-LAB/Fairy-plus-minus-i, ``DirectionQuantSTE``).
"""

from qjax._src.methods.ifairy import (
    CODE_VALUES,
    GRANULARITIES,
    ComplexLinear,
    Granularity,
    complex_dense,
    conjugate_gradients,
    ifairy,
    ifairy_dequantize,
    ifairy_quantize,
    ifairy_serve,
)

__all__ = [
    "CODE_VALUES",
    "complex_dense",
    "ComplexLinear",
    "conjugate_gradients",
    "GRANULARITIES",
    "Granularity",
    "ifairy",
    "ifairy_dequantize",
    "ifairy_quantize",
    "ifairy_serve",
]
