"""Implementation of :mod:`qjax.methods.asq` (documented there)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax._src import formats as F
from qjax._src._checks import check_bool, check_floating, check_int, check_pos_int, check_real
from qjax._src.estimators import check_static_scale
from qjax._src.formats import POST
from qjax._src.hadamard import saturating_cast
from qjax._src.scales import clamp_scale, lsq_init

__all__ = [
    "BETA_MIN",
    "POST",
    "post_quantize",
    "post_dequantize",
    "post_fake_quant",
    "post_init_step",
    "asq_fake_quant",
    "asq_init_step",
    "AdaptiveStep",
    "ASQActivation",
]

BETA_MIN = 1e-8  # the adapter's floor (the released code's clamp)


def _check_param(name: str, p: object, x_shape: tuple[int, ...]) -> jax.Array:
    check_static_scale(name, p)
    p = jnp.asarray(p, jnp.float32) if isinstance(p, (int, float, np.number)) else jnp.asarray(p)
    if not jnp.issubdtype(p.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array or a positive number, got dtype "
                        f"{p.dtype}")
    try:
        ok = np.broadcast_shapes(p.shape, x_shape) == tuple(x_shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {p.shape} must broadcast to x's shape {x_shape}")
    return p.astype(jnp.float32)


def _parts(x, s_a, grid):
    v = x * (1.0 / s_a)
    # Integer codes: canonical levels (round(-0.1) is -0.0 as a float, 0 as an int).
    level = grid.decode(grid.encode(v).astype(jnp.int32)).astype(jnp.float32)
    lo, hi = grid.range_in_scale_units()
    return v, level, (v >= lo) & (v <= hi)


def _step(step, beta):
    return clamp_scale(step * beta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _learned(x, step, beta, g_scale, grid):
    s_a = _step(step, beta)
    return _parts(x, s_a, grid)[1] * s_a


def _learned_fwd(x, step, beta, g_scale, grid):
    s_a = _step(step, beta)
    v, level, inside = _parts(x, s_a, grid)
    return level * s_a, (v, level, inside, step, beta, g_scale)


def _learned_bwd(grid, res, g):
    v, level, inside, step, beta, g_scale = res
    t = g * (level - jnp.where(inside, v, 0.0))  # g * dy/ds_a (STE through the rounding)
    # step and beta arrive broadcast to x's shape: autodiff of the broadcast sums them back.
    # g_scale is a constant (an array only so that steps of any shape share a compilation).
    return (jnp.where(inside, g, 0.0), t * beta * g_scale, t * step,
            jnp.zeros_like(g_scale))


_learned.defvjp(_learned_fwd, _learned_bwd)


def _learned_quant(x, step, beta, grid, n):
    check_floating(x, "x")
    shape = tuple(x.shape)
    step = _check_param("step", step, shape)
    beta = _check_param("beta", beta, shape)
    if n is None:
        n = max(1, math.prod(shape) // max(1, step.size))
    g_scale = 1.0 / math.sqrt(check_int("n", n, lo=1) * grid.max_level)
    return _apply(x, jnp.broadcast_to(step, shape), jnp.broadcast_to(beta, shape),
                  jnp.float32(g_scale), grid)


# One compilation per input shape and grid instead of one per eager op.
@functools.partial(jax.jit, static_argnums=(4,))
def _apply(x, step, beta, g_scale, grid):
    y = _learned(x.astype(jnp.float32), step, beta, jax.lax.stop_gradient(g_scale), grid)
    return saturating_cast(y, x.dtype)


@functools.partial(jax.jit, static_argnums=(2,))
def _encode(x, step, grid):
    return grid.encode(x.astype(jnp.float32) * (1.0 / clamp_scale(step))).astype(jnp.int8)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _decode(codes, step, grid, dtype):
    return saturating_cast(grid.decode(codes) * clamp_scale(step), dtype)


def post_fake_quant(x: jax.Array, step: jax.Array | float, bits: int, *,
                    n: int | None = None) -> jax.Array:
    """POST fake quantization ``s * level(clip(x/s, -1, 1))`` with the learned-step gradient.

    Args:
      x: floating array (float32, bfloat16, float16), e.g. a kernel ``(K, N)``.
      step: the learned step ``s`` (= the clipping value), broadcastable to ``x`` (e.g.
        ``(1, N)`` per output feature, the released code's default) or a positive number.
      bits: 2 to 8.
      n: ``N`` in the gradient scale ``1/sqrt(N)``; default ``x.size / step.size``.

    Returns:
      Array of ``x.shape`` and ``x.dtype``, equal bit for bit to
      ``post_dequantize(post_quantize(x, step, bits), step, bits, dtype=x.dtype)``.
      Backward: ``dx = g 1[|x/s| <= 1]``, ``ds = sum g (level - x/s 1[|x/s| <= 1]) / sqrt(N)``.

    Raises:
      TypeError/ValueError: non-floating ``x``, ``bits`` not in [2, 8], a step that is not
        positive (as a number) or does not broadcast to ``x``, ``n < 1``.

    References:
      Zhou et al., 2025. Precision Neural Network Quantization via Learnable Adaptive Modules.
    """
    return _learned_quant(x, step, 1.0, POST(bits), n)


def post_quantize(x: jax.Array, step: jax.Array | float, bits: int) -> jax.Array:
    """int8 POST codes ``c`` in ``[-K, K]`` of ``x / s`` (nearest level, ties away from zero).

    Arguments as :func:`post_fake_quant`; returns ``x.shape`` int8.
    """
    check_floating(x, "x")
    grid = POST(bits)
    shape = tuple(x.shape)
    return _encode(x, jnp.broadcast_to(_check_param("step", step, shape), shape), grid)


def post_dequantize(codes: jax.Array, step: jax.Array | float, bits: int, *,
                    dtype=jnp.float32) -> jax.Array:
    """``levels[codes + K] * s`` by table lookup, cast (saturating) to ``dtype``.

    Args:
      codes: integer array (from :func:`post_quantize`).
      step: as in :func:`post_fake_quant`, broadcastable to ``codes``.
      bits: 2 to 8, the bit width the codes were made with.
      dtype: a floating output dtype.
    """
    if not jnp.issubdtype(getattr(codes, "dtype", np.float32), jnp.integer):
        raise TypeError(f"codes must be an integer array, got {type(codes).__name__} "
                        f"{getattr(codes, 'dtype', '')}")
    grid = POST(bits)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    shape = tuple(codes.shape)
    return _decode(codes, jnp.broadcast_to(_check_param("step", step, shape), shape), grid,
                   dtype)


def post_init_step(w: jax.Array, *, q: float = 99.0,
                   axis: int | tuple[int, ...] | None = -2) -> jax.Array:
    """The released code's initial POST step: the ``q``-th percentile of ``|w|`` over ``axis``.

    Default: per output feature of a kernel ``(..., K, N)`` (reduces ``K``; shape
    ``(..., 1, N)``); ``axis=None``: one step for the tensor. Float32, clamped to
    ``[2^-126, 2^126]``.
    """
    check_floating(w, "w")
    q = check_real("q", q, 0.0, 100.0, low_open=True)
    return clamp_scale(jnp.quantile(jnp.abs(w.astype(jnp.float32)), q / 100.0, axis=axis,
                                    keepdims=True))


def _int_format(bits: int, signed: bool) -> F.IntFormat:
    fmt = F.IntFormat(F.check_bits(bits), check_bool("signed", signed))
    F.check_positive_level(fmt, "ASQ")
    return fmt


def asq_fake_quant(x: jax.Array, step: jax.Array | float, beta: jax.Array | float, bits: int,
                   *, signed: bool = False, n: int | None = None) -> jax.Array:
    """ASQ fake quantization ``s_a round(clip(x / s_a, n, p))``, ``s_a = step * beta``.

    Args:
      x: floating activations, e.g. ``(..., C)``.
      step: the learned per-tensor step ``s`` (any shape broadcastable to ``x``).
      beta: the adapter's factor, broadcastable to ``x`` (e.g. ``(..., 1)`` per token).
      bits: 1 to 8 (unsigned), 2 to 8 (signed).
      signed: unsigned ``[0, 2^b - 1]`` (after ReLU, the paper's default) or signed
        ``[-2^(b-1), 2^(b-1) - 1]``.
      n: ``N`` in ``ds``'s gradient scale ``1/sqrt(N p)``; default ``x.size / step.size``.

    Returns:
      Array of ``x.shape`` and ``x.dtype``; gradients as in the module docstring (``ds`` scaled,
      ``dbeta`` not).

    References:
      Zhou et al., 2025. Precision Neural Network Quantization via Learnable Adaptive Modules.
    """
    return _learned_quant(x, step, beta, _int_format(bits, signed), n)


def asq_init_step(x: jax.Array, bits: int, *, signed: bool = False) -> jax.Array:
    """ASQ's initial step from a first batch: ``2 mean|x| / sqrt(p)`` (float32 scalar)."""
    check_floating(x, "x")
    return lsq_init(x, _int_format(bits, signed).max_level)


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class AdaptiveStep(nnx.Module):
    """ASQ's adapter: ``beta(x) = max(ReLU(W2 ReLU(W1 h + b1) + b2), 1e-8)``, one per row.

    ``h`` is ``x`` (float32) averaged over ``pool_axes`` (kept as size 1), else ``x`` itself;
    the output has ``x``'s shape with the last axis 1 (``(..., 1)`` per token; ``(N, 1, 1, 1)``
    for an NHWC input with ``pool_axes=(1, 2)``). ``W1: (C, C // ratio)`` when ``C >= 2 ratio``,
    else the single layer ``max(ReLU(W h + b), 1e-8)``. The first layer has torch's default
    ``U(+-1/sqrt(C))`` init, the last ``N(0, 0.01)`` weights and bias 1.

    References:
      Zhou et al., 2025 (released code: ``Adapter``, ``Linear_Adapter``).
    """

    def __init__(self, features: int, *, ratio: int = 4, pool_axes: tuple[int, ...] = (),
                 rngs: nnx.Rngs):
        features = check_pos_int("features", features)
        ratio = check_pos_int("ratio", ratio)
        if not (isinstance(pool_axes, tuple) and all(isinstance(a, int) for a in pool_axes)):
            raise TypeError(f"pool_axes must be a tuple of ints, got {pool_axes!r}")
        self.pool_axes = pool_axes
        two_layers = features >= 2 * ratio
        width = features // ratio if two_layers else features
        bound = 1.0 / math.sqrt(features)
        self.hidden = (nnx.Linear(features, width, kernel_init=_uniform(bound),
                                  bias_init=_uniform(bound), rngs=rngs) if two_layers else None)
        self.out = nnx.Linear(width, 1, kernel_init=nnx.initializers.normal(0.01),
                              bias_init=nnx.initializers.constant(1.0), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_floating(x, "x")
        h = x.astype(jnp.float32)
        if self.pool_axes:
            h = jnp.mean(h, axis=self.pool_axes, keepdims=True)
        if self.hidden is not None:
            h = jax.nn.relu(self.hidden(h))
        # max(ReLU(z), 1e-8) == max(z, 1e-8), also in its gradient.
        return jnp.maximum(self.out(h), BETA_MIN)


class ASQActivation(nnx.Module):
    """An ASQ activation quantizer: ``asq_fake_quant(x, step, adapter(x), bits)``.

    Parameters: ``step`` (float32 scalar ``nnx.Param``, LSQ-scaled gradient; set it from a first
    batch with :func:`asq_init_step`, as the released code does) and the :class:`AdaptiveStep`
    ``adapter`` (unscaled gradient through ``beta``).

    References:
      Zhou et al., 2025. Precision Neural Network Quantization via Learnable Adaptive Modules.
    """

    def __init__(self, features: int, bits: int, *, signed: bool = False, ratio: int = 4,
                 pool_axes: tuple[int, ...] = (), step_init: float = 1.0, rngs: nnx.Rngs):
        _int_format(bits, signed)
        step_init = check_real("step_init", step_init, 0.0, low_open=True)
        self.bits, self.signed = bits, signed
        self.adapter = AdaptiveStep(features, ratio=ratio, pool_axes=pool_axes, rngs=rngs)
        self.step = nnx.Param(jnp.asarray(step_init, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return asq_fake_quant(x, self.step[...], self.adapter(x), self.bits, signed=self.signed)
