"""Training configuration: a frozen dataclass, loaded from a Python file and overridden by strings.

A config file (``configs/<name>.py``) defines ``get_config() -> TrainConfig``; it may import
modules beside it (the study rows share ``configs/_study.py``).
``load_config(path, overrides)`` imports it and applies ``key=value`` overrides, converting each
value to the field's type; an unknown key is an error that names it and lists the known ones.
"""

from qjax._src.config import (
    METHOD_NAMES,
    SCHEDULES,
    Schedule,
    TrainConfig,
    apply_overrides,
    load_config,
)

__all__ = [
    "apply_overrides",
    "load_config",
    "METHOD_NAMES",
    "Schedule",
    "SCHEDULES",
    "TrainConfig",
]
