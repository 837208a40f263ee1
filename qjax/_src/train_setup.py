"""What a :class:`~qjax.config.TrainConfig` builds: the quantized reference model, its method,
learning-rate schedule and QAT switch, optimizer, initial state, and where arrays live.

Used by the training program (:mod:`qjax.train`) and by anything that needs the exact model of a
run, e.g. to reload its checkpoint (:func:`load_params`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qjax._src import config_keys, optim, sharding
from qjax._src import data as D
from qjax._src import granularity as G
from qjax._src.attention import AttentionQuant, attention_quant
from qjax._src.checkpoint import RunDirError, TrainingCheckpoints
from qjax._src.config import LOW_RANK_METHODS, TrainConfig
from qjax._src.methods import compute_optimal, ofq
from qjax._src.models.llama import (
    BLOCK_LINEARS,
    PARTITION_RULES,
    Llama,
    non_embedding_params,
    quantization_rules,
)
from qjax._src.nn import double_rounding as DR
from qjax._src.nn import lowrank
from qjax._src.nn.layout import dense_layout
from qjax._src.nn.pretrained import init_from_float
from qjax._src.nn.recipe import Method, resolve
from qjax._src.nn.rewrite import quantize_model
from qjax._src.precision import allocate as precision_allocate
from qjax._src.precision import hessian as precision_hessian
from qjax._src.spec import QuantSpec

__all__ = ["method_from_config", "double_rounding_weights",
           "build_model", "schedules", "optimizer", "initial_state",
           "initial_params", "model_variables", "load_params", "Placement",
           "validate", "teacher", "allocate_widths", "recorded_widths", "ALLOCATION_FILE",
           "attention_from_config", "block_kernel_mask", "ofq_transforms"]


def method_from_config(config: TrainConfig
                       ) -> Method | lowrank.LowRankQAT | DR.DoubleRounding | None:
    """The layer recipe of ``config.quant`` (None for a float run); for ``zeroqat`` the lsq
    recipe of the model it trains."""
    q, options = config.quant, config.method_options
    if q.method is None:
        return None

    def act():  # int activations per token, for the methods that are not a Method
        return QuantSpec(f"int{q.act_bits}", G.PerRow(-1)) if q.act_bits else None

    if q.method == "zeroqat":  # the model ZeroQAT trains: learned steps, as full QAT's
        return Method("lsq", weight_bits=q.weight_bits, act_bits=q.act_bits)
    if q.method == "double_rounding":
        return DR.DoubleRounding(bits=options.double_rounding_bits, activation=act())
    if q.method in LOW_RANK_METHODS:
        weight = QuantSpec(f"int{q.weight_bits}", G.PerRow(0))
        if q.method == "qalora":
            return lowrank.qalora(weight, act(), rank=options.rank)
        return lowrank.lr_qat(weight, act(), rank=options.rank, phi_dtype=options.phi_dtype)
    # QuantConfig holds Method's fields under Method's names (the method's name aside).
    fields = {f.name: getattr(q, f.name) for f in dataclasses.fields(q) if f.name != "method"}
    return Method(q.method, **fields)


def double_rounding_weights(config: TrainConfig) -> tuple[float, ...]:
    """Double Rounding's loss weight per width of the recipe's ``bits`` (highest first): the
    config's ``double_rounding_weights`` (given in the order of ``double_rounding_bits``), else
    equal; normalized to sum 1 (the joint objective is a weighted mean of the widths' losses)."""
    o = config.method_options
    given = o.double_rounding_weights or (1.0,) * len(o.double_rounding_bits)
    by_bits = dict(zip(o.double_rounding_bits, given, strict=True))
    total = sum(given)
    return tuple(by_bits[b] / total for b in sorted(by_bits, reverse=True))


def validate(config: TrainConfig) -> None:
    """Checks everything about ``config`` that can fail before any data is read or any step is
    run: the model sizes, the method and its recipe resolved on every linear layer's kernel
    (a Hadamard block or group that does not divide K names the layer), the schedule.

    Raises:
      ValueError / TypeError: naming the field or layer.
    """
    mc = config.model
    method = method_from_config(config)
    for name, shape in (("attention and output projections", (mc.d_model, mc.d_model)),
                        ("mlp gate/up", (mc.d_model, mc.ffn_hidden)),
                        ("mlp down", (mc.ffn_hidden, mc.d_model))):
        try:
            if isinstance(method, Method):
                resolve(method, dense_layout(shape), name)
            elif isinstance(method, DR.DoubleRounding):
                method.layer_quant(dense_layout(shape), name)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{e} (d_model={config.model.d_model})") from None
    if config.quant.method is not None and config.optim.schedule != "cosine":
        # The model's own N, from its parameter shapes (nothing is initialized).
        sample = jax.ShapeDtypeStruct((1, config.model.max_seq_len), jnp.int32)
        shapes = jax.eval_shape(model_from_config(config).init, jax.random.key(0),
                                sample)["params"]
        schedules(config, non_embedding_params(shapes))


def attention_from_config(config: TrainConfig) -> AttentionQuant | None:
    """The reference Llama's attention quantization (``config.attention``), or None: float
    attention (also for a float run)."""
    a = config.attention
    if config.quant.method is None or not a.enabled:
        return None
    return attention_quant(a.attn_bits, a.attn_prob_bits, a.kv_bits, a.kv_group,
                           low_bits=a.attn_low_bits, low_fraction=a.attn_low_fraction)


def model_from_config(config: TrainConfig, widths: Mapping[str, int] | None = None):
    """The (quantized) reference model of ``config``; ``widths`` (``{kernel path: weight
    bits}``, from :func:`allocate_widths`) sets each layer's width."""
    method = method_from_config(config)
    rules = quantization_rules(method) if widths is None else \
        precision_allocate.rules_from_allocation(widths, method)
    return quantize_model(Llama(config.model, attention=attention_from_config(config)),
                          rules)


def build_model(config: TrainConfig, widths: Mapping[str, int] | None = None):
    """The model of :func:`model_from_config` and its initial params."""
    model = model_from_config(config, widths)
    sample = jnp.zeros((1, config.model.max_seq_len), jnp.int32)
    return model, model.init(jax.random.key(config.optim.seed), sample)["params"]


def schedules(config: TrainConfig, n_params: int) -> tuple[optax.Schedule, optim.QATSchedule]:
    """The learning-rate schedule and QAT switch of ``config.optim.schedule``; ``n_params`` is N for
    ``qat_fraction="optimal"`` (the model's non-embedding parameters: the ones the blocks
    quantize, :func:`qjax.models.llama.non_embedding_params`)."""
    o = config.optim
    if o.schedule == "cosine":
        return optim.warmup_cosine(o.lr, o.steps, o.warmup_fraction), \
            optim.QATSchedule(o.qat_start if o.qat_start <= 1.0 else int(o.qat_start), o.steps)
    fraction = o.qat_fraction
    if fraction == "optimal":
        fraction = compute_optimal.optimal_qat_fraction(
            o.steps * o.batch_size * config.model.max_seq_len, n_params, config.quant.weight_bits)
    make = (compute_optimal.fused_cooldown if o.schedule == "wsd_fused"
            else compute_optimal.classical_qat)
    return make(o.steps, o.lr, fraction, o.warmup_fraction)


def optimizer(config: TrainConfig, params):
    """(lr schedule, QAT switch, optax transformation); the transformation is None for
    ``method="zeroqat"``, whose zeroth-order step (:func:`qjax.methods.zeroqat.zo_step`) is
    built by the training loop around its loss."""
    schedule, qat = schedules(config, non_embedding_params(params))
    if config.quant.method == "zeroqat":
        return schedule, qat, None
    o = config.optim
    tx = optim.qat_adamw(schedule, weight_decay=o.weight_decay, grad_clip=o.grad_clip,
                         quantizer_lr_multiplier=o.quantizer_lr_multiplier)
    if config.quant.method == "ofq":
        tx = optax.chain(tx, *ofq_transforms(config))
    return schedule, qat, tx


def block_kernel_mask(params):
    """True on the kernels of the blocks' linear layers (the ones the method quantizes)."""
    kernel = re.compile(BLOCK_LINEARS + "/kernel")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: kernel.fullmatch("/".join(str(k.key) for k in path)) is not None, params)


def ofq_transforms(config: TrainConfig) -> list[optax.GradientTransformation]:
    """After the optimizer of ``method="ofq"``: the oscillation tracker of the block kernels'
    StatsQ codes (read by :func:`qjax.methods.oscillation.oscillation_ratio`), then, with
    ``cga_boundary_range``, confidence-guided annealing from step ``round(cga_start * steps)``
    (last, so that frozen weights stay bit for bit)."""
    out = [ofq.track_oscillations(config.quant.weight_bits, mask=block_kernel_mask)]
    o = config.method_options
    if o.cga_boundary_range is not None:
        out.append(ofq.confidence_guided_annealing(
            o.cga_boundary_range, config.quant.weight_bits, mask=block_kernel_mask,
            start_step=round(o.cga_start * config.optim.steps)))
    return out


def initial_state(params, tx, seed: int) -> dict:
    """The checkpointed state: params, optimizer state (for ZeroQAT, ``tx=None``, the step
    count its directions are drawn from), step and RNG."""
    opt_state = {"count": jnp.zeros((), jnp.int32)} if tx is None else tx.init(params)
    state = {"params": params, "opt_state": opt_state, "step": 0,
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


def _float_config(config: TrainConfig) -> TrainConfig:
    """The config of the float run ``config.init_from`` holds (same model sizes)."""
    return config_keys.replace(config, method=None, init_from=None, schedule="cosine",
                               qat_fraction=None, qat_start=0.0, mesh=None, distill=0.0)


def _from_pretrained(config: TrainConfig, model):
    """(trainable params, fixed variables or None) of ``config`` starting from the float
    checkpoint ``config.init_from`` (:func:`qjax.nn.init_from_float`, which also recomputes
    learned steps such as LSQ's from the pretrained kernels); for the low-rank
    methods only the adapters and scales are trained, the rest of the params and the frozen
    tensors are fixed (rebuilt from the checkpoint on resume, never saved)."""
    base = load_params(_float_config(config), _ckpt_run_dir(config.init_from))
    sample = jnp.zeros((1, config.model.max_seq_len), jnp.int32)
    variables = model.init(jax.random.key(config.optim.seed), sample)
    if config.quant.method is None:
        if jax.tree.structure(base) != jax.tree.structure(variables["params"]):
            raise ValueError(f"init_from={config.init_from!r} does not match the model")
        return base, None
    variables = init_from_float(model, variables, base)
    if config.quant.method not in LOW_RANK_METHODS:
        return variables["params"], None
    flat = traverse_util.flatten_dict(variables["params"])
    adapter = {k: v for k, v in flat.items() if k[-1] in ("lora_down", "lora_up",
                                                          "kernel_scale")}
    rest = {k: v for k, v in flat.items() if k not in adapter}
    fixed = {"params": rest, "collections": {k: v for k, v in variables.items()
                                             if k != "params"}}
    return traverse_util.unflatten_dict(adapter), fixed


def teacher(config: TrainConfig):
    """(float model, params) of the ``init_from`` float checkpoint when the loss reads a teacher
    (``distill > 0``, or ``edgeqat_attention > 0`` with ``init_from``), else None; a step
    argument, rebuilt from the checkpoint on resume."""
    o = config.method_options
    if config.quant.method is None or not (o.distill or (o.edgeqat_attention and config.init_from)):
        return None
    float_config = _float_config(config)
    return (Llama(config.model),
            load_params(float_config, _ckpt_run_dir(config.init_from)))


def model_variables(p, fixed) -> dict:
    """The model's variables: ``{"params": p}``, or the trained ``p`` with the fixed tree."""
    if fixed is None:
        return {"params": p}
    flat = {**traverse_util.flatten_dict(p), **fixed["params"]}
    return {**fixed["collections"], "params": traverse_util.unflatten_dict(flat)}


def initial_params(config: TrainConfig, widths: Mapping[str, int] | None = None):
    """(model, initial trained params, fixed variables or None) of ``config``."""
    model, params = build_model(config, widths)
    if config.init_from is None:
        return model, params, None
    return (model, *_from_pretrained(config, model))


def load_params(config: TrainConfig, run_dir: str):
    """Params of the latest checkpoint in ``run_dir/ckpt`` (a run of ``config``; with
    ``init_from`` and a low-rank method, the trained adapters and scales only)."""
    _, params, _ = initial_params(config, recorded_widths(config, run_dir))
    _, _, tx = optimizer(config, params)
    ckpt = os.path.join(run_dir, "ckpt")
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"no checkpoint in {ckpt}")
    store = TrainingCheckpoints(ckpt, create=False, max_to_keep=None)
    try:
        step = store.latest_intact_step(move_aside=False)
        if step is None:
            raise RunDirError(f"no intact checkpoint in {ckpt} (steps {store.steps()})")
        return store.restore(step, initial_state(params, tx, config.optim.seed))["params"]
    finally:
        store.close()


class Placement:
    """Where arrays live: one device, or a mesh from ``config.parallel.mesh``
    (:mod:`qjax.sharding`)."""

    def __init__(self, config: TrainConfig, params, tx):
        self.mesh = None
        if config.parallel.mesh is None:
            return
        self.mesh = sharding.make_mesh(config.parallel.mesh,
                                       axis_types=config.parallel.mesh_axis_types)
        sharding.check_batch(config.optim.batch_size, self.mesh)
        self.param_specs = sharding.param_specs(params, self.mesh, PARTITION_RULES)
        method = method_from_config(config)
        if method is not None:
            lq = resolve(method, dense_layout((config.model.d_model, config.model.d_model)))
            block = lq.rotation[0] if lq.rotation else getattr(lq.weight, "hadamard_block", None)
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
        """``fn(p, opt_state, inputs, targets, *rest) -> (p, opt_state, loss)`` jitted, ``p`` and
        ``opt_state`` donated; on a mesh the outputs keep the params' and optimizer state's
        shardings."""
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




ALLOCATION_FILE = "allocation.json"


def recorded_widths(config: TrainConfig, run_dir: str) -> dict[str, int] | None:
    """The widths a ``mixed_precision_budget`` run recorded in ``run_dir/allocation.json``."""
    if config.method_options.mixed_precision_budget is None:
        return None
    path = os.path.join(run_dir, ALLOCATION_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {k: int(v) for k, v in json.load(f)["widths"].items()}


def allocate_widths(config: TrainConfig, float_params, corpus: D.Corpus) -> dict:
    """HAWQ-V2 widths for ``config.method_options.mixed_precision_budget`` on the float model
    ``float_params``.

    Hessian traces of the float model's mean cross-entropy over 2 training batches drawn at
    steps ``10**6 + k`` (never a training step), Hutchinson with Rademacher probes (10 to 50,
    1% tolerance; key from the seed); ``Omega_l(b) = Tr(H_l)/n_l ||Q_b(W_l) - W_l||^2`` with
    absmax per output channel; the exact minimizer of ``sum_l Omega_l(b_l)`` under
    ``sum_l n_l b_l <= budget * sum_l n_l`` among ``mixed_precision_bits``.

    Returns:
      ``{"widths": {kernel path: bits}, "traces": ..., "probes": ..., "average_bits": ...}``
      (JSON-able: what ``allocation.json`` holds).

    References:
      Dong et al., 2020. HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural
      Networks. NeurIPS.
    """
    model = Llama(config.model)
    batches = [tuple(jnp.asarray(a) for a in D.get_batch(
        corpus.train, 10**6 + k, config.optim.batch_size, config.model.max_seq_len,
        config.optim.seed))
        for k in range(2)]

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    kernel = re.compile(BLOCK_LINEARS + "/kernel")
    traces = precision_hessian.hessian_traces(
        loss_fn, float_params, batches, jax.random.key(config.optim.seed + 3),
        layers=lambda path: kernel.fullmatch(path) is not None, tol=1e-2, min_probes=10,
        max_probes=50)
    table = precision_hessian.sensitivity(float_params, traces,
                                          bits=config.method_options.mixed_precision_bits)
    total = sum(table.size_map.values())
    budget = config.method_options.mixed_precision_budget * total / 8
    alloc = precision_allocate.allocate(table, budget_bytes=budget)
    widths = {k: int(v) for k, v in alloc.bits.items()}
    return {"widths": widths, "traces": {t.path: t.trace for t in traces.layers},
            "probes": traces.probes,
            "average_bits": sum(widths[k] * table.size_map[k] for k in widths) / total}
