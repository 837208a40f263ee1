"""Serving forward vs float forward on CPU for the reference Llama: latency and weight memory.

Cases (all jitted, the same Flax model code): float32 params; W8A8 (int8 per-channel weights,
int8 per-token activations, int8 x int8 -> int32 ``lax.dot_general``); int4 weight-only
(per-channel, dequantized in the matmul), with the codes packed two per byte or unpacked once at
convert time (``convert(..., packed=False)``: one per byte); W4A8 (the weight-only int4 model
served with ``act_spec`` int8 per token: int8 x int8 dots); Q4_0 x Q8_0 (llama.cpp's formats:
weights trained with ``gguf_q4_0``, served with ``gguf_q8_0`` activations, blocks of 32 along
K: ``qjax._src.int8_blocks``); QuEST W4A4 (odd-integer int8 codes). Latency ratios at batch 1 and 32
(median of interleaved runs after warm-up), bytes of the weights in memory, and Orbax checkpoint
sizes against float32 and bfloat16. The logits are compared with the QAT forward of the model
trained with the activation spec it is served with (for W4A8 and Q4_0 x Q8_0 the same params
with that activation spec).

Run: ``python -m benchmarks.serve [--quick]``; writes ``benchmarks/results/serve.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import interleaved_medians, machine, write_results
from qjax import PerRow, QArray, QuantSpec, presets
from qjax import convert as QC
from qjax.models.llama import Llama, LlamaConfig, quantization_rules
from qjax.nn import LayerQuant, Method, quantize_model

A8 = QuantSpec("int8", PerRow(-1))
Q4_0 = LayerQuant(weight=presets.gguf_q4_0(axis=0))


@dataclasses.dataclass(frozen=True)
class Case:
    """A serving case: the trained recipe, how it is converted and served, and the recipe whose
    QAT forward it should reproduce (``trained_as``, default ``recipe``)."""

    recipe: Method | LayerQuant
    packed: bool = True
    act_spec: QuantSpec | None = None
    trained_as: Method | LayerQuant | None = None


CASES = {
    "W8A8 int8 matmul": Case(Method("ste", 8, 8)),
    "W4 weight-only, packed": Case(Method("ste", 4, None)),
    "W4 weight-only, unpacked": Case(Method("ste", 4, None), packed=False),
    "W4A8 (int8 per token), unpacked": Case(Method("ste", 4, None), False, A8,
                                            Method("ste", 4, 8)),
    "Q4_0 x Q8_0, unpacked": Case(Q4_0, False, presets.gguf_q8_0(-1),
                                  dataclasses.replace(Q4_0, activation=presets.gguf_q8_0(-1))),
    "QuEST W4A4 int8 matmul, packed": Case(Method("quest", 4, 4)),
    "QuEST W4A4 int8 matmul, unpacked": Case(Method("quest", 4, 4), packed=False),
}


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def weight_bytes(params) -> int:
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda a: isinstance(a, QArray))
    return sum(a.nbytes if isinstance(a, QArray) else int(a.size * a.dtype.itemsize)
               for a in leaves)


def main(quick: bool = False) -> None:
    cfg = LlamaConfig(d_model=256, n_layers=4, n_heads=4, max_seq_len=32)
    seq = 32
    batches = (1, 8) if quick else (1, 32)
    repeats = 5 if quick else 20
    float_model = Llama(cfg)
    ids0 = jnp.zeros((1, seq), jnp.int32)
    fparams = float_model.init(jax.random.key(0), ids0)["params"]
    ffwd = jax.jit(lambda p, i: float_model.apply({"params": p}, i))
    rows, sizes, timings = [], {}, {}
    with tempfile.TemporaryDirectory() as d:
        sizes["float32"] = QC.save(os.path.join(d, "f32"), fparams)
        bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), fparams)
        sizes["bfloat16"] = QC.save(os.path.join(d, "bf16"), bf16)
        blocks = lambda t: {k: v for k, v in t.items() if k.startswith("blocks_")}  # noqa: E731
        block_sizes = {"float32": QC.save(os.path.join(d, "bf32"), blocks(fparams)),
                       "bfloat16": QC.save(os.path.join(d, "bbf16"), blocks(bf16))}
        models = {}
        for name, case in CASES.items():
            qm = quantize_model(Llama(cfg), quantization_rules(case.recipe))
            params = qm.init(jax.random.key(0), ids0)["params"]
            sp = QC.convert(params, qm, packed=case.packed)
            models[name] = (qm, params, sp)
            sizes[name] = QC.save(os.path.join(d, name.replace(" ", "_")), sp)
            block_sizes[name] = QC.save(os.path.join(d, "b" + name.replace(" ", "_")), blocks(sp))
    for b in batches:
        ids = jax.random.randint(jax.random.key(b), (b, seq), 0, cfg.vocab_size)
        fns = {"float32": lambda ids=ids: ffwd(fparams, ids)}
        for name, (qm, _, sp) in models.items():
            fwd = jax.jit(lambda p, i, qm=qm, a=CASES[name].act_spec: QC.serve(qm, p, i,
                                                                               act_spec=a))
            fns[name] = lambda fwd=fwd, sp=sp, ids=ids: fwd(sp, ids)
        timings[b] = interleaved_medians(fns, warmup=2, repeats=repeats)
    for name, (qm, params, sp) in models.items():
        case = CASES[name]
        ids = jax.random.randint(jax.random.key(7), (2, seq), 0, cfg.vocab_size)
        trained = quantize_model(Llama(cfg), quantization_rules(case.trained_as or case.recipe))
        qat = jax.jit(lambda p, i, qm=trained: qm.apply({"params": p}, i))(params, ids)
        srv = jax.jit(lambda p, i, qm=qm, a=case.act_spec: QC.serve(qm, p, i, act_spec=a))(
            sp, ids)
        eager = QC.serve(qm, sp, ids, act_spec=case.act_spec)
        recipe = case.trained_as or case.recipe
        if not isinstance(recipe, Method) or recipe.act_bits is None:
            int_qat = None  # no integer forward in QAT
        else:  # the same QAT model with its integer forward (same params)
            int_qm = quantize_model(Llama(cfg), quantization_rules(
                dataclasses.replace(recipe, integer_forward=True)))
            int_qat = jax.jit(lambda p, i, qm=int_qm: qm.apply({"params": p}, i))(params, ids)
        rows.append({
            "case": name,
            "weight_bytes": weight_bytes(sp),
            "weight_ratio_vs_float32": weight_bytes(sp) / weight_bytes(fparams),
            "checkpoint_bytes": sizes[name],
            "checkpoint_ratio_vs_float32": sizes[name] / sizes["float32"],
            "checkpoint_ratio_vs_bfloat16": sizes[name] / sizes["bfloat16"],
            "max_abs_diff_vs_qat_logits": float(jnp.max(jnp.abs(qat - srv))),
            "max_abs_diff_vs_integer_forward_qat_logits": (
                None if int_qat is None else float(jnp.max(jnp.abs(int_qat - srv)))),
            "max_abs_diff_serve_eager_vs_jit": float(jnp.max(jnp.abs(eager - srv))),
            "block_checkpoint_ratio_vs_float32": block_sizes[name] / block_sizes["float32"],
            "block_checkpoint_ratio_vs_bfloat16": block_sizes[name] / block_sizes["bfloat16"],
            **{f"latency_ratio_b{b}": timings[b][name] / timings[b]["float32"] for b in batches},
        })
    nonembed = sum(int(np.prod(a.shape)) for k, v in fparams.items() if k.startswith("blocks")
                   for a in jax.tree_util.tree_leaves(v))
    payload = {
        "config": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                   "ffn_hidden": cfg.ffn_hidden, "seq": seq, "batches": list(batches),
                   "repeats": repeats, "non_embedding_params": nonembed},
        "float32": {"weight_bytes": weight_bytes(fparams), "checkpoint_bytes": sizes["float32"],
                    **{f"latency_ms_b{b}": 1e3 * timings[b]["float32"] for b in batches}},
        "bfloat16_checkpoint_bytes": sizes["bfloat16"],
        "block_checkpoint_bytes": block_sizes,
        "rows": rows,
        "machine": machine(),
    }
    float_ms = ", ".join(f"batch {b}: {1e3 * timings[b]['float32']:.2f} ms" for b in batches)
    lines = [
        "# Serving forward vs float forward (CPU)",
        "",
        f"Reference Llama d_model={cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"ffn {cfg.ffn_hidden}, seq {seq}; {nonembed:,} non-embedding params (embedding and LM "
        "head stay float32). Latency: median of interleaved jitted runs, ratio to the float32 "
        f"forward ({float_ms}). Checkpoints: Orbax via `qjax.convert.save` "
        f"(float32 {sizes['float32']:,} B, bfloat16 {sizes['bfloat16']:,} B).",
        "",
        "| case | " + " | ".join(f"latency ratio b{b}" for b in batches)
        + " | weight bytes (x float32) | checkpoint x float32 / bfloat16 "
        "| block weights only x float32 / bfloat16 | max abs diff vs QAT logits "
        "(fake quant / integer forward) | serve eager vs jit |",
        "|---|" + "---|" * len(batches) + "---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | "
            + " | ".join(f"{r[f'latency_ratio_b{b}']:.2f}" for b in batches)
            + f" | {r['weight_bytes']:,} ({r['weight_ratio_vs_float32']:.3f}) "
            f"| {r['checkpoint_ratio_vs_float32']:.3f} / {r['checkpoint_ratio_vs_bfloat16']:.3f} "
            f"| {r['block_checkpoint_ratio_vs_float32']:.3f} / "
            f"{r['block_checkpoint_ratio_vs_bfloat16']:.3f} "
            f"| {r['max_abs_diff_vs_qat_logits']:.2e} / "
            f"{_num(r['max_abs_diff_vs_integer_forward_qat_logits'])} "
            f"| {r['max_abs_diff_serve_eager_vs_jit']:.2e} |")
    lines += ["", "Weight-only serving equals the QAT forward bit for bit; with int8 "
              "activations it equals QAT's integer forward bit for bit and the fake-quant "
              "forward up to float accumulation order, which over 4 layers flips rare "
              "activation codes. W4A8 and Q4_0 x Q8_0 serve the weight-only models with "
              "activations quantized at serving time (`serve(..., act_spec=...)`); their "
              "logits are compared with the same params' QAT forward trained with that "
              "activation spec. Ratios below 1 are faster than float32. `unpacked`: "
              "`convert(..., packed=False)`, int4 codes one per byte (twice the packed "
              "bytes): the int8 dot reads them without per-call nibble unpacking; the "
              "weight-only float path still converts and scales every weight per call, so on "
              "this CPU it stays slower than float32 at 32 tokens (on a memory-bound device "
              "decode its 1/8 weight bytes are the gain; not measured here). Q4_0 x Q8_0 runs "
              "one int8 dot per block of 32 (`qjax._src.int8_blocks`, a `lax.scan`), which XLA:CPU "
              "runs slower than one float32 matmul. The embedding and LM head (float32) "
              "dominate the weight bytes of this small model; the quantized block weights "
              "alone shrink to 1/4 (int8) and 1/8 (int4) plus their scales.", "",
              f"Machine: {payload['machine']}"]
    print("\n".join(lines))
    write_results("serve_quick" if quick else "serve", payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
