"""QuEST study row 'quest_mse_w2a2': see qjax.config.STUDY for what differs between rows."""

from qjax.config import TrainConfig, study_config


def get_config() -> TrainConfig:
    return study_config("quest_mse_w2a2")
