"""Tests for qjax.qdot: integer-forward QAT matmul against the fake-quant matmul."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax._src.qdot import (
    check_int32_sum,
    int8_code_max,
    int8_matmul,
    integer_forward_reason,
    qat_dense,
)
from qjax.methods import quest
from qjax.nn import LayerQuant, Method

X = jax.random.normal(jax.random.key(0), (3, 5, 128))
K = jax.random.normal(jax.random.key(1), (128, 24)) * 0.1
G = jax.random.normal(jax.random.key(2), (3, 5, 24))

PAIRS = {
    "int8 per channel/token": (qjax.QuantSpec("int8", qjax.PerRow(0)),
                               qjax.QuantSpec("int8", qjax.PerRow(-1))),
    "int4 clipped, per tensor": (qjax.QuantSpec("int4", qjax.PerTensor(), "absmax", "clipped_ste"),
                                 qjax.QuantSpec("int4", qjax.PerTensor(), "absmax",
                                                "clipped_ste")),
    "quest midrise 4 (trust)": (quest.spec(4, axis=0, hadamard_mode=None),
                                quest.spec(4, hadamard_mode=None)),
    "quest midrise 7": (quest.spec(7, axis=0, hadamard_mode=None),
                        quest.spec(7, hadamard_mode=None)),
    "ternary": (qjax.QuantSpec("ternary", qjax.PerRow(0), "rms_gaussian"),
                qjax.QuantSpec("ternary", qjax.PerRow(-1), "rms_gaussian")),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_matches_fake_quant_forward_and_backward(name):
    w, a = PAIRS[name]
    f_int = lambda x, k: qat_dense(x, k, w, a)
    f_fq = lambda x, k: qjax.fake_quant(x, a) @ qjax.fake_quant(k, w)
    y_int, vjp_int = jax.vjp(f_int, X, K)
    y_fq, vjp_fq = jax.vjp(f_fq, X, K)
    # The int32 sum is exact; only the float matmul's rounding differs.
    np.testing.assert_allclose(y_int, y_fq, rtol=1e-5, atol=1e-5 * float(jnp.abs(y_fq).max()))
    # Both backward passes are float matmuls of the same operands; XLA may order their sums
    # differently (the tolerance is relative to the gradient's scale, not to a cancelled entry).
    for d_int, d_fq in zip(vjp_int(G), vjp_fq(G), strict=True):
        np.testing.assert_allclose(d_int, d_fq, rtol=1e-6,
                                   atol=1e-6 * float(jnp.abs(d_fq).max()))


def test_forward_really_is_an_int8_dot():
    w, a = PAIRS["int8 per channel/token"]
    jaxpr = str(jax.make_jaxpr(lambda x, k: qat_dense(x, k, w, a))(X, K))
    assert "preferred_element_type=int32" in jaxpr and "i8[" in jaxpr


def test_layers_and_rewrite_use_it():
    lq = Method("quest", 4, 4, integer_forward=True).layer_quant(
        qjax.nn.dense_layout((X.shape[-1], 24)))
    assert lq.integer_forward
    layer = qjax.nn.linen.QDense(24, weight=lq.weight, activation=lq.activation)
    p = layer.init(jax.random.key(3), X)["params"]
    int_layer = qjax.nn.linen.QDense(24, method=Method("quest", 4, 4, integer_forward=True))
    np.testing.assert_allclose(int_layer.apply({"params": p}, X), layer.apply({"params": p}, X),
                               rtol=1e-5, atol=1e-5)

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(24, name="d")(x)

    qa = qjax.nn.quantize_model(M(), {"d": Method("ste", 8, 8)})
    qb = qjax.nn.quantize_model(M(), {"d": Method("ste", 8, 8, integer_forward=True)})
    v = qa.init(jax.random.key(4), X)
    np.testing.assert_allclose(qb.apply(v, X), qa.apply(v, X), rtol=1e-5, atol=1e-5)
    ga = jax.grad(lambda p: jnp.sum(qa.apply({"params": p}, X) * G))(v["params"])
    gb = jax.grad(lambda p: jnp.sum(qb.apply({"params": p}, X) * G))(v["params"])
    np.testing.assert_allclose(gb["d"]["kernel"], ga["d"]["kernel"], rtol=1e-6,
                               atol=1e-6 * float(jnp.abs(ga["d"]["kernel"]).max()))


def test_unsupported_specs_are_refused_with_a_reason():
    w, a = PAIRS["int8 per channel/token"]
    assert integer_forward_reason(w, a) is None
    assert "both" in integer_forward_reason(w, None)
    assert "zero point" in integer_forward_reason(
        w, qjax.QuantSpec("int8", qjax.PerRow(-1), "absmax_asymmetric"))
    assert "no exact int8 code" in integer_forward_reason(quest.spec(8, axis=0), quest.spec(8))
    assert "granularity" in integer_forward_reason(qjax.QuantSpec("int8", qjax.PerGroup(0, 32)), a)
    assert "learned" in integer_forward_reason(w, qjax.QuantSpec("int8", estimator="lsq"))
    with pytest.raises(ValueError, match="integer_forward is not available"):
        LayerQuant(w, None, integer_forward=True)
    with pytest.raises(ValueError, match="integer forward not available"):
        qat_dense(X, K, w, qjax.QuantSpec("e4m3", qjax.PerRow(-1)))


def test_int8_matmul_gives_the_same_bits_under_jit_and_eager():
    # A residual add after the scaled int32 product must not become an FMA under jit only.
    xi = jax.random.randint(jax.random.key(20), (4, 16, 64), -127, 128).astype(jnp.int8)
    wi = jax.random.randint(jax.random.key(21), (48, 64), -127, 128).astype(jnp.int8)
    xs = jax.random.uniform(jax.random.key(22), (4, 16, 1)) * 1e-2
    ws = jax.random.uniform(jax.random.key(23), (48, 1)) * 1e-2
    r = jax.random.normal(jax.random.key(24), (4, 16, 48))
    f = lambda xi, xs, wi, ws, r: r + int8_matmul(xi, xs, wi, ws, 1)  # noqa: E731
    np.testing.assert_array_equal(f(xi, xs, wi, ws, r), jax.jit(f)(xi, xs, wi, ws, r))


def _trace(w, a, k):
    """Traces qat_dense for a (1, k) x (k, 2) product without computing it."""
    return jax.eval_shape(lambda x, kern: qat_dense(x, kern, w, a),
                          jax.ShapeDtypeStruct((1, k), jnp.float32),
                          jax.ShapeDtypeStruct((k, 2), jnp.float32))


def test_int32_accumulator_overflow_is_refused():
    # int8 codes reach -128: K * 128 * 128 <= 2^31 - 1 up to K = 131,071.
    w, a = PAIRS["int8 per channel/token"]
    assert _trace(w, a, 131_071).shape == (1, 2)
    with pytest.raises(ValueError, match=r"K = 131072 .* K <= 131071"):
        _trace(w, a, 131_072)
    with pytest.raises(ValueError, match="K = 140000"):
        qat_dense(jnp.ones((1, 140_000)), jnp.ones((140_000, 1)), w, a)  # gave -126288.5
    # QuEST's odd 4-bit codes reach 15: the same K is exact.
    w4, a4 = PAIRS["quest midrise 4 (trust)"]
    assert _trace(w4, a4, 140_000).shape == (1, 2)
    assert int8_code_max(qjax.Midrise(4)) == 15 and int8_code_max(qjax.IntFormat(8)) == 128
    assert int8_code_max(qjax.Ternary()) == 1 and int8_code_max(qjax.IntFormat(8, False)) is None
    check_int32_sum(2**31 - 1, qjax.Ternary(), qjax.Ternary())
    with pytest.raises(ValueError, match="K = 2147483648"):
        check_int32_sum(2**31, qjax.Ternary(), qjax.Ternary())


def test_argument_types_are_checked():
    w, a = PAIRS["int8 per channel/token"]
    with pytest.raises(TypeError, match="x must be a floating array .* int32"):
        qat_dense(jnp.ones((2, 128), jnp.int32), K, w, a)  # used to return truncated ints
    with pytest.raises(TypeError, match="x must be a floating array .* list"):
        qat_dense([[1.0] * 128], K, w, a)
    with pytest.raises(TypeError, match="kernel must be a floating array"):
        qat_dense(X, K.astype(jnp.int8), w, a)
    with pytest.raises(TypeError, match="weight must be a qjax.QuantSpec or None, got str"):
        qat_dense(X, K, "int8", a)
    with pytest.raises(TypeError, match="activation must be a qjax.QuantSpec or None, got str"):
        integer_forward_reason(w, "int8")
