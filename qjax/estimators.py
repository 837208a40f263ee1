"""Gradient estimators: fake-quant ops as ``jax.custom_vjp`` with explicit backward masks.

Every op here computes its forward from float32 codes and writes its backward out; none relies
on autodiff through ``jnp.clip`` or ``round``, nor on the ``x + stop_gradient(q - x)`` trick.

Shapes: ``x`` is any float32 array; ``scale`` (and ``zero_point``, ``offset``, ``alpha``) broadcast
against it. Cotangents of broadcast parameters are summed back to their own shapes.

Every function takes ``(x, scale, fmt, ...)``: the input, its scale (the learned step of LSQ,
the clipping level of PACT), the number format (an object or a name such as ``"int4"``), then
what the estimator adds (a zero point, the trust multiplier, a PRNG key, an offset).

* :func:`ste`, :func:`clipped_ste`, :func:`trust`: ``decode(encode(x / s)) * s`` with the
  backward of that estimator (identity, clipped, QuEST's trust or clip mask); no gradient to the
  scale.
* :func:`stochastic_rounding`: ``floor(x/s + u)``, ``u ~ U[0, 1)``, identity STE.
* :func:`lsq`, :func:`lsq_plus`: learned step (and offset) with LSQ's gradients.
* :func:`pact`: learned clipping level (unsigned activations, or signed with an ``"int"`` format).
* :func:`learned_scale_quant`: LSQ or PACT chosen by an estimator object.
"""

from qjax._src.estimators import (
    clipped_ste,
    learned_scale_quant,
    lsq,
    lsq_plus,
    pact,
    ste,
    stochastic_rounding,
    trust,
)

__all__ = [
    "clipped_ste",
    "learned_scale_quant",
    "lsq",
    "lsq_plus",
    "pact",
    "ste",
    "stochastic_rounding",
    "trust",
]
