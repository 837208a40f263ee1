"""QuEST study row 'quest_mse_w4a4': see qjax.config.STUDY for what differs between rows."""

from qjax.config import TrainConfig, study_config


def get_config() -> TrainConfig:
    return study_config("quest_mse_w4a4")
