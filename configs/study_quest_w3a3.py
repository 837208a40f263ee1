"""QuEST study row 'quest_w3a3': see qjax.config.STUDY for what differs between rows."""

from qjax.config import TrainConfig, study_config


def get_config() -> TrainConfig:
    return study_config("quest_w3a3")
