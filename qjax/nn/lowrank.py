"""QAT of pretrained weights with low-rank adapters: LR-QAT and QALoRA (EfficientDM).

Both replace a layer's float kernel ``W0`` by a frozen tensor plus a trainable low-rank update,
in the kernel's matrix view ``(K, N)`` (:class:`qjax.nn.KernelLayout`), with ``delta = (alpha / r) D
U``
for ``D = lora_down (K, r)`` (random) and ``U = lora_up (r, N)`` (zero at init):

* **LR-QAT** (Bondarenko et al. 2024): frozen ``Phi0 = W0 / s0`` (``s0`` the weight spec's scale
  of ``W0``), kept in float32, bfloat16, or as int8 fixed point with ``8 - b`` fractional bits
  (``"int8"``: ``int8(round(clip(Phi0, qmin, qmax) * 2^(8-b)))``, Q4.4 at 4 bits);
  ``W_int = clip(round_ste(Phi0 + delta), qmin, qmax)`` (the spec's rounding; gradient 1 inside
  the grid, 0 outside); trainable scale ``s`` (init ``s0``); ``W_hat = s * W_int``. ``dL/ds =
  sum G * W_int`` (no LSQ term). The merged model holds the codes ``W_int`` and ``s``.
* **QALoRA** (He et al. 2024, EfficientDM): frozen dequantized ``W0' = Q(W0)`` (round to nearest
  with the spec's rule), ``W_hat = LSQ_s(W0' + delta)`` with a learned step ``s`` (init ``s0``).

With ``U = 0`` (init) both equal round-to-nearest PTQ of ``W0`` bit for bit (LR-QAT with a
float32 ``Phi0``). The frozen tensor lives outside the trained parameters (the Linen collection
:data:`FROZEN`; the NNX variable type :class:`FrozenWeight`), so gradients and optimizer state
cover only ``D``, ``U`` and ``s``; the original ``W0`` is not kept. ``W_hat`` is rebuilt inside
``jax.checkpoint`` with the layer's product, so it is not stored for the backward pass.

References:
  Bondarenko et al., 2024, "Low-Rank Quantization-Aware Training for LLMs" (arXiv 2406.06385);
  He et al., 2024, "EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit Diffusion
  Models" (arXiv 2310.03270); Hu et al., 2021, LoRA.
"""

from qjax._src.nn.lowrank import (
    FROZEN,
    LowRankQAT,
    effective_kernel,
    float_kernel,
    lr_qat,
    merged_codes,
    qalora,
)

__all__ = [
    "FROZEN",
    "effective_kernel",
    "float_kernel",
    "LowRankQAT",
    "lr_qat",
    "merged_codes",
    "qalora",
]
