"""Tests for qjax.nn.quantize_model on Flax models written without qjax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qjax
from qjax._src.nn.rewrite import parse_rules
from qjax.nn import LayerQuant, Method

X = jax.random.normal(jax.random.key(0), (8, 64))
Y = jnp.sin(X[:, :4] * 2.0)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(128, name="up")(x))
        x = nn.relu(nn.Dense(128, name="mid")(x))
        return nn.Dense(4, name="down")(x)


W4 = qjax.QuantSpec("int4", qjax.PerRow(0))
A8 = qjax.QuantSpec("int8", qjax.PerRow(-1))


def test_linen_matched_layers_quantized_unmatched_untouched():
    qm = qjax.nn.quantize_model(MLP(), [("up|mid", LayerQuant(W4, A8)), ("down", None)])
    v = qm.init(jax.random.key(1), X)
    assert set(qm.layers) == {"up", "mid"}
    p = v["params"]
    h = nn.relu(qjax.fake_quant(X, A8) @ qjax.fake_quant(p["up"]["kernel"], W4) + p["up"]["bias"])
    h = nn.relu(qjax.fake_quant(h, A8) @ qjax.fake_quant(p["mid"]["kernel"], W4)
                + p["mid"]["bias"])
    ref = h @ p["down"]["kernel"] + p["down"]["bias"]
    np.testing.assert_allclose(qm.apply(v, X), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(qm.apply(v, X, qat=False), MLP().apply(v, X))


@pytest.mark.parametrize("method", ["lsq", "pact", "ste", Method("quest", hadamard_block=64)])
def test_linen_qat_trains(method):
    qm = qjax.nn.quantize_model(MLP(), {"up|mid|down": method})
    params = qm.init(jax.random.key(2), X)["params"]
    tx = qjax.optim.qat_adamw(1e-2, weight_decay=0.0)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((qm.apply({"params": p}, X) - Y) ** 2))(
            params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    losses = []
    for _ in range(25):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


class Block(nn.Module):
    """A standard pre-norm transformer block from stock Flax layers."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=32, name="attn")(h, h)
        h = nn.LayerNorm()(x)
        return x + nn.Dense(32, name="fc2")(nn.gelu(nn.Dense(64, name="fc1")(h)))


def test_standard_transformer_block_trains_with_qat():
    x = jax.random.normal(jax.random.key(3), (4, 6, 32))
    target = jnp.roll(x, 1, axis=1)
    qm = qjax.nn.quantize_model(Block(), {".*": Method("quest", 4, 4, hadamard_block=16)})
    params = qm.init(jax.random.key(4), x)["params"]
    assert set(qm.layers) == {"attn/query", "attn/key", "attn/value", "attn/out", "fc1", "fc2"}
    tx = optax.adam(3e-3)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(
            lambda p: jnp.mean((qm.apply({"params": p}, x) - target) ** 2))(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    first = None
    for _ in range(30):
        params, state, loss = step(params, state)
        first = float(loss) if first is None else first
    assert float(loss) < 0.7 * first


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(64, 128, rngs=rngs), nnx.Linear(128, 4, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](nnx.relu(self.layers[0](x)))


def test_nnx_replaces_matched_submodules_and_trains():
    model = NNXMLP(nnx.Rngs(0))
    float_kernel = model.layers[1].kernel[...]
    qjax.nn.quantize_model(model, {"layers/0": LayerQuant(W4, A8)})
    assert isinstance(model.layers[0], qjax.nn.nnx.QuantizedLayer)
    assert isinstance(model.layers[1], nnx.Linear)
    inner = model.layers[0].inner
    h = nnx.relu(qjax.fake_quant(X, A8) @ qjax.fake_quant(inner.kernel[...], W4) + inner.bias[...])
    ref = h @ float_kernel + model.layers[1].bias[...]
    np.testing.assert_allclose(model(X), ref, rtol=1e-5, atol=1e-5)

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(X) - Y) ** 2))(model)
        optimizer.update(model, g)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(25)]
    assert losses[-1] < 0.5 * losses[0]


def test_nnx_learned_params_live_in_the_tree():
    model = qjax.nn.quantize_model(NNXMLP(nnx.Rngs(0)), {r"layers/\d": "lsq"})
    params = nnx.state(model, nnx.Param)
    assert params["layers"][0]["kernel_scale"][...].shape == (1, 128)
    assert params["layers"][1]["input_scale"][...].shape == ()
    g = nnx.grad(lambda m: jnp.sum(m(X) ** 2))(model)
    assert float(jnp.abs(g["layers"][0]["kernel_scale"][...]).sum()) > 0


def test_rule_errors_and_warnings():
    with pytest.raises(TypeError, match="rule target"):
        qjax.nn.quantize_model(MLP(), {"up": 42})
    with pytest.raises(ValueError, match="unknown method"):
        qjax.nn.quantize_model(MLP(), {"up": "awq"})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        qjax.nn.quantize_model(MLP(), {"up(": "ste"})
    with pytest.raises(TypeError, match="Linen or NNX"):
        qjax.nn.quantize_model(lambda x: x, {"up": "ste"})
    qm = qjax.nn.quantize_model(MLP(), {"up": "ste", "encoder/.*": "ste"})
    with pytest.warns(UserWarning, match="'encoder/.\\*' matches no layer"):
        qm.init(jax.random.key(0), X)
    with pytest.warns(UserWarning, match="matches no layer"):
        qjax.nn.quantize_model(NNXMLP(nnx.Rngs(0)), {"decoder": "ste"})


def test_rules_and_qat_are_type_checked():
    for rules in (None, "ste", 3):
        with pytest.raises(TypeError, match="rules must be a mapping"):
            qjax.nn.quantize_model(MLP(), rules)
    with pytest.raises(TypeError, match="rules must be a mapping"):
        parse_rules(None)
    qm = qjax.nn.quantize_model(MLP(), {".*": "ste"})
    v = qm.init(jax.random.key(0), X)
    with pytest.raises(TypeError, match="qat must be a bool"):
        qm.apply(v, X, qat="no")
    model = qjax.nn.quantize_model(NNXMLP(nnx.Rngs(0)), {r"layers/\d": "ste"})
    model.layers[0].qat = 0
    with pytest.raises(TypeError, match="qat must be a bool"):
        model(X)
