"""Quantized backward of an integer-forward dense layer: int8 x int8 -> int32 gradient matmuls.

A dense layer ``y = x W`` whose forward ran as an int8 dot (:func:`qjax._src.qdot.qat_dense`) holds
the int8 codes of both operands: ``x = X * s_x`` with one multiplier per token (``X (..., K)``,
``s_x (..., 1)``) and ``W = C * s_w`` with one multiplier per output channel (``C (K, N)``,
``s_w (N,)``), or per tensor. Its two backward matmuls reuse those codes:

* ``dx = g W^T``, a sum over ``N``, where ``s_w`` lives: ``dx[m, k] = sum_n (g s_w)[m, n] C[k, n]``.
  So ``g' = g * s_w`` (the weight's multiplier moved onto the output gradient) is quantized per
  row (token) ``m``, ``g' ~ G' r`` with ``r (..., 1)``, and ``dx = r * (G' . C^T)``;
* ``dW = x^T g``, a sum over the tokens, where ``s_x`` lives: ``g'' = g * s_x`` is quantized per
  column ``n``, ``g'' ~ G'' c`` with ``c (N,)``, and ``dW = (X^T . G'') * c``.

Every scale is then off the contraction axis, both products are exact int32 sums of int8 codes
(the forward's codes, never requantized) and the scales are applied in the float32 epilogue.

``G'`` and ``G''`` are int8 codes (``IntFormat(8)``, ``|code| <= 127`` up to float rounding of
``v = a/r``) from symmetric absmax scales and **stochastic rounding**, ``G = floor(v + u)``, so
``E[G r] = a`` elementwise and both gradients are unbiased estimates of the float ones. The
dither is pairwise independent rather than fully independent: ``u[m, n] = frac(a_m + b_n)`` with
``a`` (one word per row) and ``b`` (one per column) uniform 32-bit integers from the key, the sum
taken modulo ``2^32`` and its top 24 bits used. Every ``u[m, n]`` is exactly uniform on
``{j 2^-24}``, and any two entries are independent (they share at most one of ``a_m``, ``b_n``,
and adding an independent uniform word to the other one makes it uniform and independent), so
the variance of every linear function of the rounding errors, the gradients included, equals
that of fully independent stochastic rounding; only higher moments differ. It needs ``M + N``
random words instead of ``M N``: on a CPU, threefry bits for ``M N`` entries cost more than the
int8 matmul they feed.

The int32 sum of ``L`` products is exact while ``L * max|code_a| * max|code_b| <= 2^31 - 1``
(:func:`qjax._src.int8.check_int32_sum`); a longer contraction (``dW`` over many tokens, ``dx`` of a
wide layer) is cut into tiles whose int32 sums are exact and added in float32
(:func:`exact_int8_dot`).

References:
  Gupta et al., 2015. Deep Learning with Limited Numerical Precision (stochastic rounding);
  Jacob et al., 2018. Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference (int8 products, int32 accumulation, scales after).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from qjax._src import estimators as E
from qjax._src import formats as F
from qjax._src import int8, typed_sharding
from qjax._src import scales as S

__all__ = ["BACKWARDS", "Backward", "GRAD_FORMAT", "check_backward", "check_key",
           "pairwise_dither", "stochastic_int8", "exact_int8_dot", "dense_grads"]

Backward = Literal["float", "int8"]
BACKWARDS = ("float", "int8")
#: Format of the output-gradient codes: symmetric int8, scale ``max|a| / 127``.
GRAD_FORMAT = F.IntFormat(8)
_DITHER_BITS = 24


def check_backward(backward: object, name: str = "backward") -> str:
    """``backward`` if it is one of :data:`BACKWARDS`, else a ValueError naming ``name``."""
    if not isinstance(backward, str) or backward not in BACKWARDS:
        raise ValueError(f"{name} must be one of {BACKWARDS}, got {backward!r}")
    return backward


def check_key(key: object, name: str = "key") -> None:
    """TypeError unless ``key`` is one PRNG key: a scalar typed key (``jax.random.key``) or a raw
    ``uint32[2]`` key (``jax.random.PRNGKey``)."""
    dtype = getattr(key, "dtype", None)
    shape = getattr(key, "shape", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
        return
    if dtype == jnp.uint32 and shape == (2,):
        return
    got = type(key).__name__ if dtype is None else f"{dtype} array of shape {shape}"
    raise TypeError(f"{name} must be a single PRNG key (jax.random.key(seed) or "
                    f"jax.random.PRNGKey(seed)), got {got}")


def pairwise_dither(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Float32 dither ``u`` of ``shape (..., N)``, each entry uniform on ``{j 2^-24: j < 2^24}``.

    ``u[..., n] = ((a[...] + b[n]) mod 2^32 >> 8) 2^-24`` with ``a`` (one uniform 32-bit word per
    row) and ``b`` (one per column) from ``key``: entries are pairwise independent (see the module
    docstring), from ``prod(shape[:-1]) + N`` random words. A rank-0 or rank-1 ``shape`` gets one
    row. Threefry keys give the same words for every sharding of the result.
    """
    shape = tuple(shape)
    if not shape:
        return pairwise_dither(key, (1,)).reshape(())
    k_rows, k_cols = jax.random.split(key)
    rows = jax.random.bits(k_rows, shape[:-1] + (1,), jnp.uint32)
    cols = jax.random.bits(k_cols, shape[-1:], jnp.uint32)
    top = jnp.right_shift(rows + cols, jnp.uint32(32 - _DITHER_BITS))
    return top.astype(jnp.float32) * (2.0 ** -_DITHER_BITS)


def stochastic_int8(a: jax.Array, reduce_axes: tuple[int, ...],
                    key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int8 codes ``G`` and float32 scale ``r`` of ``a`` with ``E[G r] = a``: stochastic rounding.

    ``r = clamp_scale(max|a| / 127)`` over ``reduce_axes`` (kept as size 1; the
    :class:`~qjax.AbsMax` rule of :data:`GRAD_FORMAT`), ``G = clip(floor(a / r + u), -128, 127)``
    with ``u`` from :func:`pairwise_dither`. An all-zero slice gets ``r = 2^-126`` and codes 0.

    Args:
      a: float32 ``(..., N)``; reduce_axes: axes one scale covers (e.g. ``(-1,)`` per row).
      key: PRNG key of the dither.
    """
    axes = tuple(ax % a.ndim for ax in reduce_axes)
    scale, _ = S.AbsMax().compute(a, axes, GRAD_FORMAT)
    codes = E.encode(a, scale, None, GRAD_FORMAT, noise=pairwise_dither(key, a.shape))
    return codes.astype(jnp.int8), scale


def _balanced_tile(length: int, bound: int) -> tuple[int, int]:
    """``(tiles, tile)``: fewest tiles of ``<= INT32_MAX // bound`` terms covering ``length``."""
    tiles = -(-length // max(1, int8.INT32_MAX // bound))
    return tiles, -(-length // tiles)


def _to_tiles(a: jax.Array, contract: tuple[int, ...], tiles: int, tile: int) -> jax.Array:
    """``a`` with its contracted axes moved last, flattened, zero-padded to ``tiles * tile``
    and split into ``(tiles, tile)``."""
    free = [i for i in range(a.ndim) if i not in contract]
    length = math.prod(a.shape[i] for i in contract)
    flat = jnp.transpose(a, free + list(contract)).reshape([a.shape[i] for i in free] + [length])
    flat = jnp.pad(flat, [(0, 0)] * len(free) + [(0, tiles * tile - length)])
    return flat.reshape([a.shape[i] for i in free] + [tiles, tile])


def exact_int8_dot(a: jax.Array, b: jax.Array, contract: tuple[tuple[int, ...], tuple[int, ...]],
                   bound: int) -> jax.Array:
    """Float32 ``dot_general(a, b)`` of int8 codes, every int32 partial sum exact.

    Contracts ``a``'s axes ``contract[0]`` with ``b``'s ``contract[1]`` (no batch axes); the
    output is ``(*a_free, *b_free)``. With ``L`` the contracted length and
    ``bound = max|a| * max|b|``: one int32 ``dot_general`` if ``L * bound <= 2^31 - 1``; otherwise
    the contraction is cut into the fewest equal tiles that satisfy it (zero-padded), each tile an
    exact int32 sum, the tiles added in float32.

    Raises:
      ValueError: ``bound`` not a positive int, or contracted axes of different lengths.
    """
    if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
        raise ValueError(f"bound must be a positive int (max|code_a| * max|code_b|), got {bound!r}")
    ca, cb = (tuple(ax % a.ndim for ax in contract[0]), tuple(ax % b.ndim for ax in contract[1]))
    if [a.shape[i] for i in ca] != [b.shape[i] for i in cb]:
        raise ValueError(f"contracted axes differ: {a.shape} axes {ca} vs {b.shape} axes {cb}")
    length = math.prod(a.shape[i] for i in ca)
    if length * bound <= int8.INT32_MAX:
        acc = typed_sharding.dot_general(a, b, ((ca, cb), ((), ())),
                                         preferred_element_type=jnp.int32)
        return acc.astype(jnp.float32)
    tiles, tile = _balanced_tile(length, bound)
    at, bt = _to_tiles(a, ca, tiles, tile), _to_tiles(b, cb, tiles, tile)
    acc = jax.lax.dot_general(at, bt, (((at.ndim - 1,), (bt.ndim - 1,)),
                                       ((at.ndim - 2,), (bt.ndim - 2,))),
                              preferred_element_type=jnp.int32)
    return jnp.sum(acc.astype(jnp.float32), axis=0)


def dense_grads(g: jax.Array, xi: jax.Array, xs: jax.Array, wi: jax.Array, ws: jax.Array,
                key: jax.Array, *, x_format: F.Format,
                w_format: F.Format) -> tuple[jax.Array, jax.Array]:
    """``(dx, dW)`` of ``y = (xi * xs) @ (wi * ws)`` from int8 x int8 -> int32 matmuls.

    ``dx = r * (G' . wi^T)`` with ``G' r ~ g * ws`` per row, and ``dW = (xi^T . G'') * c`` with
    ``G'' c ~ g * xs`` per column (:func:`stochastic_int8`, independent keys split from ``key``;
    see the module docstring). ``E[dx] = g (wi ws)^T`` and ``E[dW] = (xi xs)^T g``. Estimator
    masks are the caller's.

    Args:
      g: output gradient ``(..., N)``, floating.
      xi: int8 input codes ``(..., K)``; xs: float32 multipliers broadcastable to ``(..., 1)``.
      wi: int8 kernel codes ``(K, N)``; ws: float32 multipliers, ``N`` or 1 elements.
      key: PRNG key (:func:`check_key`).
      x_format, w_format: formats of the codes, for the int32 bound
      (:func:`qjax._src.int8.code_max`).

    Returns:
      float32 ``dx (..., K)`` and ``dW (K, N)``.
    """
    check_key(key)
    g_max = int8.code_max(GRAD_FORMAT)
    x_max, w_max = int8.code_max(x_format), int8.code_max(w_format)
    if x_max is None or w_max is None:
        bad = x_format if x_max is None else w_format
        raise ValueError(f"format {bad.name} has no int8 code (see qjax._src.int8.code_max)")
    k_dx, k_dw = jax.random.split(key)
    g32 = g.astype(jnp.float32)
    gq, r = stochastic_int8(g32 * ws.reshape(-1), (-1,), k_dx)
    dx = exact_int8_dot(gq, wi, ((g.ndim - 1,), (1,)), g_max * w_max) * r
    lead = tuple(range(g.ndim - 1))
    gq, c = stochastic_int8(g32 * xs, lead, k_dw)
    if xi.ndim == 2:
        # XLA:CPU lowers an int8 dot contracting axis 0 of two 2-D operands as an int32 dot
        # (2-3x slower); with two contracted axes it transposes the codes and runs its int8 kernel.
        xi, gq, lead = xi[:, None], gq[:, None], (0, 1)
    dw = exact_int8_dot(xi, gq, (lead, lead), x_max * g_max) * c.reshape(-1)
    return dx, dw
