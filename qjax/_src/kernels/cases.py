"""Which kernel case a ``(x, w, act_spec)`` triple is, and the operand layout the kernels read.

Cases (``Case.kind``):

* ``"float"``: weight-only (``act_spec=None``): W8A16, W4A16, W2/ternary, W1 sign codes, fp8
  weights. Codes are dequantized in the kernel, ``(q - z) * s`` per group, and multiplied with the
  float activations; float32 accumulation.
* ``"int"``: both operands on integer grids (W8A8, W4A4 QuEST, W1A1): int8 codes, int32
  accumulation, ``y = s_x * s_w * acc`` in the epilogue. Midrise (QuEST) codes enter as the odd
  integers ``u = 2q + 1`` with half the scale, so no correction term is needed. Which pairs are
  int is not decided here: it is :func:`qjax._src.int8.integer_forward_reason`, the rule of QAT's
  integer forward, applied to ``w.spec`` read in the training layout
  (:func:`qjax._src.int8.training_weight_spec`: serving per channel ``PerRow(-1)``/``PerRow(1)`` is
  the kernel's ``PerRow(0)``) and ``act_spec`` (per token or per tensor). The int32 sum is exact
  only while ``K * max|code_x| * max|code_w| <= 2^31 - 1`` (W8A8: ``K <= 131,071``);
  :func:`classify` refuses larger K (:func:`qjax._src.int8.check_int32_sum`).
* ``"fp8"``: e4m3/e5m2 activations (per token) and weights with per-row scales, float32
  accumulation.

Kernel operand layout (built by :func:`prepare_operands`, shared by every Pallas backend):

* Packed weights (``per = 8 // bits`` codes per byte, first code in the low bits, as
  :mod:`qjax._src.qarray` stores them along K) are transposed to K-major ``(K/per, N)`` bytes. Byte
  row ``i`` holds K indices ``i*per + p`` for phases ``p = 0..per-1``, so the kernel never
  interleaves: it splits the activations into the same ``per`` phases, ``xp[p] = x[:, p::per]``
  (shape ``(per, M, K/per)``), and sums ``xp[p] @ decode((bytes >> p*bits) & mask)`` over p.
* Scales and zero points become ``(G, N)`` (G groups along K; G = 1 per channel), so a K block
  of ``bk`` rows reads a ``(bk/g, bn)`` scale block: legal for TPU's (8, 128) tiling when
  ``bk/g`` is a multiple of 8 (the default block sizes guarantee it for any group size g).
* Shapes are zero-padded to block multiples after quantization: padded activations (or
  activation codes) are 0, so padded K terms add exactly 0; padded rows/columns are sliced off.

Cost: a row-major QArray's bytes are transposed to K-major inside each call (one extra read and
write of the weight bytes). A QArray stored K-major (``qjax._src.qarray.relayout(w, k_major=True)``,
``qjax.convert.convert(..., k_major=True)``) is read as it is; only zero padding to block
multiples (none for shapes that are multiples of the blocks) and the per-group scales' ``(G, N)``
transpose (``4 / g`` bytes per weight) remain per call.

References:
  Frantar et al., 2024. MARLIN: Mixed-Precision Auto-Regressive Parallel Inference on Large
  Language Models (4-bit weights dequantized in the kernel, per-group scales);
  Panferov et al., 2025. QuEST (odd-integer int4 codes).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src import formats as F
from qjax._src import granularity as G
from qjax._src import int8
from qjax._src import scales as S
from qjax._src import spec as SP
from qjax._src.qarray import PACKED_BITS, QArray

__all__ = ["Case", "classify", "check_act_spec", "prepare_operands", "Operands"]

KINDS = ("float", "int", "fp8")


@dataclasses.dataclass(frozen=True)
class Case:
    """Static description of one quantized matmul (hashable; a jit static argument).

    Attributes:
      kind: ``"float"``, ``"int"`` or ``"fp8"`` (see the module docstring).
      n, k: weight shape ``(N, K)``.
      bits: storage bits per weight code (1, 2, 4 packed; 8 one per byte).
      group: group size along K, or None for one scale per output channel (or tensor).
      weight_format, act_spec: the weight format and the activation spec (None: weight-only).
      has_zero: the weight has zero points (asymmetric, float kind only).
      w_dtype: the dtype ``dequantize(w)`` returns (dequantized tiles are rounded to it).
    """

    kind: str
    n: int
    k: int
    bits: int
    group: int | None
    weight_format: F.Format
    act_spec: SP.QuantSpec | None
    has_zero: bool
    w_dtype: str

    @property
    def per(self) -> int:
        """Codes per stored byte (the number of K phases)."""
        return 8 // self.bits if self.bits in PACKED_BITS else 1

    @property
    def packed(self) -> bool:
        return self.bits in PACKED_BITS

    @property
    def odd_weight(self) -> bool:
        """Integer kind with midrise weights: the kernel uses ``2q + 1`` with scale ``s/2``."""
        return self.kind == "int" and isinstance(self.weight_format, F.Midrise)


def _is_fp8(fmt: F.Format) -> bool:
    return isinstance(fmt, F.FloatFormat) and fmt.name in ("e4m3", "e5m2")


#: Scale rules of fp8 activations (the fp8 kind is per token with these rules only).
FP8_ACT_SCALES = (S.AbsMax, S.RmsGaussian)


def _fp8_act_reason(a: SP.QuantSpec, name: str) -> str | None:
    if a.granularity != G.PerRow(-1):
        return f"{name} granularity must be PerRow(-1) (per token) for fp8, got {a.granularity}"
    if not isinstance(a.scale_rule, FP8_ACT_SCALES):
        return f"{name} scale must be AbsMax or RmsGaussian for fp8, got {a.scale_rule}"
    return int8.recompute_reason(a, name)


def check_act_spec(a: object, name: str = "act_spec", *, optional: bool = False) -> None:
    """Raises unless the kernels' activation quantization can honour spec ``a``.

    Integer grids: the activation half of THE rule, :func:`qjax._src.int8.operand_reason` (per token
    ``PerRow(-1)`` or per tensor, a symmetric scale rule recomputed in float32, nearest rounding,
    no learned scale, no rotation back). fp8 (e4m3/e5m2): per token, symmetric ``AbsMax`` or
    ``RmsGaussian``, and the same recompute conditions (:func:`qjax._src.int8.recompute_reason`).

    Raises:
      TypeError: ``a`` not a QuantSpec (or None when ``optional``).
      ValueError: any other format, or a spec the rule refuses; the message names ``name``.
    """
    SP.check_spec(a, name, optional=optional)
    if a is None:
        return
    fmt = a.format
    if _is_fp8(fmt):
        reason = _fp8_act_reason(a, name)
    elif int8.code_max(fmt) is not None:
        reason = int8.operand_reason(a, "activation", name)
    else:
        reason = (f"{name} format {fmt.name} has no int8 or fp8 code; use a signed int, "
                  "ternary, midrise (<= 7 bits), e4m3 or e5m2 format")
    if reason:
        raise ValueError(reason)


def _int_kind(k: int, w: QArray, act_spec: SP.QuantSpec) -> None:
    """Raises unless THE int8 rule (and the K limit) accepts ``w`` with ``act_spec``."""
    reason = int8.integer_forward_reason(int8.training_weight_spec(w.spec), act_spec)
    if reason:
        raise ValueError(f"no integer matmul for w (spec {w.spec}, read as a (K, N) training "
                         f"kernel by qjax._src.int8.training_weight_spec) and act_spec: {reason}")
    int8.check_int32_sum(k, act_spec.format, w.spec.format)


def classify(x_shape: tuple[int, ...], w: QArray, act_spec: SP.QuantSpec | None) -> Case:
    """The :class:`Case` of ``x (..., K) @ dequantize(w (N, K)).T``; raises on unsupported input.

    ``M = 0`` rows of ``x`` and ``N = 0`` are valid (empty products); ``K = 0`` is refused.
    """
    if not isinstance(w, QArray):
        raise TypeError(f"w must be a qjax.QArray, got {type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(f"w must be a 2-D QArray of shape (N, K), got shape {w.shape}")
    n, k = w.shape
    if k == 0:  # empty x rows (M = 0) and N = 0 are served; an empty contraction is not
        raise ValueError(f"w must have K >= 1 (in_features), got shape {w.shape}: there is no "
                         "quantized matmul over an empty contraction axis")
    check_act_spec(act_spec, optional=True)
    if not isinstance(x_shape, (tuple, list)):
        raise TypeError(f"x_shape must be a tuple of ints (x.shape), got {type(x_shape).__name__}")
    if len(x_shape) < 1 or x_shape[-1] != k:
        raise ValueError(f"x must have shape (..., K) with K = {k} (w is (N, K) = {w.shape}), "
                         f"got {tuple(x_shape)}")
    spec = w.spec
    fmt = spec.format
    if isinstance(fmt, F.POST) or (isinstance(fmt, F.FloatFormat) and not _is_fp8(fmt)):
        raise ValueError(f"weight format {fmt.name} is not supported; use an integer, midrise, "
                         "ternary or fp8 (e4m3/e5m2) format")
    if spec.hadamard_block is not None and spec.hadamard_mode != "half":
        raise ValueError("w was quantized with a full Hadamard rotation; kernels need the "
                         "'half' form (codes of the rotated weight, x rotated by the caller)")
    gran = spec.granularity
    if isinstance(gran, G.PerGroup):
        if gran.axis % 2 != 1:
            raise ValueError(f"w groups must run along K (axis -1), got {gran}")
        group = gran.size
    elif gran in (G.PerRow(-1), G.PerRow(1), G.PerTensor()):
        group = None
    else:
        raise ValueError(f"w granularity must be PerRow(-1), PerGroup(-1, g) or PerTensor, "
                         f"got {gran}")
    bits = F.storage_bits(fmt) if w.packed else 8  # unpacked codes: one per byte
    has_zero = w.zero_point is not None
    if act_spec is None:
        kind = "float"
    elif _is_fp8(act_spec.format) and _is_fp8(fmt):
        kind = "fp8"
        if group is not None:
            raise ValueError("with fp8 activations the weight needs one scale per output "
                             f"channel (PerRow(-1)) or per tensor, got {gran}")
        if has_zero:
            raise ValueError("with fp8 activations the weight must be symmetric (a zero point "
                             "needs a correction term)")
    elif _is_fp8(act_spec.format) or _is_fp8(fmt):
        raise ValueError(f"unsupported format pair: activations {act_spec.format.name}, weights "
                         f"{fmt.name}; both must be int8-codeable (signed int, ternary, midrise "
                         "<= 7 bits) or both fp8")
    else:
        kind = "int"
        _int_kind(k, w, act_spec)
    if group is not None and group % (8 // bits if bits in PACKED_BITS else 1):
        raise ValueError(f"group size {group} must be a multiple of the {8 // bits} codes per "
                         f"byte of a {bits}-bit format")
    plain = None if act_spec is None else act_spec.replace(hadamard_block=None)
    return Case(kind, n, k, bits, group, fmt, plain, has_zero, w.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Operands:
    """Kernel operands (see the module docstring); ``xs`` is None for the float kind."""

    xp: jax.Array  # (per, Mp, Kp/per): activations or activation codes, by phase
    xs: jax.Array | None  # (Mp, 1) float32 activation scales
    wc: jax.Array  # (Kp/per, Np) stored weight bytes, K-major
    ws: jax.Array  # (Gp, Np) float32 weight scales (Gp = Kp/g, or 1)
    wz: jax.Array | None  # (Gp, Np) float32 zero points


def round_up(a: int, b: int) -> int:
    """The smallest multiple of ``b`` that is >= ``a`` (padding of a dimension to tiles)."""
    return -(-a // b) * b


def padded_dims(m: int, case: Case, bm: int, bn: int, bk: int) -> tuple[int, int, int]:
    return round_up(m, bm), round_up(case.n, bn), round_up(case.k, bk)


def prepare_operands(xq: jax.Array, xs: jax.Array | None, w: QArray, case: Case,
                     bm: int, bn: int, bk: int) -> Operands:
    """Pads and relayouts ``xq (M, K)`` (activations or codes), ``xs (M, 1)`` and ``w``.

    ``bk`` must be a multiple of ``per`` and of the group size; the callers validate it.
    """
    m = xq.shape[0]
    mp, np_, kp = padded_dims(m, case, bm, bn, bk)
    per = case.per
    xq = jnp.pad(xq, ((0, mp - m), (0, kp - case.k)))
    xp = jnp.moveaxis(xq.reshape(mp, kp // per, per), -1, 0)
    if xs is not None:
        xs = jnp.pad(xs, ((0, mp - m), (0, 0)), constant_values=1.0)
    if w.k_major:  # stored in the kernels' layout: no transpose per call
        codes = w.codes
        wc = jnp.pad(codes, ((0, kp // per - codes.shape[0]), (0, np_ - case.n)))
    else:
        codes = w.codes
        wc = jnp.pad(codes, ((0, np_ - case.n), (0, kp // per - codes.shape[1]))).T
    ngroups = 1 if case.group is None else kp // case.group
    g0 = 1 if case.group is None else case.k // case.group

    def per_group(a, fill):
        a = jnp.broadcast_to(a.reshape(a.shape[0], -1).astype(jnp.float32), (case.n, g0))
        return jnp.pad(a, ((0, np_ - case.n), (0, ngroups - g0)), constant_values=fill).T

    ws = per_group(w.scale, 1.0)
    wz = per_group(w.zero_point, 0.0) if case.has_zero else None
    return Operands(xp, xs, wc, ws, wz)


def weight_qmin(case: Case) -> int:
    fmt = case.weight_format
    return int(fmt.qmin) if not isinstance(fmt, F.FloatFormat) else 0


def phase_codes(c: jax.Array, p: int, case: Case) -> jax.Array:
    """Integer codes ``q`` (int32) of phase ``p`` of a stored weight tile ``c``."""
    if case.packed:
        u = (c.astype(jnp.int32) >> (p * case.bits)) & (2**case.bits - 1)
        return u + weight_qmin(case)
    return c.astype(jnp.int32)


def dtype_bytes(dtype) -> int:
    return int(np.dtype(dtype).itemsize)
