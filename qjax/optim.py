"""Optax transforms for QAT: parameter labels, weight-decay masks, schedules and the optimizer.

* :func:`param_labels`: ``"quantizer"`` for learned quantizer parameters (``kernel_scale``,
  ``input_scale``), ``"vector"`` for biases and norm scales (``bias``, ``scale``) and other
  weights of rank < 2, ``"matrix"`` for the rest; on Linen param dicts and Flax NNX state
  alike, with optional leading layer axes (``stacked_axes``); ready for
  ``optax.multi_transform``.
* :func:`weight_decay_mask`: True on matrices only, as the QuEST recipe decays them.
* :func:`warmup_cosine`: warm-up over a fraction of the steps from ``lr/100``, then cosine decay
  to ``lr/10`` (the QuEST recipe).
* :class:`QATSchedule`: a float phase, then a QAT phase from a step or a fraction of the run.
* :func:`qat_adamw`: AdamW with gradient clipping, decay on matrices only, and its own learning
  rate multiplier (and no decay) for quantizer parameters.
"""

from qjax._src.optim import (
    QUANTIZER_PARAM_NAMES,
    VECTOR_PARAM_NAMES,
    QATSchedule,
    StackedAxes,
    param_labels,
    qat_adamw,
    warmup_cosine,
    weight_decay_mask,
)

__all__ = [
    "param_labels",
    "qat_adamw",
    "QATSchedule",
    "QUANTIZER_PARAM_NAMES",
    "StackedAxes",
    "VECTOR_PARAM_NAMES",
    "warmup_cosine",
    "weight_decay_mask",
]
