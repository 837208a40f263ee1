"""How one layer is quantized: :class:`LayerQuant` (two specs) and :class:`Method` (a named recipe).

A :class:`LayerQuant` holds the weight spec and the activation (input) spec of one layer; either
may be None. Spec axes refer to the canonical views of :mod:`qjax._src.nn.layout`:

* the weight spec to the kernel's matrix view ``(K, N)``: per output channel is ``PerRow(0)``,
  groups along K ``PerGroup(0, g)``, a Hadamard along K ``hadamard_axis=0``;
* the activation spec to the input's row view ``(..., K)`` for dense layers (per token
  ``PerRow(-1)``), and to the input itself ``(N, *spatial, C)`` for convolutions (per example
  ``PerAxis(0)``).

:class:`Method` names a published recipe (``"quest"``, ``"lsq"``, ``"pact"``, ``"ste"``);
:func:`resolve` turns it into a :class:`LayerQuant` for one layer's :class:`KernelLayout`, and
checks a given LayerQuant against the layer (a group or a Hadamard block must run along and
divide K). Errors name the layer when the caller passes its ``path``.
"""

from __future__ import annotations

import dataclasses

from qjax._src import formats as F
from qjax._src import granularity as G
from qjax._src import quantized_backward as QB
from qjax._src import scales as S
from qjax._src import spec as SP
from qjax._src._checks import check_axis_name, check_bool, check_int, check_real
from qjax._src.hadamard import check_block_size
from qjax._src.methods import quest
from qjax._src.nn.layout import KernelLayout
from qjax._src.qdot import integer_forward_reason

__all__ = ["LayerQuant", "Method", "METHODS", "resolve", "as_target", "learned",
           "default_hadamard_block"]

METHODS = ("quest", "lsq", "pact", "ste", "ofq")
GRIDS = ("auto", "midrise", "int", "post")
MAX_AUTO_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class LayerQuant:
    """Specs for a layer's weight and input (activation); None leaves that operand in float.

    ``integer_forward=True`` runs a dense layer's QAT forward as an int8 dot with the same values
    and gradients as fake quantization (:mod:`qjax._src.qdot`), where the specs allow it.
    ``backward="int8"`` (with ``integer_forward=True`` only) also runs its two gradient matmuls as
    int8 x int8 -> int32 dots on the forward's codes and a stochastically rounded output gradient
    (:mod:`qjax._src.quantized_backward`; unbiased, so the gradients equal the float backward's in
    expectation). Its noise needs a PRNG key when the model is differentiated: the ``"quant"``
    rng stream in Linen (``apply(..., rngs={"quant": key})``), the layers' Rngs in NNX
    (:func:`qjax.nn.nnx.set_quant_rngs`).

    ``weight_axis_name`` / ``activation_axis_name``: inside ``shard_map``, the mesh axes that split
    the axes the kernel's / the input's scale reduces over (``"tensor"`` for both operands of a
    row-parallel layer; the batch axes for a per-tensor activation step), so that scales and LSQ
    gradient scales are the global ones (see :func:`qjax.fake_quant`). Leave None under
    ``jax.jit``, where reductions over sharded axes are global anyway.

    Raises:
      ValueError: if only one operand uses the half Hadamard form and the other has a spec that
        does not, or the two half forms use different block sizes; ``backward`` not ``"float"``
        or ``"int8"``, or ``"int8"`` without ``integer_forward``.
    """

    weight: SP.QuantSpec | None = None
    activation: SP.QuantSpec | None = None
    integer_forward: bool = False
    weight_axis_name: str | tuple[str, ...] | None = None
    activation_axis_name: str | tuple[str, ...] | None = None
    backward: QB.Backward = "float"

    def __post_init__(self):
        # Types first: integer_forward_reason reads the specs' fields.
        for name in ("weight", "activation"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, SP.QuantSpec):
                raise TypeError(f"{name} must be a QuantSpec or None, got {type(v).__name__}")
        check_bool("integer_forward", self.integer_forward)
        check_axis_name("weight_axis_name", self.weight_axis_name)
        check_axis_name("activation_axis_name", self.activation_axis_name)
        _check_backward(self.backward, self.integer_forward)
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
        if s is None or s.hadamard_block is None or s.hadamard_mode != "half":
            return None
        return s.hadamard_block

    @property
    def rotation(self) -> tuple[int, str] | None:
        """``(block_size, method)`` of the half-form rotation both operands share, or None."""
        for s in (self.weight, self.activation):
            if s is not None and s.hadamard_block is not None and s.hadamard_mode == "half":
                return s.hadamard_block, s.hadamard_method
        return None

    def replace(self, **changes) -> LayerQuant:
        return dataclasses.replace(self, **changes)


def _check_backward(backward: object, integer_forward: bool) -> None:
    QB.check_backward(backward)
    if backward == "int8" and not integer_forward:
        raise ValueError("backward='int8' reuses the int8 codes of the integer forward: set "
                         "integer_forward=True too")


def default_hadamard_block(dim: int, cap: int = MAX_AUTO_BLOCK) -> int:
    """The largest power of two ``<= cap`` that divides ``dim`` (1 for odd ``dim``)."""
    b = 1
    while b * 2 <= cap and dim % (b * 2) == 0:
        b *= 2
    return b


@dataclasses.dataclass(frozen=True)
class Method:
    """A named recipe at given bit widths (``act_bits=None``: weight-only).

    * ``quest``: RMS-Gaussian scales per row, trust estimator (``clip_ratio`` switches to the clip
      mask, e.g. 1.3 for W1A1; ``estimator="ste"`` or ``"clipped_ste"`` replaces it), half
      Hadamard on both operands.
    * ``lsq``: learned steps per output channel (weights) and per tensor (inputs).
    * ``pact``: learned signed clipping level per tensor for inputs; weights absmax per output
      channel with clipped STE.
    * ``ste``: absmax per output channel / per token, identity STE (``estimator="clipped_ste"``
      for the clipped one).
    * ``ofq``: OFQ's StatsQ weights (:func:`qjax.methods.ofq.statsq_spec`: midrise grid, step
      ``2 mean|W| / 2^(b-1)`` per output channel, ``floor`` rounding, identity STE) and
      ``lsq``'s activations (OFQ quantizes the weights; the activations need a recipe of their
      own). Train it with :func:`qjax.methods.ofq.confidence_guided_annealing` and
      :func:`qjax.methods.ofq.track_oscillations` in the optimizer.

    Inputs of convolutions are quantized per example (``quest``, ``ste``) or per tensor
    (``lsq``, ``pact``, ``ofq``) rather than per token, so that an integer convolution can serve
    them (one scale per output pixel's whole receptive field).

    ``hadamard_block`` is the Hadamard block along K (for convolutions, along the input channels).
    None (the default) picks, per layer, the largest power of two ``<= 128`` dividing it; an
    explicit size that does not divide a layer's K is an error naming the layer.
    ``scale_rule`` (a rule or rule name, see :func:`qjax._src.scales.as_scale_rule`) replaces the
    scale rule
    of both operands for ``quest`` (default :class:`~qjax.RmsGaussian`; e.g. ``"mse:8:0.6"``
    searches the clip with least squared error per row) and ``ste`` (default
    :class:`~qjax.AbsMax`); ``lsq`` and ``pact`` learn theirs, so only ``"auto"``.
    ``grid`` is ``"midrise"`` (QuEST's ``2^b`` levels without zero), ``"int"`` (signed
    integers) or, for ``lsq`` and ``ste``, ``"post"``: weights on ASQ's power-of-sqrt(2) grid
    (:class:`~qjax.POST`; ``lsq`` learns its step from the 99th percentile of ``|w|``),
    activations on the int grid; ``"auto"`` is midrise for QuEST and int for the others.
    ``hadamard_mode`` is ``"half"``, ``"full"`` or None; ``"auto"`` is half for QuEST and None
    for the others.
    ``weight_axis_name`` / ``activation_axis_name`` go to :class:`LayerQuant` (``shard_map`` only).
    ``integer_forward`` applies to dense layers without batch axes; convolutions (served as
    integer convolutions) and batched einsums train with fake quantization. ``backward="int8"``
    (needs ``integer_forward=True``) gives those integer-forward layers int8 gradient matmuls
    (see :class:`LayerQuant`); the other layers keep the float backward.

    The fields are checked here, also those the method ignores (``hadamard_block`` without a
    Hadamard, ``trust`` outside QuEST): ``hadamard_block`` a positive power of two or None,
    ``trust`` finite and positive, ``clip_ratio`` finite and positive or None, ``integer_forward`` a
    bool, ``backward`` ``"float"`` or ``"int8"``. A 1-bit ``"int"`` grid ``{-1, 0}`` has no
    positive level, which the default scale rules and the learned steps of LSQ and PACT need:
    1 bit takes the midrise grid (or, for ``quest`` and ``ste``, a ``scale_rule`` that copes,
    e.g. asymmetric absmax).
    """

    name: str
    weight_bits: int | None = 4
    act_bits: int | None = 4
    hadamard_block: int | None = None
    trust: float = 1.0
    clip_ratio: float | None = None
    hadamard_mode: str | None = "auto"
    grid: str = "auto"
    estimator: str = "auto"
    scale_rule: S.ScaleRule | str = "auto"
    integer_forward: bool = False
    weight_axis_name: str | tuple[str, ...] | None = None
    activation_axis_name: str | tuple[str, ...] | None = None
    backward: QB.Backward = "float"

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; allowed: {METHODS}")
        for name in ("weight_bits", "act_bits"):
            bits = getattr(self, name)
            if bits is not None:
                check_int(name, bits, 1, 8)
        if self.hadamard_mode not in quest.HADAMARD_MODES + ("auto",):
            raise ValueError(f"hadamard_mode must be one of {quest.HADAMARD_MODES + ('auto',)}, "
                             f"got {self.hadamard_mode!r}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if self.grid == "post" and self.name not in ("lsq", "ste"):
            raise ValueError(f"grid='post' (POST weights) is for methods lsq and ste, got "
                             f"{self.name!r}")
        if self.grid == "post" and self.weight_bits is not None and self.weight_bits < 2:
            raise ValueError(f"grid='post' needs weight_bits >= 2 (POST(1) has no level but "
                             f"0), got {self.weight_bits}")
        if self.name == "ofq" and self.grid != "auto":
            raise ValueError("grid of ofq must be 'auto' (StatsQ weights are midrise, the lsq "
                             f"activations int), got {self.grid!r}")
        allowed = {"quest": ("auto", "trust", "ste", "clipped_ste"),
                   "ste": ("auto", "ste", "clipped_ste")}.get(self.name, ("auto",))
        if self.estimator not in allowed:
            raise ValueError(f"estimator of {self.name} must be one of {allowed}, "
                             f"got {self.estimator!r}")
        if self.scale_rule != "auto":
            if self.name not in ("quest", "ste"):
                why = "StatsQ's" if self.name == "ofq" else "it learns its scales"
                raise ValueError(f"scale_rule of {self.name} must be 'auto' ({why}), "
                                 f"got {self.scale_rule!r}")
            S.as_scale_rule(self.scale_rule)  # fails early on a bad name
        if self.hadamard_block is not None:
            check_block_size(self.hadamard_block, "hadamard_block")
        check_real("trust", self.trust, 0.0, low_open=True)
        if self.clip_ratio is not None:
            check_real("clip_ratio", self.clip_ratio, 0.0, low_open=True)
        check_bool("integer_forward", self.integer_forward)
        check_axis_name("weight_axis_name", self.weight_axis_name)
        check_axis_name("activation_axis_name", self.activation_axis_name)
        _check_backward(self.backward, self.integer_forward)
        for name in ("weight_bits", "act_bits"):
            bits = getattr(self, name)
            if bits is None or self.scale_rule != "auto":
                continue
            # LSQ divides by sqrt(max_level), PACT's step is alpha / max_level, and the default
            # rules (RMS-Gaussian, symmetric absmax) need a positive level too.
            fmt = self._format(bits, name == "act_bits")
            if fmt.max_level <= 0:
                raise ValueError(
                    f"{self.name} cannot use {name}={bits} on the {fmt.name} grid (no positive "
                    f"level); allowed {name}: 2..8, or 1..8 with grid='midrise'")

    def _scale(self, default: S.ScaleRule) -> S.ScaleRule:
        return default if self.scale_rule == "auto" else S.as_scale_rule(self.scale_rule)

    def _format(self, bits: int, activation: bool) -> F.Format:
        if self.grid == "post":
            return F.IntFormat(bits) if activation else F.POST(bits)
        auto_midrise = self.name == "quest" or (self.name == "ofq" and not activation)
        midrise = self.grid == "midrise" or (self.grid == "auto" and auto_midrise)
        return F.Midrise(bits) if midrise else F.IntFormat(bits)

    def _block(self, layout: KernelLayout) -> int | None:
        """The Hadamard block for ``layout``, or None when there is no rotation."""
        hadamard = self.hadamard_mode
        if hadamard == "auto":
            hadamard = "half" if self.name == "quest" else None
        if hadamard is None or layout.kind == "embed":
            return None
        dim = layout.channels if layout.kind == "conv" else layout.k
        if self.hadamard_block is None:
            b = default_hadamard_block(dim)
            return None if b == 1 else b
        if dim % self.hadamard_block:
            what = "input channels" if layout.kind == "conv" else "K (contracted size)"
            raise ValueError(f"Hadamard block hadamard_block={self.hadamard_block} does not "
                             "divide the "
                             f"{what} {dim}; leave hadamard_block=None to pick the largest "
                             "power of "
                             f"two <= {MAX_AUTO_BLOCK} that divides it")
        return self.hadamard_block

    def layer_quant(self, layout: KernelLayout) -> LayerQuant:
        """Specs for one layer (see the module docstring for the axes they refer to)."""
        if not isinstance(layout, KernelLayout):
            raise TypeError(f"layout must be a qjax.nn.KernelLayout, got "
                            f"{type(layout).__name__}")
        embed, conv = layout.kind == "embed", layout.kind == "conv"
        wb, ab = self.weight_bits, None if embed else self.act_bits
        block = self._block(layout)
        mode = "half" if self.hadamard_mode == "auto" else self.hadamard_mode

        def make(bits, granularity, scale, estimator, axis, **extra):
            if bits is None:
                return None
            rot = {} if block is None else dict(
                hadamard_block=block, hadamard_axis=axis, hadamard_mode=mode)
            return SP.QuantSpec(self._format(bits, axis == -1), granularity, scale, estimator,
                                **rot, **extra)

        w_gran = G.PerRow(0)
        a_stat = G.PerAxis(0) if conv else G.PerRow(-1)  # per example / per token
        if self.name == "quest":
            est = {"ste": SP.STE(), "clipped_ste": SP.ClippedSTE()}.get(
                self.estimator, SP.Trust(self.trust, self.clip_ratio))
            rule = self._scale(S.RmsGaussian())
            w = make(wb, w_gran, rule, est, 0)
            a = make(ab, a_stat, rule, est, -1)
        elif self.name == "lsq":
            w = make(wb, w_gran, S.AbsMax(), SP.LSQ(), 0)
            a = make(ab, G.PerTensor(), S.AbsMax(), SP.LSQ(), -1)
        elif self.name == "ofq":  # StatsQ (qjax.methods.ofq.statsq_spec) + lsq activations
            w = make(wb, w_gran, S.MeanAbs(2.0), SP.STE(), 0, rounding="half_up")
            a = make(ab, G.PerTensor(), S.AbsMax(), SP.LSQ(), -1)
        elif self.name == "pact":
            w = make(wb, w_gran, S.AbsMax(), SP.ClippedSTE(), 0)
            a = make(ab, G.PerTensor(), S.AbsMax(), SP.PACT(), -1)
        else:  # ste
            est = SP.ClippedSTE() if self.estimator == "clipped_ste" else SP.STE()
            rule = self._scale(S.AbsMax())
            w = make(wb, w_gran, rule, est, 0)
            a = make(ab, a_stat, rule, est, -1)
        # Convolutions and layers with batch axes train with fake quantization (the same values).
        integer = self.integer_forward and layout.kind == "dense" and not layout.batch
        return LayerQuant(w, a, integer, self.weight_axis_name, self.activation_axis_name,
                          self.backward if integer else "float")


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


def _check_weight_axes(spec: SP.QuantSpec, layout: KernelLayout) -> None:
    g = spec.granularity
    along_k = {0, -2}
    if isinstance(g, (G.PerRow, G.PerGroup)) and g.axis not in along_k:
        raise ValueError(
            f"weight granularity {g} runs along N: weight specs refer to the kernel's (K, N) "
            f"matrix, so per output channel is PerRow(0) and groups along K are PerGroup(0, g) "
            "(for presets made for torch/GGUF (N, K) weights pass axis=0)")
    if isinstance(g, G.PerAxis) and g.axis not in (1, -1, (1,), (-1,)):
        raise ValueError(f"weight granularity {g}: PerAxis on the (K, N) matrix must keep N "
                         "(axis 1), e.g. PerRow(0)")
    if isinstance(g, G.PerGroup) and layout.k % g.size:
        raise ValueError(f"weight group size {g.size} does not divide K = {layout.k}")
    if spec.hadamard_block is not None:
        if spec.hadamard_axis not in along_k:
            raise ValueError(f"weight hadamard_axis={spec.hadamard_axis} is not K (axis 0 of "
                             "the (K, N) matrix)")
        dim = layout.channels if layout.kind == "conv" else layout.k
        if dim % spec.hadamard_block:
            raise ValueError(f"weight Hadamard block {spec.hadamard_block} does not divide {dim}")


def _check_activation_axes(spec: SP.QuantSpec, layout: KernelLayout) -> None:
    if spec.hadamard_block is None:
        return
    if spec.hadamard_axis != -1:
        raise ValueError(f"activation hadamard_axis={spec.hadamard_axis} is not the input's "
                         "last axis (-1)")
    dim = layout.channels if layout.kind == "conv" else layout.k
    if dim % spec.hadamard_block:
        raise ValueError(f"activation Hadamard block {spec.hadamard_block} does not divide {dim}")


def resolve(target: Target, layout: KernelLayout, path: str | None = None) -> LayerQuant:
    """The :class:`LayerQuant` of ``target`` for one layer, checked against its ``layout``.

    Raises:
      ValueError: naming ``path``, if a Method's Hadamard block does not divide the layer's K,
        a weight spec groups or rotates along N (e.g. a torch-layout preset with ``axis=-1``),
        a group or block does not divide K, or integer_forward is asked of a convolution or of
        a layer with batch axes.
    """
    t = as_target(target)
    try:
        if isinstance(t, Method):
            lq = t.layer_quant(layout)
        else:
            lq = t
            if lq.weight is not None:
                _check_weight_axes(lq.weight, layout)
            if lq.activation is not None:
                _check_activation_axes(lq.activation, layout)
        if lq.integer_forward and (layout.kind != "dense" or layout.batch):
            raise ValueError("integer_forward runs dense layers without batch axes (Dense, "
                             "DenseGeneral, Einsum)")
    except ValueError as e:
        if path is None:
            raise
        raise ValueError(f"layer {path!r}: {e}") from None
    return lq


def learned(spec: SP.QuantSpec | None) -> bool:
    """Whether ``spec`` needs a learned parameter (LSQ step or PACT clip)."""
    return spec is not None and isinstance(spec.estimator, SP.LEARNED_SCALE_ESTIMATORS)
