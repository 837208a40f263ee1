"""Tests for qjax.convert.export_gguf: gguf reads back qjax's weights bit for bit."""

import functools
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

import qjax
from qjax import convert as QC
from qjax import presets
from qjax._src.convert.gguf_export import rope_permutation
from qjax._src.models.llama import Llama, LlamaConfig, _rope, quantization_rules
from qjax.nn import LayerQuant, Method, quantize_model

CFG = LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, hidden=128, max_seq_len=8)
IDS = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)
RULES = {r"blocks_0/attn/[qkvo]": LayerQuant(presets.gguf_q4_0(axis=0)),
         r"blocks_0/mlp/.*": LayerQuant(presets.gguf_q8_0(axis=0)),
         r"blocks_1/.*": Method("ste", 4, None)}  # no GGUF type: written as F32 values


@functools.cache
def setup():
    qm = quantize_model(Llama(CFG), RULES)
    params = qm.init(jax.random.key(0), IDS)["params"]
    return params, QC.convert(params, qm)


def read(path):
    r = gguf.GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def test_llama_file_tensors_equal_qjax_dequantized_bit_for_bit(tmp_path):
    params, sp = setup()
    path = str(tmp_path / "m.gguf")
    QC.export_gguf(sp, path, CFG)
    assert os.listdir(tmp_path) == ["m.gguf"]
    r, t = read(path)
    names = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in (
            "attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
            "ffn_up", "ffn_down")}
    assert set(t) == names
    Q = gguf.GGMLQuantizationType
    assert t["blk.0.attn_q.weight"].tensor_type == Q.Q4_0
    assert t["blk.0.ffn_down.weight"].tensor_type == Q.Q8_0
    assert t["blk.1.attn_q.weight"].tensor_type == Q.F32
    inverse = np.argsort(rope_permutation(CFG.n_heads, CFG.d_model // CFG.n_heads))
    for i in range(2):
        for ours, theirs in (("attn/q", "attn_q"), ("attn/k", "attn_k"), ("attn/v", "attn_v"),
                             ("attn/o", "attn_output"), ("mlp/gate", "ffn_gate"),
                             ("mlp/up", "ffn_up"), ("mlp/down", "ffn_down")):
            a, b = ours.split("/")
            tensor = t[f"blk.{i}.{theirs}.weight"]
            got = gguf_dequantize(tensor.data, tensor.tensor_type)
            if b in "qk":
                got = got[inverse]
            want = np.asarray(qjax.dequantize(sp[f"blocks_{i}"][a][b]["kernel"]))
            np.testing.assert_array_equal(got, want, err_msg=theirs)
    np.testing.assert_array_equal(t["token_embd.weight"].data, params["embed"]["embedding"])
    np.testing.assert_array_equal(t["output.weight"].data, params["lm_head"]["kernel"].T)
    np.testing.assert_array_equal(t["blk.1.ffn_norm.weight"].data,
                                  params["blocks_1"]["mlp_norm"]["scale"])
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == 2 and field("llama.embedding_length") == 64
    assert field("llama.feed_forward_length") == 128
    assert field("llama.attention.head_count") == field("llama.attention.head_count_kv") == 2
    assert field("llama.rope.dimension_count") == 32
    assert field("llama.rope.freq_base") == pytest.approx(1e4)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 256 and tokens[10] == "<0x0A>"


def _llamacpp_rope(x, theta):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM on (seq, heads, hd): pairs (2i, 2i + 1)."""
    t, _, d = x.shape
    freqs = theta ** (-np.arange(0, d // 2, dtype=np.float64) * 2 / d)
    ang = np.arange(t)[:, None] * freqs[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def test_rope_permutation_gives_llamacpp_the_models_attention_scores():
    d, heads, t = 64, 2, 8
    hd = d // heads
    wq, wk = (np.asarray(jax.random.normal(k, (d, d))) for k in jax.random.split(jax.random.key(9)))
    x = np.asarray(jax.random.normal(jax.random.key(10), (t, d)))
    # The model: kernels (in, out), half-split RoPE.
    q = _rope(jnp.asarray(x @ wq).reshape(1, t, heads, hd), 1e4)[0]
    k = _rope(jnp.asarray(x @ wk).reshape(1, t, heads, hd), 1e4)[0]
    ref = np.einsum("qhd,khd->hqk", q, k)
    # llama.cpp: weights (out, in) with permuted rows, interleaved RoPE.
    perm = rope_permutation(heads, hd)
    qc = _llamacpp_rope((x @ wq.T[perm].T).reshape(t, heads, hd), 1e4)
    kc = _llamacpp_rope((x @ wk.T[perm].T).reshape(t, heads, hd), 1e4)
    np.testing.assert_allclose(np.einsum("qhd,khd->hqk", qc, kc), ref, rtol=1e-4, atol=1e-3)
    # Without the permutation the scores differ: the test can fail.
    qw = _llamacpp_rope((x @ wq).reshape(t, heads, hd), 1e4)
    kw = _llamacpp_rope((x @ wk).reshape(t, heads, hd), 1e4)
    assert np.max(np.abs(np.einsum("qhd,khd->hqk", qw, kw) - ref)) > 1.0


def test_generic_export_keeps_param_paths(tmp_path):
    _, sp = setup()
    path = str(tmp_path / "g.gguf")
    QC.export_gguf(sp, path)
    _, t = read(path)
    tensor = t["blocks_0.mlp.up.kernel"]
    np.testing.assert_array_equal(gguf_dequantize(tensor.data, tensor.tensor_type),
                                  qjax.dequantize(sp["blocks_0"]["mlp"]["up"]["kernel"]))


def test_export_errors_leave_no_file(tmp_path):
    _, sp = setup()
    path = str(tmp_path / "bad.gguf")
    with pytest.raises(ValueError, match="do not match the Llama config"):
        QC.export_gguf(sp, path, LlamaConfig(vocab_size=256, d_model=64, n_layers=3, n_heads=2,
                                             hidden=128))
    with pytest.raises(ValueError, match="layers the Llama config does not"):
        QC.export_gguf(sp, path, LlamaConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=2,
                                             hidden=128))
    qm = quantize_model(Llama(CFG), quantization_rules(Method("quest", 4, None, hadamard_block=64)))
    quest = QC.convert(qm.init(jax.random.key(0), IDS)["params"], qm)
    with pytest.raises(ValueError, match="Hadamard-rotated"):
        QC.export_gguf(quest, path, CFG)
    with pytest.raises(TypeError, match="config must be"):
        QC.export_gguf(sp, path, {"n_layers": 2})
    assert os.listdir(tmp_path) == []


def test_config_that_disagrees_with_the_tensors_is_refused(tmp_path):
    # A wrong hidden size or d_model wrote a wrong file or raised IndexError.
    import dataclasses
    _, sp = setup()
    path = str(tmp_path / "m.gguf")
    cases = [(dict(hidden=256), r"blocks_0/mlp/gate/kernel .* has shape \(128, 64\).*\(256, 64\)"),
             (dict(d_model=128, n_heads=4), r"embed/embedding has shape \(256, 64\)"),
             (dict(n_layers=3), r"missing \['blocks_2'\]"),
             (dict(n_layers=1), r"layers the Llama config does not: \['blocks_1'\]")]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            QC.export_gguf(sp, path, dataclasses.replace(CFG, **change))
    bad = {**sp, "final_norm": {"scale": np.ones(32, np.float32)}}
    with pytest.raises(ValueError, match=r"final_norm/scale has shape \(32,\)"):
        QC.export_gguf(bad, path, CFG)
    extra = {**sp, "lm_head": {**sp["lm_head"], "bias": np.zeros(256, np.float32)}}
    with pytest.raises(ValueError, match=r"leaves a llama.cpp llama model does not read: "
                                         r"\['/lm_head/bias'\]"):
        QC.export_gguf(extra, path, CFG)
    assert os.listdir(tmp_path) == []


def test_unconverted_qat_params_are_refused(tmp_path):
    # QAT params wrote an all-F32 GGUF silently.
    params, sp = setup()
    path = str(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match=r"layer 'blocks_0/attn/\w+'.* not a QArray; convert"):
        QC.export_gguf(params, path, CFG, model=RULES)
    lsq = {**sp, "blocks_1": {**sp["blocks_1"], "mlp": {**sp["blocks_1"]["mlp"], "up": {
        **sp["blocks_1"]["mlp"]["up"], "kernel_scale": np.ones((1, 128), np.float32)}}}}
    for config in (CFG, None):
        with pytest.raises(ValueError, match=r"kernel_scale .*these are QAT params"):
            QC.export_gguf(lsq, path, config)
    assert os.listdir(tmp_path) == []
    QC.export_gguf(sp, path, CFG, model=RULES)  # converted params pass the same check


def test_export_gguf_overwrite_policy(tmp_path):
    _, sp = setup()
    path = str(tmp_path / "m.gguf")
    QC.export_gguf(sp, path, CFG)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        QC.export_gguf(sp, path, CFG)
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        QC.export_gguf(sp, path, CFG, overwrite=1)
    os.remove(path)
    os.makedirs(os.path.join(path, "sub"))  # a directory in the way is replaced too
    QC.export_gguf(sp, path, CFG, overwrite=True)
    assert os.listdir(tmp_path) == ["m.gguf"] and os.path.isfile(path)
    read(path)
