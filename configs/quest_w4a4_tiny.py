"""The main job: QuEST W4A4 on a tiny Llama-style LM, against its float baseline.

Byte-level model, d=128, 2 layers, 4 heads, seq 256, batch 16, 500 steps (2M tokens of the Python
standard library's sources), AdamW lr 3e-3 with the QuEST recipe. About 3-4 minutes per run on a
2-core CPU.
"""

from qjax.config import OptimConfig, QuantConfig, TrainConfig
from qjax.models import LlamaConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="quest_w4a4_tiny",
        model=LlamaConfig(d_model=128, n_layers=2, n_heads=4, max_seq_len=256),
        optim=OptimConfig(batch_size=16, steps=500, lr=3e-3),
        quant=QuantConfig(method="quest", weight_bits=4, act_bits=4),
        eval_every=100, checkpoint_every=100)
