"""Tests for qjax.estimators: each custom VJP against its written definition."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax._src import estimators as E

INT4 = qjax.IntFormat(4)


def _vjp(f, *args, g=None):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(jnp.ones_like(y) if g is None else g)


def test_lsq_design_example():
    v = jnp.array([0.3, -1.2, 2.5, -0.05, 0.9, -3.1, 1.7, 0.02])
    s = jnp.float32(0.25)
    y, (dv, ds) = _vjp(lambda v, s: E.lsq(v, s, INT4, n=1), v, s)
    np.testing.assert_allclose(y, [0.25, -1.25, 1.75, 0, 1.0, -2.0, 1.75, 0], atol=1e-7)
    np.testing.assert_array_equal(dv, [1, 1, 0, 1, 1, 0, 1, 1])
    # n=1: gradient scale 1/sqrt(QP) = 1/sqrt(7); unscaled sum is -0.68.
    assert float(ds) * math.sqrt(7) == pytest.approx(-0.68, abs=1e-5)


def test_lsq_default_gradient_scale_and_boundaries():
    v = jnp.array([[-2.0, -1.75, 1.0, 1.75, 2.0, 0.3]])  # s=0.25: v/s = -8, -7, 4, 7, 8, 1.2
    s = jnp.full((1, 1), 0.25)
    _, (dv, ds) = _vjp(lambda v, s: E.lsq(v, s, INT4), v, s)
    np.testing.assert_array_equal(dv, [[0, 1, 1, 0, 0, 1]])  # strictly inside only
    per = [-8, 0, 0, 7, 7, 1 - 1.2]
    expected = sum(per) / math.sqrt(6 * 7)  # N = 6 elements per step
    np.testing.assert_allclose(ds, [[expected]], rtol=1e-5)


def test_lsq_per_channel_step_gradient_shape():
    v = jax.random.normal(jax.random.key(0), (4, 16))
    s = jnp.full((4, 1), 0.3)
    g = jax.grad(lambda s: E.lsq(v, s, INT4).sum())(s)
    assert g.shape == (4, 1)
    vs = v / 0.3
    inside = (vs > -8) & (vs < 7)
    q = jnp.clip(jnp.round(vs), -8, 7)
    ref = jnp.sum(q - jnp.where(inside, vs, 0), axis=1, keepdims=True) / math.sqrt(16 * 7)
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)


def test_lsq_plus_offset_gradient():
    x = jnp.array([-3.0, -0.2, 0.1, 0.6, 5.0])
    s, b = jnp.float32(0.1), jnp.float32(0.2)
    y, (dx, ds, db) = _vjp(lambda x, s, b: E.lsq_plus(x, s, INT4, b, n=1), x, s, b)
    u = (x - 0.2) / 0.1  # -32, -4, -1, 4, 48
    np.testing.assert_allclose(y, jnp.clip(jnp.round(u), -8, 7) * 0.1 + 0.2, atol=1e-6)
    np.testing.assert_array_equal(dx, [0, 1, 1, 1, 0])
    assert float(db) == pytest.approx(2 / math.sqrt(7), rel=1e-6)
    assert float(ds) == pytest.approx((-8 + 7) / math.sqrt(7), rel=1e-5, abs=1e-5)


def test_lsq_midrise_grid():
    x = jnp.array([0.1, 0.35, 5.0])
    s = jnp.float32(0.2)  # midrise2: levels +-0.5, +-1.5 steps; v = 0.5, 1.75, 25
    y, (dx, ds) = _vjp(lambda x, s: E.lsq(x, s, qjax.Midrise(2), n=1), x, s)
    np.testing.assert_allclose(y, [0.1, 0.3, 0.3], atol=1e-6)
    np.testing.assert_array_equal(dx, [1, 0, 0])  # 1.75 > max level 1.5
    assert float(ds) == pytest.approx((0.5 - 0.5 + 1.5 + 1.5) / math.sqrt(1.5), rel=1e-5)


def test_ste_is_identity_gradient_and_forward_rounds():
    x = jnp.array([-5.0, -0.74, 0.0, 0.26, 10.0])
    g = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y, (dx,) = _vjp(lambda x: E.ste(x, jnp.float32(0.5), INT4), x, g=g)
    np.testing.assert_allclose(y, [-4.0, -0.5, 0.0, 0.5, 3.5])
    np.testing.assert_array_equal(dx, g)


def test_clipped_ste_inclusive_bounds():
    s = jnp.float32(0.5)  # range x/s in [-8, 7] -> x in [-4, 3.5]
    x = jnp.array([-4.0001, -4.0, -1.0, 3.5, 3.5001, 0.0])
    _, (dx,) = _vjp(lambda x: E.clipped_ste(x, s, INT4), x)
    np.testing.assert_array_equal(dx, [0, 1, 1, 1, 0, 1])
    z = jnp.float32(3.0)  # zero point shifts the range to x/s in [-11, 4]
    _, (dx,) = _vjp(lambda x: E.clipped_ste(x, s, INT4, z), jnp.array([-5.5, -5.6, 2.0, 2.1]))
    np.testing.assert_array_equal(dx, [1, 0, 1, 0])


def test_trust_mask_definition():
    fmt = qjax.Midrise(2)  # levels +-0.5, +-1.5 steps; clip at 1.5 steps
    s = jnp.float32(1.0)
    x = jnp.array([0.2, 1.0, 1.5, 1.99, 2.01, -2.2, 3.0])
    y, (dx,) = _vjp(lambda x: E.trust(x, s, fmt), x)
    np.testing.assert_allclose(y, [0.5, 1.5, 1.5, 1.5, 1.5, -1.5, 1.5])
    # |y - x| <= 0.5 (half a step): in range always; beyond the clip up to half a step.
    np.testing.assert_array_equal(dx, [1, 1, 1, 1, 0, 0, 0])
    _, (dx,) = _vjp(lambda x: E.trust(x, s, fmt, multiplier=0.5), x)
    # |y - x| <= 0.25 masks the in-range value 1.0 too: it sits on a decision boundary.
    np.testing.assert_array_equal(dx, [0, 0, 1, 0, 0, 0, 0])
    _, (dx,) = _vjp(lambda x: E.trust(x, s, fmt, clip_ratio=1.3), x)
    np.testing.assert_array_equal(dx, [1, 1, 1, 0, 0, 0, 0])  # |x| <= 1.3 * 1.5 = 1.95
    _, (dx,) = _vjp(lambda x: E.trust(x, s, fmt, clip_ratio=1.4), x)
    np.testing.assert_array_equal(dx, [1, 1, 1, 1, 1, 0, 0])  # |x| <= 2.1


def test_no_gradient_into_statistics_scale():
    x = jax.random.normal(jax.random.key(1), (3, 16))
    g = jax.grad(lambda s: E.trust(x, s, qjax.Midrise(4)).sum())(jnp.full((3, 1), 0.2))
    np.testing.assert_array_equal(g, 0.0)


def test_stochastic_rounding_unbiased_with_binomial_variance():
    s = jnp.float32(0.5)
    x = jnp.full((200_000,), 0.3)  # x/s = 0.6 -> 0 w.p. 0.4, 1 w.p. 0.6
    y = E.stochastic_rounding(x, s, INT4, jax.random.key(0))
    assert set(np.unique(np.asarray(y))) == {0.0, 0.5}
    assert float(y.mean()) == pytest.approx(0.3, abs=0.004)  # 4 sigma of 0.001
    assert float(y.var()) == pytest.approx(0.25 * 0.6 * 0.4, rel=0.03)
    dx = jax.grad(lambda x: E.stochastic_rounding(x, s, INT4, jax.random.key(0)).sum())(x)
    np.testing.assert_array_equal(dx, 1.0)


def test_pact_gradients():
    x = jnp.array([-1.0, 0.0, 0.5, 1.99, 2.0, 3.0])
    alpha = jnp.float32(2.0)
    y, (dx, da) = _vjp(lambda x, a: E.pact(x, a, "uint2"), x, alpha)
    step = 2.0 / 3
    np.testing.assert_allclose(y, [0, 0, step, 2.0, 2.0, 2.0], rtol=1e-6)
    np.testing.assert_array_equal(dx, [0, 1, 1, 1, 0, 0])
    assert float(da) == 2.0
    with pytest.raises(ValueError, match="unknown format 'uint9'"):
        E.pact(x, alpha, "uint9")
    with pytest.raises(ValueError, match="PACT needs an integer format"):
        E.pact(x, alpha, "midrise4")


def test_signed_pact_and_spec_path():
    x = jnp.array([-3.0, -1.0, 0.3, 2.0, 2.5])
    alpha = jnp.float32(2.0)  # int4: s = 2/7, range x/s in [-8, 7] -> x in [-16/7, 2]
    y, (dx, da) = _vjp(lambda x, a: E.pact(x, a, "int4"), x, alpha)
    s = 2.0 / 7
    np.testing.assert_allclose(y, jnp.clip(jnp.round(x / s), -8, 7) * s, rtol=1e-6)
    np.testing.assert_array_equal(dx, [0, 1, 1, 0, 0])  # x = alpha is clipped
    assert float(da) == pytest.approx(-8 / 7 + 1 + 1, rel=1e-6)
    spec = qjax.QuantSpec("int4", estimator="pact")  # the learned parameter is alpha
    y2, (dx2, da2) = _vjp(lambda x, a: qjax.fake_quant(x, spec, scale=a), x, alpha)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(dx2, dx)
    assert float(da2) == float(da)


def test_under_jit_vmap_and_grad_of_loss():
    x = jax.random.normal(jax.random.key(2), (5, 8, 32))
    w = jax.random.normal(jax.random.key(3), (32, 4))
    spec = qjax.QuantSpec("int4", qjax.PerRow(-1), estimator="clipped_ste")

    def loss(w, xb):
        return jnp.sum(qjax.fake_quant(xb, spec) @ qjax.fake_quant(w, spec) ** 2)

    per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(w, x)
    loop = jnp.stack([jax.grad(loss)(w, xb) for xb in x])
    np.testing.assert_allclose(per_example, loop, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(per_example)) and np.any(per_example != 0)


def test_estimator_arguments_validated():
    with pytest.raises(ValueError, match="LSQ"):
        E.quantize_dequantize(jnp.ones(3), 1.0, fmt="int4", estimator="lsq")
    with pytest.raises(ValueError, match="PACT estimator learns its scale"):
        qjax.fake_quant(jnp.ones(3), qjax.QuantSpec("int4", estimator="pact"))
    with pytest.raises(ValueError, match="uniform grid"):
        E.lsq(jnp.ones(3), 1.0, "e4m3")
    with pytest.raises(ValueError, match="trust multiplier"):
        qjax.Trust(multiplier=0.0)


def test_clipped_ste_on_codes_masks_the_rounded_code():
    s = jnp.float32(1.0)  # codes [-8, 7]: x in [-8.5, 7.5) rounds into the range
    x = jnp.array([-8.6, -8.5, -8.2, 7.4, 7.5, 7.6, 0.0])
    _, (dx,) = _vjp(lambda x: E.quantize_dequantize(
        x, s, fmt=INT4, estimator=qjax.ClippedSTE(on_codes=True)), x)
    np.testing.assert_array_equal(dx, [0, 1, 1, 1, 0, 0, 1])  # -8.5 -> -8 and 7.5 -> 8 (even)


def test_quantize_dequantize_refuses_what_it_cannot_apply():
    x = jnp.array([0.3, -1.2, 2.5])
    with pytest.raises(ValueError, match="rounding 'half_away' needs an IntFormat.*not midrise4"):
        E.quantize_dequantize(x, 0.1, fmt="midrise4", rounding="half_away")
    with pytest.raises(ValueError, match="rounding must be one of"):
        E.quantize_dequantize(x, 0.1, fmt="int4", rounding="bogus")
    with pytest.raises(ValueError, match="needs noise="):
        E.quantize_dequantize(x, 0.1, fmt="int4", rounding="stochastic")
    # PACT's backward feeds alpha; this op gives the scale no gradient, so it must refuse.
    with pytest.raises(ValueError, match="PACT estimator learns its scale"):
        E.quantize_dequantize(x, 0.1, fmt="int4", estimator="pact")
    for bad in (0.0, -1.0, float("nan"), np.float32(0.0)):
        with pytest.raises(ValueError, match="scale must be positive and finite"):
            E.quantize_dequantize(x, bad, fmt="int4")
    with pytest.raises(ValueError, match="scale .*must be positive and finite"):
        E.lsq(x, 0.0, "int4")
    with pytest.raises(ValueError, match="step must be positive and finite"):
        E.lsq_plus(x, -1.0, "int4", 0.0)
    # Arrays are not inspected (that would branch on traced values): a traced 0 still runs.
    assert np.all(np.isfinite(jax.grad(lambda s: E.lsq(x, s, "int4").sum())(0.0)))


def test_lsq_gradient_scale_n_and_format_validated():
    x = jnp.array([0.3, -1.2, 2.5])
    for bad in (0, -5):
        with pytest.raises(ValueError, match="n must be >= 1"):
            E.lsq(x, 0.1, "int4", n=bad)
        with pytest.raises(ValueError, match="grad_scale_n must be >= 1"):
            qjax.LSQ(grad_scale_n=bad)
    for bad in (1.5, True, "a"):
        with pytest.raises(TypeError, match="n must be an int"):
            E.lsq(x, 0.1, "int4", n=bad)
        with pytest.raises(TypeError, match="grad_scale_n must be an int"):
            qjax.LSQ(grad_scale_n=bad)
    assert qjax.LSQ(np.int64(4)) == qjax.LSQ(4)
    with pytest.raises(ValueError, match=r"int1 has no positive level.*'midrise1'"):
        E.lsq(x, 0.1, "int1")


def test_estimator_fields_validated():
    with pytest.raises(TypeError, match="on_codes must be a bool"):
        qjax.ClippedSTE(on_codes="no")
    for bad in (True, "x"):
        with pytest.raises(TypeError, match="trust multiplier must be a number"):
            qjax.Trust(multiplier=bad)
    with pytest.raises(ValueError, match="trust multiplier must be positive and finite"):
        qjax.Trust(multiplier=float("inf"))
    with pytest.raises(ValueError, match="trust clip_ratio must be positive and finite"):
        qjax.Trust(clip_ratio=float("nan"))
    assert qjax.Trust(1) == qjax.Trust(1.0) and hash(qjax.Trust(1)) == hash(qjax.Trust(1.0))
