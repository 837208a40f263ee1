"""QAT of a pretrained LM on a budget: RTN, full QAT, LR-QAT, QALoRA, ZeroQAT and distillation.

One float reference Llama (:mod:`qjax.models.llama`, byte level) is pretrained by the training
program's own code (:func:`qjax.train.train_one`) on the built-in corpus (the Python standard
library's sources, :mod:`qjax.data`) and cached in ``runs/llm_finetune/base`` (``--quick``:
``runs/llm_finetune/quick/base``); a finished base is never retrained. From it, every block
linear (``blocks_<i>/attn/{q,k,v,o}``, ``blocks_<i>/mlp/{gate,up,down}``) is quantized at the
weight format of ``--formats`` and each case below is run with the same batches (``steps`` x
``batch`` x ``seq`` tokens for every trained case):

* ``rtn``: round-to-nearest PTQ, no training (``LayerQuant(spec)`` rules on the base params).
* ``float_ft``: control, the float base trained on the same tokens at full QAT's lr (the base is
  short-trained, so fine-tuning alone lowers the loss; QAT's cost is its gap to this row).
* ``full_qat``: LSQ on every weight and step (``Method("lsq", 4, None)`` at W4 per channel,
  ``LayerQuant(spec with LSQ)`` otherwise), all parameters trained, starting from the base
  params with each learned step set to the RTN scale (so step 0 is RTN PTQ, as for the adapters).
* ``full_qat_kd``: the same, trained on the logit KL to the float base (``logit_kl``, T = 1, no
  cross-entropy term); the teacher's params are an argument of the step (counted in its memory).
* ``lr_qat_r{8,32}`` / ``lr_qat_r{8,32}_int8``: ``qjax.nn.lr_qat(spec, rank=r)`` with ``Phi0``
  in float32 or int8 fixed point (Q4.4); only ``lora_down``, ``lora_up`` and ``kernel_scale`` are
  trained, the embedding, norms and LM head stay frozen (``qjax.nn.init_from_float``).
* ``qalora_r8``: ``qjax.nn.qalora(spec, rank=8)``, trained like LR-QAT.
* ``zeroqat``: ``qjax.methods.zeroqat.zo_step`` (MeZO-style SGD, one probe, two forward passes a
  step) on the ``full_qat`` model and init: weights and learned steps, same batches and steps.

Every gradient case uses ``qjax.optim.qat_adamw`` (AdamW 0.9/0.95, weight decay 0, clip 1.0,
warm-up 10% then cosine to 10%), each case at its own learning rate (:data:`CASES`; with
``--probe``, the best of :data:`PROBE` after a quarter of the steps, per family: full QAT,
LR-QAT, QALoRA) and every learned scale at Adam lr 1e-5. ZeroQAT: lr 1e-5, eps 1e-3, untuned.
Columns: validation loss (``eval_batches`` deterministic batches, quantized forward) and gap to
the float base; trainable parameter count; the compiled step's memory from
``Compiled.memory_analysis()``: ``argument + output + temp - alias`` bytes (params, optimizer
state, frozen tensors, batch and the XLA temporaries; donated outputs reuse their arguments, so
the alias bytes are not counted twice), and of it the argument bytes; the median step time
(measured while training, after warm-up; cases run one after another on a shared machine, so
compare ratios loosely) as a ratio to full QAT's. ZeroQAT's step memory is also compared with
one forward pass (loss only) of the same model.

Formats (``--formats``): ``w4_row`` (``QuantSpec("int4", PerRow(0))``, the default),
``w4_g32`` (``presets.gguf_q4_0(axis=0)``; full QAT learns ``|d|`` per group of 32 with LSQ on
the same int4 grid, LSQ's round-half-to-even and float32 steps) and ``w4a8_row`` (``w4_row``
plus int8 per-token absmax STE activations).

Run: ``python benchmarks/llm_finetune.py [--quick] [--probe] [--formats w4_row,w4_g32]
[--cases rtn,full_qat,...]``; a format may name its own cases, ``w4_g32:rtn+full_qat``. The
results in ``benchmarks/results`` come from ``--probe --formats
w4_row,w4_g32:rtn+full_qat+lr_qat_r8_int8``.
Writes ``benchmarks/results/llm_finetune[_quick].{json,md,png}``. Each case's result is cached in
``runs/llm_finetune/<size>/<format>/<case>.json``, so a killed run resumes where it stopped
(``--fresh`` ignores the cache). ``--quick`` (d=64, 2 layers, seq 64, 10 steps) takes 1-2 minutes;
the full run (d=256, 4 layers, 4 heads, seq 128, batch 8, 100 steps a case; base 800 steps x 16
x 128) about 30 minutes on a loaded 2-core CPU, half of it in the base pretraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import qjax
from qjax import LSQ, compute_scale, optim, presets, train
from qjax import data as D
from qjax.config import TrainConfig, replace
from qjax.methods.distill import logit_kl
from qjax.methods.zeroqat import ZeroOrderConfig, zo_step
from qjax.models.llama import BLOCK_LINEARS, Llama, LlamaConfig, non_embedding_params
from qjax.nn import LayerQuant, Method, init_from_float, lowrank

try:
    from benchmarks._timing import machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _timing import machine, write_results

SIZES = {
    "full": dict(d_model=256, n_layers=4, n_heads=4, seq_len=128, batch_size=8, steps=100,
                 eval_batches=16, base_steps=800, base_batch=16, max_corpus_bytes=64 * 2**20),
    "quick": dict(d_model=64, n_layers=2, n_heads=2, seq_len=64, batch_size=4, steps=10,
                  eval_batches=2, base_steps=60, base_batch=8, max_corpus_bytes=2_000_000),
}
SCALE_LR = 1e-5  # Adam learning rate of every learned scale (kernel_scale)
# case -> (kind, options); lr is the peak learning rate of the case's adapters or weights.
CASES = {
    "rtn": ("rtn", {}),
    "float_ft": ("float", dict(lr=1e-4)),
    "full_qat": ("full", dict(lr=1e-4)),
    "full_qat_kd": ("full", dict(lr=1e-4, distill=True)),
    "lr_qat_r8": ("lr_qat", dict(lr=3e-3, rank=8, phi="float32")),
    "lr_qat_r32": ("lr_qat", dict(lr=3e-3, rank=32, phi="float32")),
    "lr_qat_r8_int8": ("lr_qat", dict(lr=3e-3, rank=8, phi="int8")),
    "lr_qat_r32_int8": ("lr_qat", dict(lr=3e-3, rank=32, phi="int8")),
    "qalora_r8": ("qalora", dict(lr=1e-3, rank=8)),
    "zeroqat": ("zeroqat", dict(lr=1e-5, eps=1e-3)),
}
PROBE = {"full_qat": (1e-4, 3e-4), "lr_qat_r8": (1e-3, 3e-3), "qalora_r8": (1e-4, 1e-3)}
INT4_ROW = qjax.QuantSpec("int4", qjax.PerRow(0))
FORMATS = {  # name -> (weight spec, activation spec)
    "w4_row": (INT4_ROW, None),
    "w4_g32": (presets.gguf_q4_0(axis=0), None),
    "w4a8_row": (INT4_ROW, qjax.QuantSpec("int8", qjax.PerRow(-1))),
}
ADAPTER_NAMES = ("lora_down", "lora_up", "kernel_scale")


def _ce(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def base_config(size: dict, runs: str) -> TrainConfig:
    """The float base's training-program config (cosine lr 3e-3, the QuEST recipe's AdamW)."""
    return replace(TrainConfig(),
                   name="llm_finetune_base", d_model=size["d_model"], n_layers=size["n_layers"],
                   n_heads=size["n_heads"], seq_len=size["seq_len"], batch_size=size["base_batch"],
                   steps=size["base_steps"], method=None, baseline=False,
                   eval_every=size["base_steps"], checkpoint_every=max(1, size["base_steps"] // 4),
                   eval_batches=size["eval_batches"], max_corpus_bytes=size["max_corpus_bytes"],
                   out_dir=os.path.join(runs, "base"))


def _full_target(wspec, aspec):
    if wspec == INT4_ROW and aspec is None:
        return Method("lsq", weight_bits=4, act_bits=None)
    grid = wspec
    if isinstance(wspec.scale_rule, qjax.GgmlMax):  # learn |d| on the same int4 grid
        grid = wspec.replace(scale_rule=qjax.AbsMax(), scale_dtype=None, rounding="nearest")
    return LayerQuant(weight=grid.replace(estimator=LSQ()), activation=aspec)


def _split(params, trainable):
    flat = traverse_util.flatten_dict(params, sep="/")
    keep = {k: v for k, v in flat.items() if trainable(k)}
    rest = {k: v for k, v in flat.items() if not trainable(k)}
    return keep, rest


def _merge(a, b):
    return traverse_util.unflatten_dict({**a, **b}, sep="/")


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    raw = {k: int(getattr(m, k, 0) or 0) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
        "alias_size_in_bytes", "generated_code_size_in_bytes")}
    raw["peak_bytes"] = (raw["argument_size_in_bytes"] + raw["output_size_in_bytes"]
                         + raw["temp_size_in_bytes"] - raw["alias_size_in_bytes"])
    return raw


class Bench:
    """The corpus, the float base and the shared pieces of every case of one size."""

    def __init__(self, size_name: str, runs: str):
        self.size = SIZES[size_name]
        s = self.size
        self.runs = runs
        self.llama = LlamaConfig(d_model=s["d_model"], n_layers=s["n_layers"],
                                 n_heads=s["n_heads"], max_seq_len=s["seq_len"])
        self.corpus = D.load_corpus(D.CorpusConfig(max_bytes=s["max_corpus_bytes"]))
        print(self.corpus.info.describe(), file=sys.stderr)
        cfg = base_config(s, runs)
        t0 = time.perf_counter()
        self.base_result = train.train_one(cfg, self.corpus, cfg.run_dir)
        self.base_seconds = time.perf_counter() - t0
        self.base = jax.device_get(train.load_params(cfg, cfg.run_dir))
        self.val = [tuple(map(jnp.asarray, b)) for b in D.val_batches(
            self.corpus.val, s["batch_size"], s["seq_len"], max_batches=s["eval_batches"])]
        self.sample = jnp.zeros((1, s["seq_len"]), jnp.int32)
        self.float_model = Llama(self.llama)
        self.float_val = self.evaluate(self.float_model, {"params": self.base})

    def batch(self, step: int):
        s = self.size
        x, y = D.get_batch(self.corpus.train, step, s["batch_size"], s["seq_len"], seed=1)
        return jnp.asarray(x), jnp.asarray(y)

    def evaluate(self, model, variables) -> float:
        fn = jax.jit(lambda v, i, t: _ce(model.apply(v, i), t))
        return float(np.mean([float(fn(variables, i, t)) for i, t in self.val]))

    def quantized(self, target):
        model = qjax.nn.quantize_model(Llama(self.llama), {BLOCK_LINEARS: target})
        return model, model.init(jax.random.key(1), self.sample)

    def full_qat_variables(self, model, variables, wspec) -> dict:
        """The base params in the LSQ model, each learned step set to the RTN scale."""
        out = init_from_float(model, variables, self.base)
        for site in model.sites().values():
            node = out["params"]
            for k in site.keys:
                node = node[k]
            s0, _ = compute_scale(site.layout.to_matrix(node["kernel"]), wspec)
            node["kernel_scale"] = jnp.abs(s0).reshape(node["kernel_scale"].shape)
        return out


def run_case(b: Bench, case: str, fmt: str, steps: int | None = None,
             lr: float | None = None) -> dict:
    kind, o = CASES[case]
    o = o if lr is None else {**o, "lr": lr}
    wspec, aspec = FORMATS[fmt]
    steps = steps or b.size["steps"]
    if kind == "rtn":
        model, _ = b.quantized(LayerQuant(weight=wspec, activation=aspec))
        return {"val_loss": b.evaluate(model, {"params": b.base}), "trainable_params": 0,
                "tokens": 0}
    if kind == "float":
        model, variables = b.float_model, {"params": b.base}
        trainable = lambda k: True  # noqa: E731
    elif kind in ("full", "zeroqat"):
        model, variables = b.quantized(_full_target(wspec, aspec))
        variables = b.full_qat_variables(model, variables, wspec)
        trainable = lambda k: True  # noqa: E731
    else:
        recipe = (lowrank.lr_qat(wspec, aspec, rank=o["rank"], phi_dtype=o["phi"])
                  if kind == "lr_qat" else lowrank.qalora(wspec, aspec, rank=o["rank"]))
        model, variables = b.quantized(recipe)
        variables = init_from_float(model, variables, b.base)
        trainable = lambda k: k.rsplit("/", 1)[-1] in ADAPTER_NAMES  # noqa: E731
    init_val = b.evaluate(model, variables)
    others = {k: v for k, v in variables.items() if k != "params"}
    if kind == "zeroqat":
        return _run_zeroqat(b, model, variables, o, steps) | {"init_val_loss": init_val}
    tp, frozen = _split(variables["params"], trainable)
    fixed = {"frozen": frozen, "others": others,
             "teacher": b.base if o.get("distill") else None}
    schedule = optim.warmup_cosine(o["lr"], steps, 0.1)
    tx = optim.qat_adamw(schedule, weight_decay=0.0, grad_clip=1.0,
                         quantizer_lr_multiplier=SCALE_LR / o["lr"])

    def loss_fn(tp, fixed, inputs, targets):
        v = {**fixed["others"], "params": _merge(tp, fixed["frozen"])}
        logits = model.apply(v, inputs)
        if fixed["teacher"] is None:
            return _ce(logits, targets)
        return logit_kl(logits, b.float_model.apply({"params": fixed["teacher"]}, inputs))

    def step_fn(tp, opt_state, fixed, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(tp, fixed, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, tp)
        return optax.apply_updates(tp, updates), opt_state, loss

    opt_state = tx.init(tp)
    compiled = jax.jit(step_fn, donate_argnums=(0, 1)).lower(
        tp, opt_state, fixed, *b.batch(0)).compile()
    memory = _memory(compiled)
    n_train = int(sum(np.size(v) for v in tp.values()))
    times, losses = [], []
    for step in range(steps):
        batch = b.batch(step)
        t0 = time.perf_counter()
        tp, opt_state, loss = compiled(tp, opt_state, fixed, *batch)
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    variables = {**others, "params": _merge(tp, fixed["frozen"])}
    return {"val_loss": b.evaluate(model, variables), "init_val_loss": init_val,
            "trainable_params": n_train, "memory": memory,
            "step_s": statistics.median(times[2:] or times), "train_loss_last": losses[-1],
            "tokens": steps * b.size["batch_size"] * b.size["seq_len"], "lr": o["lr"]}


def _run_zeroqat(b: Bench, model, variables, o: dict, steps: int) -> dict:
    def loss_fn(params, batch):
        return _ce(model.apply({"params": params}, batch[0]), batch[1])

    params = variables["params"]
    config = ZeroOrderConfig(optim.warmup_cosine(o["lr"], steps, 0.1), eps=o["eps"])
    key = jax.random.key(7)
    compiled = zo_step(loss_fn, config).lower(params, b.batch(0), key,
                                              jnp.int32(0)).compile()
    forward = jax.jit(loss_fn).lower(params, b.batch(0)).compile()
    memory, fwd_memory = _memory(compiled), _memory(forward)
    n_train = int(sum(np.size(v) for v in jax.tree.leaves(params)))
    times, losses = [], []
    for step in range(steps):
        batch = b.batch(step)
        t0 = time.perf_counter()
        params, loss = compiled(params, batch, key, jnp.int32(step))
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    return {"val_loss": b.evaluate(model, {"params": params}), "trainable_params": n_train,
            "memory": memory, "forward_memory": fwd_memory,
            "step_s": statistics.median(times[2:] or times), "train_loss_last": losses[-1],
            "tokens": steps * b.size["batch_size"] * b.size["seq_len"], "lr": o["lr"],
            "eps": o["eps"]}


def lr_probe(b: Bench, path: str) -> dict:
    """Val loss after ``PROBE_STEPS`` steps (same schedule shape) at each learning rate of
    :data:`PROBE` (W4 per channel); where the learning rates of :data:`CASES` come from."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    steps = max(2, b.size["steps"] // 4)
    out = {"steps": steps, "val_loss": {}}
    for case, lrs in PROBE.items():
        for lr in lrs:
            r = run_case(b, case, "w4_row", steps=steps, lr=lr)
            out["val_loss"][f"{case} lr={lr:g}"] = r["val_loss"]
            print(f"probe {case} lr={lr:g}: {r['val_loss']:.4f}", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return out


def _use_probe(probe: dict) -> None:
    """Sets each case's lr to the best probed lr of its family (full QAT, LR-QAT, QALoRA)."""
    for probed in PROBE:
        family = CASES[probed][0]
        runs = {k: v for k, v in probe["val_loss"].items() if k.startswith(probed + " ")}
        best = float(min(runs, key=runs.get).split("lr=")[1])
        for case, (kind, o) in list(CASES.items()):
            if kind == family or (kind, family) == ("float", "full"):
                CASES[case] = (kind, {**o, "lr": best})


def _mb(x) -> str:
    return f"{x / 2**20:.1f}"


def _table(fmt: str, rows: dict, float_val: float) -> tuple[str, list[str]]:
    full = rows.get("full_qat", {})
    full_mem = full.get("memory", {}).get("peak_bytes")
    full_t = full.get("step_s")
    rtn = rows.get("rtn", {}).get("val_loss")
    lines = [f"### {fmt}: {FORMATS[fmt][0]}" + (f", activations {FORMATS[fmt][1]}"
                                                  if FORMATS[fmt][1] else ""), "",
             "| case | trainable params | val loss | vs float | vs RTN | init val loss | "
             "step peak MB (args MB) | memory vs full QAT | step time vs full QAT |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case, r in rows.items():
        mem = r.get("memory", {})
        peak = mem.get("peak_bytes")
        lines.append(
            f"| {case} | {r['trainable_params']:,} | {r['val_loss']:.4f} | "
            f"{100 * (r['val_loss'] / float_val - 1):+.2f}% | "
            + (f"{100 * (r['val_loss'] / rtn - 1):+.2f}% | " if rtn and case != "rtn" else " | ")
            + (f"{r['init_val_loss']:.4f} | " if "init_val_loss" in r else " | ")
            + (f"{_mb(peak)} ({_mb(mem['argument_size_in_bytes'])}) | " if peak else " | ")
            + (f"{peak / full_mem:.2f}x | " if peak and full_mem else " | ")
            + (f"{r['step_s'] / full_t:.2f}x |" if "step_s" in r and full_t else " |"))
    return "\n".join(lines), _goals(rows, rtn)


def _goals(rows: dict, rtn) -> list[str]:
    goals = []
    full = rows.get("full_qat")
    for case in ("lr_qat_r8", "lr_qat_r32", "lr_qat_r8_int8", "lr_qat_r32_int8"):
        r = rows.get(case)
        if not (r and full):
            continue
        rel = r["val_loss"] / full["val_loss"] - 1
        mem = r["memory"]["peak_bytes"] / full["memory"]["peak_bytes"]
        state = (r["memory"]["argument_size_in_bytes"]
                 / full["memory"]["argument_size_in_bytes"])
        ok = rel <= 0.01 and mem <= 1 / 3
        goals.append(f"- {'MET' if ok else 'NOT MET'}: {case} within 1% of full QAT's val "
                     f"loss ({'yes' if rel <= 0.01 else 'no'}: {100 * rel:+.2f}%) at <= 1/3 of "
                     f"its step memory ({'yes' if mem <= 1 / 3 else 'no'}: {mem:.2f}x; "
                     f"arguments alone {state:.2f}x)")
    if rtn is not None:
        trained = {c: r for c, r in rows.items() if c not in ("rtn", "float_ft")}
        worse = [c for c, r in trained.items() if r["val_loss"] >= rtn]
        goals.append(f"- {'MET' if not worse else 'NOT MET'}: every trained method beats RTN "
                     f"PTQ ({rtn:.4f})" + (f"; not: {', '.join(worse)}" if worse else ""))
    ft = rows.get("float_ft")
    if ft and full:
        goals.append(f"- (control) full QAT vs the float model fine-tuned on the same tokens: "
                     f"{100 * (full['val_loss'] / ft['val_loss'] - 1):+.2f}%")
    z = rows.get("zeroqat")
    if z and z.get("forward_memory"):
        ratio = z["memory"]["peak_bytes"] / z["forward_memory"]["peak_bytes"]
        goals.append(f"- {'MET' if ratio <= 1.5 else 'NOT MET'}: ZeroQAT step memory within "
                     f"1.5x of a forward pass ({ratio:.2f}x: "
                     f"{_mb(z['memory']['peak_bytes'])} vs "
                     f"{_mb(z['forward_memory']['peak_bytes'])} MB)")
    return goals


def _plot(path: str, results: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fmt, rows in results["formats"].items():
        for case, r in rows.items():
            peak = r.get("memory", {}).get("peak_bytes")
            if peak:
                ax.scatter(peak / 2**20, r["val_loss"], label=f"{fmt} {case}")
                ax.annotate(case, (peak / 2**20, r["val_loss"]), fontsize=7)
        if "rtn" in rows:
            ax.axhline(rows["rtn"]["val_loss"], ls=":", c="gray", lw=1)
    ax.axhline(results["float_val_loss"], ls="--", c="k", lw=1, label="float base")
    ax.set_xlabel("training step peak memory (MB, memory_analysis)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("W4 fine-tuning of a pretrained byte-level Llama (dotted: RTN PTQ)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--formats", default="w4_row")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--fresh", action="store_true", help="ignore cached case results")
    parser.add_argument("--probe", action="store_true",
                        help=f"first run the learning-rate probe ({PROBE}) at steps / 4")
    args = parser.parse_args(argv)
    size_name = "quick" if args.quick else "full"
    runs = os.path.join("runs", "llm_finetune", "quick") if args.quick else \
        os.path.join("runs", "llm_finetune")
    t_start = time.perf_counter()
    b = Bench(size_name, runs)
    results = {"size": size_name, "sizes": b.size, "machine": machine(),
               "corpus": dataclasses.asdict(b.corpus.info) | {"train_files": None,
                                                              "val_files": None},
               "base": b.base_result, "float_val_loss": b.float_val,
               "non_embedding_params": non_embedding_params(b.base),
               "scale_lr": SCALE_LR, "cases": {c: CASES[c][1] for c in CASES}, "formats": {}}
    md = [f"# QAT of a pretrained LM on a budget ({size_name})", "",
          f"Float base: d={b.size['d_model']}, {b.size['n_layers']} layers, "
          f"{b.size['n_heads']} heads, seq {b.size['seq_len']}, "
          f"{results['non_embedding_params']:,} non-embedding params, pretrained "
          f"{b.size['base_steps']} steps x {b.size['base_batch']} x {b.size['seq_len']} "
          f"tokens by `qjax.train.train_one`; val loss {b.float_val:.4f} nats/byte. Each "
          f"trained case: {b.size['steps']} steps x {b.size['batch_size']} x "
          f"{b.size['seq_len']} tokens. Memory: `memory_analysis()` argument + output + temp "
          "- alias bytes of the compiled step (args: the argument bytes alone).", ""]
    probe_path = os.path.join(runs, size_name, "lr_probe.json")
    if args.probe or os.path.exists(probe_path):
        results["lr_probe"] = lr_probe(b, probe_path)
        md += [f"Learning-rate probe ({results['lr_probe']['steps']} steps, W4 per channel, "
               "val loss): " + ", ".join(f"{k}: {v:.4f}" for k, v in
                                         results["lr_probe"]["val_loss"].items()), ""]
        _use_probe(results["lr_probe"])
        results["cases"] = {c: CASES[c][1] for c in CASES}
    goals_all = []
    for item in args.formats.split(","):
        fmt, _, only = item.partition(":")  # "w4_g32:rtn+full_qat": that format's cases only
        rows = {}
        for case in only.split("+") if only else args.cases.split(","):
            path = os.path.join(runs, size_name, fmt, f"{case}.json")
            if os.path.exists(path) and not args.fresh:
                with open(path) as f:
                    cached = json.load(f)
                if cached.get("lr") == CASES[case][1].get("lr"):  # else: lr changed, rerun
                    rows[case] = cached
                    continue
            t0 = time.perf_counter()
            try:
                rows[case] = run_case(b, case, fmt) | {"seconds": time.perf_counter() - t0}
            except ValueError as e:  # a recipe that refuses the format: reported, not fatal
                print(f"[{fmt}] {case}: {e}", file=sys.stderr, flush=True)
                results.setdefault("refused", {})[f"{fmt} {case}"] = str(e)
                continue
            print(f"[{fmt}] {case}: val {rows[case]['val_loss']:.4f} "
                  f"({rows[case]['seconds']:.0f} s)", file=sys.stderr, flush=True)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(rows[case], f, indent=1)
        results["formats"][fmt] = rows
        table, goals = _table(fmt, rows, b.float_val)
        refused = [f"- {k}: refused ({v})" for k, v in results.get("refused", {}).items()
                   if k.startswith(fmt + " ")]
        md += [table, "", *goals, *refused, ""]
        goals_all += [f"[{fmt}] {g[2:]}" for g in goals]
    results["goals"] = goals_all
    results["seconds"] = time.perf_counter() - t_start
    name = "llm_finetune_quick" if args.quick else "llm_finetune"
    jpath, mpath = write_results(name, results, "\n".join(md) + "\n")
    _plot(os.path.splitext(jpath)[0] + ".png", results)
    print("\n".join(md))
    print(f"wrote {jpath}, {mpath} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
