"""Quantized attention and KV cache on the reference Llama: validation loss, cache bytes, decode.

1. Quality: the main job's tiny byte-level Llama (``configs/quest_w4a4_tiny.py``: d=128, 2
   layers, 4 heads of 32, seq 256, 500 steps on the Python standard library), QuEST W4A4
   linears, with (a) float attention, (b) int8 Q/K/V per token and head and 8-bit attention
   probabilities per row (``attn_bits=8 attn_prob_bits=8``), (c) (b) with K and V int4 per
   token, head and group of 32 channels, as the served KV cache stores them (``kv_bits=4
   kv_group=32``); (b) and (c) again with EdgeQAT's entropy and attention-map loss terms
   (:mod:`qjax.methods.edgeqat`, entropy weight 0.5, half the authors' coefficient, attention
   weight 1), and (c) with the attention-map term only.
   Validation loss per seed; each seed is a paired run (same init and batches).
   The same int4-cache rows again as QAT of each seed's float model (the main job's float run,
   :data:`FINETUNE` steps from it), EdgeQAT's setting.
2. KV-cache bytes per token (all layers, keys and values) in float32, int8 and int4.
3. Greedy decoding (``qjax.models.llama.greedy_generate``, jitted, prefill 16 tokens then 112
   one at a time) with the cache in float32, int8 and int4: tokens per second at batch 1 and 8,
   median of interleaved runs.

Run: ``python -m benchmarks.attention_kv [--quick] [--seeds 0,1]``; writes
``benchmarks/results/attention_kv.{json,md}``. Runs resume from ``runs/attention_kv``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys

import jax

from qjax import attention as A
from qjax import train
from qjax.config import replace
from qjax.models.llama import Llama, LlamaConfig, greedy_generate, init_caches

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
from quest_w4a4_tiny import get_config  # noqa: E402  (configs/ is not a package)

try:
    from benchmarks._paired import paired_rows
    from benchmarks._timing import interleaved_medians, machine, seeds_cli, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _paired import paired_rows
    from _timing import interleaved_medians, machine, seeds_cli, write_results

# EdgeQAT's entropy and attention-map terms (qjax.methods.edgeqat): attention weight 1 as the
# authors, entropy weight 0.5, half the authors' coefficient (their -0.5 log of the summed
# entropies is edgeqat.entropy_loss at weight 1). From scratch, the attention term's teacher is
# the float forward of the current weights.
EDGEQAT = dict(edgeqat_entropy=0.5, edgeqat_attention=1.0)
ROWS = {
    "W4A4 linears, float attention": {},
    "+ int8 Q/K/V, 8-bit probabilities": dict(attn_bits=8, attn_prob_bits=8),
    "+ int4 K/V (cache), 8-bit Q and probabilities": dict(attn_bits=8, attn_prob_bits=8,
                                                         kv_bits=4, kv_group=32),
    "+ int8 Q/K/V, 8-bit probabilities, EdgeQAT loss (entropy 0.5, attention 1)": dict(
        attn_bits=8, attn_prob_bits=8, **EDGEQAT),
    "+ int4 K/V (cache), 8-bit Q and probabilities, EdgeQAT loss (entropy 0.5, attention 1)": dict(
        attn_bits=8, attn_prob_bits=8, kv_bits=4, kv_group=32, **EDGEQAT),
    "+ int4 K/V (cache), 8-bit Q and probabilities, EdgeQAT attention term only": dict(
        attn_bits=8, attn_prob_bits=8, kv_bits=4, kv_group=32, edgeqat_attention=1.0),
}
SLUGS = ("float_attn", "int8_attn", "int4_kv", "int8_attn_edgeqat", "int4_kv_edgeqat",
         "int4_kv_edgeqat_attention")
# EdgeQAT's own setting, QAT of a pretrained model: per seed the float model of the main job
# (500 steps), then FINETUNE steps of QuEST W4A4 with an int4 KV cache from it, with and
# without EdgeQAT's terms (the attention term's teacher: the float checkpoint).
FINETUNE = dict(steps=150, lr=3e-4, eval_every=50, checkpoint_every=50)
_KV4 = dict(attn_bits=8, attn_prob_bits=8, kv_bits=4, kv_group=32)
FINETUNE_ROWS = {
    "int4 K/V (cache), 8-bit Q and probabilities": _KV4,
    "+ EdgeQAT loss (entropy 0.5, attention 1)": dict(_KV4, **EDGEQAT),
    "+ EdgeQAT attention term only": dict(_KV4, edgeqat_attention=1.0),
}
CACHES = {"float32": None, "int8": A.attention_quant(None, None, kv_bits=8),
          "int4 (group 32)": A.attention_quant(None, None, kv_bits=4, kv_group=32)}
QUICK = dict(steps=40, eval_every=20, checkpoint_every=20, eval_batches=4,
             max_corpus_bytes=4_000_000)


def _config(row: str, seed: int, quick: bool, runs_dir: str):
    slug = SLUGS[list(ROWS).index(row)]
    fields = {**ROWS[row], "seed": seed, "baseline": False, **(QUICK if quick else {})}
    return replace(get_config(), name=slug, **fields,
                   out_dir=os.path.join(runs_dir, slug, f"seed{seed}"))


def quality(seeds: list[int], quick: bool) -> list[dict]:
    runs_dir = os.path.join("runs", "attention_kv" + ("_quick" if quick else ""))
    probe = _config(next(iter(ROWS)), seeds[0], quick, runs_dir)
    corpus = train.load_corpus(probe)
    return paired_rows(list(ROWS), lambda row, seed: _config(row, seed, quick, runs_dir), seeds,
                       corpus, "float_attention")


def finetune_quality(seeds: list[int], quick: bool) -> list[dict]:
    """Validation losses of :data:`FINETUNE_ROWS`, QAT from each seed's float checkpoint."""
    runs_dir = os.path.join("runs", "attention_kv" + ("_quick" if quick else ""))
    short = QUICK if quick else {}
    base = {s: os.path.join(runs_dir, "float_base", f"seed{s}") for s in seeds}
    corpus = None
    rows, first = [], None
    for i, (row, fields) in enumerate(FINETUNE_ROWS.items()):
        losses = []
        for seed in seeds:
            float_cfg = replace(get_config(), name="float_base", method=None,
                                seed=seed, baseline=False, **short,
                                out_dir=base[seed])
            cfg = replace(get_config(), name=f"finetune{i}", seed=seed,
                          baseline=False, init_from=base[seed],
                          **{**FINETUNE, **short, **fields},
                          out_dir=os.path.join(runs_dir, f"finetune{i}",
                                               f"seed{seed}"))
            if corpus is None:
                corpus = train.load_corpus(cfg)
            train.train_one(float_cfg, corpus, float_cfg.run_dir)  # cached after the first row
            print(f"== fine-tune: {row}, seed {seed}", flush=True)
            losses.append(train.train_one(cfg, corpus, cfg.run_dir)["val_loss"])
        first = losses if first is None else first
        diffs = [100 * (a / b - 1) for a, b in zip(losses, first, strict=True)]
        rows.append({"row": row, "val_loss": losses, "mean": statistics.fmean(losses),
                     "vs_first_pct": diffs, "vs_first_mean_pct": statistics.fmean(diffs)})
    return rows


def cache_bytes(cfg: LlamaConfig) -> dict[str, float]:
    """KV-cache bytes per token, all layers, keys and values."""
    out = {}
    for name, attention in CACHES.items():
        caches = init_caches(cfg, 1, cfg.max_seq_len, attention=attention)
        out[name] = sum(A.kv_cache_bytes(c) for c in caches) / cfg.max_seq_len
    return out


def decode_speed(cfg: LlamaConfig, batches: tuple[int, ...], repeats: int) -> dict:
    """Tokens per second of greedy decoding with each cache (float32 linears)."""
    prompt_len, steps = 16, cfg.max_seq_len - 16
    out = {}
    for b in batches:
        prompt = jax.random.randint(jax.random.key(b), (b, prompt_len), 0, cfg.vocab_size)
        fns = {}
        for name, attention in CACHES.items():
            model = Llama(cfg, attention=attention)
            params = model.init(jax.random.key(0), prompt)["params"]
            extend = lambda p, i, c, m=model: m.apply({"params": p}, i, c, method="extend")
            gen = jax.jit(functools.partial(greedy_generate, extend, steps=steps))
            caches = init_caches(cfg, b, attention=attention)
            fns[name] = (lambda gen=gen, p=params, c=caches, pr=prompt:
                         gen(p, pr, caches=c).block_until_ready())
        seconds = interleaved_medians(fns, warmup=1, repeats=repeats)
        out[b] = {name: b * steps / s for name, s in seconds.items()}
    return out


def main(seeds: list[int], quick: bool) -> None:
    cfg = get_config()
    mc = dataclasses.replace(cfg.model, max_seq_len=128)
    rows = quality(seeds, quick)
    tuned = finetune_quality(seeds, quick)
    per_token = cache_bytes(dataclasses.replace(mc, max_seq_len=cfg.model.max_seq_len))
    batches = (1, 8)
    speed = decode_speed(mc, batches, 3 if quick else 7)
    payload = {"seeds": seeds, "quick": quick, "rows": rows, "finetune_rows": tuned,
               "finetune": FINETUNE, "cache_bytes_per_token": per_token,
               "decode_tokens_per_second": {str(b): v for b, v in speed.items()},
               "machine": machine()}
    steps = QUICK["steps"] if quick else cfg.optim.steps
    m = cfg.model
    lines = ["# Quantized attention and KV cache (reference Llama, CPU)", "",
             f"Tiny byte-level Llama (d={m.d_model}, {m.n_layers} layers, {m.n_heads} "
             f"heads, seq {m.max_seq_len}), QuEST W4A4 linears, {steps} steps; seeds {seeds}, "
             "paired (same init and batches).", "",
             "| attention | val loss per seed | mean | vs float attention (%) |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {', '.join(f'{v:.4f}' for v in r['val_loss'])} | "
                     f"{r['mean']:.4f} | {r['vs_float_attention_mean_pct']:+.2f} |")
    lines += ["", f"From a float checkpoint (each seed's float model, {steps} steps), "
              f"{FINETUNE['steps'] if not quick else steps} steps of QuEST W4A4 QAT at lr "
              f"{FINETUNE['lr']:g} (EdgeQAT's setting; the attention term's teacher is the "
              "float checkpoint):", "",
              "| attention | val loss per seed | mean | vs first row (%) |", "|---|---|---|---|"]
    for r in tuned:
        lines.append(f"| {r['row']} | {', '.join(f'{v:.4f}' for v in r['val_loss'])} | "
                     f"{r['mean']:.4f} | {r['vs_first_mean_pct']:+.2f} |")
    lines += ["", "| KV cache | bytes per token (all layers, K and V) | x float32 | "
              + " | ".join(f"decode tok/s b{b}" for b in batches) + " |",
              "|---|---|---|" + "---|" * len(batches)]
    for name in CACHES:
        lines.append(f"| {name} | {per_token[name]:,.0f} | "
                     f"{per_token[name] / per_token['float32']:.3f} | "
                     + " | ".join(f"{speed[b][name]:,.0f}" for b in batches) + " |")
    lines += ["", "Decode: float32 linears, greedy, prefill 16 then one token per call "
              f"(jitted `lax.fori_loop`), capacity {mc.max_seq_len}; the quantized caches "
              "store codes and scales and dequantize the whole cache every step in XLA.", "",
              f"Machine: {payload['machine']}"]
    print("\n".join(lines))
    write_results("attention_kv" + ("_quick" if quick else ""), payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    seeds_cli(main, __doc__)
