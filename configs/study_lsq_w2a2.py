"""QuEST study row 'lsq_w2a2': see qjax.config.STUDY for what differs between rows."""

from qjax.config import TrainConfig, study_config


def get_config() -> TrainConfig:
    return study_config("lsq_w2a2")
