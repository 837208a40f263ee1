"""Tests for qjax.int8: one eligibility rule for QAT's integer forward and the kernels, and the
kernels' "xla" integer kind equal to QAT's integer forward bit for bit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import kernels as K
from qjax._src import int8
from qjax._src.qdot import integer_forward_reason, qat_dense
from qjax.convert import kernel_to_qarray, serving_spec
from qjax.methods import quest

KDIM, N = 128, 24
X = jax.random.normal(jax.random.key(0), (2, 3, KDIM))
KERNEL = jax.random.normal(jax.random.key(1), (KDIM, N)) * 0.1
BIAS = jax.random.normal(jax.random.key(2), (N,))

Q = qjax.QuantSpec
W8, A8 = Q("int8", qjax.PerRow(0)), Q("int8", qjax.PerRow(-1))
A8_TENSOR = Q("int8", qjax.PerTensor())
QW4, QA4 = quest.spec(4, axis=0, hadamard_mode=None), quest.spec(4, hadamard_mode=None)

# (training weight spec of a (K, N) kernel, activation spec of x (..., K)) -> accepted.
PAIRS = {
    "w8a8 per channel / token": (W8, A8, True),
    "w8a8 per tensor activation": (W8, A8_TENSOR, True),
    "w4a4 per tensor both": (Q("int4"), Q("int4"), True),
    "quest w4a4 half Hadamard": (quest.spec(4, axis=0), quest.spec(4), True),
    "quest w4a4 per tensor activation": (QW4, QA4.replace(granularity=qjax.PerTensor()), True),
    "ternary weight, mse activation": (Q("ternary", qjax.PerRow(0), "rms_gaussian"),
                                       Q("int8", qjax.PerRow(-1), "mse:8:0.6"), True),
    "quest midrise 8": (quest.spec(8, axis=0), quest.spec(8), False),
    "asymmetric activation": (W8, Q("int8", qjax.PerRow(-1), "absmax_asymmetric"), False),
    "asymmetric weight": (Q("int8", qjax.PerRow(0), "absmax_asymmetric"), A8, False),
    "stochastic activation": (W8, Q("int8", qjax.PerRow(-1), rounding="stochastic"), False),
    "stochastic weight": (Q("int8", qjax.PerRow(0), rounding="stochastic"), A8, False),
    "lsq activation": (W8, Q("int4", estimator="lsq"), False),
    "lsq weight": (Q("int4", qjax.PerRow(0), estimator="lsq"), A8, False),
    "grouped weight": (Q("int4", qjax.PerGroup(0, 32)), A8, False),
    "per input channel weight": (Q("int8", qjax.PerRow(1)), A8, False),
    "full Hadamard activation": (W8, Q("int8", qjax.PerRow(-1), hadamard_block=64), False),
    "float16 weight scales": (Q("int8", qjax.PerRow(0), scale_dtype="float16"), A8, False),
    "uint8 activation": (W8, Q("uint8", qjax.PerRow(-1)), False),
    "fp8": (Q("e4m3", qjax.PerRow(0)), Q("e4m3", qjax.PerRow(-1)), False),
}


def _serving(kernel, w):
    """The serving QArray (N, K) of a training kernel: codes of its transpose, serving spec.

    Shapes only (eval_shape) unless asked for values; stochastic specs get a key, learned
    scales a unit scale (their codes do not matter for the rule).
    """
    key = jax.random.key(3) if w.rounding == "stochastic" else None
    scale = 1.0 if isinstance(w.estimator, (qjax.LSQ, qjax.PACT)) else None
    return jax.eval_shape(lambda k: qjax.quantize(k.T, serving_spec(w), key=key, scale=scale),
                          kernel)


def _kernels_int_kind(w_serving, a) -> bool:
    try:
        return K.classify(X.shape, w_serving, a).kind == "int"
    except ValueError:
        return False


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_one_rule_for_qat_and_kernels(name):
    w, a, accepted = PAIRS[name]
    reason = integer_forward_reason(w, a)
    assert (reason is None) == accepted, reason
    assert int8.integer_forward_reason(w, a) == reason  # qdot's is int8's
    w_serving = _serving(jax.ShapeDtypeStruct(KERNEL.shape, jnp.float32), w)
    assert int8.integer_forward_reason(int8.training_weight_spec(w_serving.spec), a) == reason
    assert _kernels_int_kind(w_serving, a) == accepted
    if accepted:  # every backend serves what the rule accepts (traced, not run)
        xs = jax.ShapeDtypeStruct(X.shape, jnp.float32)
        for backend, interpret in (("xla", None), ("interpret", None), ("pallas_gpu", True)):
            y = jax.eval_shape(lambda x, w_serving=w_serving, backend=backend, interpret=interpret:
                               K.quantized_matmul(x, w_serving, act_spec=a, backend=backend,
                                                  interpret=interpret), xs)
            assert y.shape == X.shape[:-1] + (N,)


def test_reasons_name_the_operand_and_the_allowed_values():
    assert "both" in integer_forward_reason(W8, None)
    assert integer_forward_reason(*PAIRS["asymmetric weight"][:2]).startswith(
        "weight scale must be symmetric")
    reason = integer_forward_reason(*PAIRS["grouped weight"][:2])
    assert "weight granularity must be one scale per output channel" in reason
    reason = integer_forward_reason(W8, Q("int8", qjax.PerRow(0)))
    assert "activation granularity must be one scale per token (PerRow(-1)) or per tensor" in reason
    with pytest.raises(ValueError, match="no integer matmul for w .* weight granularity"):
        K.classify(X.shape, _serving(KERNEL, Q("int4", qjax.PerGroup(0, 32))), A8)
    with pytest.raises(ValueError, match=r"role must be one of \('weight', 'activation'\)"):
        int8.operand_reason(A8, "input")
    with pytest.raises(TypeError, match="activation must be a qjax.QuantSpec or None, got str"):
        integer_forward_reason(W8, "int8")
    with pytest.raises(TypeError, match="fmt must be a qjax format"):
        int8.code_max("int8")


def test_training_weight_spec_inverts_serving_spec():
    for spec in (W8, Q("int4"), QW4, quest.spec(4, axis=0), Q("int4", qjax.PerGroup(0, 32)),
                 Q("int8", qjax.PerAxis(1))):
        assert int8.training_weight_spec(serving_spec(spec)) == spec
    assert int8.training_weight_spec(Q("int8", qjax.PerRow(1))).granularity == qjax.PerRow(0)
    with pytest.raises(ValueError, match="out of range for a 2-D"):
        int8.training_weight_spec(Q("int8", qjax.PerRow(2)))


BIT_PAIRS = {
    "int8 per token": (W8, A8),
    "int8 per tensor": (W8, A8_TENSOR),
    "quest midrise 4 per token": (QW4, QA4),
    "quest midrise 4 per tensor": (QW4, QA4.replace(granularity=qjax.PerTensor())),
}


@pytest.mark.parametrize("name", sorted(BIT_PAIRS))
def test_xla_int_kind_equals_qat_integer_forward_bit_for_bit(name):
    w, a = BIT_PAIRS[name]
    ws = kernel_to_qarray(KERNEL, w)  # (N, K): the transposed codes and scales
    np.testing.assert_array_equal(qjax.dequantize(ws).T, qjax.fake_quant(KERNEL, w))
    qat = lambda x: qat_dense(x, KERNEL, w, a) + BIAS  # noqa: E731  (a residual-like add)
    srv = lambda x: K.quantized_matmul(x, ws, act_spec=a, backend="xla") + BIAS  # noqa: E731
    for f_qat, f_srv in ((qat, srv), (jax.jit(qat), jax.jit(srv))):
        y_qat, y_srv = f_qat(X), f_srv(X)
        assert y_srv.dtype == y_qat.dtype == jnp.float32
        np.testing.assert_array_equal(y_srv, y_qat)
    np.testing.assert_array_equal(K.quantized_matmul(X[:1, :1], ws, act_spec=a, backend="xla"),
                                  qat_dense(X[:1, :1], KERNEL, w, a))  # M = 1 is padded to 2


@functools.partial(jax.jit, static_argnames=("a", "backend", "interpret"))
def _qmm(x, w, a, backend, interpret=None):
    return K.quantized_matmul(x, w, act_spec=a, backend=backend, interpret=interpret)


@pytest.mark.parametrize("name", ["int8 per tensor", "quest midrise 4 per tensor"])
def test_per_tensor_activation_through_pallas(name):
    w, a = BIT_PAIRS[name]
    ws = kernel_to_qarray(KERNEL, w)
    y_xla = _qmm(X, ws, a, "xla")
    y_pl = _qmm(X, ws, a, "interpret")
    # One flipped code would move an output by s_x * s_w * |code_w|, far above this tolerance.
    np.testing.assert_allclose(y_pl, y_xla, rtol=1e-6, atol=1e-6 * float(jnp.abs(y_xla).max()))
    # The kernel is fed the codes and the scale XLA computes over the whole x.
    codes, scale = K.activation_codes(X, a)
    expected = int8.quantize_operand(X, a, -1)
    np.testing.assert_array_equal(codes, expected[0])
    np.testing.assert_array_equal(scale, jnp.broadcast_to(expected[1], X.shape[:-1] + (1,)))
    if name == "int8 per tensor":
        np.testing.assert_allclose(_qmm(X, ws, a, "pallas_gpu", True), y_xla, rtol=1e-6,
                                   atol=1e-6 * float(jnp.abs(y_xla).max()))


def test_int32_overflow_guard():
    assert int8.code_max(qjax.IntFormat(8)) == 128 and int8.code_max(qjax.Midrise(4)) == 15
    int8.check_int32_sum(131_071, qjax.IntFormat(8), qjax.IntFormat(8))
    with pytest.raises(ValueError, match=r"K = 131072 .* K <= 131071"):
        int8.check_int32_sum(131_072, qjax.IntFormat(8), qjax.IntFormat(8))
    with pytest.raises(ValueError, match="format uint8 has no int8 code"):
        int8.check_int32_sum(1, qjax.IntFormat(8, signed=False), qjax.IntFormat(8))
    k = 140_000
    w8 = jax.eval_shape(lambda v: kernel_to_qarray(v, W8), jax.ShapeDtypeStruct((k, 2),
                                                                                jnp.float32))
    x = jax.ShapeDtypeStruct((1, k), jnp.float32)
    with pytest.raises(ValueError, match=r"K = 140000 .* K <= 131071"):
        jax.eval_shape(lambda x: K.quantized_matmul(x, w8, act_spec=A8_TENSOR, backend="xla"), x)
    with pytest.raises(ValueError, match="K = 140000"):
        jax.eval_shape(lambda x, kern: qat_dense(x, kern, W8, A8_TENSOR), x,
                       jax.ShapeDtypeStruct((k, 2), jnp.float32))


def test_product_checks_w_contract():
    xi = jnp.ones((2, 4), jnp.int8)
    with pytest.raises(ValueError, match="w_contract must be 0"):
        int8.matmul(xi, jnp.ones((2, 1)), jnp.ones((4, 3), jnp.int8), jnp.ones(3), 2)
    y = int8.matmul(xi, jnp.full((2, 1), 0.5), jnp.ones((3, 4), jnp.int8), jnp.full(3, 2.0), 1)
    np.testing.assert_array_equal(y, jnp.full((2, 3), 4.0))
