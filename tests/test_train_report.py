"""Tests for the training program's report: run labels, metrics file, results table."""

import json
import math

import pytest
from train_configs import train_config

from qjax._src.train_report import label, read_metrics, results_table


@pytest.mark.parametrize(("overrides", "expected"), [
    (dict(method=None), "float32"),
    (dict(), "quest W4A4"),
    (dict(estimator="ste"), "quest+ste W4A4"),
    (dict(method="lsq", weight_bits=2, act_bits=None), "lsq W2"),
    (dict(method="lsq", attn_bits=8, attn_prob_bits=8), "lsq W4A4 QKV8 P8"),
    (dict(attn_bits=8, attn_low_bits=4), "quest W4A4 QKV8/4"),
    (dict(kv_bits=4, kv_group=16), "quest W4A4 KV4g16"),
    (dict(kv_bits=8, attn_low_bits=4), "quest W4A4 KV8/4"),
    (dict(attn_bits=8, attn_prob_bits=4, kv_bits=4, attn_low_bits=2),
     "quest W4A4 QKV8/2 P4 KV4"),
    (dict(method="double_rounding", weight_bits=8, act_bits=None, double_rounding_bits=(8, 4)),
     "double_rounding W8/4"),
    (dict(method="double_rounding", weight_bits=8, act_bits=None, double_rounding_bits=(8, 4),
          double_rounding_weights=(1, 0.25)), "double_rounding w1/0.25 W8/4"),
])
def test_label_names_everything_that_changes_the_results(overrides, expected):
    assert label(train_config(**overrides)) == expected


def test_read_metrics_drops_rows_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    assert [r["step"] for r in read_metrics(str(path), 2)] == [1, 2]
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert read_metrics(str(tmp_path / "absent.jsonl"), 5) == []


def test_results_table_gaps_and_double_rounding_rows():
    rows = [dict(label="float32", method=None, val_loss=1.0, tokens=100),
            dict(label="quest W4A4", method="quest", val_loss=1.1, tokens=100),
            dict(label="double_rounding W8/4", method="double_rounding", weight_bits=8,
                 val_loss=1.2, val_loss_at_bits={"8": 1.05, "4": 1.2}, tokens=100)]
    table = results_table(rows, entropy=2.0).splitlines()
    assert table[2] == f"| float32 | 1.0000 | {math.e:.3f} |  | 100 |"
    assert table[3].startswith("| quest W4A4 | 1.1000 |") and "+10.0%" in table[3]
    assert table[4].startswith("| double_rounding W8 (of W8) | 1.0500 |") and "+5.0%" in table[4]
    assert table[5].startswith("| double_rounding W4 (of W8) | 1.2000 |")
    assert table[-1].startswith("| unigram entropy of val bytes | 2.0000 |")
