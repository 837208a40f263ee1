"""Implementation of :mod:`qjax.presets` (documented there)."""

from __future__ import annotations

from qjax._src import formats as F
from qjax._src import granularity as G
from qjax._src import scales as S
from qjax._src import spec as SP
from qjax._src.formats import check_bits

__all__ = [
    "GGUF_BLOCK",
    "gguf_q8_0",
    "gguf_q4_0",
    "torchao_int8_per_token_activation",
    "torchao_intx_weight",
    "torchao_int4_weight",
]

GGUF_BLOCK = 32
_FLOAT32_EPS = 2.0**-23


def _check_axis(axis: object) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {axis!r} ({type(axis).__name__})")
    return axis


def _gguf(bits: int, signed_max: bool, rounding: str, axis: int) -> SP.QuantSpec:
    return SP.QuantSpec(
        F.IntFormat(bits),
        G.PerGroup(_check_axis(axis), GGUF_BLOCK),
        S.GgmlMax(signed=signed_max),
        SP.STE(),
        rounding=rounding,
        scale_dtype="float16",
    )


def gguf_q8_0(axis: int = -1) -> SP.QuantSpec:
    """llama.cpp's Q8_0: int8 codes per block of 32 along ``axis`` with a float16 scale.

    ``d = max|x| / 127`` (float32), ``q = roundf(x * (1/d))`` rounding half away from zero;
    value ``q * fp16(d)``. The input's ``axis`` must be a multiple of 32.

    References:
      llama.cpp ``quantize_row_q8_0_ref``; gguf-py ``gguf.quants.Q8_0``.
    """
    return _gguf(8, False, "half_away", axis)


def gguf_q4_0(axis: int = -1) -> SP.QuantSpec:
    """llama.cpp's Q4_0: 4-bit codes per block of 32 along ``axis`` with a float16 scale.

    ``d = x_e / -8`` with ``x_e`` the element of largest ``|x|`` (first on ties), so ``x_e`` gets
    code -8; ``q = min(15, (int)(x * (1/d) + 8.5)) - 8`` in ``[-8, 7]``; value ``q * fp16(d)``.
    ``QArray`` packs ``q + 8``, GGUF's nibble, two per byte (low nibble first; GGUF orders a
    block's nibbles differently, which export handles). The input's ``axis`` must be a multiple
    of 32.

    References:
      llama.cpp ``quantize_row_q4_0_ref``; gguf-py ``gguf.quants.Q4_0``.
    """
    return _gguf(4, True, "half_up", axis)


def torchao_int8_per_token_activation() -> SP.QuantSpec:
    """torchao's dynamic int8 per-token asymmetric activation fake quantizer.

    One scale and integer zero point per row of the last axis (token):
    ``scale = max((hi - lo) / 255, eps)``, ``zp = clip(-128 - round(lo / scale), -128, 127)``,
    computed in the input's dtype (``eps`` its machine epsilon, ``2^-7`` for bfloat16);
    ``q = clip(round(x * (1/scale)) + zp, -128, 127)``, value ``(q - zp) * scale``.

    References:
      torchao ``IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)``;
      ``choose_qparams_affine`` (ASYMMETRIC), ``fake_quantize_affine_cachemask``.
    """
    return SP.QuantSpec(
        F.IntFormat(8),
        G.PerRow(-1),
        S.TorchAOAffine(symmetric=False),
        SP.ClippedSTE(on_codes=True),
    )


def torchao_intx_weight(
    bits: int, group_size: int, axis: int = -1, eps: float | None = _FLOAT32_EPS
) -> SP.QuantSpec:
    """torchao's symmetric per-group weight fake quantizer for signed ``bits`` in 2..8.

    Groups of ``group_size`` along ``axis``:
    ``scale = max(amax / ((qmax - qmin) / 2), eps)`` in the input's dtype (``amax / 7.5`` for
    int4, ``amax / 127.5`` for int8), ``q = clip(round(x * (1/scale)), qmin, qmax)``,
    value ``q * scale``. ``eps`` is ``get_group_qparams_symmetric``'s float32 epsilon ``2^-23``;
    None uses the input dtype's (``choose_qparams_affine``'s default for ``eps=None``).

    References:
      torchao ``IntxFakeQuantizeConfig(torch.intN, group_size=g)``,
      ``get_group_qparams_symmetric``, ``choose_qparams_affine`` (SYMMETRIC).
    """
    bits = check_bits(bits, 2, 8)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    return SP.QuantSpec(
        F.IntFormat(bits),
        G.PerGroup(_check_axis(axis), group_size),
        S.TorchAOAffine(symmetric=True, eps=eps),
        SP.ClippedSTE(on_codes=True),
    )


def torchao_int4_weight(
    group_size: int, axis: int = -1, eps: float | None = _FLOAT32_EPS
) -> SP.QuantSpec:
    """:func:`torchao_intx_weight` with 4 bits (``scale = amax / 7.5``), torchao's int4 QAT weight.

    References:
      torchao ``Int8DynActInt4WeightQATQuantizer`` / ``IntxFakeQuantizeConfig(torch.int4, ...)``.
    """
    return torchao_intx_weight(4, group_size, axis, eps)
