"""ZeroQAT: zeroth-order quantization-aware training, MeZO style (two forward passes, no backprop).

Per probe ``i`` of ``q`` (``num_probes``), with ``z_i ~ N(0, I)`` over every trainable leaf::

  proj_i = (L(theta + eps z_i) - L(theta - eps z_i)) / (2 eps)       # a scalar
  g      = (1/q) sum_i proj_i z_i                                      # the gradient estimate
  theta <- theta - lr(step) * (g + weight_decay * theta)               # on trainable leaves

On a quadratic the central difference is exact, ``proj_i = z_i . grad``, so ``E[g] = grad``; on
a smooth loss the bias is ``O(eps^2)``. ``z_i`` is never stored: it is drawn again from
``fold_in(fold_in(fold_in(key, step), probe), leaf_index)`` each time it is needed (perturb,
restore, update), so only the ``q`` scalars ``proj_i`` are kept. That key seeds a counter-based
hash of each element's index (not ``jax.random.normal``, whose threefry or RBG bits XLA
materializes as leaf-sized buffers), so the draw fuses into the parameter update. The parameters
are perturbed in place, ``+eps z``, ``-2 eps z``, ``+eps z`` (restored, up to float rounding as in
MeZO), in a ``lax.fori_loop`` over probes; :func:`zo_step` jits with the parameters donated, so
the step needs about the memory of inference: no activations are kept for a backward pass and no
gradient tree exists. Any QAT loss works, e.g. a :func:`qjax.nn.quantize_model` Linen model with
``lsq``: its learned ``kernel_scale`` / ``input_scale`` are trainable leaves like the weights
(ZeroQAT learns weights and clipping ranges).

``trainable`` selects the perturbed leaves: a pytree of Python bools with the structure of the
parameters, or a predicate ``trainable(path, leaf) -> bool`` with ``path`` like
``"params/dense_0/kernel_scale"``. By default every floating leaf is trainable; masked leaves are
left bit-identical.

References:
  Tan et al., 2025. ZeroQAT: Your Quantization-aware Training but Efficient. arXiv 2509.00031.
  Malladi et al., 2023. Fine-Tuning Language Models with Just Forward Passes (MeZO).
  arXiv 2305.17333.
"""

from qjax._src.methods.zeroqat import (
    LossFn,
    Trainable,
    ZeroOrderConfig,
    regenerate_z,
    zo_gradient,
    zo_projections,
    zo_step,
)

__all__ = [
    "LossFn",
    "regenerate_z",
    "Trainable",
    "ZeroOrderConfig",
    "zo_gradient",
    "zo_projections",
    "zo_step",
]
