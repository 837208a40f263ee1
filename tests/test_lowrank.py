"""LR-QAT and QALoRA (qjax.nn.lowrank) against the papers' definitions."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qjax
from qjax import convert as QC
from qjax import presets
from qjax._src.nn import lowrank as LR
from qjax.nn import LayerQuant, lr_qat, qalora, quantize_model

SPEC = qjax.QuantSpec("int4", qjax.PerRow(0))
X = jax.random.normal(jax.random.key(0), (4, 32))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="down")(jax.nn.relu(nn.Dense(64, name="up")(x)))


class NnxMLP(nnx.Module):
    def __init__(self):
        self.up = nnx.Linear(32, 64, rngs=nnx.Rngs(1))
        self.down = nnx.Linear(64, 16, rngs=nnx.Rngs(2))

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def test_q44_downcast_reference_example():
    # Bondarenko et al. 2024: Phi0 stored as int8 fixed point with 4 fractional bits at 4 bits.
    phi = jnp.array([[2.37, -8.4, 7.2, 0.03, -3.97]])
    w0, s0 = phi, jnp.ones((1, 5))
    recipe = lr_qat(qjax.QuantSpec("int4", qjax.PerRow(0), scale_rule=qjax.AbsMax()),
                    rank=1, phi_dtype="int8")
    frozen, _ = LR.init_state(w0 * s0, recipe, jax.random.key(0))
    # Per-column absmax scale of a (1, 5) matrix: s0 = |w| / 7, so Phi0 = +-7 ... use the formula
    # directly on the reference values instead:
    q = jnp.clip(jnp.round(jnp.clip(phi, -8, 7) * 16), -128, 127).astype(jnp.int8)
    np.testing.assert_array_equal(q, [[38, -128, 112, 0, -64]])
    np.testing.assert_array_equal(q.astype(jnp.float32) / 16, [[2.375, -8, 7, 0, -4]])
    assert frozen["phi0"].dtype == jnp.int8
    decoded = LR.float_kernel(frozen, {"lora_down": jnp.zeros((1, 1)),
                                            "lora_up": jnp.zeros((1, 5)),
                                            "kernel_scale": jnp.ones((1, 5))}, recipe, jnp.float32)
    np.testing.assert_array_equal(decoded * 16, jnp.round(decoded * 16))  # on the 1/16 grid


@pytest.mark.parametrize("kind", ["lr_qat", "qalora"])
def test_zero_adapter_is_round_to_nearest_ptq_bit_for_bit(kind):
    recipe = LR.LowRankQAT(kind, SPEC, rank=4)
    qm = quantize_model(MLP(), {"up|down": recipe})
    v = qm.init(jax.random.key(1), X)
    ptq = quantize_model(MLP(), {"up|down": LayerQuant(SPEC)})
    fv = MLP().init(jax.random.key(7), X)  # another float model: start LR-QAT from it
    v = qjax.nn.init_from_float(qm, v, fv["params"])
    assert "kernel" not in v["params"]["up"]  # W0 is not kept
    np.testing.assert_array_equal(qm.apply(v, X), ptq.apply(fv, X))
    # NNX: the pretrained model's own layers are wrapped
    model = NnxMLP()
    ref = quantize_model(NnxMLP(), {"up|down": LayerQuant(SPEC)})
    quantize_model(model, {"up|down": recipe})
    np.testing.assert_array_equal(model(X), ref(X))
    assert model.up.inner.kernel is None


def test_lr_qat_gradients_match_the_definitions():
    recipe = lr_qat(SPEC, rank=4)
    w0 = jax.random.normal(jax.random.key(2), (32, 16))
    frozen, params = LR.init_state(w0, recipe, jax.random.key(3))
    params["lora_up"] = 0.3 * jax.random.normal(jax.random.key(4), params["lora_up"].shape)
    g_out = jax.random.normal(jax.random.key(5), (32, 16))
    loss = lambda p: jnp.sum(LR.effective_kernel(frozen, p, recipe, jnp.float32) * g_out)
    grads = jax.grad(loss)(params)
    c = frozen["phi0"] + recipe.scaling * params["lora_down"] @ params["lora_up"]
    w_int = jnp.clip(jnp.round(c), -8, 7)
    # dL/ds = sum over K of G * W_int (no LSQ term)
    np.testing.assert_allclose(grads["kernel_scale"], jnp.sum(g_out * w_int, 0, keepdims=True),
                               rtol=1e-5, atol=1e-5)
    # dL/dC = G * s, masked to the grid; chained into the adapters
    g_c = g_out * params["kernel_scale"] * ((c >= -8) & (c <= 7))
    np.testing.assert_allclose(grads["lora_up"], recipe.scaling * params["lora_down"].T @ g_c,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["lora_down"], recipe.scaling * g_c @ params["lora_up"].T,
                               rtol=1e-4, atol=1e-5)


def _train(qm, v, steps=5):
    tx = optax.adam(1e-2)
    target = jnp.sin(jnp.arange(16.0))
    loss = lambda p: jnp.mean((qm.apply({**v, "params": p}, X) - target) ** 2)
    p, opt = v["params"], tx.init(v["params"])

    @jax.jit
    def step(p, opt):
        g = jax.grad(loss)(p)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt

    for _ in range(steps):
        p, opt = step(p, opt)
    return {**v, "params": p}


@pytest.mark.parametrize("recipe", [lr_qat(SPEC, rank=4), lr_qat(SPEC, rank=4,
                                                                   phi_dtype="int8"),
                                    qalora(SPEC, rank=4),
                                    lr_qat(qjax.QuantSpec("int4", qjax.PerGroup(0, 16)),
                                           qjax.QuantSpec("int8", qjax.PerRow(-1)), rank=2)])
def test_merged_model_equals_the_trained_forward(recipe):
    qm = quantize_model(MLP(), {"up|down": recipe})
    v = _train(qm, qm.init(jax.random.key(1), X))
    assert float(jnp.abs(v["params"]["up"]["lora_up"]).max()) > 0
    y = jax.jit(lambda v: qm.apply(v, X))(v)
    sp = QC.convert(v["params"], qm, frozen=v[LR.FROZEN])
    assert isinstance(sp["up"]["kernel"], qjax.QArray) and "lora_up" not in sp["up"]
    y_srv = jax.jit(lambda s: QC.serve(qm, s, X))(sp)
    if recipe.activation is None:
        np.testing.assert_array_equal(y_srv, y)
    else:  # fake-quant QAT vs int8 serving: accumulation order only
        np.testing.assert_allclose(y_srv, y, rtol=1e-5, atol=1e-5)


def test_nnx_lr_qat_trains_converts_and_serves(tmp_path):
    model = NnxMLP()
    quantize_model(model, {"up|down": lr_qat(SPEC, rank=4)})
    state = nnx.state(model, nnx.Param)
    assert "phi0" not in str(jax.tree_util.tree_structure(state))  # frozen: not a Param
    opt = nnx.Optimizer(model, qjax.optim.qat_adamw(1e-2), wrt=nnx.Param)
    target = jnp.sin(jnp.arange(16.0))

    @nnx.jit
    def step(m, o):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(X) - target) ** 2))(m)
        o.update(m, g)
        return loss

    losses = [float(step(model, opt)) for _ in range(4)]
    assert losses[-1] < losses[0]
    served = QC.convert(model)
    np.testing.assert_array_equal(QC.serve(served, X), model(X))
    QC.save(os.path.join(tmp_path, "c"), served)
    again = QC.restore(os.path.join(tmp_path, "c"), served)
    np.testing.assert_array_equal(QC.serve(again, X), model(X))


def test_lr_qat_on_q4_0_merges_to_gguf_blocks(tmp_path):
    q4 = presets.gguf_q4_0(axis=0)
    qm = quantize_model(MLP(), {"up|down": lr_qat(q4, rank=4)})
    v = _train(qm, qm.init(jax.random.key(1), X), steps=3)
    sp = QC.convert(v["params"], qm, frozen=v[LR.FROZEN])
    w = sp["up"]["kernel"]
    assert w.spec == QC.serving_spec(q4)
    np.testing.assert_array_equal(w.scale, w.scale.astype(jnp.float16).astype(jnp.float32))
    np.testing.assert_array_equal(jax.jit(lambda s: QC.serve(qm, s, X))(sp),
                                  jax.jit(lambda v: qm.apply(v, X))(v))
    path = os.path.join(tmp_path, "m.gguf")
    QC.export_gguf(sp, path)
    gguf = pytest.importorskip("gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    up = next(t for n, t in tensors.items() if "up" in n and "kernel" in n)
    assert up.tensor_type == gguf.GGMLQuantizationType.Q4_0
    got = gguf.quants.dequantize(up.data, up.tensor_type).reshape(64, 32)
    np.testing.assert_array_equal(got, qjax.dequantize(w))


def test_bad_input():
    with pytest.raises(ValueError, match="rank must be"):
        lr_qat(SPEC, rank=0)
    with pytest.raises(ValueError, match="rank 64 is larger than the layer's min"):
        quantize_model(MLP(), {"up": lr_qat(SPEC, rank=64)}).init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="signed integer grid"):
        lr_qat(qjax.QuantSpec("midrise4", qjax.PerRow(0)))
    with pytest.raises(ValueError, match="Hadamard"):
        qalora(qjax.QuantSpec("int4", qjax.PerRow(0), hadamard_block=16, hadamard_axis=0))
    with pytest.raises(ValueError, match="zero point"):
        lr_qat(qjax.QuantSpec("int4", qjax.PerRow(0), "absmax_asymmetric"))
    with pytest.raises(ValueError, match="qalora learns an LSQ step"):
        qalora(presets.gguf_q4_0(axis=0))
    with pytest.raises(ValueError, match="phi_dtype"):
        qalora(SPEC).__class__("qalora", SPEC, phi_dtype="int8")
    qm = quantize_model(MLP(), {"up|down": lr_qat(SPEC, rank=2)})
    v = qm.init(jax.random.key(0), X)
    with pytest.raises(ValueError, match="pass frozen="):
        QC.convert(v["params"], qm)
    with pytest.raises(ValueError, match="does not match the model"):
        qjax.nn.init_from_float(qm, v, {"up": {"kernel": jnp.zeros((3, 3))}})
