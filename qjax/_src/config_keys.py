"""A :class:`~qjax.config.TrainConfig`'s fields by name: short names and dotted paths, the
``key=value`` overrides of the training program, config files, and a run's identity.

Every field of every section has one short name, unique across the config: the section's own
field name (``lr``, ``weight_bits``, ``d_model``, ``attn_bits``), except the corpus's, which
say what they are at the top level (``corpus_paths``, ``corpus_suffixes``, ``max_corpus_bytes``;
``val_fraction`` keeps its name), and the model's context length, which is the training
``seq_len``. Dotted paths (``optim.lr``, ``model.max_seq_len``) name the same fields.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence

from qjax._src.config import SECTIONS, TrainConfig

__all__ = ["replace", "apply_overrides", "load_config", "run_identity", "flat_fields",
           "field_paths", "identity_defaults", "RENAMED_FIELDS", "PLACEMENT_FIELDS",
           "QUANT_FIELDS"]

# Section fields whose short name is not their own name.
_SHORT_NAMES = {("data", "paths"): "corpus_paths", ("data", "suffixes"): "corpus_suffixes",
                ("data", "max_bytes"): "max_corpus_bytes", ("model", "max_seq_len"): "seq_len"}
# Fields renamed since 0.1.0 (old name -> new name): an override or a recorded run identity
# under the old name means the new one.
RENAMED_FIELDS = {"clip": "clip_ratio", "hadamard": "hadamard_mode", "scale": "scale_rule",
                  "block_size": "hadamard_block"}
# Fields that say where and how a run is observed, not what it computes: resuming a run
# directory under other values of these is allowed (e.g. on another mesh, or logging more often).
PLACEMENT_FIELDS = ("name", "out_dir", "stop_after", "baseline", "eval_every", "log_every",
                    "checkpoint_every",
                    *(f.name for f in dataclasses.fields(SECTIONS["parallel"])))


@functools.cache
def field_paths() -> dict[str, tuple[str, ...]]:
    """Every field's short name -> its path in a :class:`TrainConfig` (``("optim", "lr")``, or
    ``("name",)`` for a top-level field), in declaration order."""
    out: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in SECTIONS:
            out[f.name] = (f.name,)
            continue
        for g in dataclasses.fields(SECTIONS[f.name]):
            short = _SHORT_NAMES.get((f.name, g.name), g.name)
            if short in out:  # a new section field must not shadow another's short name
                raise AssertionError(f"two config fields are called {short!r}")
            out[short] = (f.name, g.name)
    return out


# Fields a float run (method=None) does not read: the quantization recipe except the method,
# the quantized attention, the methods' options, and the optimizer's QAT knobs.
QUANT_FIELDS = tuple(
    short for short, path in field_paths().items()
    if (path[0] in ("quant", "attention", "method_options") and short != "method")
    or short in ("qat_start", "quantizer_lr_multiplier"))


def _get(config: TrainConfig, path: tuple[str, ...]):
    value = config
    for p in path:
        value = getattr(value, p)
    return value


def flat_fields(config: TrainConfig) -> dict[str, object]:
    """Every field of ``config`` by its short name (see :func:`field_paths`)."""
    return {short: _get(config, path) for short, path in field_paths().items()}


def _resolve(key: str, value: str = "...") -> tuple[str, ...]:
    paths = field_paths()
    key = key.strip()
    if key in RENAMED_FIELDS:
        raise ValueError(f"config key {key!r} is now {RENAMED_FIELDS[key]!r}; use "
                         f"{RENAMED_FIELDS[key]}={value}")
    if key in paths:
        return paths[key]
    dotted = tuple(key.split("."))
    if dotted in paths.values():
        return dotted
    # A section's own field name whose short name differs (max_seq_len, max_bytes, paths, ...)
    hint = "".join(f"; did you mean {_SHORT_NAMES[path]!r} ({'.'.join(path)})?"
                   for path in _SHORT_NAMES if path[1] == key)
    raise ValueError(f"unknown config key {key!r}{hint} Known keys: {', '.join(sorted(paths))} "
                     f"(or their dotted paths, e.g. optim.lr)")


def replace(config: TrainConfig, **changes) -> TrainConfig:
    """``config`` with fields changed by short name, e.g. ``replace(config, lr=1e-3,
    weight_bits=2, d_model=256)``; a whole section may be given too (``model=LlamaConfig(...)``).

    Raises:
      TypeError: ``config`` is not a :class:`TrainConfig`.
      ValueError: an unknown name (the message lists the known ones), or a value the section
        refuses (naming the field).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    top: dict[str, object] = {}
    nested: dict[str, dict[str, object]] = {}
    for key, value in changes.items():
        path = (key,) if key in SECTIONS else _resolve(key)
        if len(path) == 1:
            top[path[0]] = value
        else:
            nested.setdefault(path[0], {})[path[1]] = value
    for section, fields in nested.items():
        base = top.get(section, getattr(config, section))
        try:
            top[section] = dataclasses.replace(base, **fields)
        except (ValueError, TypeError) as e:  # name the fields as the caller did
            given = ", ".join(_short_name((section, f)) for f in fields)
            raise type(e)(f"{e} (setting {given})") from None
    return dataclasses.replace(config, **top)


def _short_name(path: tuple[str, ...]) -> str:
    return next(short for short, p in field_paths().items() if p == path)


def _hint(path: tuple[str, ...]):
    owner = TrainConfig if len(path) == 1 else SECTIONS[path[0]]
    return typing.get_type_hints(owner)[path[-1]]


def _convert(name: str, text: str, hint) -> object:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return text  # the section checks it, naming the allowed values
    optional = type(None) in args
    if optional and text.strip().lower() in ("none", "null", ""):
        return None
    literals = [v for a in args if typing.get_origin(a) is typing.Literal
                for v in typing.get_args(a)]
    if text in literals:
        return text
    base = [a for a in args if a is not type(None) and typing.get_origin(a) is not typing.Literal
            ][0] if args and (typing.get_origin(hint) in (typing.Union, types.UnionType)) else hint
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0] if typing.get_args(base) else str
        try:
            return tuple(item(p.strip()) for p in text.split(",") if p.strip())
        except ValueError:
            raise ValueError(f"{name} must be a comma list of {item.__name__}, got {text!r}"
                             ) from None
    if typing.get_origin(base) is dict:  # "data:2,fsdp:2" or JSON
        text = text.strip()
        if text.startswith("{"):
            return json.loads(text)
        try:
            return {k.strip(): int(v) for k, v in (p.split(":") for p in text.split(",") if p)}
        except ValueError:
            raise ValueError(f"{name} must look like data:2,fsdp:2, got {text!r}") from None
    if base is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {text!r}")
    try:
        return base(text)
    except ValueError:
        alternatives = "".join(f" or {v!r}" for v in literals)
        raise ValueError(f"{name} must be {base.__name__}{alternatives}, got {text!r}") from None


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Applies ``key=value`` strings (a short name or a dotted path, see :func:`field_paths`),
    converting each value to the field's type.

    Raises:
      ValueError: naming an unknown key (and listing the known ones) or a bad value.
    """
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        path = _resolve(key, value)
        short = _short_name(path)
        changes[short] = _convert(short, value, _hint(path))
    return replace(config, **changes)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Loads ``get_config()`` from a Python file (None: the defaults) and applies overrides."""
    if path is None:
        config = TrainConfig()
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        spec = importlib.util.spec_from_file_location("qjax_user_config", path)
        module = importlib.util.module_from_spec(spec)
        # A config file may import its siblings (e.g. configs/_study.py), as a script could.
        folder = os.path.dirname(os.path.abspath(path))
        sys.path.insert(0, folder)
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(folder)
        if not hasattr(module, "get_config"):
            raise ValueError(f"config file {path!r} must define get_config()")
        try:
            config = module.get_config()
        except TypeError as e:
            if "TrainConfig.__init__() got an unexpected keyword" not in str(e):
                raise
            raise TypeError(f"{e} in {path!r}: a TrainConfig nests its fields in sections "
                            f"(model=LlamaConfig(...), optim=OptimConfig(...), ...); with the "
                            f"short names use qjax.config.replace(TrainConfig(), "
                            f"steps=..., ...)") from None
        if not isinstance(config, TrainConfig):
            raise TypeError(f"get_config() in {path!r} must return a TrainConfig")
    return apply_overrides(config, overrides)


def run_identity(config: TrainConfig) -> dict:
    """The fields that determine a run's results, by short name, as a JSON-able dict.

    Everything except :data:`PLACEMENT_FIELDS`; for a float run also without
    :data:`QUANT_FIELDS` (so a float baseline is shared by runs that differ only in their
    quantization), except ``weight_bits`` when ``qat_fraction="optimal"`` sets the float
    schedule's decay start. Flat (short names), so that the identities recorded before the
    config was nested read the same. Two runs with equal identities on the same corpus train
    the same model on the same batches.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    out = {}
    for short, value in flat_fields(config).items():
        if short in PLACEMENT_FIELDS:
            continue
        if config.quant.method is None and short in QUANT_FIELDS and not (
                short == "weight_bits" and config.optim.qat_fraction == "optimal"):
            continue
        out[short] = value
    return json.loads(json.dumps(out))


def identity_defaults() -> Mapping[str, object]:
    """The default of every field by short name (what a recorded identity that lacks a field,
    written before the field existed, ran with)."""
    return json.loads(json.dumps(flat_fields(TrainConfig())))
