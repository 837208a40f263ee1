"""Every config in configs/ builds its model and takes a finite training step (tiny sizes)."""

import glob
import math
import pathlib

import jax
import jax.numpy as jnp
import optax
import pytest

from qjax import train
from qjax.config import load_config, replace

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p for p in glob.glob(str(ROOT / "configs" / "*.py"))
                 if not pathlib.Path(p).name.startswith("_"))  # _study.py: shared rows
TINY = dict(d_model=64, n_heads=2, n_layers=1, seq_len=16, batch_size=2, hadamard_block=64,
            steps=10)


def test_every_study_row_has_a_config_file(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "configs"))
    from _study import STUDY

    names = {pathlib.Path(p).stem for p in CONFIGS}
    assert {f"study_{n}" for n in STUDY} <= names


# The same rows at other widths (the same code, 4-12 s each to compile) run with -m slow.
OTHER_WIDTHS = {"study_quest_mse_w2a2", "study_pact_w2a2", "study_quest_ste_w2a2",
                "study_lsq_w2a2", "study_quest_w3a3", "study_quest_w2a2", "study_quest_w8a8",
                "study_quest_w2", "study_ste_w2a2"}


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.slow) if pathlib.Path(p).stem in OTHER_WIDTHS else p
    for p in CONFIGS], ids=lambda p: pathlib.Path(p).stem)
def test_config_builds_and_steps(path):
    cfg = replace(load_config(path), **TINY)
    model, params = train.build_model(cfg)
    tx = optax.adam(1e-2)
    # a fixed batch of few distinct bytes: any working model and recipe fits it in a few steps
    shape = (cfg.optim.batch_size, cfg.model.max_seq_len + 1)
    ids = jax.random.randint(jax.random.key(0), shape, 0, 8)

    def loss_fn(p):
        logits = model.apply({"params": p}, ids[:, :-1], qat=cfg.quant.method is not None)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(p, opt):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss, updates

    opt = tx.init(params)
    losses = []
    for _ in range(5):
        params, opt, loss, updates = step(params, opt)
        losses.append(float(loss))
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree_util.tree_leaves(updates))
    assert math.isfinite(losses[0]) and abs(losses[0] - math.log(256)) < 0.5
    assert losses[-1] < losses[0] - 0.5, f"{cfg.name} does not learn: {losses}"
    if cfg.quant.method is not None:
        assert model.layers, "no layer was quantized"
