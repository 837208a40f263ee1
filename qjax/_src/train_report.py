"""What a training run reports: its label, the progress line, the metrics file and the table.

Used by :mod:`qjax.train`; pure formatting and file I/O, no JAX.
"""

from __future__ import annotations

import json
import math
import os
import sys

from qjax._src.atomic_files import write_text_atomically
from qjax._src.config import LOW_RANK_METHODS, TrainConfig

__all__ = ["label", "Progress", "read_metrics", "results_table"]


def label(config: TrainConfig) -> str:
    """The run's row name in the table, e.g. ``quest W4A4``, ``lr_qat r8 W4`` or ``quest W4A4
    QKV8/4 P8 KV4g32`` (quantized attention: Q/K/V widths, token-adaptive high/low, attention
    probabilities, KV cache width and group)."""
    q, m = config.quant, config.method_options
    if q.method is None:
        return "float32"
    w = f"W{q.weight_bits}" if q.weight_bits else ""
    a = f"A{q.act_bits}" if q.act_bits else ""
    name = q.method + ("+ste" if q.estimator == "ste" and q.method == "quest" else "")
    if q.grid == "post":  # ASQ's power-of-sqrt(2) weights
        name += "+post"
    if q.scale_rule != "auto":
        name += "+" + q.scale_rule.split(":")[0]
    if q.method == "double_rounding":
        w = "W" + "/".join(map(str, m.double_rounding_bits))
        if m.double_rounding_weights is not None:  # the loss weights, per width
            name += " w" + "/".join(f"{v:g}" for v in m.double_rounding_weights)
    if m.mixed_precision_budget is not None:  # an average over the layers' widths
        name, w = name + "+hawq", f"W{m.mixed_precision_budget:g}"
    if m.distill:
        name += f"+kd{m.distill:g}"
    if m.edgeqat_entropy or m.edgeqat_attention:
        name += f"+edgeqat{m.edgeqat_entropy:g}/{m.edgeqat_attention:g}"
    if m.cga_boundary_range is not None:
        name += f"+cga{m.cga_boundary_range:g}"
    if q.method in LOW_RANK_METHODS:
        name += f" r{m.rank}" + ("" if m.phi_dtype == "float32" else f" {m.phi_dtype}")
    return f"{name} {w}{a}{_attention_label(config)}"


def _attention_label(config: TrainConfig) -> str:
    """`` QKV8/4 P8 KV4g32``: Q/K/V widths (token-adaptive: high/low), probabilities, cache."""
    parts = []
    # The low width follows the first width it lowers: Q/K/V's, else the cache's K and V.
    at = config.attention
    low = "" if at.attn_low_bits is None else f"/{at.attn_low_bits}"
    if at.attn_bits is not None:
        parts.append(f"QKV{at.attn_bits}{low}")
        low = ""
    if at.attn_prob_bits is not None:
        parts.append(f"P{at.attn_prob_bits}")
    if at.kv_bits is not None:
        group = "" if at.kv_group is None else f"g{at.kv_group}"
        parts.append(f"KV{at.kv_bits}{low}{group}")
    return "".join(" " + p for p in parts)


class Progress:
    """A one-line progress bar on a terminal; plain lines every ``log_every`` steps otherwise."""

    def __init__(self, total: int, label: str, log_every: int):
        self.total, self.label, self.log_every = total, label, log_every
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, tok_s: float) -> None:
        frac = step / self.total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        line = (f"{self.label:>14} [{bar}] {step}/{self.total} loss {loss:.4f} "
                f"{tok_s:,.0f} tok/s")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif step % self.log_every == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


def read_metrics(path: str, keep_until: int) -> list[dict]:
    """Rows of ``metrics.jsonl`` up to step ``keep_until``; rewrites the file without the rest."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r["step"] <= keep_until]
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows

def results_table(results: list[dict], entropy: float) -> str:
    """The Markdown table of the runs' validation losses (and the gap to the float run)."""
    base = next((r["val_loss"] for r in results if r["method"] is None), None)
    lines = ["| model | val loss (nats/byte) | val ppl | vs float | tokens |",
             "|---|---|---|---|---|"]
    for r in results:
        rows = [(r["label"], r["val_loss"])]
        if "val_loss_at_bits" in r:  # one Double Rounding model served at each width
            rows = [(f"{r['label'].split(' W')[0]} W{b} (of W{r['weight_bits']})", v)
                    for b, v in r["val_loss_at_bits"].items()]
        for label, loss in rows:
            gap = "" if base is None or r["method"] is None else \
                f"{100 * (loss / base - 1):+.1f}%"
            lines.append(f"| {label} | {loss:.4f} | {math.exp(loss):.3f} | {gap} | "
                         f"{r['tokens']:,} |")
    lines.append(f"| unigram entropy of val bytes | {entropy:.4f} | {math.exp(entropy):.3f} | | |")
    return "\n".join(lines)
