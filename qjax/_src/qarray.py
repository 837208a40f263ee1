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

Two layouts of the codes are chosen with :func:`relayout` (the values never change):

* ``packed=False`` stores the codes of a 1-, 2- or 4-bit integer format (ternary included) one
  per byte, as the 8-bit formats are stored (``int8`` ``q`` for signed, midrise and ternary
  formats, ``uint8`` for unsigned ones): twice the bytes of int4's packed codes (still a quarter
  of float32's), in exchange for no shifts and masks each time the codes are read (the int8
  products of :mod:`qjax._src.int8` and of serving on ``"xla"``).
* ``k_major=True`` (arrays of rank >= 2) stores the codes with their last two axes swapped: a
  serving weight ``(N, K)`` holds bytes ``(K/per, N)``, the operand layout of the Pallas kernels
  (:mod:`qjax._src.kernels.cases`), which then read it without a per-call transpose.

``scale`` is float32 and ``zero_point`` int32 (or None), both shaped like the blocked view with the
reduced axes kept as 1 (see :mod:`qjax._src.granularity`). The spec, shape and dtype are static
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

from qjax._src import formats as F
from qjax._src._checks import check_int
from qjax._src.spec import QuantSpec

__all__ = ["QArray", "pack_bits", "unpack_bits", "codes_to_storage", "storage_to_codes",
           "is_packable", "relayout"]

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


def is_packable(fmt: F.Format) -> bool:
    """Whether ``fmt``'s codes have both layouts, packed and one per byte: integer formats of 1,
    2 or 4 storage bits (ternary included). fp4's e2m1 patterns are always packed."""
    return not isinstance(fmt, F.FloatFormat) and F.storage_bits(fmt) in PACKED_BITS


def codes_to_storage(q: jax.Array, fmt: F.Format, packed: bool = True) -> jax.Array:
    """Float32 codes (unblocked, original shape) -> stored codes (see the module docstring).

    ``packed=False`` stores sub-byte integer codes one per byte (:func:`unpack`'s layout).
    """
    if isinstance(fmt, F.FloatFormat):
        if fmt.name != "e2m1":
            return q.astype(fmt.dtype)
        idx = jnp.sum(jnp.abs(q)[..., None] >= _E2M1_LEVELS[1:], axis=-1, dtype=jnp.uint8)
        pattern = idx | (jnp.signbit(q).astype(jnp.uint8) << 3)
        return pack_bits(pattern, 4)
    bits = F.storage_bits(fmt)
    if bits in PACKED_BITS and packed:
        return pack_bits((q - fmt.qmin).astype(jnp.int32), bits)
    return q.astype(jnp.int8 if fmt.signed else jnp.uint8)


def storage_to_codes(c: jax.Array, fmt: F.Format, n: int, packed: bool = True) -> jax.Array:
    """Stored codes -> float32 codes; ``n`` is the true size of the last axis."""
    if isinstance(fmt, F.FloatFormat):
        if fmt.name != "e2m1":
            return c.astype(jnp.float32)
        pattern = unpack_bits(c, 4, n)
        mag = jnp.asarray(_E2M1_LEVELS)[(pattern & 7).astype(jnp.int32)]
        return jnp.where((pattern >> 3) == 1, -mag, mag)
    bits = F.storage_bits(fmt)
    if bits in PACKED_BITS and packed:
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
      packed: sub-byte integer codes packed several per byte (the default), or one per byte;
        always True for formats that are not packable (static; :func:`relayout`).
      k_major: codes stored with the last two axes swapped (static; :func:`relayout`).
    """

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True))
    packed: bool = dataclasses.field(default=True, metadata=dict(static=True))
    k_major: bool = dataclasses.field(default=False, metadata=dict(static=True))

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
        for name in ("packed", "k_major"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.k_major and len(self.shape) < 2:
            raise ValueError(f"k_major needs an array of rank >= 2, got shape {self.shape}")
        # One spelling per layout: a format without a packed form is always "packed".
        object.__setattr__(self, "packed", self.packed or not is_packable(self.spec.format))

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
        codes = jnp.swapaxes(self.codes, -1, -2) if self.k_major else self.codes
        return storage_to_codes(codes, self.spec.format, n, self.packed).reshape(self.shape)


def relayout(q: QArray, *, packed: bool | None = None, k_major: bool | None = None) -> QArray:
    """``q`` with its codes stored in another layout (see the module docstring); same values.

    Args:
      q: a QArray.
      packed: False stores sub-byte integer codes one per byte, True packs them; None keeps the
        current layout. Formats without two layouts (8-bit, fp8, fp4) ignore it.
      k_major: True swaps the codes' last two axes (rank >= 2), False restores them; None keeps.

    Raises:
      TypeError: ``q`` not a QArray, or a flag that is neither a bool nor None.
      ValueError: ``k_major=True`` for an array of rank < 2.
    """
    if not isinstance(q, QArray):
        raise TypeError(f"q must be a qjax.QArray, got {type(q).__name__}")
    for name, v in (("packed", packed), ("k_major", k_major)):
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool or None, got {v!r}")
    packed = q.packed if packed is None else (packed or not is_packable(q.spec.format))
    k_major = q.k_major if k_major is None else k_major
    if (packed, k_major) == (q.packed, q.k_major):
        return q
    if k_major and q.ndim < 2:
        raise ValueError(f"k_major needs an array of rank >= 2, got shape {q.shape}")
    codes = q.codes
    if packed != q.packed:
        rows = jnp.swapaxes(codes, -1, -2) if q.k_major else codes
        codes = codes_to_storage(storage_to_codes(rows, q.spec.format, q.shape[-1], q.packed),
                                 q.spec.format, packed)
        codes = jnp.swapaxes(codes, -1, -2) if q.k_major else codes
    if k_major != q.k_major:
        codes = jnp.swapaxes(codes, -1, -2)
    return dataclasses.replace(q, codes=codes, packed=packed, k_major=k_major)


def _qarray_flatten_with_keys(q: QArray):
    children = ((jax.tree_util.GetAttrKey("codes"), q.codes),
                (jax.tree_util.GetAttrKey("scale"), q.scale),
                (jax.tree_util.GetAttrKey("zero_point"), q.zero_point))
    return children, (q.spec, q.shape, q.dtype, q.packed, q.k_major)


def _qarray_unflatten(aux, children) -> QArray:
    spec, shape, dtype, packed, k_major = aux
    codes, scale, zero_point = children
    lead = getattr(codes, "shape", None)
    # Leaves sliced or stacked along leading axes (vmap, scan) carry their own leading shape;
    # placeholders without a shape (in_axes specs, sentinels) keep the recorded one.
    # The axes that are never sliced: the last one (packed along it), both last ones when K-major.
    fixed = 2 if k_major else 1
    if (shape and isinstance(lead, tuple) and len(lead) >= fixed
            and tuple(lead[:-fixed]) != shape[:-fixed]):
        shape = tuple(int(d) for d in lead[:-fixed]) + tuple(shape[-fixed:])
    q = object.__new__(QArray)
    for name, value in (("codes", codes), ("scale", scale), ("zero_point", zero_point),
                        ("spec", spec), ("shape", shape), ("dtype", dtype), ("packed", packed),
                        ("k_major", k_major)):
        object.__setattr__(q, name, value)
    return q


jax.tree_util.register_pytree_with_keys(
    QArray, _qarray_flatten_with_keys, _qarray_unflatten,
    flatten_func=lambda q: ((q.codes, q.scale, q.zero_point),
                            (q.spec, q.shape, q.dtype, q.packed, q.k_major)))
