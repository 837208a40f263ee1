"""Distillation from the float model, and Teacher Intervention.

The teacher is the float model, usually on the same parameters as the QAT student
(``QuantizedLinenModel.apply(..., qat=False)``, :func:`qjax.nn.nnx.set_qat`) or on frozen
pretrained parameters. The teacher's values always get ``stop_gradient``.

Losses (all computed in float32, teacher under ``stop_gradient``):

* :func:`logit_kl`: with ``p = softmax(t / T)``, ``q = softmax(s / T)`` over the last axis,
  ``T^2 * sum_v p_v (log p_v - log q_v)`` averaged over tokens (a weighted mean with ``mask``).
  ``T^2`` keeps the gradient's scale independent of ``T`` (Hinton et al. 2015).
* :func:`layer_mse`: ``mean over leaves of mean((s - t)^2)``, each leaf divided by
  ``mean(t^2) + eps`` with ``normalize=True``.
* :func:`distillation_loss`: ``ce_weight * CE(s, labels) + kl_weight * logit_kl(s, t, T)
  + mse_weight * layer_mse(hs, ht)``.

Intermediate outputs are named by module path (``"block/attn"`` in Linen, ``"layers/0/attn"``
in NNX), selected with ``re.fullmatch``. :func:`capture_linen` / :func:`intervene_linen` wrap an
``apply`` (of a Linen module or a :class:`~qjax.nn.QuantizedLinenModel`) in
``flax.linen.intercept_methods``, which sees each bound submodule's ``__call__`` output; entered
outside the ``apply``, it wraps the quantized layers' own interceptor, so it sees the quantized
output. :func:`capture_nnx` / :func:`intervene_nnx` put a thin wrapper module around each
matched submodule for one call and put the original back afterwards.

**Teacher Intervention** (Kim et al. 2023): the student's output ``h_s`` at chosen modules is
replaced by ``h = lam * stop_gradient(h_t) + (1 - lam) * h_s`` (:func:`mix_teacher`), so the
layers downstream first train on the teacher's (unquantized) signal; ``lam`` goes from 1 to 0
over training (:func:`intervention_schedule`). ``dh/dh_s = 1 - lam``: at ``lam = 1`` nothing
upstream of the replaced module (nor the module itself) gets a gradient through ``h``.

Limits: a module that runs more than once keeps its last output (capture) or gets the same
teacher output each time (intervention); outputs inside lifted transforms (``nn.scan``,
``nn.remat``, ``nnx.scan``) are the transform's tracers and cannot be captured. An NNX parent
must only call a wrapped submodule, not read its attributes.

References:
  Hinton, Vinyals and Dean, 2015. Distilling the Knowledge in a Neural Network.
  arXiv:1503.02531.
  Kim, Lee, Kim, Hwang and Choi, 2023. Teacher Intervention: Improving Convergence of
  Quantization Aware Training for Ultra-Low Precision Transformers. EACL. arXiv:2302.11812.
"""

from qjax._src.methods.distill import (
    SCHEDULES,
    ScheduleKind,
    capture_linen,
    capture_nnx,
    distillation_loss,
    intervene_linen,
    intervene_nnx,
    intervention_schedule,
    layer_mse,
    logit_kl,
    mix_teacher,
)

__all__ = [
    "capture_linen",
    "capture_nnx",
    "distillation_loss",
    "intervene_linen",
    "intervene_nnx",
    "intervention_schedule",
    "layer_mse",
    "logit_kl",
    "mix_teacher",
    "ScheduleKind",
    "SCHEDULES",
]
