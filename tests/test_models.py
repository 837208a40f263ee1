"""Tests for qjax.models.llama: shapes, causality, the recipe's init and the QAT rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.models import Llama, LlamaConfig, quantization_rules
from qjax.models.llama import non_embedding_params

CFG = LlamaConfig(d_model=64, n_layers=2, n_heads=2, max_seq_len=16)
IDS = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)


@pytest.fixture(scope="module")
def params():
    return Llama(CFG).init(jax.random.key(1), IDS)["params"]


def test_shapes_and_recipe_init(params):
    logits = Llama(CFG).apply({"params": params}, IDS)
    assert logits.shape == (2, 16, 256) and logits.dtype == jnp.float32
    assert CFG.ffn_hidden == 256 and LlamaConfig(d_model=128).ffn_hidden == 512
    assert params["blocks_0"]["mlp"]["up"]["kernel"].shape == (64, 256)
    assert "bias" not in params["blocks_0"]["attn"]["q"]
    assert float(jnp.std(params["blocks_0"]["attn"]["q"]["kernel"])) == pytest.approx(0.02, rel=0.1)
    assert float(jnp.std(params["blocks_0"]["attn"]["o"]["kernel"])) == pytest.approx(
        0.02 / 2, rel=0.1)
    # 2 blocks x (4 d^2 attention + 3 d h MLP + 2 d norms) + final norm d
    assert non_embedding_params(params) == 2 * (4 * 64 * 64 + 3 * 64 * 256 + 2 * 64) + 64


def test_causal(params):
    changed = IDS.at[:, 10:].set(7)
    a = Llama(CFG).apply({"params": params}, IDS)
    b = Llama(CFG).apply({"params": params}, changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_quantization_rules_cover_block_linears_only():
    qm = qjax.nn.quantize_model(Llama(CFG), quantization_rules(qjax.nn.Method("ste")))
    qm.init(jax.random.key(0), IDS)
    assert len(qm.layers) == 14
    assert all(k.startswith("blocks_") for k in qm.layers)
    assert quantization_rules(None) == {}


def test_config_validation():
    with pytest.raises(ValueError, match="n_heads"):
        LlamaConfig(d_model=64, n_heads=3)
    with pytest.raises(ValueError, match="d_model"):
        LlamaConfig(d_model=0)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        Llama(CFG).init(jax.random.key(0), jnp.zeros((1, 17), jnp.int32))
