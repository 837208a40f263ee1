"""iFairy's 2-bit complex weights against QuEST W2 on the reference Llama (weights only).

The main job's tiny byte-level Llama (``configs/quest_w4a4_tiny.py``: d=128, 2 layers, seq 256,
batch 16, 500 steps of AdamW at 3e-3 on the Python standard library). iFairy's model is complex
throughout; the reference Llama is real, so here every block linear ``x (.., K) -> (.., N)`` is
a complex linear on paired features: ``x_c = x[:K/2] + i x[K/2:]``, ``y_c = x_c @ W``
(``W`` complex64 ``(K/2, N/2)``), ``y = [Re y_c, Im y_c]``. That is a real linear map with the
structure ``[[A, B], [-B, A]]`` and half the free parameters; with iFairy each complex weight is
one of ``{+-1, +-i}`` times a per-matrix scale (2 bits per complex weight, 1 bit per real
parameter), trained with the identity STE (:func:`qjax.methods.ifairy.complex_dense`). Rows:
the real float model and QuEST W2 weight-only (the training program, ``method=quest
weight_bits=2 act_bits=None``), and the complex-structured model in float and with iFairy W2
(a loop here, with the program's data, schedule, optimizer and evaluation). Activations stay
float in every row (iFairy's int8 activations are left out, as QuEST's are).

Run: ``python -m benchmarks.ifairy_llama [--quick] [--seeds 0]``; writes
``benchmarks/results/ifairy_llama.{json,md}``. Program runs resume from ``runs/ifairy_llama``.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import qjax
from qjax import data as D
from qjax import train
from qjax.config import replace
from qjax.methods import ifairy
from qjax.models.llama import BLOCK_LINEARS, Llama, LlamaConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
from quest_w4a4_tiny import get_config  # noqa: E402  (configs/ is not a package)

try:
    from benchmarks._timing import report, seeds_cli
except ImportError:  # run as a script from the benchmarks folder
    from _timing import report, seeds_cli

QUICK = dict(steps=40, eval_every=40, checkpoint_every=40, eval_batches=4,
             max_corpus_bytes=4_000_000)
PROGRAM_ROWS = {"float32 (real)": dict(method=None),
                "QuEST W2 (weights only)": dict(method="quest", weight_bits=2, act_bits=None)}


def paired_complex_dense(x: jax.Array, w: jax.Array, qat: bool) -> jax.Array:
    """``[Re y, Im y]`` of ``y = (x[:K/2] + i x[K/2:]) @ W``, ``W`` complex ``(K/2, N/2)``."""
    h = x.shape[-1] // 2
    xc = jax.lax.complex(x[..., :h].astype(jnp.float32), x[..., h:].astype(jnp.float32))
    y = ifairy.complex_dense(xc, w, qat=qat)
    return jnp.concatenate([y.real, y.imag], axis=-1).astype(x.dtype)


def _complex_kernels(params, key, cfg: LlamaConfig) -> tuple[dict, dict]:
    """(params without the block kernels, {path: complex64 (K/2, N/2)}) at the Llama's init
    scale: real and imaginary parts N(0, std^2) with the std of the kernel they replace."""
    pattern = re.compile(BLOCK_LINEARS + "/kernel")
    flat = traverse_util.flatten_dict(params, sep="/")
    cplx, keep = {}, {}
    for i, (name, leaf) in enumerate(sorted(flat.items())):
        if not pattern.fullmatch(name):
            keep[name] = leaf
            continue
        k, n = leaf.shape
        std = cfg.init_std / (math.sqrt(2 * cfg.n_layers) if re.search(r"/(o|down)/", name)
                              else 1.0)
        parts = std * jax.random.normal(jax.random.fold_in(key, i), (2, k // 2, n // 2))
        cplx[name.rsplit("/", 1)[0]] = jax.lax.complex(parts[0], parts[1])
    return traverse_util.unflatten_dict(keep, sep="/"), cplx


def train_complex(qat: bool, seed: int, quick: bool, corpus: D.Corpus) -> float:
    """Validation loss of the complex-structured Llama (iFairy W2 when ``qat``)."""
    c = replace(get_config(), seed=seed, **(QUICK if quick else {}))
    cfg = c.model
    model = Llama(cfg)
    sample = jnp.zeros((1, c.model.max_seq_len), jnp.int32)
    params = model.init(jax.random.key(seed), sample)["params"]
    rest, cplx = _complex_kernels(params, jax.random.key(seed + 100), cfg)
    trained = {"rest": rest, "cplx": cplx}

    def loss_fn(tr, inputs, targets, qat_on):
        def intercept(next_fun, args, kwargs, context):
            m = context.module
            if isinstance(m, nn.Dense) and context.method_name == "__call__":
                w = tr["cplx"].get("/".join(m.path))
                if w is not None:
                    return paired_complex_dense(args[0], w, qat_on)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(intercept):
            logits = model.apply({"params": tr["rest"]}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    schedule = qjax.optim.warmup_cosine(c.optim.lr, c.optim.steps, c.optim.warmup_fraction)
    tx = optax.chain(ifairy.conjugate_gradients(),
                     qjax.optim.qat_adamw(schedule, weight_decay=c.optim.weight_decay,
                                          grad_clip=c.optim.grad_clip))
    opt = tx.init(trained)

    @jax.jit
    def step(tr, o, inputs, targets):
        loss, g = jax.value_and_grad(loss_fn)(tr, inputs, targets, qat)
        u, o = tx.update(g, o, tr)
        return optax.apply_updates(tr, u), o, loss

    evaluate = jax.jit(lambda tr, i, t: loss_fn(tr, i, t, qat))
    for s in range(c.optim.steps):
        inputs, targets = D.get_batch(corpus.train, s, c.optim.batch_size, c.model.max_seq_len,
                                      c.optim.seed)
        trained, opt, loss = step(trained, opt, inputs, targets)
        if (s + 1) % 50 == 0:
            print(f"  complex {'iFairy W2' if qat else 'float'} step {s + 1} loss "
                  f"{float(loss):.4f}", flush=True)
    val = D.val_batches(corpus.val, c.optim.batch_size, c.model.max_seq_len,
                        max_batches=c.eval_batches)
    return float(np.mean([float(evaluate(trained, i, t)) for i, t in val]))


def main(seeds: list[int], quick: bool) -> None:
    runs_dir = os.path.join("runs", "ifairy_llama" + ("_quick" if quick else ""))
    base = replace(get_config(), baseline=False, **(QUICK if quick else {}))
    corpus = train.load_corpus(base)
    rows = {}
    for row, fields in PROGRAM_ROWS.items():
        rows[row] = []
        for seed in seeds:
            slug = "float" if fields["method"] is None else "quest_w2"
            cfg = replace(base, name=slug, seed=seed, **fields,
                          out_dir=os.path.join(runs_dir, slug, f"seed{seed}"))
            print(f"== {row}, seed {seed}", flush=True)
            rows[row].append(train.train_one(cfg, corpus, cfg.run_dir)["val_loss"])
    for row, qat in (("complex-paired, float", False), ("complex-paired, iFairy W2", True)):
        rows[row] = []
        for seed in seeds:
            print(f"== {row}, seed {seed}", flush=True)
            rows[row].append(train_complex(qat, seed, quick, corpus))
    first = rows["float32 (real)"]
    steps = base.optim.steps
    lines = ["# iFairy W2 vs QuEST W2 on the reference Llama (weights only, CPU)", "",
             f"Tiny byte-level Llama (d={base.model.d_model}, {base.model.n_layers} layers, seq "
             f"{base.model.max_seq_len}), {steps} steps; seeds {seeds}. Complex-paired: every "
             "block "
             "linear is a complex linear on paired features (half the free parameters).", "",
             "| model | val loss per seed | mean | vs real float (%) |", "|---|---|---|---|"]
    out = []
    for row, losses in rows.items():
        diff = statistics.fmean(100 * (a / b - 1) for a, b in zip(losses, first, strict=True))
        out.append({"row": row, "val_loss": losses, "vs_float_pct": diff})
        lines.append(f"| {row} | {', '.join(f'{v:.4f}' for v in losses)} | "
                     f"{statistics.fmean(losses):.4f} | {diff:+.2f} |")
    report("ifairy_llama", quick, {"seeds": seeds, "quick": quick, "rows": out}, lines)


if __name__ == "__main__":
    seeds_cli(main, __doc__, seeds="0")
