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


def test_fast_form_has_no_matmul_and_is_float32():
    x = jnp.ones((2, 256), jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(lambda a: qjax.hadamard_transform(a, 128))(x))
    assert "dot_general" not in jaxpr
    assert qjax.hadamard_transform(x, 128).dtype == jnp.float32


def test_gradient_is_transpose():
    x = jax.random.normal(jax.random.key(4), (2, 16))
    g = jax.random.normal(jax.random.key(5), (2, 16))
    _, vjp = jax.vjp(lambda a: qjax.hadamard_transform(a, 16), x)
    np.testing.assert_allclose(vjp(g)[0], g @ qjax.hadamard_matrix(16).T, rtol=1e-5, atol=1e-5)


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
