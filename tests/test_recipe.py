"""Recipes fitted to layers: clear errors at rule time naming the layer, and the contract for
params that do not fit (another method's params, rules that convert nothing, bf16)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax import convert as QC
from qjax import presets
from qjax.nn import LayerQuant, Method, default_hadamard_block, dense_layout, quantize_model


class TwoDense(nn.Module):
    width: int = 64
    dtype: object = None
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.width, name="up", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return nn.Dense(32, name="down", dtype=self.dtype, param_dtype=self.param_dtype)(
            jax.nn.relu(h))


X = jax.random.normal(jax.random.key(0), (2, 5, 32))


def test_default_hadamard_block_is_largest_power_of_two_dividing_k():
    assert [default_hadamard_block(k) for k in (64, 96, 768, 3, 4096)] == [64, 32, 128, 1, 128]
    lq = Method("quest").layer_quant(dense_layout((64, 8)))
    assert lq.weight.hadamard_block == lq.activation.hadamard_block == 64
    assert Method("quest").layer_quant(dense_layout((3, 8))).weight.hadamard_block is None


def test_explicit_block_that_does_not_divide_k_names_the_layer():
    qm = quantize_model(TwoDense(), {"up|down": Method("quest", hadamard_block=128)})
    with pytest.raises(ValueError,
                       match=r"layer 'up': Hadamard block hadamard_block=128 does not divide"):
        qm.init(jax.random.key(0), X)


def test_torch_layout_preset_on_flax_kernel_names_the_layer():
    rules = {"up": LayerQuant(presets.torchao_int4_weight(32)), "down": None}
    with pytest.raises(ValueError, match=r"layer 'up': weight granularity .* runs along N"):
        quantize_model(TwoDense(), rules).init(jax.random.key(0), X)
    # The Flax-layout preset (groups along K = axis 0) fits.
    ok = {"up": LayerQuant(presets.torchao_int4_weight(32, axis=0)), "down": None}
    params = quantize_model(TwoDense(), ok).init(jax.random.key(0), X)["params"]
    assert params["up"]["kernel"].shape == (32, 64)


def test_nnx_rule_errors_name_the_layer():
    class Net(nnx.Module):
        def __init__(self):
            self.up = nnx.Linear(48, 16, rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match="layer 'up': .*group size 32 does not divide K = 48"):
        quantize_model(Net(), {"up": LayerQuant(qjax.QuantSpec("int4", qjax.PerGroup(0, 32)))})


def test_params_of_another_method_are_refused():
    lsq = quantize_model(TwoDense(), {"up|down": Method("lsq", 4, 4)})
    params = lsq.init(jax.random.key(0), X)["params"]
    quest = quantize_model(TwoDense(), {"up|down": Method("quest", 4, 4)})
    quest.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="layer 'up' has a kernel_scale, but its recipe learns "
                                         "none"):
        QC.convert(params, quest)
    plain = quest.init(jax.random.key(0), X)["params"]
    with pytest.raises(ValueError, match="recipe learns a kernel_scale, but the params have"):
        QC.convert(plain, lsq)


def test_rules_that_convert_nothing_are_refused():
    qm = quantize_model(TwoDense(), {"up|down": "ste"})
    params = qm.init(jax.random.key(0), X)["params"]
    with pytest.raises(ValueError, match="match no kernel"):
        QC.convert(params, {"nothing": "ste"})
    with pytest.raises(ValueError, match="no quantized layer"):
        QC.convert(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))


def test_stack_axis_must_lead_for_convert():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(32, name="q")(x), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True},
                           length=3)
            return scan(name="layers")(x, None)[0]

    qm = quantize_model(Net(), {"layers/q": Method("ste", 8, None)})
    params = qm.init(jax.random.key(0), X)["params"]
    assert params["layers"]["q"]["kernel"].shape == (32, 3, 32)
    assert qm.sites()["layers/q"].stacked == (1,)
    with pytest.raises(ValueError, match="stacked along kernel axes \\(1,\\)"):
        QC.convert(params, qm)


@pytest.mark.parametrize("method", [Method("ste", 4, None), Method("ste", 8, 8,
                                                                    integer_forward=True)])
def test_bfloat16_contract(method):
    """bf16 params and compute: serving equals QAT bit for bit for weight-only and integer-forward
    recipes (the same ops on the same codes), like float32."""
    model = TwoDense(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    qm = quantize_model(model, {"up|down": method})
    params = qm.init(jax.random.key(0), X)["params"]
    assert params["up"]["kernel"].dtype == jnp.bfloat16
    y_qat = jax.jit(lambda p: qm.apply({"params": p}, X))(params)
    sp = QC.convert(params, qm)
    assert sp["up"]["kernel"].dtype == "bfloat16"
    y_srv = jax.jit(lambda s: QC.serve(qm, s, X))(sp)
    assert y_srv.dtype == y_qat.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y_srv, np.float32), np.asarray(y_qat, np.float32))


def test_bfloat16_fake_quant_vs_integer_serving_is_bounded():
    """QAT with fake quantization in bf16, served with int8 products: the same codes, outputs
    within a few bf16 ulps of the output scale."""
    model = TwoDense(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    qm = quantize_model(model, {"up|down": Method("ste", 8, 8)})
    params = qm.init(jax.random.key(0), X)["params"]
    y_qat = np.asarray(jax.jit(lambda p: qm.apply({"params": p}, X))(params), np.float32)
    y_srv = np.asarray(QC.serve(qm, QC.convert(params, qm), X), np.float32)
    scale = np.abs(y_qat).max()
    assert np.abs(y_srv - y_qat).max() <= 4 * 2.0**-8 * scale
