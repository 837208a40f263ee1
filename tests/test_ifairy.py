"""Tests for qjax.methods.ifairy: PhaseQuant codes and scales, the complex STE, the complex layer,
the addition-only serving path and the conjugating optax transform."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jaxpr_walk import equations

from qjax.methods import ifairy as I

HIGHEST = jax.lax.Precision.HIGHEST
# Shared shapes (each new shape is a new compilation): kernels (K, N), inputs (M, K).
K, N, M = 32, 5, 3


def crand(shape, seed):
    """Complex64 test data with standard normal real and imaginary parts (numpy RNG)."""
    r = np.random.default_rng(seed).standard_normal((2,) + tuple(shape)).astype(np.float32)
    return jnp.asarray(r[0] + 1j * r[1], jnp.complex64)


def ref_codes(w):
    """Independent PhaseQuant: the fourth root ``i^q`` with the largest projection
    ``Re(w i^-q)`` (the nearest in phase); a tie between ``q`` and ``q + 1`` (a diagonal) goes to
    ``q + 1`` (counter-clockwise, the half-open sectors); ``w = 0`` is code 0."""
    w = np.asarray(w).astype(np.complex128).ravel()
    out = np.empty(w.size, np.int64)
    for idx, z in enumerate(w):
        p = np.array([z.real, z.imag, -z.real, -z.imag])
        top = set(np.flatnonzero(p == p.max()).tolist())
        if len(top) == 1:
            out[idx] = top.pop()
        elif len(top) == 2:
            q = next(t for t in top if (t + 1) % 4 in top)
            out[idx] = (q + 1) % 4
        else:
            out[idx] = 0
    return out


def ref_quant(w, reduce_axes):
    """float64 masked means per block and the dequantized weight."""
    w = np.asarray(w).astype(np.complex128)
    q = ref_codes(w).reshape(w.shape)
    on_re, on_im = (q % 2 == 0), (q % 2 == 1)

    def mean(v, m):
        n = np.sum(m, axis=reduce_axes, keepdims=True)
        s = np.sum(np.where(m, np.abs(v), 0.0), axis=reduce_axes, keepdims=True)
        return np.divide(s, n, out=np.zeros_like(s), where=n > 0)

    s_re, s_im = mean(w.real, on_re), mean(w.imag, on_im)
    wq = np.choose(q, [s_re + 0j, 1j * s_im, -s_re + 0j, -1j * s_im])
    return q, s_re, s_im, wq


# ----------------------------------------------------------------------------- quantizer


def test_worked_example_of_the_docstring():
    w = jnp.asarray([[1 + 0.5j, -3 + 1j], [0.2 + 2j, 0.5 - 4j]], jnp.complex64)
    q, s_re, s_im = I.ifairy_quantize(w)
    assert q.dtype == jnp.int8 and s_re.shape == s_im.shape == (1, 1)
    np.testing.assert_array_equal(np.asarray(q), [[0, 2], [1, 3]])
    assert float(s_re[0, 0]) == 2.0 and float(s_im[0, 0]) == 3.0
    np.testing.assert_array_equal(np.asarray(I.ifairy(w)), [[2, -2], [3j, -3j]])


POINTS = {
    "plus_one": 1 + 0j, "plus_i": 1j, "minus_one": -1 + 0j, "minus_i": -1j,
    "diag_q1": 1 + 1j, "diag_q2": -1 + 1j, "diag_q3": -1 - 1j, "diag_q4": 1 - 1j,
    "zero": 0j, "tiny_diag": 1e-30 + 1e-30j, "huge_diag": -3e38 - 3e38j,
    "near_diag_below": 1 + np.nextafter(np.float32(1), np.float32(0)) * 1j,
    "near_diag_above": np.nextafter(np.float32(1), np.float32(0)) + 1j,
}


@pytest.mark.parametrize("name", sorted(POINTS))
def test_codes_of_axes_diagonals_and_zero(name):
    w = jnp.asarray([[POINTS[name]]], jnp.complex64)
    assert int(I.ifairy_quantize(w)[0][0, 0]) == ref_codes(w)[0]


@pytest.mark.parametrize("granularity,axes", [("tensor", (-2, -1)), ("channel", (-2,))])
def test_codes_scales_and_values_match_reference(granularity, axes):
    w = crand((2, K, N), 0)  # a stack of 2 kernels: every matrix is its own block
    q, s_re, s_im = I.ifairy_quantize(w, granularity=granularity)
    rq, rs_re, rs_im, rwq = ref_quant(w, axes)
    np.testing.assert_array_equal(np.asarray(q), rq)
    assert s_re.shape == rs_re.shape == ((2, 1, 1) if granularity == "tensor" else (2, 1, N))
    np.testing.assert_allclose(np.asarray(s_re), rs_re, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s_im), rs_im, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(I.ifairy(w, granularity=granularity)), rwq, rtol=1e-6)
    assert sorted(np.unique(np.asarray(q)).tolist()) == [0, 1, 2, 3]


def test_fake_quant_equals_dequantize_of_quantize_bit_for_bit_eager_and_jit():
    w = crand((K, N), 1)

    def both(a):
        return I.ifairy(a, granularity="channel"), I.ifairy_quantize(a, granularity="channel")

    for y, parts in (both(w), jax.jit(both)(w)):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(I.ifairy_dequantize(*parts)))


def test_zero_blocks_give_zeros_not_nan():
    w = np.array(crand((K, N), 2))
    w[:, 1] = 0  # one all-zero output feature
    w = jnp.asarray(w)
    y = np.asarray(I.ifairy(w, granularity="channel"))
    assert np.all(np.isfinite(y.view(np.float32)))
    np.testing.assert_array_equal(y[:, 1], 0)
    assert np.all(np.abs(np.delete(y, 1, axis=1)) > 0)
    np.testing.assert_array_equal(np.asarray(I.ifairy(jnp.zeros((K, N), jnp.complex64))), 0)
    # Only imaginary codes: s_re is the mean of nothing, 0 (the released code gives NaN).
    q, s_re, s_im = I.ifairy_quantize(jnp.asarray([[2j, -1j], [0.5j, -3j]], jnp.complex64))
    assert float(s_re[0, 0]) == 0.0 and float(s_im[0, 0]) == 1.625


def test_huge_weights_stay_finite():
    w = jnp.asarray([[3e38 + 1j, -3e38 + 0j], [3e38j, -3e38j]], jnp.complex64)
    y = np.asarray(I.ifairy(w)).view(np.float32)
    assert np.all(np.isfinite(y))


# ----------------------------------------------------------------------------- gradients


def test_ste_vjp_passes_the_cotangent_unchanged():
    w, ct = crand((K, N), 3), crand((K, N), 4)
    _, vjp = jax.vjp(lambda a: I.ifairy(a, granularity="channel"), w)
    np.testing.assert_array_equal(np.asarray(vjp(ct)[0]), np.asarray(ct))


def test_ste_gradient_against_the_real_pair_definition():
    """dL/dRe w = dL/dRe W_q and dL/dIm w = dL/dIm W_q, by real autodiff of L(a + ib); JAX's
    complex gradient is dL/da - i dL/db."""
    w, x, t = crand((K, N), 5), crand((M, K), 6), crand((M, N), 7)

    def loss(v):
        return jnp.sum(jnp.abs(jnp.matmul(x, v, precision=HIGHEST) - t) ** 2)

    @jax.jit  # one compilation instead of one per eager op
    def grads(a):
        wq = I.ifairy(a)
        real_pair = jax.grad(lambda re, im: loss(jax.lax.complex(re, im)), argnums=(0, 1))
        return jax.grad(lambda b: loss(I.ifairy(b)))(a), *real_pair(jnp.real(wq), jnp.imag(wq))

    g, g_re, g_im = grads(w)
    np.testing.assert_allclose(np.real(np.asarray(g)), np.asarray(g_re), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.imag(np.asarray(g)), -np.asarray(g_im), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- layer


def test_complex_dense_qat_and_float():
    x, w = crand((M, K), 8), crand((K, N), 9)
    ref = np.asarray(x).astype(np.complex128)
    wq = ref_quant(w, (-2, -1))[3]
    np.testing.assert_allclose(np.asarray(I.complex_dense(x, w)), ref @ wq, rtol=2e-6, atol=2e-5)
    np.testing.assert_allclose(np.asarray(I.complex_dense(x, w, qat=False)),
                               ref @ np.asarray(w).astype(np.complex128), rtol=2e-6, atol=2e-5)


def test_complex_linear_forward_gradient_and_serving():
    layer = I.ComplexLinear(K, N, granularity="channel", rngs=nnx.Rngs(0))
    kernel = layer.kernel[...]
    assert kernel.dtype == jnp.complex64 and kernel.shape == (K, N)
    bound = 1 / np.sqrt(K)  # U(-1/sqrt(K), 1/sqrt(K)) for both parts
    for part in (np.real(kernel), np.imag(kernel)):
        assert np.max(np.abs(part)) <= bound and np.max(np.abs(part)) > 0.8 * bound
    x, t = crand((M, K), 10), crand((M, N), 11)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(
        I.complex_dense(x, kernel, granularity="channel")))
    np.testing.assert_allclose(np.asarray(I.ifairy_serve(x, *layer.quantize())),
                               np.asarray(layer(x)), rtol=1e-5, atol=1e-5)

    def loss_v(v):
        return jnp.sum(jnp.abs(jnp.matmul(x, v, precision=HIGHEST) - t) ** 2)

    graphdef, state = nnx.split(layer)

    @jax.jit  # one compilation instead of one per eager op
    def grads(st):
        g = jax.grad(lambda st_: jnp.sum(jnp.abs(nnx.merge(graphdef, st_)(x) - t) ** 2))(st)
        # STE: dL/dw = dL/dW_q
        return g["kernel"][...], jax.grad(loss_v)(I.ifairy(kernel, granularity="channel"))

    g, want = grads(state)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-6, atol=1e-6)
    layer.qat = False
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(
        jnp.matmul(x, kernel, precision=HIGHEST)))


def test_conjugate_gradients_descends_in_both_parts():
    t = jnp.asarray([1 + 2j, -0.5 - 1j], jnp.complex64)
    loss = lambda w: jnp.sum(jnp.abs(w - t) ** 2)  # noqa: E731
    opt = optax.chain(I.conjugate_gradients(), optax.sgd(0.25))
    w = jnp.zeros(2, jnp.complex64)
    state = opt.init(w)
    da, db = jax.grad(lambda a, b: loss(jax.lax.complex(a, b)), argnums=(0, 1))(
        jnp.zeros(2), jnp.zeros(2))

    @jax.jit
    def step(w_, state_):
        updates_, state_ = opt.update(jax.grad(loss)(w_), state_, w_)
        return optax.apply_updates(w_, updates_), state_, updates_

    w, state, updates = step(w, state)
    np.testing.assert_allclose(np.asarray(updates), -0.25 * np.asarray(da + 1j * db), rtol=1e-6)
    for _ in range(30):
        w, state, _ = step(w, state)
    np.testing.assert_allclose(np.asarray(w), np.asarray(t), atol=1e-4)
    # Real leaves pass unchanged.
    real = {"b": jnp.ones(3)}
    out, _ = I.conjugate_gradients().update(real, optax.EmptyState())
    np.testing.assert_array_equal(np.asarray(out["b"]), 1.0)


# ----------------------------------------------------------------------------- serving


def test_serve_equals_dequantized_matmul_exactly_on_exact_sums():
    """Integer-valued x and scales: every partial sum is an exact float32 integer, so the
    addition-only path and the complex matmul at HIGHEST must agree bit for bit."""
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.integers(-8, 9, (M, K)) + 1j * rng.integers(-8, 9, (M, K)),
                    jnp.complex64)
    codes = I.ifairy_quantize(crand((K, N), 13))[0]
    for s_re, s_im in [(jnp.full((1, 1), 2.0), jnp.full((1, 1), 3.0)),
                       (jnp.arange(1.0, N + 1)[None], jnp.arange(7.0, N + 7)[None])]:
        y = I.ifairy_serve(x, codes, s_re, s_im)
        wq = I.ifairy_dequantize(codes, s_re, s_im)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(
            jnp.einsum("...k,kn->...n", x, wq, precision=HIGHEST)))
        exact = (np.asarray(x).astype(np.complex128) @ np.asarray(wq).astype(np.complex128))
        np.testing.assert_array_equal(np.asarray(y), exact)


@pytest.mark.parametrize("granularity", I.GRANULARITIES)
def test_serve_within_the_float32_dot_error_bound(granularity):
    k = K
    x, w = crand((M, k), 14), crand((k, N), 15)
    q, s_re, s_im = I.ifairy_quantize(w, granularity=granularity)
    y = np.asarray(I.ifairy_serve(x, q, s_re, s_im)).astype(np.complex128)
    wq = np.asarray(I.ifairy_dequantize(q, s_re, s_im)).astype(np.complex128)
    xd = np.asarray(x).astype(np.complex128)
    # |error| <= gamma_(K+2) * sum_k (|x_re| + |x_im|) (|W_re| + |W_im|), per part.
    mag = (np.abs(xd.real) + np.abs(xd.imag)) @ (np.abs(wq.real) + np.abs(wq.imag))
    bound = (k + 2) * np.finfo(np.float32).eps * mag
    exact = xd @ wq
    assert np.all(np.abs(y.real - exact.real) <= bound)
    assert np.all(np.abs(y.imag - exact.imag) <= bound)
    dense = np.asarray(jnp.einsum("mk,kn->mn", x, jnp.asarray(wq, jnp.complex64),
                                  precision=HIGHEST)).astype(np.complex128)
    assert np.all(np.abs(y - dense) <= 2 * np.sqrt(2) * bound)


def test_serve_multiplies_only_in_the_epilogue():
    x, codes = crand((M, K), 16), jnp.zeros((K, N), jnp.int8)
    s = jnp.ones((1, N), jnp.float32)
    eqns = list(equations(jax.make_jaxpr(I.ifairy_serve)(x, codes, s, s).jaxpr))
    names = {e.primitive.name for e, _ in eqns}
    assert "scan" in names and "dot_general" not in names
    assert not [e for e, inside in eqns if inside and e.primitive.name == "mul"]
    muls = [e for e, inside in eqns if e.primitive.name == "mul"]
    assert len(muls) == 4 and all(e.outvars[0].aval.shape == (M, N) for e in muls)


# ----------------------------------------------------------------------------- errors


W2 = crand((4, 3), 17)
X2 = crand((2, 4), 18)
Q2 = jnp.zeros((4, 3), jnp.int8)
S1 = jnp.ones((1, 1), jnp.float32)

ERRORS = {
    "real_weight": (lambda: I.ifairy(jnp.ones((4, 3))), TypeError, "complex64"),
    "numpy_list_weight": (lambda: I.ifairy_quantize([[1j]]), TypeError, "complex64"),
    "vector_weight": (lambda: I.ifairy(W2[0]), ValueError, "K, N"),
    "bad_granularity": (lambda: I.ifairy(W2, granularity="row"), ValueError, "granularity"),
    "real_input": (lambda: I.complex_dense(jnp.ones((2, 4)), W2), TypeError, "x must be"),
    "real_kernel_dense": (lambda: I.complex_dense(X2, jnp.ones((4, 3))), TypeError, "w must"),
    "wrong_k": (lambda: I.complex_dense(X2[:, :3], W2), ValueError, "K = 4"),
    "stacked_dense": (lambda: I.complex_dense(X2, W2[None]), ValueError, "vmap"),
    "qat_not_bool": (lambda: I.complex_dense(X2, W2, qat="yes"), TypeError, "qat"),
    "serve_float_codes": (lambda: I.ifairy_serve(X2, Q2.astype(jnp.float32), S1, S1),
                          TypeError, "codes"),
    "serve_3d_codes": (lambda: I.ifairy_serve(X2, Q2[None], S1, S1), ValueError, "2-D"),
    "serve_real_x": (lambda: I.ifairy_serve(jnp.ones((2, 4)), Q2, S1, S1), TypeError, "x"),
    "serve_scale_shape": (lambda: I.ifairy_serve(X2, Q2, jnp.ones((2, 3)), S1), ValueError,
                          "scale_re"),
    "serve_int_scale": (lambda: I.ifairy_serve(X2, Q2, S1, jnp.ones((1, 1), jnp.int32)),
                        TypeError, "scale_im"),
    "dequantize_float_codes": (lambda: I.ifairy_dequantize(jnp.zeros((2, 2)), S1, S1),
                               TypeError, "codes"),
    "layer_zero_features": (lambda: I.ComplexLinear(0, 3, rngs=nnx.Rngs(0)), ValueError,
                            "in_features"),
    "layer_granularity": (lambda: I.ComplexLinear(2, 3, granularity="x", rngs=nnx.Rngs(0)),
                          ValueError, "granularity"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_arguments_raise(case):
    fn, exc, match = ERRORS[case]
    with pytest.raises(exc, match=match):
        fn()
