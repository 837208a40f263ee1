"""Implementation of :mod:`qjax.train` (documented there)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from qjax._src import config_keys
from qjax._src import data as D
from qjax._src.atomic_files import write_json_atomically
from qjax._src.checkpoint import (
    RunDirError,
    TrainingCheckpoints,
    check_run_dir,
)
from qjax._src.config import TrainConfig
from qjax._src.config_keys import RENAMED_FIELDS, load_config, run_identity
from qjax._src.methods import distill, edgeqat, oscillation, zeroqat
from qjax._src.models.llama import non_embedding_params
from qjax._src.nn import double_rounding as DR
from qjax._src.train_report import Progress, label, read_metrics, results_table
from qjax._src.train_setup import (
    ALLOCATION_FILE,
    Placement,
    allocate_widths,
    build_model,
    double_rounding_weights,
    initial_params,
    initial_state,
    load_params,
    method_from_config,
    model_variables,
    optimizer,
    recorded_widths,
    teacher,
    validate,
)

__all__ = ["main", "run", "train_one", "load_corpus", "build_model", "load_params",
           "initialize_distributed", "validate", "run_dir_identity"]


def _scalar(x) -> float:
    """A replicated scalar as a Python float (multi-host arrays are not fully addressable)."""
    return float(np.asarray(x.addressable_shards[0].data))

#: Shaped like :func:`run_dir_identity`: the default of every config field.
IDENTITY_DEFAULTS = {"config": config_keys.identity_defaults()}


def run_dir_identity(config: TrainConfig, corpus: D.Corpus) -> dict:
    """What a run directory of ``config`` on ``corpus`` is a run of (recorded in ``run.json``)."""
    info = corpus.info
    return {"config": run_identity(config),
            "corpus": {"sha256": info.sha256, "train_bytes": info.train_bytes,
                       "val_bytes": info.val_bytes}}


def train_one(config: TrainConfig, corpus: D.Corpus, run_dir: str,
              widths: Mapping[str, int] | None = None) -> dict:
    """Trains one model (float if ``config.quant.method`` is None) and returns its final metrics.

    ``run_dir`` records what it is a run of (:func:`run_dir_identity`); a directory holding a
    run of another config or corpus is refused (:class:`qjax.checkpoint.RunDirError`), and a
    finished run of the same identity returns its recorded result without training.

    With ``config.parallel.mesh`` the step runs sharded (params, quantizer and optimizer state
    placed by :data:`qjax.models.llama.PARTITION_RULES`, batches over the data axes); with
    several processes, only process 0 writes metrics and ``done.json`` (every process takes
    part in checkpoints).
    """
    lead = jax.process_index() == 0
    check_run_dir(run_dir, run_dir_identity(config, corpus), write=lead,
                  defaults=IDENTITY_DEFAULTS, renamed={"config": RENAMED_FIELDS})
    done_path = os.path.join(run_dir, "done.json")
    if os.path.exists(done_path):
        with open(done_path) as f:
            return json.load(f)
    job = _Job.build(config, corpus, run_dir, widths)
    with job.place.context():
        return job.train()


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy of ``logits (batch, seq, vocab)``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _sown(state: Mapping) -> dict[str, list]:
    """EdgeQAT's sown statistics by name (``"entropy"``, ``"scores"``), each a list over the
    layers in a fixed (path) order, from the mutable state of ``apply``."""
    out: dict[str, list] = {"entropy": [], "scores": []}
    flat = traverse_util.flatten_dict(dict(state.get(edgeqat.COLLECTION, {})))
    for path in sorted(flat, key=lambda k: tuple(map(str, k))):
        out.setdefault(path[-1], []).extend(flat[path])
    return out


@dataclasses.dataclass
class _Job:
    """One run: the config, what it builds, and where it writes."""

    config: TrainConfig
    corpus: D.Corpus
    run_dir: str
    model: object
    method: object
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    qat: object
    place: Placement
    state: dict
    # Step arguments that are neither trained nor donated: "fixed", the frozen variables of a
    # low-rank run; "teacher", the float params distilled from. None when unused.
    aux: dict
    teacher_model: object = None

    @classmethod
    def build(cls, config: TrainConfig, corpus: D.Corpus, run_dir: str,
              widths: Mapping[str, int] | None = None) -> _Job:
        model, params, fixed = initial_params(config, widths)
        schedule, qat, tx = optimizer(config, params)
        place = Placement(config, params, tx)
        with place.context():
            state = place.state(initial_state(params, tx, config.optim.seed))
        pair = teacher(config)
        return cls(config, corpus, run_dir, model, method_from_config(config), schedule, tx, qat,
                   place, state, {"fixed": fixed, "teacher": None if pair is None else pair[1]},
                   None if pair is None else pair[0])

    def cross_entropy(self, p, inputs, targets, qat_on, aux, bits=None, key=None):
        """Mean next-byte cross-entropy (at weight width ``bits`` for Double Rounding; ``key``:
        see :meth:`_logits`)."""
        return _cross_entropy(self._logits(p, inputs, qat_on, aux, bits, key), targets)

    def _logits(self, p, inputs, qat_on, aux, bits=None, key=None, collect=False):
        """Logits ``(batch, seq, vocab)`` of ``inputs (batch, seq)``; ``key`` (or None) is the
        ``"quant"`` rng stream that keys a quantized backward (:meth:`quant_key`). ``collect``:
        ``(logits, EdgeQAT's sown statistics)``."""
        kw = {} if bits is None else {"bits": bits}
        if key is not None:
            kw["rngs"] = {"quant": key}
        if collect:
            kw["mutable"] = [edgeqat.COLLECTION]
        out = self.model.apply(model_variables(p, aux["fixed"]), inputs, qat=qat_on, **kw)
        return (out[0], _sown(out[1])) if collect else out

    def quant_key(self, step) -> jax.Array | None:
        """The key of the quantized backward (``backward="int8"``) at ``step`` (an int, traced in
        the jitted step), or None when the run has none (a float run or backward ``"float"``).

        Folded from the seed and the step: new noise every step, the same noise in every run of
        the config and after a resume. ``seed + 4``: ``seed`` keys the init, ``+ 1`` the state's
        RNG, ``+ 2`` ZeroQAT's directions, ``+ 3`` the HAWQ-V2 probes.
        """
        c = self.config
        if self.method is None or c.quant.backward == "float":
            return None
        return jax.random.fold_in(jax.random.key(c.optim.seed + 4), step)

    def loss(self, p, inputs, targets, qat_on, aux, key=None):
        """The training objective: cross-entropy, or with ``distill`` its mix with the KL to the
        float teacher; plus EdgeQAT's terms while QAT is on (:meth:`_edgeqat`); Double Rounding
        averages it over its widths (one forward each, weighted by
        :func:`~qjax._src.train_setup.double_rounding_weights`). ``key`` keys a
        quantized backward (:meth:`quant_key`)."""
        c, o = self.config, self.config.method_options
        guided = qat_on and bool(o.edgeqat_entropy or o.edgeqat_attention)
        need_scores = guided and bool(o.edgeqat_attention)
        teacher_logits = teacher_scores = None
        if aux["teacher"] is not None and (o.distill or need_scores):
            out = self.teacher_model.apply({"params": aux["teacher"]}, inputs,
                                           mutable=[edgeqat.COLLECTION] if need_scores else False)
            teacher_logits = jax.lax.stop_gradient(out[0] if need_scores else out)
            teacher_scores = _sown(out[1])["scores"] if need_scores else None
        elif need_scores:  # the float forward of the current weights
            _, sown = self._logits(jax.lax.stop_gradient(p), inputs, False, aux, collect=True)
            teacher_scores = sown["scores"]

        def at(bits):
            logits = self._logits(p, inputs, qat_on, aux, bits, key, collect=guided)
            logits, sown = logits if guided else (logits, None)
            if o.distill:
                value, _ = distill.distillation_loss(
                    logits, teacher_logits, targets, ce_weight=1.0 - o.distill,
                    kl_weight=o.distill, temperature=o.distill_temperature)
            else:
                value = _cross_entropy(logits, targets)
            return value + self._edgeqat(sown, teacher_scores) if guided else value

        if isinstance(self.method, DR.DoubleRounding) and qat_on:
            return DR.joint_loss(at, self.method.bits, double_rounding_weights(c))
        return at(None)

    def _edgeqat(self, sown: dict, teacher_scores: list | None) -> jax.Array:
        """``edgeqat_entropy * L_ent + edgeqat_attention * L_attn`` (:mod:`qjax.methods.edgeqat`)
        of the statistics the model sowed, the attention terms over the causal entries."""
        c, value = self.config, 0.0
        if c.method_options.edgeqat_entropy:
            value = value + c.method_options.edgeqat_entropy * edgeqat.entropy_loss(sown["entropy"])
        if c.method_options.edgeqat_attention:
            t = sown["scores"][0].shape[-1]
            value = value + c.method_options.edgeqat_attention * edgeqat.attention_map_loss(
                sown["scores"], teacher_scores, jnp.tril(jnp.ones((t, t), bool)))
        return value

    def step_fn(self, qat_on: bool):
        """The train step ``(p, opt_state, inputs, targets, aux, step) -> (p, opt_state, loss)``
        with QAT on or off: AdamW on the gradient (``step`` keys a quantized backward), or for
        ZeroQAT the zeroth-order step (its directions are keyed by its own count)."""
        if self.tx is None:
            c = self.config
            zo = zeroqat.zo_step(lambda p, b: self.loss(p, *b[:2], qat_on, b[2]),
                                 zeroqat.ZeroOrderConfig(self.schedule, eps=c.method_options.zo_eps,
                                                         num_probes=c.method_options.zo_probes))
            key = jax.random.key(c.optim.seed + 2)  # directions from (key, step, probe)

            def zo_train(p, opt_state, inputs, targets, aux, step):
                del step  # the count in opt_state is the step
                count = opt_state["count"]
                p, loss = zo(p, (inputs, targets, aux), key, count)
                return p, {"count": count + 1}, loss

            return zo_train

        def step(p, opt_state, inputs, targets, aux, index):
            loss, grads = jax.value_and_grad(self.loss)(p, inputs, targets, qat_on, aux,
                                                        self.quant_key(index))
            updates, opt_state = self.tx.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss

        return self.place.jit_step(step)

    def evaluator(self):
        """``evaluate(p, qat_on, bits=None) -> mean validation cross-entropy`` over fixed,
        pre-placed batches."""
        fn = jax.jit(self.cross_entropy, static_argnums=(3, 5))
        c = self.config
        val = [self.place.batch_arrays(i, t) for i, t in D.val_batches(
            self.corpus.val, c.optim.batch_size, c.model.max_seq_len, max_batches=c.eval_batches)]
        return lambda p, q, bits=None: float(np.mean(
            [_scalar(fn(p, i, t, q, self.aux, bits)) for i, t in val]))

    def resume(self, store: TrainingCheckpoints, lead: bool) -> tuple[dict, int]:
        """(state, first step): the newest intact checkpoint's, or the initial state's."""
        start = store.latest_intact_step()
        if start is None:
            return self.state, 0
        state = store.restore(start, self.state)
        if lead:
            print(f"[{label(self.config)}] resumed from step {start} ({store.directory})",
                  file=sys.stderr)
        return state, start

    def oscillation(self, opt_state) -> dict:
        """``{"osc_ratio": r}`` for ``method="ofq"``: the fraction of the block kernels' weights
        whose EMA code-flip frequency exceeds 0.005 (Nagel et al. 2022); else ``{}``."""
        if self.config.quant.method != "ofq":
            return {}
        return {"osc_ratio": _scalar(oscillation.oscillation_ratio(opt_state))}

    def train(self) -> dict:
        c, lead = self.config, jax.process_index() == 0
        steps = {True: self.step_fn(True), False: self.step_fn(False)}
        evaluate = self.evaluator()
        store = TrainingCheckpoints(os.path.join(self.run_dir, "ckpt"), lead=lead)
        state, start = self.resume(store, lead)
        metrics_path = os.path.join(self.run_dir, "metrics.jsonl" if lead else os.devnull)
        if lead:
            read_metrics(metrics_path, start)
        p, opt_state = state["params"], state["opt_state"]
        progress = Progress(c.optim.steps, label(c), c.log_every)
        tokens = c.optim.batch_size * c.model.max_seq_len
        t_last, last_val, since = time.perf_counter(), None, 0
        with open(metrics_path, "a") as log:
            for step in range(start, c.optim.steps):
                inputs, targets = D.get_batch(self.corpus.train, step, c.optim.batch_size,
                                              c.model.max_seq_len, c.optim.seed)
                qat_on = self.method is not None and self.qat.enabled(step)
                p, opt_state, loss = steps[qat_on](
                    p, opt_state, *self.place.batch_arrays(inputs, targets), self.aux, step)
                done, since = step + 1, since + 1
                if done % c.log_every == 0 or done == c.optim.steps:
                    loss_v = _scalar(loss)
                    now = time.perf_counter()
                    tok_s = tokens * since / max(now - t_last, 1e-9)
                    t_last, since = now, 0
                    if not math.isfinite(loss_v):
                        raise FloatingPointError(f"loss is {loss_v} at step {done}")
                    log.write(json.dumps({"step": done, "loss": loss_v,
                                          "lr": float(self.schedule(step)),
                                          "tokens_per_s": tok_s, "qat": qat_on,
                                          **self.oscillation(opt_state)}) + "\n")
                    if lead:
                        progress.update(done, loss_v, tok_s)
                if done % c.eval_every == 0 or done == c.optim.steps:
                    last_val = evaluate(p, qat_on)
                    log.write(json.dumps({"step": done, "val_loss": last_val,
                                          "val_ppl": math.exp(last_val)}) + "\n")
                log.flush()
                if done % c.checkpoint_every == 0 or done == c.optim.steps:
                    store.save(done, {"params": p, "opt_state": opt_state, "step": done,
                                      "rng": state["rng"]})
                if since == 0:  # keep evaluation and checkpoint time out of tokens/s
                    t_last = time.perf_counter()
                if c.stop_after is not None and c.stop_after <= done < c.optim.steps:
                    progress.close()
                    print(f"[{label(c)}] stopped after step {done} (stop_after)",
                          file=sys.stderr)
                    store.close()
                    return {"stopped": done}
        progress.close()
        store.close()
        result = {
            "label": label(c), "method": c.quant.method,
            "weight_bits": c.quant.weight_bits if self.method else None,
            "act_bits": c.quant.act_bits if self.method else None,
            "val_loss": last_val, "val_ppl": math.exp(last_val),
            "steps": c.optim.steps, "tokens": c.optim.steps * tokens,
            "non_embedding_params": non_embedding_params(p), **self.oscillation(opt_state),
        }
        if isinstance(self.method, DR.DoubleRounding):  # every width from the one checkpoint
            result["val_loss_at_bits"] = {str(b): evaluate(p, True, b) for b in self.method.bits}
        if lead:
            write_json_atomically(os.path.join(self.run_dir, "done.json"), result)
        return result


def _runs(config: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """(sub-directory, config) of each model ``config`` trains, in order."""
    runs = []
    if config.baseline and config.quant.method is not None:
        runs.append(("float", config_keys.replace(config, method=None)))
    runs.append(("qat" if config.quant.method is not None else "float", config))
    return runs


def _widths(config: TrainConfig, corpus: D.Corpus, run_dir: str, float_dir: str) -> dict:
    """The HAWQ-V2 widths of a ``mixed_precision_budget`` run: recorded in ``run_dir`` (on
    resume), or allocated on the float model (``init_from``, else the baseline just trained)
    and recorded before the first step."""
    recorded = recorded_widths(config, run_dir)
    if recorded is not None:
        return recorded
    float_config = config_keys.replace(config, method=None, init_from=None, distill=0.0,
                                       mixed_precision_budget=None)
    source = config.init_from or float_dir
    allocation = allocate_widths(config, load_params(float_config, source), corpus)
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        write_json_atomically(os.path.join(run_dir, ALLOCATION_FILE),
                          {**allocation, "float_model": os.path.abspath(source)})
        print(f"[{label(config)}] HAWQ-V2 widths ({allocation['average_bits']:.3f} bits on "
              f"average, {allocation['probes']} probes): "
              + ", ".join(f"{k.removesuffix('/kernel')}={b}"
                          for k, b in allocation["widths"].items()), file=sys.stderr)
    return allocation["widths"]


def load_corpus(config: TrainConfig) -> D.Corpus:
    """The corpus ``config`` trains on (``config.data``; :func:`qjax.data.load_corpus`)."""
    return D.load_corpus(config.data)


def run(config: TrainConfig) -> list[dict]:
    """Runs the float baseline (if ``config.baseline``) and the configured model; prints a table.

    Everything that can be checked before training is checked first: the config and its recipe
    on every layer (:func:`validate`), then, once the corpus is read, every run directory's
    identity, so a mistake is reported before the float baseline has trained for minutes.
    """
    validate(config)
    corpus = load_corpus(config)
    D.check_fits(corpus, config.optim.batch_size, config.model.max_seq_len)
    lead = jax.process_index() == 0
    runs = _runs(config)
    for sub, cfg in runs:
        check_run_dir(os.path.join(config.run_dir, sub), run_dir_identity(cfg, corpus),
                      defaults=IDENTITY_DEFAULTS, renamed={"config": RENAMED_FIELDS},
                      write=False)
    if lead:
        print(corpus.info.describe(), file=sys.stderr)
        os.makedirs(config.run_dir, exist_ok=True)
        write_json_atomically(os.path.join(config.run_dir, "config.json"),
                          dataclasses.asdict(config))
    results = []
    for sub, cfg in runs:
        run_dir = os.path.join(config.run_dir, sub)
        widths = None
        if cfg.quant.method is not None and cfg.method_options.mixed_precision_budget is not None:
            widths = _widths(cfg, corpus, run_dir, os.path.join(config.run_dir, "float"))
        r = train_one(cfg, corpus, run_dir, widths)
        if "stopped" in r:
            return results
        results.append(r)
    table = results_table(results, D.unigram_entropy(corpus.val))
    if not lead:
        return results
    n = results[-1]["non_embedding_params"]
    print(f"\n{config.name}: {n:,} non-embedding params, d={config.model.d_model}, "
          f"{config.model.n_layers} layers, seq {config.model.max_seq_len}, "
          f"batch {config.optim.batch_size}, "
          f"{config.optim.steps} steps\n{table}")
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
        validate(config)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e))
    initialize_distributed(config)
    try:
        run(config)
    except RunDirError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def initialize_distributed(config: TrainConfig) -> None:
    """``jax.distributed.initialize`` from the config when it names a coordinator (multi-host).

    ``coordinator_address="auto"`` calls it without arguments: on a TPU pod slice (or under
    SLURM) JAX finds the coordinator, process count and id itself. ``host:port`` with
    ``num_processes`` and ``process_id`` sets them explicitly, e.g. to simulate hosts as processes
    on one machine; CPU processes exchange collectives over gloo.
    """
    if config.parallel.coordinator_address is None:
        return
    if config.parallel.coordinator_address == "auto":
        jax.distributed.initialize()
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=config.parallel.coordinator_address,
                               num_processes=config.parallel.num_processes,
                               process_id=config.parallel.process_id)


if __name__ == "__main__":
    sys.exit(main())
