"""Tests for qjax.methods.zeroqat: the MeZO-style zeroth-order estimate and step."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.methods import zeroqat as zq

D = 8
_A = jax.random.normal(jax.random.key(10), (D, D))
A = _A @ _A.T / D + jnp.eye(D)
B = jax.random.normal(jax.random.key(11), (D,))
THETA = {"w": jax.random.normal(jax.random.key(12), (D,))}


def quadratic(p, _):
    w = p["w"]
    return 0.5 * w @ A @ w + B @ w


def copy(tree):
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def rel_err(g, ref):
    return float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref))


def test_unbiased_on_quadratic():
    true = A @ THETA["w"] + B
    # Central differences are exact on a quadratic: each probe gives (z z^T) grad, whose mean
    # over q probes has relative error sqrt((D + 1) / q) in expectation (0.75 at 16, 0.094 at 1024).
    errs = {}
    for q in (16, 1024):
        est = jax.jit(lambda k, q=q: zq.zo_gradient(quadratic, THETA, None, k, 0, eps=1e-2,
                                                    num_probes=q)[1]["w"])
        errs[q] = np.mean([rel_err(est(jax.random.key(s)), true) for s in range(3)])
    assert errs[1024] < 2.5 * math.sqrt((D + 1) / 1024)
    assert errs[1024] < 0.4 * errs[16]
    z = zq.regenerate_z(jax.random.key(0), 0, 0, THETA)["w"]
    _, g1 = zq.zo_gradient(quadratic, THETA, None, jax.random.key(0), 0, eps=0.1)
    np.testing.assert_allclose(g1["w"], (z @ true) * z, rtol=1e-3, atol=1e-4)


def test_small_eps_limit_is_directional_derivative():
    f = lambda p, _: jnp.sum(jnp.sin(3 * p["w"])) + 0.3 * jnp.sum(p["w"] ** 4)
    grad = jax.grad(f)(THETA, None)["w"]
    z = zq.regenerate_z(jax.random.key(5), 7, 0, THETA)["w"]
    exact = (z @ grad) * z
    errs = [rel_err(zq.zo_gradient(f, THETA, None, jax.random.key(5), 7, eps=e)[1]["w"], exact)
            for e in (0.3, 0.03, 0.003)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3, errs


def test_regenerated_z_is_the_step_z_and_deterministic():
    params = {"a": jnp.ones((3, 4)), "b": jnp.arange(5.0), "n": jnp.arange(2)}  # int: frozen
    c = {"a": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.ones(5)}
    linear = lambda p, _: jnp.sum(c["a"] * p["a"]) + jnp.sum(c["b"] * p["b"])
    key, lr, q = jax.random.key(4), 0.1, 3
    step = zq.zo_step(linear, zq.ZeroOrderConfig(lr, eps=1e-2, num_probes=q))
    new, loss = step(copy(params), None, key, 9)
    expect = {k: params[k].astype(jnp.float32) for k in ("a", "b")}
    for i in range(q):
        z = zq.regenerate_z(key, 9, i, params)
        assert z["n"].dtype == jnp.float32 and not z["n"].any()
        proj = jnp.sum(c["a"] * z["a"]) + jnp.sum(c["b"] * z["b"])
        expect = {k: expect[k] - lr / q * proj * z[k] for k in expect}
    for k in expect:
        np.testing.assert_allclose(new[k], expect[k], rtol=1e-4, atol=1e-4)
    assert float(loss) == pytest.approx(float(linear(params, None)), rel=1e-5)
    np.testing.assert_array_equal(new["n"], params["n"])
    again, _ = step(copy(params), None, key, 9)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new, again)
    other, _ = step(copy(params), None, key, 10)
    assert not np.array_equal(other["a"], new["a"])
    # the draws: N(0, 1), and a mask does not change the z of the other leaves
    regen = jax.jit(zq.regenerate_z)
    shapes = {"w": jnp.zeros((256, 256)), "v": jnp.zeros(3)}
    big = regen(key, 0, 0, shapes)
    assert abs(float(big["w"].mean())) < 0.02 and abs(float(big["w"].std()) - 1) < 0.02
    masked = zq.regenerate_z(key, 0, 0, shapes, trainable={"w": True, "v": False})
    np.testing.assert_array_equal(masked["w"], big["w"])
    assert not masked["v"].any()


class MLP(nn.Module):
    hidden: int = 16
    out: int = 4

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden, name="dense_0")(x))
        return nn.Dense(self.out, name="dense_1")(x)


def test_zo_step_trains_lsq_quantized_mlp():
    qm = qjax.nn.quantize_model(MLP(), {"dense_0|dense_1": qjax.nn.Method("lsq", 4, 4)})
    x = jax.random.normal(jax.random.key(0), (32, 8))
    y = MLP().apply(MLP().init(jax.random.key(9), x), x)
    v = qm.init(jax.random.key(1), x)
    loss = lambda p, b: jnp.mean((qm.apply(p, b[0]) - b[1]) ** 2)
    start, scale0 = float(loss(v, (x, y))), np.array(v["params"]["dense_0"]["kernel_scale"])
    step = zq.zo_step(loss, zq.ZeroOrderConfig(3e-3, eps=1e-3, num_probes=4))
    key = jax.random.key(3)
    for i in range(50):
        v, _ = step(v, (x, y), key, i)
    end = float(loss(v, (x, y)))
    assert end < 0.7 * start, (start, end)  # a random walk: the margin depends on XLA's rounding
    assert not np.array_equal(np.asarray(v["params"]["dense_0"]["kernel_scale"]), scale0)


def test_trainable_mask_freezes_leaves():
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
              "norm": {"scale": jnp.ones(4)}}
    f = lambda p, _: jnp.sum(p["dense"]["kernel"] ** 2) + jnp.sum(p["dense"]["bias"] ** 2) + \
        jnp.sum((p["norm"]["scale"] - 2) ** 2)
    cfg = zq.ZeroOrderConfig(0.05, eps=1e-3, num_probes=2)
    tree = {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}
    pred = lambda path, leaf: not path.endswith(("bias", "scale"))
    for trainable in (tree, pred):
        step = zq.zo_step(f, cfg, trainable=trainable)
        p = copy(params)
        for i in range(3):
            p, _ = step(p, None, jax.random.key(0), i)
        np.testing.assert_array_equal(p["dense"]["bias"], params["dense"]["bias"])
        np.testing.assert_array_equal(p["norm"]["scale"], params["norm"]["scale"])
        assert not np.array_equal(p["dense"]["kernel"], params["dense"]["kernel"])
    _, g = zq.zo_gradient(f, params, None, jax.random.key(0), 0, trainable=pred)
    assert not g["dense"]["bias"].any() and not g["norm"]["scale"].any()
    assert g["dense"]["kernel"].all()


def test_weight_decay_and_schedule():
    const = lambda p, _: jnp.float32(1.0)  # proj = 0: only the decay moves the weights
    cfg = zq.ZeroOrderConfig(lambda s: 0.1 * (s + 1), weight_decay=0.5, num_probes=2)
    new, _ = zq.zo_step(const, cfg)({"w": jnp.ones(3)}, None, jax.random.key(0), 3)
    np.testing.assert_allclose(new["w"], 1 - 0.4 * 0.5, rtol=1e-6)


def test_step_memory_below_backprop():
    model = MLP(hidden=512, out=256)
    x = jax.random.normal(jax.random.key(0), (64, 256))
    params = model.init(jax.random.key(1), x)
    loss = lambda p, b: jnp.mean((model.apply(p, b[0]) - b[1]) ** 2)
    batch = (x, jnp.zeros((64, 256)))

    def backprop(p, b):
        value, g = jax.value_and_grad(loss)(p, b)
        return jax.tree_util.tree_map(lambda w, d: w - 1e-3 * d, p, g), value

    zo = zq.zo_step(loss, zq.ZeroOrderConfig(1e-3, num_probes=4))
    temp = lambda f, *a: f.lower(*a).compile().memory_analysis().temp_size_in_bytes
    zo_temp = temp(zo, params, batch, jax.random.key(2), 0)
    bp_temp = temp(jax.jit(backprop, donate_argnums=0), params, batch)
    # measured: ZO 143,632 B (one (64, 512) activation), backprop 984,064 B (the gradients)
    assert zo_temp < bp_temp / 4, (zo_temp, bp_temp)
    assert zo_temp < 512 * 256 * 4 / 2, zo_temp  # not even half a kernel: no z, no copy


def test_bad_inputs():
    for kw, err, match in [({"eps": 0.0}, ValueError, "eps"),
                           ({"eps": math.nan}, ValueError, "eps"),
                           ({"num_probes": 0}, ValueError, "num_probes"),
                           ({"num_probes": True}, TypeError, "num_probes"),
                           ({"num_probes": 1.5}, TypeError, "num_probes"),
                           ({"weight_decay": -1.0}, ValueError, "weight_decay")]:
        with pytest.raises(err, match=match):
            zq.ZeroOrderConfig(1e-3, **kw)
    for lr, err in [(math.inf, ValueError), (0.0, ValueError), ("1e-3", TypeError),
                    (True, TypeError)]:
        with pytest.raises(err, match="learning_rate"):
            zq.ZeroOrderConfig(lr)
    key = jax.random.key(0)
    with pytest.raises(TypeError, match="key"):
        zq.zo_gradient(quadratic, THETA, None, 0, 0)
    with pytest.raises(ValueError, match="step"):
        zq.zo_gradient(quadratic, THETA, None, key, -1)
    with pytest.raises(ValueError, match="scalar"):
        zq.zo_gradient(lambda p, _: p["w"], THETA, None, key, 0)
    with pytest.raises(ValueError, match="trainable"):
        zq.zo_gradient(quadratic, THETA, None, key, 0, trainable={"v": True})
    with pytest.raises(TypeError, match="trainable"):
        zq.zo_gradient(quadratic, THETA, None, key, 0, trainable={"w": 1})
    with pytest.raises(ValueError, match="no leaf"):
        zq.zo_gradient(quadratic, THETA, None, key, 0, trainable={"w": False})
    with pytest.raises(TypeError, match="floating"):
        zq.regenerate_z(key, 0, 0, {"n": jnp.arange(3)}, trainable={"n": True})
    with pytest.raises(TypeError, match="config"):
        zq.zo_step(quadratic, {"learning_rate": 1e-3})
    with pytest.raises(TypeError, match="loss_fn"):
        zq.zo_step(None, zq.ZeroOrderConfig(1e-3))


def test_zo_step_trains_an_nnx_model():
    """The same on a Flax NNX model: the step runs on the nnx.Param state (learned steps
    included), the rest of the graph is merged back in the loss."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l0 = nnx.Linear(8, 16, rngs=rngs)
            self.l1 = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.l1(jax.nn.relu(self.l0(x)))

    x = jax.random.normal(jax.random.key(0), (32, 8))
    y = Net(nnx.Rngs(9))(x)
    model = qjax.nn.quantize_model(Net(nnx.Rngs(1)), {"l0|l1": qjax.nn.Method("lsq", 4, 4)})
    model(x)  # the learned steps take their first-batch values
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p, b: jnp.mean((nnx.merge(graphdef, p, rest)(b[0]) - b[1]) ** 2)
    start = float(loss(params, (x, y)))
    step = zq.zo_step(loss, zq.ZeroOrderConfig(3e-3, eps=1e-3, num_probes=4))
    p = jax.tree_util.tree_map(jnp.copy, params)
    for i in range(50):
        p, _ = step(p, (x, y), jax.random.key(3), i)
    assert float(loss(p, (x, y))) < 0.7 * start
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p),
                                                      jax.tree_util.tree_leaves(params),
                                                      strict=True)]
    assert all(moved)  # every parameter, learned steps included, was perturbed and updated
