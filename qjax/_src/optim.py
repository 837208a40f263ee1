"""Implementation of :mod:`qjax.optim` (documented there)."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qjax._src._checks import check_pos_int, check_real

__all__ = [
    "QUANTIZER_PARAM_NAMES",
    "VECTOR_PARAM_NAMES",
    "param_labels",
    "weight_decay_mask",
    "warmup_cosine",
    "QATSchedule",
    "qat_adamw",
]

QUANTIZER_PARAM_NAMES = frozenset({"kernel_scale", "input_scale"})
VECTOR_PARAM_NAMES = frozenset({"bias", "scale"})

# Attribute path entries that wrap a parameter rather than name it: ``nnx.Variable`` (``Param``)
# flattens to ``GetAttrKey('value')``, as do Linen's boxed ``nn.Partitioned`` parameters.
_WRAPPER_ATTRS = frozenset({"value", "raw_value", "_raw_value"})

# Leading layer axes of a leaf: one int for all, or a function of (path names, leaf).
StackedAxes = int | Callable[[tuple, object], int]


def _path_names(path) -> tuple:
    """The path as names: dict keys and attribute names, integer indices as ints; the entries of
    wrappers (``GetAttrKey('value')`` of an ``nnx.Variable`` or a boxed Linen parameter) dropped.
    """
    names = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey):
            if entry.name not in _WRAPPER_ATTRS:
                names.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            names.append(entry.idx)
        elif hasattr(entry, "key"):  # DictKey, FlattenedIndexKey
            key = entry.key
            names.append(int(key) if isinstance(key, (int, np.integer))
                         and not isinstance(key, bool) else str(key))
        elif hasattr(entry, "name"):
            names.append(str(entry.name))
    return tuple(names)


def _leaf_name(names: tuple) -> str:
    """The last string name of a path: integer list or layer indices are skipped."""
    for name in reversed(names):
        if isinstance(name, str):
            return name
    return ""


def _check_stacked_axes(stacked_axes):
    if callable(stacked_axes):
        return stacked_axes
    check_pos_int("stacked_axes", stacked_axes, allow_zero=True)
    return None


def param_labels(params, *, stacked_axes: StackedAxes = 0) -> object:
    """A pytree like ``params`` of ``"quantizer"``, ``"matrix"`` or ``"vector"`` labels.

    Works on Linen param dicts, on Flax NNX ``State`` (``nnx.state(model, nnx.Param)``,
    ``nnx.split``; the ``nnx.Param`` leaves get a label inside the same wrapper, so the labels
    have the structure of ``params`` as ``optax.multi_transform`` requires), on pure dicts
    (``nnx.to_pure_dict``) and on what ``nnx.Optimizer`` passes to ``tx.init`` / ``tx.update``.

    The rule, on the leaf's *name* and rank:

    * The name is the last dict key or attribute of the leaf's path, skipping the ``.value``
      entry of an ``nnx.Variable`` (or of a boxed Linen ``nn.Partitioned``) and integer indices
      (``nnx.List`` layers, ``DictKey(0)``): ``{"layers": {0: {"bias": Param(x)}}}`` names
      ``x`` ``"bias"``.
    * ``"quantizer"`` if the name is in :data:`QUANTIZER_PARAM_NAMES` (``kernel_scale``,
      ``input_scale``), whatever its rank.
    * ``"vector"`` if the name is in :data:`VECTOR_PARAM_NAMES` (``bias``, ``scale``: Flax's
      names for biases and norm scales), whatever its rank: a ``LinearGeneral`` bias
      ``(heads, head_dim)`` or a stacked RMSNorm scale ``(layers, dim)`` is a vector.
    * Otherwise ``"matrix"`` if ``ndim - stacked >= 2``, else ``"vector"``, where ``stacked``
      is the number of leading layer axes (``nnx.vmap`` / ``nn.scan`` stacking) given by
      ``stacked_axes``: an int for every leaf (default 0), or a callable
      ``stacked_axes(names, leaf) -> int`` where ``names`` is the path as a tuple of str keys
      and int indices (wrappers dropped), e.g.
      ``lambda names, leaf: 1 if "blocks" in names else 0``. A uniform int is wrong for a
      model that mixes stacked and unstacked leaves: an unstacked ``(vocab, dim)`` embedding
      would count as a vector.

    Example::

      >>> param_labels({"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3),
      ...                         "kernel_scale": jnp.ones((1, 3))}})
      {'dense': {'bias': 'vector', 'kernel': 'matrix', 'kernel_scale': 'quantizer'}}
      >>> param_labels({"blocks": {"gain": jnp.ones((8, 32))}}, stacked_axes=1)
      {'blocks': {'gain': 'vector'}}

    Raises:
      TypeError/ValueError: ``stacked_axes`` is not a non-negative int or a callable, or the
        callable returns something else.
    """
    stacked_fn = _check_stacked_axes(stacked_axes)

    def label(path, leaf):
        names = _path_names(path)
        name = _leaf_name(names)
        if name in QUANTIZER_PARAM_NAMES:
            return "quantizer"
        if name in VECTOR_PARAM_NAMES:
            return "vector"
        if stacked_fn is None:
            stacked = stacked_axes
        else:
            where = "/".join(map(str, names))
            stacked = check_pos_int(f"stacked_axes({where!r}, leaf)", stacked_fn(names, leaf),
                                    allow_zero=True)
        return "matrix" if jnp.ndim(leaf) - stacked >= 2 else "vector"

    return jax.tree_util.tree_map_with_path(label, params)


def weight_decay_mask(params, *, stacked_axes: StackedAxes = 0) -> object:
    """True where :func:`param_labels` says ``"matrix"`` (weights of rank >= 2 that are neither
    quantizer parameters nor named ``bias`` / ``scale``), False elsewhere; same ``stacked_axes``.
    """
    return jax.tree_util.tree_map(lambda lab: lab == "matrix",
                                  param_labels(params, stacked_axes=stacked_axes))


def warmup_cosine(peak_lr: float, total_steps: int, warmup_fraction: float = 0.1,
                  init_ratio: float = 0.01, final_ratio: float = 0.1) -> optax.Schedule:
    """Linear warm-up from ``init_ratio * lr`` over ``warmup_fraction`` of the steps, then cosine
    decay to ``final_ratio * lr`` at ``total_steps``.

    Raises:
      TypeError/ValueError: ``total_steps`` not a positive int, ``peak_lr`` not a finite positive
        number, ``warmup_fraction`` outside [0, 1), a ratio negative or not finite.
    """
    check_pos_int("total_steps", total_steps)
    check_real("peak_lr", peak_lr, 0.0, low_open=True)
    check_real("warmup_fraction", warmup_fraction, 0.0, 1.0, high_open=True)
    check_real("init_ratio", init_ratio, 0.0)
    check_real("final_ratio", final_ratio, 0.0)
    warmup = max(1, int(round(warmup_fraction * total_steps)))
    return optax.warmup_cosine_decay_schedule(
        init_value=peak_lr * init_ratio, peak_value=peak_lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak_lr * final_ratio,
    )


@dataclasses.dataclass(frozen=True)
class QATSchedule:
    """Float training until ``start`` (a step, or a fraction of ``total_steps`` if a float < 1),
    QAT from then on. ``start=0`` is QAT throughout."""

    start: int | float
    total_steps: int

    def __post_init__(self):
        # total_steps is checked even for a step start: a fraction would use it, and a None or
        # negative run length is a mistake either way.
        check_pos_int("total_steps", self.total_steps)
        if isinstance(self.start, float):
            if not 0.0 <= self.start <= 1.0:
                raise ValueError(f"a fractional QAT start must be in [0, 1], got {self.start}")
        elif isinstance(self.start, bool) or not isinstance(self.start, (int, np.integer)):
            raise TypeError(f"start must be an int step >= 0 or a float fraction in [0, 1], "
                            f"got {self.start!r}")
        else:
            check_pos_int("start", self.start, allow_zero=True)

    @property
    def start_step(self) -> int:
        if isinstance(self.start, float):
            return int(math.floor(self.start * self.total_steps))
        return int(self.start)

    def enabled(self, step: int) -> bool:
        """Whether QAT is on at ``step`` (0-based); a static Python bool, for jit."""
        return step >= self.start_step


def qat_adamw(learning_rate: float | optax.Schedule, *, weight_decay: float = 0.1,
              b1: float = 0.9, b2: float = 0.95, grad_clip: float | None = 1.0,
              quantizer_lr_multiplier: float = 1.0, params=None,
              stacked_axes: StackedAxes = 0) -> optax.GradientTransformation:
    """AdamW for QAT: global-norm clipping, decay on matrices only, quantizer params apart.

    Quantizer parameters (LSQ steps, PACT clips) get Adam at ``quantizer_lr_multiplier`` times the
    learning rate and no weight decay. ``grad_clip`` None (or 0) disables clipping. ``params`` is
    only used to validate the labels eagerly. Parameters are grouped by :func:`param_labels`
    (``stacked_axes`` is passed on), so Linen param dicts and NNX state both work, including
    ``nnx.Optimizer(model, qat_adamw(...), wrt=nnx.Param)``.

    Raises:
      TypeError/ValueError: a plain-number ``learning_rate`` not finite and positive (schedules
        and arrays are not checked), ``weight_decay``, ``grad_clip`` or
        ``quantizer_lr_multiplier`` negative or not finite, ``b1`` or ``b2`` outside [0, 1),
        ``stacked_axes`` not an int >= 0 or a callable.
    """
    lr = learning_rate
    if isinstance(lr, numbers.Number):
        check_real("learning_rate", lr, 0.0, low_open=True)
    elif not (callable(lr) or isinstance(lr, (jax.Array, np.ndarray))):
        raise TypeError(f"learning_rate must be a number, an optax schedule or an array, "
                        f"got {lr!r}")
    check_real("weight_decay", weight_decay, 0.0)
    # b = 1 never forgets the first moments and divides by 1 - b^t = 0 in the bias correction.
    check_real("b1", b1, 0.0, 1.0, high_open=True)
    check_real("b2", b2, 0.0, 1.0, high_open=True)
    check_real("quantizer_lr_multiplier", quantizer_lr_multiplier, 0.0)
    if grad_clip is not None:
        check_real("grad_clip", grad_clip, 0.0)
    _check_stacked_axes(stacked_axes)
    labels = functools.partial(param_labels, stacked_axes=stacked_axes)

    def scaled(mult):
        return (lambda step: lr(step) * mult) if callable(lr) else lr * mult

    tx = optax.multi_transform(
        {
            "matrix": optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay),
            "vector": optax.adam(lr, b1=b1, b2=b2),
            "quantizer": optax.adam(scaled(quantizer_lr_multiplier), b1=b1, b2=b2),
        },
        labels,
    )
    if params is not None:
        labels(params)
    return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip else tx
