"""Implementation of :mod:`qjax.nn.lowrank` (documented there)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from qjax._src import estimators as E
from qjax._src import formats as F
from qjax._src import granularity as G
from qjax._src import scales as S
from qjax._src import spec as SP
from qjax._src._checks import check_pos_int, check_real
from qjax._src.nn.layout import KernelLayout
from qjax._src.nn.recipe import LayerQuant, resolve
from qjax._src.qarray import QArray, codes_to_storage
from qjax._src.quantize import compute_scale, fake_quant

__all__ = ["LowRankQAT", "lr_qat", "qalora", "FROZEN", "init_state", "effective_kernel",
           "float_kernel", "merged_codes", "PHI_DTYPES"]

#: Linen variable collection of the frozen tensors (``phi0`` / ``w0``).
FROZEN = "qjax_frozen"
PHI_DTYPES = ("float32", "bfloat16", "int8")


@dataclasses.dataclass(frozen=True)
class LowRankQAT:
    """A low-rank QAT recipe: a rule target for :func:`qjax.nn.quantize_model`.

    Attributes:
      kind: ``"lr_qat"`` or ``"qalora"`` (see the module docstring).
      weight: the weight spec (matrix view ``(K, N)``): a symmetric signed-integer grid, per
        output channel (``PerRow(0)``), per group along K (``PerGroup(0, g)``) or per tensor,
        presets included (``presets.gguf_q4_0(axis=0)``); no Hadamard, no stochastic rounding.
      activation: the activation spec, or None (weight-only).
      rank: ``r``, at most ``min(K, N)`` of each layer.
      alpha: the adapter scale numerator (default ``rank``: ``alpha / r = 1``).
      phi_dtype: LR-QAT's storage of ``Phi0``: ``"float32"``, ``"bfloat16"`` or ``"int8"``.
    """

    kind: Literal["lr_qat", "qalora"]
    weight: SP.QuantSpec
    activation: SP.QuantSpec | None = None
    rank: int = 8
    alpha: float | None = None
    phi_dtype: Literal["float32", "bfloat16", "int8"] = "float32"

    def __post_init__(self):
        if self.kind not in ("lr_qat", "qalora"):
            raise ValueError(f"kind must be 'lr_qat' or 'qalora', got {self.kind!r}")
        SP.check_spec(self.weight, "weight")
        SP.check_spec(self.activation, "activation", optional=True)
        check_pos_int("rank", self.rank)
        if self.alpha is not None:
            check_real("alpha", self.alpha, 0.0, low_open=True)
        if self.phi_dtype not in PHI_DTYPES:
            raise ValueError(f"phi_dtype must be one of {PHI_DTYPES}, got {self.phi_dtype!r}")
        if self.kind == "qalora" and self.phi_dtype != "float32":
            raise ValueError("phi_dtype applies to lr_qat; QALoRA keeps the dequantized weight")
        w, fmt = self.weight, self.weight.format
        reason = None
        if not (isinstance(fmt, F.IntFormat) and fmt.signed):
            reason = f"format {fmt.name} (a signed integer grid is needed)"
        elif w.hadamard_block is not None:
            reason = "a Hadamard rotation"
        elif w.rounding == "stochastic":
            reason = "stochastic rounding"
        elif isinstance(w.estimator, SP.LEARNED_SCALE_ESTIMATORS):
            reason = "a learned-scale estimator (the recipe learns its own scale)"
        elif isinstance(w.scale_rule, S.AbsMax) and not w.scale_rule.symmetric or isinstance(
                w.scale_rule, S.TorchAOAffine) and not w.scale_rule.symmetric:
            reason = "a zero point"
        if reason:
            raise ValueError(f"{self.kind} cannot use a weight spec with {reason}")
        if self.kind == "qalora" and (w.rounding != "nearest" or w.scale_dtype is not None):
            raise ValueError("qalora learns an LSQ step, which needs nearest rounding and float32 "
                             f"scales (got rounding={w.rounding!r}, scale_dtype="
                             f"{w.scale_dtype!r}); presets such as gguf_q4_0 train with lr_qat")
        if self.kind == "lr_qat" and self.phi_dtype == "int8" and fmt.bits > 7:
            raise ValueError("phi_dtype='int8' stores Phi0 with 8 - b fractional bits: b <= 7")

    @property
    def scaling(self) -> float:
        """``alpha / r``."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def training_spec(self) -> SP.QuantSpec:
        """The weight spec of the trained forward (QALoRA: the spec with a learned LSQ step)."""
        if self.kind == "qalora":
            return self.weight.replace(estimator=SP.LSQ())
        return self.weight

    def layer_quant(self, layout: KernelLayout, path: str | None = None) -> LayerQuant:
        """The layer's :class:`~qjax.nn.LayerQuant` (its specs), checked against ``layout``."""
        name = f"layer {path!r}: " if path is not None else ""
        if layout.kind == "embed" or layout.batch:
            raise ValueError(f"{name}{self.kind} needs a dense or conv layer without batch axes")
        if self.rank > min(layout.k, layout.n):
            raise ValueError(f"{name}rank {self.rank} is larger than the layer's min(K, N) = "
                             f"{min(layout.k, layout.n)}")
        return resolve(LayerQuant(self.training_spec, self.activation), layout, path)


def lr_qat(weight: SP.QuantSpec, activation: SP.QuantSpec | None = None, *, rank: int = 8,
           alpha: float | None = None, phi_dtype: str = "float32") -> LowRankQAT:
    """An LR-QAT recipe (see :class:`LowRankQAT`)."""
    return LowRankQAT("lr_qat", weight, activation, rank, alpha, phi_dtype)


def qalora(weight: SP.QuantSpec, activation: SP.QuantSpec | None = None, *, rank: int = 8,
           alpha: float | None = None) -> LowRankQAT:
    """A QALoRA (EfficientDM) recipe (see :class:`LowRankQAT`)."""
    return LowRankQAT("qalora", weight, activation, rank, alpha)


def _blocked(spec: SP.QuantSpec, shape):
    return G.layout(spec.granularity, tuple(shape))


def _phi_scale(fmt: F.IntFormat) -> float:
    return float(2 ** (8 - fmt.bits))


def init_state(w0: jax.Array, recipe: LowRankQAT, key: jax.Array) -> tuple[dict, dict]:
    """(frozen, trainable) tensors for one pretrained kernel matrix ``w0 (K, N)``.

    frozen: ``{"phi0"}`` (LR-QAT, in ``phi_dtype``) or ``{"w0"}`` (QALoRA, ``w0``'s dtype);
    trainable: ``lora_down (K, r)``, ``lora_up (r, N)`` (zeros), both in ``w0``'s dtype, and
    ``kernel_scale`` (``s0``, blocked scale shape, float32).
    """
    spec, fmt = recipe.weight, recipe.weight.format
    k, n = w0.shape
    s0, _ = compute_scale(w0, spec)
    lay = _blocked(spec, w0.shape)
    if recipe.kind == "lr_qat":
        phi = lay.unblock(lay.block(w0.astype(jnp.float32)) * (1.0 / s0))
        if recipe.phi_dtype == "int8":
            q = jnp.round(jnp.clip(phi, fmt.qmin, fmt.qmax) * _phi_scale(fmt))
            frozen = {"phi0": jnp.clip(q, -128, 127).astype(jnp.int8)}
        else:
            frozen = {"phi0": phi.astype(recipe.phi_dtype)}
    else:
        frozen = {"w0": fake_quant(w0, spec.replace(estimator=SP.STE()))}
    # The adapters take the kernel's dtype (the layer's param_dtype), which also tells convert
    # the dtype of the merged weights.
    dtype = w0.dtype
    down = (jax.random.normal(key, (k, recipe.rank), jnp.float32) / math.sqrt(k)).astype(dtype)
    trainable = {"lora_down": down, "lora_up": jnp.zeros((recipe.rank, n), dtype),
                 "kernel_scale": s0}
    return frozen, trainable


def _phi(frozen: dict, recipe: LowRankQAT) -> jax.Array:
    phi = jax.lax.stop_gradient(frozen["phi0"])
    if recipe.phi_dtype == "int8":
        return phi.astype(jnp.float32) * (1.0 / _phi_scale(recipe.weight.format))
    return phi.astype(jnp.float32)


def _delta(params: dict, recipe: LowRankQAT) -> jax.Array:
    return recipe.scaling * (params["lora_down"].astype(jnp.float32)
                             @ params["lora_up"].astype(jnp.float32))


def _codes_ste(c: jax.Array, spec: SP.QuantSpec) -> jax.Array:
    """``clip(round(c))`` with the spec's rounding; gradient 1 inside the grid, 0 outside."""
    fmt = spec.format
    clipped = jnp.clip(c, fmt.qmin, fmt.qmax)
    q = E.encode(c, 1.0, None, fmt, rounding=spec.rounding)
    return clipped + jax.lax.stop_gradient(q - clipped)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _stored_scale(s: jax.Array, scale_dtype: str | None) -> jax.Array:
    """The scale as the merged weight stores it (``scale_dtype``); gradient straight through."""
    return S.store_scale(s.astype(jnp.float32), scale_dtype)


@_stored_scale.defjvp
def _stored_scale_jvp(scale_dtype, primals, tangents):
    (s,), (t,) = primals, tangents
    return _stored_scale(s, scale_dtype), t.astype(jnp.float32)


def effective_kernel(frozen: dict, params: dict, recipe: LowRankQAT, dtype) -> jax.Array:
    """``W_hat (K, N)`` of the trained forward, in ``dtype`` (see the module docstring)."""
    spec = recipe.weight
    if recipe.kind == "qalora":
        w = jax.lax.stop_gradient(frozen["w0"]).astype(jnp.float32) + _delta(params, recipe)
        return fake_quant(w, recipe.training_spec, scale=params["kernel_scale"]).astype(dtype)
    w_int = _codes_ste(_phi(frozen, recipe) + _delta(params, recipe), spec)
    lay = _blocked(spec, w_int.shape)
    w = lay.unblock(lay.block(w_int) * _stored_scale(params["kernel_scale"], spec.scale_dtype))
    return w.astype(dtype)


def float_kernel(frozen: dict, params: dict, recipe: LowRankQAT, dtype) -> jax.Array:
    """The unquantized kernel of the same parameters (``qat=False``): ``s (Phi0 + delta)`` for
    LR-QAT, ``W0' + delta`` for QALoRA."""
    if recipe.kind == "qalora":
        return (frozen["w0"].astype(jnp.float32) + _delta(params, recipe)).astype(dtype)
    c = _phi(frozen, recipe) + _delta(params, recipe)
    lay = _blocked(recipe.weight, c.shape)
    s = params["kernel_scale"].astype(jnp.float32)
    return lay.unblock(lay.block(c) * s).astype(dtype)


def merged_codes(frozen: dict, params: dict, recipe: LowRankQAT, dtype) -> QArray:
    """LR-QAT merged for deployment: a training-layout QArray ``(K, N)`` with the codes
    ``W_int`` and the stored scale ``s`` (dequantizes to :func:`effective_kernel` bit for bit)."""
    spec = recipe.weight
    w_int = E.encode(_phi(frozen, recipe) + _delta(params, recipe), 1.0, None, spec.format,
                     rounding=spec.rounding)
    scale = S.store_scale(params["kernel_scale"].astype(jnp.float32), spec.scale_dtype)
    return QArray(codes=codes_to_storage(w_int, spec.format), scale=scale, zero_point=None,
                  spec=spec, shape=tuple(w_int.shape), dtype=jnp.dtype(dtype).name)
