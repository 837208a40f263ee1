"""The pure quantizers: ``quantize``, ``dequantize`` and ``fake_quant``.

For ``x`` and a static :class:`~qjax.QuantSpec`:

1. ``x`` is cast to float32 and, if ``spec.hadamard_block`` is set, rotated by the block
   Walsh-Hadamard transform along ``spec.hadamard_axis``.
2. It is viewed in blocks (:mod:`qjax._src.granularity`); the scale rule (or a learned ``scale``)
gives
   one scale (and zero point) per block; no gradient flows into a computed scale.
3. Codes ``q = encode(x / scale)`` (round half to even, stochastic with ``key``, or the spec's
   integer rounding); values ``decode(q) * scale``, with the scale rounded to ``spec.scale_dtype``
   if set (the stored ``QArray.scale`` is that rounded scale).
4. ``hadamard_mode="full"`` rotates back; ``"half"`` leaves values rotated. The result is cast to
   the input dtype, saturating at its largest finite value (a clip of ``1.22 * RMS`` of float16
   values near 65504 lies beyond float16's range), so finite input gives finite output.

Empty input (a zero-size axis, e.g. ``(4, 0)`` or ``(0, 64)``) is valid for every granularity,
format, scale rule and preset: the result is empty, of ``x``'s shape and dtype, and a
:class:`~qjax.QArray` of it has empty codes and the scale (and zero point) of
:func:`scale_shape`, e.g. ``(4, 1)`` for ``(4, 0)`` per row. Every block then has no element, so no
statistic exists: the scale is the one the rule gives a block of one zero. A group size along an
empty axis means zero groups (``PerGroup(-1, 32)`` of ``(4, 0)`` has scale shape ``(4, 0, 1)``).
Arguments (spec, key, scale, axis_name) are validated as for non-empty input.

Contract (docs/design.md s. 3): ``fake_quant(x, spec) == dequantize(quantize(x, spec))`` bit for
bit, because both run the same float32 ops on the same codes; it holds under ``jit`` and in eager
mode alike. Across the two modes, XLA may fuse reductions and multiply-adds differently, so
statistics-based scales and a rotation back can differ in the last ulp. ``fake_quant``'s backward is
the spec's estimator.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qjax._src import estimators as E
from qjax._src import granularity as G
from qjax._src import scales as S
from qjax._src import typed_sharding
from qjax._src._checks import check_axis_name
from qjax._src.hadamard import hadamard_transform, saturating_cast
from qjax._src.qarray import QArray, codes_to_storage
from qjax._src.spec import LEARNED_SCALE_ESTIMATORS, QuantSpec, check_spec

__all__ = ["quantize", "dequantize", "fake_quant", "compute_scale", "scale_shape"]


def _check_x(x) -> jax.Array:
    if not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating array (float32, bfloat16, float16), got {x.dtype}")
    if jax.dtypes.canonicalize_dtype(x.dtype) == jnp.float64:
        # Only reachable with jax_enable_x64: without it JAX itself computes float64 as float32.
        raise TypeError("x is float64 with jax_enable_x64 on, but quantizers compute in float32 "
                        "(scales, rotation, rounding): cast x to float32 first")
    return x


def rotate_like_spec(x32: jax.Array, spec: QuantSpec, inverse: bool = False) -> jax.Array:
    """Rotates float32 ``x32`` by the spec's Hadamard transform (identity without one)."""
    if spec.hadamard_block is None:
        return x32
    # explicit_vjp: the quantizers around it are custom VJPs anyway (no forward-mode autodiff).
    return hadamard_transform(x32, spec.hadamard_block, axis=spec.hadamard_axis, inverse=inverse,
                              method=spec.hadamard_method, explicit_vjp=True)


def scale_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the scale (and of a learned LSQ step) for an input of ``shape``."""
    return G.layout(check_spec(spec).granularity, shape).scale_shape


def _prepare(x, spec: QuantSpec, axis_name=None):
    x = _check_x(x)
    spec = check_spec(spec)
    check_axis_name("axis_name", axis_name)
    xr = rotate_like_spec(x.astype(jnp.float32), spec)
    xb, lay = G.to_blocks(xr, spec.granularity)
    return x, xb, lay


def _rule_scale(xb, lay: G.Layout, spec: QuantSpec, dtype, axis_name):
    if axis_name is not None and not lay.reduce_axes:
        raise ValueError(f"axis_name={axis_name!r} given but {spec.granularity} reduces no axis")
    if xb.size == 0:
        # Empty x: no statistic exists, so every (possibly empty) block gets the scale the rule
        # gives a block of one zero, broadcast to the scale shape (module docstring).
        one = jnp.zeros(tuple(max(d, 1) for d in xb.shape), jnp.float32)
        s, z = spec.scale_rule.compute(one, lay.reduce_axes, spec.format, dtype,
                                       axis_name=axis_name)
        z = None if z is None else jnp.broadcast_to(z, lay.scale_shape)
        return jnp.broadcast_to(s, lay.scale_shape), z
    return spec.scale_rule.compute(xb, lay.reduce_axes, spec.format, dtype, axis_name=axis_name)


def _scale_and_zero(xb, lay: G.Layout, spec: QuantSpec, scale, dtype, axis_name=None):
    if scale is not None:
        E.check_static_scale("scale", scale)
        s = jnp.asarray(scale, jnp.float32)
        try:
            s = jnp.broadcast_to(s, lay.scale_shape)
        except ValueError:
            raise ValueError(
                f"scale of shape {s.shape} does not broadcast to the scale shape "
                f"{lay.scale_shape} of {spec.granularity}"
            ) from None
        return s, None
    if isinstance(spec.estimator, LEARNED_SCALE_ESTIMATORS):
        name = type(spec.estimator).__name__
        raise ValueError(f"the {name} estimator learns its scale: pass scale=<learned scale>")
    s, z = _rule_scale(jax.lax.stop_gradient(xb), lay, spec, dtype, axis_name)
    return jax.lax.stop_gradient(s), (None if z is None else jax.lax.stop_gradient(z))


def _noise(xb, spec: QuantSpec, key):
    if spec.rounding != "stochastic":
        return None
    if key is None:
        raise ValueError("stochastic rounding needs a PRNG key: pass key=")
    return jax.random.uniform(key, xb.shape, jnp.float32)


def compute_scale(x: jax.Array, spec: QuantSpec, *,
                  axis_name: str | tuple[str, ...] | None = None
                  ) -> tuple[jax.Array, jax.Array | None]:
    """The scale (and zero point) the spec's rule picks for ``x`` (float32, blocked shape).

    Useful to initialise a learned step (LSQ) from a data-driven rule. ``axis_name``: see
    :func:`fake_quant`.
    """
    x, xb, lay = _prepare(x, spec, axis_name)
    return _rule_scale(xb, lay, spec, x.dtype, axis_name)


def fake_quant(
    x: jax.Array,
    spec: QuantSpec,
    *,
    key: jax.Array | None = None,
    scale: jax.Array | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """Quantize-dequantize ``x`` with ``spec``; differentiable through the spec's estimator.

    Args:
      x: floating array (float32, bfloat16 or float16) of any shape.
      spec: static :class:`~qjax.QuantSpec`.
      key: PRNG key, required when ``spec.rounding == "stochastic"``.
      scale: a learned parameter, required for the LSQ estimator (the step) and the PACT
        estimator (the clipping level alpha), broadcastable to :func:`scale_shape`; for other
        estimators, a fixed scale that replaces the spec's rule. A Python number must be
        positive and finite (arrays are not inspected).
      axis_name: inside ``shard_map``, the mesh axis (or axes) that splits the axes the scale
        reduces over (per-token scales of activations whose features are sharded, as in a
        row-parallel layer): the scale rule combines its statistic across shards (``pmax``,
        ``psum``), so the result equals the unsharded one. A Hadamard block must fit in the
        local shard.

    Returns:
      Array of ``x.shape`` and ``x.dtype`` (values beyond the dtype's range saturate).
    """
    x, xb, lay = _prepare(x, spec, axis_name)
    s, z = _scale_and_zero(xb, lay, spec, scale, x.dtype, axis_name)
    if isinstance(spec.estimator, LEARNED_SCALE_ESTIMATORS):
        n = getattr(spec.estimator, "grad_scale_n", None)
        if n is None:
            n = lay.block_elements * (math.prod(lay.scale_shape) // max(1, jnp.size(scale)))
            if axis_name is not None:  # the step is shared across the shards too
                n *= math.prod(jax.lax.axis_size(a) for a in typed_sharding.axis_names(axis_name))
            n = max(1, n)  # empty x: no element feeds the step's gradient, which is 0 anyway
        yb = E.learned_scale_quant(xb, s, spec.format, spec.estimator, n=n)
    else:
        yb = E.quantize_dequantize(
            xb, s, z, fmt=spec.format, estimator=spec.estimator, noise=_noise(xb, spec, key),
            rounding=spec.rounding, scale_dtype=spec.scale_dtype,
        )
    y = lay.unblock(yb, like=x)
    if spec.hadamard_mode == "full":
        y = rotate_like_spec(y, spec, inverse=True)
    return saturating_cast(y, x.dtype)


def quantize(
    x: jax.Array,
    spec: QuantSpec,
    *,
    key: jax.Array | None = None,
    scale: jax.Array | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> QArray:
    """Quantizes ``x`` to a :class:`~qjax.QArray` (codes packed as :mod:`qjax._src.qarray`
        describes).

    Arguments as :func:`fake_quant`. With Hadamard, the codes are of the rotated ``x``.
    """
    x, xb, lay = _prepare(x, spec, axis_name)
    s, z = _scale_and_zero(xb, lay, spec, scale, x.dtype, axis_name)
    q = E.encode(xb, s, z, spec.format, _noise(xb, spec, key), spec.rounding)
    q = lay.unblock(q).reshape(lay.shape or (1,))
    return QArray(
        codes=codes_to_storage(q, spec.format),
        scale=S.store_scale(s, spec.scale_dtype),
        zero_point=None if z is None else z.astype(jnp.int32),
        spec=spec,
        shape=lay.shape,
        dtype=jnp.dtype(x.dtype).name,
    )


def dequantize(qa: QArray) -> jax.Array:
    """Values of a :class:`~qjax.QArray`: ``decode(codes) * scale``, rotated back in full mode.

    Returns:
      Array of ``qa.shape`` and ``qa.dtype`` (saturating as :func:`fake_quant` does).
    """
    if not isinstance(qa, QArray):
        raise TypeError(f"qa must be a qjax.QArray, got {type(qa).__name__}")
    spec = qa.spec
    lay = G.layout(spec.granularity, qa.shape)
    q = lay.block(qa.codes_float32())
    z = None if qa.zero_point is None else qa.zero_point.astype(jnp.float32)
    y = lay.unblock(E.decode(q, qa.scale, z, spec.format))
    if spec.hadamard_mode == "full":
        y = rotate_like_spec(y, spec, inverse=True)
    return saturating_cast(y, qa.dtype)
