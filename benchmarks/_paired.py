"""Paired-seed training rows shared by the benchmark scripts: each row trained on every seed
(same init and batches per seed), its losses relative to the first row's, seed by seed."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from qjax import train


def paired_rows(rows: Sequence[str], make_config: Callable[[str, int], object],
                seeds: Sequence[int], corpus, vs: str) -> list[dict]:
    """``[{"row", "val_loss" (per seed), "mean", "vs_<vs>_pct", "vs_<vs>_mean_pct"}]``: each row's
    ``train.train_one`` validation losses (runs resume from their ``run_dir``) and their
    percentage differences to the first row's on the same seed."""
    out, base = [], None
    for row in rows:
        losses = []
        for seed in seeds:
            cfg = make_config(row, seed)
            print(f"== {row}, seed {seed}", flush=True)
            losses.append(train.train_one(cfg, corpus, cfg.run_dir)["val_loss"])
        base = losses if base is None else base
        diffs = [100 * (a / b - 1) for a, b in zip(losses, base, strict=True)]
        out.append({"row": row, "val_loss": losses, "mean": statistics.fmean(losses),
                    f"vs_{vs}_pct": diffs, f"vs_{vs}_mean_pct": statistics.fmean(diffs)})
    return out
