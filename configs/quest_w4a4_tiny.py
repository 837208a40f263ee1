"""The main job: QuEST W4A4 on a tiny Llama-style LM, against its float baseline.

Byte-level model, d=128, 2 layers, 4 heads, seq 256, batch 16, 500 steps (2M tokens of the Python
standard library's sources), AdamW lr 3e-3 with the QuEST recipe. About 3-4 minutes per run on a
2-core CPU.
"""

from qjax.config import TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(name="quest_w4a4_tiny", method="quest", weight_bits=4, act_bits=4,
                       steps=500, eval_every=100, checkpoint_every=100)
