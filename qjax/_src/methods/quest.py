"""Implementation of :mod:`qjax.methods.quest` (documented there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax._src import formats as F
from qjax._src import granularity as G
from qjax._src import scales as S
from qjax._src import spec as SP
from qjax._src.hadamard import (
    HadamardMethod,
    check_block_size,
    hadamard_transform,
    saturating_cast,
)
from qjax._src.quantize import fake_quant as core_fake_quant

__all__ = ["spec", "fake_quant", "quantize_dense_operands", "dense", "HADAMARD_MODES"]

# The rotation of a QuEST operand: a QuantSpec's hadamard_mode, or None for no rotation.
HADAMARD_MODES = (*SP.HADAMARD_MODES, None)


def _check_hadamard(hadamard_mode: object, hadamard_block: object) -> None:
    # Both always, also where they end up unused (hadamard_mode=None ignores hadamard_block,
    # bits=None skips the quantizer that would check them): a typo must not silently change the
    # layer.
    if hadamard_mode not in HADAMARD_MODES:
        raise ValueError(f"hadamard_mode must be one of {HADAMARD_MODES}, got {hadamard_mode!r}")
    check_block_size(hadamard_block, "hadamard_block")


def spec(
    bits: int,
    *,
    hadamard_mode: str | None = "half",
    trust: float = 1.0,
    clip_ratio: float | None = None,
    hadamard_block: int = 128,
    axis: int = -1,
    hadamard_method: HadamardMethod = "kronecker",
    scale_rule: S.ScaleRule | str | None = None,
) -> SP.QuantSpec:
    """The :class:`~qjax.QuantSpec` of QuEST at ``bits`` for rows along ``axis``.

    Args:
      bits: 1 to 8.
      hadamard_mode: ``"half"``, ``"full"`` or None.
      trust: trust multiplier ``m`` (1.0 = half a step, the paper's default).
      clip_ratio: if set, the clip mask ``1[|x| <= clip_ratio * c]`` replaces the trust mask
        (W1A1: 1.3).
      hadamard_block: Hadamard block (power of two dividing the row length).
      axis: the row (contraction) axis: quantization statistics and rotation run along it.
      hadamard_method: ``"kronecker"`` (default: a 32-wide dense matmul and signed sums, fastest
        on CPU), ``"matmul"`` (dense block matmul) or ``"butterfly"`` (O(n log n)); the same
        rotation to float rounding, see :func:`qjax.hadamard_transform`.
      scale_rule: None (QuEST: :class:`~qjax.RmsGaussian`, the MSE-optimal clip for Gaussian
        rows) or
        another rule or rule name (see :func:`qjax._src.scales.as_scale_rule`), e.g.
        ``"mse:8:0.6"``:
        the clip with least squared error on the row itself, for rows that are not Gaussian.
    """
    _check_hadamard(hadamard_mode, hadamard_block)
    return SP.QuantSpec(
        format=F.Midrise(bits),
        granularity=G.PerRow(axis),
        scale_rule=S.RmsGaussian() if scale_rule is None else S.as_scale_rule(scale_rule),
        estimator=SP.Trust(multiplier=trust, clip_ratio=clip_ratio),
        hadamard_block=None if hadamard_mode is None else hadamard_block,
        hadamard_axis=axis,
        hadamard_mode="full" if hadamard_mode is None else hadamard_mode,
        hadamard_method=hadamard_method,
    )


def fake_quant(
    x: jax.Array,
    bits: int,
    hadamard_mode: str | None = "half",
    trust: float = 1.0,
    clip_ratio: float | None = None,
    *,
    hadamard_block: int = 128,
    axis: int = -1,
    hadamard_method: HadamardMethod = "kronecker",
    scale_rule: S.ScaleRule | str | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """QuEST fake quantization of ``x`` along ``axis`` (same shape and dtype as ``x``).

    With ``hadamard_mode="half"`` the result is in the rotated basis. See :func:`spec`. Inside
    ``shard_map``, ``axis_name`` names the mesh axis that splits ``axis``: the RMS is then the
    global one (see :func:`qjax.fake_quant`).
    """
    s = spec(bits, hadamard_mode=hadamard_mode, trust=trust, clip_ratio=clip_ratio,
             hadamard_block=hadamard_block, axis=axis, hadamard_method=hadamard_method,
             scale_rule=scale_rule)
    return core_fake_quant(x, s, axis_name=axis_name)


def quantize_dense_operands(
    x: jax.Array,
    kernel: jax.Array,
    *,
    bits_x: int | None,
    bits_w: int | None,
    hadamard_mode: str | None = "half",
    trust: float = 1.0,
    clip_ratio: float | None = None,
    hadamard_block: int = 128,
    hadamard_method: HadamardMethod = "kronecker",
    scale_rule: S.ScaleRule | str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Fake-quantized operands of ``x @ kernel`` (Flax layout: ``x (..., K)``, ``kernel (K, N)``).

    Activations are quantized per token along K, the kernel per output column along K (axis 0);
    both are rotated along K. ``bits_x=None`` (or ``bits_w=None``) leaves that operand in high
    precision (rotated in the half form so the product is unchanged, and cast back to its dtype
    saturating at the dtype's largest finite value, as :func:`qjax.fake_quant` does).
    """
    _check_hadamard(hadamard_mode, hadamard_block)
    if kernel.ndim != 2:
        raise ValueError(f"kernel must have shape (K, N), got {kernel.shape}")
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"x's last axis ({x.shape[-1]}) must equal kernel's first axis ({kernel.shape[0]})"
        )

    def one(a, bits, axis):
        if bits is not None:
            return fake_quant(a, bits, hadamard_mode, trust, clip_ratio,
                              hadamard_block=hadamard_block, axis=axis,
                              hadamard_method=hadamard_method, scale_rule=scale_rule)
        if hadamard_mode == "half":
            rotated = hadamard_transform(a, hadamard_block, axis=axis, method=hadamard_method)
            return saturating_cast(rotated, a.dtype)  # as fake_quant: finite stays finite
        return a

    return one(x, bits_x, -1), one(kernel, bits_w, 0)


def dense(x: jax.Array, kernel: jax.Array, *, precision=None, **operands) -> jax.Array:
    """QuEST linear layer ``Q(x H) @ Q(W H)^T`` with ``kernel = W^T`` of shape ``(K, N)``.

    ``operands`` are the keyword arguments of :func:`quantize_dense_operands` (``bits_x``,
    ``bits_w``, ``hadamard_mode``, ``trust``, ``clip_ratio``, ``hadamard_block``,
    ``hadamard_method``, ``scale_rule``).
    """
    xq, wq = quantize_dense_operands(x, kernel, **operands)
    return jnp.matmul(xq, wq, precision=precision)
