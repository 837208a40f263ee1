"""Number formats: the grids that quantized values live on.

A format maps a value ``v`` expressed in units of the scale (``v = x / scale``) to an integer
*code* and back. Codes are what a :class:`~qjax.QArray` stores; ``decode(code)`` is the value in
units of the scale, so a dequantized element is ``decode(code) * scale``.

Formats (all frozen, hashable dataclasses so they can be static arguments under ``jit``):

* :class:`IntFormat` ``(bits, signed)``: uniform integers. Signed codes are
  ``[-2^(b-1), 2^(b-1) - 1]``, unsigned ``[0, 2^b - 1]``; ``decode(q) = q - zero_point``.
  Besides half-to-even it can round half away from zero or half up (:data:`INT_ROUNDINGS`), for
  presets that reproduce other runtimes (:mod:`qjax.presets`).
* :class:`Midrise` ``(bits)``: QuEST's symmetric grid without a zero level. Codes
  ``q in [-2^(b-1), 2^(b-1) - 1]`` mean ``q + 1/2`` steps, so levels are
  ``+-1/2, +-3/2, ..., +-(2^b - 1)/2``.
* :class:`Ternary`: codes ``{-1, 0, 1}``.
* :class:`FloatFormat` ``(name)``: fp8 ``e4m3`` (OCP ``float8_e4m3fn``, max 448), ``e5m2``
  (max 57344) and fp4 ``e2m1`` (max 6). Round to nearest even, saturating (no inf/NaN codes).
* :class:`POST` ``(bits)``: ASQ's power-of-sqrt(2) grid, integer codes ``[-K, K]`` decoded by a
  table (``0``, ``+-2^(-k/2)``); nearest level, ties away from zero.

All arithmetic is float32 and rounding is round-half-to-even (``jnp.round``) by default, as the
numerics contract requires.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qjax._src._checks import check_bool, check_int

__all__ = [
    "IntFormat",
    "Midrise",
    "Ternary",
    "FloatFormat",
    "POST",
    "Format",
    "format_from_name",
    "check_bits",
    "check_positive_level",
]


def check_bits(bits: object, lo: int = 1, hi: int = 8) -> int:
    """``bits`` as an int in ``[lo, hi]`` (TypeError / ValueError naming ``bits``)."""
    return check_int("bits", bits, lo, hi)


INT_ROUNDINGS = ("nearest", "half_away", "half_up")
MIDRISE_ROUNDINGS = ("nearest", "half_up")


def _round_int(v: jax.Array, rounding: str, qmin: int) -> jax.Array:
    if rounding == "nearest":
        return jnp.round(v)
    if rounding == "half_away":
        return jax.lax.round(v, jax.lax.RoundingMethod.AWAY_FROM_ZERO)
    if rounding == "half_up":
        # Truncation equals floor here: below the range the result is clipped to qmin anyway.
        return jnp.floor(v + (0.5 - qmin)) + qmin
    raise ValueError(f"rounding must be one of {INT_ROUNDINGS}, got {rounding!r}")


@dataclasses.dataclass(frozen=True)
class IntFormat:
    """Uniform integer grid of ``bits`` bits, signed (two's complement range) or unsigned.

    Attributes:
      bits: 1 to 8.
      signed: signed codes ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
    """

    bits: int
    signed: bool = True

    def __post_init__(self):
        object.__setattr__(self, "bits", check_bits(self.bits))
        object.__setattr__(self, "signed", check_bool("signed", self.signed))

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max_level(self) -> float:
        """Largest positive value in units of the scale used by symmetric scale rules."""
        return float(self.qmax)

    @property
    def num_levels(self) -> int:
        """Levels a symmetric scale rule uses: ``-qmax..qmax`` (signed), ``0..qmax`` (unsigned)."""
        return 2 * self.qmax + 1 if self.signed else self.qmax + 1

    @property
    def uniform(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    def encode(
        self, v: jax.Array, zero_point: jax.Array | None = None, rounding: str = "nearest"
    ) -> jax.Array:
        """Codes of ``v`` (float32, units of the scale), as float32 integers.

        ``rounding`` (see :data:`INT_ROUNDINGS`): ``"nearest"`` rounds half to even;
        ``"half_away"`` rounds half away from zero, exactly (C's ``roundf``); ``"half_up"`` is
        llama.cpp's ``(int)(v + (0.5 - qmin)) + qmin``: the shift to the unsigned range and the
        half are added in one float32 add before truncating, so within a float32 ulp of
        ``v - qmin`` below a half it can round up (Q4_0 computes ``(int8_t)(x * id + 8.5f)``).
        """
        q = _round_int(v, rounding, self.qmin)
        if zero_point is not None:
            q = q + zero_point
        return jnp.clip(q, self.qmin, self.qmax)

    def encode_floor(self, v: jax.Array, zero_point: jax.Array | None = None) -> jax.Array:
        q = jnp.floor(v)
        if zero_point is not None:
            q = q + zero_point
        return jnp.clip(q, self.qmin, self.qmax)

    def decode(self, q: jax.Array, zero_point: jax.Array | None = None) -> jax.Array:
        return q - zero_point if zero_point is not None else q

    def range_in_scale_units(self, zero_point=None):
        """Inclusive ``(lo, hi)`` of ``x / scale`` that is not clipped (for clipped STE)."""
        if zero_point is None:
            return float(self.qmin), float(self.qmax)
        return self.qmin - zero_point, self.qmax - zero_point


@dataclasses.dataclass(frozen=True)
class Midrise:
    """QuEST's symmetric midrise grid with ``2^bits`` levels and no zero level.

    Codes ``q in [-2^(b-1), 2^(b-1)-1]`` mean ``(q + 1/2) * step``. For ``xc = clip(x, -c, c)``
    and ``step = 2c/(2^b - 1)``: ``q = round(xc/step + 1/2) - 1`` (half-to-even), which equals
    ``clip(round(x/step + 1/2) - 1, qmin, qmax)``.

    References:
      Panferov et al., 2025. QuEST: Stable Training of LLMs with 1-Bit Weights and Activations.
    """

    bits: int

    def __post_init__(self):
        object.__setattr__(self, "bits", check_bits(self.bits))

    signed = True

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def max_level(self) -> float:
        return (2**self.bits - 1) / 2

    @property
    def num_levels(self) -> int:
        return 2**self.bits

    @property
    def uniform(self) -> bool:
        return True

    @property
    def name(self) -> str:
        return f"midrise{self.bits}"

    def encode(self, v, zero_point=None, rounding: str = "nearest"):
        """Codes of ``v`` (float32, units of the step), as float32 integers.

        ``rounding`` (see :data:`MIDRISE_ROUNDINGS`): ``"nearest"`` is ``round(v + 1/2) - 1``
        half to even (a value on a bin edge goes to the even-numbered level); ``"half_up"``
        sends a value on an edge to the level above, i.e. ``floor(v)``: OFQ's StatsQ.
        """
        if rounding == "nearest":
            q = jnp.round(v + 0.5) - 1.0
        elif rounding == "half_up":
            q = jnp.floor(v)  # not floor(v + 1) - 1, which loses tiny negative v to 0
        else:
            raise ValueError(f"rounding must be one of {MIDRISE_ROUNDINGS}, got {rounding!r}")
        return jnp.clip(q, self.qmin, self.qmax)

    def encode_floor(self, v, zero_point=None):
        return jnp.clip(jnp.floor(v + 0.5) - 1.0, self.qmin, self.qmax)

    def decode(self, q, zero_point=None):
        return q + 0.5

    def range_in_scale_units(self, zero_point=None):
        return -self.max_level, self.max_level


@dataclasses.dataclass(frozen=True)
class Ternary:
    """Three levels ``{-1, 0, 1}`` times the scale (log2(3) = 1.585 bits, stored in 2)."""

    bits = 2
    signed = True
    qmin = -1
    qmax = 1
    max_level = 1.0
    num_levels = 3
    uniform = True
    name = "ternary"

    def encode(self, v, zero_point=None):
        return jnp.clip(jnp.round(v), -1.0, 1.0)

    def encode_floor(self, v, zero_point=None):
        return jnp.clip(jnp.floor(v), -1.0, 1.0)

    def decode(self, q, zero_point=None):
        return q

    def range_in_scale_units(self, zero_point=None):
        return -1.0, 1.0


# name -> (exponent bits, mantissa bits, exponent bias, largest finite value, ml_dtypes dtype)
_FLOAT_FORMATS = {
    "e4m3": (4, 3, 7, 448.0, ml_dtypes.float8_e4m3fn),
    "e5m2": (5, 2, 15, 57344.0, ml_dtypes.float8_e5m2),
    "e2m1": (2, 1, 1, 6.0, ml_dtypes.float4_e2m1fn),
}
_FLOAT_ALIASES = {
    "fp8_e4m3": "e4m3", "float8_e4m3fn": "e4m3", "fp8": "e4m3",
    "fp8_e5m2": "e5m2", "float8_e5m2": "e5m2",
    "fp4": "e2m1", "fp4_e2m1": "e2m1", "float4_e2m1fn": "e2m1",
}


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """Mini-float grid: ``e4m3`` (fp8, OCP fn variant), ``e5m2`` (fp8) or ``e2m1`` (fp4).

    Rounding is to nearest even at the element's own binade spacing
    ``2^(max(floor(log2|v|), emin) - mantissa_bits)`` (subnormals included) after saturating
    ``v`` to ``+-max``; the result is exactly representable in the named ml_dtypes dtype, which is
    how codes are stored (fp4 codes are the 4-bit e2m1 bit patterns).
    """

    name: str = "e4m3"

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {self.name!r}")
        name = _FLOAT_ALIASES.get(self.name.lower(), self.name.lower())
        if name not in _FLOAT_FORMATS:
            allowed = sorted(_FLOAT_FORMATS) + sorted(_FLOAT_ALIASES)
            raise ValueError(f"unknown float format name {self.name!r}; allowed: {allowed}")
        object.__setattr__(self, "name", name)

    signed = True
    uniform = False

    @property
    def exponent_bits(self) -> int:
        return _FLOAT_FORMATS[self.name][0]

    @property
    def mantissa_bits(self) -> int:
        return _FLOAT_FORMATS[self.name][1]

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - _FLOAT_FORMATS[self.name][2]

    @property
    def max_level(self) -> float:
        return _FLOAT_FORMATS[self.name][3]

    @property
    def dtype(self):
        return _FLOAT_FORMATS[self.name][4]

    def levels(self) -> np.ndarray:
        """All non-negative finite values of the format, ascending (float64)."""
        if self.name == "e2m1":
            return np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
        f = np.arange(128, dtype=np.uint8).view(self.dtype).astype(np.float64)
        return np.unique(f[np.isfinite(f)])

    def encode(self, v, zero_point=None):
        mbits = self.mantissa_bits
        v = jnp.clip(v, -self.max_level, self.max_level)
        bits = jax.lax.bitcast_convert_type(v, jnp.int32)
        exponent = ((bits >> 23) & 0xFF) - 127
        exponent = jnp.maximum(exponent, self.emin)
        # Powers of two are exact in float32, so v / spacing only shifts the exponent.
        spacing = jax.lax.bitcast_convert_type((exponent - mbits + 127) << 23, jnp.float32)
        return jnp.round(v / spacing) * spacing

    def encode_floor(self, v, zero_point=None):
        raise ValueError(
            f"stochastic rounding is supported for uniform formats only, not {self.name}"
        )

    def decode(self, q, zero_point=None):
        return q

    def range_in_scale_units(self, zero_point=None):
        return -self.max_level, self.max_level


@functools.cache
def _post_tables(bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = 2 ** (bits - 1) - 1
    # 2^(-j/2) as a power of two times sqrt(1/2): exact scaling of one correctly rounded sqrt.
    mags = [0.0] + [math.ldexp(math.sqrt(0.5) if j % 2 else 1.0, -(j // 2))
                    for j in range(k - 1, -1, -1)]
    m = np.asarray(mags, np.float32)
    mids = ((m[:-1].astype(np.float64) + m[1:].astype(np.float64)) / 2).astype(np.float32)
    table = np.concatenate([-m[:0:-1], m])
    for a in (m, mids, table):
        a.setflags(write=False)
    return m, mids, table


@dataclasses.dataclass(frozen=True)
class POST:
    """ASQ's power-of-sqrt(2) grid: levels ``0`` and ``+-2^(-k/2)``, ``k = 0..K-1``.

    ``K = 2^(b-1) - 1`` (``2^b - 1`` levels, b = 2..8: 2 bits is ``{0, +-1}``); codes
    ``q in [-K, K]`` mean ``sign(q) * 2^(-(K - |q|)/2)`` (0 for ``q = 0``), so the scale is also
    the clip (``max_level = 1``). Encoding rounds ``|v|`` to the nearest level by comparing it
    with the float32 midpoints of adjacent magnitudes (ties away from zero, ``|v| >= 1 -> +-1``);
    decoding is a table lookup. Non-uniform: no stochastic rounding, no int8 product.

    References:
      Zhou et al., 2025. Precision Neural Network Quantization via Learnable Adaptive Modules
      (ASQ and POST).
    """

    bits: int

    def __post_init__(self):
        object.__setattr__(self, "bits", check_bits(self.bits, lo=2))

    signed = True
    uniform = False
    max_level = 1.0

    @property
    def qmax(self) -> int:
        """``K = 2^(bits-1) - 1``."""
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -self.qmax

    @property
    def num_levels(self) -> int:
        return 2 * self.qmax + 1

    @property
    def name(self) -> str:
        return f"post{self.bits}"

    def levels(self) -> np.ndarray:
        """All non-negative levels, ascending (float64 of the float32 values)."""
        return _post_tables(self.bits)[0].astype(np.float64)

    @property
    def midpoints(self) -> np.ndarray:
        """float32 ``(K,)``: the rounding thresholds of ``|v|`` (midpoints of adjacent levels)."""
        return _post_tables(self.bits)[1]

    @property
    def code_table(self) -> np.ndarray:
        """float32 ``(2K + 1,)``, ascending: code ``q`` means ``code_table[q + K]``."""
        return _post_tables(self.bits)[2]

    def encode(self, v, zero_point=None):
        # compare_all: K <= 127 compares per element, and it compiles far faster than "scan".
        mag = jnp.searchsorted(jnp.asarray(self.midpoints), jnp.abs(v), side="right",
                               method="compare_all")
        return jnp.where(v < 0, -mag, mag).astype(jnp.float32)

    def encode_floor(self, v, zero_point=None):
        raise ValueError(
            f"stochastic rounding is supported for uniform formats only, not {self.name}"
        )

    def decode(self, q, zero_point=None):
        """float32 levels of integer-valued codes (out-of-range codes clip to ``+-1``)."""
        return jnp.take(jnp.asarray(self.code_table), q.astype(jnp.int32) + self.qmax,
                        mode="clip")

    def range_in_scale_units(self, zero_point=None):
        return -1.0, 1.0


Format = IntFormat | Midrise | Ternary | FloatFormat | POST
FORMAT_TYPES = (IntFormat, Midrise, Ternary, FloatFormat, POST)


def check_positive_level(fmt: Format, user: str) -> None:
    """Refuses, for ``user``, a grid without a positive level: the signed ``IntFormat(1)``, whose
    codes are -1 and 0 (``max_level = qmax = 0``; symmetric scales, LSQ and PACT divide by it)."""
    if fmt.max_level <= 0:
        raise ValueError(
            f"{user}: format {fmt.name} has no positive level (its codes are -1 and 0); use "
            "'midrise1' (sign quantization, levels +-1/2), 'ternary' or 'uint1' (with an "
            "asymmetric rule)"
        )

_NAME_RE = re.compile(r"^(int|uint|midrise|post)([1-8])$")


def format_from_name(name: str) -> Format:
    """Parses ``"int4"``, ``"uint8"``, ``"midrise2"``, ``"ternary"``, ``"e4m3"``, ``"fp4"`` ...

    Raises:
      ValueError: for an unknown name, listing the allowed ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"format name must be a str, got {name!r}")
    key = name.lower()
    m = _NAME_RE.match(key)
    if m:
        kind, bits = m.group(1), int(m.group(2))
        if kind == "midrise":
            return Midrise(bits)
        if kind == "post":
            return POST(bits)
        return IntFormat(bits, signed=(kind == "int"))
    if key == "ternary":
        return Ternary()
    if key in _FLOAT_FORMATS or key in _FLOAT_ALIASES:
        return FloatFormat(key)
    raise ValueError(
        f"unknown format {name!r}; allowed: int1..int8, uint1..uint8, midrise1..midrise8, "
        f"post2..post8, ternary, {', '.join(sorted(_FLOAT_FORMATS) + sorted(_FLOAT_ALIASES))}"
    )


def as_format(fmt: Format | str) -> Format:
    """Returns ``fmt`` if it is a format, else parses it by name."""
    if isinstance(fmt, FORMAT_TYPES):
        return fmt
    if isinstance(fmt, str):
        return format_from_name(fmt)
    raise TypeError(f"format must be a Format or a name, got {fmt!r} ({type(fmt).__name__})")


def storage_bits(fmt: Format) -> int:
    """Bits per code in packed storage (ternary uses 2)."""
    return int(math.ceil(fmt.bits)) if not isinstance(fmt, Ternary) else 2
