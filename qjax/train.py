"""The training program: ``python -m qjax.train --config configs/<name>.py [--override k=v ...]``.

Trains the reference Llama-style LM (:mod:`qjax.models.llama`) on byte-level batches of a real
corpus (:mod:`qjax.data`; default: the Python standard library's own sources), with the method of
the config quantizing every linear layer in the blocks. With ``baseline=True`` it first trains the
float model on the same data, then the quantized one, and ends with a table of both.

Per run (``<out_dir>/<float|qat>/``): ``metrics.jsonl`` (train loss, learning rate, tokens/s; and
validation loss and perplexity every ``eval_every`` steps), Orbax checkpoints in ``ckpt/`` every
``checkpoint_every`` steps (params, optimizer state, step and RNG; the data position is the step,
since batch ``k`` is a pure function of ``(seed, k)``), and ``done.json`` at the end. A run that is
killed resumes from its last checkpoint and reproduces the uninterrupted run's losses exactly;
metrics logged after that checkpoint are dropped and recomputed. Orbax writes each checkpoint to a
temporary directory and renames it when complete, so a kill never leaves a half-written one.

``init_from=<run dir of a float run>`` starts from that checkpoint's params (same model sizes):
the float model continues from them, a quantized one gets them through
:func:`qjax.nn.init_from_float` (learned steps recomputed from the pretrained kernels), and
``method=lr_qat`` / ``qalora`` (``rank=``, ``phi_dtype=``; :mod:`qjax.nn.lowrank`, int
``weight_bits`` per output channel, int ``act_bits`` per token) trains the adapters and scales
only: the embedding, norms, LM head and frozen tensors are a fixed step argument, rebuilt from
the checkpoint on resume, and the checkpoints hold the trained params only. ZeroQAT and
distillation are not options of the program (see ``benchmarks/llm_finetune.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qjax import data as D
from qjax import granularity as G
from qjax import optim, sharding
from qjax.config import LOW_RANK_METHODS, TrainConfig, load_config
from qjax.methods import compute_optimal
from qjax.models.llama import (
    BLOCK_LINEARS,
    Llama,
    LlamaConfig,
    non_embedding_params,
    quantization_rules,
)
from qjax.nn import lowrank
from qjax.nn.layout import dense_layout
from qjax.nn.pretrained import init_from_float
from qjax.nn.recipe import Method, resolve
from qjax.nn.rewrite import quantize_model
from qjax.spec import QuantSpec

__all__ = ["main", "run", "train_one", "build_model", "load_params", "initialize_distributed"]


def _method(config: TrainConfig) -> Method | lowrank.LowRankQAT | None:
    if config.method is None:
        return None
    if config.method in LOW_RANK_METHODS:
        weight = QuantSpec(f"int{config.weight_bits}", G.PerRow(0))
        act = QuantSpec(f"int{config.act_bits}", G.PerRow(-1)) if config.act_bits else None
        if config.method == "qalora":
            return lowrank.qalora(weight, act, rank=config.rank)
        return lowrank.lr_qat(weight, act, rank=config.rank, phi_dtype=config.phi_dtype)
    return Method(config.method, weight_bits=config.weight_bits, act_bits=config.act_bits,
                  block_size=config.block_size, trust=config.trust, clip=config.clip,
                  hadamard=config.hadamard, grid=config.grid, estimator=config.estimator,
                  scale=config.scale, integer_forward=config.integer_forward)


def _label(config: TrainConfig) -> str:
    if config.method is None:
        return "float32"
    w = f"W{config.weight_bits}" if config.weight_bits else ""
    a = f"A{config.act_bits}" if config.act_bits else ""
    name = config.method + ("+ste" if config.estimator == "ste" and config.method == "quest"
                            else "")
    if config.scale != "auto":
        name += "+" + config.scale.split(":")[0]
    if config.method in LOW_RANK_METHODS:
        name += f" r{config.rank}" + ("" if config.phi_dtype == "float32"
                                      else f" {config.phi_dtype}")
    return f"{name} {w}{a}"


class _Progress:
    """A one-line progress bar on a terminal; plain lines every ``log_every`` steps otherwise."""

    def __init__(self, total: int, label: str, log_every: int):
        self.total, self.label, self.log_every = total, label, log_every
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, tok_s: float) -> None:
        frac = step / self.total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        line = (f"{self.label:>14} [{bar}] {step}/{self.total} loss {loss:.4f} "
                f"{tok_s:,.0f} tok/s")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif step % self.log_every == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


def _read_metrics(path: str, keep_until: int) -> list[dict]:
    """Rows of ``metrics.jsonl`` up to step ``keep_until``; rewrites the file without the rest."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r["step"] <= keep_until]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)
    return rows


def build_model(config: TrainConfig):
    """The (quantized) reference model of ``config`` and its initial params."""
    model_cfg = LlamaConfig(d_model=config.d_model, n_layers=config.n_layers,
                            n_heads=config.n_heads, max_seq_len=config.seq_len)
    model = quantize_model(Llama(model_cfg), quantization_rules(_method(config)))
    sample = jnp.zeros((1, config.seq_len), jnp.int32)
    return model, model.init(jax.random.key(config.seed), sample)["params"]


def _schedules(config: TrainConfig, params) -> tuple[optax.Schedule, optim.QATSchedule]:
    """The learning-rate schedule and QAT switch of ``config.schedule``; ``params`` gives N for
    ``qat_fraction="optimal"`` (non-embedding parameters: the ones the blocks quantize)."""
    if config.schedule == "cosine":
        return optim.warmup_cosine(config.lr, config.steps, config.warmup_fraction), \
            optim.QATSchedule(config.qat_start if config.qat_start <= 1.0
                              else int(config.qat_start), config.steps)
    fraction = config.qat_fraction
    if fraction == "optimal":
        fraction = compute_optimal.optimal_qat_fraction(
            config.steps * config.batch_size * config.seq_len, non_embedding_params(params),
            config.weight_bits)
    make = (compute_optimal.fused_cooldown if config.schedule == "wsd_fused"
            else compute_optimal.classical_qat)
    return make(config.steps, config.lr, fraction, config.warmup_fraction)


def _optimizer(config: TrainConfig, params):
    schedule, qat = _schedules(config, params)
    tx = optim.qat_adamw(schedule, weight_decay=config.weight_decay, grad_clip=config.grad_clip,
                         quantizer_lr_multiplier=config.quantizer_lr_multiplier)
    return schedule, qat, tx


def _abstract_state(params, tx, seed: int) -> dict:
    state = {"params": params, "opt_state": tx.init(params), "step": 0,
             "rng": jax.random.key_data(jax.random.key(seed + 1))}
    return state


def _ckpt_run_dir(path: str) -> str:
    """A run directory from ``init_from``: the run directory itself or its ``ckpt`` folder."""
    path = os.path.normpath(path)
    if os.path.basename(path) == "ckpt" and not os.path.isdir(os.path.join(path, "ckpt")):
        path = os.path.dirname(path)
    if not os.path.isdir(os.path.join(path, "ckpt")):
        raise FileNotFoundError(f"init_from={path!r} holds no checkpoint (no ckpt/ folder); "
                                "give the run directory of a float run, e.g. runs/<name>/float")
    return path


def _from_pretrained(config: TrainConfig, model):
    """(trainable params, fixed variables or None) of ``config`` starting from the float
    checkpoint ``config.init_from`` (:func:`qjax.nn.init_from_float`, which also recomputes
    learned steps such as LSQ's from the pretrained kernels); for the low-rank
    methods only the adapters and scales are trained, the rest of the params and the frozen
    tensors are fixed (rebuilt from the checkpoint on resume, never saved)."""
    float_config = dataclasses.replace(config, method=None, init_from=None, schedule="cosine",
                                       qat_fraction=None, qat_start=0.0, mesh=None)
    base = load_params(float_config, _ckpt_run_dir(config.init_from))
    sample = jnp.zeros((1, config.seq_len), jnp.int32)
    variables = model.init(jax.random.key(config.seed), sample)
    if config.method is None:
        if jax.tree.structure(base) != jax.tree.structure(variables["params"]):
            raise ValueError(f"init_from={config.init_from!r} does not match the model")
        return base, None
    variables = init_from_float(model, variables, base)
    if config.method not in LOW_RANK_METHODS:
        return variables["params"], None
    flat = traverse_util.flatten_dict(variables["params"])
    adapter = {k: v for k, v in flat.items() if k[-1] in ("lora_down", "lora_up",
                                                          "kernel_scale")}
    rest = {k: v for k, v in flat.items() if k not in adapter}
    fixed = {"params": rest, "collections": {k: v for k, v in variables.items()
                                             if k != "params"}}
    return traverse_util.unflatten_dict(adapter), fixed


def _variables(p, fixed) -> dict:
    """The model's variables: ``{"params": p}``, or the trained ``p`` with the fixed tree."""
    if fixed is None:
        return {"params": p}
    flat = {**traverse_util.flatten_dict(p), **fixed["params"]}
    return {**fixed["collections"], "params": traverse_util.unflatten_dict(flat)}


def _initial_params(config: TrainConfig):
    """(model, initial trained params, fixed variables or None) of ``config``."""
    model, params = build_model(config)
    if config.init_from is None:
        return model, params, None
    return (model, *_from_pretrained(config, model))


def load_params(config: TrainConfig, run_dir: str):
    """Params of the latest checkpoint in ``run_dir/ckpt`` (a run of ``config``; with
    ``init_from`` and a low-rank method, the trained adapters and scales only)."""
    _, params, _ = _initial_params(config)
    _, _, tx = _optimizer(config, params)
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, "ckpt")))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}/ckpt")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      _abstract_state(params, tx, config.seed))
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    manager.close()
    return restored["params"]


class _Placement:
    """Where arrays live: one device, or a mesh from ``config.mesh`` (:mod:`qjax.sharding`)."""

    def __init__(self, config: TrainConfig, params, tx):
        self.mesh = None
        if config.mesh is None:
            return
        self.mesh = sharding.make_mesh(config.mesh, axis_types=config.mesh_axis_types)
        sharding.check_batch(config.batch_size, self.mesh)
        self.param_specs = sharding.param_specs(params, self.mesh, sharding.LLAMA_RULES)
        method = _method(config)
        if method is not None:
            lq = resolve(method, dense_layout((config.d_model, config.d_model)))
            block = lq.rotation[0] if lq.rotation else getattr(lq.weight, "hadamard", None)
            if block:
                sharding.check_hadamard_blocks(params, self.param_specs, self.mesh, block,
                                               BLOCK_LINEARS + "/kernel")
        self.opt_specs = sharding.opt_state_specs(tx, params, self.param_specs)
        self.batch = NamedSharding(self.mesh, sharding.batch_spec(self.mesh))

    def state(self, state: dict) -> dict:
        if self.mesh is None:
            return state
        placed = sharding.put((state["params"], state["opt_state"]),
                              self.shardings((self.param_specs, self.opt_specs)))
        return {**state, "params": placed[0], "opt_state": placed[1]}

    def shardings(self, specs):
        return sharding.named_shardings(specs, self.mesh)

    def jit_step(self, fn):
        """``fn(p, opt_state, inputs, targets) -> (p, opt_state, loss)`` jitted; on a mesh the
        outputs keep the params' and optimizer state's shardings."""
        if self.mesh is None:
            return jax.jit(fn, donate_argnums=(0, 1))
        out = self.shardings((self.param_specs, self.opt_specs, P()))
        return jax.jit(fn, donate_argnums=(0, 1), out_shardings=out)

    def batch_arrays(self, *arrays):
        if self.mesh is None:
            return tuple(jnp.asarray(a) for a in arrays)
        return tuple(sharding.put(a, self.batch) for a in arrays)

    def context(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)


def _scalar(x) -> float:
    """A replicated scalar as a Python float (multi-host arrays are not fully addressable)."""
    return float(np.asarray(x.addressable_shards[0].data))


def train_one(config: TrainConfig, corpus: D.Corpus, run_dir: str) -> dict:
    """Trains one model (float if ``config.method`` is None) and returns its final metrics.

    With ``config.mesh`` the step runs sharded (params, quantizer and optimizer state placed by
    :data:`qjax.sharding.LLAMA_RULES`, batches over the data axes); with several processes, only
    process 0 writes metrics and ``done.json`` (every process takes part in checkpoints).
    """
    done_path = os.path.join(run_dir, "done.json")
    if os.path.exists(done_path):
        with open(done_path) as f:
            return json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    method = _method(config)
    model, params, fixed = _initial_params(config)
    schedule, qat, tx = _optimizer(config, params)
    place = _Placement(config, params, tx)
    with place.context():
        return _train_loop(config, corpus, run_dir, model, method, schedule, tx, qat, place,
                           place.state(_abstract_state(params, tx, config.seed)), fixed)


def _train_loop(config, corpus, run_dir, model, method, schedule, tx, qat, place, state,
                fixed=None):
    done_path = os.path.join(run_dir, "done.json")
    lead = jax.process_index() == 0
    extra = () if fixed is None else (fixed,)  # fixed variables: a step argument, not donated

    def loss_fn(p, inputs, targets, qat_on, *fx):
        logits = model.apply(_variables(p, fx[0] if fx else None), inputs, qat=qat_on)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def make_step(qat_on: bool):
        def step_fn(p, opt_state, inputs, targets, *fx):
            loss, grads = jax.value_and_grad(loss_fn)(p, inputs, targets, qat_on, *fx)
            updates, opt_state = tx.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss

        return place.jit_step(step_fn)

    steps = {True: make_step(True), False: make_step(False)}
    eval_fns = {q: jax.jit(lambda p, i, t, *fx, q=q: loss_fn(p, i, t, q, *fx))
                for q in (True, False)}
    # Placed once: every evaluation reuses the same validation batches.
    val = [place.batch_arrays(i, t) for i, t in D.val_batches(
        corpus.val, config.batch_size, config.seq_len, max_batches=config.eval_batches)]

    def evaluate(p, qat_on: bool) -> float:
        losses = [_scalar(eval_fns[qat_on](p, i, t, *extra)) for i, t in val]
        return float(np.mean(losses))

    ckpt_dir = os.path.abspath(os.path.join(run_dir, "ckpt"))
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True))
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
        state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        if lead:
            print(f"[{_label(config)}] resumed from step {start} ({ckpt_dir})", file=sys.stderr)
    metrics_path = os.path.join(run_dir, "metrics.jsonl" if lead else os.devnull)
    if lead:
        _read_metrics(metrics_path, start)
    p, opt_state = state["params"], state["opt_state"]
    progress = _Progress(config.steps, _label(config), config.log_every)
    tokens = config.batch_size * config.seq_len
    t_last, last_val, since = time.perf_counter(), None, 0
    with open(metrics_path, "a") as log:
        for step in range(start, config.steps):
            inputs, targets = D.get_batch(corpus.train, step, config.batch_size, config.seq_len,
                                          config.seed)
            qat_on = method is not None and qat.enabled(step)
            p, opt_state, loss = steps[qat_on](p, opt_state,
                                               *place.batch_arrays(inputs, targets), *extra)
            done, since = step + 1, since + 1
            if done % config.log_every == 0 or done == config.steps:
                loss_v = _scalar(loss)
                now = time.perf_counter()
                tok_s = tokens * since / max(now - t_last, 1e-9)
                t_last, since = now, 0
                if not math.isfinite(loss_v):
                    raise FloatingPointError(f"loss is {loss_v} at step {done}")
                log.write(json.dumps({"step": done, "loss": loss_v, "lr": float(schedule(step)),
                                      "tokens_per_s": tok_s, "qat": qat_on}) + "\n")
                if lead:
                    progress.update(done, loss_v, tok_s)
            if done % config.eval_every == 0 or done == config.steps:
                last_val = evaluate(p, qat_on)
                log.write(json.dumps({"step": done, "val_loss": last_val,
                                      "val_ppl": math.exp(last_val)}) + "\n")
            log.flush()
            if done % config.checkpoint_every == 0 or done == config.steps:
                manager.save(done, args=ocp.args.StandardSave(
                    {"params": p, "opt_state": opt_state, "step": done, "rng": state["rng"]}))
                manager.wait_until_finished()
            if since == 0:  # keep evaluation and checkpoint time out of tokens/s
                t_last = time.perf_counter()
            if config.stop_after is not None and done >= config.stop_after and \
                    done < config.steps:
                progress.close()
                print(f"[{_label(config)}] stopped after step {done} (stop_after)",
                      file=sys.stderr)
                manager.close()
                return {"stopped": done}
    progress.close()
    manager.close()
    result = {
        "label": _label(config), "method": config.method,
        "weight_bits": config.weight_bits if method else None,
        "act_bits": config.act_bits if method else None,
        "val_loss": last_val, "val_ppl": math.exp(last_val),
        "steps": config.steps, "tokens": config.steps * tokens,
        "non_embedding_params": non_embedding_params(p),
    }
    if lead:
        tmp = done_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, done_path)
    return result


def _table(results: list[dict], entropy: float) -> str:
    base = next((r["val_loss"] for r in results if r["method"] is None), None)
    lines = ["| model | val loss (nats/byte) | val ppl | vs float | tokens |",
             "|---|---|---|---|---|"]
    for r in results:
        gap = "" if base is None or r["method"] is None else \
            f"{100 * (r['val_loss'] / base - 1):+.1f}%"
        lines.append(f"| {r['label']} | {r['val_loss']:.4f} | {r['val_ppl']:.3f} | {gap} | "
                     f"{r['tokens']:,} |")
    lines.append(f"| unigram entropy of val bytes | {entropy:.4f} | {math.exp(entropy):.3f} | | |")
    return "\n".join(lines)


def run(config: TrainConfig) -> list[dict]:
    """Runs the float baseline (if ``config.baseline``) and the configured model; prints a table."""
    corpus = D.load_corpus(D.CorpusConfig(paths=config.corpus_paths,
                                          max_bytes=config.max_corpus_bytes,
                                          val_fraction=config.val_fraction))
    lead = jax.process_index() == 0
    if lead:
        print(corpus.info.describe(), file=sys.stderr)
        os.makedirs(config.run_dir, exist_ok=True)
        with open(os.path.join(config.run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(config), f, indent=1)
    configs = []
    if config.baseline and config.method is not None:
        configs.append(("float", dataclasses.replace(config, method=None)))
    configs.append(("qat" if config.method is not None else "float", config))
    results = []
    for sub, cfg in configs:
        r = train_one(cfg, corpus, os.path.join(config.run_dir, sub))
        if "stopped" in r:
            return results
        results.append(r)
    table = _table(results, D.unigram_entropy(corpus.val))
    if not lead:
        return results
    n = results[-1]["non_embedding_params"]
    print(f"\n{config.name}: {n:,} non-embedding params, d={config.d_model}, "
          f"{config.n_layers} layers, seq {config.seq_len}, batch {config.batch_size}, "
          f"{config.steps} steps\n{table}")
    with open(os.path.join(config.run_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qjax.train",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="a configs/<name>.py file (get_config())")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config fields, e.g. steps=100 method=lsq")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.override)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e))
    initialize_distributed(config)
    run(config)
    return 0


def initialize_distributed(config: TrainConfig) -> None:
    """``jax.distributed.initialize`` from the config when it names a coordinator (multi-host).

    ``coordinator_address="auto"`` calls it without arguments: on a TPU pod slice (or under
    SLURM) JAX finds the coordinator, process count and id itself. ``host:port`` with
    ``num_processes`` and ``process_id`` sets them explicitly, e.g. to simulate hosts as processes
    on one machine; CPU processes exchange collectives over gloo.
    """
    if config.coordinator_address is None:
        return
    if config.coordinator_address == "auto":
        jax.distributed.initialize()
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=config.coordinator_address,
                               num_processes=config.num_processes,
                               process_id=config.process_id)


if __name__ == "__main__":
    sys.exit(main())
