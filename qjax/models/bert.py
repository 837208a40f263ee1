"""A BERT encoder in Flax NNX with sentence-transformers' mean pooling, and its safetensors loader.

The architecture of Hugging Face's ``BertModel`` (Devlin et al., 2019) as sentence-transformers
uses it for ``all-MiniLM-L6-v2``: word + absolute position + token-type embeddings, LayerNorm,
``n_layers`` post-LN blocks ``h = LN(h + Attn(h))``, ``h = LN(h + W2 gelu(W1 h))`` with the exact
(erf) GELU and LayerNorm ``eps = 1e-12``, then the mean of the token states over non-padding
positions, L2-normalized. Inference only: no dropout.

Every projection is an ``nnx.Linear`` (kernel ``(in, out)``), so :func:`qjax.nn.quantize_model`
finds them; :data:`BERT_LINEARS` / :func:`quantization_rules` match the 6 per block
(``layers/<i>/attention/{query,key,value,output}``, ``layers/<i>/{intermediate,output}``) and
leave the embeddings and norms in float.

Weights come from a Hugging Face ``BertModel`` safetensors file (:func:`load_bert_safetensors`):
every tensor of the file is accounted for exactly once and every parameter of the model is set
(see :func:`tensor_map`); linear weights are stored ``(out, in)`` there and transposed here.

References:
  Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
  Understanding", NAACL 2019. Reimers & Gurevych, "Sentence-BERT", EMNLP 2019 (mean pooling).
"""

from qjax._src.models.bert import (
    AUXILIARY_TENSORS,
    BERT_LINEARS,
    MINILM_L6,
    Bert,
    BertAttention,
    BertConfig,
    BertEmbeddings,
    BertLayer,
    bert_from_tensors,
    bert_tensors,
    l2_normalize,
    load_bert_safetensors,
    mean_pool,
    quantization_rules,
    tensor_map,
)

__all__ = [
    "AUXILIARY_TENSORS",
    "Bert",
    "bert_from_tensors",
    "BERT_LINEARS",
    "bert_tensors",
    "BertAttention",
    "BertConfig",
    "BertEmbeddings",
    "BertLayer",
    "l2_normalize",
    "load_bert_safetensors",
    "mean_pool",
    "MINILM_L6",
    "quantization_rules",
    "tensor_map",
]
