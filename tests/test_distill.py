"""Tests for qjax.methods.distill: distillation losses, capture and Teacher Intervention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qjax
from qjax.methods import distill as D

STE4 = qjax.nn.Method("ste", 4, 4)
X = jax.random.normal(jax.random.key(0), (6, 8))


def np_kl(s, t, temp, mask=None):
    def log_softmax(z):
        z = z / temp
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(np.float64(t)), log_softmax(np.float64(s))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    m = np.ones_like(kl) if mask is None else np.float64(mask)
    return temp**2 * (kl * m).sum() / m.sum()


def test_logit_kl_matches_numpy_and_properties():
    s = jax.random.normal(jax.random.key(1), (2, 3, 10)) * 2
    t = jax.random.normal(jax.random.key(2), (2, 3, 10)) * 2
    for temp in (1.0, 2.5):
        np.testing.assert_allclose(D.logit_kl(s, t, temp), np_kl(s, t, temp), rtol=1e-5)
    mask = np.array([[1, 0, 1], [0, 0, 1]], bool)
    np.testing.assert_allclose(D.logit_kl(s, t, 2.0, mask), np_kl(s, t, 2.0, mask), rtol=1e-5)
    # Masked-out tokens do not matter.
    t2 = t.at[0, 1].set(100.0)
    np.testing.assert_allclose(D.logit_kl(s, t2, 2.0, mask), D.logit_kl(s, t, 2.0, mask))
    assert float(D.logit_kl(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(D.logit_kl(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16))) > 0
    # T^2: with logits scaled by T, logit_kl(T) == T^2 * logit_kl(1) on the unscaled logits.
    np.testing.assert_allclose(D.logit_kl(3 * s, 3 * t, 3.0), 9 * D.logit_kl(s, t), rtol=1e-5)
    g_t = jax.grad(lambda t: D.logit_kl(s, t, 2.0))(t)
    np.testing.assert_array_equal(g_t, 0.0)
    g_s = jax.jit(jax.grad(lambda s: D.logit_kl(s, t, 2.0)))(s)
    assert float(jnp.abs(g_s).max()) > 0


def test_layer_mse_matches_numpy():
    s = {"a": jnp.arange(6.0).reshape(2, 3), "b": (jnp.ones(4), jnp.full(4, 3.0))}
    t = {"a": jnp.ones((2, 3)), "b": (jnp.zeros(4), jnp.full(4, 2.0))}
    ref = [np.mean((np.arange(6.0) - 1) ** 2), 1.0, 1.0]
    np.testing.assert_allclose(D.layer_mse(s, t), np.mean(ref), rtol=1e-6)
    np.testing.assert_allclose(D.layer_mse(s, t, normalize=True),
                               np.mean([ref[0] / 1.0, 1.0 / 1e-8, 1.0 / 4.0]), rtol=1e-5)
    g = jax.grad(lambda t: D.layer_mse(s, t))(t)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g))


def test_distillation_loss_combines_terms():
    s = jax.random.normal(jax.random.key(1), (4, 5))
    t = jax.random.normal(jax.random.key(2), (4, 5))
    y = jnp.array([0, 1, 2, 3])
    hs, ht = {"h": s}, {"h": t}
    loss, parts = D.distillation_loss(s, t, y, student_outputs=hs, teacher_outputs=ht,
                                      ce_weight=0.5, kl_weight=2.0, mse_weight=3.0,
                                      temperature=2.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(s, y).mean()
    np.testing.assert_allclose(parts["ce"], ce, rtol=1e-6)
    np.testing.assert_allclose(parts["kl"], D.logit_kl(s, t, 2.0), rtol=1e-6)
    np.testing.assert_allclose(loss, 0.5 * ce + 2 * parts["kl"] + 3 * D.layer_mse(hs, ht),
                               rtol=1e-6)
    loss, parts = D.distillation_loss(s, t, ce_weight=0.0)
    assert float(parts["ce"]) == 0 and float(loss) == float(parts["kl"])


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16)(x)  # Dense_0, quantized
        h = nn.Dense(16)(h)  # Dense_1
        return nn.Dense(4)(nn.tanh(h))  # Dense_2


def linen_setup():
    qm = qjax.nn.quantize_model(MLP(), {"Dense_0": STE4})
    v = qm.init(jax.random.key(3), X)
    assert set(qm.layers) == {"Dense_0"}
    return qm, v


def test_capture_linen_quantized_and_float():
    qm, v = linen_setup()
    out, cap = D.capture_linen(qm.apply, r"Dense_[01]")(v, X)
    np.testing.assert_array_equal(out, qm.apply(v, X))
    assert list(cap) == ["Dense_0", "Dense_1"]
    p = v["params"]
    # By hand: Dense_0 alone, quantized the same way, on its own params.
    dense = qjax.nn.quantize_model(nn.Dense(16), {".*": STE4})
    np.testing.assert_allclose(cap["Dense_0"], dense.apply({"params": p["Dense_0"]}, X),
                               rtol=1e-6)
    h_f = nn.Dense(16).apply({"params": p["Dense_0"]}, X)
    assert not np.allclose(cap["Dense_0"], h_f)
    h1 = nn.Dense(16).apply({"params": p["Dense_1"]}, cap["Dense_0"])
    np.testing.assert_allclose(cap["Dense_1"], h1, rtol=1e-6)
    np.testing.assert_allclose(nn.Dense(4).apply({"params": p["Dense_2"]}, jnp.tanh(h1)), out,
                               rtol=1e-6)
    # The float teacher on the same params: the float layer's output; jit works.
    _, cap_f = jax.jit(lambda v: D.capture_linen(qm.apply, "Dense_0")(v, X, qat=False))(v)
    np.testing.assert_allclose(cap_f["Dense_0"], h_f, rtol=1e-6)
    # A first apply (which also runs qjax's shape pass) keeps the real run's output.
    fresh = qjax.nn.quantize_model(MLP(), {"Dense_0": STE4})
    _, cap_1 = D.capture_linen(fresh.apply, "Dense_0")(v, X)
    np.testing.assert_array_equal(cap_1["Dense_0"], cap["Dense_0"])
    # Plain Linen apply too.
    _, cap_p = D.capture_linen(MLP().apply, "Dense_0")(v, X)
    np.testing.assert_allclose(cap_p["Dense_0"], h_f, rtol=1e-6)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](jnp.tanh(self.layers[0](x)))


def nnx_setup():
    teacher = NNXMLP(nnx.Rngs(0))
    student = qjax.nn.quantize_model(nnx.clone(teacher), {"layers/0": STE4})
    return teacher, student


def test_capture_nnx():
    teacher, student = nnx_setup()
    out, cap = D.capture_nnx(student, r"layers/\d")(X)
    assert set(cap) == {"layers/0", "layers/1"}
    assert isinstance(student.layers[0], qjax.nn.nnx.QuantizedLayer)  # put back
    np.testing.assert_array_equal(cap["layers/0"], student.layers[0](X))
    np.testing.assert_array_equal(out, student(X))
    _, cap_t = D.capture_nnx(teacher, "layers/0")(X)
    np.testing.assert_array_equal(cap_t["layers/0"], teacher.layers[0](X))
    assert not np.allclose(cap_t["layers/0"], cap["layers/0"])

    @nnx.jit
    def grads(m):
        return nnx.grad(lambda m: jnp.sum(D.capture_nnx(m, "layers/1")(X)[1]["layers/1"]))(m)

    g = grads(student)
    assert float(jnp.abs(g["layers"][0]["inner"]["kernel"][...]).max()) > 0
    with pytest.raises(ValueError, match="inside a QuantizedLayer"):
        D.capture_nnx(student, "layers/0/inner")(X)


def _dense0_grad(g):
    return g["params"]["Dense_0"]["kernel"]


def test_teacher_intervention_linen():
    qm, v = linen_setup()
    t_out, t_cap = D.capture_linen(qm.apply, "Dense_0")(v, X, qat=False)
    # lam = 1: the student's output is the teacher's (same downstream weights).
    full = D.intervene_linen(qm.apply, t_cap, 1.0)(v, X)
    np.testing.assert_allclose(full, t_out, rtol=1e-6)
    assert not np.allclose(qm.apply(v, X), t_out)
    # lam = 0: the plain student.
    np.testing.assert_array_equal(D.intervene_linen(qm.apply, t_cap, 0.0)(v, X), qm.apply(v, X))

    # Gradient into Dense_0 (the replaced module) is scaled by (1 - lam) when the loss is linear
    # in the output of Dense_0 (loss through Dense_1 only).
    c = jax.random.normal(jax.random.key(4), (6, 16))

    def loss(v, lam):
        _, cap = D.capture_linen(D.intervene_linen(qm.apply, t_cap, lam), "Dense_1")(v, X)
        return jnp.sum(cap["Dense_1"] * c)

    g0 = jax.grad(loss)(v, 0.0)
    g1 = jax.grad(loss)(v, 1.0)
    np.testing.assert_array_equal(_dense0_grad(g1), 0.0)
    assert float(jnp.abs(g1["params"]["Dense_1"]["kernel"]).max()) > 0
    g3 = jax.jit(jax.grad(loss))(v, jnp.float32(0.3))
    np.testing.assert_allclose(_dense0_grad(g3), 0.7 * _dense0_grad(g0), rtol=1e-5, atol=1e-7)


def test_teacher_intervention_nnx():
    teacher, student = nnx_setup()
    t_out, t_cap = D.capture_nnx(teacher, "layers/0")(X)
    np.testing.assert_allclose(D.intervene_nnx(student, t_cap, 1.0)(X), t_out, rtol=1e-6)
    np.testing.assert_array_equal(D.intervene_nnx(student, t_cap, 0.0)(X), student(X))
    g = nnx.grad(lambda m: jnp.sum(D.intervene_nnx(m, t_cap, 1.0)(X)))(student)
    np.testing.assert_array_equal(g["layers"][0]["inner"]["kernel"][...], 0.0)
    assert isinstance(student.layers[0], qjax.nn.nnx.QuantizedLayer)


def test_schedules_go_from_one_to_zero():
    for kind in D.SCHEDULES:
        sched = D.intervention_schedule(10, kind)
        vals = [float(sched(i)) for i in range(13)]
        assert vals[0] == 1.0 and vals[10] == 0.0 and vals[12] == 0.0
        assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))
    assert float(D.intervention_schedule(10, "linear")(5)) == pytest.approx(0.5)
    assert float(D.intervention_schedule(10, "step")(9)) == 1.0


def test_distillation_with_intervention_reduces_kl():
    qm, v = linen_setup()
    teacher_vars = qm.init(jax.random.key(9), X)  # a different float teacher, frozen
    sched = D.intervention_schedule(10, "linear")
    opt = optax.adam(3e-2)

    @jax.jit
    def step(v, state, i):
        t_logits, t_cap = D.capture_linen(qm.apply, "Dense_0")(teacher_vars, X, qat=False)

        def loss(v):
            run = D.capture_linen(D.intervene_linen(qm.apply, t_cap, sched(i)), "Dense_0")
            s_logits, s_cap = run(v, X)
            return D.distillation_loss(s_logits, t_logits, ce_weight=0.0, mse_weight=0.1,
                                       temperature=2.0, student_outputs=s_cap,
                                       teacher_outputs=t_cap)[0]

        grads = jax.grad(loss)(v)
        updates, state = opt.update(grads, state, v)
        return optax.apply_updates(v, updates), state

    def kl(v):
        return float(D.logit_kl(qm.apply(v, X), qm.apply(teacher_vars, X, qat=False)))

    first, state = kl(v), opt.init(v)
    for i in range(25):
        v, state = step(v, state, i)
    assert kl(v) < 0.5 * first


def test_bad_inputs():
    s = jnp.zeros((2, 5))
    with pytest.raises(ValueError, match="temperature"):
        D.logit_kl(s, s, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        D.logit_kl(s, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="mask"):
        D.logit_kl(s, s, mask=jnp.ones(3))
    with pytest.raises(TypeError, match="floating"):
        D.logit_kl(jnp.zeros((2, 5), jnp.int32), s)
    with pytest.raises(ValueError, match="kl_weight"):
        D.distillation_loss(s, s, kl_weight=float("nan"))
    with pytest.raises(ValueError, match="mse_weight"):
        D.distillation_loss(s, s, jnp.zeros(2, int), mse_weight=-1.0)
    with pytest.raises(ValueError, match="labels"):
        D.distillation_loss(s, s)
    with pytest.raises(ValueError, match="structure"):
        D.layer_mse({"a": s}, {"b": s})
    with pytest.raises(ValueError, match="shape"):
        D.layer_mse({"a": s}, {"a": jnp.zeros(3)})
    with pytest.raises(ValueError, match="lam"):
        D.mix_teacher(s, s, 1.5)
    with pytest.raises(TypeError, match="lam"):
        D.mix_teacher(s, s, jnp.ones(2))
    with pytest.raises(ValueError, match="module paths"):
        D.intervene_linen(lambda: None, {}, 0.5)
    with pytest.raises(ValueError, match="kind"):
        D.intervention_schedule(10, "exp")
    qm, v = linen_setup()
    with pytest.raises(ValueError, match="'Dense_9'"):
        D.capture_linen(qm.apply, "Dense_9")(v, X)
    with pytest.raises(ValueError, match="regular expression"):
        D.capture_linen(qm.apply, "(")
    with pytest.raises(ValueError, match="Dense_7"):
        D.intervene_linen(qm.apply, {"Dense_7": jnp.zeros((6, 16))}, 0.5)(v, X)
    with pytest.raises(ValueError, match="shape"):
        D.intervene_linen(qm.apply, {"Dense_0": jnp.zeros((6, 3))}, 0.5)(v, X)
    teacher, _ = nnx_setup()
    with pytest.raises(ValueError, match="'blocks'"):
        D.capture_nnx(teacher, "blocks")(X)
    with pytest.raises(ValueError, match="layers/5"):
        D.intervene_nnx(teacher, {"layers/5": jnp.zeros(3)}, 1.0)(X)
    with pytest.raises(TypeError, match="method"):
        D.capture_nnx(teacher, "layers/0", method="encode")
    with pytest.raises(TypeError, match="NNX"):
        D.capture_nnx(MLP(), "x")
