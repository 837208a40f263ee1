"""Tile math shared by the Pallas kernels: decode a weight tile, multiply, apply the epilogue.

These functions take and return arrays (not refs), so the TPU kernel (grid over K with a VMEM
accumulator) and the GPU kernel (loop over K inside the program) run the very same arithmetic.
Shapes per K step: activation phases ``xs[p]`` ``(bm, bk/per)``, stored weight bytes ``c``
``(bk/per, bn)``, scales / zero points ``(bk/g, bn)`` (or ``(1, bn)`` per channel).

References:
  Panferov et al., 2025. QuEST (odd codes: ``(s_a/2)(s_b/2) sum(u_a u_b)``, no correction term).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax._src import estimators as E
from qjax._src import formats as F
from qjax._src.int8 import int8_operand
from qjax._src.kernels.cases import Case, phase_codes

__all__ = ["accumulator_dtype", "partial_product", "epilogue", "compute_dtype"]


def accumulator_dtype(case: Case):
    return jnp.int32 if case.kind == "int" else jnp.float32


def compute_dtype(case: Case, x_dtype):
    """MXU input dtype of the float kind: the promoted type of x and ``dequantize(w)``."""
    return jnp.result_type(x_dtype, jnp.dtype(case.w_dtype))


def _expand(a: jax.Array, rows: int, case: Case) -> jax.Array:
    """Repeats each group row of ``a (bk/g, bn)`` over the group's ``g/per`` rows of a phase."""
    if case.group is None:
        return a
    per_group = case.group // case.per
    return jnp.broadcast_to(a[:, None, :], (a.shape[0], per_group, a.shape[1])).reshape(
        rows, a.shape[1])


def _dot(a: jax.Array, b: jax.Array, acc_dtype) -> jax.Array:
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=acc_dtype)


def dequantized_phase(c, s, z, p: int, case: Case, cdtype) -> jax.Array:
    """Dequantized weights ``(bk/per, bn)`` of phase ``p``: ``decode(q) * s``, as dequantize."""
    fmt = case.weight_format
    if isinstance(fmt, F.FloatFormat):
        q = c.astype(jnp.float32)
    else:
        q = phase_codes(c, p, case).astype(jnp.float32)
    rows = c.shape[0]
    zz = None if z is None else _expand(z, rows, case)
    w = E.decode(q, _expand(s, rows, case), zz, fmt)
    return w.astype(jnp.dtype(case.w_dtype)).astype(cdtype)


def partial_product(xs: list, c: jax.Array, s: jax.Array, z, case: Case) -> jax.Array:
    """One K step of the product: ``sum_p xs[p] @ W_p`` in the accumulator dtype ``(bm, bn)``.

    Float kind: ``W_p`` dequantized (scales applied here, per group). Integer kind: ``W_p`` the
    int8 codes (odd ``2q + 1`` for midrise), scales left to :func:`epilogue`. fp8 kind: the fp8
    codes themselves.
    """
    acc_dtype = accumulator_dtype(case)
    if case.kind == "fp8":
        return _dot(xs[0], c, acc_dtype)
    acc = None
    for p, xp in enumerate(xs):
        if case.kind == "int":
            w = int8_operand(phase_codes(c, p, case), s, case.weight_format)[0]
        else:
            cdtype = xp.dtype
            w = dequantized_phase(c, s, z, p, case, cdtype)
        term = _dot(xp, w, acc_dtype)
        acc = term if acc is None else acc + term
    return acc


def epilogue(acc: jax.Array, xscale, wscale, case: Case, out_dtype) -> jax.Array:
    """``acc * s_x * s_w`` (integer and fp8 kinds; midrise weights use ``s_w/2``) or ``acc``."""
    if case.kind == "float":
        return acc.astype(out_dtype)
    if case.odd_weight:
        wscale = wscale * 0.5
    return (acc.astype(jnp.float32) * xscale * wscale).astype(out_dtype)
