"""Block Walsh-Hadamard transform.

``hadamard_transform(x, block_size=128, axis=-1)`` splits ``axis`` into blocks of ``block_size``
(a power of two) and multiplies each block by the Sylvester Walsh-Hadamard matrix scaled by
``1/sqrt(block_size)``: ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]] / sqrt(2)``. The
matrix is orthonormal and symmetric, so the transform is its own inverse and preserves norms.
With fixed random ``signs`` (a ``(block_size,)`` vector of +-1) the transform is ``x -> H(x * d)``
and its inverse ``y -> H(y) * d``.

``method="butterfly"`` is the classic fast transform, ``log2(n)`` stages of adds and subtracts,
``O(n log n)`` per block. ``method="matmul"`` multiplies each block by the dense ``+-1`` matrix at
``Precision.HIGHEST`` (``O(n^2)`` flops, but one BLAS call or matrix-unit pass instead of
``log2(n)`` passes over memory: 2-3x faster than the butterfly on CPU at block 128).
``method="kronecker"`` (the default, here and in the quantizers) uses Sylvester's factorisation
``H_n = H_c (x) H_a`` with ``a = min(n, 32)``, ``c = n / a``: each block viewed as ``(c, a)`` is
multiplied by the dense ``H_a`` (one small matmul) and then combined across ``c`` by ``c``-term
signed sums (one fused elementwise pass; ``c > 8`` recurses). At block 128 that is ``2 (32 + 4) =
72`` flops per element instead of 256, and 2.4-3.7x faster than ``"matmul"`` on CPU
(``benchmarks/qat_step.py`` measures the QAT step it serves; on an explicit-sharding mesh, when
the axes after the rotated one are sharded, it computes the dense matmul instead, since its sums
would merge a sharded axis).
All three compute in float32 whatever the input dtype (the result is float32) and agree to float
rounding (the summation order differs). The transform is linear, so reverse-mode autodiff gives the
transpose (itself) with no custom rule; ``explicit_vjp=True`` (used by the quantizers) writes that
same transpose out as a custom VJP, because XLA surrounds autodiff's transposed matmul with
transposes that on CPU cost about as much as the matmul.

Range: the ``1/sqrt(block_size)`` is split into an exact power of two ``2^-k``, ``k =
log2(block_size) + 1``, applied before the sums (folded into the matrix, or one multiply), and the
rest (``2 sqrt(block_size)``) after. With ``2^-k`` first no partial sum can exceed half the
largest input, so no finite input overflows to inf inside the transform and no ``inf - inf``
gives NaN: the result is exact (to float rounding) wherever it is within float32's range, and
saturates at float32 max where it is not (identity gradient): finite input gives finite output,
with no extra pass over the input. Scaling by a power of two is exact, so the result is bit for bit
that of normalising after the sums, except that inputs below ``2^(k - 126)`` (``3.4e-36`` at block
128) fall into float32's denormals before the sums (flushed to zero where the hardware flushes
them).

References:
  Panferov et al., 2025. QuEST: Stable Training of LLMs with 1-Bit Weights and Activations.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src import typed_sharding
from qjax._src._checks import check_bool, check_int

__all__ = [
    "hadamard_transform",
    "hadamard_matrix",
    "random_signs",
    "check_block_size",
    "saturating_cast",
    "HADAMARD_METHODS",
    "HadamardMethod",
]

HADAMARD_METHODS = ("butterfly", "matmul", "kronecker")
HadamardMethod = Literal["butterfly", "matmul", "kronecker"]
# The Kronecker form's dense factor: small enough to cut the flops (2 * 32 per element at block
# 128), large enough for one efficient BLAS / matrix-unit call.
_KRONECKER_DENSE = 32
# The signed-sum factor beyond which the Kronecker form recurses (c terms per output element).
_KRONECKER_SUMS = 8


def check_block_size(block_size: object, name: str = "block_size") -> int:
    """Validates a Hadamard block size (a positive power of two); errors call it ``name``."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise TypeError(f"{name} must be an int power of two, got {block_size!r}")
    b = int(block_size)
    if b < 1 or b & (b - 1):
        raise ValueError(f"{name} must be a positive power of two, got {b}")
    return b


def hadamard_matrix(n: int) -> np.ndarray:
    """Dense orthonormal Sylvester Hadamard matrix ``(n, n)`` in float64 (for tests, references)."""
    n = check_block_size(n)
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def random_signs(key: jax.Array, block_size: int) -> jax.Array:
    """A fixed ``(block_size,)`` float32 vector of random +-1 for a randomized Hadamard."""
    check_block_size(block_size)
    return jnp.where(jax.random.bernoulli(key, 0.5, (block_size,)), 1.0, -1.0).astype(jnp.float32)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _clip_finite(y: jax.Array, big: float) -> jax.Array:
    return jnp.clip(y, -big, big)


@_clip_finite.defjvp
def _clip_finite_jvp(big, primals, tangents):
    # The saturation belongs to the cast, not to the function before it: the gradient passes
    # unchanged, as it does through a plain cast (and autodiff through clip would halve it at the
    # bound and zero it beyond).
    (y,), (t,) = primals, tangents
    return _clip_finite(y, big), t


def saturating_cast(y: jax.Array, dtype) -> jax.Array:
    """``y`` cast to the floating ``dtype``, values beyond its largest finite value saturated to it.

    The output cast of :func:`hadamard_transform`, :func:`qjax.fake_quant` and
    :func:`qjax.dequantize`: finite input gives finite output (``+-inf`` saturate too; NaN stays
    NaN). Differentiable with the identity gradient, as a plain cast.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    return _clip_finite(jnp.asarray(y), float(jnp.finfo(dtype).max)).astype(dtype)


def _butterfly(y: jax.Array) -> jax.Array:
    """Unnormalized Sylvester WHT of ``y (..., nb, b, Q)`` along axis -2, in ``log2(b)`` stages."""
    *lead, nb, b, q = y.shape
    h = 1
    while h < b:
        # Pairs (i, i + h) inside each chunk of 2h: [u, v] -> [u + v, u - v].
        z = y.reshape(*lead, nb, b // (2 * h), 2, h, q)
        u, v = z[..., 0, :, :], z[..., 1, :, :]
        y = jnp.stack([u + v, u - v], axis=-3).reshape(y.shape)
        h *= 2
    return y


def _dense(y: jax.Array, pre: float = 1.0) -> jax.Array:
    """WHT of ``y (..., nb, b, Q)`` along axis -2 as a matmul with the ``+-pre`` matrix.

    ``pre`` (a power of two) is folded into the matrix rather than into ``y``, where XLA could
    move a scalar factor out of the dot product, after the sums.
    """
    b, q = y.shape[-2], y.shape[-1]
    h = jnp.asarray(np.rint(hadamard_matrix(b) * np.sqrt(b)) * pre, jnp.float32)
    if q == 1:  # rotating the last axis: y @ H (H is symmetric)
        return jnp.matmul(y[..., 0], h, precision=jax.lax.Precision.HIGHEST)[..., None]
    if typed_sharding.explicit_sharding(y) is not None:
        return jnp.matmul(h, y, precision=jax.lax.Precision.HIGHEST)
    # H broadcast over the leading axes makes them batch axes of one batched matmul whose output
    # is already in y's layout: ``matmul(h, y)`` is a dot with no batch axes, which XLA lays out
    # as (b, ..., Q) and transposes back (on CPU those transposes cost as much as the matmul).
    # The same products and sums, so the same values.
    lead = y.ndim - 2
    hb = jnp.broadcast_to(h, y.shape[:-2] + (b, b))
    dims = (((lead + 1,), (lead,)), (tuple(range(lead)), tuple(range(lead))))
    return jax.lax.dot_general(hb, y, dims, precision=jax.lax.Precision.HIGHEST)


def _signed_sums(y: jax.Array) -> jax.Array:
    """Unnormalized WHT of ``y (..., c, Q)`` along axis -2 as ``c``-term signed sums per output
    (small ``c``): XLA fuses them into one elementwise pass, where the butterfly's stages and a
    matmul over a strided axis each cost a pass over memory (and transposes)."""
    c = y.shape[-2]
    h = np.rint(hadamard_matrix(c) * np.sqrt(c))
    parts = [y[..., i, :] for i in range(c)]
    rows = []
    for r in range(c):
        acc = parts[0]  # H's first column is all +1
        for i in range(1, c):
            acc = acc + parts[i] if h[r, i] > 0 else acc - parts[i]
        rows.append(acc)
    return jnp.stack(rows, axis=-2)


def _kronecker(y: jax.Array, pre: float = 1.0) -> jax.Array:
    """WHT of ``y (..., nb, b, Q)`` along axis -2 as ``H_b = H_c (x) H_a``, ``a = min(b, 32)``.

    Block element ``i = j a + k`` (``j < c``, ``k < a``): the dense ``+-pre`` matrix ``H_a``
    transforms ``k`` (:func:`_dense`), then signed sums over ``j`` (:func:`_signed_sums`, or this
    function again when ``c > 8``). ``pre`` (a power of two) is exact wherever it is applied.
    """
    *lead, nb, b, q = y.shape
    spec = typed_sharding.explicit_spec(y)
    if spec is not None and spec[-1] is not None:
        # The sums run over (c, a * Q): merging a sharded Q is not a local reshape. One dense
        # matmul keeps Q in place (the same transform, to float rounding).
        return _dense(y, pre)
    a = min(b, _KRONECKER_DENSE)
    c = b // a
    y = _dense(y.reshape(*lead, nb, c, a, q), pre)
    if c == 1:
        return y.reshape(*lead, nb, b, q)
    y = y.reshape(*lead, nb, c, a * q)
    y = _signed_sums(y) if c <= _KRONECKER_SUMS else _kronecker(y)
    # Merge, then split: explicit-sharding meshes type-check a reshape that does both at once
    # only with an ``out_sharding``, even where the dims it touches are unsharded.
    return y.reshape(*lead, nb, b * q).reshape(*lead, nb, b, q)


_TRANSFORMS = {"matmul": _dense, "kronecker": _kronecker}


def _check_signs(signs, b: int) -> jax.Array:
    """``signs`` as float32 ``(b,)``; values must be +-1 where they are known at trace time
    (tracers and arrays spread over other hosts are not inspected)."""
    s = jnp.asarray(signs, jnp.float32)
    if s.shape != (b,):
        raise ValueError(f"signs must have shape ({b},), got {s.shape}")
    concrete = not isinstance(s, jax.core.Tracer) and getattr(s, "is_fully_addressable", True)
    if concrete and not np.all(np.abs(np.asarray(s)) == 1):
        raise ValueError(f"signs must be +-1 (see random_signs), got values {np.unique(s)}")
    return s


def hadamard_transform(
    x: jax.Array,
    block_size: int = 128,
    *,
    axis: int = -1,
    signs: jax.Array | None = None,
    inverse: bool = False,
    method: HadamardMethod = "kronecker",
    explicit_vjp: bool = False,
) -> jax.Array:
    """Block-diagonal orthonormal Walsh-Hadamard transform along ``axis``.

    Args:
      x: floating array; ``x.shape[axis]`` must be a multiple of ``block_size``.
      block_size: power of two (default 128, as QuEST).
      axis: the axis to rotate (an int).
      signs: optional ``(block_size,)`` +-1 vector (see :func:`random_signs`).
      inverse: apply the inverse (only differs from the forward when ``signs`` is given).
      method: ``"kronecker"`` (default: a small dense matmul and signed sums; see the module
        docstring), ``"matmul"`` (dense block matmul) or ``"butterfly"`` (O(n log n) stages).
      explicit_vjp: with ``method="matmul"`` or ``"kronecker"`` and no ``signs``,
        differentiate through a custom VJP that writes the transpose out: the same gradient
        values as autodiff (to float rounding for ``"kronecker"``), without the transposes XLA
        puts around autodiff's transposed matmul (on CPU they cost about as much as the matmul).
        Forward-mode autodiff (``jax.jvp``) is then unavailable, as it is through any fake
        quantizer, which is where :mod:`qjax.quantize` uses it. Ignored otherwise.

    Returns:
      float32 array of ``x.shape``: each block ``b`` becomes ``H b`` (``H (d * b)`` with signs);
      finite input gives finite output: exact (to float rounding) wherever the result is within
      float32's range, saturated at float32 max where it is not (see the module docstring).

    Raises:
      TypeError: non-floating ``x``.
      ValueError: bad ``block_size``, ``axis``, ``signs`` or ``method``, or a block size that does
        not divide the axis.
    """
    if method not in HADAMARD_METHODS:
        raise ValueError(f"method must be one of {HADAMARD_METHODS}, got {method!r}")
    axis = check_int("axis", axis)
    inverse = check_bool("inverse", inverse)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating array, got dtype {x.dtype}")
    b = check_block_size(block_size)
    if x.ndim == 0:
        raise ValueError("x must have rank >= 1")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} is out of range for rank {x.ndim}")
    axis = axis % x.ndim
    n = x.shape[axis]
    if n % b:
        raise ValueError(f"Hadamard block_size {b} does not divide axis {axis} of size {n}")
    if signs is not None:
        signs = _check_signs(signs, b)
    shards = typed_sharding.axis_shards(x, axis)
    if (n // shards) % b:
        raise ValueError(
            f"Hadamard block_size {b} straddles shards: axis {axis} of size {n} is split over "
            f"{shards} devices into {n // shards} per device, not a multiple of {b}"
        )
    if explicit_vjp and signs is None and method in _TRANSFORMS:
        return _rotate_vjp(x, b, axis, inverse, method)
    return _forward(x, signs, b, axis, inverse, method)


def _blocks(x: jax.Array, b: int, axis: int) -> jax.Array:
    """``x`` as float32 ``(P, blocks, block, Q)``: the rotated axis stays in place, so no transposes
    are needed. On an explicit mesh the leading axes stay separate (merging a sharded axis is not a
    local reshape)."""
    lead = x.shape[:axis] if typed_sharding.explicit_sharding(x) else (
        int(np.prod(x.shape[:axis], dtype=np.int64)),)
    q = int(np.prod(x.shape[axis + 1 :], dtype=np.int64))
    return x.astype(jnp.float32).reshape(*lead, x.shape[axis] // b, b, q)


def _split_norm(b: int) -> tuple[float, np.float32]:
    """``1/sqrt(b) = pre * post``: ``pre = 1 / (2 b)`` (a power of two) is applied before the sums
    (exact), so no partial sum exceeds half the largest input (module docstring); ``post = 2
    sqrt(b)``."""
    return 0.5 / b, np.float32(2.0 * np.sqrt(b))


def _forward(x, signs, b, axis, inverse, method):
    y = _blocks(x, b, axis)
    if signs is not None and not inverse:
        y = y * signs[:, None]
    pre, post = _split_norm(b)
    y = (_butterfly(y * np.float32(pre)) if method == "butterfly"
         else _TRANSFORMS[method](y, pre))
    # Only the final product can overflow (module docstring): it saturates, identity gradient.
    # Fused into the last stage's pass, where a clip of the input would cost a pass of its own.
    y = _clip_finite(y * post, float(np.finfo(np.float32).max))
    if signs is not None and inverse:
        y = y * signs[:, None]
    return typed_sharding.reshape(y, x.shape, like=x)


def _transpose(g: jax.Array, dtype, b: int, axis: int, method: str) -> jax.Array:
    """``dx (like g, dtype)`` of the ``"matmul"`` or ``"kronecker"`` transform (no signs) for the
    cotangent ``g``.

    The transpose, written out: ``(g * post) @ (pre * H)^T`` with ``H`` symmetric, so the forward
    transform of ``g * post``. For ``"matmul"`` these are autodiff's products and sums, so its
    values bit for bit (the saturation passes gradients unchanged); for ``"kronecker"`` autodiff
    would take the two factors in the other order, equal to float rounding. Autodiff's transposed
    dot and reshapes made XLA add transposes around the matmul (on CPU about as costly as the
    matmul itself); this is the forward's own transposes-free form.
    """
    pre, post = _split_norm(b)
    t = _TRANSFORMS[method](_blocks(g, b, axis) * post, pre)
    return typed_sharding.reshape(t, g.shape, like=g).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _rotate_vjp(x, b, axis, inverse, method):
    return _forward(x, None, b, axis, inverse, method)


def _rotate_vjp_fwd(x, b, axis, inverse, method):
    # Only x's dtype is kept (an empty array): the transform is linear, its backward needs no x.
    return _forward(x, None, b, axis, inverse, method), jnp.zeros((0,), x.dtype)


def _rotate_vjp_bwd(b, axis, inverse, method, res, g):
    return (_transpose(g, res.dtype, b, axis, method),)


_rotate_vjp.defvjp(_rotate_vjp_fwd, _rotate_vjp_bwd)
