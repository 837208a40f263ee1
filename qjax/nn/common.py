"""What Linen and NNX layers share: how a layer's two operands are quantized.

A :class:`LayerQuant` holds the weight spec and the activation (input) spec of one layer; either
may be None. :class:`Method` names a published recipe (``"quest"``, ``"lsq"``, ``"pact"``,
``"ste"``) and is resolved into a :class:`LayerQuant` once the kernel layout (its contraction axis)
is known. The functions here take plain arrays, so the Linen and NNX modules only own parameters.

Learned quantizer parameters (LSQ steps, PACT clipping levels) are ordinary parameters named
``kernel_scale`` and ``input_scale`` beside the layer's ``kernel``.

With QuEST's half Hadamard form, the input is rotated along its last axis and the kernel along
its contraction axis, so the layer's own op computes ``(x H)(H^T W) = x W``; an operand without a
spec is still rotated when the other one is.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qjax import formats as F
from qjax import granularity as G
from qjax import scales as S
from qjax import spec as SP
from qjax import typed_sharding
from qjax._checks import check_axis_name, check_bool, check_pos_int, check_real
from qjax.hadamard import check_block_size, hadamard_transform
from qjax.methods import quest
from qjax.qdot import integer_forward_reason, qat_dense
from qjax.quantize import fake_quant, rotate_like_spec

__all__ = ["LayerQuant", "Method", "METHODS", "resolve", "quantize_input", "quantize_kernel"]

METHODS = ("quest", "lsq", "pact", "ste")


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """Specs for a layer's weight and input (activation); None leaves that operand in float.

    ``integer_forward=True`` runs dense layers' forward as an int8 dot with the same values and
    gradients as fake quantization (:mod:`qjax.qdot`), where the specs allow it.

    ``weight_axis_name`` / ``activation_axis_name``: inside ``shard_map``, the mesh axes that split
    the axes the kernel's / the input's scale reduces over (``"tensor"`` for both operands of a
    row-parallel layer; the batch axes for a per-tensor activation step), so that scales and LSQ
    gradient scales are the global ones (see :func:`qjax.fake_quant`). Leave None under
    ``jax.jit``, where reductions over sharded axes are global anyway.

    Raises:
      ValueError: if only one operand uses the half Hadamard form and the other has a spec that
        does not, or the two half forms use different block sizes.
    """

    weight: SP.QuantSpec | None = None
    activation: SP.QuantSpec | None = None
    integer_forward: bool = False
    weight_axis_name: str | tuple[str, ...] | None = None
    activation_axis_name: str | tuple[str, ...] | None = None

    def __post_init__(self):
        # Types first: integer_forward_reason reads the specs' fields.
        for name in ("weight", "activation"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, SP.QuantSpec):
                raise TypeError(f"{name} must be a QuantSpec or None, got {type(v).__name__}")
        check_bool("integer_forward", self.integer_forward)
        check_axis_name("weight_axis_name", self.weight_axis_name)
        check_axis_name("activation_axis_name", self.activation_axis_name)
        if self.integer_forward:
            reason = integer_forward_reason(self.weight, self.activation)
            if self.weight_axis_name or self.activation_axis_name:
                reason = "it computes local scales, so it takes no weight/activation axis_name"
            if reason:
                raise ValueError(f"integer_forward is not available: {reason}")
        w, a = self.half_block("weight"), self.half_block("activation")
        if w and a and w != a:
            raise ValueError(f"half-Hadamard block sizes differ: weight {w}, activation {a}")
        if w and self.activation is not None and not a:
            raise ValueError("the weight uses the half Hadamard form, so the activation must too")
        if a and self.weight is not None and not w:
            raise ValueError("the activation uses the half Hadamard form, so the weight must too")

    def half_block(self, operand: str) -> int | None:
        s = getattr(self, operand)
        if s is None or s.hadamard is None or s.hadamard_mode != "half":
            return None
        return s.hadamard

    @property
    def rotation(self) -> tuple[int, str] | None:
        """``(block_size, method)`` of the half-form rotation both operands share, or None."""
        for s in (self.weight, self.activation):
            if s is not None and s.hadamard is not None and s.hadamard_mode == "half":
                return s.hadamard, s.hadamard_method
        return None


@dataclasses.dataclass(frozen=True)
class Method:
    """A named recipe at given bit widths (``act_bits=None``: weight-only).

    * ``quest``: RMS-Gaussian scales per row, trust estimator (``clip`` switches to the clip
      mask, e.g. 1.3 for W1A1; ``estimator="ste"`` or ``"clipped_ste"`` replaces it), half
      Hadamard on both
      operands.
    * ``lsq``: learned steps per output channel (weights) and per tensor (inputs).
    * ``pact``: learned signed clipping level per tensor for inputs; weights absmax per output
      channel with clipped STE.
    * ``ste``: absmax per output channel / per token, identity STE (``estimator="clipped_ste"``
      for the clipped one).

    ``scale`` (a rule or rule name, see :func:`qjax.scales.as_scale_rule`) replaces the scale rule
    of both operands for ``quest`` (default :class:`~qjax.RmsGaussian`; e.g. ``"mse:8:0.6"``
    searches the clip with least squared error per row) and ``ste`` (default
    :class:`~qjax.AbsMax`); ``lsq`` and ``pact`` learn theirs, so only ``"auto"``.
    ``grid`` is ``"midrise"`` (QuEST's ``2^b`` levels without zero) or ``"int"`` (signed
    integers); ``"auto"`` is midrise for QuEST and int for the others. ``hadamard`` is
    ``"half"``, ``"full"`` or None; ``"auto"`` is half for QuEST and None for the others. Setting
    both explicitly makes methods comparable on the same grid and rotation.
    ``weight_axis_name`` / ``activation_axis_name`` go to :class:`LayerQuant` (``shard_map`` only).

    The fields are checked here, also those the method ignores (``block_size`` without a
    Hadamard, ``trust`` outside QuEST): ``block_size`` a positive power of two, ``trust`` finite
    and positive, ``clip`` finite and positive or None, ``integer_forward`` a bool. A 1-bit
    ``"int"`` grid ``{-1, 0}`` has no positive level, which the default scale rules and the
    learned steps of LSQ and PACT need: 1 bit takes the midrise grid (or, for ``quest`` and
    ``ste``, a ``scale`` rule that copes, e.g. asymmetric absmax).
    """

    name: str
    weight_bits: int | None = 4
    act_bits: int | None = 4
    block_size: int = 128
    trust: float = 1.0
    clip: float | None = None
    hadamard: str | None = "auto"
    grid: str = "auto"
    estimator: str = "auto"
    scale: S.ScaleRule | str = "auto"
    integer_forward: bool = False
    weight_axis_name: str | tuple[str, ...] | None = None
    activation_axis_name: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; allowed: {METHODS}")
        for name in ("weight_bits", "act_bits"):
            bits = getattr(self, name)
            if bits is not None:
                F._check_bits(bits)
        if self.hadamard not in quest.HADAMARD_FORMS + ("auto",):
            raise ValueError(f"hadamard must be one of {quest.HADAMARD_FORMS + ('auto',)}")
        if self.grid not in ("auto", "midrise", "int"):
            raise ValueError(f"grid must be 'auto', 'midrise' or 'int', got {self.grid!r}")
        allowed = {"quest": ("auto", "trust", "ste", "clipped_ste"),
                   "ste": ("auto", "ste", "clipped_ste")}.get(
            self.name, ("auto",))
        if self.estimator not in allowed:
            raise ValueError(f"estimator of {self.name} must be one of {allowed}, "
                             f"got {self.estimator!r}")
        if self.scale != "auto":
            if self.name not in ("quest", "ste"):
                raise ValueError(f"scale of {self.name} must be 'auto' (it learns its scales), "
                                 f"got {self.scale!r}")
            S.as_scale_rule(self.scale)  # fails early on a bad name
        check_block_size(self.block_size)
        check_real("trust", self.trust, 0.0, low_open=True)
        if self.clip is not None:
            check_real("clip", self.clip, 0.0, low_open=True)
        check_bool("integer_forward", self.integer_forward)
        check_axis_name("weight_axis_name", self.weight_axis_name)
        check_axis_name("activation_axis_name", self.activation_axis_name)
        for name in ("weight_bits", "act_bits"):
            bits = getattr(self, name)
            if bits is None or self.scale != "auto":
                continue
            # LSQ divides by sqrt(max_level), PACT's step is alpha / max_level, and the default
            # rules (RMS-Gaussian, symmetric absmax) need a positive level too.
            fmt = self._format(bits)
            if fmt.max_level <= 0:
                raise ValueError(
                    f"{self.name} cannot use {name}={bits} on the {fmt.name} grid (no positive "
                    f"level); allowed {name}: 2..8, or 1..8 with grid='midrise'")

    def _scale(self, default: S.ScaleRule) -> S.ScaleRule:
        return default if self.scale == "auto" else S.as_scale_rule(self.scale)

    def _format(self, bits: int) -> F.Format:
        midrise = self.grid == "midrise" or (self.grid == "auto" and self.name == "quest")
        return F.Midrise(bits) if midrise else F.IntFormat(bits)

    def layer_quant(self, contract_axis: int | None) -> LayerQuant:
        """Specs for a kernel whose input features lie along ``contract_axis``.

        ``contract_axis=None`` means an embedding table ``(vocab, features)``: weight-only, rows
        along the last axis, no Hadamard.
        """
        embed = contract_axis is None
        w_axis = -1 if embed else contract_axis
        wb, ab = self.weight_bits, None if embed else self.act_bits
        hadamard = self.hadamard
        if hadamard == "auto":
            hadamard = "half" if self.name == "quest" else None
        if embed:
            hadamard = None

        def make(bits, granularity, scale, estimator, axis):
            if bits is None:
                return None
            rot = {} if hadamard is None else dict(
                hadamard=self.block_size, hadamard_axis=axis, hadamard_mode=hadamard,
                hadamard_method="matmul")
            return SP.QuantSpec(self._format(bits), granularity, scale, estimator, **rot)

        if self.name == "quest":
            est = {"ste": SP.STE(), "clipped_ste": SP.ClippedSTE()}.get(
                self.estimator, SP.Trust(self.trust, self.clip))
            rule = self._scale(S.RmsGaussian())
            w = make(wb, G.PerRow(w_axis), rule, est, w_axis)
            a = make(ab, G.PerRow(-1), rule, est, -1)
        elif self.name == "lsq":
            w = make(wb, G.PerRow(w_axis), S.AbsMax(), SP.LSQ(), w_axis)
            a = make(ab, G.PerTensor(), S.AbsMax(), SP.LSQ(), -1)
        elif self.name == "pact":
            w = make(wb, G.PerRow(w_axis), S.AbsMax(), SP.ClippedSTE(), w_axis)
            a = make(ab, G.PerTensor(), S.AbsMax(), SP.PACT(), -1)
        else:  # ste
            est = SP.ClippedSTE() if self.estimator == "clipped_ste" else SP.STE()
            rule = self._scale(S.AbsMax())
            w = make(wb, G.PerRow(w_axis), rule, est, w_axis)
            a = make(ab, G.PerRow(-1), rule, est, -1)
        return LayerQuant(w, a, self.integer_forward and not embed, self.weight_axis_name,
                          self.activation_axis_name)


Target = LayerQuant | Method | str


def as_target(target: object) -> LayerQuant | Method:
    """Validates a rule target: a :class:`LayerQuant`, a :class:`Method` or a method name."""
    if isinstance(target, (LayerQuant, Method)):
        return target
    if isinstance(target, str):
        return Method(target)
    raise TypeError(
        f"a rule target must be a LayerQuant, a Method or one of {METHODS}, got {target!r}"
    )


def resolve(target: Target, contract_axis: int | None) -> LayerQuant:
    """The :class:`LayerQuant` of ``target`` for a kernel contracted along ``contract_axis``."""
    t = as_target(target)
    return t if isinstance(t, LayerQuant) else t.layer_quant(contract_axis)


def learned(spec: SP.QuantSpec | None) -> bool:
    """Whether ``spec`` needs a learned parameter (LSQ step or PACT clip)."""
    return spec is not None and isinstance(spec.estimator, SP.LEARNED_SCALE_ESTIMATORS)


def init_kernel_scale(kernel: jax.Array, spec: SP.QuantSpec) -> jax.Array:
    """Initial learned parameter for a kernel, shaped :func:`qjax.scale_shape`.

    LSQ: ``2 mean|w| / sqrt(QP)`` per block; PACT: the Gaussian-optimal clip times the block RMS.
    """
    x32 = rotate_like_spec(kernel.astype(jnp.float32), spec)
    xb, lay = G.to_blocks(x32, spec.granularity)
    if isinstance(spec.estimator, SP.LSQ):
        return S.lsq_init(xb, spec.format.max_level, lay.reduce_axes)
    rms = jnp.sqrt(jnp.mean(jnp.square(xb), axis=lay.reduce_axes, keepdims=True))
    return S.gaussian_clip(spec.format) * rms + S.RMS_EPS


def init_input_scale(spec: SP.QuantSpec, features: int) -> jax.Array:
    """Initial learned parameter for an input, assuming unit-RMS Gaussian inputs (as after RMSNorm).

    LSQ: ``2 E|z| / sqrt(QP) = 2 sqrt(2/pi) / sqrt(QP)``; PACT: the Gaussian-optimal clip.
    Shape ``()`` for :class:`~qjax.PerTensor`, ``(features,)`` for ``PerAxis(-1)``.
    """
    g = spec.granularity
    if isinstance(g, G.PerTensor):
        shape = ()
    elif isinstance(g, G.PerAxis) and g.axis in (-1, (-1,)):
        shape = (features,)
    else:
        raise ValueError(
            f"a learned input scale needs PerTensor() or PerAxis(-1) granularity, got {g}"
        )
    if isinstance(spec.estimator, SP.LSQ):
        value = 2.0 * math.sqrt(2.0 / math.pi) / math.sqrt(spec.format.max_level)
    else:
        value = S.gaussian_clip(spec.format)
    return jnp.full(shape, value, jnp.float32)


def _rotate(a: jax.Array, rotation: tuple[int, str] | None, axis: int) -> jax.Array:
    if rotation is None:
        return a
    block, method = rotation
    return hadamard_transform(a, block, axis=axis, method=method).astype(a.dtype)


def quantize_input(
    x: jax.Array, lq: LayerQuant, scale: jax.Array | None = None, *, key: jax.Array | None = None
) -> jax.Array:
    """The input as the layer's op should see it: fake-quantized and/or rotated."""
    if lq.activation is None:
        return _rotate(x, lq.rotation, -1)
    return fake_quant(x, lq.activation, scale=scale, key=key, axis_name=lq.activation_axis_name)


def quantize_kernel(
    kernel: jax.Array,
    lq: LayerQuant,
    contract_axis: int | None,
    scale: jax.Array | None = None,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    """The kernel as the layer's op should see it: fake-quantized and/or rotated."""
    if lq.weight is None:
        return kernel if contract_axis is None else _rotate(kernel, lq.rotation, contract_axis)
    return fake_quant(kernel, lq.weight, scale=scale, key=key, axis_name=lq.weight_axis_name)


def einsum_contract_axis(einsum_str: str) -> int:
    """Kernel axis contracted with the input's last axis in ``"<x>,<kernel>-><out>"``.

    Raises:
      ValueError: if the string is not a two-operand einsum or the input's last axis is not
        contracted with exactly one kernel axis.
    """
    s = einsum_str.replace(" ", "")
    if "->" not in s or s.count(",") != 1 or "..." in s.split(",")[1]:
        raise ValueError(f"einsum_str must look like 'x,kernel->out', got {einsum_str!r}")
    lhs, out = s.split("->")
    xs, ks = lhs.split(",")
    last = xs[-1]
    if last in out or ks.count(last) != 1:
        raise ValueError(
            f"in {einsum_str!r} the input's last axis {last!r} must be contracted with exactly "
            "one kernel axis"
        )
    return ks.index(last)


def _bias_add(y, bias, dtype):
    return y if bias is None else y + jnp.asarray(bias, dtype)


def _resolve_layer(weight, activation, method, contract_axis) -> LayerQuant:
    if method is not None:
        if weight is not None or activation is not None:
            raise ValueError("pass either method or weight/activation specs, not both")
        return resolve(method, contract_axis)
    return LayerQuant(weight, activation)


def dense_op(x, kernel, bias, lq, w_scale, a_scale, *, qat, dtype=None, precision=None,
             out_sharding=None):
    """``x (..., K) @ kernel (K, N) + bias`` with quantized operands when ``qat``.

    ``out_sharding`` names the output sharding on explicit meshes (as in ``nnx.Linear``); by
    default :func:`qjax.typed_sharding.dot_out_spec`.
    """
    check_bool("qat", qat)
    dtype = dtype or jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if qat and lq.integer_forward:
        y = qat_dense(_rotate(x, lq.rotation, -1), _rotate(kernel, lq.rotation, 0), lq.weight,
                      lq.activation, out_sharding=out_sharding)
        return _bias_add(y, bias, dtype)
    if qat:
        x, kernel = quantize_input(x, lq, a_scale), quantize_kernel(kernel, lq, 0, w_scale)
    y = typed_sharding.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                                   precision=precision, out_sharding=out_sharding)
    return _bias_add(y, bias, dtype)


def einsum_op(einsum_str, x, kernel, bias, lq, w_scale, a_scale, *, qat, dtype=None,
              precision=None, out_sharding=None):
    """``einsum(einsum_str, x, kernel) + bias`` with quantized operands when ``qat``."""
    check_bool("qat", qat)
    dtype = dtype or jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if qat:
        axis = einsum_contract_axis(einsum_str) if lq.rotation or lq.weight else None
        x, kernel = quantize_input(x, lq, a_scale), quantize_kernel(kernel, lq, axis, w_scale)
    y = jnp.einsum(einsum_str, x, kernel, precision=precision, out_sharding=out_sharding)
    return _bias_add(y, bias, dtype)


def conv_op(x, kernel, bias, lq, w_scale, a_scale, *, qat, strides, padding, kernel_dilation,
            dtype=None, precision=None):
    """Channel-last convolution ``x (N, *spatial, C)``, ``kernel (*window, C, F)``."""
    check_bool("qat", qat)
    dtype = dtype or jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if qat:
        x, kernel = quantize_input(x, lq, a_scale), quantize_kernel(kernel, lq, -2, w_scale)
    nsp = kernel.ndim - 2
    spatial = "".join("HWDXYZ"[i] for i in range(nsp))
    dn = jax.lax.conv_dimension_numbers(
        x.shape, kernel.shape, ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    )
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding, rhs_dilation=kernel_dilation,
        dimension_numbers=dn, precision=precision,
    )
    return _bias_add(y, bias, dtype)


def embed_op(ids, table, lq, w_scale, *, qat, dtype=None):
    """Rows of the (fake-quantized when ``qat``) embedding table ``(vocab, features)``."""
    check_bool("qat", qat)
    if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
        raise TypeError(f"embedding ids must be integers, got {jnp.asarray(ids).dtype}")
    table = table.astype(dtype or table.dtype)
    if qat:
        table = quantize_kernel(table, lq, None, w_scale)
    return jnp.take(table, ids, axis=0)


def check_sizes(sizes: dict[str, object]) -> None:
    """Layer sizes must be positive ints: 0 or a negative size would fail deep inside an
    initializer (a division by zero, a broadcasting error)."""
    for name, value in sizes.items():
        check_pos_int(name, value)


def as_tuple(v, n: int, name: str) -> tuple[int, ...]:
    """``v`` (int or sequence) as an ``n``-tuple of positive ints (strides, sizes)."""
    t = (v,) * n if isinstance(v, int) else tuple(v)
    if len(t) != n:
        raise ValueError(f"{name} must have {n} entries, got {v!r}")
    check_sizes({f"{name}[{i}]": e for i, e in enumerate(t)})
    return t
