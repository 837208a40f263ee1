"""Tests for qjax.optim: labels, decay mask, schedules and the QAT AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
