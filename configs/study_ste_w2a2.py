"""QuEST study row 'ste_w2a2': see configs/_study.py for what differs between rows."""

from _study import study_config

from qjax.config import TrainConfig


def get_config() -> TrainConfig:
    return study_config("ste_w2a2")
