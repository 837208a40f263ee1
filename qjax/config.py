"""Training configuration: a frozen dataclass of sections, loaded from a Python file and
overridden by strings.

A :class:`TrainConfig` nests the model (:class:`qjax.models.LlamaConfig`), the corpus
(:class:`qjax.data.CorpusConfig`), :class:`OptimConfig`, the quantization recipe
(:class:`QuantConfig`), :class:`AttentionConfig`, the literature methods' :class:`MethodOptions`
and :class:`ParallelConfig`. Every field has a short name unique across the config (``lr``,
``weight_bits``, ``d_model``, ``seq_len``, ``corpus_paths``) and a dotted path (``optim.lr``):
:func:`replace` changes fields by short name, and ``load_config(path, overrides)`` imports a
config file (``configs/<name>.py`` defining ``get_config() -> TrainConfig``; it may import
modules beside it) and applies ``key=value`` overrides, converting each value to the field's
type; an unknown key is an error that names it and lists the known ones.
"""

from qjax._src.config import (
    METHOD_NAMES,
    SCHEDULES,
    AttentionConfig,
    MethodOptions,
    OptimConfig,
    ParallelConfig,
    QuantConfig,
    Schedule,
    TrainConfig,
)
from qjax._src.config_keys import apply_overrides, load_config, replace

__all__ = [
    "apply_overrides",
    "AttentionConfig",
    "load_config",
    "METHOD_NAMES",
    "MethodOptions",
    "OptimConfig",
    "ParallelConfig",
    "QuantConfig",
    "replace",
    "Schedule",
    "SCHEDULES",
    "TrainConfig",
]
