"""OFQ on the reference Llama: StatsQ W2A2 / W3A3 with and without confidence-guided annealing.

The main job's tiny byte-level Llama (``configs/quest_w4a4_tiny.py``: d=128, 2 layers, seq 256,
500 steps on the Python standard library), ``method=ofq`` (StatsQ weights per output channel,
LSQ activations per tensor; :mod:`qjax.methods.ofq`), at 2 and 3 bits, each without CGA and
with CGA (:data:`VARIANTS`) at boundary range 0.02 steps from half-way (``cga_start=0.5``: the
second half of the cosine decay) and from 80 % of the steps (a short final annealing phase).
The boundary range follows the rule the least-squares check in ``tests/test_ofq.py`` found (CGA
helps when BR is about the per-step movement ``lr / step``: the lr at 80 %, about 6e-4, over a
2-bit StatsQ step of about 0.03-0.07). Seeds are paired (same init and batches). The training
program logs ``osc_ratio``, the fraction of block-kernel weights whose EMA code-flip frequency
exceeds 0.005 (Nagel et al. 2022), every 10 steps; it is plotted over training.

Run: ``python -m benchmarks.ofq_oscillation [--quick] [--seeds 0,1]``; writes
``benchmarks/results/ofq_oscillation.{json,md,png}``. Runs resume from ``runs/ofq_oscillation``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from qjax import train
from qjax.config import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
from quest_w4a4_tiny import get_config  # noqa: E402  (configs/ is not a package)

try:
    from benchmarks._timing import report, seeds_cli
except ImportError:  # run as a script from the benchmarks folder
    from _timing import report, seeds_cli

BOUNDARY_RANGE = 0.02
VARIANTS = {"": {}, "_cga": dict(cga_boundary_range=BOUNDARY_RANGE, cga_start=0.5),
            "_cga_late": dict(cga_boundary_range=BOUNDARY_RANGE, cga_start=0.8)}
BITS = (2, 3)
QUICK = dict(steps=40, eval_every=20, checkpoint_every=20, eval_batches=4,
             max_corpus_bytes=4_000_000)


def _config(bits: int, variant: str, seed: int, quick: bool, runs_dir: str):
    slug = f"w{bits}a{bits}{variant}"
    fields = dict(method="ofq", weight_bits=bits, act_bits=bits, seed=seed, baseline=False,
                  log_every=10, **VARIANTS[variant], **(QUICK if quick else {}))
    return replace(get_config(), name=slug, **fields,
                   out_dir=os.path.join(runs_dir, slug, f"seed{seed}"))


def _osc_curve(run_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["step"], r["osc_ratio"]) for r in rows if "osc_ratio" in r]


def run_all(seeds: list[int], quick: bool) -> list[dict]:
    runs_dir = os.path.join("runs", "ofq_oscillation" + ("_quick" if quick else ""))
    probe = _config(BITS[0], "", seeds[0], quick, runs_dir)
    corpus = train.load_corpus(probe)
    rows = []
    for bits in BITS:
        for variant, fields in VARIANTS.items():
            results, curves = [], []
            for seed in seeds:
                cfg = _config(bits, variant, seed, quick, runs_dir)
                print(f"== W{bits}A{bits} {variant or 'no CGA'}, seed {seed}", flush=True)
                results.append(train.train_one(cfg, corpus, cfg.run_dir))
                curves.append(_osc_curve(cfg.run_dir))
            start = fields.get("cga_start")
            label = results[0]["label"] + ("" if start is None else f" from {start:.0%}")
            rows.append({"bits": bits, "cga_start": start, "label": label,
                         "val_loss": [r["val_loss"] for r in results],
                         "final_osc_ratio": [r["osc_ratio"] for r in results],
                         "osc_curves": curves})
    return rows


def _plot(path: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        steps, ratio = zip(*r["osc_curves"][0], strict=True)
        ax.plot(steps, ratio, label=r["label"], linestyle="--" if r["cga_start"] is None else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("oscillation ratio (EMA flip frequency > 0.005)")
    ax.set_title("OFQ StatsQ on the reference Llama (seed 0)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(seeds: list[int], quick: bool) -> None:
    cfg = get_config()
    rows = run_all(seeds, quick)
    steps = QUICK["steps"] if quick else cfg.optim.steps
    m = cfg.model
    lines = ["# OFQ: oscillations and confidence-guided annealing (reference Llama, CPU)", "",
             f"Tiny byte-level Llama (d={m.d_model}, {m.n_layers} layers, seq {m.max_seq_len}),"
             f" method=ofq (StatsQ weights, LSQ activations), {steps} steps; CGA at boundary "
             f"range {BOUNDARY_RANGE} steps; seeds {seeds}, paired.", "",
             "| run | val loss per seed | mean | vs no CGA (%) | final osc. ratio per seed |",
             "|---|---|---|---|---|"]
    by_bits = {}
    for r in rows:
        mean = statistics.fmean(r["val_loss"])
        base = by_bits.setdefault(r["bits"], r["val_loss"])
        diff = statistics.fmean(100 * (a / b - 1) for a, b in zip(r["val_loss"], base,
                                                                   strict=True))
        r["vs_no_cga_pct"] = diff
        lines.append(f"| {r['label']} | {', '.join(f'{v:.4f}' for v in r['val_loss'])} | "
                     f"{mean:.4f} | {diff:+.2f} | "
                     f"{', '.join(f'{v:.4f}' for v in r['final_osc_ratio'])} |")
    payload = {"seeds": seeds, "quick": quick, "boundary_range": BOUNDARY_RANGE,
               "variants": VARIANTS, "rows": rows}
    lines += ["", "Oscillation ratio: the fraction of the blocks' kernel weights whose EMA "
              "(momentum 0.01) frequency of StatsQ code direction flips exceeds 0.005, "
              "logged every 10 steps (plot: ofq_oscillation.png)."]
    jpath, _ = report("ofq_oscillation", quick, payload, lines)
    _plot(os.path.splitext(jpath)[0] + ".png", rows)


if __name__ == "__main__":
    seeds_cli(main, __doc__)
