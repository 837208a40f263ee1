"""EdgeQAT: entropy- and distribution-guided QAT of attention, token-adaptive activation bits.

Quantizing queries and keys distorts the attention map (EdgeQAT's diagnosis); two loss terms
added to the task loss counter it, and less important tokens can use fewer activation bits:

* **Entropy** of the quantized queries and keys, by its Gaussian proxy (the entropy of
  ``N(mu, sigma^2)`` is ``log sigma + const``): per token and head, over the head dimension
  ``D``, ``e(X) = mean_{b,t,h} log(1 + Var_d X[b, t, h, :])`` (:func:`qk_entropy`, unbiased
  variance), and ``L_ent = -1/2 log(mean_i e_i)`` over the quantized Q and K of every layer
  (:func:`entropy_loss`): minimizing it spreads the quantized values over more levels.
* **Distribution** of the attention: the quantized model's pre-softmax logits ``S_l`` against
  the float model's ``T_l`` (no gradient), ``L_attn = 1 - mean_{l,b,h} cos(S_l[b,h], T_l[b,h])``
  over the allowed (causal) entries (:func:`attention_map_loss`).
* **Token importance** (:func:`token_importance`): the logit each query gives the first token,
  summed over heads; the ``fraction`` least important tokens (:func:`low_bit_tokens`) are
  quantized with fewer bits (:func:`token_adaptive_fake_quant`, e.g. int4 instead of int8 per
  token and head).

The reference Llama (:mod:`qjax.models.llama`) sows the statistics into the Flax collection
:data:`COLLECTION` when it is mutable (``model.apply(variables, ids, mutable=[COLLECTION])``):
per layer ``"entropy"`` (the quantized Q's and K's :func:`qk_entropy`, when the attention is
quantized) and ``"scores"``; ``python -m qjax.train`` adds ``edgeqat_entropy * L_ent +
edgeqat_attention * L_attn`` to the loss while QAT is on (the teacher of ``L_attn``: the
``init_from`` float model, else the float forward of the current weights).

Where this differs from the authors' released code (read in ``shawnricecake/EdgeQAT``):
``L_ent`` uses the mean instead of the sum inside the log (a constant apart, the same gradient);
the released code *adds* ``+log(sum of cosines)``, which lowers the similarity under gradient
descent, where this module raises it (the paper's intent) and is bounded (``1 - cos`` cannot be
NaN when the cosines sum to <= 0); masked (future) entries do not enter the cosines; token
importance is per sequence rather than averaged over the batch. The released code's
coefficients are ``edgeqat_entropy=1`` (its ``-0.5 log`` is already in :func:`entropy_loss`) and
``edgeqat_attention=1``.

References:
  Shen, X., Kong, Z., Yang, C., et al. (2024). EdgeQAT: Entropy and Distribution Guided
  Quantization-Aware Training for the Acceleration of Lightweight LLMs on the Edge.
  arXiv:2402.10787.
"""

from qjax._src.methods.edgeqat import (
    COLLECTION,
    attention_map_loss,
    entropy_loss,
    low_bit_tokens,
    qk_entropy,
    token_adaptive_fake_quant,
    token_importance,
)

__all__ = [
    "COLLECTION",
    "attention_map_loss",
    "entropy_loss",
    "low_bit_tokens",
    "qk_entropy",
    "token_adaptive_fake_quant",
    "token_importance",
]
