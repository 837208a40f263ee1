"""Tests for qjax.diagnostics.gradient_cosine."""

import jax
import jax.numpy as jnp
import optax
import pytest

import qjax
from qjax.diagnostics import gradient_cosine
from qjax.models import Llama, LlamaConfig, quantization_rules
from qjax.nn import Method

CFG = LlamaConfig(d_model=128, n_layers=1, n_heads=2, max_seq_len=32)
IDS = jax.random.randint(jax.random.key(0), (4, 33), 0, 256)


def _loss(model):
    def loss(p, ids, qat):
        logits = model.apply({"params": p}, ids[:, :-1], qat=qat)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    return loss


def test_cosine_is_one_at_high_precision_and_lower_at_low():
    out = {}
    for bits in (8, 2):
        model = qjax.nn.quantize_model(Llama(CFG), quantization_rules(Method("quest", bits, bits)))
        params = model.init(jax.random.key(1), IDS[:, :-1])["params"]
        out[bits] = gradient_cosine(_loss(model), params, IDS)
    assert set(out[8]) == {f"blocks_0/{n}" for n in ("attn/q", "attn/k", "attn/v", "attn/o",
                                                      "mlp/gate", "mlp/up", "mlp/down")} | {
        "all", "lm_head"}
    assert out[8]["all"] > 0.97
    assert out[2]["all"] < out[8]["all"]
    assert out[2]["lm_head"] > 0.5  # float layers see quantized inputs but are not masked


def test_identical_gradients_give_one():
    p = {"d": {"kernel": jnp.arange(6.0).reshape(2, 3)}}
    out = gradient_cosine(lambda p, qat: jnp.sum(p["d"]["kernel"] ** 2), p)
    assert out == {"d": pytest.approx(1.0), "all": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="no parameter leaf"):
        gradient_cosine(lambda p, qat: jnp.sum(p["d"]["kernel"]), p, leaf_name="weight")
