"""Implementation of :mod:`qjax.nn.double_rounding` (documented there)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src import formats as F
from qjax._src import granularity as G
from qjax._src import scales as S
from qjax._src import spec as SP
from qjax._src._checks import check_int
from qjax._src.nn.layout import KernelLayout
from qjax._src.nn.recipe import LayerQuant, resolve
from qjax._src.qarray import QArray, codes_to_storage

__all__ = ["DoubleRounding", "init_scale", "double_round", "codes", "lower_precision",
           "joint_loss", "check_loss_weights"]


@dataclasses.dataclass(frozen=True)
class DoubleRounding:
    """A multi-precision weight recipe: a rule target for :func:`qjax.nn.quantize_model`.

    Attributes:
      bits: the precisions served, e.g. ``(8, 6, 4, 2)``; the highest is the storage precision.
      granularity: of ``s_h`` on the ``(K, N)`` matrix: ``PerRow(0)`` (per output feature),
        ``PerGroup(0, g)`` or ``PerTensor()``.
      activation: an activation spec applied at every precision, or None (weight-only).
    """

    bits: tuple[int, ...] = (8, 6, 4, 2)
    granularity: G.Granularity = G.PerRow(0)
    activation: SP.QuantSpec | None = None

    def __post_init__(self):
        if isinstance(self.bits, int) or not isinstance(self.bits, Sequence) or not self.bits:
            raise TypeError(f"bits must be a non-empty tuple of bit widths, got {self.bits!r}")
        bits = tuple(check_int("bits", b, 2, 8) for b in self.bits)
        if len(set(bits)) != len(bits):
            raise ValueError(f"bits must be distinct, got {bits}")
        object.__setattr__(self, "bits", tuple(sorted(bits, reverse=True)))
        if not isinstance(self.granularity, (G.PerRow, G.PerGroup, G.PerTensor)):
            raise ValueError(f"granularity must be PerRow(0), PerGroup(0, g) or PerTensor(), "
                             f"got {self.granularity}")
        SP.check_spec(self.activation, "activation", optional=True)

    @property
    def highest(self) -> int:
        return self.bits[0]

    def spec(self, bits: int | None = None) -> SP.QuantSpec:
        """The plain spec of the weights at ``bits`` (default: the highest)."""
        b = self.highest if bits is None else self.check(bits)
        return SP.QuantSpec(F.IntFormat(b), self.granularity, S.AbsMax(), SP.STE())

    def check(self, bits: object) -> int:
        if bits not in self.bits:
            raise ValueError(f"bits must be one of this recipe's {self.bits}, got {bits!r}")
        return int(bits)

    def layer_quant(self, layout: KernelLayout, path: str | None = None) -> LayerQuant:
        """The layer's specs at the highest precision, checked against ``layout``."""
        name = f"layer {path!r}: " if path is not None else ""
        if layout.kind == "embed" or layout.batch:
            raise ValueError(f"{name}double rounding needs a dense or conv layer without batch "
                             "axes")
        return resolve(LayerQuant(self.spec(), self.activation), layout, path)


def _ste(a: jax.Array, q: jax.Array, lo: float, hi: float) -> jax.Array:
    """``q`` forward; gradient 1 where ``lo <= a <= hi``, 0 elsewhere (exact: |q - a| <= 1/2)."""
    clipped = jnp.clip(a, lo, hi)
    return clipped + jax.lax.stop_gradient(q - clipped)


def init_scale(w: jax.Array, recipe: DoubleRounding) -> jax.Array:
    """``s_h = max|W| / qmax_h`` per block of the ``(K, N)`` matrix (blocked scale shape)."""
    spec = recipe.spec()
    lay = G.layout(spec.granularity, w.shape)
    s, _ = spec.scale_rule.compute(lay.block(w.astype(jnp.float32)), lay.reduce_axes, spec.format)
    return s


def codes(w: jax.Array, scale: jax.Array, recipe: DoubleRounding, bits: int) -> jax.Array:
    """Float32 codes ``q_l`` of the matrix ``w (K, N)`` at ``bits``, blocked shape, with the
    straight-through gradients of the module docstring (the values are exact integers)."""
    h, fmt_h = recipe.highest, F.IntFormat(recipe.highest)
    lay = G.layout(recipe.granularity, w.shape)
    v = lay.block(w.astype(jnp.float32)) * (1.0 / scale)
    q = _ste(v, jnp.clip(jnp.round(v), fmt_h.qmin, fmt_h.qmax), fmt_h.qmin, fmt_h.qmax)
    if bits == h:
        return q
    fmt_l = F.IntFormat(bits)
    u = q * (1.0 / 2 ** (h - bits))
    return _ste(u, jnp.clip(jnp.round(u), fmt_l.qmin, fmt_l.qmax), fmt_l.qmin, fmt_l.qmax)


def double_round(w: jax.Array, scale: jax.Array, recipe: DoubleRounding, bits: int | None = None
                 ) -> jax.Array:
    """The weight matrix ``W_l (K, N)`` at ``bits`` (default: the highest), in ``w``'s dtype."""
    bits = recipe.highest if bits is None else recipe.check(bits)
    lay = G.layout(recipe.granularity, w.shape)
    q = codes(w, scale, recipe, bits)
    return lay.unblock(q * (scale * 2.0 ** (recipe.highest - bits))).astype(w.dtype)


def lower_precision(w: QArray, recipe: DoubleRounding, bits: int) -> QArray:
    """A serving QArray ``(*stack, N, K)`` of the highest precision, at ``bits``: codes
    ``clip(round(q_h / 2^(h-l)))`` and scale ``s_h * 2^(h-l)``; it dequantizes to QAT's weights
    at ``bits`` bit for bit."""
    bits = recipe.check(bits)
    h = recipe.highest
    if w.spec.format != F.IntFormat(h):
        raise ValueError(f"w must hold the recipe's {h}-bit codes, got {w.spec.format.name}")
    if bits == h:
        return w
    fmt = F.IntFormat(bits)
    u = w.codes_float32() * (1.0 / 2 ** (h - bits))
    q = jnp.clip(jnp.round(u), fmt.qmin, fmt.qmax)
    return QArray(codes=codes_to_storage(q, fmt), scale=w.scale * 2.0 ** (h - bits),
                  zero_point=None, spec=w.spec.replace(format=fmt), shape=w.shape, dtype=w.dtype)


def joint_loss(loss_at: Callable[[int], jax.Array], bits: Sequence[int],
               weights: Sequence[float] | None = None) -> jax.Array:
    """``sum_l w_l * loss_at(l)``: one forward per precision (weights default to 1).

    With equal weights the lowest precision's loss, the largest, dominates the shared weights'
    gradient: on the reference Llama the 8/6/4-bit widths end ~2 % behind separately trained
    models, and weights 1/1/2/0.2 (8/6/4/2 bits) bring them to +0.8 / +0.7 / +1.0 % (the 2-bit
    width pays: +5.7 %; ``benchmarks/mixed_precision.py``).

    A precision weighted 0 is not run.

    Raises:
      ValueError: ``weights`` without one finite entry ``>= 0`` per bit width, or all 0.
    """
    weights = (1.0,) * len(bits) if weights is None else check_loss_weights(weights, bits)
    return sum(w * loss_at(b) for w, b in zip(weights, bits, strict=True) if w)


def check_loss_weights(weights: object, bits: Sequence[int], name: str = "weights"
                       ) -> tuple[float, ...]:
    """``weights`` as floats, one finite ``>= 0`` per entry of ``bits``, not all 0.

    Raises:
      ValueError: naming ``name`` and ``bits``.
    """
    ok = isinstance(weights, Sequence) and not isinstance(weights, str) \
        and len(weights) == len(bits) and all(
            not isinstance(w, (bool, np.bool_)) and isinstance(w, (numbers.Real, np.number))
            and math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0
    if not ok:
        raise ValueError(f"{name} must be one finite weight >= 0 per bit width of "
                         f"{tuple(bits)} (not all 0), got {weights!r}")
    return tuple(float(w) for w in weights)
