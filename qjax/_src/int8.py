"""The one int8 path: operand codes, the eligibility rule and the int8 x int8 -> int32 product.

Every integer matmul in qjax goes through this module: QAT's integer forward
(:func:`qjax._src.qdot.qat_dense`), the kernels' integer kind (:func:`qjax.kernels.classify`, the
``"xla"`` backend :mod:`qjax._src.kernels.reference`, the Pallas backends' activation codes) and
serving. It owns

1. the codes of an operand (:func:`operand_codes`, :func:`int8_operand`,
   :func:`quantize_operand`): the ops of :func:`qjax.quantize` per row or per tensor, then the
   int8 code. Integer grids enter as their code ``q``; QuEST's midrise grid as the odd integer
   ``u = 2q + 1`` with half the scale, so ``s * (q + 1/2) = (s/2) * u`` exactly and no correction
   term is needed; ternary codes are ``{-1, 0, 1}``;
2. the eligibility rule (:func:`integer_forward_reason`): which (weight, activation) spec pairs
   have an exact int8 product. Specs are read in the training layout, ``x (..., K)`` and a kernel
   ``(K, N)``; a serving weight ``(N, K)`` (the :class:`~qjax.QArray` layout of
   :mod:`qjax.convert` and :mod:`qjax.kernels`) is first mapped onto it with
   :func:`training_weight_spec`;
3. the product (:func:`matmul`): ``y = (q_x . q_w) * s_x * s_w``, an exact int32 sum with the
   float32 scales applied in the epilogue, and its overflow guard (:func:`check_int32_sum`): the
   sum is exact while ``K * max|code_x| * max|code_w| <= 2^31 - 1`` (W8A8: ``K <= 131,071``; 4-bit
   odd codes: ``K <= 9,544,371``).

The rule: both operands quantized; each on a signed integer (<= 8 bits), ternary or midrise
(<= 7 bits) grid; activations per token (``PerRow(-1)``) or per tensor, the kernel per output
channel (``PerRow(0)``) or per tensor; a symmetric scale rule the op recomputes (no zero point,
no GGML / torchao preset, float32 scales, no learned LSQ/PACT scale); nearest rounding; no
Hadamard rotation or the ``"half"`` form (the caller rotates both operands).

References:
  Jacob et al., 2018. Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference (int8 products, int32 accumulation, scales after);
  Panferov et al., 2025. QuEST: Stable Training of LLMs with 1-Bit Weights and Activations
  (odd-integer codes ``u = 2q + 1``).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from qjax._src import estimators as E
from qjax._src import formats as F
from qjax._src import granularity as G
from qjax._src import scales as S
from qjax._src import spec as SP
from qjax._src import typed_sharding

__all__ = [
    "INT32_MAX", "ROLES", "code_max", "check_int32_sum", "recompute_reason", "operand_reason",
    "integer_forward_reason", "training_weight_spec", "operand_codes", "int8_operand",
    "quantize_operand", "matmul",
]

Role = Literal["weight", "activation"]
ROLES = ("weight", "activation")
INT32_MAX = 2**31 - 1

#: Granularities of the rule, per role, in the training layout (``x (..., K)``, kernel ``(K, N)``).
_GRANULARITIES = {"activation": (G.PerRow(-1), G.PerTensor()),
                  "weight": (G.PerRow(0), G.PerTensor())}
_GRANULARITY_TEXT = {"activation": "one scale per token (PerRow(-1)) or per tensor (PerTensor())",
                     "weight": "one scale per output channel (PerRow(0) of a (K, N) kernel) or "
                               "per tensor (PerTensor())"}


def code_max(fmt: F.Format) -> int | None:
    """Largest ``|code|`` of ``fmt`` as an int8 matmul operand, or None if it has no int8 code.

    Signed integers reach ``-2^(b-1)`` (128 for int8); midrise codes enter as the odd
    ``u = 2q + 1``, up to ``2^b - 1`` (so at most 7 bits fit int8); ternary codes are
    ``{-1, 0, 1}``. Unsigned integer and float grids have no int8 code.

    Raises:
      TypeError: ``fmt`` is not a qjax format.
    """
    if not isinstance(fmt, F.Format):
        raise TypeError(f"fmt must be a qjax format (IntFormat, Midrise, Ternary, FloatFormat, "
                        "POST), "
                        f"got {type(fmt).__name__}")
    if isinstance(fmt, F.IntFormat) and fmt.signed:
        return -fmt.qmin
    if isinstance(fmt, F.Ternary):
        return 1
    if isinstance(fmt, F.Midrise) and fmt.bits <= 7:
        return 2**fmt.bits - 1
    return None


def check_int32_sum(k: int, x_format: F.Format, w_format: F.Format) -> None:
    """ValueError unless ``k * code_max(x_format) * code_max(w_format) <= 2^31 - 1``.

    That bound makes the int32 sum of ``k`` code products exact. Also a ValueError if either
    format has no int8 code (:func:`code_max`).
    """
    cx, cw = code_max(x_format), code_max(w_format)
    if cx is None or cw is None:
        bad = x_format if cx is None else w_format
        raise ValueError(f"format {bad.name} has no int8 code; use a signed int, ternary or "
                         "midrise (<= 7 bits) format")
    bound = cx * cw
    if k * bound > INT32_MAX:
        raise ValueError(
            f"K = {k} is too large for an exact int32 accumulation of {x_format.name} x "
            f"{w_format.name} codes (|product| up to {bound}): the limit is K <= "
            f"{INT32_MAX // bound} (K * max|code_x| * max|code_w| <= 2^31 - 1); split the "
            "contraction or use the fake-quant path")


def recompute_reason(spec: SP.QuantSpec, name: str = "spec") -> str | None:
    """Why an op cannot recompute ``spec``'s codes from its plain scale rule, or None.

    The part of the rule that is neither the format nor the granularity: a symmetric scale rule
    (no zero point, which would need a correction term), no GGML / torchao runtime preset, float32
    scales (``scale_dtype=None``), nearest rounding, no learned scale (LSQ, PACT), and no Hadamard
    rotation or its ``"half"`` form (the caller rotates; the full form rotates back before the
    matmul). The kernels' fp8 activations follow it too. ``name`` starts the message.
    """
    SP.check_spec(spec, name)
    if isinstance(spec.scale_rule, (S.GgmlMax, S.TorchAOAffine)):
        return (f"{name} scale {spec.scale_rule} is a runtime preset (GGML / torchao scales); "
                "presets "
                "use the fake-quant path")
    if isinstance(spec.scale_rule, S.AbsMax) and not spec.scale_rule.symmetric:
        return f"{name} scale must be symmetric (a zero point needs a correction term)"
    if spec.scale_dtype is not None:
        return f"{name} scale_dtype must be None (float32 scales), got {spec.scale_dtype!r}"
    if spec.rounding != "nearest":
        return f"{name} rounding must be 'nearest', got {spec.rounding!r}"
    if isinstance(spec.estimator, SP.LEARNED_SCALE_ESTIMATORS):
        return f"{name} must not use a learned-scale estimator (LSQ, PACT)"
    if spec.hadamard_block is not None and spec.hadamard_mode != "half":
        return (f"{name} with a Hadamard rotation must use hadamard_mode='half' (the caller "
                "rotates x; the full form rotates back before the matmul)")
    return None


def _check_role(role: object) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def operand_reason(spec: SP.QuantSpec, role: Role, name: str | None = None) -> str | None:
    """Why ``spec`` cannot be the ``role`` operand of the int8 product, or None if it can.

    ``role="activation"``: ``x (..., K)``; ``role="weight"``: a kernel ``(K, N)`` in the training
    layout (map a serving ``(N, K)`` spec with :func:`training_weight_spec` first). ``name``
    (default ``role``) starts the message.

    Raises:
      TypeError: ``spec`` not a QuantSpec. ValueError: ``role`` not one of :data:`ROLES`.
    """
    _check_role(role)
    name = role if name is None else name
    SP.check_spec(spec, name)
    fmt = spec.format
    if code_max(fmt) is None:
        return (f"{name} format {fmt.name} has no exact int8 code; use a signed int, ternary or "
                "midrise (<= 7 bits) format")
    if spec.granularity not in _GRANULARITIES[role]:
        return (f"{name} granularity must be {_GRANULARITY_TEXT[role]}, got {spec.granularity}")
    return recompute_reason(spec, name)


def integer_forward_reason(weight: SP.QuantSpec | None,
                           activation: SP.QuantSpec | None) -> str | None:
    """Why no exact int8 x int8 -> int32 product serves these specs, or None: THE rule.

    Args:
      weight: spec of a kernel ``(K, N)`` in the training layout (:func:`training_weight_spec`
        maps a serving ``(N, K)`` spec onto it), or None.
      activation: spec of ``x (..., K)``, or None.

    Returns:
      None if both operands pass :func:`operand_reason` (see the module docstring), else the
      first reason, naming the operand. The K limit is separate (:func:`check_int32_sum`).

    Raises:
      TypeError: a spec that is neither a QuantSpec nor None.
    """
    SP.check_spec(weight, "weight", optional=True)
    SP.check_spec(activation, "activation", optional=True)
    if weight is None or activation is None:
        return "both the weight and the activation must be quantized"
    return operand_reason(activation, "activation") or operand_reason(weight, "weight")


def _transposed(axis: int) -> int:
    """Axis of a rank-2 array after its transpose (0 <-> 1); ValueError if out of range."""
    if not -2 <= axis < 2:
        raise ValueError(f"spec axis {axis} is out of range for a 2-D (N, K) weight")
    return 1 - axis % 2


def training_weight_spec(spec: SP.QuantSpec) -> SP.QuantSpec:
    """A serving weight spec ``(N, K)`` as the rule reads a training kernel ``(K, N)``.

    The transpose moves every axis: per output channel ``PerRow(-1)``/``PerRow(1)`` becomes
    ``PerRow(0)``, ``PerRow(0)`` (per input channel) becomes ``PerRow(1)``, groups along K
    ``PerGroup(-1, g)`` become ``PerGroup(0, g)``, ``PerAxis`` axes and a Hadamard axis move
    likewise; ``PerTensor`` stays (the inverse of :func:`qjax.convert.serving_spec`).

    Raises:
      TypeError: ``spec`` not a QuantSpec. ValueError: an axis a rank-2 weight does not have.
    """
    SP.check_spec(spec, "spec")
    g = spec.granularity
    if isinstance(g, G.PerRow):
        g = G.PerRow(_transposed(g.axis))
    elif isinstance(g, G.PerGroup):
        g = G.PerGroup(_transposed(g.axis), g.size)
    elif isinstance(g, G.PerAxis):
        g = G.PerAxis(tuple(map(_transposed, g.axis)) if isinstance(g.axis, tuple)
                      else _transposed(g.axis))
    moved = ({} if spec.hadamard_block is None
             else {"hadamard_axis": _transposed(spec.hadamard_axis)})
    return spec.replace(granularity=g, **moved)


def operand_codes(a32: jax.Array, spec: SP.QuantSpec, axis: int) -> tuple[jax.Array, jax.Array]:
    """Float32 codes ``q`` and scale ``s`` of one operand, without rotation (the caller rotates).

    One scale per 1-D slice along ``axis`` (``spec.granularity`` ``PerRow``; the scale keeps
    ``axis`` as size 1) or one for the whole array (``PerTensor``; all axes size 1):
    ``s = spec.scale_rule.compute(a)``, ``q = encode(a * (1/s))``, the ops of :func:`qjax.quantize`.

    Args:
      a32: float32 operand; axis: the contraction axis (-1 for ``x (..., K)``, 0 for a kernel).
    """
    axes = (tuple(range(a32.ndim)) if isinstance(spec.granularity, G.PerTensor)
            else (axis % a32.ndim,))
    scale, _ = spec.scale_rule.compute(a32, axes, spec.format)
    return E.encode(a32, scale, None, spec.format), scale


def int8_operand(q: jax.Array, scale: jax.Array, fmt: F.Format) -> tuple[jax.Array, jax.Array]:
    """(int8 codes, float32 multiplier) with ``decode(q) * scale == codes * multiplier``.

    Integer and ternary codes are ``q`` itself; midrise codes become the odd integers
    ``u = 2q + 1`` with multiplier ``scale / 2`` (Panferov et al., 2025).

    Args:
      q: codes of ``fmt`` in any integer or float dtype; scale: broadcastable to ``q``.
    """
    if isinstance(fmt, F.Midrise):
        return (2.0 * q + 1.0).astype(jnp.int8), scale * 0.5
    return q.astype(jnp.int8), scale


def quantize_operand(a32: jax.Array, spec: SP.QuantSpec,
                     axis: int) -> tuple[jax.Array, jax.Array]:
    """int8 codes and float32 multiplier of ``a32``: :func:`operand_codes`, :func:`int8_operand`.

    Returns codes of ``a32``'s shape and the multiplier of the scale's shape (size 1 along
    ``axis``, or along every axis for a per-tensor spec).
    """
    q, scale = operand_codes(a32, spec, axis)
    return int8_operand(q, scale, spec.format)


def matmul(xi: jax.Array, xs: jax.Array, wi: jax.Array, ws: jax.Array, w_contract: int,
           out_sharding=None) -> jax.Array:
    """``y = (xi . wi) * xs * ws``: an exact int8 x int8 -> int32 dot, float32 epilogue.

    ``acc = dot_general(xi, wi, preferred_element_type=int32)`` contracts ``xi``'s last axis
    with ``wi``'s axis ``w_contract``; then ``acc.astype(float32) * xs * ws`` in that order. The
    caller checks the K limit (:func:`check_int32_sum`).

    Args:
      xi: int8 ``(..., K)``; xs: float32 multipliers broadcastable to ``(..., 1)``.
      wi: int8 ``(K, N)`` (``w_contract=0``, training layout) or ``(N, K)`` (``w_contract=1``,
        serving layout).
      ws: float32 multipliers, ``N`` (per output channel) or 1 elements, any shape.
      out_sharding: output sharding on explicit meshes (default
        :func:`qjax._src.typed_sharding.dot_out_spec`).

    Returns:
      float32 ``(..., N)``.
    """
    if w_contract not in (0, 1):
        raise ValueError(f"w_contract must be 0 (wi (K, N)) or 1 (wi (N, K)), got {w_contract!r}")
    acc = typed_sharding.dot_general(xi, wi, (((xi.ndim - 1,), (w_contract,)), ((), ())),
                                     preferred_element_type=jnp.int32, out_sharding=out_sharding)
    y = acc.astype(jnp.float32) * xs * ws.reshape(-1)
    if out_sharding is not None:  # the scales' shardings must not override the caller's choice
        y = jax.sharding.reshard(y, out_sharding)
    # Under jit XLA would fuse this product into a following add (the residual) as an FMA, which
    # eager mode never does; max with -FLT_MAX (the identity on finite values and NaN) prevents
    # it, so jit and eager agree as they do for a float dot's output.
    return jnp.maximum(y, jnp.finfo(jnp.float32).min)
