"""A Llama-style decoder in plain Flax Linen, quantized with :func:`qjax.nn.quantize_model`.

The QuEST paper's setup: RMSNorm (eps 1e-5), rotary embeddings (theta 1e4), SwiGLU MLP with hidden
``round_up(8/3 * d, multiple)``, no biases, untied input embedding and LM head, init std 0.02 and
``0.02 / sqrt(2 L)`` for the residual output projections. The model is written with ordinary
``nn.Dense`` layers; :func:`quantization_rules` quantizes every linear layer inside the blocks
(``blocks_<i>/attn/{q,k,v,o}``, ``blocks_<i>/mlp/{gate,up,down}``) and leaves the embedding, the
LM head and the norms in high precision.

``Llama(config, attention=attention_quant(8, 8, kv_bits=4))`` also quantizes the attention itself
(:mod:`qjax.attention`: Q, K, V per token and head, the probabilities per row), following the
``qat=`` switch of :meth:`qjax.nn.QuantizedLinenModel.apply` (:func:`qjax.nn.ops.qat_active`).
``Llama.extend(ids, caches)`` runs new tokens against per-block :class:`~qjax.attention.KVCache`
s (:func:`init_caches`; keys and values stored with the attention's K spec) and returns the
logits and the extended caches; :func:`greedy_generate` decodes with it, from a QAT model
(``apply(..., method="extend")``) or a converted one (``qjax.convert.serve(..., method="extend")``).
A float cache gives the full forward's logits, a quantized one those of QAT with the same specs,
up to float accumulation order (the cached attention sums over the cache's capacity, and one
token per call multiplies fewer rows, which XLA may round differently; tested, with the same
greedy tokens).
"""

from qjax._src.models.llama import (
    BLOCK_LINEARS,
    MLP,
    PARTITION_RULES,
    Attention,
    Block,
    Embed,
    Llama,
    LlamaConfig,
    greedy_generate,
    init_caches,
    non_embedding_params,
    quantization_rules,
)

__all__ = [
    "Attention",
    "Block",
    "BLOCK_LINEARS",
    "Embed",
    "greedy_generate",
    "init_caches",
    "Llama",
    "LlamaConfig",
    "MLP",
    "non_embedding_params",
    "PARTITION_RULES",
    "quantization_rules",
]
