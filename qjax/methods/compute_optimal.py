"""Compute-optimal QAT: how much of a token budget to spend in QAT, and cooldown fusion.

Scaling quantities (Dremov et al. 2025):

* tokens per parameter-byte ``S = D / (N * B / 8)``, with ``D`` training tokens, ``N``
  parameters and ``B`` bits per parameter (``N * B / 8`` is the quantized model's size in bytes);
* the loss-optimal fraction of the token budget to spend in QAT (the rest is float training
  first), ``f*(S) = exp(-6.7297 / ln S)``, clipped to [0, 1]. It grows with ``S``: more tokens
  per byte of model make the float weights harder to quantize, so QAT needs a larger share.

``f*`` is defined for ``S > 1`` only, where it lies in (0, 1) and increases from 0 (``S -> 1+``)
to 1 (``S -> inf``). At ``S = 1`` ``ln S = 0`` divides by zero, and below 1 the exponent turns
positive (``f* > 1``, clipped to 1): a jump from 0 to 1 that is an artefact of the fitted form,
far outside the range it was fitted on, so :func:`optimal_qat_fraction` raises ValueError there.

Schedules (``optax.Schedule`` functions of the 0-based step, traceable under jit):

* :func:`wsd`: warmup-stable-decay (Hägele et al. 2024): linear warmup from ``init_ratio * lr``
  to the peak ``lr``, constant ``lr``, then a cooldown over the last ``cooldown_fraction`` of the
  steps to ``final_ratio * lr``, linear (``lr - (lr - final) p``) or 1-sqrt
  (``final + (lr - final)(1 - sqrt(p))``), ``p`` the fraction of the cooldown done. The final
  value is reached at ``total_steps``, as :func:`qjax.optim.warmup_cosine` reaches its own.
* :func:`fused_cooldown`: cooldown fusion (Dremov et al. 2025): float training at the constant
  peak of a WSD schedule, QAT switched on exactly where the cooldown starts,
  ``t_switch = round(total_steps * (1 - qat_fraction))``, so the whole learning-rate decay
  happens during QAT and no float update is spent on a cooldown that QAT would undo.
* :func:`classical_qat`: the baseline it replaces, at the same total steps: a float phase with
  its own full WSD schedule (warmup, stable, cooldown) up to ``t_switch``, then a QAT phase with
  its own re-warmup and decay.

Both return ``(lr_schedule, qat_schedule)``; ``qat_schedule`` is a
:class:`qjax.optim.QATSchedule` (``enabled(step)`` is True from ``t_switch`` on), as
``qjax.train`` consumes it (``OptimConfig(schedule="wsd_fused", qat_fraction=...)``).

References:
  Dremov et al., 2025. Compute-Optimal Quantization-Aware Training. arXiv 2509.22935.
  Hägele et al., 2024. Scaling Laws and Compute-Optimal Training beyond Fixed Training
  Durations. arXiv 2405.18392.
"""

from qjax._src.methods.compute_optimal import (
    DECAYS,
    QAT_FRACTION_COEF,
    Decay,
    classical_qat,
    fused_cooldown,
    optimal_qat_fraction,
    optimal_qat_fraction_from_s,
    qat_switch_step,
    tokens_per_param_byte,
    wsd,
)

__all__ = [
    "classical_qat",
    "Decay",
    "DECAYS",
    "fused_cooldown",
    "optimal_qat_fraction",
    "optimal_qat_fraction_from_s",
    "QAT_FRACTION_COEF",
    "qat_switch_step",
    "tokens_per_param_byte",
    "wsd",
]
