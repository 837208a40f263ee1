"""Weight-oscillation tracking for QAT (Nagel et al., 2022): events, EMA frequency, freezing.

A weight *oscillates* when its integer code changes in the direction opposite to its previous
change. Per element, with ``q_t`` the code at step ``t`` and ``d_t = sign(q_t - q_{t-1})``::

  last_t      = d_t if d_t != 0 else last_{t-1}           (last_0 = 0: no change seen yet)
  event_t     = (d_t * last_{t-1} == -1)                  (a reversal; a repeat of the same
                                                           direction or no change is no event)
  ema_freq_t  = m * event_t + (1 - m) * ema_freq_{t-1}    (ema_freq_0 = 0, m the momentum)

Only the sign of a change counts, so a jump of two levels is one change. The trajectory
``0, 1, 0, 1, 1, 2, 1, 2, 2, 2`` has 4 events: ``1->0`` and ``0->1`` reverse ``+`` and ``-``;
``1->2`` follows the ``+`` of ``0->1`` (the pause ``1, 1`` keeps the last direction), no event;
``2->1`` and ``1->2`` are events 3 and 4.

The *oscillation ratio* (:func:`oscillation_ratio`) is the fraction of weights with
``ema_freq > threshold``. *Freezing* (``freeze_threshold``): a weight whose ``ema_freq`` exceeds
the threshold is frozen for good at ``round(ema_code)``, the EMA (same momentum) of its codes up
to the previous step, i.e. the level it spends most time on; :func:`apply_freeze` substitutes
the frozen codes and ``state.frozen`` is the elementwise mask (True = frozen) for an optimizer
(see :func:`qjax.methods.ofq.track_oscillations`). Frozen weights are tracked through their frozen
code, so they stop oscillating and their frequency decays.

Everything is a pure function of arrays (``jit``, ``vmap``, ``lax.scan`` over steps).

References:
  Nagel, M., Fournarakis, M., Bondarenko, Y., Blankevoort, T. (2022). Overcoming Oscillations
  in Quantization-Aware Training. ICML. arXiv:2203.11086.
"""

from qjax._src.methods.oscillation import (
    OscillationState,
    apply_freeze,
    init,
    oscillation_ratio,
    update,
)

__all__ = [
    "apply_freeze",
    "init",
    "oscillation_ratio",
    "OscillationState",
    "update",
]
