"""Cost of one jitted QAT training step (forward, backward, AdamW) of three decoder models.

Every case trains its model on one batch of random byte ids with ``qjax.optim.qat_adamw(1e-3,
weight_decay=0.1)`` and a softmax cross-entropy loss; only the linear layers inside the blocks are
quantized (embedding, norms, attention core and LM head stay float). Each model has its own
table, its times are interleaved medians of its cases at one shape, and ratios are to its own
float step.

**Reference Llama** (Linen ``qjax.models.Llama``; ``blocks_<i>/attn/{q,k,v,o}``,
``blocks_<i>/mlp/{gate,up,down}`` are ``nn.Dense``), batch 8 x seq 256:

* ``float32``: the plain model, the baseline (ratio 1.00).
* ``qjax QuEST W4A4``: ``Method("quest", 4, 4)`` (Hadamard rotations, RMS scales, trust).
* ``qjax int8 W8A8``: int8 absmax weights per output channel, int8 per token inputs, STE.
* ``qjax int4 weight-only``: int4 absmax weights per group of 128 along K, STE.
* ``... (int8 forward)``: the same QuEST W4A4 and int8 W8A8 with ``integer_forward=True``: the
  forward matmul is an int8 x int8 -> int32 ``dot_general`` with the fake-quant values and
  gradients (``qjax._src.qdot``); QuEST's 4-bit midrise codes are stored as odd int8 integers.
* ``... (int8 fwd + int8 bwd)``: also ``backward="int8"``: both gradient matmuls are int8 x int8
  -> int32 dots on the forward's codes and the output gradient stochastically rounded to int8
  (``qjax._src.quantized_backward``), keyed by the ``"quant"`` rng stream (a fixed key here; a
  training loop folds in the step).
* ``Qwix int8 W8A8`` (and ``quantized bwd``: gradients int8 too), ``Qwix int4 weight-only``
  (tile 128 along K): ``qwix.quantize_model`` with a ``QtProvider``.
* ``AQT int8 W8A8``: AQT v2 ``AqtDotGeneral(config_v4(fwd_bits=8, dlhs_bits=None,
  drhs_bits=None))`` set as the ``dot_general_cls`` of the block linears through
  ``nn.intercept_methods`` (each matched ``Dense`` runs as a child clone with that field set,
  same shapes; parameters nest one level deeper under ``aqt``). ``AQT int8 (quantized bwd)``:
  ``config_v4(fwd_bits=8, dlhs_bits=8, drhs_bits=8)``, both gradient dots int8 too.

**NNX transformer blocks** (``_bench_models.NnxLM``: ``nnx.LinearGeneral`` q/k/v/o heads,
``nnx.Linear`` SwiGLU; paths ``blocks/<i>/attn/{q,k,v,o}``, ``blocks/<i>/mlp/{gate,up,down}``)
and **Gemma-style Einsum** (Linen ``_bench_models.EinsumLM``: ``nn.Einsum`` q/k/v/o,
``nn.DenseGeneral`` fused ``mlp/gate_up`` and ``mlp/down``), each at batch 8 x seq 256 and
batch 8 x seq 32:

* ``float32``: the same model unquantized, the baseline.
* ``qjax QuEST W4A4``, ``qjax QuEST W4A4 (int8 forward)``: ``Method("quest", 4, 4)`` without and
  with ``integer_forward=True`` (Einsum / DenseGeneral / LinearGeneral forwards as int8 dots).
* ``qjax int8 W8A8 (int8 forward)``: ``Method("ste", 8, 8, integer_forward=True)``; ``(int8 fwd +
  int8 bwd)`` rows add ``backward="int8"`` (NNX: ``set_quant_rngs(model, nnx.Rngs(quant=0))``).
* ``Qwix int8 W8A8``, ``Qwix int8 (quantized bwd)``: a ``QtProvider`` rule (int8 weights and
  activations; ``bwd_qtype="int8"`` too) on the same paths; ``qwix.quantize_model(model,
  provider, ids)`` for NNX (a quantized clone, run once on example ids), ``(model, provider)``
  for Linen.

qjax quantizes both with ``qjax.nn.quantize_model(model, rules)``: the NNX model in place (each
matched layer wrapped), the Linen one as an object with ``init`` / ``apply``. The NNX model trains
as NNX code does: ``nnx.Optimizer(model, qat_adamw(...), wrt=nnx.Param)`` and an ``nnx.jit``
step that updates model and optimizer in place (each timed call is one more training step, and
``nnx.jit``'s Python-side graph handling is part of its time); the Linen models run a functional
``jax.jit`` step from a fixed state.

External cases are optional: a failure is recorded as ``n/a (reason)`` instead of crashing.

Sizes: d_model 256, 4 layers, 4 heads x 64, MLP hidden 768, vocab 256. Run: ``python
benchmarks/qat_step.py [--repeats 20] [--quick] [--models llama,nnx_blocks,gemma_einsum]``
(``--quick``: d_model 128, 2 layers, 4 heads x 32, hidden 384, batch 4, 5 repeats; ``--models``:
the tables to run, all by default). Writes ``results/qat_step.{json,md}`` (the Llama results
at the top level of the JSON as before, the other two under ``models``). CPU ratios from one
run are what to compare; absolute times vary between runs and machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import qjax
from qjax.models import Llama, LlamaConfig, quantization_rules
from qjax.models.llama import BLOCK_LINEARS
from qjax.nn import LayerQuant, Method, quantize_model
from qjax.nn.nnx import set_quant_rngs

try:
    from benchmarks._bench_models import EINSUM_LINEARS, NNX_LINEARS, BlockConfig, EinsumLM, NnxLM
    from benchmarks._timing import interleaved_medians, machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _bench_models import EINSUM_LINEARS, NNX_LINEARS, BlockConfig, EinsumLM, NnxLM
    from _timing import interleaved_medians, machine, write_results

FLOAT = "float32"
W8A8 = LayerQuant(qjax.QuantSpec("int8", qjax.PerRow(0), "absmax", "ste"),
                  qjax.QuantSpec("int8", qjax.PerRow(-1), "absmax", "ste"))
W8A8_INT = LayerQuant(W8A8.weight, W8A8.activation, integer_forward=True)
W8A8_INT_BWD = W8A8_INT.replace(backward="int8")
INT8_BWD_ROWS = ("qjax int8 W8A8 (int8 fwd + int8 bwd)", "qjax QuEST W4A4 (int8 fwd + int8 bwd)")
QUANT_KEY = jax.random.key(7)  # the timed step reruns one state, so one key is enough
W4_G128 = LayerQuant(qjax.QuantSpec("int4", qjax.PerGroup(0, 128), "absmax", "ste"), None)

Init = Callable[[jax.Array, jax.Array], Any]
Apply = Callable[[Any, jax.Array], jax.Array]


def qjax_case(cfg: LlamaConfig, target: Method | LayerQuant) -> tuple[Init, Apply]:
    qm = quantize_model(Llama(cfg), quantization_rules(target))
    return qm.init, lambda v, ids: qm.apply(v, ids, qat=True, rngs={"quant": QUANT_KEY})


def qwix_case(cfg: LlamaConfig, **rule: Any) -> tuple[Init, Apply]:
    import qwix

    provider = qwix.QtProvider([qwix.QtRule(module_path=BLOCK_LINEARS, **rule)])
    qm = qwix.quantize_model(Llama(cfg), provider)
    return qm.init, qm.apply


def aqt_case(cfg: LlamaConfig, **bits: Any) -> tuple[Init, Apply]:
    from aqt.jax.v2 import config as aqt_config
    from aqt.jax.v2.flax import aqt_flax

    dg_cls = functools.partial(aqt_flax.AqtDotGeneral, aqt_config.config_v4(**bits))
    pattern = re.compile(BLOCK_LINEARS)

    def inject(next_fun, args, kwargs, context):
        m = context.module
        if (context.method_name == "__call__" and type(m) is nn.Dense
                and pattern.fullmatch("/".join(m.path))):
            return m.clone(parent=m, name="aqt", dot_general_cls=dg_cls)(*args, **kwargs)
        return next_fun(*args, **kwargs)

    model = Llama(cfg)

    def init(rng: jax.Array, ids: jax.Array) -> Any:
        with nn.intercept_methods(inject):
            return model.init(rng, ids)

    def apply(variables: Any, ids: jax.Array) -> jax.Array:
        with nn.intercept_methods(inject):
            return model.apply(variables, ids, rngs={"params": jax.random.key(1)})

    return init, apply


def cases(cfg: LlamaConfig) -> dict[str, Callable[[], tuple[Init, Apply]]]:
    plain = Llama(cfg)
    return {
        FLOAT: lambda: (plain.init, plain.apply),
        "qjax QuEST W4A4": lambda: qjax_case(cfg, Method("quest", 4, 4)),
        "qjax QuEST W4A4 (int8 forward)": lambda: qjax_case(
            cfg, Method("quest", 4, 4, integer_forward=True)),
        "qjax int8 W8A8": lambda: qjax_case(cfg, W8A8),
        "qjax int8 W8A8 (int8 forward)": lambda: qjax_case(cfg, W8A8_INT),
        INT8_BWD_ROWS[0]: lambda: qjax_case(cfg, W8A8_INT_BWD),
        INT8_BWD_ROWS[1]: lambda: qjax_case(
            cfg, Method("quest", 4, 4, integer_forward=True, backward="int8")),
        "qjax int4 weight-only": lambda: qjax_case(cfg, W4_G128),
        "Qwix int8 W8A8": lambda: qwix_case(cfg, weight_qtype="int8", act_qtype="int8"),
        "Qwix int8 (quantized bwd)": lambda: qwix_case(
            cfg, weight_qtype="int8", act_qtype="int8", bwd_qtype="int8"),
        "Qwix int4 weight-only": lambda: qwix_case(cfg, weight_qtype="int4", tile_size=128),
        "AQT int8 W8A8": lambda: aqt_case(cfg, fwd_bits=8, dlhs_bits=None, drhs_bits=None),
        "AQT int8 (quantized bwd)": lambda: aqt_case(cfg, fwd_bits=8, dlhs_bits=8, drhs_bits=8),
    }


def jitted_step(init: Init, apply: Apply, ids: jax.Array,
                targets: jax.Array) -> tuple[Callable[[Any, Any], Any], Any, Any]:
    """The jitted train step ``(params, opt_state) -> (params, opt_state, loss)`` (cross-entropy,
    ``qat_adamw``) and its initial params and optimizer state."""
    variables = dict(init(jax.random.key(0), ids))
    params = variables.pop("params")
    tx = qjax.optim.qat_adamw(1e-3, weight_decay=0.1)
    opt_state = tx.init(params)

    def loss_fn(p: Any) -> jax.Array:
        logits = apply({**variables, "params": p}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def step(p: Any, s: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    return step, params, opt_state


def make_step(init: Init, apply: Apply, ids: jax.Array,
              targets: jax.Array) -> tuple[Callable[[], Any], float]:
    """A thunk running one jitted train step from a fixed state, and its first loss."""
    step, params, opt_state = jitted_step(init, apply, ids, targets)
    loss = float(step(params, opt_state)[2])
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss}")
    return (lambda: step(params, opt_state)), loss


def reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:200]


def goal(a: float | None, b: float | None, limit: float = 1.0) -> bool | None:
    return None if a is None or b is None else bool(a <= limit * b)


# ------------------------------------------------- NNX blocks and Gemma-style Einsum models
QUEST = Method("quest", 4, 4)
QUEST_INT = Method("quest", 4, 4, integer_forward=True)
STE8_INT = Method("ste", 8, 8, integer_forward=True)
QWIX_W8A8 = {"weight_qtype": "int8", "act_qtype": "int8"}
QWIX_BWD = {**QWIX_W8A8, "bwd_qtype": "int8"}
QJAX_TARGETS = {"qjax QuEST W4A4": QUEST, "qjax QuEST W4A4 (int8 forward)": QUEST_INT,
                "qjax int8 W8A8 (int8 forward)": STE8_INT,
                INT8_BWD_ROWS[0]: dataclasses.replace(STE8_INT, backward="int8"),
                INT8_BWD_ROWS[1]: dataclasses.replace(QUEST_INT, backward="int8")}
QWIX_RULES = {"Qwix int8 W8A8": QWIX_W8A8, "Qwix int8 (quantized bwd)": QWIX_BWD}

Step = tuple[Callable[[], Any], float]


def make_nnx_step(model: nnx.Module, ids: jax.Array, targets: jax.Array) -> Step:
    """A thunk running one ``nnx.jit`` train step of ``model`` in place, and its first loss."""
    optimizer = nnx.Optimizer(model, qjax.optim.qat_adamw(1e-3, weight_decay=0.1),
                              wrt=nnx.Param)

    @nnx.jit
    def step(model: nnx.Module, optimizer: nnx.Optimizer, ids: jax.Array,
             targets: jax.Array) -> jax.Array:
        def loss_fn(m: nnx.Module) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(m(ids), targets).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    loss = float(step(model, optimizer, ids, targets))
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss}")
    return (lambda: step(model, optimizer, ids, targets)), loss


def nnx_cases(cfg: BlockConfig, ids: jax.Array,
              targets: jax.Array) -> dict[str, Callable[[], Step]]:
    def fresh() -> NnxLM:  # same weights in every case
        return NnxLM(cfg, rngs=nnx.Rngs(0))

    def qjax_nnx(target: Method) -> Step:
        model = quantize_model(fresh(), {NNX_LINEARS: target})
        set_quant_rngs(model, nnx.Rngs(quant=0))  # used by backward="int8" layers only
        return make_nnx_step(model, ids, targets)

    def qwix_nnx(rule: dict) -> Step:
        import qwix

        provider = qwix.QtProvider([qwix.QtRule(module_path=NNX_LINEARS, **rule)])
        return make_nnx_step(qwix.quantize_model(fresh(), provider, ids), ids, targets)

    out = {FLOAT: lambda: make_nnx_step(fresh(), ids, targets)}
    out.update({k: functools.partial(qjax_nnx, t) for k, t in QJAX_TARGETS.items()})
    out.update({k: functools.partial(qwix_nnx, r) for k, r in QWIX_RULES.items()})
    return out


def einsum_cases(cfg: BlockConfig, ids: jax.Array,
                 targets: jax.Array) -> dict[str, Callable[[], Step]]:
    plain = EinsumLM(cfg)

    def qjax_linen(target: Method) -> Step:
        qm = quantize_model(plain, {EINSUM_LINEARS: target})
        return make_step(qm.init, lambda v, x: qm.apply(v, x, qat=True, rngs={"quant": QUANT_KEY}),
                         ids, targets)

    def qwix_linen(rule: dict) -> Step:
        import qwix

        provider = qwix.QtProvider([qwix.QtRule(module_path=EINSUM_LINEARS, **rule)])
        qm = qwix.quantize_model(plain, provider)
        return make_step(qm.init, qm.apply, ids, targets)

    out = {FLOAT: lambda: make_step(plain.init, plain.apply, ids, targets)}
    out.update({k: functools.partial(qjax_linen, t) for k, t in QJAX_TARGETS.items()})
    out.update({k: functools.partial(qwix_linen, r) for k, r in QWIX_RULES.items()})
    return out


# ------------------------------------------------------------------------------------ runner
def time_cases(makers: dict[str, Callable[[], Step]], tokens: int, warmup: int,
               repeats: int) -> dict[str, dict[str, Any]]:
    """Builds every case (an external one may fail: ``error``), times them interleaved."""
    fns: dict[str, Callable[[], Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    for name, make in makers.items():
        try:
            fns[name], loss = make()
            results[name] = {"first_loss": loss}
            print(f"built {name:<32} loss {loss:.4f}")
        except Exception as e:  # an optional case must not stop the run
            if name == FLOAT or name.startswith("qjax"):
                raise
            results[name] = {"error": reason(e)}
            print(f"skipped {name}: {reason(e)}")
    float_loss = results[FLOAT]["first_loss"]
    for name, r in results.items():
        if name.startswith("qjax") and abs(r["first_loss"] - float_loss) > 0.5:
            print(f"WARNING {name}: loss at init {r['first_loss']:.4f} far from float "
                  f"{float_loss:.4f}")
    med = interleaved_medians(fns, warmup=warmup, repeats=repeats)
    for name, t in med.items():
        results[name].update(median_ms=t * 1e3, ratio=t / med[FLOAT], tokens_per_s=tokens / t)
    return results


def ms(results: dict[str, dict[str, Any]], name: str) -> float | None:
    return results.get(name, {}).get("median_ms")


W8A8_ROWS = ("qjax int8 W8A8", "qjax int8 W8A8 (int8 forward)", INT8_BWD_ROWS[0])


def int8_bwd_goals(results: dict[str, dict[str, Any]], suffix: str = "") -> dict[str, bool | None]:
    """The quantized-backward goals: the fastest qjax W8A8 step at most 0.75x float32, and the
    int8-backward row at most Qwix's quantized backward."""
    times = [t for t in (ms(results, r) for r in W8A8_ROWS) if t is not None]
    return {
        f"fastest qjax W8A8 step <= 0.75x float32{suffix}": goal(
            min(times, default=None), ms(results, FLOAT), 0.75),
        f"{INT8_BWD_ROWS[0]} <= Qwix int8 (quantized bwd){suffix}": goal(
            ms(results, INT8_BWD_ROWS[0]), ms(results, "Qwix int8 (quantized bwd)")),
    }


def block_goals(results: dict[str, dict[str, Any]], label: str) -> dict[str, bool | None]:
    int_fwd = "qjax int8 W8A8 (int8 forward)"
    quest = "qjax QuEST W4A4 (int8 forward)"
    return {
        f"{int_fwd} <= Qwix int8 W8A8 ({label})": goal(
            ms(results, int_fwd), ms(results, "Qwix int8 W8A8")),
        f"{quest} <= 1.15x float32 ({label})": goal(ms(results, quest), ms(results, FLOAT), 1.15),
        **int8_bwd_goals(results, f" ({label})"),
    }


def cell(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"n/a ({r['error']}) | n/a | n/a"
    return f"{r['median_ms']:.1f} | {r['ratio']:.2f}x | {r['tokens_per_s']:,.0f}"


def goal_lines(goals: dict[str, bool | None]) -> list[str]:
    return ["", "Goals (same run):", ""] + [
        f"- {g}: {'n/a' if ok is None else ok}" for g, ok in goals.items()]


def run_llama(d: int, layers: int, batch: int, seq: int, warmup: int,
              repeats: int) -> tuple[list[str], dict[str, Any]]:
    cfg = LlamaConfig(d_model=d, n_layers=layers, n_heads=4, max_seq_len=seq)
    tokens = jax.random.randint(jax.random.key(42), (batch, seq + 1), 0, 256, jnp.int32)
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    makers = {name: functools.partial(lambda b: make_step(*b(), ids, targets), build)
              for name, build in cases(cfg).items()}
    results = time_cases(makers, batch * seq, warmup, repeats)
    goals = {
        "qjax int8 W8A8 (int8 forward) <= Qwix int8 W8A8": goal(
            ms(results, "qjax int8 W8A8 (int8 forward)"), ms(results, "Qwix int8 W8A8")),
        "qjax int4 weight-only <= Qwix int4 weight-only": goal(
            ms(results, "qjax int4 weight-only"), ms(results, "Qwix int4 weight-only")),
        "qjax QuEST W4A4 (int8 forward) <= 1.15x float32": goal(
            ms(results, "qjax QuEST W4A4 (int8 forward)"), ms(results, FLOAT), 1.15),
        **int8_bwd_goals(results),
    }
    md = [
        "## Reference Llama (Flax Linen, `nn.Dense`)", "",
        f"Model: d_model={d}, n_layers={layers}, n_heads=4, ffn hidden {cfg.ffn_hidden}; batch "
        f"{batch} x seq {seq}; block linears quantized, embedding and LM head float. Functional "
        "`jax.jit` step. int4 weight-only dequantizes to float in both qjax and Qwix.", "",
        "| case | median ms | ratio vs float32 | tokens/s |", "|---|---|---|---|",
    ]
    md += [f"| {name} | {cell(r)} |" for name, r in results.items()]
    md += goal_lines(goals)
    config = {"d_model": d, "n_layers": layers, "n_heads": 4, "ffn_hidden": cfg.ffn_hidden,
              "batch": batch, "seq": seq}
    return md, {"config": config, "cases": results, "goals": goals}


BLOCK_MODELS = {
    "nnx_blocks": ("NNX transformer blocks (Flax NNX, `nnx.LinearGeneral` heads, "
                   "`nnx.Linear` SwiGLU)", nnx_cases,
                   "`nnx.Optimizer` + `nnx.jit` step, model and optimizer updated in place"),
    "gemma_einsum": ("Gemma-style Einsum (Flax Linen, `nn.Einsum` heads, `nn.DenseGeneral` "
                     "GeGLU)", einsum_cases, "functional `jax.jit` step"),
}


def run_block_model(key: str, cfg: BlockConfig, shapes: list[tuple[int, int]], warmup: int,
                    repeats: int) -> tuple[list[str], dict[str, Any]]:
    title, make_cases, how = BLOCK_MODELS[key]
    per_shape: dict[str, dict[str, dict[str, Any]]] = {}
    goals: dict[str, bool | None] = {}
    for batch, seq in shapes:
        label = f"{batch}x{seq}"
        print(f"== {key} {label}")
        tokens = jax.random.randint(jax.random.key(42), (batch, seq + 1), 0, 256, jnp.int32)
        makers = make_cases(cfg, tokens[:, :-1], tokens[:, 1:])
        per_shape[label] = time_cases(makers, batch * seq, warmup, repeats)
        goals.update(block_goals(per_shape[label], label))
    labels = list(per_shape)
    md = [
        f"## {title}", "",
        f"Model: d_model={cfg.d_model}, n_layers={cfg.n_layers}, {cfg.n_heads} heads x "
        f"{cfg.head_dim}, MLP hidden {cfg.hidden}, vocab {cfg.vocab_size}; block linears "
        f"quantized, embedding and head float; {how}. Each shape is timed on its own "
        "(interleaved), ratios are to float32 at that shape.", "",
        "| case | " + " | ".join(f"{s} ms | {s} ratio | {s} tokens/s" for s in labels) + " |",
        "|---|" + "---|---|---|" * len(labels),
    ]
    for name in per_shape[labels[0]]:
        md.append(f"| {name} | " + " | ".join(cell(per_shape[s][name]) for s in labels) + " |")
    md += goal_lines(goals)
    config = {**dataclasses.asdict(cfg), "shapes": labels}
    return md, {"config": config, "cases": per_shape, "goals": goals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="default 20 (5 with --quick)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small models for a smoke run")
    parser.add_argument("--models", default=",".join(("llama",) + tuple(BLOCK_MODELS)),
                        help="comma-separated tables to run: llama, " + ", ".join(BLOCK_MODELS))
    args = parser.parse_args()
    chosen = args.models.split(",")
    unknown = sorted(set(chosen) - {"llama", *BLOCK_MODELS})
    if unknown or not chosen:
        parser.error(f"unknown --models {unknown}; allowed: llama, {', '.join(BLOCK_MODELS)}")
    repeats = args.repeats or (5 if args.quick else 20)
    d, layers, batch, seq = (128, 2, 4, 256) if args.quick else (256, 4, 8, 256)
    block_cfg = BlockConfig(d_model=d, n_layers=layers, n_heads=4, head_dim=d // 4,
                            hidden=3 * d)
    shapes = [(batch, 256), (batch, 32)]

    sections, models, payload = [], {}, {}
    if "llama" in chosen:
        llama_md, payload = run_llama(d, layers, batch, seq, args.warmup, repeats)
        sections.append(llama_md)
    for key in BLOCK_MODELS:
        if key in chosen:
            md, models[key] = run_block_model(key, block_cfg, shapes, args.warmup, repeats)
            sections.append(md)

    mach = machine()
    head = [
        "# QAT training step (forward + backward + AdamW)", "",
        f"Machine: {mach['processor']}, {mach['cpus']} CPUs, {mach['platform']}, JAX "
        f"{mach['jax']} ({mach['backend']}); median of {repeats} interleaved runs after "
        f"{args.warmup} warm-up calls, per model and shape; random byte ids; one invocation.",
        "These are CPU ratios; GPU/TPU were not measured here. qjax's default fake-quantizes "
        "and multiplies in float32; its (int8 forward) cases, Qwix and AQT W8A8 run int8 x int8 "
        "dot_generals in the forward pass; qjax's (int8 fwd + int8 bwd) cases and Qwix's quantized "
        "bwd in the backward too (qjax: stochastically rounded gradients, Qwix: round to nearest).",
    ]
    markdown = "\n".join(head + [line for s in sections for line in ["", *s]]) + "\n"
    print(markdown)
    payload = {"machine": mach, "quick": args.quick, "repeats": repeats, "warmup": args.warmup,
               **payload, "models": models}
    print("wrote", *write_results("qat_step", payload, markdown))


if __name__ == "__main__":
    main()
