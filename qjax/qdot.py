"""QAT matmul with an integer forward: fake-quant semantics, real int8 dot.

``qat_dense(x, kernel, weight_spec, activation_spec)`` computes what
``fake_quant(x, a) @ fake_quant(kernel, w)`` computes, but the forward multiplies the int8 codes
with ``lax.dot_general(..., preferred_element_type=int32)`` and applies the scales after: for
integer grids ``y = s_x s_w sum(q_x q_w)``; for QuEST's midrise grid the codes are stored as the
odd integers ``u = 2q + 1`` and ``y = (s_x/2)(s_w/2) sum(u_x u_w)`` (no correction term). The
integer sum is exact while ``K * max|code_x| * max|code_w| <= 2^31 - 1`` (int8 codes reach -128,
so ``K <= 131,071`` for W8A8; QuEST's 4-bit odd codes reach 15, ``K <= 9,544,371``), which
:func:`check_int32_sum` enforces at trace time; so the result differs from the fake-quant float
matmul only by float rounding. The backward is the fake-quant matmul's, with each
operand's estimator mask: ``dx = (g @ w_q^T) * M_x`` and ``dW = (x_q^T @ g) * M_w``.

CPU int8 dots are faster than float32 ones for more than a couple of rows (design.md section 5),
so this is the option the QAT benchmark measures against Qwix's quantized-forward training.

Supported (:func:`integer_forward_reason` returns None): both operands quantized; signed integer
(<= 8 bits), ternary or midrise (<= 7 bits) grids; symmetric scale rules; nearest rounding;
activations per token (``PerRow(-1)``) or per tensor; kernel ``(K, N)`` per output channel
(``PerRow(0)``) or per tensor; STE, clipped STE or trust estimators. Rotations (QuEST's half
Hadamard) are applied by the caller before this op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qjax import estimators as E
from qjax import formats as F
from qjax import granularity as G
from qjax import scales as S
from qjax import spec as SP
from qjax import typed_sharding
from qjax._checks import check_floating

__all__ = [
    "qat_dense", "integer_forward_reason", "operand_codes", "int8_operand", "int8_matmul",
    "int8_code_max", "check_int32_sum",
]


def int8_code_max(fmt: F.Format) -> int | None:
    """Largest ``|code|`` of ``fmt`` as an int8 matmul operand, or None if it has no int8 code.

    Signed integers reach ``-2^(b-1)``; midrise codes enter as the odd ``u = 2q + 1``, up to
    ``2^b - 1`` (so at most 7 bits fit int8); ternary codes are ``{-1, 0, 1}``.
    """
    if isinstance(fmt, F.IntFormat) and fmt.signed:
        return -fmt.qmin
    if isinstance(fmt, F.Ternary):
        return 1
    if isinstance(fmt, F.Midrise) and fmt.bits <= 7:
        return 2**fmt.bits - 1
    return None


INT32_MAX = 2**31 - 1


def check_int32_sum(k: int, x_format: F.Format, w_format: F.Format) -> None:
    """ValueError if a K-term sum of code products could overflow the int32 accumulator."""
    bound = int8_code_max(x_format) * int8_code_max(w_format)
    if k * bound > INT32_MAX:
        raise ValueError(
            f"K = {k} is too large for an exact int32 accumulation of {x_format.name} x "
            f"{w_format.name} codes (|product| up to {bound}): the limit is K <= "
            f"{INT32_MAX // bound} (K * max|code_x| * max|code_w| <= 2^31 - 1); split the "
            "contraction or use the fake-quant path")


def _format_reason(spec: SP.QuantSpec) -> str | None:
    if int8_code_max(spec.format) is not None:
        return None
    return f"format {spec.format.name} has no exact int8 code"


def integer_forward_reason(weight: SP.QuantSpec | None,
                           activation: SP.QuantSpec | None) -> str | None:
    """Why the integer forward cannot serve these specs, or None if it can.

    Raises:
      TypeError: a spec that is neither a QuantSpec nor None.
    """
    SP.check_spec(weight, "weight", optional=True)
    SP.check_spec(activation, "activation", optional=True)
    if weight is None or activation is None:
        return "both the weight and the activation must be quantized"
    for name, spec, ok in (("activation", activation, (G.PerRow(-1), G.PerTensor())),
                           ("weight", weight, (G.PerRow(0), G.PerTensor()))):
        reason = _format_reason(spec)
        if reason:
            return f"{name}: {reason}"
        if spec.granularity not in ok:
            return f"{name}: granularity {spec.granularity} is not one of {ok}"
        if isinstance(spec.scale, S.AbsMax) and not spec.scale.symmetric:
            return f"{name}: a zero point needs a correction term"
        if spec.rounding != "nearest":
            return f"{name}: {spec.rounding} rounding"
        if spec.scale_dtype is not None or isinstance(spec.scale, (S.GgmlMax, S.TorchAOAffine)):
            return f"{name}: runtime presets (GGML / torchao scales) use the fake-quant path"
        if isinstance(spec.estimator, SP.LEARNED_SCALE_ESTIMATORS):
            return f"{name}: learned scales (LSQ/PACT) are not supported"
        if spec.hadamard is not None and spec.hadamard_mode != "half":
            return f"{name}: the full Hadamard form rotates back before the matmul"
    return None


def operand_codes(a32: jax.Array, spec: SP.QuantSpec, axis: int) -> tuple[jax.Array, jax.Array]:
    """Float32 codes and scale of one operand, one scale per slice along ``axis`` (or per tensor).

    The same ops as :func:`qjax.quantize` with ``PerRow(axis)`` or ``PerTensor()``, without
    rotation (the caller rotates).
    """
    axes = tuple(range(a32.ndim)) if isinstance(spec.granularity, G.PerTensor) else (
        axis % a32.ndim,)
    scale, _ = spec.scale.compute(a32, axes, spec.format)
    return E.encode(a32, scale, None, spec.format), scale


def int8_operand(q: jax.Array, scale: jax.Array, fmt: F.Format) -> tuple[jax.Array, jax.Array]:
    """(int8 codes, multiplier) with ``decode(q) * scale == codes * multiplier``.

    Midrise codes become the odd integers ``u = 2q + 1`` with multiplier ``scale / 2``.
    """
    if isinstance(fmt, F.Midrise):
        return (2.0 * q + 1.0).astype(jnp.int8), scale * 0.5
    return q.astype(jnp.int8), scale


def int8_matmul(xi: jax.Array, xs: jax.Array, wi: jax.Array, ws: jax.Array,
                w_contract: int, out_sharding=None) -> jax.Array:
    """``(xi . wi) * xs * ws`` with an exact int8 x int8 -> int32 dot, float32 result.

    Args:
      xi: int8 ``(..., K)``; xs: float32 multipliers broadcastable to ``(..., 1)``.
      wi: int8 ``(K, N)`` (``w_contract=0``) or ``(N, K)`` (``w_contract=1``).
      ws: float32 multipliers, ``N`` (per output channel) or 1 elements.
      out_sharding: output sharding on explicit meshes (default
        :func:`qjax.typed_sharding.dot_out_spec`).
    """
    acc = typed_sharding.dot_general(xi, wi, (((xi.ndim - 1,), (w_contract,)), ((), ())),
                                     preferred_element_type=jnp.int32, out_sharding=out_sharding)
    y = acc.astype(jnp.float32) * xs * ws.reshape(-1)
    if out_sharding is not None:  # the scales' shardings must not override the caller's choice
        y = jax.sharding.reshard(y, out_sharding)
    # Under jit XLA would fuse this product into a following add (the residual) as an FMA, which
    # eager mode never does; max with -FLT_MAX (the identity on finite values and NaN) prevents
    # it, so jit and eager agree as they do for a float dot's output.
    return jnp.maximum(y, jnp.finfo(jnp.float32).min)


def _codes(a32: jax.Array, spec: SP.QuantSpec, axis: int):
    """(fake-quant values, backward mask, int8 codes, multiplier) of one operand."""
    fmt = spec.format
    q, scale = operand_codes(a32, spec, axis)
    values = E.decode(q, scale, None, fmt)
    mask = E._mask(a32, values, scale, None, fmt, spec.estimator)
    return (values, mask) + int8_operand(q, scale, fmt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _qat_dense(x32, kernel32, weight, activation, out_sharding):
    return _forward(x32, kernel32, weight, activation, out_sharding)[0]


def _forward(x32, kernel32, weight, activation, out_sharding):
    xv, xm, xi, xs = _codes(x32, activation, -1)
    wv, wm, wi, ws = _codes(kernel32, weight, 0)
    return int8_matmul(xi, xs, wi, ws, 0, out_sharding), (xv, xm, wv, wm)


def _qat_dense_fwd(x32, kernel32, weight, activation, out_sharding):
    return _forward(x32, kernel32, weight, activation, out_sharding)


def _qat_dense_bwd(weight, activation, out_sharding, res, g):
    xv, xm, wv, wm = res
    # Each cotangent gets its operand's sharding type (explicit meshes, shard_map).
    dx = typed_sharding.dot_general(g, wv, (((g.ndim - 1,), (1,)), ((), ())))
    lead = tuple(range(g.ndim - 1))
    dw = typed_sharding.dot_general(xv, g, ((lead, lead), ((), ())))
    dx = dx if xm is None else jnp.where(xm, dx, 0.0)
    dw = dw if wm is None else jnp.where(wm, dw, 0.0)
    return typed_sharding.cotangent_like(dx, xv), typed_sharding.cotangent_like(dw, wv)


_qat_dense.defvjp(_qat_dense_fwd, _qat_dense_bwd)


def qat_dense(x: jax.Array, kernel: jax.Array, weight: SP.QuantSpec,
              activation: SP.QuantSpec, *, out_sharding=None) -> jax.Array:
    """``Q_a(x) @ Q_w(kernel)`` with an int8 x int8 -> int32 forward (see the module docstring).

    Args:
      x: ``(..., K)`` floating input, already rotated if the specs use the half Hadamard form.
      kernel: ``(K, N)`` floating kernel, rotated likewise.
      weight, activation: specs accepted by :func:`integer_forward_reason`.
      out_sharding: output sharding on explicit meshes (``PartitionSpec`` or ``NamedSharding``);
        by default :func:`qjax.typed_sharding.dot_out_spec`.

    Returns:
      ``(..., N)`` in ``x``'s dtype.

    Raises:
      TypeError: ``x`` or ``kernel`` not a floating array, a spec that is not a QuantSpec.
      ValueError: specs the integer forward cannot serve, mismatched shapes, or a K for which the
        int32 sum could overflow (:func:`check_int32_sum`).
    """
    check_floating(x, "x")
    check_floating(kernel, "kernel")
    reason = integer_forward_reason(weight, activation)
    if reason:
        raise ValueError(f"integer forward not available: {reason}")
    if kernel.ndim != 2 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"need x (..., K) and kernel (K, N), got {x.shape} and {kernel.shape}")
    check_int32_sum(kernel.shape[0], activation.format, weight.format)
    plain = lambda s: s.replace(hadamard=None)  # rotation already applied by the caller
    y = _qat_dense(x.astype(jnp.float32), kernel.astype(jnp.float32), plain(weight),
                   plain(activation), out_sharding)
    return y.astype(x.dtype)
