"""Tests for qjax.hadamard: Sylvester ordering, orthonormality, involution, O(n log n) form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax


@pytest.mark.parametrize("block", [1, 2, 4, 8, 32, 128])
def test_matches_dense_sylvester_matrix(block):
    x = np.random.default_rng(block).normal(size=(3, 2 * block)).astype(np.float32)
    h = qjax.hadamard_matrix(block)
    ref = np.concatenate([x[:, :block] @ h.T, x[:, block:] @ h.T], axis=1)
    got = qjax.hadamard_transform(jnp.asarray(x), block)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_dense_matrix_is_orthonormal_symmetric_sylvester():
    h = qjax.hadamard_matrix(8)
    np.testing.assert_allclose(h @ h.T, np.eye(8), atol=1e-12)
    np.testing.assert_array_equal(h, h.T)
    h4 = qjax.hadamard_matrix(4)
    np.testing.assert_allclose(h * np.sqrt(8), np.block([[h4, h4], [h4, -h4]]) * 2, atol=1e-12)


def test_involution_and_norm():
    x = jax.random.normal(jax.random.key(0), (5, 512))
    y = qjax.hadamard_transform(x, 128)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(qjax.hadamard_transform(y, 128), x, atol=1e-5)


def test_axis_argument():
    x = jax.random.normal(jax.random.key(1), (64, 3))
    a = qjax.hadamard_transform(x, 32, axis=0)
    b = qjax.hadamard_transform(x.T, 32).T
    np.testing.assert_array_equal(a, b)


def test_random_signs_inverse():
    x = jax.random.normal(jax.random.key(2), (4, 64))
    d = qjax.random_signs(jax.random.key(3), 64)
    assert set(np.unique(np.asarray(d))) == {-1.0, 1.0}
    y = qjax.hadamard_transform(x, 64, signs=d)
    assert not np.allclose(y, qjax.hadamard_transform(x, 64))
    np.testing.assert_allclose(qjax.hadamard_transform(y, 64, signs=d, inverse=True), x, atol=1e-5)


def test_butterfly_has_no_matmul_and_every_method_is_float32():
    x = jnp.ones((2, 256), jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(lambda a: qjax.hadamard_transform(a, 128, method="butterfly"))(x))
    assert "dot_general" not in jaxpr
    for method in ("butterfly", "matmul", "kronecker"):
        assert qjax.hadamard_transform(x, 128, method=method).dtype == jnp.float32


def test_gradient_is_transpose():
    x = jax.random.normal(jax.random.key(4), (2, 16))
    g = jax.random.normal(jax.random.key(5), (2, 16))
    _, vjp = jax.vjp(lambda a: qjax.hadamard_transform(a, 16), x)
    np.testing.assert_allclose(vjp(g)[0], g @ qjax.hadamard_matrix(16).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["matmul", "kronecker"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(("shape", "axis"), [((3, 5, 256), -1), ((256, 48), 0), ((2, 128, 40), 1)])
def test_explicit_vjp_is_autodiff(shape, axis, dtype, method):
    # The quantizers' custom VJP writes the transpose out: same values; for "matmul" autodiff's
    # own products and sums (bit for bit), for "kronecker" its factors in the other order.
    x = jax.random.normal(jax.random.key(0), shape).astype(dtype)
    g = jax.random.normal(jax.random.key(1), shape)

    def vjp(explicit):
        f = lambda a: qjax.hadamard_transform(a, 128, axis=axis, method=method,
                                              explicit_vjp=explicit)
        y, back = jax.vjp(f, x)
        return y, back(g)[0]

    (y0, d0), (y1, d1) = jax.jit(lambda: vjp(False))(), jax.jit(lambda: vjp(True))()
    assert d1.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))
    d0, d1 = np.asarray(d0, np.float32), np.asarray(d1, np.float32)
    if method == "matmul":
        np.testing.assert_array_equal(d1, d0)
    else:
        np.testing.assert_allclose(d1, d0, rtol=0, atol=1e-5 if dtype == jnp.float32 else 2e-2)


def test_bad_input():
    with pytest.raises(ValueError, match="block_size 128 does not divide axis 1 of size 96"):
        qjax.hadamard_transform(jnp.ones((2, 96)), 128)
    with pytest.raises(ValueError, match="power of two"):
        qjax.hadamard_transform(jnp.ones((2, 96)), 48)
    with pytest.raises(TypeError, match="floating"):
        qjax.hadamard_transform(jnp.ones((2, 8), jnp.int32), 8)
    with pytest.raises(TypeError, match="block_size"):
        qjax.hadamard_transform(jnp.ones((2, 8)), 8.0)
    with pytest.raises(ValueError, match="signs must have shape"):
        qjax.hadamard_transform(jnp.ones((2, 8)), 8, signs=jnp.ones(4))


@pytest.mark.parametrize("block", [1, 8, 32, 128, 256, 2048])
@pytest.mark.parametrize(("shape", "axis"), [((3, 2), -1), ((2, 5), 0), ((2, 1, 3), 1)])
def test_kronecker_method_is_the_dense_transform(block, shape, axis):
    # H_b = H_c (x) H_a: a 32-wide dense matmul and signed sums over c (recursing past c = 8).
    x = np.random.default_rng(block).normal(size=[d * block if d > 0 and i == axis % len(shape)
                                                  else d for i, d in enumerate(shape)])
    x = jnp.asarray(x, jnp.float32)
    ref = qjax.hadamard_transform(x, block, axis=axis, method="matmul")
    got = qjax.hadamard_transform(x, block, axis=axis, method="kronecker")
    if block <= 32:  # one dense factor: the "matmul" products and sums
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.sqrt(np.log2(max(block, 2))))
    jaxpr = str(jax.make_jaxpr(lambda a: qjax.hadamard_transform(a, block, axis=axis,
                                                                 method="kronecker"))(x))
    assert jaxpr.count("dot_general") == (1 if block <= 32 * 8 else 2)


@pytest.mark.parametrize("block", [2, 16, 128])
def test_matmul_method_agrees_with_butterfly(block):
    x = jax.random.normal(jax.random.key(6), (3, 2 * block), jnp.bfloat16)
    a = qjax.hadamard_transform(x, block, method="butterfly")
    b = qjax.hadamard_transform(x, block, method="matmul")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda a: qjax.hadamard_transform(a, block, method="matmul"))(x))
    assert "dot_general" in jaxpr and "HIGHEST" in jaxpr
    with pytest.raises(ValueError, match="method must be one of"):
        qjax.hadamard_transform(x, block, method="fft")


METHODS = ["butterfly", "matmul", "kronecker"]
# The butterfly's unrolled stages take 10-12 s to compile at block 256; it is no method's default.
EDGE_METHODS = [pytest.param("butterfly", marks=pytest.mark.slow), "matmul", "kronecker"]


@pytest.mark.parametrize("method", EDGE_METHODS)
def test_huge_input_stays_finite_up_to_the_documented_bound(method):
    # All-equal rows put the whole mass in one output: 1e37 * sqrt(128) = 1.13e38 is finite, and
    # so must be the partial sums (summing before normalising overflowed to inf, then NaN).
    y = np.asarray(qjax.hadamard_transform(jnp.full((2, 128), 1e37), 128, method=method))
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y[:, 0], 1e37 * np.sqrt(128), rtol=1e-5)
    np.testing.assert_allclose(y[:, 1:], 0.0, atol=1e-7 * y[0, 0])  # matmul: rounding, not 0
    for block in (2, 32, 256):
        big = float(np.finfo(np.float32).max) / np.sqrt(block) * 0.999
        y = qjax.hadamard_transform(jnp.full((1, block), big), block, method=method)
        assert np.all(np.isfinite(np.asarray(y)))


@pytest.mark.parametrize("method", EDGE_METHODS)
def test_finite_input_beyond_the_range_saturates_never_nan(method):
    # 1e38 * sqrt(128) is beyond float32: the partial sums overflowed and inf - inf gave all-NaN
    # rows. Now the sums run at 1/(2b) scale and cannot overflow: the result is exact where it
    # fits and saturates at float32 max where it does not.
    fmax = float(np.finfo(np.float32).max)
    x = jnp.stack([jnp.full(128, 1e38), jnp.full(128, -3.4e38).at[::2].set(3.4e38),
                   jnp.full(128, fmax)])
    y = np.asarray(qjax.hadamard_transform(x, 128, method=method))
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[:, 0][[0, 2]], fmax)  # 1e38 * sqrt(128) saturates
    np.testing.assert_array_equal(y[1, 1], fmax)  # the alternating row's one nonzero
    np.testing.assert_allclose(np.delete(y[1], 1), 0.0, atol=1e-6 * fmax)
    back = np.asarray(qjax.hadamard_transform(y, 128, method=method, inverse=True))
    assert np.all(np.isfinite(back))
    # The saturation is the cast's: the gradient stays the transform's own (H is symmetric).
    c = jax.random.normal(jax.random.key(3), x.shape)
    g = jax.grad(lambda a: jnp.sum(qjax.hadamard_transform(a, 128, method=method) * c))(x)
    np.testing.assert_allclose(g, qjax.hadamard_transform(c, 128, method=method), atol=1e-5)


def test_saturating_cast():
    from qjax._src.hadamard import saturating_cast
    y = saturating_cast(jnp.array([1e5, -1e6, 1.0, jnp.inf, jnp.nan]), jnp.float16)
    assert y.dtype == jnp.float16
    np.testing.assert_array_equal(y[:4], [65504, -65504, 1.0, 65504])
    assert np.isnan(y[4])
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        saturating_cast(jnp.ones(2), jnp.int8)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("block", [1, 2, 8, 64, 128, 256])
def test_split_normalisation_is_bit_identical_to_normalising_after(method, block):
    # Scaling by 1/(2b) before the sums is exact: same bits as H y * (1/sqrt(b)).
    from qjax._src import hadamard as H
    x = jax.random.normal(jax.random.key(9), (3, 2 * block)) * jnp.logspace(-20, 20, 2 * block)
    y = x.reshape(3, 2, block, 1)
    raw = {"butterfly": H._butterfly, "matmul": H._dense, "kronecker": H._kronecker}[method](y)
    ref = (raw * np.float32(1.0 / np.sqrt(block))).reshape(x.shape)
    for f in (qjax.hadamard_transform, jax.jit(qjax.hadamard_transform, static_argnums=1,
                                               static_argnames="method")):
        got = f(x, block, method=method)
        np.testing.assert_array_equal(np.asarray(got).view(np.uint32),
                                      np.asarray(ref).view(np.uint32))


def test_axis_inverse_and_signs_validated():
    x = jnp.ones((2, 8))
    for bad in (1.5, True, "-1"):
        with pytest.raises(TypeError, match="axis must be an int"):
            qjax.hadamard_transform(x, 8, axis=bad)
    with pytest.raises(TypeError, match="inverse must be a bool"):
        qjax.hadamard_transform(x, 8, inverse="no")
    for bad in (jnp.zeros(8), jnp.full(8, 2.0), np.array([1, -1, 1, -1, 1, -1, 1, 0.5])):
        with pytest.raises(ValueError, match=r"signs must be \+-1"):
            qjax.hadamard_transform(x, 8, signs=bad)
    # Traced signs are not inspected (no branching on traced values), and valid ones work.
    signs = qjax.random_signs(jax.random.key(0), 8)
    y = jax.jit(lambda s: qjax.hadamard_transform(x, 8, signs=s))(signs)
    np.testing.assert_array_equal(y, qjax.hadamard_transform(x, 8, signs=signs))
