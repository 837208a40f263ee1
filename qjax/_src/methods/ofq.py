"""Implementation of :mod:`qjax.methods.ofq` (documented there)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qjax._src import formats as F
from qjax._src import granularity as G
from qjax._src import scales as S
from qjax._src._checks import check_floating, check_int, check_real
from qjax._src.formats import check_bits
from qjax._src.methods import oscillation as osc
from qjax._src.optim import weight_decay_mask
from qjax._src.quantize import fake_quant
from qjax._src.spec import STE, QuantSpec

__all__ = [
    "BOUNDARIES",
    "DEFAULT_GRANULARITY",
    "statsq",
    "statsq_spec",
    "statsq_step",
    "statsq_codes",
    "boundary_distance",
    "cga_trainable",
    "confidence_guided_annealing",
    "CGAState",
    "track_oscillations",
    "TrackOscillationsState",
]

Boundaries = Literal["interior", "with_edges"]
BOUNDARIES = ("interior", "with_edges")
# Per output channel of every dense kernel (..., K, N), stacked or not: the statistic runs over K.
DEFAULT_GRANULARITY = G.PerRow(-2)
Mask = Any  # a pytree of bools like params (or a prefix), or a callable params -> such a pytree


class _Parts(NamedTuple):
    codes: jax.Array  # float32 integer codes, blocked
    step: jax.Array  # float32 step, the layout's scale shape
    latent: jax.Array  # float32 W / step, blocked
    layout: G.Layout


def _check(w: object, bits: object, granularity: object) -> tuple[int, G.Granularity]:
    check_floating(w, "w")
    return check_bits(bits), G.as_granularity(granularity)


def _parts(w: jax.Array, bits: int, granularity: G.Granularity) -> _Parts:
    """The StatsQ decomposition of ``w`` (validated arguments), all float32, no gradient."""
    wb, lay = G.to_blocks(jax.lax.stop_gradient(w).astype(jnp.float32), granularity)
    grid = F.Midrise(bits)
    # The core's rule and rounding (QuantSpec(Midrise(b), scale_rule=MeanAbs(2),
    # rounding="half_up")), kept unclamped here so that an all-zero block gives exact zeros.
    step = S.MeanAbs(2.0).step(wb, lay.reduce_axes, grid)
    latent = wb * (1.0 / S.clamp_scale(step))
    codes = grid.encode(latent, rounding="half_up")
    return _Parts(codes, step, latent, lay)


def statsq_spec(bits: int, granularity: G.Granularity | str = DEFAULT_GRANULARITY
                ) -> QuantSpec:
    """StatsQ as a :class:`qjax.QuantSpec`: ``Midrise(bits)``, :class:`qjax.MeanAbs` ``(2)``,
    identity STE, ``rounding="half_up"`` (``floor``). :func:`statsq` is ``fake_quant`` with it;
    the spec also serves in ``quantize``, ``quantize_model`` (``Method("ofq")``) and ``convert``.

    Raises:
      TypeError/ValueError: ``bits`` not an int in [1, 8], a bad granularity.
    """
    return QuantSpec(F.Midrise(check_bits(bits)), G.as_granularity(granularity),
                     S.MeanAbs(2.0), STE(), rounding="half_up")




def statsq(w: jax.Array, bits: int, *,
           granularity: G.Granularity | str = DEFAULT_GRANULARITY) -> jax.Array:
    """StatsQ fake quantization: ``(clip(floor(W n / s), -n, n-1) + 1/2) * s / n``.

    ``s = 2 mean|W|`` per block (no gradient), ``n = 2^(bits-1)``; backward ``dW = g``.

    Args:
      w: floating array (float32, bfloat16, float16), e.g. a kernel ``(..., K, N)``.
      bits: 1 to 8 (1 bit: ``+-mean|W|``).
      granularity: which elements share ``s``; default ``PerRow(-2)``, per output channel of a
        kernel ``(..., K, N)`` (use ``PerAxis(-1)`` for a convolution ``(*window, C, F)``).

    Returns:
      Array of ``w.shape`` and ``w.dtype``.

    Raises:
      TypeError/ValueError: non-floating ``w``, ``bits`` not an int in [1, 8], a bad
        granularity or one that does not fit ``w``'s shape.

    References:
      Liu et al., 2023. Oscillation-free Quantization for Low-bit Vision Transformers.
    """
    bits, granularity = _check(w, bits, granularity)
    return fake_quant(w, statsq_spec(bits, granularity))


def statsq_step(w: jax.Array, bits: int, *,
                granularity: G.Granularity | str = DEFAULT_GRANULARITY) -> jax.Array:
    """The StatsQ grid step ``2 mean|W| / 2^(bits-1)`` (float32, the granularity's scale shape,
    e.g. ``(1, N)`` for a kernel ``(K, N)``). Arguments as :func:`statsq`."""
    bits, granularity = _check(w, bits, granularity)
    return _parts(w, bits, granularity).step


def statsq_codes(w: jax.Array, bits: int, *,
                 granularity: G.Granularity | str = DEFAULT_GRANULARITY) -> jax.Array:
    """The StatsQ codes ``clip(floor(W n / s), -n, n - 1)`` (int32, ``w.shape``); the value of
    code ``q`` is ``(q + 1/2) * step``. Arguments as :func:`statsq`."""
    bits, granularity = _check(w, bits, granularity)
    p = _parts(w, bits, granularity)
    return p.layout.unblock(p.codes).astype(jnp.int32)


def _check_boundaries(boundaries: object) -> str:
    if boundaries not in BOUNDARIES:
        raise ValueError(f"boundaries must be one of {BOUNDARIES}, got {boundaries!r}")
    return boundaries


def _distance(p: _Parts, bits: int, boundaries: str) -> jax.Array:
    n = 2 ** (bits - 1)
    c = jnp.clip(p.latent, -n, n)
    nearest = jnp.round(c)
    if boundaries == "interior":
        nearest = jnp.clip(nearest, -n + 1, n - 1)
    return jnp.abs(c - nearest)


def boundary_distance(w: jax.Array, bits: int, *,
                      granularity: G.Granularity | str = DEFAULT_GRANULARITY,
                      boundaries: Boundaries = "interior") -> jax.Array:
    """Distance, in steps, of ``clip(W n / s, -n, n)`` to the nearest StatsQ boundary.

    Boundaries are the integers ``-n + 1 .. n - 1`` (``"interior"``: the rounding thresholds)
    or ``-n .. n`` (``"with_edges"``: also the clip edges). Float32, ``w.shape``, in
    ``[0, 1/2]``; with interior boundaries up to 1 beyond ``+-(n - 1)`` (1 for clipped weights).
    Other arguments as :func:`statsq`.
    """
    bits, granularity = _check(w, bits, granularity)
    boundaries = _check_boundaries(boundaries)
    p = _parts(w, bits, granularity)
    return p.layout.unblock(_distance(p, bits, boundaries))


def _check_range(boundary_range: object) -> float:
    return check_real("boundary_range", boundary_range, 0.0, 0.5, low_open=True, high_open=True)


def cga_trainable(w: jax.Array, bits: int, boundary_range: float, *,
                  granularity: G.Granularity | str = DEFAULT_GRANULARITY,
                  boundaries: Boundaries = "interior") -> jax.Array:
    """CGA's mask: True (keeps training) where :func:`boundary_distance` ``<= boundary_range``.

    Args:
      boundary_range: ``BR`` in steps, in (0, 0.5) (the paper uses 0.003 to 0.01).
      Others as :func:`boundary_distance`.

    Returns:
      bool, ``w.shape``.
    """
    boundary_range = _check_range(boundary_range)
    return boundary_distance(w, bits, granularity=granularity,
                             boundaries=boundaries) <= boundary_range


def _check_mask(mask: object) -> None:
    if mask is None:
        raise TypeError("mask must be a pytree of bools like params (True: apply), a prefix of "
                        "it such as True, or a callable params -> such a pytree; got None")


def _zero_where(keep: jax.Array, u: jax.Array) -> jax.Array:
    return jnp.where(keep, u, jnp.zeros_like(u))


def _need_params(params, who: str) -> None:
    if params is None:
        raise ValueError(f"{who} computes its mask from the params: call "
                         "update(updates, state, params) with params (optax.chain passes them "
                         "on when the caller does)")


class CGAState(NamedTuple):
    """State of :func:`confidence_guided_annealing`: the number of updates so far."""

    count: jax.Array  # int32 scalar


def confidence_guided_annealing(
    boundary_range: float,
    bits: int,
    *,
    granularity: G.Granularity | str = DEFAULT_GRANULARITY,
    boundaries: Boundaries = "interior",
    mask: Mask = weight_decay_mask,
    start_step: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """CGA as an Optax transform: updates of confident weights are set to exactly 0.

    ``update(updates, state, params)`` returns ``where(cga_trainable(params), updates, 0)`` on
    the leaves ``mask`` selects (others pass unchanged); the mask comes from the params of this
    call. From update ``start_step`` on (counted from 0; the state is the count): before it,
    updates pass unchanged, so CGA can anneal only the end of a run. Place it last in the chain
    so that weight decay and momentum are zeroed too and frozen entries stay bit-identical (see
    the module docstring).

    Args:
      boundary_range: ``BR`` in steps, in (0, 0.5).
      bits: 1 to 8, the StatsQ bit width the params are quantized with.
      granularity: as :func:`statsq` (must fit every selected leaf).
      boundaries: ``"interior"`` (the paper's code) or ``"with_edges"``, see
        :func:`boundary_distance`.
      mask: the leaves to anneal, as for ``optax.masked``: a pytree of bools (or a prefix, e.g.
        ``True`` for all) or a callable of the params; default
        :func:`qjax.optim.weight_decay_mask` (matrices: rank >= 2, not biases, norm scales or
        quantizer parameters).
      start_step: the first update (0-based) that anneals; an int >= 0.

    Raises:
      TypeError/ValueError: at construction for bad hyper-parameters; at ``update`` when
        ``params`` is None.
    """
    start_step = check_int("start_step", start_step, lo=0)
    boundary_range = _check_range(boundary_range)
    bits = check_bits(bits)
    granularity = G.as_granularity(granularity)
    boundaries = _check_boundaries(boundaries)
    _check_mask(mask)

    def update(updates, state, params=None):
        _need_params(params, "confidence_guided_annealing")
        before = state.count < start_step

        def one(u, p):
            check_floating(p, "a masked params leaf")
            # Before start_step nothing is frozen: skip the StatsQ pass over the weights.
            keep = jax.lax.cond(
                before, lambda p: jnp.ones(p.shape, bool),
                lambda p: cga_trainable(p, bits, boundary_range, granularity=granularity,
                                        boundaries=boundaries), p)
            return _zero_where(keep, u)

        return jax.tree.map(one, updates, params), CGAState(optax.safe_increment(state.count))

    inner = optax.GradientTransformation(lambda params: CGAState(jnp.zeros((), jnp.int32)),
                                         update)
    return optax.masked(inner, mask)



class TrackOscillationsState(NamedTuple):
    """State of :func:`track_oscillations`: an :class:`~qjax.methods.oscillation.OscillationState`
    per selected leaf (``optax.MaskedNode`` elsewhere)."""

    tracker: Any


def track_oscillations(
    bits: int,
    *,
    momentum: float = 0.01,
    freeze_threshold: float | None = None,
    granularity: G.Granularity | str = DEFAULT_GRANULARITY,
    mask: Mask = weight_decay_mask,
) -> optax.GradientTransformationExtraArgs:
    """Tracks the StatsQ codes of the params each step; optionally freezes oscillating weights.

    ``update(updates, state, params)`` feeds :func:`statsq_codes` of ``params`` (the codes the
    forward of this step used) to :func:`qjax.methods.oscillation.update`. Without
    ``freeze_threshold`` the updates pass unchanged (a pure metric:
    ``oscillation.oscillation_ratio(opt_state)``). With it, a frozen weight's update becomes
    ``(frozen_code + 1/2) * step - W``, which holds its latent value at the centre of its frozen
    bin (Nagel et al. freeze the integer code); place it last in the chain.

    Args:
      bits: 1 to 8, the StatsQ bit width.
      momentum: EMA momentum in (0, 1].
      freeze_threshold: None or a frequency in (0, 1].
      granularity: as :func:`statsq`.
      mask: the leaves to track, as in :func:`confidence_guided_annealing`.

    Raises:
      TypeError/ValueError: bad hyper-parameters (at construction) or ``params`` None (at
        ``update``).
    """
    bits = check_bits(bits)
    momentum = check_real("momentum", momentum, 0.0, 1.0, low_open=True)
    if freeze_threshold is not None:
        check_real("freeze_threshold", freeze_threshold, 0.0, 1.0, low_open=True)
    granularity = G.as_granularity(granularity)
    _check_mask(mask)
    codes_of: Callable[[jax.Array], jax.Array] = functools.partial(
        statsq_codes, bits=bits, granularity=granularity)

    def init(params):
        return TrackOscillationsState(jax.tree.map(lambda p: osc.init(codes_of(p)), params))

    def update(updates, state, params=None):
        _need_params(params, "track_oscillations")

        def one(u, s, p):
            s, _ = osc.update(s, codes_of(p), momentum=momentum,
                              freeze_threshold=freeze_threshold)
            if freeze_threshold is not None:
                parts = _parts(p, bits, granularity)
                held = parts.layout.unblock(
                    (parts.layout.block(s.frozen_code.astype(jnp.float32)) + 0.5) * parts.step)
                u = jnp.where(s.frozen, (held - p.astype(jnp.float32)).astype(u.dtype), u)
            return u, s

        pairs = jax.tree.map(one, updates, state.tracker, params)
        first = jax.tree.map(lambda _, pair: pair[0], updates, pairs)
        second = jax.tree.map(lambda _, pair: pair[1], updates, pairs)
        return first, TrackOscillationsState(second)

    return optax.masked(optax.GradientTransformation(init, update), mask)
