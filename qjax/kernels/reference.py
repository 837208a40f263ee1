"""Plain ``jnp`` / XLA references of every kernel case (also the ``"xla"`` backend).

Each is written from :func:`qjax.dequantize`, :meth:`QArray.codes_float32` and
:func:`~qjax.kernels.activation.activation_codes` directly, independently of the kernels' tile
layout, so a kernel is checked against something it does not share code with.

* float kind: ``x @ dequantize(w).T`` with float32 accumulation.
* int kind: ``lax.dot_general`` on int8 codes with int32 accumulation (exact:
  :func:`qjax.kernels.classify` refuses a K whose sum could overflow), then ``acc * s_x * s_w``.
  A single row is padded to two rows: the CPU int8 dot is about 10x slower at M = 1 (its GEMV
  path is not vectorised) than at M = 2.
* fp8 kind: the fp8 codes upcast to float32 (exact), float32 dot, then ``acc * s_x * s_w``.

References:
  Micikevicius et al., 2022. FP8 Formats for Deep Learning (e4m3 with per-row scaling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.kernels.activation import activation_codes
from qjax.kernels.cases import Case
from qjax.qarray import QArray
from qjax.qdot import int8_operand
from qjax.quantize import dequantize

__all__ = ["matmul_2d", "weight_channel_scale"]

_NT = (((1,), (1,)), ((), ()))  # contract the last axes: x (M, K) with w (N, K)


def weight_channel_scale(w: QArray, n: int) -> jax.Array:
    """Per-output-channel float32 weight scale ``(1, N)`` (per-tensor scales broadcast)."""
    return jnp.broadcast_to(w.scale.reshape(-1), (n,)).reshape(1, n).astype(jnp.float32)


def matmul_2d(x2: jax.Array, w: QArray, case: Case, out_dtype) -> jax.Array:
    """``x2 (M, K) @ dequantize(w).T`` per :class:`Case`; returns ``(M, N)`` in ``out_dtype``."""
    if case.kind == "float":
        wd = dequantize(w)
        cdtype = jnp.result_type(x2.dtype, wd.dtype)
        y = jax.lax.dot_general(x2.astype(cdtype), wd.astype(cdtype), _NT,
                                preferred_element_type=jnp.float32)
        return y.astype(out_dtype)
    m = x2.shape[0]
    xc, xs = activation_codes(x2.astype(jnp.float32), case.act_spec.replace(hadamard=None))
    ws = weight_channel_scale(w, case.n)
    if case.kind == "int":
        wc, ws = int8_operand(w.codes_float32(), ws, case.weight_format)
        if m == 1:
            xc = jnp.pad(xc, ((0, 1), (0, 0)))
        acc = jax.lax.dot_general(xc, wc, _NT, preferred_element_type=jnp.int32)[:m]
    else:
        acc = jax.lax.dot_general(xc.astype(jnp.float32), w.codes.astype(jnp.float32), _NT,
                                  precision=jax.lax.Precision.HIGHEST)
    return (acc.astype(jnp.float32) * xs * ws).astype(out_dtype)
