"""Implementation of :mod:`qjax.methods.compute_optimal` (documented there)."""

from __future__ import annotations

import math
import typing

import jax.numpy as jnp
import optax

from qjax._src._checks import check_pos_int, check_real
from qjax._src.optim import QATSchedule

__all__ = [
    "QAT_FRACTION_COEF",
    "DECAYS",
    "tokens_per_param_byte",
    "optimal_qat_fraction",
    "optimal_qat_fraction_from_s",
    "qat_switch_step",
    "wsd",
    "fused_cooldown",
    "classical_qat",
]

# f*(S) = exp(-QAT_FRACTION_COEF / ln S), Dremov et al. 2025.
QAT_FRACTION_COEF = 6.7297

Decay = typing.Literal["linear", "1-sqrt"]
DECAYS: tuple[str, ...] = typing.get_args(Decay)


def tokens_per_param_byte(tokens: float, params: float, bits: float) -> float:
    """``S = D / (N * B / 8)``: training tokens per byte of the model at ``bits`` per parameter.

    Raises:
      TypeError/ValueError: ``tokens``, ``params`` or ``bits`` not a finite positive number.
    """
    d = check_real("tokens", tokens, 0.0, low_open=True)
    n = check_real("params", params, 0.0, low_open=True)
    b = check_real("bits", bits, 0.0, low_open=True)
    return d / (n * b / 8.0)


def optimal_qat_fraction_from_s(s: float) -> float:
    """``f* = exp(-6.7297 / ln S)`` clipped to [0, 1], for tokens per parameter-byte ``S > 1``.

    Raises:
      TypeError/ValueError: ``s`` not a finite number > 1 (the fit has no meaning at ``S <= 1``:
        see the module docstring).
    """
    s = check_real("s (tokens per parameter-byte)", s, 1.0, low_open=True)
    return min(1.0, max(0.0, math.exp(-QAT_FRACTION_COEF / math.log(s))))


def optimal_qat_fraction(tokens: float, params: float, bits: float) -> float:
    """The loss-optimal QAT share of a budget of ``tokens`` for ``params`` parameters at ``bits``
    bits each: :func:`optimal_qat_fraction_from_s` of :func:`tokens_per_param_byte`.

    Raises:
      TypeError/ValueError: an argument not finite and positive, or ``S <= 1`` (fewer tokens than
        the model has bytes), where the fit is undefined.
    """
    s = tokens_per_param_byte(tokens, params, bits)
    if s <= 1.0:
        raise ValueError(f"optimal_qat_fraction needs more tokens than parameter-bytes: "
                         f"S = tokens / (params * bits / 8) = {tokens!r} / ({params!r} * "
                         f"{bits!r} / 8) = {s:g} <= 1, where exp(-{QAT_FRACTION_COEF} / ln S) "
                         f"is undefined")
    return optimal_qat_fraction_from_s(s)


def qat_switch_step(total_steps: int, qat_fraction: float) -> int:
    """``round(total_steps * (1 - qat_fraction))`` (Python's round): the first QAT step.

    Raises:
      TypeError/ValueError: ``total_steps`` not a positive int, ``qat_fraction`` outside [0, 1].
    """
    check_pos_int("total_steps", total_steps)
    f = check_real("qat_fraction", qat_fraction, 0.0, 1.0)
    return int(round(total_steps * (1.0 - f)))


def _check_decay(decay: object) -> None:
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")


def _piecewise(peak: float, init: float, final: float, warmup: int, decay_start: int,
               total: int, decay: str) -> optax.Schedule:
    """Linear warmup ``[0, warmup)`` from ``init``, ``peak`` on ``[warmup, decay_start]``, decay
    on ``(decay_start, total)`` and ``final`` from ``total`` on. The boundary values are the
    constants themselves (no arithmetic), so they are exact in float32."""

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = init + (peak - init) * t / max(warmup, 1)
        p = jnp.clip((t - decay_start) / max(total - decay_start, 1), 0.0, 1.0)
        if decay == "linear":
            cool = peak + (final - peak) * p
        else:
            cool = final + (peak - final) * (1.0 - jnp.sqrt(p))
        return jnp.where(t < warmup, warm,
                         jnp.where(t >= total, final, jnp.where(t <= decay_start, peak, cool)))

    return schedule


def _check_lr(peak_lr, init_ratio, final_ratio, decay) -> None:
    check_real("peak_lr", peak_lr, 0.0, low_open=True)
    check_real("init_ratio", init_ratio, 0.0)
    check_real("final_ratio", final_ratio, 0.0)
    _check_decay(decay)


def wsd(peak_lr: float, total_steps: int, warmup_fraction: float = 0.1,
        cooldown_fraction: float = 0.2, *, decay: Decay = "1-sqrt", init_ratio: float = 0.01,
        final_ratio: float = 0.0) -> optax.Schedule:
    """Warmup-stable-decay: ``W = round(warmup_fraction * T)`` warmup steps from
    ``init_ratio * peak_lr``, ``peak_lr`` from step ``W`` to the cooldown start
    ``T - round(cooldown_fraction * T)`` (both included), then the ``decay`` cooldown, reaching
    ``final_ratio * peak_lr`` at ``T = total_steps``.

    Raises:
      TypeError/ValueError: ``total_steps`` not a positive int, ``peak_lr`` not finite and
        positive, a fraction outside [0, 1] or warmup and cooldown longer than the run, a ratio
        negative, ``decay`` not ``"linear"`` or ``"1-sqrt"``.
    """
    check_pos_int("total_steps", total_steps)
    _check_lr(peak_lr, init_ratio, final_ratio, decay)
    check_real("warmup_fraction", warmup_fraction, 0.0, 1.0)
    check_real("cooldown_fraction", cooldown_fraction, 0.0, 1.0)
    warmup = int(round(warmup_fraction * total_steps))
    start = total_steps - int(round(cooldown_fraction * total_steps))
    if warmup > start:
        raise ValueError(f"warmup_fraction + cooldown_fraction must be <= 1: {warmup} warmup "
                         f"steps end after the cooldown starts at step {start}")
    return _piecewise(peak_lr, init_ratio * peak_lr, final_ratio * peak_lr, warmup, start,
                      total_steps, decay)


def fused_cooldown(total_steps: int, peak_lr: float, qat_fraction: float,
                   warmup_fraction: float = 0.1, *, decay: Decay = "1-sqrt",
                   init_ratio: float = 0.01, final_ratio: float = 0.0,
                   ) -> tuple[optax.Schedule, QATSchedule]:
    """Cooldown fusion: a WSD schedule whose cooldown is the QAT phase.

    ``t_switch = round(total_steps * (1 - qat_fraction))``. Warmup over
    ``round(warmup_fraction * total_steps)`` steps, ``peak_lr`` up to ``t_switch`` (included),
    then the ``decay`` to ``final_ratio * peak_lr`` at ``total_steps``; QAT is off before
    ``t_switch`` and on from it. ``qat_fraction=0`` is float training at ``peak_lr`` throughout
    (no cooldown); ``qat_fraction=1`` (with ``warmup_fraction=0``) is QAT decaying from step 0.

    Raises:
      TypeError/ValueError: as :func:`wsd`; ``qat_fraction`` outside [0, 1]; the warmup ending
        after ``t_switch``.
    """
    t_switch = qat_switch_step(total_steps, qat_fraction)
    _check_lr(peak_lr, init_ratio, final_ratio, decay)
    check_real("warmup_fraction", warmup_fraction, 0.0, 1.0)
    warmup = int(round(warmup_fraction * total_steps))
    if warmup > t_switch:
        raise ValueError(f"warmup_fraction={warmup_fraction} gives {warmup} warmup steps, more "
                         f"than the {t_switch} float steps before QAT (qat_fraction="
                         f"{qat_fraction}): the warmup must end before the fused cooldown")
    lr = _piecewise(peak_lr, init_ratio * peak_lr, final_ratio * peak_lr, warmup, t_switch,
                    total_steps, decay)
    return lr, QATSchedule(t_switch, total_steps)


def classical_qat(total_steps: int, peak_lr: float, qat_fraction: float,
                  warmup_fraction: float = 0.1, *, cooldown_fraction: float = 0.2,
                  qat_warmup_fraction: float = 0.1, qat_peak_lr: float | None = None,
                  decay: Decay = "1-sqrt", init_ratio: float = 0.01, final_ratio: float = 0.0,
                  ) -> tuple[optax.Schedule, QATSchedule]:
    """The classical two-phase baseline of :func:`fused_cooldown`, with the same total steps.

    Float phase, steps ``[0, t_switch)`` with ``t_switch = round(total_steps * (1 -
    qat_fraction))``: a full WSD schedule with the same ``round(warmup_fraction * total_steps)``
    warmup steps as :func:`fused_cooldown`, then a cooldown over the last
    ``round(cooldown_fraction * t_switch)`` steps of the phase towards ``final_ratio * peak_lr``
    (reached at ``t_switch``, where QAT starts). QAT phase, steps ``[t_switch, total_steps)``, of
    ``Q`` steps: a re-warmup over ``round(qat_warmup_fraction * Q)`` steps from
    ``init_ratio * qat_peak_lr`` to ``qat_peak_lr`` (default ``peak_lr``), then the ``decay`` to
    ``final_ratio * qat_peak_lr`` at ``total_steps``. ``qat_fraction`` 0 or 1 leaves one phase.

    Raises:
      TypeError/ValueError: as :func:`wsd`; ``qat_fraction``, ``cooldown_fraction`` or
        ``qat_warmup_fraction`` outside [0, 1]; warmup and cooldown longer than the float phase;
        ``qat_peak_lr`` not None or finite and positive.
    """
    t_switch = qat_switch_step(total_steps, qat_fraction)
    _check_lr(peak_lr, init_ratio, final_ratio, decay)
    check_real("warmup_fraction", warmup_fraction, 0.0, 1.0)
    check_real("cooldown_fraction", cooldown_fraction, 0.0, 1.0)
    check_real("qat_warmup_fraction", qat_warmup_fraction, 0.0, 1.0)
    q_peak = peak_lr if qat_peak_lr is None else check_real("qat_peak_lr", qat_peak_lr, 0.0,
                                                             low_open=True)
    qat = QATSchedule(t_switch, total_steps)
    n_qat = total_steps - t_switch
    warmup = int(round(warmup_fraction * total_steps))
    start = t_switch - int(round(cooldown_fraction * t_switch))
    if t_switch and warmup > start:
        raise ValueError(f"the float phase ({t_switch} steps, qat_fraction={qat_fraction}) is "
                         f"too short for {warmup} warmup steps (warmup_fraction="
                         f"{warmup_fraction}) and a cooldown from step {start} "
                         f"(cooldown_fraction={cooldown_fraction})")
    float_lr = _piecewise(peak_lr, init_ratio * peak_lr, final_ratio * peak_lr, warmup, start,
                          t_switch, decay)
    q_warmup = int(round(qat_warmup_fraction * n_qat))
    qat_lr = _piecewise(q_peak, init_ratio * q_peak, final_ratio * q_peak, q_warmup, q_warmup,
                        n_qat, decay)
    if n_qat == 0:
        return float_lr, qat
    if t_switch == 0:
        return qat_lr, qat

    def schedule(count):
        t = jnp.asarray(count)
        return jnp.where(t < t_switch, float_lr(t), qat_lr(t - t_switch))

    return schedule, qat
