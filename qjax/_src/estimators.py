"""Implementation of :mod:`qjax.estimators` (documented there)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src import formats as F
from qjax._src import scales as S
from qjax._src import spec as SP
from qjax._src import typed_sharding
from qjax._src._checks import check_finite_positive, check_int

__all__ = [
    "estimator_mask",
    "check_static_scale",
    "quantize_dequantize",
    "encode",
    "decode",
    "ste",
    "clipped_ste",
    "trust",
    "stochastic_rounding",
    "lsq",
    "lsq_plus",
    "pact",
    "learned_scale_quant",
]


def encode(x, scale, zero_point, fmt: F.Format, noise=None, rounding: str = "nearest"):
    """Float32 codes of ``x``: nearest-even, or ``floor(x/s + noise)`` when ``noise`` is given.

    Integer formats also take ``rounding="half_away"`` or ``"half_up"`` (see
    :meth:`qjax.IntFormat.encode`).

    ``x / scale`` is computed as ``x * (1 / scale)``: XLA rewrites a division by a broadcast scale
    into that product under ``jit`` but not always in eager mode, so writing it out makes codes
    identical in both. Codes of uniform formats pass through int32, so they are canonical integers
    (no ``-0.0``), the same values a stored :class:`~qjax.QArray` holds.
    """
    v = x * (1.0 / scale)
    if noise is not None:
        q = fmt.encode_floor(v + noise, zero_point)
    elif rounding != "nearest":
        q = fmt.encode(v, zero_point, rounding=rounding)
    else:
        q = fmt.encode(v, zero_point)
    if fmt.uniform:
        q = q.astype(jnp.int32).astype(jnp.float32)
    return q


def decode(q, scale, zero_point, fmt: F.Format):
    """Values of float32 codes ``q``: ``decode(q) * scale``."""
    return fmt.decode(q, zero_point) * scale


def _sum_to(t: jax.Array, like: jax.Array) -> jax.Array:
    """Sums ``t`` over the axes that were broadcast to reach ``t.shape`` from ``like``'s shape,
    giving the result ``like``'s sharding type (a cotangent of the parameter ``like``)."""
    shape = jnp.shape(like)
    lead = t.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, d in enumerate(shape) if d == 1 and t.shape[i + lead] != 1
    )
    t = jnp.sum(t, axis=axes, keepdims=True).reshape(shape) if axes else t.reshape(shape)
    return typed_sharding.cotangent_like(t, like)


def estimator_mask(x, y, scale, zero_point, fmt, estimator):
    """The backward mask of ``estimator`` for input ``x`` and fake-quant values ``y`` (bool, like
    ``x``), or None where the gradient passes everywhere (STE)."""
    if isinstance(estimator, SP.ClippedSTE):
        lo, hi = fmt.range_in_scale_units(zero_point)
        v = x * (1.0 / scale)
        if estimator.on_codes:
            v = jnp.round(v)
        return (v >= lo) & (v <= hi)
    if isinstance(estimator, SP.Trust):
        if estimator.clip_ratio is not None:
            return jnp.abs(x) <= estimator.clip_ratio * fmt.max_level * scale
        return jnp.abs(y - x) <= estimator.multiplier * 0.5 * scale
    return None


def check_static_scale(name: str, scale) -> None:
    """Refuses a scale given as a Python or numpy number that is not positive and finite.

    Arrays (and tracers) are not inspected: that would branch on traced values.
    """
    if isinstance(scale, (int, float, np.bool_, np.number)):  # bools are refused there
        check_finite_positive(name, scale)


def _zeros_like(a):
    return None if a is None else jnp.zeros_like(a)


def _qdq_values(x, scale, zero_point, noise, fmt, rounding, scale_dtype):
    q = encode(x, scale, zero_point, fmt, noise, rounding)
    return decode(q, S.store_scale(scale, scale_dtype), zero_point, fmt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _qdq(x, scale, zero_point, noise, fmt, estimator, rounding, scale_dtype):
    return _qdq_values(x, scale, zero_point, noise, fmt, rounding, scale_dtype)


def _qdq_fwd(x, scale, zero_point, noise, fmt, estimator, rounding, scale_dtype):
    y = _qdq_values(x, scale, zero_point, noise, fmt, rounding, scale_dtype)
    return y, (estimator_mask(x, y, scale, zero_point, fmt, estimator), scale, zero_point, noise)


def _qdq_bwd(fmt, estimator, rounding, scale_dtype, res, g):
    mask, scale, zero_point, noise = res
    dx = g if mask is None else jnp.where(mask, g, jnp.zeros_like(g))
    return dx, jnp.zeros_like(scale), _zeros_like(zero_point), _zeros_like(noise)


_qdq.defvjp(_qdq_fwd, _qdq_bwd)


def quantize_dequantize(
    x: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array | None = None,
    *,
    fmt: F.Format | str,
    estimator: SP.Estimator | str = "ste",
    noise: jax.Array | None = None,
    rounding: str = "nearest",
    scale_dtype: str | None = None,
) -> jax.Array:
    """Fake-quantizes float32 ``x`` with a given (non-learned) ``scale``.

    Forward: ``decode(encode(x / scale)) * scale`` (round half to even, or ``floor(x/s + noise)``,
    or the integer ``rounding`` given); with ``scale_dtype`` the decode uses
    :func:`qjax._src.scales.store_scale` of the scale (codes still use the float32 scale).
    Backward (``dx``): ``g`` for STE; ``g * 1[lo <= x/s <= hi]`` for clipped STE;
    ``g * 1[|y - x| <= m * s / 2]`` for trust, or ``g * 1[|x| <= clip * max_level * s]``.
    The scale, zero point and noise get zero cotangents (they are statistics, not parameters).

    Args:
      x: float32 array.
      scale: float32, broadcastable to ``x`` (the grid step).
      zero_point: optional float32 integer-valued zero point (integer formats).
      fmt: the format.
      estimator: ``STE()``, ``ClippedSTE()``, ``Trust(...)`` or their names (LSQ and PACT learn
        their scale: use :func:`lsq` and :func:`pact`).
      noise: optional ``U[0, 1)`` float32 noise for stochastic rounding (required with
        ``rounding="stochastic"``).
      rounding: one of :data:`qjax._src.spec.ROUNDINGS`; ``"half_away"`` and ``"half_up"`` need an
        :class:`~qjax.IntFormat`.
    """
    fmt = F.as_format(fmt)
    est = SP.as_estimator(estimator)
    if isinstance(est, SP.LEARNED_SCALE_ESTIMATORS):
        # Their backward gives the learned scale a gradient, which this op (zero cotangent for
        # the scale) would silently drop.
        name = type(est).__name__
        raise ValueError(f"the {name} estimator learns its scale: call "
                         f"qjax.estimators.{name.lower()} (or qjax.fake_quant with scale=)")
    SP.check_rounding(rounding, fmt)
    if rounding == "stochastic" and noise is None:
        raise ValueError("rounding='stochastic' needs noise= (U[0, 1) float32 like x)")
    check_static_scale("scale", scale)
    return _qdq(x, scale, zero_point, noise, fmt, est, rounding, scale_dtype)


def ste(x, scale, fmt, zero_point=None):
    """Identity straight-through fake quantization (Bengio et al., 2013)."""
    return quantize_dequantize(x, scale, zero_point, fmt=fmt, estimator=SP.STE())


def clipped_ste(x, scale, fmt, zero_point=None):
    """Straight-through inside ``[lo, hi]`` (inclusive), zero gradient outside."""
    return quantize_dequantize(x, scale, zero_point, fmt=fmt, estimator=SP.ClippedSTE())


def trust(x, scale, fmt, multiplier: float = 1.0, clip_ratio: float | None = None):
    """QuEST's trust estimator: ``dx = g * 1[|q(x) - x| <= multiplier * scale / 2]``.

    References:
      Panferov et al., 2025. QuEST: Stable Training of LLMs with 1-Bit Weights and Activations.
    """
    return quantize_dequantize(x, scale, fmt=fmt, estimator=SP.Trust(multiplier, clip_ratio))


def stochastic_rounding(x, scale, fmt, key: jax.Array, zero_point=None):
    """``floor(x/s + u) * s`` with ``u ~ U[0, 1)`` (float32), identity STE.

    Unbiased inside the range: ``E[y] = x`` and ``Var[y] = s^2 f (1 - f)``, ``f = frac(x/s)``.
    Fold the training step and shard index into ``key`` so that noise differs across them.
    """
    noise = jax.random.uniform(key, jnp.shape(x), jnp.float32)
    return quantize_dequantize(x, scale, zero_point, fmt=fmt, estimator=SP.STE(), noise=noise)


def _lsq_grad_scale(x, scale, fmt, n):
    if n is None:
        n = max(1, math.prod(jnp.shape(x)) // math.prod(jnp.shape(scale)))
    # N counts elements per step: 1/sqrt(N * QP) needs N >= 1.
    return 1.0 / math.sqrt(check_int("n", n, lo=1) * fmt.max_level)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _learned(x, scale, offset, fmt, g_scale):
    q = encode(x - offset, scale, None, fmt)
    return decode(q, scale, None, fmt) + offset


def _learned_fwd(x, scale, offset, fmt, g_scale):
    v = (x - offset) * (1.0 / scale)
    q = encode(x - offset, scale, None, fmt)
    level = fmt.decode(q)
    lo, hi = fmt.range_in_scale_units()
    inside = (v > lo) & (v < hi)
    return level * scale + offset, (inside, level, v, scale, offset)


def _learned_bwd(fmt, g_scale, res, g):
    inside, level, v, scale, offset = res
    dx = jnp.where(inside, g, 0.0)
    # d(level * s)/ds: round(v) - v inside, the clipped level outside.
    ds = g * (level - jnp.where(inside, v, 0.0)) * g_scale
    db = jnp.where(inside, 0.0, g) * g_scale
    return dx, _sum_to(ds, scale), _sum_to(db, offset)


_learned.defvjp(_learned_fwd, _learned_bwd)


def _pact_scale(alpha, fmt):
    return alpha * (1.0 / fmt.max_level)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pact(x, alpha, fmt):
    s = _pact_scale(alpha, fmt)
    return decode(encode(x, s, None, fmt), s, None, fmt)


def _pact_fwd(x, alpha, fmt):
    s = _pact_scale(alpha, fmt)
    q = encode(x, s, None, fmt)
    lo, _ = fmt.range_in_scale_units()
    # The upper bound is compared with alpha itself, exactly as PACT defines it.
    above = x >= alpha
    below = x * (1.0 / s) < lo
    return decode(q, s, None, fmt), (above, below, alpha)


def _pact_bwd(fmt, res, g):
    above, below, alpha = res
    dx = jnp.where(above | below, 0.0, g)
    lo, _ = fmt.range_in_scale_units()
    dalpha = jnp.where(above, g, 0.0) + jnp.where(below, g * (lo / fmt.max_level), 0.0)
    return dx, _sum_to(dalpha, alpha)


_pact.defvjp(_pact_fwd, _pact_bwd)


def _check_lsq_format(fmt, lsq: bool = True):
    fmt = F.as_format(fmt)
    if not fmt.uniform and not (lsq and isinstance(fmt, F.POST)):
        raise ValueError(f"LSQ and PACT need a uniform grid (LSQ also takes POST), not the "
                         f"non-uniform format {fmt.name}")
    F.check_positive_level(fmt, "LSQ and PACT")  # they divide by max_level
    return fmt


def learned_scale_quant(x, scale, fmt, estimator: SP.Estimator, *, n: int | None = None):
    """Fake quantization with a learned parameter, backward by ``estimator``.

    For :class:`~qjax.LSQ` the parameter is the step ``s``; for :class:`~qjax.PACT` it is the
    clipping level ``alpha`` (the step is ``alpha / max_level``).
    """
    fmt = _check_lsq_format(fmt, isinstance(estimator, SP.LSQ))
    check_static_scale("scale (the LSQ step or PACT alpha)", scale)
    scale = jnp.asarray(scale, jnp.float32)
    if isinstance(estimator, SP.PACT):
        return _pact(x, S.clamp_scale(scale), fmt)
    if isinstance(estimator, SP.LSQ):
        g_scale = _lsq_grad_scale(x, scale, fmt, n)
        return _learned(x, scale, jnp.zeros((), jnp.float32), fmt, g_scale)
    raise ValueError(f"learned scales need the LSQ or PACT estimator, got {estimator!r}")


def lsq(x: jax.Array, step: jax.Array, fmt: F.Format | str, *, n: int | None = None):
    """Learned Step Size Quantization: ``round(clip(x/s, -QN, QP)) * s``.

    Gradients: ``dx = g * 1[-QN < x/s < QP]``; ``ds = g * (round(x/s) - x/s)`` inside,
    ``-QN`` below, ``QP`` above, times ``1/sqrt(N * QP)``. ``N`` defaults to the number of elements
    per step (``x.size / step.size``); pass ``n`` to override. For a midrise grid the levels are
    ``q + 1/2`` and the same rule applies with ``decode(q)`` in place of ``round(x/s)``.

    Args:
      x: float32 array.
      step: float32 learned step, broadcastable to ``x`` (keep it positive; see
        :func:`qjax._src.scales.lsq_init`).
      fmt: a uniform format (``IntFormat``, ``Midrise``, ``Ternary``) or its name.
      n: N in the gradient scale.

    References:
      Esser et al., 2020. Learned Step Size Quantization. ICLR.
    """
    return learned_scale_quant(x, step, fmt, SP.LSQ(), n=n)


def lsq_plus(x, step, fmt, offset, *, n: int | None = None):
    """LSQ+: ``round(clip((x - b)/s, -QN, QP)) * s + b`` with learned step ``s`` and offset ``b``.

    ``db = g`` outside the range and 0 inside (times the same gradient scale as ``ds``).

    References:
      Bhalgat et al., 2020. LSQ+: Improving low-bit quantization through learnable offsets and
      better initialization. CVPR Workshops.
    """
    fmt = _check_lsq_format(fmt)
    check_static_scale("step", step)
    step = jnp.asarray(step, jnp.float32)
    offset = jnp.asarray(offset, jnp.float32)
    return _learned(x, step, offset, fmt, _lsq_grad_scale(x, step, fmt, n))


def pact(x: jax.Array, alpha: jax.Array, fmt: F.IntFormat | str) -> jax.Array:
    """PACT: ``y = clip(x, 0, alpha)`` rounded to ``2^b - 1`` steps of ``alpha / (2^b - 1)``.

    ``fmt`` is an unsigned integer format (``"uint4"``, the paper's) or a signed one (``"int4"``,
    for activations that are not ReLU outputs). Gradients: ``dx = g * 1[0 <= x < alpha]``,
    ``dalpha = g * 1[x >= alpha]``. On a signed grid ``y = clip(round(x / s), qmin, qmax) * s``
    with ``s = alpha / qmax``, and ``dalpha = g * qmin / qmax`` below the range.

    References:
      Choi et al., 2018. PACT: Parameterized Clipping Activation for Quantized Neural Networks.
    """
    fmt = F.as_format(fmt)
    if not isinstance(fmt, F.IntFormat):
        raise ValueError(f"PACT needs an integer format (e.g. 'uint4' or 'int4'), got {fmt.name}")
    if fmt.qmax <= 0:
        raise ValueError("signed PACT needs bits >= 2")
    return learned_scale_quant(x, alpha, fmt, SP.PACT())
