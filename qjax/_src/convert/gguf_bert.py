"""GGUF export of the BERT encoder (:mod:`qjax.models.bert`): a llama.cpp ``bert`` embedder.

:func:`export_gguf_bert` writes a float :class:`~qjax.models.bert.Bert`, or the serving model
:func:`qjax.convert.convert` makes of a quantized one, with its WordPiece tokenizer, as the file
llama.cpp's ``convert_hf_to_gguf.py`` writes for a Hugging Face ``BertModel``:

* **Tensors**: llama.cpp's BERT names (``token_embd``, ``position_embd``, ``token_types``,
  ``token_embd_norm``, ``blk.N.attn_q/attn_k/attn_v/attn_output/attn_output_norm/ffn_up/ffn_down/
  layer_output_norm``, each ``.weight`` and ``.bias``), found by gguf's own ``TensorNameMap``
  from the Hugging Face names of :func:`qjax.models.bert.tensor_map`; linear weights ``(out,
  in)``. A serving kernel trained with :func:`qjax.presets.gguf_q8_0` / ``gguf_q4_0`` is written
  as Q8_0 / Q4_0 blocks, bit for bit (:func:`qjax.convert.gguf_tensor`), any other QArray
  dequantized and every float leaf as F32: the file holds qjax's weight values.
* **Hyper-parameters**: ``bert.context_length`` (``max_seq_len``, the position rows),
  ``embedding_length``, ``feed_forward_length``, ``block_count``, ``attention.head_count``,
  ``attention.layer_norm_epsilon``, ``attention.causal = False``, ``pooling_type = MEAN``
  (sentence-transformers' mean pooling; the caller L2-normalizes).
* **Vocabulary** (tokenizer model ``bert``, llama.cpp's WPM tokenizer), as the converter's
  ``BertModel.set_vocab``: token ``i`` of ``tokenizer.get_vocab()``; added special tokens keep
  their text (type CONTROL), ``##`` continuation pieces lose the ``##``, every other token gets
  the phantom-space prefix U+2581 (llama.cpp prefixes each word with it, so word-initial and
  continuation pieces stay distinct; the converter's current rule, by token type: a
  non-special ``[unusedN]`` gets the prefix too); token types NORMAL / CONTROL / USER_DEFINED;
  ``token_type_count`` (the token-type rows); BOS = CLS and EOS = SEP (no CLS key exists),
  UNK, SEP, and PAD / MASK when the vocabulary has ``[PAD]`` / ``[MASK]``; the BertNormalizer's
  ``lowercase`` / ``strip_accents`` (``tokenizer.ggml.normalizer.*``, read by current llama.cpp;
  older versions always lowercase and strip accents).

Checks (ValueError naming what is wrong, before anything is written):

* the model: QAT layers (``QuantizedLayer`` & co., i.e. float kernels and ``kernel_scale`` where
  the rules quantize: convert first); a kernel stored Hadamard-rotated (llama.cpp does not
  rotate inputs); a layer that quantizes its activations (its recipe's, or a serving
  ``act_spec``) other than as llama.cpp does itself (Q8_0 blocks along ``K`` for a Q8_0 / Q4_0
  weight); a tensor whose shape disagrees with the config; any state leaf the file would not
  carry (a learned ``input_scale``, an adapter, an extra parameter) is refused rather than
  dropped.
* the tokenizer: a WordPiece model with ``##`` continuations, a ``BertNormalizer`` (clean text,
  split CJK characters) and ``BertPreTokenizer``, and a post-processor that wraps a sentence as
  ``[CLS] ... [SEP]`` (what llama.cpp's WPM tokenizer does, always); exactly
  ``config.vocab_size`` tokens with ids ``0 .. vocab_size - 1``; distinct texts after the
  phantom-space rewrite. (llama.cpp has no ``max_input_chars_per_word``: a word longer than
  that, 100 for BERT, is ``[UNK]`` in ``tokenizers`` but split into pieces by llama.cpp.)

llama.cpp's ``bert`` graph computes GELU with the tanh approximation (from an fp16 table on
CPU) where BERT and qjax use the exact erf: the float file's embeddings differ from qjax's by a
cosine distance of at most ~3e-6 on all-MiniLM-L6-v2 (benchmarks/gguf_bert_llamacpp.py).

The file is written to a temporary path and renamed when complete; an existing ``path`` raises
``FileExistsError`` unless ``overwrite=True`` (:func:`qjax.convert.save`'s policy).

References:
  llama.cpp ``convert_hf_to_gguf.py`` (``BertModel.set_vocab``, ``get_vocab_base``),
  ``src/models/bert.cpp``, ``src/llama-vocab.cpp`` (``llm_tokenizer_wpm_session``); gguf-py
  (``GGUFWriter``, ``TensorNameMap``, ``SpecialVocab``). Devlin et al., 2019 (BERT).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import gguf
import numpy as np
from flax import nnx

from qjax._src import presets
from qjax._src.convert.gguf_export import file_type, gguf_tensor, gguf_tensor_type
from qjax._src.convert.io import check_overwrite, flatten, write_atomically
from qjax._src.convert.nnx_serving import ServingLayer
from qjax._src.models.bert import Bert, BertConfig, tensor_map
from qjax._src.nn.rewrite import sites
from qjax._src.qarray import QArray

__all__ = ["export_gguf_bert", "bert_gguf_tensors", "wordpiece_vocab"]

_ARCH = gguf.MODEL_ARCH.BERT
_F32 = gguf.GGMLQuantizationType.F32
_PHANTOM = "\u2581"
# llama.cpp's BertNormalizer keys: llama.cpp's in-tree gguf-py names them, the PyPI gguf
# releases up to 0.19 do not.
_LOWERCASE = getattr(gguf.Keys.Tokenizer, "NORMALIZER_LOWERCASE",
                     "tokenizer.ggml.normalizer.lowercase")
_STRIP_ACCENTS = getattr(gguf.Keys.Tokenizer, "NORMALIZER_STRIP_ACCENTS",
                         "tokenizer.ggml.normalizer.strip_accents")
# llama.cpp quantizes the activations of a Q8_0 / Q4_0 matmul to Q8_0 blocks along K itself.
_LLAMACPP_ACTIVATIONS = presets.gguf_q8_0(-1)


# --- tensors -------------------------------------------------------------------------------------

def _check_layers(model: Bert) -> dict[tuple, ServingLayer]:
    """The serving layers by module path, after the per-layer checks (module docstring)."""
    qat = sites(model)
    if qat:
        raise ValueError(f"layer {next(iter(qat))!r} is a QAT layer (float kernel and learned "
                         "quantizer state, written as F32 it would not be the quantized model): "
                         "convert the model with qjax.convert.convert first")
    out = {}
    for path, module in nnx.iter_modules(model):
        if not isinstance(module, ServingLayer):
            continue
        name = "/".join(map(str, path))
        kernel = module.kernel.get_value()
        act = module.lq.activation if module.lq.activation is not None else module.act_spec
        if isinstance(kernel, QArray) and kernel.spec.hadamard_block is not None:
            raise ValueError(f"layer {name!r} is stored Hadamard-rotated; llama.cpp does not "
                             "rotate its inputs, so it cannot run this model")
        if act is not None and not (act == _LLAMACPP_ACTIVATIONS and
                                    gguf_tensor_type(kernel) != _F32):
            raise ValueError(
                f"layer {name!r} quantizes its activations ({act}); llama.cpp would run it "
                "with float activations, or with its own Q8_0 blocks along K for a Q8_0/Q4_0 "
                "weight (presets.gguf_q8_0(axis=-1)), so the file would serve another model")
        out[tuple(path)] = module
    return out


def bert_gguf_tensors(model: Bert) -> dict[str, object]:
    """llama.cpp tensor name -> array or QArray (linear weights ``(out, in)``) of a float
    :class:`~qjax.models.bert.Bert` or its serving model.

    Raises:
      TypeError: ``model`` is not a Bert (or a serving copy of one).
      ValueError: QAT layers, Hadamard-rotated kernels, quantized activations llama.cpp would not
        reproduce, a tensor of another shape than the config's, or a state leaf the file would
        not carry (module docstring).
    """
    if not isinstance(model, Bert):
        raise TypeError(f"model must be a Bert or its qjax.convert.convert serving model, got "
                        f"{type(model).__name__}")
    config: BertConfig = model.config
    serving = _check_layers(model)
    state = nnx.to_pure_dict(nnx.state(model))
    names = gguf.get_tensor_name_map(_ARCH, config.n_layers)
    known = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[_ARCH]
             for i in range(config.n_layers)}
    used: set[str] = set()
    out: dict[str, object] = {}
    for hf, (path, shape, transposed) in tensor_map(config).items():
        layer = serving.get(tuple(path[:-1]))
        if layer is not None:  # a ServingLayer: kernel beside the Flax layer, bias inside it
            path = path[:-1] + ("inner", path[-1]) if path[-1] != "kernel" else path
        node = state
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        where = "/".join(map(str, path))
        if node is None:
            raise ValueError(f"the model has no parameter {where} (Hugging Face {hf}); the "
                             "export needs every tensor of the BERT encoder")
        used.add("/" + where)
        if transposed and not isinstance(node, QArray):
            node = np.asarray(node).T  # nnx.Linear kernels are (in, out)
        got = tuple(node.shape) if isinstance(node, QArray) else np.shape(node)
        if got != shape:
            raise ValueError(f"{where} has shape {got} (as stored in the file), the config's is "
                             f"{shape}: the model does not match model.config")
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None or name.rsplit(".", 1)[0] not in known:
            raise ValueError(f"the gguf package maps {hf!r} to {name!r}, not a tensor of "
                             "llama.cpp's bert architecture")
        out[name] = node
    unused = sorted(set(flatten(state)) - used)
    if unused:
        raise ValueError(f"the model has state a llama.cpp bert model does not read: {unused} "
                         "(it would be dropped)")
    return out


# --- vocabulary ----------------------------------------------------------------------------------

def _special(post: Mapping | None) -> dict[str, tuple[str, list[int]]]:
    """``{"cls", "sep": (text, ids)}`` of a post-processor that wraps one sentence as
    ``CLS ... SEP``."""
    kind = None if post is None else post.get("type")
    if kind == "BertProcessing":
        return {k: (post[k][0], [post[k][1]]) for k in ("cls", "sep")}
    if kind == "TemplateProcessing":
        single, ids = post.get("single", []), post.get("special_tokens", {})
        if (len(single) == 3 and "SpecialToken" in single[0] and "Sequence" in single[1]
                and "SpecialToken" in single[2]):
            texts = {"cls": single[0]["SpecialToken"]["id"],
                     "sep": single[2]["SpecialToken"]["id"]}
            return {k: (t, ids.get(t, {}).get("ids")) for k, t in texts.items()}
    raise ValueError(f"tokenizer.post_processor is {kind or 'None'} "
                     f"{json.dumps(post)[:200] if post else ''}: llama.cpp's WPM tokenizer "
                     "always wraps a sentence as [CLS] ... [SEP], so the tokenizer must too "
                     "(BertProcessing, or TemplateProcessing with single = CLS $A SEP)")


def wordpiece_vocab(tokenizer, vocab_size: int) -> dict:
    """The llama.cpp vocabulary of a ``tokenizers.Tokenizer`` (WordPiece), as the converter
    writes it (module docstring).

    Returns:
      ``{"tokens": [str], "types": [gguf.TokenType], "ids": {"bos", "eos", "unk", "sep"[,
      "pad"][, "mask"]: int}, "lowercase": bool, "strip_accents": bool}``.

    Raises:
      TypeError: ``tokenizer`` is not a ``tokenizers.Tokenizer``.
      ValueError: a tokenizer llama.cpp cannot reproduce, or of another size than
        ``vocab_size`` (module docstring).
    """
    if not (callable(getattr(tokenizer, "get_vocab", None)) and
            callable(getattr(tokenizer, "to_str", None))):
        raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got "
                        f"{type(tokenizer).__name__}")
    spec = json.loads(tokenizer.to_str())
    model, norm, pre = spec.get("model") or {}, spec.get("normalizer"), spec.get("pre_tokenizer")
    if model.get("type") != "WordPiece" or model.get("continuing_subword_prefix") != "##":
        raise ValueError(f"tokenizer.model must be WordPiece with continuing_subword_prefix "
                         f"'##' (llama.cpp's WPM), got {model.get('type')} "
                         f"{model.get('continuing_subword_prefix')!r}")
    if not (isinstance(norm, Mapping) and norm.get("type") == "BertNormalizer"
            and norm.get("clean_text") and norm.get("handle_chinese_chars")):
        raise ValueError(f"tokenizer.normalizer must be a BertNormalizer with clean_text and "
                         f"handle_chinese_chars (what llama.cpp's WPM tokenizer does), got "
                         f"{json.dumps(norm)}")
    if not (isinstance(pre, Mapping) and pre.get("type") == "BertPreTokenizer"):
        raise ValueError(f"tokenizer.pre_tokenizer must be a BertPreTokenizer (llama.cpp splits "
                         f"words as it does), got {json.dumps(pre)}")
    special = _special(spec.get("post_processor"))
    vocab = tokenizer.get_vocab()  # with the added tokens
    if len(vocab) != vocab_size or set(vocab.values()) != set(range(vocab_size)):
        raise ValueError(f"the tokenizer has {len(vocab)} tokens with ids up to "
                         f"{max(vocab.values(), default=-1)}, the model's embedding "
                         f"{vocab_size} rows: they do not belong together")
    for key, (text, ids) in special.items():
        if text not in vocab or ids != [vocab[text]]:
            raise ValueError(f"tokenizer.post_processor adds {key} {text!r} as ids {ids}, its "
                             f"vocabulary has it as {vocab.get(text)}: llama.cpp adds the "
                             "vocabulary's")
    cls, sep = special["cls"][0], special["sep"][0]
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [""] * vocab_size, [gguf.TokenType.NORMAL] * vocab_size
    for text, i in vocab.items():
        if i in added:
            types[i] = (gguf.TokenType.CONTROL if added[i].special
                        else gguf.TokenType.USER_DEFINED)
        if types[i] == gguf.TokenType.CONTROL:
            tokens[i] = text
        elif text.startswith("##"):
            tokens[i] = text[2:]
        else:
            tokens[i] = _PHANTOM + text
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in seen:
            raise ValueError(f"tokens {seen[t]} and {i} are both {t!r} in llama.cpp's "
                             "phantom-space vocabulary: it could not tell them apart")
        seen[t] = i
    ids = {"bos": cls, "eos": sep, "unk": model.get("unk_token"), "sep": sep, "pad": "[PAD]",
           "mask": "[MASK]"}
    if ids["unk"] not in vocab:
        raise ValueError(f"the tokenizer's unk_token {ids['unk']!r} is not in its vocabulary")
    lowercase = bool(norm.get("lowercase"))
    strip = norm.get("strip_accents")
    return {"tokens": tokens, "types": types,
            "ids": {k: vocab[t] for k, t in ids.items() if t in vocab},
            "lowercase": lowercase, "strip_accents": lowercase if strip is None else bool(strip)}


# --- file ----------------------------------------------------------------------------------------

def _metadata(w: gguf.GGUFWriter, c: BertConfig, vocab: dict) -> None:
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_feed_forward_length(c.hidden)
    w.add_block_count(c.n_layers)
    w.add_head_count(c.n_heads)
    w.add_layer_norm_eps(float(c.norm_eps))
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")  # llama.cpp's WPM tokenizer has one pre-tokenizer
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_type_count(c.type_vocab_size)
    for key, i in vocab["ids"].items():
        getattr(w, f"add_{key}_token_id")(i)
    # As gguf.SpecialVocab reads the template CLS $A SEP / CLS $A SEP $B SEP.
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    w.add_add_sep_token(False)
    w.add_bool(_LOWERCASE, vocab["lowercase"])
    w.add_bool(_STRIP_ACCENTS, vocab["strip_accents"])


def export_gguf_bert(model: Bert, path: str, tokenizer, *, name: str = "qjax",
                     overwrite: bool = False) -> None:
    """Writes ``model`` and ``tokenizer`` as a llama.cpp ``bert`` embedding model to the GGUF
    file ``path`` (see the module docstring).

    Args:
      model: a float :class:`~qjax.models.bert.Bert` (``(batch, seq)`` ids -> ``(batch,
        d_model)`` embeddings), or the :func:`qjax.convert.convert` serving model of one
        quantized by :func:`qjax.nn.quantize_model` (QArray kernels ``(out, in)``).
      path: the file to write (atomically).
      tokenizer: its ``tokenizers.Tokenizer`` (WordPiece, ``config.vocab_size`` tokens), e.g.
        from :func:`qjax.models.minilm.load_minilm`.
      name: ``general.name``.
      overwrite: replace an existing ``path`` (a file or a directory); False raises.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      TypeError: ``model``, ``tokenizer``, ``name`` or ``overwrite`` of the wrong type.
      ValueError: a model or tokenizer llama.cpp would not run as qjax does (module docstring).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    path = check_overwrite(path, overwrite)
    tensors = bert_gguf_tensors(model)
    vocab = wordpiece_vocab(tokenizer, model.config.vocab_size)

    def write(tmp):
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[_ARCH])
        w.add_name(name)
        w.add_file_type(file_type(tensors))
        _metadata(w, model.config, vocab)
        for tname, a in tensors.items():
            data, qtype = gguf_tensor(a)
            w.add_tensor(tname, data, raw_dtype=None if qtype == _F32 else qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_atomically(path, write, overwrite=overwrite)
