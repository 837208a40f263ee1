"""Serving forward vs float forward on CPU for the reference Llama: latency and weight memory.

Cases (all jitted, the same Flax model code): float32 params; W8A8 (int8 per-channel weights,
int8 per-token activations, int8 x int8 -> int32 ``lax.dot_general``); int4 weight-only
(per-channel, packed two per byte, dequantized in the matmul); QuEST W4A4 (odd-integer int8
codes). Latency ratios at batch 1 and 32 (median of interleaved runs after warm-up), bytes of the
weights in memory, and Orbax checkpoint sizes against float32 and bfloat16.

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
from qjax import convert as QC
from qjax.models.llama import Llama, LlamaConfig, quantization_rules
from qjax.nn import Method, quantize_model
from qjax.qarray import QArray

CASES = {
    "W8A8 int8 matmul": Method("ste", 8, 8),
    "W4 weight-only": Method("ste", 4, None),
    "QuEST W4A4 int8 matmul": Method("quest", 4, 4),
}


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
        for name, method in CASES.items():
            qm = quantize_model(Llama(cfg), quantization_rules(method))
            params = qm.init(jax.random.key(0), ids0)["params"]
            sp = QC.convert(params, qm)
            models[name] = (qm, params, sp)
            sizes[name] = QC.save(os.path.join(d, name.replace(" ", "_")), sp)
            block_sizes[name] = QC.save(os.path.join(d, "b" + name.replace(" ", "_")), blocks(sp))
    for b in batches:
        ids = jax.random.randint(jax.random.key(b), (b, seq), 0, cfg.vocab_size)
        fns = {"float32": lambda ids=ids: ffwd(fparams, ids)}
        for name, (qm, _, sp) in models.items():
            fwd = jax.jit(lambda p, i, qm=qm: QC.serve(qm, p, i))
            fns[name] = lambda fwd=fwd, sp=sp, ids=ids: fwd(sp, ids)
        timings[b] = interleaved_medians(fns, warmup=2, repeats=repeats)
    for name, (qm, params, sp) in models.items():
        ids = jax.random.randint(jax.random.key(7), (2, seq), 0, cfg.vocab_size)
        qat = jax.jit(lambda p, i, qm=qm: qm.apply({"params": p}, i))(params, ids)
        srv = jax.jit(lambda p, i, qm=qm: QC.serve(qm, p, i))(sp, ids)
        eager = QC.serve(qm, sp, ids)
        method = CASES[name]
        if method.act_bits is None:
            int_qat = qat
        else:  # the same QAT model with its integer forward (same params)
            int_qm = quantize_model(Llama(cfg), quantization_rules(
                dataclasses.replace(method, integer_forward=True)))
            int_qat = jax.jit(lambda p, i, qm=int_qm: qm.apply({"params": p}, i))(params, ids)
        rows.append({
            "case": name,
            "weight_bytes": weight_bytes(sp),
            "weight_ratio_vs_float32": weight_bytes(sp) / weight_bytes(fparams),
            "checkpoint_bytes": sizes[name],
            "checkpoint_ratio_vs_float32": sizes[name] / sizes["float32"],
            "checkpoint_ratio_vs_bfloat16": sizes[name] / sizes["bfloat16"],
            "max_abs_diff_vs_qat_logits": float(jnp.max(jnp.abs(qat - srv))),
            "max_abs_diff_vs_integer_forward_qat_logits": float(jnp.max(jnp.abs(int_qat - srv))),
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
            f"{r['max_abs_diff_vs_integer_forward_qat_logits']:.2e} "
            f"| {r['max_abs_diff_serve_eager_vs_jit']:.2e} |")
    lines += ["", "Weight-only serving equals the QAT forward bit for bit; with int8 "
              "activations it equals QAT's integer forward bit for bit and the fake-quant "
              "forward up to float accumulation order, which over 4 layers flips rare "
              "activation codes. Ratios below 1 are faster than float32. The embedding and "
              "LM head (float32) dominate the weight bytes of this small model; the quantized "
              "block weights alone shrink to 1/4 (int8) and 1/8 (int4) plus one float32 scale "
              "per output row.", "",
              f"Machine: {payload['machine']}"]
    print("\n".join(lines))
    write_results("serve_quick" if quick else "serve", payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
