"""EdgeQAT's token-adaptive attention widths against uniform ones on the reference Llama.

The main job's tiny byte-level Llama (``configs/quest_w4a4_tiny.py``: d=128, 2 layers, seq 256,
500 steps on the Python standard library, QuEST W4A4 linears) with quantized attention: Q, K, V
per token and head, probabilities uint8 per row, and Q, K, V at

- int8 for every token (``attn_bits=8``),
- int8, the least important half of each sequence's tokens int4 (``attn_bits=8
  attn_low_bits=4``: EdgeQAT's token-adaptive widths, V by the layer's own attention logits, Q
  and K by the previous layer's choice),
- int4 for every token (``attn_bits=4``),

so the adaptive row's average Q/K/V width (6 bits) sits between the uniform ones. Seeds are
paired (same init and batches).

Run: ``python -m benchmarks.token_adaptive_attention [--quick] [--seeds 0,1]``; writes
``benchmarks/results/token_adaptive_attention.{json,md}``. Runs resume from
``runs/token_adaptive_attention``.
"""

from __future__ import annotations

import os
import sys

from qjax import train
from qjax.config import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
from quest_w4a4_tiny import get_config  # noqa: E402  (configs/ is not a package)

try:
    from benchmarks._paired import paired_rows
    from benchmarks._timing import report, seeds_cli
except ImportError:  # run as a script from the benchmarks folder
    from _paired import paired_rows
    from _timing import report, seeds_cli

ROWS = {
    "int8 Q/K/V": dict(attn_bits=8),
    "int8 Q/K/V, least important half int4 (token-adaptive)": dict(attn_bits=8, attn_low_bits=4,
                                                                    attn_low_fraction=0.5),
    "int4 Q/K/V": dict(attn_bits=4),
}
SLUGS = ("int8", "adaptive_8_4", "int4")
QUICK = dict(steps=40, eval_every=20, checkpoint_every=20, eval_batches=4,
             max_corpus_bytes=4_000_000)


def _config(row: str, seed: int, quick: bool, runs_dir: str):
    slug = SLUGS[list(ROWS).index(row)]
    fields = dict(**ROWS[row], attn_prob_bits=8, seed=seed, baseline=False,
                  **(QUICK if quick else {}))
    return replace(get_config(), name=slug, **fields,
                   out_dir=os.path.join(runs_dir, slug, f"seed{seed}"))


def main(seeds: list[int], quick: bool) -> None:
    runs_dir = os.path.join("runs", "token_adaptive_attention" + ("_quick" if quick else ""))
    corpus = train.load_corpus(_config(next(iter(ROWS)), seeds[0], quick, runs_dir))
    rows = paired_rows(list(ROWS), lambda row, seed: _config(row, seed, quick, runs_dir), seeds,
                       corpus, "int8")
    cfg = get_config()
    steps = QUICK["steps"] if quick else cfg.optim.steps
    lines = ["# Token-adaptive attention widths (EdgeQAT) vs uniform (reference Llama, CPU)", "",
             f"Tiny byte-level Llama (d={cfg.model.d_model}, {cfg.model.n_layers} layers, seq "
             f"{cfg.model.max_seq_len}), QuEST W4A4 linears, uint8 attention probabilities, "
             f"{steps} "
             f"steps; seeds {seeds}, paired.", "",
             "| Q, K, V | val loss per seed | mean | vs int8 (%) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {', '.join(f'{v:.4f}' for v in r['val_loss'])} | "
                     f"{r['mean']:.4f} | {r['vs_int8_mean_pct']:+.2f} |")
    report("token_adaptive_attention", quick, {"seeds": seeds, "quick": quick, "rows": rows},
           lines)


if __name__ == "__main__":
    seeds_cli(main, __doc__)
