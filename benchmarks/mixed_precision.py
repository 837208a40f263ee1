"""Mixed precision: HAWQ-V2 bit allocation and Double Rounding on the reference Llama.

One float model (:mod:`qjax.models.llama`, bytes of the Python standard library's sources,
:mod:`qjax.data`, trained by :func:`qjax.train.train_one`) starts every case: each fine-tune
starts from its weights (learned steps re-initialized from them), sees the same training batches
(seed ``FT_SEED``) and is evaluated on the same validation batches; the float model fine-tuned
alike is the reference. Only the block linears ``blocks_<i>/attn/{q,k,v,o}``,
``blocks_<i>/mlp/{gate,up,down}`` are quantized, weights only, one scale per output channel.

1. **HAWQ-V2 vs uniform vs random at the size of uniform 3-bit.** Hutchinson traces of the float
   model (:func:`qjax.precision.hessian_traces`), sensitivities for bits {2, 3, 4, 8} (absmax),
   the exact allocation under ``3/8 * block-linear parameters`` bytes; against uniform 3 bits
   and 3 random feasible allocations of that budget (2 bits everywhere, then random upgrades
   that fit until none does). Each is fine-tuned with ``Method("lsq", b, None)`` per layer
   (:func:`rules_from_allocation`) for the same steps (HAWQ and uniform also on a second data
   order). Also: post-training (absmax) loss of uniform widths and of HAWQ's Pareto front, and
   how often the allocation survives redrawing the traces within their standard errors.
2. **Double Rounding vs four separate widths.** One ``DoubleRounding(bits=(8, 6, 4, 2))`` model,
   fine-tuned with :func:`~qjax.nn.double_rounding.joint_loss`, evaluated at each width, against
   four ``Method("ste", b, None)`` models; and DR models whose joint loss weights the widths
   (``DR_SWEEP``: the 2-bit loss weighted 0.2 and the 4-bit one 2, the 2-bit loss weighted 0.2,
   left out, only the 8-bit loss). The joint loss
   is the weighted mean of the widths' losses, as in the training program
   (:func:`qjax._src.train_setup.double_rounding_weights`). Accounting: every model runs the
   same steps on the same batches (same tokens per model); the equal-weight DR model's 4
   forward/backward passes per step equal the four separate models' passes in total (a width
   weighted 0 is not run). Checkpoint bytes: one int8 DR checkpoint
   (:func:`qjax.convert.convert`, :func:`qjax.convert.save`) vs the four; and the int8 checkpoint
   lowered to 4 and 2 bits (:func:`~qjax.nn.double_rounding.lower_precision`) is served and
   compared with QAT's logits.
3. **Cost of the trace estimation**: probes, seconds (compilation timed apart), standard errors.

Run: ``python benchmarks/mixed_precision.py [--quick]``. The full run (d=128, 2 layers, seq 128,
batch 16; 1000 float steps, 200 fine-tuning steps per model) took about 27 minutes on a 2-core
CPU shared with other jobs and writes ``benchmarks/results/mixed_precision.{json,md,png}``.
``--quick`` (d=64, tiny budgets, under 2 CPU minutes) is a smoke run written to
``runs/mixed_precision_quick/``. Finished pieces are cached as JSON under
``runs/mixed_precision[_quick]/`` (git-ignored, with the float model's Orbax checkpoint), so a
rerun skips them; delete the folder to start over.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qjax import QArray, fake_quant, optim, precision, train
from qjax import convert as QC
from qjax import data as D
from qjax._src.atomic_files import write_json_atomically
from qjax.config import TrainConfig, replace
from qjax.models.llama import BLOCK_LINEARS, Llama, LlamaConfig
from qjax.nn import Method, quantize_model
from qjax.nn import double_rounding as DR
from qjax.nn.ops import init_kernel_scale

try:
    from benchmarks._timing import machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _timing import machine, write_results

FULL = dict(d_model=128, n_layers=2, n_heads=4, seq_len=128, batch_size=16, float_steps=1000,
            float_lr=3e-3, ft_steps=200, ft_lr=1e-3, eval_batches=16, trace_batches=2,
            min_probes=30, max_probes=64, corpus_bytes=16 * 2**20, bootstrap=200)
QUICK = dict(FULL, d_model=64, seq_len=64, batch_size=8, float_steps=60, ft_steps=8,
             eval_batches=2, trace_batches=1, min_probes=3, max_probes=4,
             corpus_bytes=2 * 2**20, bootstrap=20)
BITS = (2, 3, 4, 8)        # HAWQ candidate widths
DR_BITS = (8, 6, 4, 2)     # Double Rounding precisions
# Double Rounding models whose joint loss weights the widths' losses (8/6/4/2 bits) unequally:
# the first weights the lowest width's loss down (the equal-weight model's 2-bit loss pulls the
# shared weights off the other widths' optimum) and the 4-bit one up (the higher widths pull
# it too), the others locate the pull.
DR_SWEEP = ((1.0, 1.0, 2.0, 0.2), (1.0, 1.0, 1.0, 0.2), (1.0, 1.0, 1.0, 0.0),
            (1.0, 0.0, 0.0, 0.0))
DR_WEIGHTS = DR_SWEEP[0]
UNIFORM = 3                # the size HAWQ must match
N_RANDOM = 3
FT_SEED = 1                # fine-tuning batches (the float model trained on seed 0)
FRONT_AVG_BITS = (2.25, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
KERNELS = re.compile(BLOCK_LINEARS + "/kernel")


def _ce(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


class Bench:
    """The float model, data and helpers shared by all cases."""

    def __init__(self, c: dict, runs_dir: str):
        self.c, self.runs_dir = c, runs_dir
        self._evals: dict = {}
        os.makedirs(runs_dir, exist_ok=True)
        self.corpus = D.load_corpus(D.CorpusConfig(max_bytes=c["corpus_bytes"]))
        print(self.corpus.info.describe(), flush=True)
        self.cfg = LlamaConfig(d_model=c["d_model"], n_layers=c["n_layers"],
                               n_heads=c["n_heads"], max_seq_len=c["seq_len"])
        tc = replace(TrainConfig(), name="mixed_precision_float", method=None, baseline=False,
                     d_model=c["d_model"], n_layers=c["n_layers"], n_heads=c["n_heads"],
                     seq_len=c["seq_len"], batch_size=c["batch_size"],
                     steps=c["float_steps"], lr=c["float_lr"],
                     max_corpus_bytes=c["corpus_bytes"], eval_every=c["float_steps"],
                     eval_batches=c["eval_batches"], checkpoint_every=c["float_steps"],
                     log_every=50, out_dir=os.path.join(runs_dir, "float"))
        self.float_run = train.train_one(tc, self.corpus, tc.run_dir)
        self.float_params = train.load_params(tc, tc.run_dir)
        self.model = Llama(self.cfg)
        self.val = [(jnp.asarray(i), jnp.asarray(t)) for i, t in D.val_batches(
            self.corpus.val, c["batch_size"], c["seq_len"], max_batches=c["eval_batches"])]
        self.sample = self.val[0][0]
        self._float_eval = jax.jit(lambda p, i, t: _ce(self.model.apply({"params": p}, i), t))
        self.float_loss = self.eval_float(self.float_params)
        # Fine-tuning also trains further: the float model fine-tuned alike is the reference.
        self.float_ft = self.cached("ft_float", self._float_finetune)

    def _float_finetune(self) -> dict:
        loss = lambda p, i, t: _ce(self.model.apply({"params": p}, i), t)  # noqa: E731
        p, train_loss, secs = self.finetune(loss, self.float_params)
        return {"val_loss": self.eval_float(p), "train_loss": train_loss, "seconds": secs}

    def batch(self, step: int, seed: int = FT_SEED):
        i, t = D.get_batch(self.corpus.train, step, self.c["batch_size"], self.c["seq_len"], seed)
        return jnp.asarray(i), jnp.asarray(t)

    def eval_float(self, params) -> float:
        return float(np.mean([float(self._float_eval(params, i, t)) for i, t in self.val]))

    def evaluate(self, qmodel, params, bits=None) -> float:
        key = (id(qmodel), bits)
        if key not in self._evals:
            self._evals[key] = jax.jit(
                lambda p, i, t: _ce(qmodel.apply({"params": p}, i, bits=bits), t))
        f = self._evals[key]
        return float(np.mean([float(f(params, i, t)) for i, t in self.val]))

    def quantized(self, rules):
        """A quantized model and its params started from the float weights: learned steps
        (LSQ) and Double Rounding scales are re-initialized from the float kernels (``init``
        computed them from random ones)."""
        qmodel = quantize_model(self.model, rules)
        params = qmodel.init(jax.random.key(0), self.sample)["params"]
        params = _merge(params, self.float_params)
        for site in qmodel.sites().values():
            node = params
            for k in site.keys:
                node = node[k]
            if "kernel_scale" not in node:
                continue
            if isinstance(site.adapter, DR.DoubleRounding):
                node["kernel_scale"] = DR.init_scale(site.layout.to_matrix(node["kernel"]),
                                                     site.adapter)
            else:
                node["kernel_scale"] = init_kernel_scale(node["kernel"], site.recipe.weight,
                                                         site.layout)
        return qmodel, params

    def finetune(self, loss, params, seed: int = FT_SEED):
        """``ft_steps`` of AdamW (qjax.optim.qat_adamw, warm-up cosine) on the ``seed`` batches."""
        steps = self.c["ft_steps"]
        tx = optim.qat_adamw(optim.warmup_cosine(self.c["ft_lr"], steps), weight_decay=0.1)
        opt = tx.init(params)

        @jax.jit
        def step(p, o, i, t):
            value, g = jax.value_and_grad(loss)(p, i, t)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o, value

        t0, value = time.perf_counter(), None
        for s in range(steps):
            params, opt, value = step(params, opt, *self.batch(s, seed))
        return params, float(value), time.perf_counter() - t0

    def cached(self, name: str, fn) -> dict:
        """``fn()``, or its result stored in ``runs_dir/<name>.json`` by an earlier run."""
        path = os.path.join(self.runs_dir, f"{name}.json")
        if not os.path.exists(path):
            write_json_atomically(path, fn())
        with open(path) as f:
            return json.load(f)


def _merge(dst, src):
    """``dst`` with every leaf that ``src`` has at the same path (and shape) taken from it."""
    out = {}
    for k, v in dst.items():
        if isinstance(v, dict):
            out[k] = _merge(v, src.get(k, {}))
        elif k in src and jnp.shape(src[k]) == jnp.shape(v):
            out[k] = jnp.asarray(src[k], v.dtype)
        else:
            out[k] = v
    return out


def _ptq(params, bits: dict[str, int]):
    """Block kernels fake-quantized at ``bits[path]`` with HAWQ's quantizer (absmax/channel)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = precision.param_paths(params)
    new = [fake_quant(w, precision.default_quantizer(bits[p])) if p in bits else w
           for p, w in zip(paths, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, new)


def _random_allocation(layers, sizes, budget_bits: int, rng) -> dict[str, int]:
    """All layers at the fewest bits, then random (layer, wider width) upgrades that fit the
    budget until none does: a random feasible allocation close to the budget."""
    cur = dict.fromkeys(layers, BITS[0])
    cost = sum(sizes[p] * cur[p] for p in layers)
    while True:
        moves = [(p, b) for p in layers for b in BITS
                 if b > cur[p] and cost + sizes[p] * (b - cur[p]) <= budget_bits]
        if not moves:
            return cur
        p, b = moves[rng.integers(len(moves))]
        cost += sizes[p] * (b - cur[p])
        cur[p] = b


def _traces(bench: Bench) -> dict:
    c, model = bench.c, bench.model
    loss_fn = lambda p, b: _ce(model.apply({"params": p}, b[0]), b[1])  # noqa: E731
    batches = [bench.batch(10**6 + k, seed=0) for k in range(c["trace_batches"])]
    layers = lambda p: KERNELS.fullmatch(p) is not None  # noqa: E731
    t0 = time.perf_counter()  # compilation and 2 probes (same loss_fn: the HVP is cached)
    precision.hessian_traces(loss_fn, bench.float_params, batches, jax.random.key(99),
                             layers=layers, tol=0.0, max_probes=2, min_probes=2)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr = precision.hessian_traces(loss_fn, bench.float_params, batches, jax.random.key(0),
                                  layers=layers, tol=1e-2, min_probes=c["min_probes"],
                                  max_probes=c["max_probes"])
    secs = time.perf_counter() - t0
    return {"layers": [dataclasses.asdict(t) for t in tr.layers], "total": tr.total,
            "total_stderr": tr.total_stderr, "probes": tr.probes, "converged": tr.converged,
            "seconds": secs, "compile_and_2_probes_seconds": warm, "batches": len(batches),
            "tokens_per_batch": c["batch_size"] * c["seq_len"], "tol": 1e-2}


def _bootstrap(table, stderr: dict, budget: float, hawq: dict, n: int) -> dict:
    """Redraw each trace from N(trace, stderr^2), re-solve; how often HAWQ's answer survives."""
    rng = np.random.default_rng(0)
    d = table.as_dict()
    same, per_layer = 0, {p: {b: 0 for b in BITS} for p in table.layers}
    for _ in range(n):
        rows = {}
        for p, t in zip(table.layers, table.traces, strict=True):
            t2 = t + stderr[p] * rng.standard_normal()
            rows[p] = {b: v * (t2 / t) for b, v in d[p].items()}
        a = precision.allocate(rows, table.size_map, budget_bytes=budget).bits
        same += dict(a) == hawq
        for p, b in a.items():
            per_layer[p][b] += 1
    return {"draws": n, "identical_fraction": same / n,
            "same_width_fraction": {p: per_layer[p][hawq[p]] / n for p in table.layers}}


def part1(bench: Bench) -> dict:
    tr = bench.cached("traces", lambda: _traces(bench))
    traces = {t["path"]: t["trace"] for t in tr["layers"]}
    stderr = {t["path"]: t["stderr"] for t in tr["layers"]}
    table = precision.sensitivity(bench.float_params, traces, bits=BITS)
    sizes, omega = table.size_map, table.as_dict()
    total = sum(sizes.values())
    budget = total * UNIFORM / 8
    hawq = dict(precision.allocate(table, budget_bytes=budget).bits)
    rng = np.random.default_rng(0)
    allocs = {f"uniform {UNIFORM}-bit": dict.fromkeys(table.layers, UNIFORM), "HAWQ-V2": hawq}
    while len(allocs) < 2 + N_RANDOM:
        a = _random_allocation(table.layers, sizes, total * UNIFORM, rng)
        if a not in allocs.values():
            allocs[f"random {len(allocs) - 1}"] = a
    rows = []
    for name, bits in allocs.items():
        def run(bits=bits, seed=FT_SEED):
            rules = precision.rules_from_allocation(bits, "lsq", act_bits=None)
            qmodel, p0 = bench.quantized(rules)
            before = bench.evaluate(qmodel, p0)
            loss = lambda p, i, t: _ce(qmodel.apply({"params": p}, i), t)  # noqa: E731
            p, train_loss, secs = bench.finetune(loss, p0, seed)
            return {"val_loss_before": before, "val_loss": bench.evaluate(qmodel, p),
                    "train_loss": train_loss, "seconds": secs,
                    "ptq_absmax_loss": bench.eval_float(_ptq(bench.float_params, bits))}
        key = "ft_" + name.replace(" ", "_").replace("-", "")
        print(f"== part 1: {name}", flush=True)
        r = bench.cached(key, run)
        if name in ("HAWQ-V2", f"uniform {UNIFORM}-bit"):  # the same, other fine-tuning batches
            r["val_loss_seed2"] = bench.cached(
                key + "_seed2", lambda run=run: run(seed=FT_SEED + 1))["val_loss"]
        cost = sum(sizes[p] * b for p, b in bits.items()) / 8
        rows.append({"allocation": name, "bits": bits, "bytes": cost, "avg_bits": 8 * cost / total,
                     "objective": float(sum(omega[p][b] for p, b in bits.items())), **r})
    # Post-training front: uniform widths vs HAWQ's allocations at several sizes (no training).
    front = precision.pareto_front(table, budgets=[total * b / 8 for b in FRONT_AVG_BITS])
    ptq = {"uniform": [{"avg_bits": b, "bytes": total * b / 8, "val_loss": bench.eval_float(
                _ptq(bench.float_params, dict.fromkeys(table.layers, b)))} for b in BITS],
           "hawq": [{"avg_bits": 8 * a.cost / total, "bytes": a.cost, "objective": a.objective,
                     "val_loss": bench.eval_float(_ptq(bench.float_params, dict(a.bits)))}
                    for a in front.points]}
    return {"budget_bytes": budget, "block_params": total, "traces": tr, "rows": rows,
            "sensitivity": {p: dict(zip(map(str, BITS), row, strict=True))
                            for p, row in zip(table.layers, table.omega, strict=True)},
            "sizes": sizes, "ptq_front": ptq,
            "bootstrap": _bootstrap(table, stderr, budget, hawq, bench.c["bootstrap"])}


def _qbytes(tree) -> int:
    """Bytes of the quantized kernels (codes and scales) in converted params."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, QArray))
    return int(sum(a.codes.nbytes + a.scale.nbytes for a in leaves if isinstance(a, QArray)))


def part2(bench: Bench) -> dict:
    recipe = DR.DoubleRounding(bits=DR_BITS)
    ckpt_dir = os.path.join(bench.runs_dir, "checkpoints")

    def run_dr(weights=None):
        qmodel, p0 = bench.quantized({BLOCK_LINEARS: recipe})
        before = {b: bench.evaluate(qmodel, p0, bits=b) for b in recipe.bits}

        w = (1.0,) * len(recipe.bits) if weights is None else weights
        mean = tuple(x / sum(w) for x in w)  # the training program's weighted mean

        def loss(p, i, t):
            return DR.joint_loss(lambda b: _ce(qmodel.apply({"params": p}, i, bits=b), t),
                                 recipe.bits, mean)

        p, train_loss, secs = bench.finetune(loss, p0)
        int8 = QC.convert(p, qmodel)
        check = {}
        x = bench.val[0][0]
        for b in (4, 2):
            low = jax.tree_util.tree_map(
                lambda a, b=b: DR.lower_precision(a, recipe, b) if isinstance(a, QArray) else a,
                int8, is_leaf=lambda a: isinstance(a, QArray))
            served = QC.serve(qmodel, low, x)
            check[str(b)] = float(jnp.max(jnp.abs(served - qmodel.apply({"params": p}, x,
                                                                         bits=b))))
        name = "dr_int8" if weights is None else "dr_int8_w" + _weights_name(w).replace("/", "_")
        return {"val_loss": {str(b): bench.evaluate(qmodel, p, bits=b) for b in recipe.bits},
                "val_loss_before": {str(b): v for b, v in before.items()},
                "train_joint_loss": train_loss, "seconds": secs, "quantized_bytes":
                _qbytes(int8), "checkpoint_bytes": QC.save(os.path.join(ckpt_dir, name), int8,
                                                           overwrite=True),
                "served_minus_qat_max_abs_logit": check, "loss_weights": weights}

    def run_sep(b):
        def run():
            qmodel, p0 = bench.quantized({BLOCK_LINEARS: Method("ste", b, None)})
            before = bench.evaluate(qmodel, p0)
            loss = lambda p, i, t: _ce(qmodel.apply({"params": p}, i), t)  # noqa: E731
            p, train_loss, secs = bench.finetune(loss, p0)
            conv = QC.convert(p, qmodel)
            return {"val_loss": bench.evaluate(qmodel, p), "val_loss_before": before,
                    "train_loss": train_loss, "seconds": secs, "quantized_bytes": _qbytes(conv),
                    "checkpoint_bytes": QC.save(os.path.join(ckpt_dir, f"ste_w{b}"), conv,
                                                overwrite=True)}
        return run

    print("== part 2: Double Rounding", flush=True)
    dr = bench.cached("dr", run_dr)
    sweep = {}
    for weights in DR_SWEEP:
        print(f"== part 2: Double Rounding, loss weights {weights}", flush=True)
        sweep[_weights_name(weights)] = bench.cached(
            "dr_w" + _weights_name(weights).replace("/", "_"), lambda w=weights: run_dr(w))
    sep = {}
    for b in recipe.bits:
        print(f"== part 2: separate STE W{b}", flush=True)
        sep[str(b)] = bench.cached(f"ste_w{b}", run_sep(b))
    return {"double_rounding": dr, "double_rounding_weighted": sweep[_weights_name(DR_WEIGHTS)],
            "double_rounding_sweep": sweep, "separate": sep}


def _weights_name(weights) -> str:
    return "/".join(f"{w:g}" for w in weights)


def _goals(p1: dict, p2: dict) -> dict:
    by = {r["allocation"]: r for r in p1["rows"]}
    rand = [r["val_loss"] for r in p1["rows"] if r["allocation"].startswith("random")]
    h = by["HAWQ-V2"]["val_loss"]
    sep = p2["separate"]
    gap = {b: v / sep[b]["val_loss"] - 1 for b, v in p2["double_rounding"]["val_loss"].items()}
    gap_w = {b: v / sep[b]["val_loss"] - 1
             for b, v in p2["double_rounding_weighted"]["val_loss"].items()}
    weights = _weights_name(DR_WEIGHTS)
    return {
        f"HAWQ-V2 < uniform {UNIFORM}-bit at equal size (after QAT)":
            bool(h < by[f"uniform {UNIFORM}-bit"]["val_loss"]),
        "... and with a second fine-tuning data order": bool(
            by["HAWQ-V2"]["val_loss_seed2"] < by[f"uniform {UNIFORM}-bit"]["val_loss_seed2"]),
        "HAWQ-V2 < every random allocation of that size (after QAT)": bool(h < min(rand)),
        "Double Rounding within 1% of the separate model at 8 bits": bool(gap["8"] <= 0.01),
        "Double Rounding within 1% of the separate model at 4 bits": bool(gap["4"] <= 0.01),
        f"Double Rounding, loss weights {weights}, within 1% at 8 bits": bool(gap_w["8"] <= 0.01),
        f"Double Rounding, loss weights {weights}, within 1% at 4 bits": bool(gap_w["4"] <= 0.01),
    }


def _markdown(bench: Bench, p1: dict, p2: dict, goals: dict, quick: bool) -> str:
    c, mach = bench.c, machine()
    uni = next(r for r in p1["rows"] if r["allocation"].startswith("uniform"))["val_loss"]
    md = [f"# Mixed precision: HAWQ-V2 and Double Rounding{' (quick smoke run)' if quick else ''}",
          "", f"Reference Llama d={c['d_model']}, {c['n_layers']} layers, {c['n_heads']} heads, "
          f"seq {c['seq_len']}, batch {c['batch_size']}; float model {c['float_steps']} steps "
          f"(lr {c['float_lr']:g}) on {bench.corpus.info.describe().split(' files')[0]}: val loss "
          f"**{bench.float_loss:.4f}** nats/byte ({c['eval_batches']} val batches, "
          f"{c['eval_batches'] * c['batch_size'] * c['seq_len']:,} bytes); the same model "
          f"fine-tuned in float like the others: **{bench.float_ft['val_loss']:.4f}**. Every "
          f"fine-tune: {c['ft_steps']} steps of qat_adamw (lr {c['ft_lr']:g}, warm-up cosine), "
          f"the same batches, from the float weights. Block linears only "
          f"({p1['block_params']:,} params), weight-only, per output channel. "
          f"{mach['processor']}, {mach['cpus']} CPUs, JAX {mach['jax']}.", "",
          f"## 1. Bit allocation at the size of uniform {UNIFORM}-bit "
          f"({p1['budget_bytes'] / 1024:.0f} KiB of block weights)", "",
          "| allocation | avg bits | KiB | sum Omega | PTQ absmax | LSQ step 0 | after LSQ QAT "
          "| vs uniform |", "|---|---|---|---|---|---|---|---|"]
    for r in p1["rows"]:
        md.append(f"| {r['allocation']} | {r['avg_bits']:.3f} | {r['bytes'] / 1024:.1f} | "
                  f"{r['objective']:.5g} | {r['ptq_absmax_loss']:.4f} | "
                  f"{r['val_loss_before']:.4f} | **{r['val_loss']:.4f}** | "
                  f"{100 * (r['val_loss'] / uni - 1):+.2f}% |")
    by = {r["allocation"]: r for r in p1["rows"]}
    u2, h2 = by[f"uniform {UNIFORM}-bit"]["val_loss_seed2"], by["HAWQ-V2"]["val_loss_seed2"]
    md += ["", f"Repeated with another fine-tuning data order (seed {FT_SEED + 1}): uniform "
           f"{u2:.4f}, HAWQ-V2 {h2:.4f} ({100 * (h2 / u2 - 1):+.2f}%). HAWQ-V2 differs from "
           f"uniform in " + ", ".join(f"{precision.layer_path(p)} ({b} bits)" for p, b in
                                      by["HAWQ-V2"]["bits"].items() if b != UNIFORM)
           + ". `sum Omega` is HAWQ's "
           "objective; `PTQ absmax` the allocation applied to the float model without training; "
           "`LSQ step 0` the LSQ model before fine-tuning (LSQ's initial steps)."]
    tr = {t["path"]: t for t in p1["traces"]["layers"]}
    md += ["", "Bits per layer (trace +- standard error of the float model's Hessian block; "
           "`kept` = share of bootstrap redraws of the traces giving HAWQ the same width):", "",
           "| layer | params | Tr(H) | HAWQ-V2 | kept | " + " | ".join(
               r["allocation"] for r in p1["rows"] if r["allocation"].startswith("random"))
           + " |", "|---|---|---|---|---|" + "---|" * N_RANDOM]
    keep = p1["bootstrap"]["same_width_fraction"]
    rows = {r["allocation"]: r["bits"] for r in p1["rows"]}
    for p in p1["sizes"]:
        md.append(f"| {precision.layer_path(p)} | {p1['sizes'][p]:,} | {tr[p]['trace']:.3g} +- "
                  f"{tr[p]['stderr']:.2g} | {rows['HAWQ-V2'][p]} | {keep[p]:.0%} | " + " | ".join(
                      str(b[p]) for n, b in rows.items() if n.startswith("random")) + " |")
    bs = p1["bootstrap"]
    md += ["", f"The whole HAWQ allocation is reproduced by {bs['identical_fraction']:.0%} of "
           f"{bs['draws']} redraws.", "", "Post-training quantization (absmax per channel, no "
           "fine-tuning) of the float model, uniform widths vs HAWQ-V2's Pareto front:", "",
           "| allocation | avg bits | KiB | val loss |", "|---|---|---|---|"]
    front = [("uniform", r) for r in p1["ptq_front"]["uniform"]] + [
        ("HAWQ-V2 front", r) for r in p1["ptq_front"]["hawq"]]
    for kind, r in sorted(front, key=lambda kr: (kr[1]["avg_bits"], kr[0])):
        md.append(f"| {kind} | {r['avg_bits']:.2f} | {r['bytes'] / 1024:.1f} | "
                  f"{r['val_loss']:.4f} |")
    dr, sep = p2["double_rounding"], p2["separate"]
    drw = p2["double_rounding_weighted"]["val_loss"]
    weights = _weights_name(DR_WEIGHTS)
    md += ["", "## 2. Double Rounding (one model, 8/6/4/2 bits) vs four separate STE models", "",
           f"DR: {c['ft_steps']} steps, each batch at the 4 precisions (joint loss, the mean of "
           f"the widths' losses); DR w: the same with the losses weighted {weights} "
           f"(8/6/4/2 bits). "
           f"Separate: {c['ft_steps']} steps each on the same batches. Same tokens per model, "
           f"same total forward/backward passes ({4 * c['ft_steps']} on each side).", "",
           "| bits | DR step 0 | DR after | vs separate | DR w after | vs separate | "
           "separate step 0 | separate after |", "|---|---|---|---|---|---|---|---|"]
    for b in map(str, DR_BITS):
        s = sep[b]
        md.append(f"| {b} | {dr['val_loss_before'][b]:.4f} | **{dr['val_loss'][b]:.4f}** | "
                  f"{100 * (dr['val_loss'][b] / s['val_loss'] - 1):+.2f}% | "
                  f"**{drw[b]:.4f}** | {100 * (drw[b] / s['val_loss'] - 1):+.2f}% | "
                  f"{s['val_loss_before']:.4f} | **{s['val_loss']:.4f}** |")
    md += ["", "Loss weights (8/6/4/2 bits) and the widths' losses after fine-tuning, vs the "
           "separate models (the weights were picked on these validation batches; there is no "
           "held-out split):", "", "| loss weights | " + " | ".join(
               f"{b} bits" for b in DR_BITS) + " |", "|---|" + "---|" * len(DR_BITS)]
    rows = {"1/1/1/1": dr, **p2["double_rounding_sweep"]}
    for name, r in rows.items():
        md.append(f"| {name} | " + " | ".join(
            f"{r['val_loss'][b]:.4f} ({100 * (r['val_loss'][b] / sep[b]['val_loss'] - 1):+.2f}%)"
            for b in map(str, DR_BITS)) + " |")
    sep_q = sum(s["quantized_bytes"] for s in sep.values())
    sep_c = sum(s["checkpoint_bytes"] for s in sep.values())
    md += ["", "| checkpoints | quantized kernels (codes + scales) | on disk (qjax.convert.save, "
           "with float embeddings, head, norms) |", "|---|---|---|",
           f"| DR: one int8 | {dr['quantized_bytes']:,} | {dr['checkpoint_bytes']:,} |",
           f"| separate: W8 + W6 + W4 + W2 | {sep_q:,} (" + " + ".join(
               f"{sep[b]['quantized_bytes']:,}" for b in map(str, DR_BITS)) + f") | {sep_c:,} |",
           "", "Serving the int8 DR checkpoint lowered to 4 / 2 bits vs the QAT forward at those "
           "bits, max |logit difference| on one batch: " + " / ".join(
               f"{v:.2g}" for v in dr["served_minus_qat_max_abs_logit"].values()) + ".",
           "", "## 3. Trace estimation cost", "",
           "| probes | converged (tol 1e-2) | seconds | compile + 2 probes (s) | batches x tokens "
           "| Tr(H_SS) +- s.e. | relative s.e. per layer (median / max) |",
           "|---|---|---|---|---|---|---|"]
    t = p1["traces"]
    rel = [abs(x["stderr"] / x["trace"]) for x in t["layers"]]
    md.append(f"| {t['probes']} | {t['converged']} | {t['seconds']:.1f} | "
              f"{t['compile_and_2_probes_seconds']:.1f} | {t['batches']} x "
              f"{t['tokens_per_batch']:,} | {t['total']:.4g} +- {t['total_stderr']:.2g} | "
              f"{np.median(rel):.1%} / {max(rel):.1%} |")
    md += ["", "Goals:", ""] + [f"- {g}: {ok}" for g, ok in goals.items()]
    return "\n".join(md) + "\n"


def _plot(p1: dict, p2: dict, float_loss: float, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kib = lambda v: v / 1024  # noqa: E731
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts, style in (("uniform, PTQ", p1["ptq_front"]["uniform"], "s--"),
                             ("HAWQ-V2 front, PTQ", p1["ptq_front"]["hawq"], "o-")):
        a1.plot([kib(r["bytes"]) for r in pts], [r["val_loss"] for r in pts], style, label=name)
    for r in p1["rows"]:
        a1.plot(kib(r["bytes"]), r["val_loss"], "*" if r["allocation"] == "HAWQ-V2" else "x",
                ms=10, label=f"{r['allocation']}, LSQ QAT")
    a1.set_yscale("log")
    a1.set_ylabel("validation loss (nats/byte)")
    n = p1["block_params"]
    dr, sep = p2["double_rounding"]["val_loss"], p2["separate"]
    xs = [kib(n * b / 8) for b in DR_BITS]
    a2.plot(xs, [dr[str(b)] for b in DR_BITS], "o-", label="Double Rounding (one model)")
    drw = p2["double_rounding_weighted"]["val_loss"]
    a2.plot(xs, [drw[str(b)] for b in DR_BITS], "^-",
            label=f"Double Rounding, weights {_weights_name(DR_WEIGHTS)}")
    a2.plot(xs, [sep[str(b)]["val_loss"] for b in DR_BITS], "s--", label="separate STE models")
    for ax, title in ((a1, "HAWQ-V2 vs uniform / random"), (a2, "Double Rounding vs separate")):
        ax.axhline(float_loss, color="k", ls=":", label="float, fine-tuned")
        ax.set(xlabel="block weights (KiB)", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (1-2 minutes)")
    parser.add_argument("--runs-dir", default=os.path.join("runs", "mixed_precision"))
    args = parser.parse_args()
    c = QUICK if args.quick else FULL
    runs_dir = args.runs_dir + ("_quick" if args.quick else "")
    t0 = time.perf_counter()
    bench = Bench(c, runs_dir)
    print(f"float val loss {bench.float_loss:.4f}", flush=True)
    p1 = part1(bench)
    p2 = part2(bench)
    goals = _goals(p1, p2)
    md = _markdown(bench, p1, p2, goals, args.quick)
    print(md)
    payload = {"machine": machine(), "quick": args.quick, "config": c,
               "corpus": bench.corpus.info.describe(), "float": {
                   "val_loss": bench.float_loss, "train_run": bench.float_run,
                   "fine_tuned": bench.float_ft},
               "hawq": p1, "double_rounding": p2, "goals": goals,
               "wall_seconds_this_invocation": time.perf_counter() - t0}
    if args.quick:  # the smoke run stays out of benchmarks/results
        paths = [os.path.join(runs_dir, f"mixed_precision_quick.{e}") for e in ("json", "md")]
        for p, text in zip(paths, (json.dumps(payload, indent=2), md), strict=True):
            with open(p, "w") as f:
                f.write(text)
    else:
        paths = list(write_results("mixed_precision", payload, md))
    png = paths[0].removesuffix(".json") + ".png"
    if _plot(p1, p2, bench.float_ft["val_loss"], png):
        paths.append(png)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
