"""Double Rounding (qjax.nn.double_rounding): one model at several bit widths, one checkpoint."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qjax
from qjax import convert as QC
from qjax.nn import double_rounding as DR
from qjax.nn import quantize_model

RECIPE = DR.DoubleRounding(bits=(8, 6, 4, 2))
X = jax.random.normal(jax.random.key(0), (4, 32))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="down")(jax.nn.relu(nn.Dense(64, name="up")(x)))


def test_codes_are_a_second_rounding_of_the_stored_ones_and_use_the_full_range():
    w = jax.random.normal(jax.random.key(1), (256, 8))
    s = DR.init_scale(w, RECIPE)
    q8 = DR.codes(w, s, RECIPE, 8)
    assert float(q8.min()) == -127 and float(q8.max()) == 127  # max|W| / 127: the full range
    for bits in (6, 4, 2):
        q = DR.codes(w, s, RECIPE, bits)
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        np.testing.assert_array_equal(q, np.clip(np.round(np.asarray(q8) / 2 ** (8 - bits)),
                                                 lo, hi))
        assert float(q.min()) == lo and float(q.max()) == hi
        np.testing.assert_array_equal(DR.double_round(w, s, RECIPE, bits),
                                      q * (s * 2.0 ** (8 - bits)))


def test_scale_learns_through_every_precision():
    w = jax.random.normal(jax.random.key(2), (32, 8))
    s = DR.init_scale(w, RECIPE)
    for bits in RECIPE.bits:
        g = jax.grad(lambda s, b=bits: jnp.sum(DR.double_round(w, s, RECIPE, b) ** 2))(s)
        assert g.shape == s.shape and float(jnp.abs(g).sum()) > 0


def _trained_linen():
    qm = quantize_model(MLP(), {"up|down": RECIPE})
    v = qm.init(jax.random.key(1), X)
    target = jnp.sin(jnp.arange(16.0))
    tx = optax.adam(3e-3)

    def loss(p):
        return DR.joint_loss(lambda b: jnp.mean((qm.apply({"params": p}, X, bits=b) - target)
                                                ** 2), RECIPE.bits)

    @jax.jit
    def step(p, o):
        value, g = jax.value_and_grad(loss)(p)
        u, o = tx.update(g, o, p)
        return value, optax.apply_updates(p, u), o

    p, opt = v["params"], tx.init(v["params"])
    first = None
    for _ in range(6):
        value, p, opt = step(p, opt)
        first = float(value) if first is None else first
    assert float(loss(p)) < first
    return qm, p


def test_serving_at_each_width_equals_qat_at_that_width(tmp_path):
    qm, p = _trained_linen()
    int8 = QC.convert(p, qm)  # the one checkpoint
    assert int8["up"]["kernel"].spec.format == qjax.IntFormat(8)
    QC.save(os.path.join(tmp_path, "c"), int8)
    restored = QC.restore(os.path.join(tmp_path, "c"), int8)
    for bits in RECIPE.bits:
        y_qat = jax.jit(functools.partial(qm.apply, bits=bits))({"params": p}, X)
        direct = QC.convert(p, qm, bits=bits)
        lowered = jax.tree.map(lambda a: a, restored)
        for name in ("up", "down"):
            lowered[name] = dict(lowered[name])
            lowered[name]["kernel"] = DR.lower_precision(restored[name]["kernel"], RECIPE, bits)
            np.testing.assert_array_equal(qjax.dequantize(lowered[name]["kernel"]),
                                          qjax.dequantize(direct[name]["kernel"]))
        np.testing.assert_array_equal(jax.jit(lambda s: QC.serve(qm, s, X))(lowered), y_qat)
    assert not np.array_equal(qm.apply({"params": p}, X, bits=2),
                              qm.apply({"params": p}, X, bits=8))


def test_nnx_multi_precision_layer():
    class Net(nnx.Module):
        def __init__(self):
            self.up = nnx.Linear(32, 64, rngs=nnx.Rngs(0))
            self.down = nnx.Linear(64, 16, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.down(jax.nn.relu(self.up(x)))

    model = quantize_model(Net(), {"up|down": RECIPE})
    assert qjax.nn.sites(model)["up"].adapter == RECIPE
    for bits in (8, 4):
        assert qjax.nn.nnx.set_bits(model, bits) == 2
        want = model(X)
        served = QC.convert(model, bits=bits)
        np.testing.assert_array_equal(QC.serve(served, X), want)


def test_bad_input():
    with pytest.raises(ValueError, match="distinct"):
        DR.DoubleRounding(bits=(8, 8))
    with pytest.raises(ValueError, match=r"bits must be in \[2, 8\]"):
        DR.DoubleRounding(bits=(16, 8))
    with pytest.raises(TypeError, match="tuple of bit widths"):
        DR.DoubleRounding(bits=8)
    qm = quantize_model(MLP(), {"up|down": RECIPE})
    v = qm.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match=r"one of this recipe's \(8, 6, 4, 2\), got 3"):
        qm.apply(v, X, bits=3)
    with pytest.raises(ValueError, match="one of this recipe's"):
        QC.convert(v["params"], qm, bits=5)


def test_joint_loss_weights_each_precision():
    losses = {8: 1.0, 4: 2.0, 2: 5.0}
    assert DR.joint_loss(losses.__getitem__, (8, 4, 2)) == 8.0
    assert DR.joint_loss(losses.__getitem__, (8, 4, 2), (1.0, 0.5, 0.2)) == pytest.approx(3.0)
    # numpy scalars are weights too; a precision weighted 0 is not run
    assert DR.joint_loss(losses.__getitem__, (8, 4, 2), (np.float32(1.0), 0.0, 0.0)) == 1.0
    assert DR.joint_loss(lambda b: {8: 1.0}[b], (8, 4, 2), (1.0, 0.0, 0.0)) == 1.0
    for bad in ((1.0, 1.0), (1.0, -0.5, 1.0), (1.0, float("nan"), 1.0),
                (1.0, float("inf"), 1.0), (1.0, True, 1.0), (0.0, 0.0, 0.0)):
        with pytest.raises(ValueError, match="weights must"):
            DR.joint_loss(losses.__getitem__, (8, 4, 2), bad)
