"""Compute-optimal QAT from scratch: cooldown fusion against classical QAT at equal tokens.

The main job's tiny byte-level Llama (``configs/quest_w4a4_tiny.py``: d=128, 2 layers, seq 256,
batch 16, 500 steps = 2.05M tokens of the Python standard library), QuEST W4A4, trained from
scratch by the training program with the schedules of :mod:`qjax.methods.compute_optimal`:

* ``wsd_fused`` (cooldown fusion): float at the constant peak LR of a warmup-stable-decay
  schedule, QAT switched on exactly where the cooldown starts, the LR decay done in QAT only;
* ``wsd_classical``: a whole float WSD run with its own cooldown, then QAT with a re-warmup and
  its own decay, in the same total steps;

each with the last ``f`` of the steps in QAT, ``f`` the loss-optimal fraction
``f* = exp(-6.7297 / ln S)`` (``qat_fraction="optimal"``; ``S`` = tokens per parameter-byte of
the 4-bit model) and two larger fractions. Every run of a seed starts from the same init and
sees the same batches; the table is the quantized model's validation loss at the end.

Goal (issue "QAT of pretrained LLMs on a budget"): cooldown fusion <= classical at equal tokens.

Run: ``python -m benchmarks.compute_optimal_qat [--seeds 0,1] [--quick]``; writes
``benchmarks/results/compute_optimal_qat.{json,md}``. Runs resume from
``runs/compute_optimal_qat``.

References:
  Dremov, A., et al. (2025). Compute-Optimal Quantization-Aware Training. arXiv:2509.22935.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from qjax import train
from qjax.config import replace
from qjax.methods import compute_optimal
from qjax.models.llama import non_embedding_params

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
from quest_w4a4_tiny import get_config  # noqa: E402  (configs/ is not a package)

try:
    from benchmarks._timing import machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _timing import machine, write_results

FRACTIONS = ("optimal", 0.2, 0.5)
SCHEDULES = ("wsd_fused", "wsd_classical")
# The smoke run's budget: enough tokens for S = tokens / (N * 4 / 8) > 1 (f* is defined).
QUICK = dict(steps=80, eval_every=40, checkpoint_every=40, eval_batches=4,
             max_corpus_bytes=4_000_000)


def _config(schedule: str, fraction, seed: int, quick: bool, runs_dir: str):
    slug = f"{schedule}_{fraction if fraction == 'optimal' else int(100 * fraction)}"
    return replace(
                   get_config(), name=slug, schedule=schedule, qat_fraction=fraction, seed=seed,
                   baseline=False, **(QUICK if quick else {}),
                   out_dir=os.path.join(runs_dir, slug, f"seed{seed}"))


def f_star(config) -> tuple[float, float]:
    """(S, f*) of the config's model (its non-embedding parameters) and token budget."""
    _, params = train.build_model(config)
    n = non_embedding_params(params)
    tokens = config.optim.steps * config.optim.batch_size * config.model.max_seq_len
    s = compute_optimal.tokens_per_param_byte(tokens, n, config.quant.weight_bits)
    return s, compute_optimal.optimal_qat_fraction(tokens, n, config.quant.weight_bits)


def main(seeds: list[int], quick: bool) -> None:
    runs_dir = os.path.join("runs", "compute_optimal_qat" + ("_quick" if quick else ""))
    probe = _config(SCHEDULES[0], FRACTIONS[0], seeds[0], quick, runs_dir)
    corpus = train.load_corpus(probe)
    s, fstar = f_star(probe)
    results = {}
    for fraction in FRACTIONS:
        for schedule in SCHEDULES:
            losses = []
            for seed in seeds:
                cfg = _config(schedule, fraction, seed, quick, runs_dir)
                print(f"== {schedule}, qat_fraction={fraction}, seed {seed}", flush=True)
                losses.append(train.train_one(cfg, corpus, cfg.run_dir)["val_loss"])
            results[(schedule, fraction)] = losses
    rows = []
    for fraction in FRACTIONS:
        fused, classical = results[("wsd_fused", fraction)], results[("wsd_classical", fraction)]
        diffs = [100 * (a / b - 1) for a, b in zip(fused, classical, strict=True)]
        rows.append({"qat_fraction": fstar if fraction == "optimal" else fraction,
                     "optimal": fraction == "optimal", "fused": fused, "classical": classical,
                     "fused_vs_classical_pct": diffs,
                     "fused_vs_classical_mean_pct": statistics.fmean(diffs)})
    cfg = get_config()
    steps = QUICK["steps"] if quick else cfg.optim.steps
    tokens = steps * cfg.optim.batch_size * cfg.model.max_seq_len
    m = cfg.model
    lines = ["# Compute-optimal QAT: cooldown fusion vs classical (from scratch, QuEST W4A4)", "",
             f"Tiny byte-level Llama (d={m.d_model}, {m.n_layers} layers, seq {m.max_seq_len}, "
             f"batch {cfg.optim.batch_size}), {steps} steps = {tokens:,} tokens; S = {s:.2f} "
             f"tokens per parameter-byte at 4 bits, f* = exp(-6.7297 / ln S) = {fstar:.4f} "
             f"({round(fstar * steps)} QAT steps); seeds {seeds}, paired (same init and "
             "batches). Quantized model's validation loss (nats/byte).", "",
             "| QAT fraction | cooldown fusion (per seed) | classical (per seed) "
             "| fused vs classical |",
             "|---|---|---|---|"]
    for r in rows:
        name = f"f* = {r['qat_fraction']:.4f}" if r["optimal"] else f"{r['qat_fraction']:g}"
        lines.append(f"| {name} | {', '.join(f'{v:.4f}' for v in r['fused'])} | "
                     f"{', '.join(f'{v:.4f}' for v in r['classical'])} | "
                     f"{r['fused_vs_classical_mean_pct']:+.2f} % |")
    best = min(rows, key=lambda r: statistics.fmean(r["fused"]))
    met = all(r["fused_vs_classical_mean_pct"] <= 0 for r in rows)
    lines += ["", f"Goal, cooldown fusion <= classical at equal tokens: "
              f"{'MET' if met else 'NOT MET'} (mean over seeds, every fraction). Lowest fused "
              f"loss at fraction {best['qat_fraction']:.4g}"
              f"{' (f*)' if best['optimal'] else ''}.", "", f"Machine: {machine()}"]
    payload = {"seeds": seeds, "quick": quick, "steps": steps, "tokens": tokens,
               "tokens_per_param_byte": s, "f_star": fstar, "rows": rows,
               "machine": machine()}
    md = "\n".join(lines) + "\n"
    print(md)
    write_results("compute_optimal_qat_quick" if quick else "compute_optimal_qat", payload, md)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    main([int(s) for s in args.seeds.split(",")], args.quick)
