"""Scale rules that reproduce another runtime's quantizer exactly: llama.cpp's block scale
(:class:`GgmlMax`) and torchao's ``choose_qparams_affine`` (:class:`TorchAOAffine`), with the
correctly rounded division they need (:func:`exact_divide`). Both need whole blocks on one
device (no ``axis_name``). Re-exported by :mod:`qjax._src.scales`, where the rule protocol is
described.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src import formats as F
from qjax._src._checks import check_bool, check_finite_positive

__all__ = ["GgmlMax", "TorchAOAffine", "exact_divide", "refuse_axis_name"]

_TINY = float(np.finfo(np.float32).tiny)


def exact_divide(a: jax.Array, c: float) -> jax.Array:
    """``a / c`` correctly rounded, as numpy, torch and C compute it.

    XLA rewrites a division by a broadcast constant into a multiplication by its reciprocal,
    which is off by one ulp for a few percent of inputs; dividing by an array of ``a``'s full
    shape hidden behind an optimization barrier keeps the true division. The array is built from
    ``a`` so that under ``vmap`` it is batched too (a broadcast divisor would be rewritten).
    """
    den = jnp.where(jnp.isnan(a), c, c).astype(jnp.result_type(a))
    return a / jax.lax.optimization_barrier(den)


def _first_absmax_element(xb, axes):
    """The signed element of largest ``|x|`` over ``axes`` (the first one on ties), keepdims."""
    keep = [i for i in range(xb.ndim) if i not in axes]
    t = jnp.transpose(xb, keep + list(axes))
    flat = t.reshape(t.shape[: len(keep)] + (-1,))
    idx = jnp.argmax(jnp.abs(flat), axis=-1, keepdims=True)
    e = jnp.take_along_axis(flat, idx, axis=-1)
    return e.reshape(tuple(1 if i in axes else d for i, d in enumerate(xb.shape)))


def refuse_axis_name(axis_name, rule: str) -> None:
    """ValueError for a rule that needs whole blocks on one device when given ``axis_name``."""
    if axis_name is not None:
        raise ValueError(f"{rule} needs whole blocks on one device: it does not take axis_name")


def _check_signed_int(fmt, rule: str):
    if not (isinstance(fmt, F.IntFormat) and fmt.signed):
        raise ValueError(f"{rule} needs a signed IntFormat, got {fmt.name}")


@dataclasses.dataclass(frozen=True)
class GgmlMax:
    """llama.cpp's block scale ``d``, in float32 with a correctly rounded division.

    ``signed=False`` (Q8_0): ``d = max|x| / qmax``. ``signed=True`` (Q4_0, Q5_0):
    ``d = x_e / qmin`` with ``x_e`` the element of largest ``|x|`` (the first on ties), so ``x_e``
    maps exactly onto ``qmin`` and ``d`` has the sign of ``-x_e``. A zero ``d`` (all-zero block)
    becomes the smallest normal float32 of the same sign, whose codes are those of llama.cpp's
    ``id = 0`` and whose fp16 rounding is llama.cpp's signed zero. Pair it
    with ``QuantSpec(scale_dtype="float16")``: llama.cpp encodes with this float32 ``d`` but stores
    (and decodes with) its fp16 rounding.

    References:
      ggml/src/ggml-quants.c (``quantize_row_q8_0_ref``, ``quantize_row_q4_0_ref``) and
      gguf-py ``gguf/quants.py`` (``Q8_0``, ``Q4_0``).
    """

    signed: bool = False

    def __post_init__(self):
        object.__setattr__(self, "signed", check_bool("signed", self.signed))

    def compute(self, xb, axes, fmt, dtype=None, axis_name=None):
        refuse_axis_name(axis_name, "GgmlMax")
        _check_signed_int(fmt, "GgmlMax")
        if self.signed:
            d = exact_divide(_first_absmax_element(xb, axes), float(fmt.qmin))
        else:
            d = exact_divide(jnp.max(jnp.abs(xb), axis=axes, keepdims=True), float(fmt.qmax))
        # copysign keeps llama.cpp's -0.0 scale of an all-zero block (0 / -8) through store_scale.
        return jnp.where(d == 0, jnp.copysign(jnp.float32(_TINY), d), d), None


@dataclasses.dataclass(frozen=True)
class TorchAOAffine:
    """torchao's ``choose_qparams_affine`` (``preserve_zero=True``, integer zero point).

    Every step is rounded to the input's dtype (bfloat16 input: bfloat16 qparams), as torchao
    computes them in the input tensor's dtype before casting the scale to float32. With
    ``lo = min(min x, 0)``, ``hi = max(max x, 0)``:

    * symmetric: ``scale = max(-lo, hi) / ((qmax - qmin) / 2)`` (``amax / 7.5`` for int4), no
      zero point (torchao's is 0 for signed grids);
    * asymmetric: ``scale = (hi - lo) / (qmax - qmin)``,
      ``zero_point = clip(qmin - round(lo / scale), qmin, qmax)``;

    then ``scale = max(scale, eps)`` (before the zero point), with ``eps`` the input dtype's
    machine epsilon when None (torchao's default) and rounded to the input dtype.

    References:
      torchao ``torchao/quantization/quant_primitives.py`` (``_choose_qparams_affine``) and
      ``torchao/quantization/utils.py`` (``get_group_qparams_symmetric``).
    """

    symmetric: bool = True
    eps: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "symmetric", check_bool("symmetric", self.symmetric))
        if self.eps is not None:
            object.__setattr__(self, "eps", check_finite_positive("eps", self.eps))

    def compute(self, xb, axes, fmt, dtype=None, axis_name=None):
        refuse_axis_name(axis_name, "TorchAOAffine")
        if not isinstance(fmt, F.IntFormat):
            raise ValueError(f"TorchAOAffine needs an IntFormat, got {fmt.name}")
        if self.symmetric:
            _check_signed_int(fmt, "symmetric TorchAOAffine")
        dt = jnp.dtype(dtype if dtype is not None else jnp.float32)

        big = float(jnp.finfo(dt).max)

        def r(v):  # a float32 result rounded to the input dtype, as torch's ops on it are, but
            # saturating where torch's would overflow to inf (and give NaN output): a range wider
            # than the dtype's, Hadamard-rotated values beyond it, a huge eps.
            return jnp.clip(v, -big, big).astype(dt).astype(jnp.float32)

        eps = r(jnp.float32(self.eps if self.eps is not None else float(jnp.finfo(dt).eps)))
        lo = jnp.minimum(jnp.min(xb, axis=axes, keepdims=True), 0.0)
        hi = jnp.maximum(jnp.max(xb, axis=axes, keepdims=True), 0.0)
        if self.symmetric:
            scale = r(exact_divide(jnp.maximum(-lo, hi), (fmt.qmax - fmt.qmin) / 2))
            return jnp.maximum(scale, eps), None
        n = float(fmt.qmax - fmt.qmin)
        # hi - lo overflows the input dtype when the range is wider than its largest value;
        # halving both the span and the divisor is exact, so there the half-span quotient is the
        # same scale (torch's would be inf), and finite whenever that scale is representable.
        wide = jnp.isinf((hi - lo).astype(dt))
        scale = jnp.where(wide, r(exact_divide(r(hi * 0.5 - lo * 0.5), n / 2)),
                          r(exact_divide(r(hi - lo), n)))
        scale = jnp.maximum(scale, eps)
        zero_point = jnp.clip(r(fmt.qmin - jnp.round(r(lo / scale))), fmt.qmin, fmt.qmax)
        return scale, zero_point
