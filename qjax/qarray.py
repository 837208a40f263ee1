"""QArray: a quantized array as a pytree of integer codes, scales and an optional zero point.

Storage of codes (``QArray.codes``), by format:

* 1-, 2- and 4-bit uniform formats (and ternary, stored in 2 bits): packed into ``uint8`` along
  the last axis, ``8 // bits`` codes per byte, **first code in the lowest bits**. A code ``q`` is
  stored as the unsigned offset ``q - qmin``. The last axis is zero-padded to a multiple of
  ``8 // bits``; the true shape is ``QArray.shape``.
* 3-, 5-, 6-, 7- and 8-bit uniform formats: one code per byte, ``int8`` (signed formats and midrise)
  or ``uint8`` (unsigned), unpacked.
* fp8 (``e4m3``, ``e5m2``): the ml_dtypes ``float8_*`` value itself, one per byte.
* fp4 ``e2m1``: the 4-bit e2m1 bit pattern (sign in bit 3), packed two per byte like int4.

``scale`` is float32 and ``zero_point`` int32 (or None), both shaped like the blocked view with the
reduced axes kept as 1 (see :mod:`qjax.granularity`). The spec, shape and dtype are static
(pytree metadata), so a QArray passes through ``jit``, ``vmap`` and Orbax like any pytree.

Leading axes follow the arrays: when ``jax.vmap``, ``lax.scan`` or ``nn.scan`` slice (or stack) a
QArray's leaves along a leading axis, the rebuilt QArray's ``shape`` is the codes' leading shape
plus the true last-axis size (which is never sliced: codes are packed along it). So a stack of
``L`` per-layer ``(N, K)`` QArrays is one QArray ``(L, N, K)``, and a scan over it sees ``(N, K)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qjax import formats as F
from qjax._checks import check_int
from qjax.spec import QuantSpec

__all__ = ["QArray", "pack_bits", "unpack_bits", "codes_to_storage", "storage_to_codes"]

PACKED_BITS = (1, 2, 4)
_E2M1_LEVELS = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def _check_packed_bits(bits: object, what: str) -> int:
    bits = check_int("bits", bits)
    if bits not in PACKED_BITS:
        raise ValueError(f"bits must be one of {PACKED_BITS} to {what}, got {bits}")
    return bits


def pack_bits(u: jax.Array, bits: int) -> jax.Array:
    """Packs unsigned codes ``u`` (values in ``[0, 2^bits)``) along the last axis into uint8.

    Each code is masked to its low ``bits`` bits first, so a code outside the range (a negative
    one wraps modulo ``2^bits``) cannot spill into its neighbours' bits.

    Args:
      u: integer array ``(..., n)``.
      bits: 1, 2 or 4.

    Returns:
      uint8 ``(..., ceil(n * bits / 8))``; code ``i`` of a byte sits in bits
      ``[i * bits, (i + 1) * bits)`` (low first); padding codes are 0.
    """
    bits = _check_packed_bits(bits, "pack")
    per = 8 // bits
    u = jnp.asarray(u)
    if not jnp.issubdtype(u.dtype, jnp.integer):
        raise TypeError(f"u must be an integer array of codes, got dtype {u.dtype}")
    u = (u & (2**bits - 1)).astype(jnp.uint8)
    n = u.shape[-1]
    pad = (-n) % per
    if pad:
        u = jnp.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)])
    u = u.reshape(u.shape[:-1] + (u.shape[-1] // per, per))
    shifts = jnp.arange(per, dtype=jnp.uint8) * bits
    # Codes occupy disjoint bit ranges, so the sum is a bitwise OR.
    return jnp.sum(u << shifts, axis=-1, dtype=jnp.uint8)


def unpack_bits(p: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of :func:`pack_bits`: uint8 ``(..., m)`` -> uint8 codes ``(..., n)``.

    ``n`` must fit the packed length: ``m == ceil(n * bits / 8)``.
    """
    bits = _check_packed_bits(bits, "unpack")
    per = 8 // bits
    p = jnp.asarray(p)
    if p.ndim == 0 or not jnp.issubdtype(p.dtype, jnp.integer):
        raise TypeError(f"p must be a packed integer (uint8) array of rank >= 1, got {p.dtype} "
                        f"of shape {p.shape}")
    m = p.shape[-1]
    lo = (m - 1) * per + 1 if m else 0
    n = check_int("n", n)
    if not lo <= n <= m * per:
        raise ValueError(f"n must be in [{lo}, {m * per}] for {m} packed bytes of {per} codes "
                         f"each, got {n}")
    p = p.astype(jnp.uint8)
    shifts = jnp.arange(per, dtype=jnp.uint8) * bits
    u = (p[..., None] >> shifts) & jnp.uint8(2**bits - 1)
    return u.reshape(p.shape[:-1] + (p.shape[-1] * per,))[..., :n]


def codes_to_storage(q: jax.Array, fmt: F.Format) -> jax.Array:
    """Float32 codes (unblocked, original shape) -> stored codes (see the module docstring)."""
    if isinstance(fmt, F.FloatFormat):
        if fmt.name != "e2m1":
            return q.astype(fmt.dtype)
        idx = jnp.sum(jnp.abs(q)[..., None] >= _E2M1_LEVELS[1:], axis=-1, dtype=jnp.uint8)
        pattern = idx | (jnp.signbit(q).astype(jnp.uint8) << 3)
        return pack_bits(pattern, 4)
    bits = F.storage_bits(fmt)
    if bits in PACKED_BITS:
        return pack_bits((q - fmt.qmin).astype(jnp.int32), bits)
    return q.astype(jnp.int8 if fmt.signed else jnp.uint8)


def storage_to_codes(c: jax.Array, fmt: F.Format, n: int) -> jax.Array:
    """Stored codes -> float32 codes; ``n`` is the true size of the last axis."""
    if isinstance(fmt, F.FloatFormat):
        if fmt.name != "e2m1":
            return c.astype(jnp.float32)
        pattern = unpack_bits(c, 4, n)
        mag = jnp.asarray(_E2M1_LEVELS)[(pattern & 7).astype(jnp.int32)]
        return jnp.where((pattern >> 3) == 1, -mag, mag)
    bits = F.storage_bits(fmt)
    if bits in PACKED_BITS:
        return unpack_bits(c, bits, n).astype(jnp.float32) + fmt.qmin
    return c.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class QArray:
    """Quantized array.

    Attributes:
      codes: stored codes (see the module docstring for the layout per format).
      scale: float32 scales, shape ``Layout.scale_shape``.
      zero_point: int32 zero points like ``scale``, or None for symmetric rules.
      spec: the :class:`~qjax.QuantSpec` that produced it (static).
      shape: the shape of the quantized array (static; with Hadamard, of the rotated array).
      dtype: name of the dtype :func:`qjax.dequantize` returns (static).
    """

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))

    def __post_init__(self):
        # Only the static fields: the array fields may be tracers or placeholders when JAX
        # rebuilds the pytree.
        if not isinstance(self.spec, QuantSpec):
            raise TypeError(f"spec must be a qjax.QuantSpec, got {type(self.spec).__name__}")
        try:
            dt = jnp.dtype(self.dtype)
        except TypeError:
            dt = None
        if dt is None or not jnp.issubdtype(dt, jnp.floating):
            # dequantize returns this dtype: an integer one would truncate the values.
            raise TypeError(f"dtype must name a floating dtype (float32, bfloat16, float16), "
                            f"got {self.dtype!r}")
        object.__setattr__(self, "dtype", dt.name)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and zero points."""
        leaves = [self.codes, self.scale]
        if self.zero_point is not None:
            leaves.append(self.zero_point)
        return int(sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves))

    def codes_float32(self) -> jax.Array:
        """The unpacked codes as float32 integers (or fp values), shape ``self.shape``."""
        n = self.shape[-1] if self.shape else 1
        return storage_to_codes(self.codes, self.spec.format, n).reshape(self.shape)


def _qarray_flatten_with_keys(q: QArray):
    children = ((jax.tree_util.GetAttrKey("codes"), q.codes),
                (jax.tree_util.GetAttrKey("scale"), q.scale),
                (jax.tree_util.GetAttrKey("zero_point"), q.zero_point))
    return children, (q.spec, q.shape, q.dtype)


def _qarray_unflatten(aux, children) -> QArray:
    spec, shape, dtype = aux
    codes, scale, zero_point = children
    lead = getattr(codes, "shape", None)
    # Leaves sliced or stacked along leading axes (vmap, scan) carry their own leading shape;
    # placeholders without a shape (in_axes specs, sentinels) keep the recorded one.
    if shape and isinstance(lead, tuple) and len(lead) >= 1 and tuple(lead[:-1]) != shape[:-1]:
        shape = tuple(int(d) for d in lead[:-1]) + (shape[-1],)
    q = object.__new__(QArray)
    for name, value in (("codes", codes), ("scale", scale), ("zero_point", zero_point),
                        ("spec", spec), ("shape", shape), ("dtype", dtype)):
        object.__setattr__(q, name, value)
    return q


jax.tree_util.register_pytree_with_keys(
    QArray, _qarray_flatten_with_keys, _qarray_unflatten,
    flatten_func=lambda q: ((q.codes, q.scale, q.zero_point), (q.spec, q.shape, q.dtype)))
