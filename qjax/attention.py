"""Quantized attention and a quantized KV cache, as functions a model's own attention calls.

``quantized_attention(q, k, v, spec_q=, spec_k=, spec_v=, spec_p=)`` is softmax attention with
each of the queries, keys, values and attention probabilities passed through
:func:`qjax.fake_quant` (any :class:`~qjax.QuantSpec`: per head, per token, per channel or per
group, with its estimator), in float32::

    S = fq(q) fq(k)^T / sqrt(D)   (+ mask: -inf where not allowed)
    P = fq_p(softmax(S))          (probabilities: unsigned grids, e.g. "uint8" per row)
    O = P fq(v)

It is two public steps a model can also call apart, ``attention_logits(fq(q), fq(k))`` then
``attend(logits, fq(v), spec_p=)`` (bit for bit the same), for a V quantization that depends on
the logits: EdgeQAT's token-adaptive widths (``AttentionQuant(..., q_low=, k_low=, v_low=,
low_fraction=)``, ``attention_quant(..., low_bits=)``), where the least important tokens of a
sequence (``qjax.methods.edgeqat.token_importance``) use fewer bits.

Layouts: ``q (B, T, H, D)``, ``k, v (B, S, H, D)``; ``mask`` broadcastable to ``(B, H, T, S)``
(True = attend); ``causal=True`` masks ``s > t + offset`` (``offset = S - T``, so a block of new
queries attends to the whole cache before it). Grouped-query attention: ``k`` and ``v`` may have
fewer heads, dividing ``H``. A spec of None leaves that operand in float.

The KV cache stores keys and values as :class:`~qjax.QArray` codes and scales (e.g. int8 or
int4 per token and group of the head dimension: ``kv_cache_spec(bits, group)``), so it really
is 4x / ~6x smaller than float32 (int4 codes packed two per byte). Appending quantizes the new
tokens with :func:`qjax.quantize`; attention reads the cache back with :func:`qjax.dequantize`,
which equals :func:`qjax.fake_quant` of the same tokens bit for bit, so decoding with a
quantized cache computes exactly what QAT with ``spec_k = spec_v = kv_cache_spec(...)``
computed for those tokens.

References:
  Shen et al., 2024. EdgeQAT: Entropy and Distribution Guided Quantization-Aware Training for
  the Acceleration of Lightweight LLMs on the Edge. arXiv 2402.10787.
"""

from qjax._src.attention import (
    AttentionQuant,
    KVCache,
    append_kv,
    attend,
    attention_logits,
    attention_quant,
    cached_attention,
    init_kv_cache,
    kv_cache_bytes,
    kv_cache_spec,
    quantized_attention,
)

__all__ = [
    "append_kv",
    "attend",
    "attention_logits",
    "attention_quant",
    "AttentionQuant",
    "cached_attention",
    "init_kv_cache",
    "kv_cache_bytes",
    "kv_cache_spec",
    "KVCache",
    "quantized_attention",
]
