"""Plain ``jnp`` / XLA references of every kernel case (also the ``"xla"`` backend).

Each is written from :func:`qjax.dequantize`, :meth:`QArray.codes_float32` and
:func:`~qjax._src.kernels.activation.activation_codes` directly, independently of the kernels' tile
layout, so a kernel is checked against something it does not share code with.

* float kind: ``x @ dequantize(w).T`` with float32 accumulation.
* int kind: the op of QAT's integer forward, :func:`qjax._src.int8.matmul` (int8 codes, int32
  accumulation, exact: :func:`qjax.kernels.classify` refuses a K whose sum could overflow; then
  ``acc * s_x * s_w``), on the activation codes of ``x`` in its own shape. With the same codes
  (``w`` the transposed codes and scales of the training kernel) the result equals
  :func:`qjax._src.qdot.qat_dense`'s forward bit for bit. A single row is padded to two rows: the
  CPU
  int8 dot is about 10x slower at M = 1 (its GEMV path is not vectorised) than at M = 2.
* fp8 kind: the fp8 codes upcast to float32 (exact), float32 dot, then ``acc * s_x * s_w``.

References:
  Micikevicius et al., 2022. FP8 Formats for Deep Learning (e4m3 with per-row scaling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax._src import int8
from qjax._src.kernels.activation import activation_codes
from qjax._src.kernels.cases import Case
from qjax._src.qarray import QArray
from qjax._src.quantize import dequantize

__all__ = ["matmul", "matmul_2d", "weight_channel_scale"]

_NT = (((1,), (1,)), ((), ()))  # contract the last axes: x (M, K) with w (N, K)


def weight_channel_scale(w: QArray, n: int) -> jax.Array:
    """Per-output-channel float32 weight scale ``(1, N)`` (per-tensor scales broadcast)."""
    return jnp.broadcast_to(w.scale.reshape(-1), (n,)).reshape(1, n).astype(jnp.float32)


def _int_2d(xc: jax.Array, xs: jax.Array, w: QArray, case: Case) -> jax.Array:
    """float32 ``(M, N)`` of int8 codes ``xc (M, K)`` and multipliers ``xs (M, 1)``."""
    m = xc.shape[0]
    wc, ws = int8.int8_operand(w.codes_float32(), weight_channel_scale(w, case.n),
                               case.weight_format)
    if m == 1:  # padding rows only add rows: the int32 sums and the epilogue are elementwise
        xc = jnp.pad(xc, ((0, 1), (0, 0)))
        xs = jnp.pad(xs, ((0, 1), (0, 0)), constant_values=1.0)
    return int8.matmul(xc, xs, wc, ws, 1)[:m]


def matmul(x: jax.Array, w: QArray, case: Case, out_dtype) -> jax.Array:
    """``x (..., K) @ dequantize(w).T`` per :class:`Case`; returns ``(..., N)`` in ``out_dtype``.

    The activation codes are computed on ``x`` itself (not a reshaped copy), so per-tensor
    statistics are those :func:`qjax._src.qdot.qat_dense` computes on the same ``x``; the products
    run on ``(M, K)`` rows.
    """
    lead = x.shape[:-1]
    if case.kind == "float":
        wd = dequantize(w)
        cdtype = jnp.result_type(x.dtype, wd.dtype)
        y = jax.lax.dot_general(x.reshape(-1, case.k).astype(cdtype), wd.astype(cdtype), _NT,
                                preferred_element_type=jnp.float32)
        return y.astype(out_dtype).reshape(lead + (case.n,))
    xc, xs = activation_codes(x.astype(jnp.float32), case.act_spec)
    xc, xs = xc.reshape(-1, case.k), xs.reshape(-1, 1)
    if case.kind == "int":
        y = _int_2d(xc, xs, w, case)
    else:
        acc = jax.lax.dot_general(xc.astype(jnp.float32), w.codes_float32(), _NT,
                                  precision=jax.lax.Precision.HIGHEST)
        y = acc * xs * weight_channel_scale(w, case.n)
    return y.astype(out_dtype).reshape(lead + (case.n,))


def matmul_2d(x2: jax.Array, w: QArray, case: Case, out_dtype) -> jax.Array:
    """:func:`matmul` of a 2-D ``x2 (M, K)``: ``(M, N)`` in ``out_dtype``."""
    if x2.ndim != 2:
        raise ValueError(f"x2 must be 2-D (M, K), got shape {x2.shape}")
    return matmul(x2, w, case, out_dtype)
