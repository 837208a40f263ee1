"""Every config in configs/ builds its model and takes a finite training step (tiny sizes)."""

import dataclasses
import glob
import math
import pathlib

import jax
import jax.numpy as jnp
import optax
import pytest

from qjax import train
from qjax.config import STUDY, load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "*.py")))
TINY = dict(d_model=64, n_heads=2, n_layers=1, seq_len=16, batch_size=2, block_size=64, steps=10)


def test_every_study_row_has_a_config_file():
    names = {pathlib.Path(p).stem for p in CONFIGS}
    assert {f"study_{n}" for n in STUDY} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: pathlib.Path(p).stem)
def test_config_builds_and_steps(path):
    cfg = dataclasses.replace(load_config(path), **TINY)
    model, params = train.build_model(cfg)
    tx = optax.adamw(1e-3)
    ids = jax.random.randint(jax.random.key(0), (cfg.batch_size, cfg.seq_len + 1), 0, 256)

    def loss_fn(p):
        logits = model.apply({"params": p}, ids[:, :-1], qat=cfg.method is not None)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert math.isfinite(float(loss)) and abs(float(loss) - math.log(256)) < 0.5
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree_util.tree_leaves(updates))
    if cfg.method is not None:
        assert model.layers, "no layer was quantized"
