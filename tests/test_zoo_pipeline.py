"""Every Flax model style, from QAT to deployment (tests/zoo.py).

Each model of the zoo (Linen Dense / Einsum+DenseGeneral / Conv / nn.scan / ViT patch conv /
raw einsum, NNX LinearGeneral block / nnx.vmap+nnx.scan) goes through quantize_model -> init ->
3 jitted Optax steps -> convert -> serve -> save/restore -> jax.export, for six recipes. Serving
equals QAT bit for bit in float32 where the contract says so: weight-only and learned-scale
recipes (the layer's own op on the same dequantized kernel) and integer-forward recipes (the
same int8 product); QuEST W4A4 trains with fake quantization and serves with int8 products, so
they agree to float accumulation order.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from zoo import SCANNED, ZOO, unrolled_twin

import qjax
from qjax import convert as QC
from qjax.nn import Method

RECIPES = {
    "quest_w4a4": Method("quest", 4, 4),
    "lsq_w4a4": Method("lsq", 4, 4),
    "int8_w8a8": Method("ste", 8, 8, integer_forward=True),
    "int4_weight_only": Method("ste", 4, None),
    "ofq_w2a4": Method("ofq", 2, 4),  # StatsQ weights (floor rounding), LSQ activations
    "lsq_post_w4a4": Method("lsq", 4, 4, grid="post"),  # ASQ's POST weights, table decode
}


def _exact(sites) -> bool:
    """Serving == QAT bit for bit: no layer trains with fake quantization but serves with int8
    products (QuEST W4A4 everywhere; int8 W8A8 on convolutions)."""
    return all(s.recipe.integer_forward or not QC.uses_integer_matmul(s.recipe, s.layout)
               for s in sites.values())


# The zoo leaves the convolutions over 3 RGB channels in float; quantize them too (K = window x 3,
# so QuEST's Hadamard block along the channels is 1: no rotation).
EXTRA = {"linen_cnn": ("conv1",), "linen_vit": ("patch_embed",)}




LEARNED_ACTIVATION_STEPS = ("lsq_w4a4", "ofq_w2a4", "lsq_post_w4a4")


def _extra(z, recipe):
    # A module's own parameter contracted by jnp.einsum ("raw" kernel) is matched by its path;
    # learned scales need a Flax layer to live in, so LSQ activations leave it out (see below).
    raw = () if recipe in LEARNED_ACTIVATION_STEPS else z.raw_params
    return EXTRA.get(z.name, ()) + tuple(raw)


def _rules(z, recipe):
    return {pattern: RECIPES[recipe] for pattern in tuple(z.rules) + _extra(z, recipe)}


def _layers(z, recipe):
    return set(z.layers) | set(_extra(z, recipe))


def _train_linen(z, rules, steps=3):
    x = z.inputs()
    qm = qjax.nn.quantize_model(z.make(), rules)
    params = qm.init(jax.random.key(0), *x)["params"]
    tx = qjax.optim.qat_adamw(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(lambda p: z.loss(qm.apply({"params": p}, *x), x))(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    losses = []
    for _ in range(steps):
        params, opt, loss = step(params, opt)
        losses.append(float(loss))
    return qm, params, losses


def _train_nnx(model, z, steps=3):
    x = z.inputs()
    opt = nnx.Optimizer(model, qjax.optim.qat_adamw(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(m, o):
        loss, g = nnx.value_and_grad(lambda m: z.loss(m(*x), x))(m)
        o.update(m, g)
        return loss

    return [float(step(model, opt)) for _ in range(steps)]


# The default run covers every model once and every recipe on two or more models (QuEST
# convolutions through the ViT patch conv); the rest of the model x recipe product (the same
# contract on more pairs, 6-35 s each) runs with -m slow (.ci/run runs it).
DEFAULT_PIPELINES = {
    ("linen_dense", "quest_w4a4"), ("linen_einsum", "int4_weight_only"),
    ("linen_cnn", "int8_w8a8"), ("linen_scan", "int8_w8a8"),
    ("nnx_block", "lsq_w4a4"),
    ("nnx_scan", "quest_w4a4"), ("linen_vit", "quest_w4a4"),
    ("linen_raw_einsum", "lsq_w4a4"), ("linen_einsum", "ofq_w2a4"),
    ("nnx_scan", "lsq_post_w4a4"),
}


@pytest.mark.parametrize(("name", "recipe"), [
    (n, r) if (n, r) in DEFAULT_PIPELINES else pytest.param(n, r, marks=pytest.mark.slow)
    for n in ZOO for r in RECIPES])
def test_qat_convert_serve_export(name, recipe, tmp_path):
    z = ZOO[name]
    x = z.inputs()
    if z.api == "linen":
        qm, params, losses = _train_linen(z, _rules(z, recipe))
        sites = qm.sites()
        y_qat = jax.jit(lambda p: qm.apply({"params": p}, *x))(params)
        y_float = jax.jit(lambda p: qm.apply({"params": p}, *x, qat=False))(params)
        sp = QC.convert(params, qm)
        y_srv = jax.jit(lambda s: QC.serve(qm, s, *x))(sp)
        QC.save(os.path.join(tmp_path, "ckpt"), sp)
        restored = QC.restore(os.path.join(tmp_path, "ckpt"), sp)
        data = QC.export_serving(qm, restored, *x)
        y_exp = QC.load_exported(data)(QC.to_arrays(restored), *x)
    else:
        model = qjax.nn.quantize_model(z.make(), _rules(z, recipe))
        sites = qjax.nn.sites(model)
        losses = _train_nnx(model, z)
        y_qat = nnx.jit(lambda m: m(*x))(model)
        qjax.nn.nnx.set_qat(model, False)
        y_float = nnx.jit(lambda m: m(*x))(model)
        qjax.nn.nnx.set_qat(model, True)
        served = QC.convert(model)
        y_srv = nnx.jit(lambda s: QC.serve(s, *x))(served)
        QC.save(os.path.join(tmp_path, "ckpt"), served)
        restored = QC.restore(os.path.join(tmp_path, "ckpt"), served)
        data = QC.export_serving(restored, *x)
        y_exp = QC.load_exported(data)(QC.to_arrays(nnx.to_pure_dict(nnx.state(restored))), *x)
    assert set(sites) == _layers(z, recipe)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert not np.array_equal(np.asarray(y_qat), np.asarray(y_float))  # something is quantized
    if _exact(sites):
        np.testing.assert_array_equal(np.asarray(y_srv), np.asarray(y_qat))
    else:
        np.testing.assert_allclose(np.asarray(y_srv), np.asarray(y_qat), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(y_exp), np.asarray(y_srv))


@pytest.mark.parametrize(("name", "recipe"), [
    # QuEST (17 s) with -m slow: lsq_w4a4 checks the same scan-vs-unrolled contract.
    pytest.param(n, "quest_w4a4", marks=pytest.mark.slow) for n in SCANNED] + [
    (n, "lsq_w4a4") for n in SCANNED])
def test_scanned_equals_unrolled(name, recipe):
    """A stacked model and its unrolled twin: identical QAT losses and serving logits."""
    z = ZOO[name]
    twin, map_params = unrolled_twin(name)
    x = z.inputs()
    if z.api == "linen":
        qm, params, losses = _train_linen(z, _rules(z, recipe))
        qt = qjax.nn.quantize_model(twin.make(), _rules(twin, recipe))
        qt.init(jax.random.key(0), *x)
        tparams = map_params(params)
        loss_s = jax.jit(lambda p: z.loss(qm.apply({"params": p}, *x), x))(params)
        loss_t = jax.jit(lambda p: z.loss(qt.apply({"params": p}, *x), x))(tparams)
        y_s = jax.jit(lambda s: QC.serve(qm, s, *x))(QC.convert(params, qm))
        y_t = jax.jit(lambda s: QC.serve(qt, s, *x))(QC.convert(tparams, qt))
        stacked = qm.sites()
        assert all(s.stacked == (0,) for p, s in stacked.items() if p.startswith("layers"))
    else:
        model = qjax.nn.quantize_model(z.make(), _rules(z, recipe))
        _train_nnx(model, z)
        tmodel = qjax.nn.quantize_model(twin.make(), _rules(twin, recipe))
        tstate = nnx.state(tmodel)
        nnx.replace_by_pure_dict(tstate, map_params(nnx.to_pure_dict(nnx.state(model))))
        nnx.update(tmodel, tstate)
        loss_s = nnx.jit(lambda m: z.loss(m(*x), x))(model)
        loss_t = nnx.jit(lambda m: z.loss(m(*x), x))(tmodel)
        y_s = nnx.jit(lambda s: s(*x))(QC.convert(model))
        y_t = nnx.jit(lambda s: s(*x))(QC.convert(tmodel))
        assert qjax.nn.sites(model)["blocks/attn/q"].stack_shape == (2,)
    np.testing.assert_array_equal(np.asarray(loss_s), np.asarray(loss_t))
    np.testing.assert_array_equal(np.asarray(y_s), np.asarray(y_t))


def test_sites_list_recipes_and_contraction_axes():
    z = ZOO["linen_einsum"]
    qm = qjax.nn.quantize_model(z.make(), _rules(z, "quest_w4a4"))
    sites = qm.sites(*z.inputs())
    o = sites["blocks_0/attn/o"]  # "BTNH,NHD->BTD": K = heads x head_dim
    assert (o.module, o.contract_axes, o.layout.k, o.layout.n) == ("Einsum", (0, 1), 32, 32)
    assert o.recipe.weight.hadamard_block == 32  # the largest power of two <= 128 dividing K
    gate_up = sites["blocks_0/mlp/gate_up"]
    assert (gate_up.module, gate_up.layout.out_shape) == ("DenseGeneral", (2, 32))
    z = ZOO["nnx_block"]
    model = qjax.nn.quantize_model(z.make(), _rules(z, "lsq_w4a4"))
    o = qjax.nn.sites(model)["blocks/0/attn/o"]
    assert (o.module, o.contract_axes, o.layout.matrix_shape) == ("LinearGeneral", (0, 1),
                                                                  (32, 32))
    assert model.blocks[0].attn.o.kernel_scale[...].shape == (1, 32)  # per output feature


def test_conv_weight_scales_per_output_channel():
    z = ZOO["linen_cnn"]
    qm = qjax.nn.quantize_model(z.make(), _rules(z, "lsq_w4a4"))
    params = qm.init(jax.random.key(0), *z.inputs())["params"]
    assert params["conv2"]["kernel_scale"].shape == (1, 32)  # not one per kernel tap
    site = qm.sites()["conv2"]
    assert site.layout.kind == "conv" and site.layout.k == 3 * 3 * 16
    sp = QC.convert(params, qm)
    assert sp["conv2"]["kernel"].shape == (32, 144)


def test_integer_conv_serving_is_an_int8_convolution():
    z = ZOO["linen_cnn"]
    qm, params, _ = _train_linen(z, _rules(z, "int8_w8a8"), steps=1)
    sp = QC.convert(params, qm)
    jaxpr = str(jax.make_jaxpr(lambda s: QC.serve(qm, s, *z.inputs()))(sp))
    assert "conv_general_dilated" in jaxpr and "preferred_element_type=int32" in jaxpr
    assert QC.uses_integer_matmul(qm.sites()["conv2"].recipe, qm.sites()["conv2"].layout)


def test_raw_einsum_parameter_is_quantized_by_its_path():
    z = ZOO["linen_raw_einsum"]
    qm = qjax.nn.quantize_model(z.make(), _rules(z, "int8_w8a8"))
    params = qm.init(jax.random.key(0), *z.inputs())["params"]
    site = qm.sites()["proj/w"]
    assert (site.raw, site.param, site.module) == (True, "w", "RawEinsumProj")
    jaxpr = str(jax.make_jaxpr(lambda p: qm.apply({"params": p}, *z.inputs()))(params))
    assert jaxpr.count("preferred_element_type=int32") == 2  # proj/w and head
    with pytest.raises(ValueError, match="parameter 'proj/w': learned scales"):
        qjax.nn.quantize_model(z.make(), {"proj/w": "lsq"}).init(jax.random.key(0), *z.inputs())
