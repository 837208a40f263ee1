"""Test helper: a :class:`qjax.config.TrainConfig` from the defaults and short field names."""

from qjax.config import TrainConfig, replace


def train_config(**fields) -> TrainConfig:
    """``replace(TrainConfig(), **fields)``: e.g. ``train_config(steps=4, d_model=32)``."""
    return replace(TrainConfig(), **fields)
