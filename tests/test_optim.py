"""Tests for qjax.optim: labels, decay mask, schedules and the QAT AdamW."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qjax
from qjax import optim

PARAMS = {
    "dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3), "kernel_scale": jnp.ones((1, 3)),
              "input_scale": jnp.ones(())},
    "norm": {"scale": jnp.ones(4)},
    "embed": {"embedding": jnp.ones((10, 4))},
}


def test_labels_and_decay_mask():
    labels = optim.param_labels(PARAMS)
    assert labels["dense"] == {"kernel": "matrix", "bias": "vector", "kernel_scale": "quantizer",
                               "input_scale": "quantizer"}
    assert labels["norm"]["scale"] == "vector" and labels["embed"]["embedding"] == "matrix"
    mask = optim.weight_decay_mask(PARAMS)
    assert mask["dense"]["kernel"] and not mask["dense"]["kernel_scale"]
    assert not mask["dense"]["bias"] and not mask["norm"]["scale"]


def test_warmup_cosine_recipe():
    s = optim.warmup_cosine(1e-3, 1000, 0.1)
    assert float(s(0)) == pytest.approx(1e-5, rel=1e-5)
    assert float(s(100)) == pytest.approx(1e-3)
    assert float(s(1000)) == pytest.approx(1e-4)
    assert float(s(550)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-3)
    with pytest.raises(ValueError, match="total_steps"):
        optim.warmup_cosine(1e-3, 0)


def test_qat_schedule():
    s = optim.QATSchedule(0.25, 100)
    assert s.start_step == 25 and not s.enabled(24) and s.enabled(25)
    assert optim.QATSchedule(0, 10).enabled(0)
    assert optim.QATSchedule(40, 100).start_step == 40
    with pytest.raises(ValueError, match="fractional QAT start"):
        optim.QATSchedule(1.5, 10)


def test_qat_adamw_decays_matrices_only_and_scales_quantizer_lr():
    tx = optim.qat_adamw(0.1, weight_decay=0.5, grad_clip=None, quantizer_lr_multiplier=0.0)
    state = tx.init(PARAMS)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, state, PARAMS)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * PARAMS["dense"]["kernel"])
    for path in [("dense", "bias"), ("dense", "kernel_scale"), ("norm", "scale")]:
        np.testing.assert_array_equal(updates[path[0]][path[1]], 0.0)
    grads = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
    updates, _ = tx.update(grads, state, PARAMS)
    np.testing.assert_array_equal(updates["dense"]["kernel_scale"], 0.0)  # multiplier 0
    assert float(updates["dense"]["bias"][0]) == pytest.approx(-0.1, rel=1e-3)


def test_grad_clip_applies():
    tx = optim.qat_adamw(1.0, weight_decay=0.0, grad_clip=1e-3)
    p = {"w": jnp.ones((2, 2))}
    s = tx.init(p)
    u1, _ = tx.update({"w": jnp.full((2, 2), 100.0)}, s, p)
    u2, _ = optax.adam(1.0, b1=0.9, b2=0.95).update({"w": jnp.full((2, 2), 100.0)},
                                                     optax.adam(1.0).init(p), p)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-3)  # Adam is scale-free after clipping


NAN = float("nan")


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((1e-3, 10.5), {}, TypeError, "total_steps"),
    ((1e-3, True), {}, TypeError, "total_steps"),
    ((1e-3, "100"), {}, TypeError, "total_steps"),
    ((NAN, 100), {}, ValueError, "peak_lr"),
    ((-1.0, 100), {}, ValueError, "peak_lr"),
    ((1e-3, 100), {"warmup_fraction": NAN}, ValueError, "warmup_fraction"),
    ((1e-3, 100), {"init_ratio": NAN}, ValueError, "init_ratio"),
    ((1e-3, 100), {"final_ratio": -5.0}, ValueError, "final_ratio"),
])
def test_warmup_cosine_rejects_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        optim.warmup_cosine(*args, **kwargs)


@pytest.mark.parametrize("start, total_steps, error, match", [
    (0.5, -5, ValueError, "total_steps"),
    (0.5, None, TypeError, "total_steps"),
    (10, 0, ValueError, "total_steps"),
    (True, 100, TypeError, "start"),
    ("10", 100, TypeError, "start"),
    (np.int64(-3), 100, ValueError, "start"),
    (NAN, 100, ValueError, "fractional QAT start"),
])
def test_qat_schedule_rejects_bad_arguments(start, total_steps, error, match):
    with pytest.raises(error, match=match):
        optim.QATSchedule(start, total_steps)


def test_qat_schedule_accepts_numpy_steps():
    assert optim.QATSchedule(np.int64(3), 10).start_step == 3


@pytest.mark.parametrize("lr, kwargs, error, match", [
    (NAN, {}, ValueError, "learning_rate"),
    (-1.0, {}, ValueError, "learning_rate"),
    ("1e-3", {}, TypeError, "learning_rate"),
    (1e-3, {"weight_decay": -1.0}, ValueError, "weight_decay"),
    (1e-3, {"b1": 1.0}, ValueError, "b1"),
    (1e-3, {"b2": 2.0}, ValueError, "b2"),
    (1e-3, {"grad_clip": -1.0}, ValueError, "grad_clip"),
    (1e-3, {"grad_clip": NAN}, ValueError, "grad_clip"),
    (1e-3, {"quantizer_lr_multiplier": NAN}, ValueError, "quantizer_lr_multiplier"),
    (1e-3, {"quantizer_lr_multiplier": -1.0}, ValueError, "quantizer_lr_multiplier"),
])
def test_qat_adamw_rejects_bad_hyper_parameters(lr, kwargs, error, match):
    with pytest.raises(error, match=match):
        optim.qat_adamw(lr, **kwargs)


def test_qat_adamw_takes_schedules_and_zero_clip_means_none():
    p = {"w": jnp.ones((2, 2))}
    g = {"w": jnp.full((2, 2), 100.0)}
    for lr in (optim.warmup_cosine(1e-3, 10), jnp.float32(1e-3)):
        tx = optim.qat_adamw(lr)
        tx.update(g, tx.init(p), p)
    off, zero = optim.qat_adamw(1e-3, grad_clip=None), optim.qat_adamw(1e-3, grad_clip=0.0)
    np.testing.assert_array_equal(off.update(g, off.init(p), p)[0]["w"],
                                  zero.update(g, zero.init(p), p)[0]["w"])


# --- Flax NNX state, nnx.Optimizer and stacked layers ----------------------------------------

class _Block(nnx.Module):
    def __init__(self, rngs, dim=8, gain=False):
        self.norm = nnx.RMSNorm(dim, rngs=rngs)
        self.q = nnx.LinearGeneral(dim, (2, 4), rngs=rngs)
        self.up = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.down = nnx.Linear(2 * dim, dim, rngs=rngs)
        if gain:
            self.gain = nnx.Param(jnp.ones(dim))  # a per-layer vector with no Flax vector name
        qjax.nn.quantize_model(self, {"up|down": qjax.nn.Method("lsq", 4, 4)})

    def __call__(self, x):
        h = self.norm(x)
        return x + self.down(jax.nn.gelu(self.up(h))) + self.q(h).reshape(x.shape)


BLOCK_LABELS = {
    "norm": {"scale": "vector"},
    "q": {"kernel": "matrix", "bias": "vector"},  # bias (2, 4): named bias, so a vector
    **{name: {"inner": {"kernel": "matrix", "bias": "vector"}, "kernel_scale": "quantizer",
              "input_scale": "quantizer"} for name in ("up", "down")},
}


def _pure(labels):
    return nnx.to_pure_dict(labels) if isinstance(labels, nnx.State) else labels


@pytest.mark.filterwarnings("ignore:.*flax.nnx.State.*:DeprecationWarning")  # State.to_pure_dict
def test_labels_on_nnx_state_and_pure_dict():
    m = _Block(nnx.Rngs(0))
    state = nnx.state(m, nnx.Param)
    assert state["up"]["kernel_scale"][...].ndim == 2  # (1, N): the rank rule alone says matrix
    labels = optim.param_labels(state)
    # Same structure as the state (Param wrappers kept), as optax.multi_transform needs.
    assert jax.tree_util.tree_structure(labels) == jax.tree_util.tree_structure(state)
    assert _pure(labels) == BLOCK_LABELS
    assert optim.param_labels(nnx.to_pure_dict(state)) == BLOCK_LABELS
    assert optim.param_labels(state.to_pure_dict()) == BLOCK_LABELS
    _, params, _ = nnx.split(m, nnx.Param, ...)
    assert _pure(optim.param_labels(params)) == BLOCK_LABELS
    mask = _pure(optim.weight_decay_mask(state))
    assert mask["up"]["inner"]["kernel"] and not mask["up"]["kernel_scale"]
    assert not mask["q"]["bias"] and not mask["norm"]["scale"]


def test_labels_skip_integer_indices_and_linen_boxes():
    class Stack(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(2)])

    state = nnx.state(Stack(nnx.Rngs(0)), nnx.Param)
    want = {"layers": {i: {"kernel": "matrix", "bias": "vector"} for i in range(2)}}
    assert _pure(optim.param_labels(state)) == want
    assert optim.param_labels(nnx.to_pure_dict(state)) == want
    assert optim.param_labels({"blocks": [{"kernel_scale": jnp.ones((1, 3))}]}) == {
        "blocks": [{"kernel_scale": "quantizer"}]}
    boxed = {"dense": {"kernel_scale": nn.Partitioned(jnp.ones((1, 3)), (None, "model"))}}
    assert optim.param_labels(boxed)["dense"]["kernel_scale"].value == "quantizer"


def test_nnx_optimizer_two_jitted_steps_no_decay_on_quantizers():
    m = _Block(nnx.Rngs(0))
    lr, wd = 0.1, 0.5
    opt = nnx.Optimizer(m, optim.qat_adamw(lr, weight_decay=wd, grad_clip=None), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (4, 8))

    @nnx.jit
    def train_step(m, opt, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(m)
        opt.update(m, grads)
        return loss

    @nnx.jit
    def apply(m, opt, grads):
        opt.update(m, grads)

    before = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    losses = [float(train_step(m, opt, x)) for _ in range(2)]
    assert all(np.isfinite(losses)) and int(opt.step[...]) == 2
    after = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    assert not np.allclose(after["up"]["kernel_scale"], before["up"]["kernel_scale"])

    # Zero gradients, fresh optimizer: Adam's step is 0, only decoupled decay moves a weight.
    opt = nnx.Optimizer(m, optim.qat_adamw(lr, weight_decay=wd, grad_clip=None), wrt=nnx.Param)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, nnx.state(m, nnx.Param))
    for _ in range(2):
        apply(m, opt, zeros)
    end = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    labels = optim.param_labels(after)
    for path, lab in jax.tree_util.tree_leaves_with_path(labels):
        old = functools.reduce(lambda t, k: t[k.key], path, after)
        new = functools.reduce(lambda t, k: t[k.key], path, end)
        want = old * (1 - lr * wd) ** 2 if lab == "matrix" else old
        np.testing.assert_allclose(new, want, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def _stacked(layers=3, **kwargs):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return _Block(rngs, **kwargs)

    return make(nnx.Rngs(0))


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.blocks = _stacked(gain=True)


def test_stacked_nnx_layers():
    state = nnx.state(_stacked(), nnx.Param)
    assert state["norm"]["scale"][...].shape == (3, 8)
    assert state["up"]["kernel_scale"][...].shape == (3, 1, 16)
    assert state["q"]["bias"][...].shape == (3, 2, 4)
    # Names decide for quantizer params, biases and norm scales whatever the layer axis.
    assert _pure(optim.param_labels(state)) == BLOCK_LABELS

    # An unnamed per-layer vector needs stacked_axes; a callable keeps unstacked leaves exact.
    state = nnx.state(_Model(nnx.Rngs(0)), nnx.Param)
    assert state["blocks"]["gain"][...].shape == (3, 8)
    assert _pure(optim.param_labels(state))["blocks"]["gain"] == "matrix"

    def per_layer(names, leaf):
        return 1 if names[0] == "blocks" else 0

    labels = _pure(optim.param_labels(state, stacked_axes=per_layer))
    assert labels["blocks"]["gain"] == "vector" and labels["embed"]["embedding"] == "matrix"
    assert {k: v for k, v in labels["blocks"].items() if k != "gain"} == BLOCK_LABELS
    uniform = _pure(optim.param_labels(state, stacked_axes=1))
    assert uniform["blocks"]["gain"] == "vector"
    assert uniform["embed"]["embedding"] == "vector"  # why a uniform int is wrong when mixed
    assert not _pure(optim.weight_decay_mask(state, stacked_axes=per_layer))["blocks"]["gain"]

    # nnx.Optimizer takes the same rule through qat_adamw.
    m = _Model(nnx.Rngs(0))
    opt = nnx.Optimizer(m, optim.qat_adamw(0.1, weight_decay=0.5, grad_clip=None,
                                           stacked_axes=per_layer), wrt=nnx.Param)
    gain = m.blocks.gain[...]
    nnx.jit(lambda m, opt, g: opt.update(m, g))(
        m, opt, jax.tree_util.tree_map(jnp.zeros_like, nnx.state(m, nnx.Param)))
    np.testing.assert_array_equal(m.blocks.gain[...], gain)  # a vector: not decayed


def test_linen_stacked_axes_and_multi_dim_bias():
    p = {"scan": {"kernel": jnp.ones((3, 4, 4)), "gain": jnp.ones((3, 4))},
         "dense_general": {"bias": jnp.ones((2, 4))}}
    assert optim.param_labels(p) == {"scan": {"kernel": "matrix", "gain": "matrix"},
                                     "dense_general": {"bias": "vector"}}
    assert optim.param_labels(p, stacked_axes=1)["scan"] == {"kernel": "matrix", "gain": "vector"}


@pytest.mark.parametrize("stacked_axes, error", [
    (-1, ValueError), (True, TypeError), (1.0, TypeError), ("1", TypeError),
    (lambda names, leaf: -1, ValueError), (lambda names, leaf: None, TypeError),
])
def test_stacked_axes_rejected(stacked_axes, error):
    with pytest.raises(error, match="stacked_axes"):
        optim.param_labels(PARAMS, stacked_axes=stacked_axes)
    if not callable(stacked_axes):
        with pytest.raises(error, match="stacked_axes"):
            optim.qat_adamw(1e-3, stacked_axes=stacked_axes)
