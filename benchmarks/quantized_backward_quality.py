"""Does the quantized backward train as well as the float one? Validation loss, seed by seed.

The main job's tiny byte-level Llama (``configs/quest_w4a4_tiny.py``: d=128, 2 layers, seq 256,
batch 16, the Python standard library as corpus) trained with an int8 forward
(``integer_forward=true``) and either the float backward or ``backward=int8`` (both gradient
matmuls int8 x int8 -> int32 on the forward's codes, the output gradient stochastically rounded;
``qjax._src.quantized_backward``), for W8A8 (STE) and QuEST W4A4, at several seeds. Each seed is one
paired comparison (same init, same batches): the table gives both losses, the mean paired
difference with its standard error, and the float backward's spread over seeds, so a gap can be
told from noise.

Run: ``python -m benchmarks.quantized_backward_quality [--quick] [--seeds 0,1] [--steps 300]``;
writes ``benchmarks/results/quantized_backward_quality.{json,md}`` (``_quick`` with
``--quick``: 40 steps on a 4 MB corpus, a smoke run). Runs resume from
``runs/quantized_backward_quality``; about 2 minutes per run on an idle 2-core CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

from qjax import train
from qjax.config import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
from quest_w4a4_tiny import get_config  # noqa: E402  (configs/ is not a package)

try:
    from benchmarks._timing import machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _timing import machine, write_results

ROWS = {
    "W8A8 (STE), int8 forward": dict(method="ste", weight_bits=8, act_bits=8),
    "QuEST W4A4, int8 forward": dict(method="quest", weight_bits=4, act_bits=4),
}
BACKWARDS = ("float", "int8")
QUICK = dict(eval_every=20, checkpoint_every=20, eval_batches=4, max_corpus_bytes=4_000_000)


def _config(row: str, backward: str, seed: int, steps: int, quick: bool, runs_dir: str):
    fields = {**ROWS[row], "integer_forward": True, "backward": backward, "seed": seed,
              "steps": steps, "eval_every": steps // 3, "checkpoint_every": steps // 3,
              "baseline": False, **(QUICK if quick else {})}
    cfg = replace(get_config(), **fields)
    slug = row.split(",")[0].split(" ")[0].lower()
    return replace(cfg, name=f"{slug}_{backward}",
                   out_dir=os.path.join(runs_dir, slug, backward, f"seed{seed}"))


def _paired(float_losses: list[float], int8_losses: list[float]) -> dict:
    diffs = [100 * (b / a - 1) for a, b in zip(float_losses, int8_losses, strict=True)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    spread = statistics.stdev(float_losses) if len(float_losses) > 1 else float("nan")
    return {"per_seed_pct": diffs, "mean_pct": statistics.fmean(diffs), "se_pct": se,
            "float_seed_std": spread,
            "within_noise": bool(abs(statistics.fmean(diffs)) <= 2 * se) if se == se else None}


def main(seeds: list[int], steps: int, quick: bool) -> None:
    runs_dir = os.path.join("runs", "quantized_backward_quality" + ("_quick" if quick else ""))
    probe = _config(next(iter(ROWS)), "float", seeds[0], steps, quick, runs_dir)
    corpus = train.load_corpus(probe)
    rows = []
    for row in ROWS:
        losses = {}
        for backward in BACKWARDS:
            losses[backward] = []
            for seed in seeds:
                cfg = _config(row, backward, seed, steps, quick, runs_dir)
                print(f"== {row}, backward {backward}, seed {seed}", flush=True)
                losses[backward].append(train.train_one(cfg, corpus, cfg.run_dir)["val_loss"])
        rows.append({"row": row, "seeds": seeds, "val_loss": losses,
                     **_paired(losses["float"], losses["int8"])})
    payload = {"steps": steps, "seeds": seeds, "quick": quick,
               "tokens": steps * probe.optim.batch_size * probe.model.max_seq_len, "rows": rows,
               "machine": machine()}
    lines = ["# Quantized backward: validation loss against the float backward", "",
             f"Tiny byte-level Llama (configs/quest_w4a4_tiny.py sizes), {steps} steps "
             f"({payload['tokens']:,} tokens), int8 forward in both; seeds {seeds}, each a "
             "paired run (same init and batches). Difference: int8 backward vs float backward, "
             "per seed, then mean +- standard error.", "",
             "| row | val loss, float bwd | val loss, int8 bwd | difference (%) | float bwd "
             "seed std | within 2 s.e. |", "|---|---|---|---|---|---|"]
    for r in rows:
        f = ", ".join(f"{v:.4f}" for v in r["val_loss"]["float"])
        i = ", ".join(f"{v:.4f}" for v in r["val_loss"]["int8"])
        lines.append(f"| {r['row']} | {f} | {i} | {r['mean_pct']:+.2f} +- {r['se_pct']:.2f} | "
                     f"{r['float_seed_std']:.4f} | {r['within_noise']} |")
    lines += ["", f"Machine: {payload['machine']}"]
    print("\n".join(lines))
    write_results("quantized_backward_quality" + ("_quick" if quick else ""), payload,
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    a = parser.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    main(seeds, 40 if a.quick and a.steps == 300 else a.steps, a.quick)
