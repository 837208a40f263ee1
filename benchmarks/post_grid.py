"""ASQ's power-of-sqrt(2) weights (POST) against the uniform grid on the reference Llama.

The main job's tiny byte-level Llama (``configs/quest_w4a4_tiny.py``: d=128, 2 layers, seq 256,
500 steps on the Python standard library), ``method=lsq`` (learned steps: per output channel for
the weights, per tensor for the int activations) at 3 and 4 bits, the weights on the uniform
signed int grid (``grid=int``) or on POST (``grid=post``: levels ``0, +-2^(-k/2)``, the learned
step being the clip, initialized at the 99th percentile of ``|w|`` as ASQ's released code).
Only the weight grid differs: ASQ's adaptive activation step (:class:`qjax.methods.asq.
ASQActivation`, a learned function of each input) is not a QuantSpec and is not in these runs.
Seeds are paired (same init and batches).

Run: ``python -m benchmarks.post_grid [--quick] [--seeds 0,1]``; writes
``benchmarks/results/post_grid.{json,md}``. Runs resume from ``runs/post_grid``.
"""

from __future__ import annotations

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

BITS = (3, 4)
GRIDS = ("int", "post")
QUICK = dict(steps=40, eval_every=20, checkpoint_every=20, eval_batches=4,
             max_corpus_bytes=4_000_000)


def _config(bits: int, grid: str, seed: int, quick: bool, runs_dir: str):
    slug = f"lsq_{grid}_w{bits}a{bits}"
    fields = dict(method="lsq", grid=grid, weight_bits=bits, act_bits=bits, seed=seed,
                  baseline=False, **(QUICK if quick else {}))
    return replace(get_config(), name=slug, **fields,
                   out_dir=os.path.join(runs_dir, slug, f"seed{seed}"))


def main(seeds: list[int], quick: bool) -> None:
    runs_dir = os.path.join("runs", "post_grid" + ("_quick" if quick else ""))
    corpus = train.load_corpus(_config(BITS[0], GRIDS[0], seeds[0], quick, runs_dir))
    rows = []
    for bits in BITS:
        base = None
        for grid in GRIDS:
            results = []
            for seed in seeds:
                cfg = _config(bits, grid, seed, quick, runs_dir)
                print(f"== lsq W{bits}A{bits} weights on {grid}, seed {seed}", flush=True)
                results.append(train.train_one(cfg, corpus, cfg.run_dir))
            losses = [r["val_loss"] for r in results]
            base = losses if base is None else base
            diffs = [100 * (a / b - 1) for a, b in zip(losses, base, strict=True)]
            rows.append({"bits": bits, "grid": grid, "label": results[0]["label"],
                         "val_loss": losses, "mean": statistics.fmean(losses),
                         "vs_int_pct": diffs, "vs_int_mean_pct": statistics.fmean(diffs)})
    cfg = get_config()
    steps = QUICK["steps"] if quick else cfg.optim.steps
    lines = ["# POST (ASQ's power-of-sqrt(2) grid) vs uniform int weights (reference Llama, CPU)",
             "", f"Tiny byte-level Llama (d={cfg.model.d_model}, {cfg.model.n_layers} layers, seq "
             f"{cfg.model.max_seq_len}), method=lsq, {steps} steps; seeds {seeds}, paired. "
             "Activations: "
             "int, LSQ step per tensor, in every row.", "",
             "| weights | val loss per seed | mean | vs int grid (%) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {', '.join(f'{v:.4f}' for v in r['val_loss'])} | "
                     f"{r['mean']:.4f} | {r['vs_int_mean_pct']:+.2f} |")
    report("post_grid", quick, {"seeds": seeds, "quick": quick, "rows": rows}, lines)


if __name__ == "__main__":
    seeds_cli(main, __doc__)
