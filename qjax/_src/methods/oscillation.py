"""Implementation of :mod:`qjax.methods.oscillation` (documented there)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qjax._src._checks import check_real

__all__ = ["OscillationState", "init", "update", "apply_freeze", "oscillation_ratio"]


class OscillationState(NamedTuple):
    """Per-element tracker state; every field has the shape of the codes.

    Attributes:
      prev_code: int32, the codes of the last update (after freezing).
      last_direction: int8 in {-1, 0, 1}, the sign of the last non-zero change (0: none yet).
      ema_frequency: float32 in [0, 1], EMA of oscillation events.
      ema_code: float32, EMA of the codes (the value a weight is frozen to, rounded).
      frozen: bool, frozen weights (never unfrozen).
      frozen_code: int32, the code of a frozen weight (0 where not frozen).
      count: int32, number of oscillation events so far.
    """

    prev_code: jax.Array
    last_direction: jax.Array
    ema_frequency: jax.Array
    ema_code: jax.Array
    frozen: jax.Array
    frozen_code: jax.Array
    count: jax.Array


def _as_codes(codes: object, name: str = "codes") -> jax.Array:
    """int32 codes; integer arrays as they are, floating ones rounded (float32 codes of
    :mod:`qjax.estimators`); bools and non-arrays refused."""
    dtype = getattr(codes, "dtype", None)
    if dtype is None or jnp.issubdtype(dtype, jnp.bool_) or not (
            jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        got = type(codes).__name__ if dtype is None else f"dtype {dtype}"
        raise TypeError(f"{name} must be an integer or integer-valued floating array, got {got}")
    if jnp.issubdtype(dtype, jnp.floating):
        codes = jnp.round(codes)
    return jnp.asarray(codes).astype(jnp.int32)


def _check_state(state: object) -> OscillationState:
    if not isinstance(state, OscillationState):
        raise TypeError(f"state must be an OscillationState (from init), got "
                        f"{type(state).__name__}")
    return state


def init(codes: jax.Array) -> OscillationState:
    """The tracker state of the first codes: no direction, no event, nothing frozen.

    Args:
      codes: integer codes of any shape (integer dtype, or floating and integer-valued).

    Returns:
      An :class:`OscillationState` of ``codes.shape``.
    """
    q = _as_codes(codes)
    zeros = jnp.zeros(q.shape, jnp.float32)
    return OscillationState(
        prev_code=q,
        last_direction=jnp.zeros(q.shape, jnp.int8),
        ema_frequency=zeros,
        ema_code=q.astype(jnp.float32),
        frozen=jnp.zeros(q.shape, jnp.bool_),
        frozen_code=jnp.zeros(q.shape, jnp.int32),
        count=jnp.zeros(q.shape, jnp.int32),
    )


def apply_freeze(codes: jax.Array, state: OscillationState) -> jax.Array:
    """``codes`` with frozen elements replaced by their frozen codes (int32, ``codes.shape``)."""
    state = _check_state(state)
    q = _as_codes(codes)
    if q.shape != state.prev_code.shape:
        raise ValueError(f"codes of shape {q.shape} do not match the tracked shape "
                         f"{state.prev_code.shape}")
    return jnp.where(state.frozen, state.frozen_code, q)


def update(state: OscillationState, codes: jax.Array, *, momentum: float = 0.01,
           freeze_threshold: float | None = None) -> tuple[OscillationState, jax.Array]:
    """One tracking step: the new state and this step's oscillation events.

    The codes are first passed through :func:`apply_freeze` (a frozen weight is tracked at its
    frozen code), then ``d = sign(q - prev_code)``, ``event = (d * last_direction == -1)``,
    ``ema_frequency <- m * event + (1 - m) * ema_frequency``. With ``freeze_threshold``, elements
    whose new ``ema_frequency`` exceeds it (strictly) and are not frozen yet freeze at
    ``round(ema_code)`` (the EMA before this step, half to even); ``ema_code`` is updated after.

    Args:
      state: from :func:`init` or a previous :func:`update`.
      codes: integer codes of the tracked shape (integer dtype, or integer-valued floats).
      momentum: ``m`` in (0, 1] (Nagel et al.: 0.01).
      freeze_threshold: None (no freezing) or a frequency in (0, 1] (Nagel et al. suggest at
        least 2-3 times the momentum).

    Returns:
      ``(new_state, events)``, ``events`` bool of the codes' shape.

    Raises:
      TypeError/ValueError: bad ``state``, ``codes`` (dtype, shape), ``momentum`` or
        ``freeze_threshold``.
    """
    state = _check_state(state)
    m = check_real("momentum", momentum, 0.0, 1.0, low_open=True)
    if freeze_threshold is not None:
        check_real("freeze_threshold", freeze_threshold, 0.0, 1.0, low_open=True)
    q = apply_freeze(codes, state)
    d = jnp.sign(q - state.prev_code).astype(jnp.int8)
    events = (d * state.last_direction) == -1
    ema = m * events.astype(jnp.float32) + (1.0 - m) * state.ema_frequency
    frozen, frozen_code = state.frozen, state.frozen_code
    if freeze_threshold is not None:
        new = (ema > freeze_threshold) & ~frozen
        frozen_code = jnp.where(new, jnp.round(state.ema_code).astype(jnp.int32), frozen_code)
        frozen = frozen | new
    new_state = OscillationState(
        prev_code=q,
        last_direction=jnp.where(d != 0, d, state.last_direction),
        ema_frequency=ema,
        ema_code=m * q.astype(jnp.float32) + (1.0 - m) * state.ema_code,
        frozen=frozen,
        frozen_code=frozen_code,
        count=state.count + events.astype(jnp.int32),
    )
    return new_state, events


def oscillation_ratio(states: Any, threshold: float = 0.005) -> jax.Array:
    """Fraction of tracked weights whose EMA frequency exceeds ``threshold`` (float32 scalar).

    Args:
      states: an :class:`OscillationState`, or any pytree holding them (e.g. a whole optax
        state with :func:`qjax.methods.ofq.track_oscillations` in it): the ratio is over every
        element of every state found.
      threshold: a frequency in [0, 1) (strict ``>``).

    Raises:
      ValueError: ``threshold`` outside [0, 1), or no :class:`OscillationState` in ``states``.
    """
    threshold = check_real("threshold", threshold, 0.0, 1.0, high_open=True)
    found = [s for s in jax.tree.leaves(states, is_leaf=lambda x: isinstance(x, OscillationState))
             if isinstance(s, OscillationState)]
    if not found:
        raise ValueError("states holds no OscillationState (pass a tracker state or an optimizer "
                         "state containing track_oscillations)")
    above = sum(jnp.sum(s.ema_frequency > threshold, dtype=jnp.int32) for s in found)
    total = sum(s.ema_frequency.size for s in found)
    return above.astype(jnp.float32) / max(total, 1)
