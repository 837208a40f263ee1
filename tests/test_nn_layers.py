"""Tests for qjax.nn.linen and qjax.nn.nnx layers: core numerics, gradients, Linen == NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.methods import quest
from qjax.nn import LayerQuant, Method
from qjax.nn import linen as QL
from qjax.nn import nnx as QN

X = jax.random.normal(jax.random.key(0), (2, 3, 128))
W_INT4 = qjax.QuantSpec("int4", qjax.PerRow(0), "absmax", "clipped_ste")
A_INT8 = qjax.QuantSpec("int8", qjax.PerRow(-1), "absmax", "ste")
DENSE = qjax.nn.dense_layout((128, 64))


def _copy_into_nnx(module, params):
    for name, value in params.items():
        getattr(module, name)[...] = value
    return module


def test_dense_equals_core_fake_quant_then_matmul():
    layer = QL.QDense(16, weight=W_INT4, activation=A_INT8)
    p = layer.init(jax.random.key(1), X)["params"]
    y = layer.apply({"params": p}, X)
    ref = qjax.fake_quant(X, A_INT8) @ qjax.fake_quant(p["kernel"], W_INT4) + p["bias"]
    np.testing.assert_array_equal(y, ref)
    y_float = layer.apply({"params": p}, X, qat=False)
    dense = nn.Dense(16)
    np.testing.assert_array_equal(y_float, dense.apply({"params": p}, X))


def test_quest_dense_equals_method_dense():
    layer = QL.QDense(16, method="quest", use_bias=False)
    p = layer.init(jax.random.key(1), X)["params"]
    ref = quest.dense(X, p["kernel"], bits_x=4, bits_w=4)
    np.testing.assert_allclose(layer.apply({"params": p}, X), ref, rtol=1e-6, atol=1e-6)
    wonly = QL.QDense(16, method=Method("quest", 4, None), use_bias=False)
    ref = quest.dense(X, p["kernel"], bits_x=None, bits_w=4)
    np.testing.assert_allclose(wonly.apply({"params": p}, X), ref, rtol=1e-5, atol=1e-5)


def test_method_scale_replaces_both_operands_rules():
    lq = Method("quest", scale_rule="mse:8:0.6").layer_quant(DENSE)
    assert lq.weight.scale_rule == lq.activation.scale_rule == qjax.MseSearch(8, 0.6)
    assert Method("quest").layer_quant(DENSE).weight.scale_rule == qjax.RmsGaussian()
    lq = Method("ste", scale_rule=qjax.Percentile(99.0)).layer_quant(DENSE)
    assert lq.weight.scale_rule == lq.activation.scale_rule == qjax.Percentile(99.0)
    assert Method("ste").layer_quant(DENSE).activation.scale_rule == qjax.AbsMax()


@pytest.mark.parametrize("method", ["lsq", "pact"])
def test_gradients_reach_weights_and_learned_quantizer_params(method):
    layer = QL.QDense(16, method=method)
    p = layer.init(jax.random.key(1), X)["params"]
    assert "input_scale" in p and p["input_scale"].shape == ()
    assert ("kernel_scale" in p) == (method == "lsq")
    g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, X) ** 2))(p)
    for name, leaf in g.items():
        assert np.all(np.isfinite(leaf)) and np.any(leaf != 0), name


LAYERS = {
    "dense": (lambda **kw: QL.QDense(16, **kw),
              lambda rngs, **kw: QN.QDense(128, 16, rngs=rngs, **kw), X),
    "einsum": (lambda **kw: QL.QEinsum((128, 4, 8), "btd,dnh->btnh", **kw),
               lambda rngs, **kw: QN.QEinsum("btd,dnh->btnh", (128, 4, 8), rngs=rngs, **kw), X),
    "conv": (lambda **kw: QL.QConv(8, (3, 3), **kw),
             lambda rngs, **kw: QN.QConv(128, 8, (3, 3), rngs=rngs, **kw),
             jax.random.normal(jax.random.key(2), (2, 5, 5, 128))),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("method", ["quest", "lsq", "pact", "ste"])
def test_linen_and_nnx_agree(kind, method):
    make_linen, make_nnx, x = LAYERS[kind]
    target = Method(method, hadamard_block=128) if method == "quest" else method
    lin = make_linen(method=target)
    p = lin.init(jax.random.key(3), x)["params"]
    mod = _copy_into_nnx(make_nnx(nnx.Rngs(0), method=target), p)
    np.testing.assert_array_equal(mod(x), lin.apply({"params": p}, x))
    mod.qat = False
    np.testing.assert_array_equal(mod(x), lin.apply({"params": p}, x, qat=False))


def test_conv_equals_core_fake_quant_then_conv():
    x = LAYERS["conv"][2]
    w_spec = qjax.QuantSpec("int4", qjax.PerAxis(-1))
    layer = QL.QConv(8, (3, 3), weight=w_spec, activation=A_INT8, use_bias=False)
    p = layer.init(jax.random.key(4), x)["params"]
    ref = nn.Conv(8, (3, 3), use_bias=False).apply(
        {"params": {"kernel": qjax.fake_quant(p["kernel"], w_spec)}}, qjax.fake_quant(x, A_INT8))
    np.testing.assert_allclose(layer.apply({"params": p}, x), ref, rtol=1e-5, atol=1e-5)


def test_embed_is_weight_only():
    ids = jnp.array([[1, 5, 7]])
    # Weight specs refer to the (K, N) matrix view, here (features, vocab): one scale per
    # embedding row is PerRow(0) of the view, PerRow(-1) of the table.
    spec = qjax.QuantSpec("int4", qjax.PerRow(0))
    lin = QL.QEmbed(10, 32, weight=spec)
    p = lin.init(jax.random.key(5), ids)["params"]
    np.testing.assert_array_equal(lin.apply({"params": p}, ids),
                                  qjax.fake_quant(p["embedding"], spec.replace(
                                      granularity=qjax.PerRow(-1)))[ids])
    mod = _copy_into_nnx(QN.QEmbed(10, 32, weight=spec, rngs=nnx.Rngs(0)), p)
    np.testing.assert_array_equal(mod(ids), lin.apply({"params": p}, ids))
    with pytest.raises(ValueError, match="weight-only"):
        QL.QEmbed(10, 32, weight=spec, activation=A_INT8).init(jax.random.key(0), ids)
    with pytest.raises(TypeError, match="integers"):
        lin.apply({"params": p}, jnp.ones((1, 2)))


def test_set_qat_switches_every_layer():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = QN.QDense(128, 128, method="ste", rngs=rngs)
            self.b = QN.QDense(128, 4, method="ste", rngs=rngs)

        def __call__(self, x):
            return self.b(self.a(x))

    net = Net(nnx.Rngs(0))
    yq = net(X)
    assert QN.set_qat(net, False) == 2
    y = net(X)
    ref = (X @ net.a.kernel[...] + net.a.bias[...]) @ net.b.kernel[...] + net.b.bias[...]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, yq)
    with pytest.raises(TypeError, match="bool"):
        QN.set_qat(net, 1)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="either method or weight/activation"):
        QL.QDense(4, method="ste", weight=W_INT4).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="unknown method"):
        Method("gptq")
    with pytest.raises(ValueError, match="scale_rule of lsq must be 'auto'"):
        Method("lsq", scale_rule="mse")
    with pytest.raises(ValueError, match="unknown scale rule"):
        Method("quest", scale_rule="gauss")
    with pytest.raises(TypeError, match="rule target"):
        qjax.nn.resolve(3, 0)
    with pytest.raises(ValueError, match="contracts no input axis"):
        QL.QEinsum((128, 4), "btd,dn->btdn", method="ste").init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="half Hadamard"):
        LayerQuant(quest.spec(4, axis=0), A_INT8)
    with pytest.raises(ValueError, match="block sizes differ"):
        LayerQuant(quest.spec(4, axis=0, hadamard_block=64), quest.spec(4, hadamard_block=128))
    with pytest.raises(ValueError, match="learned input scale"):
        QL.QDense(4, activation=qjax.QuantSpec("int4", qjax.PerRow(-1), estimator="lsq")).init(
            jax.random.key(0), X)


def test_einsum_equals_core_fake_quant_then_einsum():
    w_spec = qjax.QuantSpec("int4", qjax.PerRow(0))
    layer = QL.QEinsum((128, 4, 8), "btd,dnh->btnh", weight=w_spec, activation=A_INT8)
    p = layer.init(jax.random.key(6), X)["params"]
    ref = jnp.einsum("btd,dnh->btnh", qjax.fake_quant(X, A_INT8), qjax.fake_quant(p["kernel"],
                                                                                 w_spec))
    np.testing.assert_allclose(layer.apply({"params": p}, X), ref, rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, X) ** 2))(p)
    assert np.any(g["kernel"] != 0)


NAN = float("nan")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"integer_forward": "yes"}, TypeError, "integer_forward"),
    ({"hadamard_block": 100}, ValueError, "hadamard_block"),
    ({"name": "ste", "hadamard_block": -1}, ValueError, "hadamard_block"),
    ({"trust": -1.0}, ValueError, "trust"),
    ({"trust": NAN}, ValueError, "trust"),
    ({"name": "lsq", "trust": -1.0}, ValueError, "trust"),
    ({"clip_ratio": -1.0}, ValueError, "clip_ratio"),
    ({"clip_ratio": float("inf")}, ValueError, "clip_ratio"),
    ({"weight_axis_name": 5}, TypeError, "weight_axis_name"),
    ({"activation_axis_name": ("data", 3)}, TypeError, "activation_axis_name"),
    ({"name": "lsq", "weight_bits": None, "act_bits": 1}, ValueError, "lsq cannot use act_bits=1"),
    ({"name": "pact", "weight_bits": None, "act_bits": 1}, ValueError,
     "pact cannot use act_bits=1"),
    ({"name": "ste", "weight_bits": 1}, ValueError, "ste cannot use weight_bits=1"),
    ({"grid": "int", "act_bits": 1}, ValueError, "quest cannot use act_bits=1"),
])
def test_method_rejects_bad_fields_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        Method(**({"name": "quest"} | kwargs))


def test_one_bit_methods_take_the_midrise_grid():
    x = X[0]
    for name in ("lsq", "pact"):
        layer = QL.QDense(4, method=Method(name, 1, 1, grid="midrise"))
        y = layer.apply(layer.init(jax.random.key(0), x), x)
        assert np.all(np.isfinite(y))


def test_layer_quant_checks_types_first():
    with pytest.raises(TypeError, match="integer_forward"):
        LayerQuant(W_INT4, A_INT8, integer_forward="no")
    with pytest.raises(TypeError, match="weight must be a QuantSpec"):
        LayerQuant(weight="int4", activation="int4", integer_forward=True)
    with pytest.raises(TypeError, match="weight_axis_name"):
        LayerQuant(W_INT4, A_INT8, weight_axis_name=["tensor"])


def test_qat_must_be_a_bool():
    layer = QL.QDense(4, method="ste")
    v = layer.init(jax.random.key(0), X)
    with pytest.raises(TypeError, match="qat must be a bool"):
        layer.apply(v, X, qat="no")
    mod = QN.QDense(128, 4, method="ste", rngs=nnx.Rngs(0))
    mod.qat = "no"
    with pytest.raises(TypeError, match="qat must be a bool"):
        mod(X)


@pytest.mark.parametrize("make, error, match", [
    (lambda: QL.QDense(0, method="ste").init(jax.random.key(0), X), ValueError, "features"),
    (lambda: QL.QDense(-3, method="ste").init(jax.random.key(0), X), ValueError, "features"),
    (lambda: QL.QDense(True, method="ste").init(jax.random.key(0), X), TypeError, "features"),
    (lambda: QL.QConv(4, (3, 3), strides=0, method="ste").init(
        jax.random.key(0), jnp.ones((1, 8, 8, 3))), ValueError, r"strides\[0\]"),
    (lambda: QL.QConv(4, (0, 3), method="ste").init(
        jax.random.key(0), jnp.ones((1, 8, 8, 3))), ValueError, r"kernel_size\[0\]"),
    (lambda: QL.QEmbed(0, 8, method="ste").init(jax.random.key(0), jnp.array([0])), ValueError,
     "num_embeddings"),
    (lambda: QL.QEinsum((128, 0), "btd,dn->btn", method="ste").init(jax.random.key(0), X),
     ValueError, r"shape\[1\]"),
    (lambda: QN.QDense(0, 8, method="ste", rngs=nnx.Rngs(0)), ValueError, "in_features"),
    (lambda: QN.QDense(8, -1, method="ste", rngs=nnx.Rngs(0)), ValueError, "out_features"),
    (lambda: QN.QConv(3, 4, (3, 3), strides=(1, 0), method="ste", rngs=nnx.Rngs(0)), ValueError,
     r"strides\[1\]"),
    (lambda: QN.QEmbed(10, 0, method="ste", rngs=nnx.Rngs(0)), ValueError, "features"),
    (lambda: QN.QEinsum("btd,dn->btn", (0, 4), method="ste", rngs=nnx.Rngs(0)), ValueError,
     r"kernel_shape\[0\]"),
])
def test_layer_sizes_must_be_positive_ints(make, error, match):
    with pytest.raises(error, match=match):
        make()
