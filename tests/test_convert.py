"""Tests for qjax.convert: packed serving params and the serving forward (docs/design.md s. 9)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import convert as QC
from qjax._src.nn.ops import rotate
from qjax._src.qdot import int8_operand, operand_codes
from qjax.models.llama import Llama, LlamaConfig, quantization_rules
from qjax.nn import LayerQuant, Method, quantize_model

CFG = LlamaConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=2, hidden=128, max_seq_len=8)
IDS = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)


@functools.cache
def setup(method):
    """(QAT model, trained-looking params, serving params) for the tiny Llama."""
    qm = quantize_model(Llama(CFG), quantization_rules(method))
    params = qm.init(jax.random.key(0), IDS)["params"]
    # Move away from the init so that scales and codes are not special.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [a * 1.3 + 0.01 * jax.random.normal(k, a.shape)
               for a, k in zip(leaves, keys, strict=True)])
    return qm, params, QC.convert(params, qm)


def outputs(method):
    qm, params, sp = setup(method)
    qat = lambda p, i: qm.apply({"params": p}, i)
    srv = lambda p, i: QC.serve(qm, p, i)
    return {"jit": (jax.jit(qat)(params, IDS), jax.jit(srv)(sp, IDS)),
            "eager": (qat(params, IDS), srv(sp, IDS))}


WEIGHT_ONLY = [
    Method("ste", 8, None),
    Method("ste", 4, None),
    Method("ste", 2, None),
    Method("ste", 1, None, grid="midrise"),  # 1-bit sign x per-channel absmax
    Method("quest", 4, None, hadamard_block=64),  # pre-rotated weights, input rotated on the fly
    Method("quest", 1, None, hadamard_block=64),
]


@pytest.mark.parametrize("method", WEIGHT_ONLY, ids=lambda m: f"{m.name}-W{m.weight_bits}")
def test_weight_only_serving_is_bit_exact_jit_and_eager(method):
    for mode, (qat, srv) in outputs(method).items():
        np.testing.assert_array_equal(np.asarray(srv), np.asarray(qat), err_msg=mode)


@pytest.mark.parametrize("method", [Method("lsq", 4, 4), Method("pact", 4, 8)],
                         ids=lambda m: m.name)
def test_learned_activation_scales_serve_bit_exact(method):
    # Learned activation scales have no int8 path: activations are fake-quantized as in QAT.
    qm, params, sp = setup(method)
    node = sp["blocks_0"]["attn"]["q"]
    assert "kernel_scale" not in node
    np.testing.assert_array_equal(node["input_scale"],
                                  params["blocks_0"]["attn"]["q"]["input_scale"])
    for mode, (qat, srv) in outputs(method).items():
        np.testing.assert_array_equal(np.asarray(srv), np.asarray(qat), err_msg=mode)


@pytest.mark.parametrize("method", [Method("ste", 8, 8), Method("quest", 4, 4, hadamard_block=64)],
                         ids=lambda m: f"{m.name}-W{m.weight_bits}A{m.act_bits}")
def test_weight_activation_serving_matches_fake_quant(method):
    qm, params, sp = setup(method)
    assert all(QC.uses_integer_matmul(lq) for lq in qm.layers.values())
    for mode, (qat, srv) in outputs(method).items():
        # Only the float accumulation order differs (int32 sums against float32 ones).
        np.testing.assert_allclose(np.asarray(srv), np.asarray(qat), rtol=0, atol=2e-5,
                                   err_msg=mode)
    # The integer codes are the QAT ones: weights and the first layer's activations.
    lq = qm.layers["blocks_0/attn/q"]
    kernel = params["blocks_0"]["attn"]["q"]["kernel"]
    w = sp["blocks_0"]["attn"]["q"]["kernel"]
    ref = qjax.quantize(kernel, lq.weight)
    np.testing.assert_array_equal(w.codes_float32(), ref.codes_float32().T)
    x = jax.random.normal(jax.random.key(3), (5, CFG.d_model))
    q_serve, _ = operand_codes(rotate(x, lq.rotation, -1),
                               lq.activation.replace(hadamard_block=None), -1)
    np.testing.assert_array_equal(q_serve, qjax.quantize(x, lq.activation).codes_float32())


@pytest.mark.parametrize("method", [Method("ste", 8, 8, integer_forward=True),
                                    Method("quest", 4, 4, hadamard_block=64, integer_forward=True)],
                         ids=lambda m: f"{m.name}-W{m.weight_bits}A{m.act_bits}")
def test_serving_equals_integer_forward_qat_bit_for_bit(method):
    for mode, (qat, srv) in outputs(method).items():
        np.testing.assert_array_equal(np.asarray(srv), np.asarray(qat), err_msg=mode)


@pytest.mark.parametrize("bits,dtype,per_byte", [(8, np.int8, 1), (4, np.uint8, 2),
                                                 (2, np.uint8, 4), (1, np.uint8, 8)])
def test_kernel_to_qarray_packs_along_k_and_dequantizes_exactly(bits, dtype, per_byte):
    kernel = jax.random.normal(jax.random.key(4), (64, 24)) * 0.1
    fmt = qjax.Midrise(1) if bits == 1 else qjax.IntFormat(bits)
    for gran in (qjax.PerRow(0), qjax.PerGroup(0, 16), qjax.PerTensor()):
        spec = qjax.QuantSpec(fmt, gran)
        w = QC.kernel_to_qarray(kernel, spec)
        assert w.shape == (24, 64) and w.codes.dtype == dtype
        assert w.codes.shape == (24, 64 // per_byte)
        np.testing.assert_array_equal(qjax.dequantize(w).T, qjax.fake_quant(kernel, spec))
    # Group scales: one per (output row, group of 16 along K).
    w = QC.kernel_to_qarray(kernel, qjax.QuantSpec(fmt, qjax.PerGroup(0, 16)))
    assert w.scale.shape == (24, 4, 1) and w.spec.granularity == qjax.PerGroup(-1, 16)


def test_kernel_to_qarray_with_zero_point_and_full_hadamard():
    kernel = jax.random.normal(jax.random.key(5), (32, 8)) + 0.3
    for spec in (qjax.QuantSpec("int4", qjax.PerRow(0), qjax.AbsMax(symmetric=False)),
                 qjax.QuantSpec(qjax.Midrise(3), qjax.PerRow(0), "rms_gaussian", hadamard_block=16,
                                hadamard_axis=0)):
        w = QC.kernel_to_qarray(kernel, spec)
        np.testing.assert_array_equal(qjax.dequantize(w).T, qjax.fake_quant(kernel, spec))


def test_int4_weight_only_memory():
    _, params, sp = setup(Method("ste", 4, None))
    for name in ("q", "k", "v", "o"):
        w, k = sp["blocks_0"]["attn"][name]["kernel"], params["blocks_0"]["attn"][name]["kernel"]
        # int4 codes: 1/8 of float32, plus one float32 scale per output row.
        assert w.nbytes == k.size // 2 + 4 * k.shape[1]
    # Float leaves are untouched.
    for path in (("embed", "embedding"), ("lm_head", "kernel"), ("final_norm", "scale")):
        np.testing.assert_array_equal(sp[path[0]][path[1]], params[path[0]][path[1]])


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name="up")(x))
        return nn.Dense(4, name="down")(x)


def test_convert_by_rules_equals_by_model_and_keeps_bias():
    rules = {"up": LayerQuant(qjax.QuantSpec("int4", qjax.PerRow(0))), "down": None}
    qm = quantize_model(MLP(), rules)
    x = jax.random.normal(jax.random.key(6), (3, 16))
    params = qm.init(jax.random.key(7), x)["params"]
    params = jax.tree_util.tree_map(lambda a: a + 0.05, params)  # non-zero bias
    by_model, by_rules = QC.convert(params, qm), QC.convert(params, rules)
    assert isinstance(by_rules["up"]["kernel"], qjax.QArray)
    assert not isinstance(by_rules["down"]["kernel"], qjax.QArray)
    chex_equal = jax.tree_util.tree_map(np.array_equal, by_model, by_rules)
    assert all(jax.tree_util.tree_leaves(chex_equal))
    np.testing.assert_array_equal(QC.serve(qm, by_model, x), qm.apply({"params": params}, x))


def test_serving_matmul_arguments():
    w = QC.kernel_to_qarray(jnp.ones((16, 4)), qjax.QuantSpec("int8", qjax.PerRow(0)))
    x = jnp.ones((2, 16))
    with pytest.raises(ValueError, match="backend must be one of"):
        QC.serving_matmul(x, w, backend="pallas")  # not a backend name
    with pytest.raises(ValueError, match=r"need x \(..., K\) and w \(N, K\)"):
        QC.serving_matmul(jnp.ones((2, 8)), w)
    with pytest.raises(TypeError, match="w must be a qjax.QArray"):
        QC.serving_matmul(x, jnp.ones((4, 16)))
    with pytest.raises(ValueError, match="no integer matmul"):
        QC.serving_matmul(x, w, act_spec=qjax.QuantSpec("int8", qjax.PerRow(-1), "absmax",
                                                          "lsq"))
    # Weight-only and int8 paths on an exactly representable product.
    np.testing.assert_array_equal(QC.serving_matmul(x, w), jnp.full((2, 4), 16.0))
    a8 = qjax.QuantSpec("int8", qjax.PerRow(-1))
    np.testing.assert_array_equal(QC.serving_matmul(x, w, act_spec=a8), jnp.full((2, 4), 16.0))


def test_bad_input_errors():
    qm, params, sp = setup(Method("ste", 4, None))
    with pytest.raises(ValueError, match="no layer 'blocks_0/mlp'"):
        QC.convert({k: v for k, v in params.items() if k != "blocks_0"} | {
            "blocks_0": {"attn": params["blocks_0"]["attn"]}}, qm)
    with pytest.raises(ValueError, match="already converted"):
        QC.convert(sp, qm)
    with pytest.raises(ValueError, match="not the variables"):
        QC.convert({"params": params}, qm)
    with pytest.raises(TypeError, match="params must be a mapping"):
        QC.convert([1], qm)
    bad = jax.tree_util.tree_map(lambda a: a, params)
    bad["blocks_0"]["mlp"]["up"] = {"kernel": jnp.ones((3, 4, 5))}
    with pytest.raises(ValueError, match="do not match the model"):
        QC.convert(bad, qm)
    with pytest.raises(ValueError, match="until it has run"):
        QC.convert(params, quantize_model(Llama(CFG), quantization_rules("ste")))
    with pytest.raises(ValueError, match="not a QArray"):
        QC.serve(qm, params, IDS)
    with pytest.raises(ValueError, match="backend must be one of"):
        QC.serve(qm, sp, IDS, backend="cuda")
    with pytest.raises(ValueError, match="not with the model's weight spec"):
        QC.serve(qm, setup(Method("ste", 8, None))[2], IDS)
    lsq_qm, lsq_params, _ = setup(Method("lsq", 4, 4))
    missing = jax.tree_util.tree_map(lambda a: a, lsq_params)
    del missing["blocks_0"]["attn"]["q"]["kernel_scale"]
    with pytest.raises(ValueError, match="kernel_scale, but the params have none"):
        QC.convert(missing, lsq_qm)


def test_int8_codes_helper_matches_qdot():
    # The serving int8 weight path uses the stored int8 codes as they are.
    w = QC.kernel_to_qarray(jax.random.normal(jax.random.key(8), (32, 8)),
                            qjax.QuantSpec("int8", qjax.PerRow(0)))
    wi, ws = int8_operand(w.codes_float32(), w.scale, w.spec.format)
    np.testing.assert_array_equal(wi, w.codes)
    np.testing.assert_array_equal(ws, w.scale)


def test_activation_only_layer_with_rotation_serves_bit_exact():
    # Weight left in float, input quantized after a half-form rotation: the kernel is rotated.
    a = qjax.QuantSpec(qjax.Midrise(4), qjax.PerRow(-1), "rms_gaussian", "trust", hadamard_block=16,
                       hadamard_mode="half")
    rules = {"up": LayerQuant(activation=a), "down": None}
    qm = quantize_model(MLP(), rules)
    x = jax.random.normal(jax.random.key(11), (3, 16))
    params = qm.init(jax.random.key(12), x)["params"]
    sp = QC.convert(params, qm)
    assert not isinstance(sp["up"]["kernel"], qjax.QArray)
    np.testing.assert_array_equal(QC.serve(qm, sp, x), qm.apply({"params": params}, x))


@pytest.mark.parametrize("method", [Method("ste", 8, 8), Method("ste", 4, None),
                                    Method("quest", 4, 4, hadamard_block=64)],
                         ids=lambda m: f"{m.name}-W{m.weight_bits}A{m.act_bits}")
def test_serving_through_the_pallas_kernels(method):
    """``backend="interpret"`` runs the Pallas TPU kernels (interpreted) in the serving forward."""
    qm, _, sp = setup(method)
    want = jax.jit(lambda p, i: QC.serve(qm, p, i))(sp, IDS)
    got = jax.jit(lambda p, i: QC.serve(qm, p, i, backend="interpret"))(sp, IDS)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    auto = jax.jit(lambda p, i: QC.serve(qm, p, i, backend="auto"))(sp, IDS)  # CPU: "xla"
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(want))


def test_serving_argument_validation():
    w8, a8 = qjax.QuantSpec("int8", qjax.PerRow(0)), qjax.QuantSpec("int8", qjax.PerRow(-1))
    w = QC.kernel_to_qarray(jnp.ones((16, 4)), w8)
    with pytest.raises(TypeError, match="x must be a floating array .* int32"):
        QC.serving_matmul(jnp.ones((2, 16), jnp.int32) * 3, w, act_spec=a8)  # returned ints
    with pytest.raises(TypeError, match="x must be a floating array .* int32"):
        QC.serving_matmul(jnp.ones((2, 16), jnp.int32), w)
    with pytest.raises(TypeError, match="act_spec must be a qjax.QuantSpec or None, got str"):
        QC.serving_matmul(jnp.ones((2, 16)), w, act_spec="int8")
    with pytest.raises(TypeError, match="lq must be a qjax.nn.LayerQuant, got str"):
        QC.uses_integer_matmul("quest")
    with pytest.raises(TypeError, match="spec must be a qjax.QuantSpec, got NoneType"):
        QC.kernel_to_qarray(jnp.ones((16, 4)), None)
    with pytest.raises(ValueError, match="spec.granularity axis=5 is out of range"):
        QC.serving_spec(qjax.QuantSpec("int4", qjax.PerRow(5)))  # was PerRow(-2)
    with pytest.raises(ValueError, match="spec.hadamard_axis=2 is out of range"):
        QC.serving_spec(qjax.QuantSpec("int4", qjax.PerRow(0), hadamard_block=4, hadamard_axis=2))
    with pytest.raises(ValueError, match="spec.granularity axis=-3 is out of range"):
        QC.kernel_to_qarray(jnp.ones((16, 4)), qjax.QuantSpec("int4", qjax.PerGroup(-3, 4)))
    assert QC.serving_spec(qjax.QuantSpec("int4", qjax.PerRow(-2))).granularity == qjax.PerRow(-1)


def test_serving_matmul_refuses_a_k_that_overflows_int32():
    w8, a8 = qjax.QuantSpec("int8", qjax.PerRow(0)), qjax.QuantSpec("int8", qjax.PerRow(-1))
    kern = jax.ShapeDtypeStruct((140_000, 2), jnp.float32)
    w = jax.eval_shape(lambda k: QC.kernel_to_qarray(k, w8), kern)
    x = jax.ShapeDtypeStruct((1, 140_000), jnp.float32)
    with pytest.raises(ValueError, match=r"K = 140000 .* K <= 131071"):  # gave -126288.5
        jax.eval_shape(lambda x, w: QC.serving_matmul(x, w, act_spec=a8), x, w)
    with pytest.raises(ValueError, match="K = 140000"):
        jax.eval_shape(lambda x, w: QC.serving_matmul(x, w, act_spec=a8, backend="interpret"),
                       x, w)
    assert jax.eval_shape(lambda x, w: QC.serving_matmul(x, w), x, w).shape == (1, 2)
