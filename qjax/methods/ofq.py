"""OFQ: statistical weight quantization (StatsQ) and confidence-guided annealing (CGA).

**StatsQ.** Per block of a weight (by default per output channel of a kernel ``(..., K, N)``,
i.e. ``PerRow(-2)``: the statistic runs over ``K``), with ``n = 2^(b-1)``::

  s     = 2 * mean|W|                     (no gradient; the paper's clipping value)
  step  = s / n                            (the grid step, qjax's ``scale``)
  v     = W / step = W * n / s             (the latent value in steps)
  q     = clip(floor(v), -n, n - 1)        (int32 codes)
  W_q   = (q + 1/2) * step                 (midrise levels +-(k - 1/2) * s / n, k = 1..n)
  dW    = g                                (identity straight-through estimator)

An all-zero block has ``s = 0``; its step is clamped to the smallest normal float32 (as every
qjax scale), so its values are ``2^-127``, a denormal that XLA flushes to 0. ``mean|W|`` sums
``|W| / count`` in a fixed order, so it cannot overflow and jit equals eager. Values are cast back
to the input dtype, saturating (float32, bfloat16 and float16 inputs). Example (one block, 2
bits): ``W = [0.3, -1.2, 2.5, -0.05, 0.9, -3.1, 1.7, 0.02]`` has ``s = 2.4425`` and
``W_q = [0.6106, -0.6106, 1.8319, -0.6106, 0.6106, -1.8319, 1.8319, 0.6106]``.

StatsQ is a :class:`qjax.QuantSpec` (:func:`statsq_spec`): ``Midrise(b)``, the scale rule
``qjax.MeanAbs(2.0)`` and ``rounding="half_up"`` (on the midrise grid, ``floor(v)``: a value on a
bin edge goes to the level above), identity STE; :func:`statsq` is ``qjax.fake_quant`` with it.
So ``quantize``, ``convert`` and ``quantize_model(model, Method("ofq", bits, act_bits))`` (StatsQ
weights per output channel, LSQ activations) use it too.

**CGA.** In the annealing phase the paper freezes every weight that is *confident*, i.e. not
near a rounding threshold. With ``c = clip(v, -n, n)`` and ``d`` the distance of ``c`` to the
nearest boundary (in steps), a weight keeps training iff ``d <= boundary_range``, else its update
is zeroed. Boundaries (``boundaries=``):

* ``"interior"`` (default; the paper's released code): the ``2n - 1`` rounding thresholds
  ``-n + 1, ..., n - 1`` strictly inside the clip range. Clipped weights (``|v| >= n``, distance
  1) are always frozen. On the example above at 2 bits and ``boundary_range=0.005``
  every weight is frozen (the closest, ``v = -0.9826`` and ``0.0164``, are 0.0174 and 0.0164
  steps from a threshold).
* ``"with_edges"``: also the clip edges ``-n`` and ``n``, so a clipped weight (``c = +-n``) is
  at distance 0 and keeps training; on the example exactly entries 2 and 5 (``v = 2.047`` and
  ``-2.538``) train.

:func:`confidence_guided_annealing` is an Optax transform that zeroes the frozen entries'
updates, from the mask of the current params. Put it **last** in the chain: then decoupled weight
decay, momentum and the learning rate are all zeroed and frozen entries stay bit for bit (e.g.
``optax.chain(optax.adamw(lr, weight_decay=wd), cga)`` or after :func:`qjax.optim.qat_adamw`).
The released code also zeroes the gradient before the optimizer step (Adam moments then see a
zero gradient for frozen entries): ``optax.chain(cga, optax.adamw(...), cga)`` reproduces both
(the transform is stateless and the mask is the same at both ends).

:func:`track_oscillations` tracks the StatsQ codes of the params with
:mod:`qjax.methods.oscillation` (Nagel et al., 2022) inside the optimizer and can freeze
oscillating weights: their latent value is held at the centre of the bin of their frozen code,
``(q_frozen + 1/2) * step``, so the quantized forward uses the frozen code.

References:
  Liu, S.-Y., Liu, Z., Cheng, K.-T. (2023). Oscillation-free Quantization for Low-bit Vision
  Transformers. ICML. arXiv:2302.02210 (code: github.com/nbasyl/OFQ).
  Nagel, M., Fournarakis, M., Bondarenko, Y., Blankevoort, T. (2022). Overcoming Oscillations
  in Quantization-Aware Training. ICML. arXiv:2203.11086.
"""

from qjax._src.methods.ofq import (
    BOUNDARIES,
    DEFAULT_GRANULARITY,
    Boundaries,
    CGAState,
    Mask,
    TrackOscillationsState,
    boundary_distance,
    cga_trainable,
    confidence_guided_annealing,
    statsq,
    statsq_codes,
    statsq_spec,
    statsq_step,
    track_oscillations,
)

__all__ = [
    "Boundaries",
    "BOUNDARIES",
    "CGAState",
    "boundary_distance",
    "cga_trainable",
    "confidence_guided_annealing",
    "DEFAULT_GRANULARITY",
    "Mask",
    "statsq",
    "statsq_codes",
    "statsq_spec",
    "statsq_step",
    "track_oscillations",
    "TrackOscillationsState",
]
