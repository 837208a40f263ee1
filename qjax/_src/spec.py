"""QuantSpec: the complete, static description of a quantizer.

A :class:`QuantSpec` is a frozen, hashable dataclass, so it can be a static argument of
``jax.jit`` or a field of a Flax module. Fields may be given as objects or as short names::

    QuantSpec("int4", PerGroup(-1, 32), "absmax", "ste")
    QuantSpec(Midrise(4), PerRow(-1), RmsGaussian(), Trust(), hadamard_block=128)

Estimators (the backward rule of the fake-quant op):

* :class:`STE`: identity straight-through, ``dx = g``.
* :class:`ClippedSTE`: ``dx = g * 1[lo <= x/scale <= hi]``, bounds inclusive, where
  ``[lo, hi]`` is the unclipped range in units of the scale (``[qmin - z, qmax - z]`` for integers,
  ``+-max_level`` for midrise, ternary and float grids).
* :class:`Trust`: QuEST's trust mask ``dx = g * 1[|q(x) - x| <= multiplier * step / 2]``, or
  with ``clip_ratio`` set, the clip mask ``dx = g * 1[|x| <= clip_ratio * scale * max_level]``.
* :class:`LSQ`: learned step size (the scale is a parameter passed to ``fake_quant``).
* :class:`PACT`: learned clipping level ``alpha`` (passed to ``fake_quant`` as ``scale=``; the
  step is ``alpha / max_level``): ``dx = g * 1[lo <= x/s, x < alpha]``, ``dalpha = g`` above.

``rounding`` is ``"nearest"`` (half to even, the default) or ``"stochastic"`` (``floor(v + u)``,
``u ~ U[0, 1)``; needs a PRNG key); integer formats also take ``"half_away"`` (half away from
zero) and ``"half_up"`` (llama.cpp's), see :meth:`qjax.IntFormat.encode`; the midrise grid also
takes ``"half_up"`` (``floor(x/s)``, OFQ's StatsQ), see :meth:`qjax.Midrise.encode`. ``scale_dtype``
(``"float16"`` or ``"bfloat16"``) stores the scale in that dtype: codes use the float32 scale of
the rule, values (and ``QArray.scale``) its rounding, as llama.cpp's fp16 block scales do.

``scale_rule`` computes the scale from the data (a learned scale is an array passed to
``fake_quant(..., scale=)``: ``scale`` always names an array). ``hadamard_block`` is the
Walsh-Hadamard block size applied along ``hadamard_axis`` before
quantization, or None; ``hadamard_mode="full"`` rotates back after quantizing, ``"half"`` leaves
the result rotated (for a matmul whose other operand is rotated too); ``hadamard_method`` picks
how the rotation is computed (the same transform to float rounding): ``"kronecker"`` (the default
everywhere: a 32-wide dense matmul and signed sums, fastest on CPU), the dense block matmul
(``"matmul"``, the default before; checkpoints written with it load into ``"kronecker"`` models)
or the ``O(n log n)`` butterfly (see :func:`qjax.hadamard_transform`).
"""

from __future__ import annotations

import dataclasses

from qjax._src import formats as F
from qjax._src import granularity as G
from qjax._src import scales as S
from qjax._src._checks import check_bool, check_finite_positive, check_int
from qjax._src.hadamard import HADAMARD_METHODS, HadamardMethod, check_block_size

__all__ = ["QuantSpec", "STE", "ClippedSTE", "Trust", "LSQ", "PACT", "Estimator"]


@dataclasses.dataclass(frozen=True)
class STE:
    """Identity straight-through estimator (Bengio et al., 2013)."""


@dataclasses.dataclass(frozen=True)
class ClippedSTE:
    """Straight-through inside the representable range (inclusive bounds), zero outside.

    ``on_codes=True`` tests the rounded code before clipping instead of ``x / scale``:
    ``dx = g * 1[lo <= round(x/s) <= hi]`` (torchao's fake-quantize mask), which also passes the
    half step beyond each bound that rounds back into the range.
    """

    on_codes: bool = False

    def __post_init__(self):
        object.__setattr__(self, "on_codes", check_bool("on_codes", self.on_codes))


@dataclasses.dataclass(frozen=True)
class Trust:
    """QuEST trust estimator; ``multiplier`` scales the half-step threshold.

    Attributes:
      multiplier: trust threshold in half steps (1.0 trusts every in-range value and outliers up to
        half a step beyond the clip; < 1 also masks in-range values near decision boundaries).
      clip_ratio: if set, use the clip mask ``1[|x| <= clip_ratio * c]`` (``c`` the clipping
        value) instead, as in QuEST's W1A1 recipe (``clip_ratio=1.3``).

    References:
      Panferov et al., 2025. QuEST: Stable Training of LLMs with 1-Bit Weights and Activations.
    """

    multiplier: float = 1.0
    clip_ratio: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "multiplier", check_finite_positive("trust multiplier",
                                                                  self.multiplier))
        if self.clip_ratio is not None:
            object.__setattr__(self, "clip_ratio",
                               check_finite_positive("trust clip_ratio", self.clip_ratio))


@dataclasses.dataclass(frozen=True)
class LSQ:
    """Learned step size; ``grad_scale_n`` is N in the step-gradient scale ``1/sqrt(N * QP)``.

    ``grad_scale_n=None`` uses the number of elements that share one step; else a positive int.

    References:
      Esser et al., 2020. Learned Step Size Quantization. ICLR.
    """

    grad_scale_n: int | None = None

    def __post_init__(self):
        if self.grad_scale_n is not None:  # a count of elements: 1/sqrt(N * QP) needs N >= 1
            object.__setattr__(self, "grad_scale_n",
                               check_int("grad_scale_n", self.grad_scale_n, lo=1))


@dataclasses.dataclass(frozen=True)
class PACT:
    """Learned clipping level; the clip is ``scale * max_level``.

    References:
      Choi et al., 2018. PACT: Parameterized Clipping Activation for Quantized Neural Networks.
    """


Estimator = STE | ClippedSTE | Trust | LSQ | PACT
ESTIMATOR_TYPES = (STE, ClippedSTE, Trust, LSQ, PACT)
LEARNED_SCALE_ESTIMATORS = (LSQ, PACT)
_ESTIMATOR_NAMES = {
    "ste": STE, "clipped_ste": ClippedSTE, "trust": Trust, "lsq": LSQ, "pact": PACT,
}
ROUNDINGS = ("nearest", "stochastic", "half_away", "half_up")
HADAMARD_MODES = ("full", "half")


def check_rounding(rounding: object, fmt: F.Format) -> str:
    """Validates ``rounding`` (one of :data:`ROUNDINGS`) for the format ``fmt``."""
    if not isinstance(rounding, str) or rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding == "stochastic" and not fmt.uniform:
        raise ValueError(
            f"stochastic rounding is supported for uniform formats only, not {fmt.name}"
        )
    if rounding == "half_up" and isinstance(fmt, F.Midrise):
        return rounding
    if rounding not in ("nearest", "stochastic") and not isinstance(fmt, F.IntFormat):
        raise ValueError(f"rounding {rounding!r} needs an IntFormat (or, for 'half_up', a "
                         f"Midrise grid), not {fmt.name}")
    return rounding


def as_estimator(est: Estimator | str) -> Estimator:
    if isinstance(est, ESTIMATOR_TYPES):
        return est
    if isinstance(est, str) and est in _ESTIMATOR_NAMES:
        return _ESTIMATOR_NAMES[est]()
    raise ValueError(
        f"unknown estimator {est!r}; allowed: {sorted(_ESTIMATOR_NAMES)} or an estimator object"
    )


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Format, granularity, scale rule, estimator, rounding and optional Hadamard rotation.

    Validated on construction. The signed ``IntFormat(1)`` (codes -1 and 0, no positive level) is
    refused: use ``"midrise1"`` (sign), ``"ternary"`` or ``"uint1"``.
    """

    format: F.Format | str
    granularity: G.Granularity | str = dataclasses.field(default_factory=G.PerTensor)
    scale_rule: S.ScaleRule | str = dataclasses.field(default_factory=S.AbsMax)
    estimator: Estimator | str = dataclasses.field(default_factory=STE)
    rounding: str = "nearest"
    hadamard_block: int | None = None
    hadamard_axis: int = -1
    hadamard_mode: str = "full"
    hadamard_method: HadamardMethod = "kronecker"
    scale_dtype: str | None = None

    def __post_init__(self):
        fmt = F.as_format(self.format)
        est = as_estimator(self.estimator)
        object.__setattr__(self, "format", fmt)
        object.__setattr__(self, "granularity", G.as_granularity(self.granularity))
        object.__setattr__(self, "scale_rule", S.as_scale_rule(self.scale_rule))
        object.__setattr__(self, "estimator", est)
        # A signed 1-bit integer grid (codes -1, 0) has no positive level: every rule and
        # estimator but asymmetric absmax would divide by zero, and that one is uint1's grid.
        F.check_positive_level(fmt, "QuantSpec")
        check_rounding(self.rounding, fmt)
        if self.scale_dtype is not None and self.scale_dtype not in S.SCALE_DTYPES:
            raise ValueError(
                f"scale_dtype must be None or one of {S.SCALE_DTYPES}, got {self.scale_dtype!r}"
            )
        if isinstance(est, LEARNED_SCALE_ESTIMATORS) and (
            self.rounding not in ("nearest", "stochastic") or self.scale_dtype is not None
        ):
            raise ValueError(
                f"{type(est).__name__} supports nearest rounding and float32 scales only"
            )
        if self.hadamard_block is not None:
            object.__setattr__(self, "hadamard_block", check_block_size(self.hadamard_block,
                                                                "hadamard_block"))
        object.__setattr__(self, "hadamard_axis", check_int("hadamard_axis", self.hadamard_axis))
        if self.hadamard_method not in HADAMARD_METHODS:
            raise ValueError(
                f"hadamard_method must be one of {HADAMARD_METHODS}, got {self.hadamard_method!r}"
            )
        if self.hadamard_mode not in HADAMARD_MODES:
            raise ValueError(
                f"hadamard_mode must be one of {HADAMARD_MODES}, got {self.hadamard_mode!r}"
            )
        # LSQ's step gradient needs only levels and a clip range: ASQ learns the POST step so.
        lsq_on_post = isinstance(est, LSQ) and isinstance(fmt, F.POST)
        if isinstance(est, (Trust, LSQ, PACT)) and not fmt.uniform and not lsq_on_post:
            raise ValueError(
                f"{type(est).__name__} needs a uniform grid (LSQ also takes POST), not the "
                f"non-uniform format {fmt.name}"
            )
        rule = self.scale_rule
        if isinstance(est, LSQ) and isinstance(rule, S.AbsMax) and not rule.symmetric:
            raise ValueError("LSQ learns a symmetric step; use a symmetric scale rule for its init")

    def replace(self, **changes) -> QuantSpec:
        return dataclasses.replace(self, **changes)


def check_spec(spec: object, name: str = "spec", *, optional: bool = False) -> QuantSpec | None:
    """``spec`` itself; TypeError unless it is a QuantSpec (or None, when ``optional``)."""
    if spec is None and optional:
        return None
    if not isinstance(spec, QuantSpec):
        allowed = "a qjax.QuantSpec or None" if optional else "a qjax.QuantSpec"
        raise TypeError(f"{name} must be {allowed}, got {type(spec).__name__}")
    return spec
