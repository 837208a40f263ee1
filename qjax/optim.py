"""Optax transforms for QAT: parameter labels, weight-decay masks, schedules and the optimizer.

* :func:`param_labels`: ``"quantizer"`` for learned quantizer parameters (``kernel_scale``,
  ``input_scale``), ``"matrix"`` for weights of rank >= 2, ``"vector"`` for the rest (norm scales,
  biases); ready for ``optax.multi_transform``.
* :func:`weight_decay_mask`: True on matrices only, as the QuEST recipe decays them.
* :func:`warmup_cosine`: warm-up over a fraction of the steps from ``lr/100``, then cosine decay
  to ``lr/10`` (the QuEST recipe).
* :class:`QATSchedule`: a float phase, then a QAT phase from a step or a fraction of the run.
* :func:`qat_adamw`: AdamW with gradient clipping, decay on matrices only, and its own learning
  rate multiplier (and no decay) for quantizer parameters.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "QUANTIZER_PARAM_NAMES",
    "param_labels",
    "weight_decay_mask",
    "warmup_cosine",
    "QATSchedule",
    "qat_adamw",
]

QUANTIZER_PARAM_NAMES = frozenset({"kernel_scale", "input_scale"})


def _last_name(path) -> str:
    for entry in reversed(path):
        for attr in ("key", "name"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
    return ""


def param_labels(params) -> object:
    """A pytree like ``params`` of ``"quantizer"``, ``"matrix"`` or ``"vector"`` labels."""

    def label(path, leaf):
        if _last_name(path) in QUANTIZER_PARAM_NAMES:
            return "quantizer"
        return "matrix" if jnp.ndim(leaf) >= 2 else "vector"

    return jax.tree_util.tree_map_with_path(label, params)


def weight_decay_mask(params) -> object:
    """True for matrices (rank >= 2, not quantizer parameters), False elsewhere."""
    return jax.tree_util.tree_map(lambda lab: lab == "matrix", param_labels(params))


def warmup_cosine(peak_lr: float, total_steps: int, warmup_fraction: float = 0.1,
                  init_ratio: float = 0.01, final_ratio: float = 0.1) -> optax.Schedule:
    """Linear warm-up from ``init_ratio * lr`` over ``warmup_fraction`` of the steps, then cosine
    decay to ``final_ratio * lr`` at ``total_steps``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    warmup = max(1, int(round(warmup_fraction * total_steps)))
    return optax.warmup_cosine_decay_schedule(
        init_value=peak_lr * init_ratio, peak_value=peak_lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak_lr * final_ratio,
    )


@dataclasses.dataclass(frozen=True)
class QATSchedule:
    """Float training until ``start`` (a step, or a fraction of ``total_steps`` if a float < 1),
    QAT from then on. ``start=0`` is QAT throughout."""

    start: int | float
    total_steps: int

    def __post_init__(self):
        if isinstance(self.start, float) and not 0.0 <= self.start <= 1.0:
            raise ValueError(f"a fractional QAT start must be in [0, 1], got {self.start}")
        if isinstance(self.start, int) and self.start < 0:
            raise ValueError(f"QAT start step must be >= 0, got {self.start}")

    @property
    def start_step(self) -> int:
        if isinstance(self.start, float):
            return int(math.floor(self.start * self.total_steps))
        return self.start

    def enabled(self, step: int) -> bool:
        """Whether QAT is on at ``step`` (0-based); a static Python bool, for jit."""
        return step >= self.start_step


def qat_adamw(learning_rate: float | optax.Schedule, *, weight_decay: float = 0.1,
              b1: float = 0.9, b2: float = 0.95, grad_clip: float | None = 1.0,
              quantizer_lr_multiplier: float = 1.0, params=None) -> optax.GradientTransformation:
    """AdamW for QAT: global-norm clipping, decay on matrices only, quantizer params apart.

    Quantizer parameters (LSQ steps, PACT clips) get Adam at ``quantizer_lr_multiplier`` times the
    learning rate and no weight decay. ``params`` is only used to validate the labels eagerly.
    """
    lr = learning_rate

    def scaled(mult):
        return (lambda step: lr(step) * mult) if callable(lr) else lr * mult

    tx = optax.multi_transform(
        {
            "matrix": optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay),
            "vector": optax.adam(lr, b1=b1, b2=b2),
            "quantizer": optax.adam(scaled(quantizer_lr_multiplier), b1=b1, b2=b2),
        },
        param_labels,
    )
    if params is not None:
        param_labels(params)
    return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip else tx
