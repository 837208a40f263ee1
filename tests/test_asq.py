"""Tests for qjax.methods.asq: the POST grid, its quantizer and learned-step gradient, the ASQ
activation quantizer and its adapter network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.methods import asq as A

# Shared shapes (each new shape is a new compilation): a kernel (K, N), tokens (T, C).
K, N = 8, 3
T, C = 4, 8
SQRT_HALF = np.sqrt(np.float64(0.5))


def rand(shape, seed, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale


def ref_levels(bits):
    """Independent POST level set: 0 and +-2^(-k/2), k = 0..2^(b-1) - 2, as float32."""
    mags = [np.float32(2.0 ** (-k / 2)) for k in range(2 ** (bits - 1) - 1)]
    return np.sort(np.array([0.0] + mags + [-m for m in mags], np.float32))


def ref_post_level(v, bits):
    """Brute-force nearest level (float64) of ``clip(v, -1, 1)``."""
    lv = ref_levels(bits).astype(np.float64)
    c = np.clip(np.asarray(v, np.float64), -1, 1)
    return lv[np.argmin(np.abs(c[..., None] - lv), axis=-1)]


def tie_margin(v, bits):
    """Distance of |v| to the nearest exact midpoint of adjacent levels."""
    m = np.unique(np.abs(ref_levels(bits).astype(np.float64)))
    mids = (m[:-1] + m[1:]) / 2
    return np.min(np.abs(np.abs(np.asarray(v, np.float64))[..., None] - mids), axis=-1)


# ----------------------------------------------------------------------------- the grid


def test_level_sets_at_3_and_4_bits():
    s = SQRT_HALF
    want3 = np.float32([-1, -s, -0.5, 0, 0.5, s, 1])
    want4 = np.float32([-1, -s, -0.5, -s / 2, -0.25, -s / 4, -0.125, 0,
                        0.125, s / 4, 0.25, s / 2, 0.5, s, 1])
    np.testing.assert_array_equal(A.POST(3).code_table, want3)
    np.testing.assert_array_equal(A.POST(4).code_table, want4)
    assert A.POST(3).qmax == 3 and A.POST(4).qmax == 7 and A.POST(4).qmin == -7
    assert A.POST is qjax.POST and qjax.QuantSpec("post4").format == A.POST(4)


@pytest.mark.parametrize("bits", range(2, 9))
def test_level_set_structure(bits):
    g = A.POST(bits)
    lv = g.code_table
    np.testing.assert_array_equal(lv, ref_levels(bits))
    assert lv.size == 2 ** bits - 1 and np.all(np.diff(lv) > 0)
    np.testing.assert_array_equal(lv, -lv[::-1])
    m = g.levels().astype(np.float32)
    assert np.all(g.midpoints > m[:-1]) and np.all(g.midpoints < m[1:])
    exact = (m[:-1].astype(np.float64) + m[1:]) / 2
    assert np.all(np.abs(g.midpoints - exact) <= np.spacing(g.midpoints) / 2)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("step", [1.0, 0.25])
def test_ties_round_away_from_zero(bits, step):
    g = A.POST(bits)
    j = np.arange(g.qmax)
    for sign in (1, -1):
        at = jnp.asarray(sign * g.midpoints * np.float32(step))  # exact: step is a power of 2
        below = jnp.asarray(sign * np.nextafter(g.midpoints, np.float32(0)) * np.float32(step))
        np.testing.assert_array_equal(np.asarray(A.post_quantize(at, step, bits)), sign * (j + 1))
        np.testing.assert_array_equal(np.asarray(A.post_quantize(below, step, bits)), sign * j)


def test_nearest_level_against_brute_force():
    bits = 4
    x = rand((K, N), 1, 0.6)
    step = np.float32([[0.5, 1.0, 2.0]])
    v = x.astype(np.float64) / step
    keep = tie_margin(v, bits) > 1e-5
    assert keep.mean() > 0.95
    y = np.asarray(A.post_fake_quant(jnp.asarray(x), jnp.asarray(step), bits))
    want = (ref_post_level(v, bits).astype(np.float32) * step)  # float32 product, as the format
    np.testing.assert_array_equal(y[keep], want[keep])
    codes = np.asarray(A.post_quantize(jnp.asarray(x), jnp.asarray(step), bits))
    assert codes.dtype == np.int8 and np.abs(codes).max() <= A.POST(bits).qmax
    np.testing.assert_array_equal(A.POST(bits).code_table[codes + A.POST(bits).qmax][keep],
                                  ref_post_level(v, bits)[keep])


def test_zero_input_gives_zero_and_clipping_stays_finite():
    z = jnp.asarray(np.float32([[0.0, -0.0, 0.0]] * K))
    assert np.all(np.asarray(A.post_quantize(z, 0.5, 4)) == 0)
    y = np.asarray(A.post_fake_quant(z, 0.5, 4))
    assert np.all(y == 0) and not np.any(np.signbit(y))
    np.testing.assert_array_equal(np.asarray(A.post_fake_quant(z, jnp.zeros((1, N)), 4)), 0)
    big = jnp.asarray(np.float32([[3e38, -3e38, 1.5]] * K))
    y = np.asarray(A.post_fake_quant(big, 1e-3, 4))
    np.testing.assert_array_equal(y[0], np.float32([1e-3, -1e-3, 1e-3]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dequantize_equals_fake_quant_bit_for_bit(dtype):
    x = jnp.asarray(rand((K, N), 2), dtype)
    step = jnp.asarray([[0.7, 1.3, 2.1]])  # per output feature
    y = A.post_fake_quant(x, step, 4)
    assert y.dtype == x.dtype
    deq = A.post_dequantize(A.post_quantize(x, step, 4), step, 4, dtype=x.dtype)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(deq, np.float32))
    # bfloat16 input: the float32 computation on the same values, cast back.
    y32 = A.post_fake_quant(x.astype(jnp.float32), step, 4).astype(x.dtype)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y32, np.float32))


def test_post_init_step_is_the_percentile_per_output_feature():
    w = rand((K, N), 3)
    np.testing.assert_allclose(np.asarray(A.post_init_step(jnp.asarray(w))),
                               np.percentile(np.abs(w), 99, axis=0, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(A.post_init_step(jnp.asarray(w), q=50, axis=None)),
                               np.median(np.abs(w)).reshape(1, 1), rtol=1e-6)


# ----------------------------------------------------------------------------- gradients


def surrogate(x, s_a, level, c0, lo, hi):
    """The STE surrogate ``s_a (level - c0 + clip(x / s_a))`` with ``level - c0`` held fixed: a
    smooth function whose exact derivative is the paper's learned-step gradient."""
    return s_a * (level - c0 + np.clip(x / s_a, lo, hi))


def fd(f, p, h=1e-6):
    """Central differences of the scalar ``f`` at every entry of the float64 array ``p``."""
    g = np.zeros_like(p)
    for i in np.ndindex(p.shape):
        e = np.zeros_like(p)
        e[i] = h
        g[i] = (f(p + e) - f(p - e)) / (2 * h)
    return g


def test_post_gradients_input_mask_and_step_against_finite_differences():
    x = rand((K, N), 6, 1.2).astype(np.float64)
    step = np.array([[0.5, 1.0, 2.0]])
    x[0] = step[0] * 1.5  # clipped: no input gradient
    v = x / step
    assert tie_margin(v, 4).min() > 1e-5 and np.abs(np.abs(v) - 1).min() > 1e-3
    level = ref_post_level(v, 4)
    c0 = np.clip(v, -1, 1)
    wts = rand((K, N), 7).astype(np.float64)
    _, vjp = jax.vjp(lambda a, s: A.post_fake_quant(a, s, 4), jnp.asarray(x, jnp.float32),
                     jnp.asarray(step, jnp.float32))
    dx, ds = vjp(jnp.asarray(wts, jnp.float32))
    np.testing.assert_array_equal(np.asarray(dx), np.where(np.abs(v) <= 1, wts, 0))
    assert not np.asarray(dx)[0].any()
    want = fd(lambda s: np.sum(wts * surrogate(x, s, level, c0, -1, 1)), step) / np.sqrt(K)
    np.testing.assert_allclose(np.asarray(ds), want, rtol=1e-4)
    # At the clip exactly the input gradient passes (torch's inclusive clamp).
    edge = jnp.asarray(np.where(np.arange(K)[:, None] == 1, step, x), jnp.float32)
    _, vjp = jax.vjp(lambda a, s: A.post_fake_quant(a, s, 4), edge,
                     jnp.asarray(step, jnp.float32))
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(wts, jnp.float32))[0])[1],
                                  np.float32(wts[1]))


# ----------------------------------------------------------------------------- ASQ


def ref_asq(x, step, beta, bits, signed):
    """float32 numpy ASQ forward with the same operations: ``v = x * (1/s_a)``."""
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    s_a = np.float32(step) * beta.astype(np.float32)
    v = x * (np.float32(1) / s_a)
    return np.clip(np.round(v), lo, hi).astype(np.float32) * s_a


@pytest.mark.parametrize("signed", [False, True])
def test_asq_forward_against_reference(signed):
    x = rand((T, C), 8, 2.0)
    x[0, 0] = -0.01  # rounds to a zero code: the value is +0.0, not -0.0
    beta = np.float32([[0.5], [1.0], [1.5], [2.0]])
    y = np.asarray(A.asq_fake_quant(jnp.asarray(x), 0.3, jnp.asarray(beta), 3, signed=signed))
    np.testing.assert_array_equal(y, ref_asq(x, 0.3, beta, 3, signed))
    assert y[0, 0] == 0 and not np.signbit(y[0, 0])


def test_asq_step_and_beta_gradients_against_finite_differences():
    x = rand((T, C), 9, 1.5).astype(np.float64)
    step, beta = np.array(0.3), np.array([[0.8], [1.0], [1.2], [0.9]])
    p = 7  # uint3
    v = x / (step * beta)
    frac = np.abs(v - np.floor(v) - 0.5)
    assert frac.min() > 1e-3 and np.abs(v).min() > 1e-3 and np.abs(v - p).min() > 1e-3
    assert (v < 0).any() and (v > p).any()  # both clipped sides are exercised
    level, c0 = np.clip(np.round(v), 0, p), np.clip(v, 0, p)
    wts = rand((T, C), 10).astype(np.float64)

    def loss(s, b):
        return np.sum(wts * surrogate(x, s * b, level, c0, 0, p))

    grads = jax.jit(jax.grad(lambda s, b, xx, ww: jnp.sum(ww * A.asq_fake_quant(xx, s, b, 3)),
                             argnums=(0, 1)))
    ds, db = grads(jnp.float32(step), jnp.asarray(beta, jnp.float32),
                   jnp.asarray(x, jnp.float32), jnp.asarray(wts, jnp.float32))
    g_scale = 1 / np.sqrt(x.size * p)  # LSQ's scale on the step only
    np.testing.assert_allclose(float(ds), fd(lambda s: loss(s, beta), step) * g_scale, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(db), fd(lambda b: loss(step, b), beta), rtol=1e-4)


def _adapter_arrays(m):
    a = m.adapter
    out = {"W2": a.out.kernel[...], "b2": a.out.bias[...]}
    if a.hidden is not None:
        out.update(W1=a.hidden.kernel[...], b1=a.hidden.bias[...])
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def np_beta(x, prm, pool_axes):
    h = x.mean(axis=pool_axes, keepdims=True) if pool_axes else x
    pre = None
    if "W1" in prm:
        pre = h @ prm["W1"] + prm["b1"]
        h = np.maximum(pre, 0)
    return np.maximum(h @ prm["W2"] + prm["b2"], 1e-8), pre


ADAPTERS = {
    "tokens_two_layers": (C, (T, C), ()),
    "nhwc_one_layer": (3, (2, 2, 2, 3), (1, 2)),
}


@pytest.mark.parametrize("case", sorted(ADAPTERS))
def test_adapter_gradients_against_finite_differences(case):
    features, shape, pool = ADAPTERS[case]
    m = A.ASQActivation(features, 3, pool_axes=pool, step_init=0.3, rngs=nnx.Rngs(0))
    assert (m.adapter.hidden is None) == (features < 8)
    x = rand(shape, 11, 1.5).astype(np.float64)
    prm = _adapter_arrays(m)
    assert np.all(prm["b2"] == 1.0) and np.std(prm["W2"]) < 0.05  # beta starts near 1
    beta, pre = np_beta(x, prm, pool)
    assert beta.shape == shape[:-1] + (1,) if not pool else (shape[0], 1, 1, 1)
    assert pre is None or np.abs(pre).min() > 1e-3  # away from the ReLU kink
    step, p = 0.3, 7
    v = x / (step * beta)
    assert np.abs(v - np.floor(v) - 0.5).min() > 1e-4 and np.abs(np.abs(v) - p).min() > 1e-3
    level, c0 = np.clip(np.round(v), 0, p), np.clip(v, 0, p)
    wts = rand(shape, 12).astype(np.float64)
    np.testing.assert_allclose(np.asarray(m.adapter(jnp.asarray(x, jnp.float32))), beta,
                               rtol=1e-5)

    def loss(prm_, s=step):
        return np.sum(wts * surrogate(x, s * np_beta(x, prm_, pool)[0], level, c0, 0, p))

    graphdef, state = nnx.split(m)

    @jax.jit  # one compilation instead of one per eager op
    def grad_fn(st, xx, ww):
        return jax.grad(lambda st_: jnp.sum(ww * nnx.merge(graphdef, st_)(xx)))(st)

    grads = grad_fn(state, jnp.asarray(x, jnp.float32), jnp.asarray(wts, jnp.float32))
    got = {"W2": grads["adapter"]["out"]["kernel"], "b2": grads["adapter"]["out"]["bias"]}
    if "W1" in prm:
        got.update(W1=grads["adapter"]["hidden"]["kernel"], b1=grads["adapter"]["hidden"]["bias"])
    for name, g in got.items():
        want = fd(lambda a, name=name: loss({**prm, name: a}), prm[name])
        np.testing.assert_allclose(np.asarray(g[...]), want, rtol=2e-4, atol=1e-6,
                                   err_msg=name)
    g_scale = 1 / np.sqrt(x.size * p)
    np.testing.assert_allclose(float(grads["step"][...]),
                               fd(lambda s: loss(prm, s), np.array(step)) * g_scale, rtol=1e-4)


def test_asq_init_step_is_lsq_init():
    x = rand((T, C), 13)
    np.testing.assert_allclose(float(A.asq_init_step(jnp.asarray(x), 4)),
                               2 * np.abs(x).mean() / np.sqrt(15), rtol=1e-6)
    np.testing.assert_allclose(float(A.asq_init_step(jnp.asarray(x), 4, signed=True)),
                               2 * np.abs(x).mean() / np.sqrt(7), rtol=1e-6)


# ----------------------------------------------------------------------------- errors


XK = jnp.ones((K, N))
ERRORS = {
    "post_bits_1": (lambda: A.POST(1), ValueError, "bits"),
    "post_bits_9": (lambda: A.post_fake_quant(XK, 1.0, 9), ValueError, "bits"),
    "post_bits_str": (lambda: A.post_quantize(XK, 1.0, "4"), TypeError, "bits"),
    "post_bits_float": (lambda: A.post_dequantize(jnp.zeros((2,), jnp.int8), 1.0, 4.0),
                        TypeError, "bits"),
    "step_zero": (lambda: A.post_fake_quant(XK, 0.0, 4), ValueError, "step"),
    "step_negative": (lambda: A.post_quantize(XK, -1.0, 4), ValueError, "step"),
    "step_shape": (lambda: A.post_fake_quant(XK, jnp.ones((2, N)), 4), ValueError, "step"),
    "step_int_array": (lambda: A.post_fake_quant(XK, jnp.ones((1, N), jnp.int32), 4),
                       TypeError, "step"),
    "int_input": (lambda: A.post_fake_quant(jnp.ones((K, N), jnp.int32), 1.0, 4), TypeError,
                  "x must be a floating"),
    "float_codes": (lambda: A.post_dequantize(XK, 1.0, 4), TypeError, "codes"),
    "n_zero": (lambda: A.post_fake_quant(XK, 1.0, 4, n=0), ValueError, "n"),
    "asq_signed_1bit": (lambda: A.asq_fake_quant(XK, 1.0, 1.0, 1, signed=True), ValueError,
                        "positive level"),
    "asq_beta_shape": (lambda: A.asq_fake_quant(XK, 1.0, jnp.ones((K + 1, 1)), 4), ValueError,
                       "beta"),
    "asq_signed_str": (lambda: A.asq_fake_quant(XK, 1.0, 1.0, 4, signed="no"), TypeError,
                       "signed"),
    "percentile_q": (lambda: A.post_init_step(XK, q=0), ValueError, "q"),
    "adapter_features": (lambda: A.AdaptiveStep(0, rngs=nnx.Rngs(0)), ValueError, "features"),
    "adapter_pool_list": (lambda: A.AdaptiveStep(4, pool_axes=[1], rngs=nnx.Rngs(0)),
                          TypeError, "pool_axes"),
    "module_step_init": (lambda: A.ASQActivation(4, 4, step_init=-1.0, rngs=nnx.Rngs(0)),
                         ValueError, "step_init"),
    "module_bits": (lambda: A.ASQActivation(4, 0, rngs=nnx.Rngs(0)), ValueError, "bits"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_arguments_raise(case):
    fn, exc, match = ERRORS[case]
    with pytest.raises(exc, match=match):
        fn()


def test_post_quantspec_with_lsq_equals_post_fake_quant_values_and_gradients():
    """The core format (qjax.POST, LSQ estimator: what Method("lsq", grid="post") trains) and
    ASQ's own post_fake_quant agree wherever no element sits exactly on the clip |x/s| = 1."""
    x = jnp.asarray(rand((K, N), 7, 1.0))
    step = A.post_init_step(x)  # per output feature; the 99th percentile, so some clip
    spec = qjax.QuantSpec("post4", qjax.PerRow(0), "absmax", "lsq")
    np.testing.assert_array_equal(np.asarray(qjax.fake_quant(x, spec, scale=step)),
                                  np.asarray(A.post_fake_quant(x, step, 4)))

    def loss(f):
        return lambda x, s: jnp.sum(jnp.sin(3.0 * f(x, s)))

    core = jax.grad(loss(lambda x, s: qjax.fake_quant(x, spec, scale=s)), argnums=(0, 1))(x, step)
    asq = jax.grad(loss(lambda x, s: A.post_fake_quant(x, s, 4)), argnums=(0, 1))(x, step)
    for a, b in zip(core, asq, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
