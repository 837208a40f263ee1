"""Model styles beyond the zoo: how people also call Flax layers (keyword inputs, other methods,
boxed parameters, axis orders, grouped convs, bf16 adapters) and the errors for what qjax
cannot quantize."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax import convert as QC
from qjax._src.nn import lowrank as LR
from qjax.nn import LayerQuant, Method, quantize_model

KEY = jax.random.key(0)
INT8 = LayerQuant(qjax.QuantSpec("int8", qjax.PerRow(0)), qjax.QuantSpec("int8", qjax.PerRow(-1)))


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("axis", [(-2, -1), (-1, -2)])
def test_dense_general_axis_order_follows_flax(axis):
    x = jax.random.normal(KEY, (2, 16, 16))
    qm = quantize_model(nn.DenseGeneral(8, axis=axis), {".*": Method("quest", 8, 8)})
    v = qm.init(KEY, x)
    assert _rel(qm.apply(v, x), qm.apply(v, x, qat=False)) < 0.05
    lg = nnx.LinearGeneral((16, 16), 8, axis=axis, rngs=nnx.Rngs(0))
    y_float = lg(x)
    holder = nnx.List([lg])
    quantize_model(holder, {"0": Method("quest", 8, 8)})
    assert _rel(holder[0](x), y_float) < 0.05


def test_keyword_inputs_linen_and_nnx():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="d")(inputs=x)

    x = jax.random.normal(KEY, (3, 16))
    qm = quantize_model(M(), {"d": INT8})
    v = qm.init(KEY, x)
    assert not np.array_equal(qm.apply(v, x), qm.apply(v, x, qat=False))
    sp = QC.convert(v["params"], qm)
    np.testing.assert_allclose(QC.serve(qm, sp, x), qm.apply(v, x), rtol=1e-5, atol=1e-5)

    class N(nnx.Module):
        def __init__(self):
            self.d = nnx.Linear(16, 8, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.d(inputs=x)

    n = quantize_model(N(), {"d": INT8})
    np.testing.assert_allclose(QC.serve(QC.convert(n), x), n(x), rtol=1e-5, atol=1e-5)


def test_discovery_follows_the_method():
    class M(nn.Module):
        def setup(self):
            self.d = nn.Dense(8)
            self.e = nn.Dense(8)

        def __call__(self, x):
            return self.d(x)

        def other(self, x):
            return self.e(self.d(x))

    x = jnp.ones((2, 8))
    qm = quantize_model(M(), {"d|e": INT8})
    v = qm.init(KEY, x, method=M.other)
    assert set(qm.sites(x, method=M.other)) == {"d", "e"}
    assert set(qm.sites(x)) == {"d"}
    y = qm.apply(v, x, method=M.other)
    assert not np.array_equal(y, qm.apply(v, x, method=M.other, qat=False))


def test_boxed_raw_parameter_is_quantized():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.with_partitioning(nn.initializers.lecun_normal(),
                                                     (None, "model")), (16, 8))
            return jnp.einsum("bd,df->bf", x, w)

    x = jax.random.normal(KEY, (3, 16))
    qm = quantize_model(M(), {"w": INT8})
    v = qm.init(KEY, x)
    assert set(qm.sites()) == {"w"}
    assert not np.array_equal(qm.apply(v, x), qm.apply(v, x, qat=False))


def test_positional_einsum_str_and_grouped_conv_scales():
    x = jax.random.normal(KEY, (3, 16))
    qm = quantize_model(nn.Einsum((16, 8)), {".*": INT8})
    qm.init(KEY, x, "bd,df->bf")
    assert qm.sites()[""].layout.k == 16
    lsq_pc = LayerQuant(qjax.QuantSpec("int4", qjax.PerRow(0)),
                        qjax.QuantSpec("int4", qjax.PerAxis(-1), estimator="lsq"))
    img = jax.random.normal(KEY, (2, 6, 6, 16))
    conv = quantize_model(nn.Conv(32, (3, 3), feature_group_count=4), {".*": lsq_pc})
    v = conv.init(KEY, img)
    assert v["params"]["input_scale"].shape == (16,)  # all input channels, not C / groups
    assert np.isfinite(np.asarray(conv.apply(v, img))).all()


def test_init_from_float_recomputes_learned_scales():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="d")(x)

    x = jnp.ones((2, 16))
    qm = quantize_model(M(), {"d": Method("lsq", 4, None)})
    v = qm.init(KEY, x)
    big = jax.tree.map(lambda a: 100 * a, M().init(jax.random.key(5), x)["params"])
    out = qjax.nn.init_from_float(qm, v, big)
    want = qjax.nn.ops.init_kernel_scale(big["d"]["kernel"], qm.sites()["d"].recipe.weight,
                                         qm.sites()["d"].layout)
    np.testing.assert_array_equal(out["params"]["d"]["kernel_scale"], want)
    with pytest.raises(ValueError, match="share no leaf"):
        qjax.nn.init_from_float(qm, v, {"other": {"kernel": jnp.ones((2, 2))}})


def test_lr_qat_bf16_serves_its_trained_forward():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(32, param_dtype=jnp.bfloat16, name="d")(x)

    x = jax.random.normal(KEY, (4, 32))
    qm = quantize_model(M(), {"d": qjax.nn.lr_qat(qjax.QuantSpec("int4", qjax.PerRow(0)),
                                                   rank=4)})
    v = qm.init(KEY, x)
    v = {**v, "params": {"d": {**v["params"]["d"], "lora_up": v["params"]["d"]["lora_up"] + 0.1}}}
    sp = QC.convert(v["params"], qm, frozen=v[LR.FROZEN])
    np.testing.assert_array_equal(QC.serve(qm, sp, x), qm.apply(v, x))


def test_what_cannot_be_quantized_is_refused_naming_it():
    with pytest.raises(ValueError, match="summed on one side only"):
        qjax.nn.einsum_layout("bsd,dk->bk", (8, 4))

    class Raw(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.einsum("bd,df->bf", x, self.param("w", nn.initializers.ones, (16, 8)))

    with pytest.raises(ValueError, match="parameter 'w': DoubleRounding recipes need a Flax"):
        quantize_model(Raw(), {"w": qjax.nn.double_rounding.DoubleRounding()}).init(
            KEY, jnp.ones((2, 16)))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(16, name="q")(x), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True},
                           length=2)
            return scan(name="layers")(x, None)[0]

    with pytest.raises(ValueError, match="layer 'layers/q': stacked along axis 1"):
        quantize_model(Net(), {"layers/q": Method("lsq", 4, 4)}).init(KEY, jnp.ones((2, 16)))
