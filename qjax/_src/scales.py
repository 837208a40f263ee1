"""Scale rules: how a block of values picks its scale (and zero point).

A rule is a frozen dataclass; ``rule.compute(xb, axes, fmt, dtype=None, axis_name=None)`` takes
the float32 blocked view ``xb`` (see :mod:`qjax._src.granularity`), the axes it reduces over, the
format, the input's dtype (only rules that reproduce a runtime computing in that dtype use it)
and, inside ``shard_map``, the mesh axes that split the reduced axes (statistics are then
combined across shards with ``pmax``/``pmin``/``psum``; rules that need whole blocks refuse it),
and returns
``(scale, zero_point)`` shaped like ``xb`` with the reduced axes kept as 1 (``zero_point`` is
``None`` for symmetric rules). The scale is the grid *step*: an element is stored as
``code = encode(x / scale)`` and read back as ``decode(code) * scale``.

Rules:

* :class:`AbsMax` ``(symmetric=True)``: ``scale = max|x| / max_level``; asymmetric:
  ``scale = (max - min) / (qmax - qmin)``, integer ``zero_point = round(qmin - min/scale)``.
* :class:`RmsGaussian`: ``clip = a * sqrt(mean(x^2)) + 1e-8`` with ``a`` the clipping value that
  minimises the MSE of a standard Gaussian on the format's grid; ``scale = clip / max_level``.
* :class:`MseSearch`: the clipping ratio in ``linspace(min_ratio, 1, num_candidates)`` of the
  absmax that minimises the block's squared error.
* :class:`Percentile`: ``scale = percentile(|x|, q) / max_level``.
* :class:`MeanAbs`: ``scale = multiple * mean|x| / 2^(b-1)`` (OFQ's StatsQ on the midrise grid).
* :class:`GgmlMax`: llama.cpp's block scale, ``max|x| / qmax`` or (``signed``) ``x_e / qmin``
  with ``x_e`` the element of largest magnitude, divided exactly as C does.
* :class:`TorchAOAffine`: torchao's ``choose_qparams_affine`` (symmetric or asymmetric with an
  integer zero point), computed in the input's dtype with its ``eps`` floor.

:func:`exact_divide` divides by a constant with a correctly rounded quotient (XLA otherwise turns
``a / c`` into ``a * (1/c)``, which can differ in the last bit from numpy, torch and C), and
:func:`store_scale` rounds a scale to the dtype a runtime stores it in (``QuantSpec.scale_dtype``).

Scales are clamped to ``[2^-126, 2^126]`` (:func:`clamp_scale`): the floor, the smallest normal
float32, lets an all-zero block quantize to zero with a finite scale (and denormal flushing cannot
turn a scale into 0); the ceiling, its reciprocal, keeps a huge block's scale finite and its
reciprocal ``1 / scale`` (by which codes are computed) normal, so finite input never gives inf or
NaN. Both bounds are far from any ordinary scale, which they leave unchanged.

The Gaussian clipping constants behind :class:`RmsGaussian` live in :mod:`qjax._src.gaussian_grid`
(re-exported here).

References:
  Panferov et al., 2025. QuEST: Stable Training of LLMs with 1-Bit Weights and Activations
  (MSE-optimal Gaussian clipping constants).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src import formats as F
from qjax._src import typed_sharding
from qjax._src._checks import check_bool, check_finite_positive, check_int, check_number
from qjax._src.gaussian_grid import (
    QUEST_GAUSSIAN_CLIP,
    gaussian_clip,
    gaussian_mse,
    optimal_gaussian_clip,
)
from qjax._src.runtime_scales import GgmlMax, TorchAOAffine, exact_divide, refuse_axis_name

__all__ = [
    "AbsMax",
    "RmsGaussian",
    "MseSearch",
    "Percentile",
    "MeanAbs",
    "ScaleRule",
    "QUEST_GAUSSIAN_CLIP",
    "gaussian_clip",
    "gaussian_mse",
    "optimal_gaussian_clip",
    "lsq_init",
    "GgmlMax",
    "TorchAOAffine",
    "exact_divide",
    "store_scale",
    "SCALE_DTYPES",
]

_TINY = float(np.finfo(np.float32).tiny)
_HUGE = 1.0 / _TINY  # 2^126: its reciprocal is still a normal float32
RMS_EPS = 1e-8
_RMS_CAP = 1e16

def _reduce_max(x, axes, axis_name=None):
    m = jnp.max(x, axis=axes, keepdims=True)
    return m if axis_name is None else jax.lax.pmax(m, axis_name)


def _reduce_min(x, axes, axis_name=None):
    m = jnp.min(x, axis=axes, keepdims=True)
    return m if axis_name is None else jax.lax.pmin(m, axis_name)


def _reduce_sum(x, axes, axis_name=None):
    s = jnp.sum(x, axis=axes, keepdims=True)
    return s if axis_name is None else jax.lax.psum(s, axis_name)


def ordered_sum(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Sum over ``axes`` (kept as size 1) by pairwise halving with explicit adds.

    XLA may order a fused ``reduce`` differently from an unfused one, so ``jnp.sum`` can differ
    in the last ulp between ``jit`` and eager mode; XLA never reorders elementwise adds, so this
    sum is the same in both. That makes statistics-based scales, and with them the codes a
    converted model stores, identical to those the jitted QAT forward computes.
    """
    for ax in sorted({a % x.ndim for a in axes}):
        n = x.shape[ax]
        while n > 1:
            if n % 2:
                pad = [(0, 0)] * x.ndim
                pad[ax] = (0, 1)
                x, n = jnp.pad(x, pad), n + 1
            h = n // 2
            x = jax.lax.slice_in_dim(x, 0, h, axis=ax) + jax.lax.slice_in_dim(x, h, n, axis=ax)
            n = h
    return x


def _unfused(p: jax.Array) -> jax.Array:
    """A non-negative product ``p`` that XLA will not contract with a following add into an FMA.

    Fused jitted code may compute ``a * b + c`` as one fused multiply-add, eager mode never does;
    ``max(p, 0)`` (the identity on ``p >= 0`` and on NaN) sits between the two and prevents it.
    """
    return jnp.maximum(p, 0.0)


def clamp_scale(s):
    """Clamps a scale to ``[2^-126, 2^126]``, so that ``s`` and ``1 / s`` are normal float32.

    The floor keeps denormal flushing from zeroing a scale; the ceiling keeps a scale that overflows
    (``max|x| / max_level`` with ``max_level < 1``, or an asymmetric range wider than float32's)
    finite and its reciprocal from flushing to 0. The identity on every scale in between.
    """
    return jnp.clip(s, _TINY, _HUGE)


@dataclasses.dataclass(frozen=True)
class AbsMax:
    """``scale = max|x| / max_level`` (symmetric) or min/max with an integer zero point."""

    symmetric: bool = True

    def __post_init__(self):
        object.__setattr__(self, "symmetric", check_bool("symmetric", self.symmetric))

    def compute(self, xb, axes, fmt, dtype=None, axis_name=None):
        if self.symmetric:
            F.check_positive_level(fmt, "symmetric absmax")
            amax = _reduce_max(jnp.abs(xb), axes, axis_name)
            return clamp_scale(amax * (1.0 / fmt.max_level)), None
        if not isinstance(fmt, F.IntFormat):
            raise ValueError(f"asymmetric absmax needs an IntFormat, got {fmt.name}")
        # The range always contains 0 so that 0 is exactly representable (zero point is a code).
        xmin = jnp.minimum(_reduce_min(xb, axes, axis_name), 0.0)
        xmax = jnp.maximum(_reduce_max(xb, axes, axis_name), 0.0)
        inv_n = 1.0 / (fmt.qmax - fmt.qmin)
        # Scaled before subtracting so that a range wider than float32's cannot overflow, except
        # for two levels (inv_n = 1), where clamp_scale caps the overflowed difference.
        scale = clamp_scale(xmax * inv_n - xmin * inv_n)
        zero_point = jnp.clip(jnp.round(fmt.qmin - xmin * (1.0 / scale)), fmt.qmin, fmt.qmax)
        return scale, zero_point


@dataclasses.dataclass(frozen=True)
class RmsGaussian:
    """``scale = (a * sqrt(mean(x^2)) + 1e-8) / max_level``, ``a`` from :func:`gaussian_clip`.

    The RMS is not centred, as QuEST specifies. For the statistic only, ``|x|`` is capped at
    ``1e16`` so that the sum of squares of any row shorter than ~3e6 cannot overflow float32.

    Attributes:
      clip: ``a`` in RMS units instead of the MSE-optimal Gaussian constant (None, the default:
        QuEST). For ablations and for checking that the Gaussian ``a`` suits real data.
    """

    clip: float | None = None

    def __post_init__(self):
        if self.clip is not None:
            object.__setattr__(self, "clip", check_finite_positive("RmsGaussian clip", self.clip))

    def compute(self, xb, axes, fmt, dtype=None, axis_name=None):
        F.check_positive_level(fmt, "rms_gaussian")
        a = gaussian_clip(fmt) if self.clip is None else self.clip
        capped = jnp.clip(xb, -_RMS_CAP, _RMS_CAP)
        sq = _unfused(jnp.square(capped))
        n = math.prod(xb.shape[a] for a in axes)
        if axis_name is None and all(typed_sharding.axis_shards(xb, a) == 1 for a in axes):
            # Sum and products written so that jit and eager give the same float32 bits (see
            # ordered_sum and _unfused); a converted model's stored scales rely on it.
            total = ordered_sum(sq, axes)
        else:  # reduced axes split over devices: one global reduction, no cross-shard halving
            total = _reduce_sum(sq, axes, axis_name)
            n = n * (1 if axis_name is None else jax.lax.psum(1, axis_name))
        rms = jnp.sqrt(total * (1.0 / n))
        # Clamped: a large clip times a large RMS can exceed float32.
        return clamp_scale((_unfused(a * rms) + RMS_EPS) * (1.0 / fmt.max_level)), None


@dataclasses.dataclass(frozen=True)
class MseSearch:
    """Symmetric absmax shrunk by the ratio in ``linspace(min_ratio, 1, n)`` with least MSE."""

    num_candidates: int = 64
    min_ratio: float = 0.2

    def __post_init__(self):
        object.__setattr__(self, "num_candidates",
                           check_int("num_candidates", self.num_candidates, lo=1))
        ratio = check_number("min_ratio", self.min_ratio)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"min_ratio must be in (0, 1], got {self.min_ratio!r}")
        object.__setattr__(self, "min_ratio", ratio)

    def compute(self, xb, axes, fmt, dtype=None, axis_name=None):
        base, _ = AbsMax().compute(xb, axes, fmt, axis_name=axis_name)
        ratios = jnp.linspace(self.min_ratio, 1.0, self.num_candidates, dtype=jnp.float32)

        def body(carry, r):
            best_err, best_scale = carry
            s = clamp_scale(base * r)
            err = _reduce_sum(jnp.square(fmt.decode(fmt.encode(xb * (1.0 / s))) * s - xb), axes,
                              axis_name)
            better = err < best_err
            return (jnp.where(better, err, best_err), jnp.where(better, s, best_scale)), None

        init = (jnp.full(base.shape, jnp.inf, jnp.float32), base)
        (_, scale), _ = jax.lax.scan(body, init, ratios)
        return scale, None


@dataclasses.dataclass(frozen=True)
class Percentile:
    """``scale = percentile(|x|, q) / max_level`` with ``q`` in (0, 100]."""

    q: float = 99.9

    def __post_init__(self):
        q = check_number("percentile q", self.q)
        if not 0.0 < q <= 100.0:
            raise ValueError(f"percentile q must be in (0, 100], got {self.q!r}")
        object.__setattr__(self, "q", q)

    def compute(self, xb, axes, fmt, dtype=None, axis_name=None):
        refuse_axis_name(axis_name, "the percentile rule")
        F.check_positive_level(fmt, "the percentile rule")
        p = jnp.quantile(jnp.abs(xb), self.q / 100.0, axis=axes, keepdims=True)
        return clamp_scale(p * (1.0 / fmt.max_level)), None


@dataclasses.dataclass(frozen=True)
class MeanAbs:
    """``scale = multiple * mean|x| / 2^(b-1)``: the ``2^b`` codes of a signed ``b``-bit grid
    span ``+-multiple * mean|x|``.

    On the midrise grid with ``multiple=2`` and ``rounding="half_up"`` this is OFQ's StatsQ
    (levels ``+-(k - 1/2) s / n``, ``s = 2 mean|W|``, ``n = 2^(b-1)``). The mean sums ``|x| /
    count`` (no overflow) in a fixed order (jit == eager, see :func:`ordered_sum`). Signed
    integer and midrise grids only.

    References:
      Liu, Liu, Cheng (2023). Oscillation-free Quantization for Low-bit Vision Transformers.
      ICML. arXiv:2302.02210.
    """

    multiple: float = 2.0

    def __post_init__(self):
        object.__setattr__(self, "multiple", check_finite_positive("MeanAbs multiple",
                                                                   self.multiple))

    def step(self, xb, axes, fmt, axis_name=None):
        """The unclamped step (0 for an all-zero block), float32 like ``xb``."""
        if not (isinstance(fmt, F.Midrise) or (isinstance(fmt, F.IntFormat) and fmt.signed)):
            raise ValueError(f"mean_abs needs a midrise or signed integer grid, not {fmt.name}")
        count = max(math.prod(xb.shape[ax] for ax in axes), 1)  # an empty block sums nothing
        if axis_name is not None:
            count = count * jax.lax.psum(1, axis_name)
        a = jnp.abs(xb) * (1.0 / count)
        if axis_name is None and all(typed_sharding.axis_shards(xb, ax) == 1 for ax in axes):
            mean = ordered_sum(a, axes)
        else:  # reduced axes split over devices: one global reduction
            mean = _reduce_sum(a, axes, axis_name)
        return mean * (self.multiple / 2 ** (fmt.bits - 1))

    def compute(self, xb, axes, fmt, dtype=None, axis_name=None):
        return clamp_scale(self.step(xb, axes, fmt, axis_name)), None


SCALE_DTYPES = ("float16", "bfloat16")


def store_scale(s: jax.Array, scale_dtype: str | None) -> jax.Array:
    """``s`` rounded to ``scale_dtype`` (nearest even) and back to float32; None keeps ``s``.

    Saturates at the dtype's largest finite value, so finite input never gives an inf scale (where
    llama.cpp's own fp16 conversion would overflow to inf, for blocks beyond ``65504 * qmax``).
    """
    if scale_dtype is None:
        return s
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be None or one of {SCALE_DTYPES}, got {scale_dtype!r}")
    dt = jnp.dtype(scale_dtype)
    big = float(jnp.finfo(dt).max)
    return jnp.clip(s, -big, big).astype(dt).astype(jnp.float32)


ScaleRule = AbsMax | RmsGaussian | MseSearch | Percentile | MeanAbs | GgmlMax | TorchAOAffine
SCALE_RULE_TYPES = (AbsMax, RmsGaussian, MseSearch, Percentile, MeanAbs, GgmlMax, TorchAOAffine)

_RULE_NAMES = {
    "absmax": AbsMax,
    "absmax_asymmetric": lambda: AbsMax(symmetric=False),
    "rms_gaussian": RmsGaussian,
    "mse": MseSearch,
    "percentile": Percentile,
    "mean_abs": MeanAbs,
}
# Positional arguments a rule name may take after colons ("mse:8:0.6"), in field order.
_RULE_ARGS = {
    "rms_gaussian": (("clip", float),),
    "mse": (("num_candidates", int), ("min_ratio", float)),
    "percentile": (("q", float),),
    "mean_abs": (("multiple", float),),
}


def as_scale_rule(rule: ScaleRule | str) -> ScaleRule:
    """Returns ``rule`` or builds it from a name, optionally with positional arguments.

    Names: ``absmax``, ``absmax_asymmetric``, ``rms_gaussian``, ``mse``, ``percentile``,
    ``mean_abs``.
    Arguments follow the name after colons, in the rule's field order, so that a string config
    can set them: ``"mse:8:0.6"`` is ``MseSearch(8, 0.6)``, ``"rms_gaussian:3"`` is
    ``RmsGaussian(clip=3.0)``, ``"percentile:99.5"`` is ``Percentile(99.5)``.
    """
    if isinstance(rule, SCALE_RULE_TYPES):
        return rule
    if not isinstance(rule, str):
        raise TypeError(f"a scale rule must be a rule object or a name, got {type(rule).__name__}")
    name, *args = rule.split(":")
    if name not in _RULE_NAMES:
        raise ValueError(
            f"unknown scale rule {rule!r}; allowed: {sorted(_RULE_NAMES)} (optionally with "
            "':'-separated arguments, e.g. 'mse:8:0.6') or a rule object"
        )
    types = _RULE_ARGS.get(name, ())
    if len(args) > len(types):
        allowed = ", ".join(n for n, _ in types) or "none"
        raise ValueError(f"scale rule {name!r} takes at most {len(types)} arguments "
                         f"({allowed}), got {rule!r}")
    try:
        values = [t(a) for (_, t), a in zip(types, args, strict=False)]
    except ValueError:
        raise ValueError(f"scale rule arguments of {name!r} must be numbers "
                         f"({', '.join(f'{n}: {t.__name__}' for n, t in types)}), got {rule!r}"
                         ) from None
    return _RULE_NAMES[name](*values)


def lsq_init(v: jax.Array, qmax: float, axes: tuple[int, ...] | None = None) -> jax.Array:
    """LSQ's initial step ``s0 = 2 * mean|v| / sqrt(QP)`` (float32, reduced over ``axes``).

    References:
      Esser et al., 2020. Learned Step Size Quantization. ICLR.
    """
    qmax = check_finite_positive("qmax", qmax)
    m = jnp.mean(jnp.abs(v.astype(jnp.float32)), axis=axes, keepdims=axes is not None)
    return clamp_scale(2.0 * m / math.sqrt(qmax))
