"""Cost of one jitted QAT training step (forward, backward, AdamW) of the reference Llama.

Every case trains the same ``qjax.models.Llama`` on the same batch of random byte ids with
``qjax.optim.qat_adamw`` and a softmax cross-entropy loss; only the linear layers inside the
blocks (``blocks_<i>/attn/{q,k,v,o}``, ``blocks_<i>/mlp/{gate,up,down}``) are quantized:

* ``float32``: the plain model, the baseline (ratio 1.00).
* ``qjax QuEST W4A4``: ``Method("quest", 4, 4)`` (Hadamard rotations, RMS scales, trust).
* ``qjax int8 W8A8``: int8 absmax weights per output channel, int8 per token inputs, STE.
* ``qjax int4 weight-only``: int4 absmax weights per group of 128 along K, STE.
* ``... (int8 forward)``: the same QuEST W4A4 and int8 W8A8 with ``integer_forward=True``: the
  forward matmul is an int8 x int8 -> int32 ``dot_general`` with the fake-quant values and
  gradients (``qjax.qdot``); QuEST's 4-bit midrise codes are stored as odd int8 integers.
* ``Qwix int8 W8A8`` (and ``quantized bwd``: gradients int8 too), ``Qwix int4 weight-only``
  (tile 128 along K): ``qwix.quantize_model`` with a ``QtProvider``.
* ``AQT int8 W8A8``: AQT v2 ``AqtDotGeneral(config_v4(fwd_bits=8, dlhs_bits=None,
  drhs_bits=None))`` set as the ``dot_general_cls`` of the block linears through
  ``nn.intercept_methods`` (each matched ``Dense`` runs as a child clone with that field set,
  same shapes; parameters nest one level deeper under ``aqt``).

External cases are optional: a failure is recorded as ``n/a (reason)`` instead of crashing.

Run: ``python benchmarks/qat_step.py [--repeats 20] [--quick]`` (``--quick``: d_model 128,
2 layers, batch 4, 5 repeats). Writes ``results/qat_step.{json,md}``. CPU ratios from one run
are what to compare; absolute times vary between runs and machines.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import qjax
from qjax.models import Llama, LlamaConfig, quantization_rules
from qjax.models.llama import BLOCK_LINEARS
from qjax.nn import LayerQuant, Method, quantize_model

try:
    from benchmarks._timing import interleaved_medians, machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _timing import interleaved_medians, machine, write_results

FLOAT = "float32"
W8A8 = LayerQuant(qjax.QuantSpec("int8", qjax.PerRow(0), "absmax", "ste"),
                  qjax.QuantSpec("int8", qjax.PerRow(-1), "absmax", "ste"))
W8A8_INT = LayerQuant(W8A8.weight, W8A8.activation, integer_forward=True)
W4_G128 = LayerQuant(qjax.QuantSpec("int4", qjax.PerGroup(0, 128), "absmax", "ste"), None)

Init = Callable[[jax.Array, jax.Array], Any]
Apply = Callable[[Any, jax.Array], jax.Array]


def qjax_case(cfg: LlamaConfig, target: Method | LayerQuant) -> tuple[Init, Apply]:
    qm = quantize_model(Llama(cfg), quantization_rules(target))
    return qm.init, lambda v, ids: qm.apply(v, ids, qat=True)


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
        "qjax int4 weight-only": lambda: qjax_case(cfg, W4_G128),
        "Qwix int8 W8A8": lambda: qwix_case(cfg, weight_qtype="int8", act_qtype="int8"),
        "Qwix int8 (quantized bwd)": lambda: qwix_case(
            cfg, weight_qtype="int8", act_qtype="int8", bwd_qtype="int8"),
        "Qwix int4 weight-only": lambda: qwix_case(cfg, weight_qtype="int4", tile_size=128),
        "AQT int8 W8A8": lambda: aqt_case(cfg, fwd_bits=8, dlhs_bits=None, drhs_bits=None),
    }


def make_step(init: Init, apply: Apply, ids: jax.Array,
              targets: jax.Array) -> tuple[Callable[[], Any], float]:
    """A thunk running one jitted train step from a fixed state, and its first loss."""
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

    loss = float(step(params, opt_state)[2])
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss}")
    return (lambda: step(params, opt_state)), loss


def reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:200]


def goal(a: float | None, b: float | None, limit: float = 1.0) -> bool | None:
    return None if a is None or b is None else bool(a <= limit * b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="default 20 (5 with --quick)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small model for a smoke run")
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 20)
    d, layers, batch, seq = (128, 2, 4, 256) if args.quick else (256, 4, 8, 256)
    cfg = LlamaConfig(d_model=d, n_layers=layers, n_heads=4, max_seq_len=seq)
    tokens = jax.random.randint(jax.random.key(42), (batch, seq + 1), 0, 256, jnp.int32)
    ids, targets = tokens[:, :-1], tokens[:, 1:]

    fns: dict[str, Callable[[], Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    for name, build in cases(cfg).items():
        try:
            fns[name], loss = make_step(*build(), ids, targets)
            results[name] = {"first_loss": loss}
            print(f"built {name:<28} loss {loss:.4f}")
        except Exception as e:  # an optional case must not stop the run
            if name == FLOAT or name.startswith("qjax"):
                raise
            results[name] = {"error": reason(e)}
            print(f"skipped {name}: {reason(e)}")

    med = interleaved_medians(fns, warmup=args.warmup, repeats=repeats)
    base = med[FLOAT]
    for name, t in med.items():
        results[name].update(median_ms=t * 1e3, ratio=t / base, tokens_per_s=batch * seq / t)

    def ms(name: str) -> float | None:
        return results.get(name, {}).get("median_ms")

    goals = {
        "qjax int8 W8A8 (int8 forward) <= Qwix int8 W8A8": goal(
            ms("qjax int8 W8A8 (int8 forward)"), ms("Qwix int8 W8A8")),
        "qjax int4 weight-only <= Qwix int4 weight-only": goal(
            ms("qjax int4 weight-only"), ms("Qwix int4 weight-only")),
        "qjax QuEST W4A4 (int8 forward) <= 1.15x float32": goal(
            ms("qjax QuEST W4A4 (int8 forward)"), ms(FLOAT), 1.15),
    }
    mach = machine()
    md = [
        "# QAT training step (forward + backward + AdamW), reference Llama", "",
        f"Model: d_model={d}, n_layers={layers}, n_heads=4, ffn hidden {cfg.ffn_hidden}; batch "
        f"{batch} x seq {seq} random byte ids; block linears quantized, embedding and LM head "
        "float.",
        f"Machine: {mach['processor']}, {mach['cpus']} CPUs, {mach['platform']}, JAX "
        f"{mach['jax']} ({mach['backend']}); median of {repeats} interleaved runs after "
        f"{args.warmup} warm-up calls.",
        "These are CPU ratios; GPU/TPU were not measured here. qjax's default fake-quantizes "
        "and multiplies in float32; its (int8 forward) cases, Qwix and AQT W8A8 run int8 x int8 "
        "dot_generals in the forward pass (Qwix's quantized bwd in the backward too); int4 "
        "weight-only dequantizes to float in both qjax and Qwix.", "",
        "| case | median ms | ratio vs float32 | tokens/s |", "|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            md.append(f"| {name} | n/a ({r['error']}) | n/a | n/a |")
        else:
            md.append(f"| {name} | {r['median_ms']:.1f} | {r['ratio']:.2f}x | "
                      f"{r['tokens_per_s']:,.0f} |")
    md += ["", "Goals (same run):", ""]
    md += [f"- {g}: {'n/a' if ok is None else ok}" for g, ok in goals.items()]
    markdown = "\n".join(md) + "\n"
    print(markdown)
    payload = {
        "machine": mach, "quick": args.quick, "repeats": repeats, "warmup": args.warmup,
        "config": {"d_model": d, "n_layers": layers, "n_heads": 4, "ffn_hidden": cfg.ffn_hidden,
                   "batch": batch, "seq": seq},
        "cases": results, "goals": goals,
    }
    print("wrote", *write_results("qat_step", payload, markdown))


if __name__ == "__main__":
    main()
