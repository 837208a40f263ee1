"""Implementation of :mod:`qjax.methods.zeroqat` (documented there)."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qjax._src._checks import check_finite_positive, check_pos_int, check_real
from qjax._src.sharding import path_str

__all__ = ["ZeroOrderConfig", "zo_gradient", "zo_step", "regenerate_z", "zo_projections"]

LossFn = Callable[[Any, Any], jax.Array]
Trainable = Any  # None, a pytree of bools like params, or a predicate (path, leaf) -> bool


def _check_learning_rate(lr: object) -> None:
    if isinstance(lr, (numbers.Number, np.number)) and not isinstance(lr, (bool, np.bool_)):
        check_real("learning_rate", lr, 0.0, low_open=True)
    elif not callable(lr):
        raise TypeError(f"learning_rate must be a finite positive number or an optax schedule "
                        f"(step -> lr), got {lr!r} ({type(lr).__name__})")


@dataclasses.dataclass(frozen=True)
class ZeroOrderConfig:
    """Hyper-parameters of :func:`zo_step`.

    Attributes:
      learning_rate: a finite float > 0 or an ``optax.Schedule`` (called with the step).
      eps: perturbation size, finite and > 0 (MeZO: 1e-3).
      num_probes: ``q``, random directions averaged per step (int >= 1).
      weight_decay: decoupled decay ``theta -= lr * weight_decay * theta`` on trainable leaves,
        finite and >= 0.
    """

    learning_rate: float | optax.Schedule
    eps: float = 1e-3
    num_probes: int = 1
    weight_decay: float = 0.0

    def __post_init__(self):
        _check_learning_rate(self.learning_rate)
        check_finite_positive("eps", self.eps)
        check_pos_int("num_probes", self.num_probes)
        check_real("weight_decay", self.weight_decay, 0.0)


def _is_float(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def _mask(params, trainable: Trainable) -> tuple[bool, ...]:
    """One static bool per leaf of ``params`` (in flatten order)."""
    with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    if not with_path:
        raise ValueError("params has no leaves to train")
    for path, leaf in with_path:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"params leaf {path_str(path)!r} must be an array, got "
                            f"{type(leaf).__name__}")
    if trainable is None:
        mask = [_is_float(leaf) for _, leaf in with_path]
    elif callable(trainable):
        mask = []
        for path, leaf in with_path:
            m = trainable(path_str(path), leaf)
            if not isinstance(m, (bool, np.bool_)):
                raise TypeError(f"trainable predicate must return a bool, got {m!r} for "
                                f"{path_str(path)!r}")
            mask.append(bool(m))
    else:
        flags = jax.tree_util.tree_flatten_with_path(trainable)[0]
        if [p for p, _ in flags] != [p for p, _ in with_path]:
            raise ValueError(
                "trainable must be a pytree of bools with the structure of params (or a predicate "
                f"(path, leaf) -> bool); got leaves {[path_str(p) for p, _ in flags]}, params "
                f"has {[path_str(p) for p, _ in with_path]}")
        for path, m in flags:
            if not isinstance(m, (bool, np.bool_)):
                raise TypeError(f"trainable leaf {path_str(path)!r} must be a Python bool, got "
                                f"{m!r}")
        mask = [bool(m) for _, m in flags]
    for (path, leaf), m in zip(with_path, mask, strict=True):
        if m and not _is_float(leaf):
            raise TypeError(f"trainable leaf {path_str(path)!r} has dtype "
                            f"{jnp.result_type(leaf)}: only floating leaves can be perturbed")
    if not any(mask):
        raise ValueError("trainable selects no leaf of params: nothing would be trained")
    return tuple(mask)


def _check_key(key) -> None:
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == jnp.uint32 and jnp.ndim(key) == 1
    if not (typed and jnp.ndim(key) == 0) and not raw:
        raise TypeError(f"key must be a single PRNG key (jax.random.key or PRNGKey), got "
                        f"{type(key).__name__} with dtype {dtype}")


def _check_index(name: str, value) -> None:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int >= 0 or an integer scalar array, got {value!r}")
    if isinstance(value, (int, np.integer)):
        check_pos_int(name, value, allow_zero=True)
    elif not (hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.integer)
              and jnp.ndim(value) == 0):
        raise TypeError(f"{name} must be an int >= 0 or an integer scalar array, got {value!r}")


def _z_dtype(leaf):
    return jnp.promote_types(jnp.result_type(leaf), jnp.float32)


def _probe_key(key, step, probe):
    return jax.random.fold_in(jax.random.fold_in(key, step), probe)


def _fmix(h):
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 with full avalanche."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _normal(key, shape) -> jax.Array:
    """float32 ``N(0, 1)`` of ``shape``: elementwise in the flat index, so XLA fuses it into its
    consumer (no buffer of random bits; jax.random's threefry would materialize four).

    Three keyed rounds of :func:`_fmix` on the flat index plus a key word (uint32, so it repeats
    past 2^32 elements) give 23 uniform bits ``m``; ``z = sqrt(2) erfinv((2m + 1) 2^-23 - 1)``,
    exactly symmetric, ``|z| <= 5.3``.
    """
    k = jax.random.bits(key, (3,), jnp.uint32)
    # The key enters first: an index grid free of it would be hoisted out of the probe loop and
    # shared by every draw of the shape, one uint32 buffer per leaf shape.
    h, stride = jnp.broadcast_to(k[0], shape), 1
    for d in reversed(range(len(shape))):
        h = h + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
        stride *= shape[d]
    h = _fmix(_fmix(_fmix(h) ^ k[1]) ^ k[2])
    v = (2 * (h >> 9) + 1).astype(jnp.float32) * 2.0**-23 - 1.0
    return jnp.sqrt(jnp.float32(2.0)) * jax.lax.erf_inv(v)


def _axpz(params, mask, pkey, scale, decay=None):
    """``theta * decay + scale * z`` on the trainable leaves (decay None: 1); leaf ``i``'s ``z``
    from ``fold_in(pkey, i)``, computed in ``promote(dtype, float32)``, cast back."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    out = []
    for i, (leaf, m) in enumerate(zip(leaves, mask, strict=True)):
        if m:
            x = leaf.astype(_z_dtype(leaf))
            x = x if decay is None else x * decay
            z = _normal(jax.random.fold_in(pkey, i), jnp.shape(leaf)).astype(x.dtype)
            leaf = (x + scale * z).astype(leaf.dtype)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def regenerate_z(key, step, probe, params, *, trainable: Trainable = None):
    """The direction ``z`` of probe ``probe`` at ``step``, as drawn inside :func:`zo_step`.

    Args:
      key: a PRNG key (the one passed to the step).
      step, probe: ints >= 0 (or integer scalar arrays).
      params: the parameter pytree (only shapes and dtypes are used).
      trainable: as given to the step (see the module docstring).

    Returns:
      A pytree like ``params``: ``N(0, 1)`` samples in float32 (float64 for float64 leaves) on
      trainable leaves, zeros on the others. Leaf ``i`` uses ``fold_in(probe_key, i)``, so a mask
      does not change the ``z`` of the other leaves.
    """
    _check_key(key)
    _check_index("step", step)
    _check_index("probe", probe)
    mask = _mask(params, trainable)
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x), _z_dtype(x)), params)
    return _axpz(zeros, mask, _probe_key(key, step, probe), 1.0)


def _scalar_loss(loss_fn, params, batch):
    loss = loss_fn(params, batch)
    if jnp.shape(loss) != () or not _is_float(loss):
        raise ValueError(f"loss_fn must return a floating scalar, got shape {jnp.shape(loss)} "
                         f"dtype {jnp.result_type(loss)}")
    return loss.astype(jnp.float32)


def _after(loss):
    """0.0 computed from ``loss`` (NaN if it is NaN): added to a perturbation's scale, it makes
    the perturbation wait for the forward pass that reads the parameters, so XLA updates them in
    place instead of scheduling it early into a second parameter-sized buffer."""
    return jnp.minimum(jnp.abs(loss), 0.0)


def _projections(loss_fn, params, batch, key, step, eps, num_probes, mask):
    def body(probe, carry):
        p, projs, total = carry
        pkey = _probe_key(key, step, probe)
        p = _axpz(p, mask, pkey, eps)
        plus = _scalar_loss(loss_fn, p, batch)
        p = _axpz(p, mask, pkey, -2.0 * eps + _after(plus))
        minus = _scalar_loss(loss_fn, p, batch)
        p = _axpz(p, mask, pkey, eps + _after(minus))  # restored, up to rounding
        projs = projs.at[probe].set((plus - minus) / (2.0 * eps))
        return p, projs, total + 0.5 * (plus + minus)

    init = (params, jnp.zeros((num_probes,), jnp.float32), jnp.zeros((), jnp.float32))
    params, projs, total = jax.lax.fori_loop(0, num_probes, body, init)
    return params, total / num_probes, projs


def _check_common(loss_fn, key, step, eps, num_probes):
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (params, batch) -> scalar, got {loss_fn!r}")
    _check_key(key)
    _check_index("step", step)
    return check_finite_positive("eps", eps), check_pos_int("num_probes", num_probes)


def zo_projections(loss_fn: LossFn, params, batch, key, step, *, eps: float = 1e-3,
                   num_probes: int = 1, trainable: Trainable = None):
    """The projected gradients ``proj_i`` (all that a ZO step keeps), parameters perturbed in place.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (any float dtype; computed in float32).
      params: a pytree of arrays.
      batch: passed to ``loss_fn`` unchanged.
      key: a PRNG key; step: int >= 0 or an integer scalar array (traced is fine).
      eps, num_probes: see :class:`ZeroOrderConfig`; trainable: see the module docstring.

    Returns:
      ``(params, loss, projs)``: the parameters after perturbation and restoration (equal to the
      input up to float rounding; masked leaves exactly), ``loss`` the mean over probes of
      ``(L+ + L-)/2`` (float32 scalar, ``L(theta) + O(eps^2)``) and ``projs`` float32 ``(q,)``.
    """
    eps, q = _check_common(loss_fn, key, step, eps, num_probes)
    mask = _mask(params, trainable)
    return _projections(loss_fn, params, batch, key, step, eps, q, mask)


def zo_gradient(loss_fn: LossFn, params, batch, key, step, *, eps: float = 1e-3,
                num_probes: int = 1, trainable: Trainable = None):
    """The ZO gradient estimate ``g = (1/q) sum_i proj_i z_i``, materialized as a tree.

    For tests, and to feed any Optax transform (``tx.update(g, state, params)``) at the cost of a
    gradient-sized tree. Arguments as :func:`zo_projections`.

    Returns:
      ``(loss, grad)``: ``loss`` a float32 scalar (see :func:`zo_projections`), ``grad`` a pytree
      like ``params`` in each leaf's dtype, zero on masked leaves.
    """
    eps, q = _check_common(loss_fn, key, step, eps, num_probes)
    mask = _mask(params, trainable)
    _, loss, projs = _projections(loss_fn, params, batch, key, step, eps, q, mask)
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x), _z_dtype(x)), params)

    def body(probe, g):
        return _axpz(g, mask, _probe_key(key, step, probe), projs[probe] / q)

    grad = jax.lax.fori_loop(0, q, body, zeros)
    grad = jax.tree_util.tree_map(lambda g, p: g.astype(jnp.result_type(p)), grad, params)
    return loss, grad


def zo_step(loss_fn: LossFn, config: ZeroOrderConfig, *, trainable: Trainable = None,
            donate: bool = True) -> Callable:
    """A jitted ZO-SGD step ``step_fn(params, batch, key, step) -> (params, loss)``.

    The update ``theta <- theta * (1 - lr * weight_decay) - lr * (1/q) sum_i proj_i z_i`` is
    applied leaf by leaf with each ``z_i`` drawn again, never stored. Pass the same ``key`` every
    step and a new ``step`` (an int or integer scalar, traced: no recompilation per step); the
    directions come from ``(key, step, probe)``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      config: a :class:`ZeroOrderConfig`.
      trainable: see the module docstring (resolved against ``params`` when the step is traced).
      donate: donate ``params`` to the step (default), so the update reuses their buffers; the
        caller must not use the passed ``params`` afterwards.

    Returns:
      ``step_fn``; ``loss`` is a float32 scalar, the mean of ``(L+ + L-)/2`` over probes at the
      parameters before the update.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (params, batch) -> scalar, got {loss_fn!r}")
    if not isinstance(config, ZeroOrderConfig):
        raise TypeError(f"config must be a ZeroOrderConfig, got {type(config).__name__}")
    if not isinstance(donate, (bool, np.bool_)):
        raise TypeError(f"donate must be a bool, got {donate!r}")
    lr_of, q = config.learning_rate, config.num_probes

    def step_fn(params, batch, key, step):
        _check_key(key)
        _check_index("step", step)
        mask = _mask(params, trainable)
        params, loss, projs = _projections(loss_fn, params, batch, key, step, config.eps, q, mask)
        lr = jnp.asarray(lr_of(step) if callable(lr_of) else lr_of, jnp.float32)
        decay = 1.0 - lr * config.weight_decay if config.weight_decay else None

        def body(probe, p):
            d = None if decay is None else jnp.where(probe == 0, decay, 1.0)
            return _axpz(p, mask, _probe_key(key, step, probe), -lr * projs[probe] / q,
                         decay=d)

        return jax.lax.fori_loop(0, q, body, params), loss

    return jax.jit(step_fn, donate_argnums=(0,) if donate else ())
