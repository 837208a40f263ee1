"""Implementation of :mod:`qjax.methods.ifairy` (documented there)."""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qjax._src._checks import check_bool, check_pos_int

__all__ = [
    "CODE_VALUES",
    "GRANULARITIES",
    "ifairy_quantize",
    "ifairy_dequantize",
    "ifairy",
    "complex_dense",
    "ifairy_serve",
    "ComplexLinear",
    "conjugate_gradients",
]

# Code q stands for i^q.
CODE_VALUES = (1 + 0j, 1j, -1 + 0j, -1j)
Granularity = Literal["tensor", "channel"]
GRANULARITIES = ("tensor", "channel")


def _check_complex(x: object, name: str) -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.complexfloating):
        got = type(x).__name__ if dtype is None else f"dtype {dtype}"
        raise TypeError(f"{name} must be a complex64 array (e.g. jax.lax.complex(re, im)), got "
                        f"{got}")
    if jnp.asarray(x).dtype != jnp.complex64:
        raise TypeError(f"{name} must be complex64 (the quantizer computes in float32), got "
                        f"{jnp.asarray(x).dtype}")


def _check_granularity(granularity: object) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


def _check_kernel(w: object, granularity: object) -> str:
    _check_complex(w, "w")
    if jnp.ndim(w) < 2:
        raise ValueError(f"w must be a kernel (K, N) or a stack (..., K, N), got shape "
                         f"{jnp.shape(w)}")
    return _check_granularity(granularity)


def _codes(a: jax.Array, b: jax.Array) -> jax.Array:
    plus_i = (b > 0) & (-b < a) & (a <= b)
    minus_one = (a < 0) & (a < b) & (b <= -a)
    minus_i = (b < 0) & (b <= a) & (a < -b)
    # Everything else (a > 0 with -a <= b < a, and w = 0) is +1.
    return jnp.where(plus_i, 1, jnp.where(minus_one, 2, jnp.where(minus_i, 3, 0))).astype(jnp.int8)


def _masked_mean(v: jax.Array, mask: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    count = jnp.sum(mask, axis=axes, keepdims=True, dtype=jnp.int32)
    inv = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
    # Terms |v| / count summed: a mean that cannot overflow where the plain sum would.
    return jnp.sum(jnp.where(mask, jnp.abs(v), 0.0) * inv, axis=axes, keepdims=True)


# The cores are jitted: one compilation per shape instead of one per eager op.
@functools.partial(jax.jit, static_argnums=1)
def _quantize(w: jax.Array, granularity: str):
    w = jax.lax.stop_gradient(jnp.asarray(w))
    a, b = jnp.real(w), jnp.imag(w)
    q = _codes(a, b)
    axes = (-2, -1) if granularity == "tensor" else (-2,)
    s_re = _masked_mean(a, (q == 0) | (q == 2), axes)
    s_im = _masked_mean(b, (q == 1) | (q == 3), axes)
    return q, s_re, s_im


@jax.jit
def _dequantize(q, s_re, s_im):
    # Selects, not code * scale: an infinite scale must not turn into 0 * inf = NaN.
    re = jnp.where(q == 0, s_re, jnp.where(q == 2, -s_re, 0.0))
    im = jnp.where(q == 1, s_im, jnp.where(q == 3, -s_im, 0.0))
    return jax.lax.complex(re.astype(jnp.float32), im.astype(jnp.float32))


def ifairy_quantize(w: jax.Array, *, granularity: Granularity = "tensor"):
    """PhaseQuant codes and scales of a complex kernel (see the module docstring).

    Args:
      w: complex64 kernel ``(K, N)`` or stack ``(..., K, N)``.
      granularity: ``"tensor"`` (one ``(s_re, s_im)`` per matrix, the paper's) or ``"channel"``
        (one per output feature: a column of ``(K, N)``, a row of a torch ``(N, K)`` weight).

    Returns:
      ``(codes, scale_re, scale_im)``: int8 codes in ``{0, 1, 2, 3}`` meaning ``{+1, +i, -1, -i}``
      of ``w.shape``; float32 scales of shape ``(..., 1, 1)`` or ``(..., 1, N)``, ``>= 0``.

    Raises:
      TypeError: ``w`` is not complex64 (real weights are refused, not promoted).
      ValueError: ``w`` has fewer than 2 axes, or an unknown ``granularity``.

    References:
      Wang et al., 2025. iFairy: the First 2-bit Complex LLM with All Parameters in {+-1, +-i}.
    """
    granularity = _check_kernel(w, granularity)
    return _quantize(w, granularity)


def _check_codes(codes: object) -> None:
    dtype = getattr(codes, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        got = type(codes).__name__ if dtype is None else f"dtype {dtype}"
        raise TypeError(f"codes must be an integer array (int8 codes 0..3), got {got}")


def ifairy_dequantize(codes: jax.Array, scale_re: jax.Array, scale_im: jax.Array) -> jax.Array:
    """``W_q = s_re * (+1, -1)`` for codes 0, 2 and ``i s_im * (+1, -1)`` for codes 1, 3.

    Args:
      codes: integer array ``(..., K, N)`` (other values than 0..3 give 0).
      scale_re, scale_im: floating arrays broadcastable to ``codes``.

    Returns:
      complex64 array of ``codes.shape``.
    """
    _check_codes(codes)
    for name, s in (("scale_re", scale_re), ("scale_im", scale_im)):
        if not jnp.issubdtype(jnp.asarray(s).dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {jnp.asarray(s).dtype}")
    return _dequantize(codes, scale_re, scale_im)


def _fake(w, granularity):  # two cached programs, shared with quantize / dequantize
    return _dequantize(*_quantize(w, granularity))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ifairy(w, granularity):
    return _fake(w, granularity)


def _ifairy_fwd(w, granularity):
    return _fake(w, granularity), None


def _ifairy_bwd(granularity, res, g):
    return (g,)  # identity STE on (Re, Im): JAX's cotangent dL/da - i dL/db passes unchanged


_ifairy.defvjp(_ifairy_fwd, _ifairy_bwd)


def ifairy(w: jax.Array, *, granularity: Granularity = "tensor") -> jax.Array:
    """PhaseQuant fake quantization with the identity straight-through estimator.

    Forward ``ifairy_dequantize(*ifairy_quantize(w))``; backward ``dL/dw = dL/dW_q`` (in JAX's
    convention both are ``dL/dRe - i dL/dIm``). No gradient flows into the scales.

    Args:
      w: complex64 ``(..., K, N)``.
      granularity: ``"tensor"`` or ``"channel"``, see :func:`ifairy_quantize`.

    Returns:
      complex64 array of ``w.shape`` with entries in ``{+s_re, -s_re, +i s_im, -i s_im}``.

    References:
      Wang et al., 2025. iFairy: the First 2-bit Complex LLM with All Parameters in {+-1, +-i}.
    """
    granularity = _check_kernel(w, granularity)
    return _ifairy(w, granularity)


def _check_input(x: object, k: int) -> None:
    _check_complex(x, "x")
    if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != k:
        raise ValueError(f"x must have shape (..., K) with K = {k} (the kernel's rows), got "
                         f"{jnp.shape(x)}")


def complex_dense(x: jax.Array, w: jax.Array, *, qat: bool = True,
                  granularity: Granularity = "tensor") -> jax.Array:
    """Complex linear map ``y = x @ ifairy(w)`` (``qat=True``) or ``x @ w`` (float).

    Args:
      x: complex64 ``(..., K)``.
      w: complex64 kernel ``(K, N)``.
      qat: quantize the kernel (True) or not.
      granularity: as :func:`ifairy_quantize`.

    Returns:
      complex64 ``(..., N)``, computed at ``Precision.HIGHEST``.

    References:
      Wang et al., 2025. iFairy (the released ``ComplexLinear`` computes ``conj(x) @ W_q``,
      see the notes; this is the plain complex product).
    """
    qat = check_bool("qat", qat)
    granularity = _check_kernel(w, granularity)
    if jnp.ndim(w) != 2:
        raise ValueError(f"w must be a kernel (K, N), got shape {jnp.shape(w)} (vmap for stacks)")
    _check_input(x, w.shape[0])
    kernel = _ifairy(w, granularity) if qat else w
    return jnp.matmul(x, kernel, precision=jax.lax.Precision.HIGHEST)


def _check_scale(name: str, s: object, n: int) -> jax.Array:
    s = jnp.asarray(s)
    if not jnp.issubdtype(s.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {s.dtype}")
    try:
        ok = np.broadcast_shapes(s.shape, (1, n)) == (1, n)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must broadcast to (1, N) = (1, {n}) (per tensor or per "
                         f"output feature), got shape {s.shape}")
    # Always (N,): one compiled serving program per shape, per tensor or per channel.
    return jnp.broadcast_to(s.astype(jnp.float32).reshape(-1), (n,))


def ifairy_serve(x: jax.Array, codes: jax.Array, scale_re: jax.Array,
                 scale_im: jax.Array) -> jax.Array:
    """``x @ W_q`` without multiplications by weights: sums of swapped/negated parts of ``x``.

    For each output ``n``, in order ``k = 0, ..., K-1`` (a ``lax.scan``)::

      A_n += x_k  (q = 0),   -x_k  (q = 2)                 real codes
      B_n += (-x_im, x_re)_k (q = 1),  (x_im, -x_re)_k (q = 3)   i x_k, -i x_k: swaps
      y_n  = s_re A_n + s_im B_n                           epilogue: the only products

    Equal to the complex matmul with :func:`ifairy_dequantize` up to float32 summation order:
    bit for bit when every partial sum is exact (e.g. integer-valued ``x`` and scales), else
    within the dot-product error bound ``~ (K + 2) eps sum_k |x_k| |W_q[k, n]|``.

    Args:
      x: complex64 ``(..., K)``.
      codes: integer ``(K, N)``, values in ``{0, 1, 2, 3}`` (others contribute nothing).
      scale_re, scale_im: float32 of shape ``(1, 1)`` or ``(1, N)`` (from :func:`ifairy_quantize`).

    Returns:
      complex64 ``(..., N)``.

    Raises:
      TypeError/ValueError: ``x`` not complex64 or of the wrong length, ``codes`` not a 2-D
        integer array, scales of another shape.

    References:
      Wang et al., 2025. iFairy: multiplication-free inference by additions and swaps.
    """
    _check_codes(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (K, N), got shape {codes.shape} (vmap for stacks)")
    k, n = codes.shape
    _check_input(x, k)
    s_re = _check_scale("scale_re", scale_re, n)
    s_im = _check_scale("scale_im", scale_im, n)
    return _serve(x, codes, s_re, s_im)


@jax.jit
def _serve(x, codes, s_re, s_im):
    xs_re = jnp.moveaxis(jnp.real(x), -1, 0)[..., None]  # (K, ..., 1)
    xs_im = jnp.moveaxis(jnp.imag(x), -1, 0)[..., None]

    def step(acc, inputs):
        a_re, a_im, b_re, b_im = acc
        xr, xi, q = inputs
        zero = jnp.zeros_like(a_re)
        a_re = a_re + jnp.where(q == 0, xr, jnp.where(q == 2, -xr, zero))
        a_im = a_im + jnp.where(q == 0, xi, jnp.where(q == 2, -xi, zero))
        b_re = b_re + jnp.where(q == 1, -xi, jnp.where(q == 3, xi, zero))
        b_im = b_im + jnp.where(q == 1, xr, jnp.where(q == 3, -xr, zero))
        return (a_re, a_im, b_re, b_im), None

    zeros = jnp.zeros(x.shape[:-1] + codes.shape[1:], jnp.float32)
    (a_re, a_im, b_re, b_im), _ = jax.lax.scan(step, (zeros,) * 4, (xs_re, xs_im, codes))
    return jax.lax.complex(s_re * a_re + s_im * b_re, s_re * a_im + s_im * b_im)


def _complex_uniform(key, shape, bound):
    # One flat draw: on CPU it compiles several times faster than a draw of shape (2, K, N).
    flat = jax.random.uniform(key, (2 * math.prod(shape),), jnp.float32, -bound, bound)
    parts = flat.reshape((2,) + tuple(shape))
    return jax.lax.complex(parts[0], parts[1])


class ComplexLinear(nnx.Module):
    """Complex linear layer ``y = x @ ifairy(kernel)`` (QAT) or ``x @ kernel``; no bias.

    ``kernel`` is a complex64 ``nnx.Param`` ``(in_features, out_features)`` whose real and
    imaginary parts are drawn from ``U(-1/sqrt(in), 1/sqrt(in))`` (the released code's torch
    default). ``qat`` is a plain attribute: set ``layer.qat = False`` for the float forward.
    Train with ``optax.chain(conjugate_gradients(), <optimizer>)``.

    References:
      Wang et al., 2025. iFairy: the First 2-bit Complex LLM with All Parameters in {+-1, +-i}.
    """

    def __init__(self, in_features: int, out_features: int, *, qat: bool = True,
                 granularity: Granularity = "tensor", rngs: nnx.Rngs):
        self.in_features = check_pos_int("in_features", in_features)
        self.out_features = check_pos_int("out_features", out_features)
        self.qat = check_bool("qat", qat)
        self.granularity = _check_granularity(granularity)
        bound = 1.0 / math.sqrt(self.in_features)
        self.kernel = nnx.Param(_complex_uniform(rngs.params(), (in_features, out_features),
                                                 bound))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` complex64 ``(..., in_features)`` -> complex64 ``(..., out_features)``."""
        return complex_dense(x, self.kernel[...], qat=self.qat, granularity=self.granularity)

    def quantize(self):
        """``(codes, scale_re, scale_im)`` of the kernel, for :func:`ifairy_serve`."""
        return ifairy_quantize(self.kernel[...], granularity=self.granularity)


def conjugate_gradients() -> optax.GradientTransformation:
    """Optax transform conjugating complex updates: JAX's gradient ``dL/da - i dL/db`` becomes
    ``dL/da + i dL/db``, the steepest-ascent direction of ``w = a + ib`` (real leaves pass
    unchanged); stateless.

    Use it first in the chain, e.g. ``optax.chain(conjugate_gradients(), optax.adamw(lr))``,
    so that ``w <- w - lr * update`` descends in both the real and the imaginary part.
    """

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: jnp.conj(u) if jnp.iscomplexobj(u) else u, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
