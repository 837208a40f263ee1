"""Implementation of :mod:`qjax.methods.distill` (documented there)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qjax._src._checks import check_bool, check_floating, check_pos_int, check_real

__all__ = ["logit_kl", "layer_mse", "distillation_loss", "mix_teacher", "intervention_schedule",
           "capture_linen", "intervene_linen", "capture_nnx", "intervene_nnx", "SCHEDULES"]

ScheduleKind = Literal["linear", "cosine", "step"]
SCHEDULES = ("linear", "cosine", "step")


def _masked_mean(x: jax.Array, mask, name: str) -> jax.Array:
    if mask is None:
        return jnp.mean(x)
    mask = jnp.asarray(mask)
    if mask.shape != x.shape:
        raise ValueError(f"{name}: mask must have the logits' shape without the last axis "
                         f"{x.shape}, got {mask.shape}")
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1e-12)


def logit_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0,
             mask: jax.Array | None = None) -> jax.Array:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over tokens.

    Args:
      student_logits: ``(..., V)`` floating logits; gradients flow into them.
      teacher_logits: ``(..., V)`` floating logits, same shape (``stop_gradient`` applied).
      temperature: ``T > 0``.
      mask: optional ``(...)`` (the logits' shape without ``V``), bool or float weights; the
        mean over tokens is weighted by it (all zero gives 0).

    Returns:
      A float32 scalar.
    """
    check_floating(student_logits, "student_logits")
    check_floating(teacher_logits, "teacher_logits")
    t = check_real("temperature", temperature, 0.0, low_open=True)
    if student_logits.shape != teacher_logits.shape or student_logits.ndim < 1:
        raise ValueError(f"student_logits {student_logits.shape} and teacher_logits "
                         f"{teacher_logits.shape} must have the same shape (..., V)")
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    log_p = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1)
    p = jnp.exp(log_p)
    kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
    return t * t * _masked_mean(kl, mask, "logit_kl")


def _same_structure(student, teacher, name: str) -> tuple[list, list]:
    s_leaves, s_tree = jax.tree.flatten(student)
    t_leaves, t_tree = jax.tree.flatten(teacher)
    if s_tree != t_tree:
        raise ValueError(f"{name}: student and teacher outputs differ in structure: {s_tree} vs "
                         f"{t_tree}")
    for s, t in zip(s_leaves, t_leaves, strict=True):
        if jnp.shape(s) != jnp.shape(t):
            raise ValueError(f"{name}: student output of shape {jnp.shape(s)} does not match "
                             f"the teacher's {jnp.shape(t)}")
    return s_leaves, t_leaves


def layer_mse(student_outputs: Any, teacher_outputs: Any, normalize: bool = False,
              eps: float = 1e-8) -> jax.Array:
    """Mean squared error between intermediate outputs, averaged over the leaves of a pytree.

    Args:
      student_outputs: a pytree of floating arrays (e.g. ``{path: array}`` of a capture).
      teacher_outputs: the same structure and shapes (``stop_gradient`` applied).
      normalize: divide each leaf's error by ``mean(t^2) + eps``, so all scales weigh alike.
      eps: ``> 0``, guards the normalization.

    Returns:
      A float32 scalar: ``mean_leaves(mean((s - t)^2) [/ (mean(t^2) + eps)])``.
    """
    normalize = check_bool("normalize", normalize)
    eps = check_real("eps", eps, 0.0, low_open=True)
    s_leaves, t_leaves = _same_structure(student_outputs, teacher_outputs, "layer_mse")
    if not s_leaves:
        raise ValueError("layer_mse: the outputs hold no arrays")
    terms = []
    for s, t in zip(s_leaves, t_leaves, strict=True):
        check_floating(s, "student output")
        check_floating(t, "teacher output")
        t = jax.lax.stop_gradient(t).astype(jnp.float32)
        err = jnp.mean((s.astype(jnp.float32) - t) ** 2)
        terms.append(err / (jnp.mean(t * t) + eps) if normalize else err)
    return sum(terms) / len(terms)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      labels: jax.Array | None = None, *, student_outputs: Any = None,
                      teacher_outputs: Any = None, ce_weight: float = 1.0,
                      kl_weight: float = 1.0, mse_weight: float = 0.0,
                      temperature: float = 1.0, mask: jax.Array | None = None,
                      normalize: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``ce_weight * CE + kl_weight * logit_kl + mse_weight * layer_mse``.

    Args:
      student_logits, teacher_logits: ``(..., V)`` floating logits.
      labels: ``(...)`` integer class ids, needed when ``ce_weight > 0``.
      student_outputs, teacher_outputs: pytrees for :func:`layer_mse` (if ``mse_weight > 0``).
      ce_weight, kl_weight, mse_weight: finite, ``>= 0``; a term of weight 0 is skipped.
      temperature: of the KL term (CE uses ``T = 1``); mask: ``(...)`` token weights for CE
        and KL; normalize: of :func:`layer_mse`.

    Returns:
      ``(loss, {"ce", "kl", "mse"})``: float32 scalars (skipped terms are 0).
    """
    ce_w = check_real("ce_weight", ce_weight, 0.0)
    kl_w = check_real("kl_weight", kl_weight, 0.0)
    mse_w = check_real("mse_weight", mse_weight, 0.0)
    ce = kl = mse = jnp.zeros((), jnp.float32)
    if ce_w > 0:
        if labels is None:
            raise ValueError("ce_weight > 0 needs labels")
        labels = jnp.asarray(labels)
        if labels.shape != student_logits.shape[:-1] or labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers of shape {student_logits.shape[:-1]}, "
                             f"got {labels.dtype} {labels.shape}")
        check_floating(student_logits, "student_logits")
        per = optax.softmax_cross_entropy_with_integer_labels(
            student_logits.astype(jnp.float32), labels)
        ce = _masked_mean(per, mask, "distillation_loss")
    if kl_w > 0:
        kl = logit_kl(student_logits, teacher_logits, temperature, mask)
    if mse_w > 0:
        if student_outputs is None or teacher_outputs is None:
            raise ValueError("mse_weight > 0 needs student_outputs and teacher_outputs")
        mse = layer_mse(student_outputs, teacher_outputs, normalize)
    return ce_w * ce + kl_w * kl + mse_w * mse, {"ce": ce, "kl": kl, "mse": mse}


def _check_lam(lam) -> Any:
    if isinstance(lam, (jax.Array, np.ndarray)):  # traced or concrete: values are not checked
        if lam.ndim != 0 or not jnp.issubdtype(lam.dtype, jnp.floating):
            raise TypeError(f"lam must be a float scalar, got {lam.dtype} {jnp.shape(lam)}")
        return lam
    return check_real("lam", lam, 0.0, 1.0)


def mix_teacher(student: Any, teacher: Any, lam) -> Any:
    """``lam * stop_gradient(teacher) + (1 - lam) * student``, leaf by leaf.

    Args:
      student: a pytree of floating arrays.
      teacher: the same structure and shapes.
      lam: in ``[0, 1]``; a Python number (checked) or a float scalar array (e.g. a schedule's
        value inside ``jit``).

    Returns:
      The student's structure, each leaf in the student's dtype.
    """
    return _mix(student, teacher, _check_lam(lam), "mix_teacher")


def _mix(student, teacher, lam, name: str):
    s_leaves, t_leaves = _same_structure(student, teacher, name)
    out = [(lam * jax.lax.stop_gradient(t) + (1 - lam) * s).astype(jnp.result_type(s))
           for s, t in zip(s_leaves, t_leaves, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(student), out)


def intervention_schedule(steps: int, kind: ScheduleKind = "linear") -> optax.Schedule:
    """``lam(step)`` from 1 at step 0 to 0 at ``steps`` (and after).

    ``"linear"``: ``1 - step/steps``; ``"cosine"``: ``(1 + cos(pi * step/steps)) / 2``;
    ``"step"``: 1 before ``steps``, then 0 (full intervention, then plain QAT).
    """
    steps = check_pos_int("steps", steps)
    if kind == "linear":
        return optax.linear_schedule(1.0, 0.0, steps)
    if kind == "cosine":
        return optax.cosine_decay_schedule(1.0, steps)
    if kind == "step":
        return optax.piecewise_constant_schedule(1.0, {steps: 0.0})
    raise ValueError(f"kind must be one of {SCHEDULES}, got {kind!r}")


def _compile(pattern) -> re.Pattern:
    if not isinstance(pattern, (str, re.Pattern)):
        raise TypeError(f"pattern must be a str or a compiled regex, got {pattern!r}")
    try:
        return re.compile(pattern)  # a compiled pattern is returned as it is
    except re.error as e:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None


def _check_teacher(teacher_outputs) -> dict[str, Any]:
    if not isinstance(teacher_outputs, Mapping):
        raise TypeError("teacher_outputs must be a mapping {module path: output}, got "
                        f"{type(teacher_outputs).__name__}")
    if not teacher_outputs or not all(isinstance(k, str) and k for k in teacher_outputs):
        raise ValueError("teacher_outputs must map one or more module paths (non-empty str) "
                         f"to outputs, got keys {list(teacher_outputs)}")
    return dict(teacher_outputs)


def _no_match(pattern: re.Pattern, seen) -> ValueError:
    shown = ", ".join(sorted(set(seen))[:20]) + (", ..." if len(set(seen)) > 20 else "")
    return ValueError(f"pattern {pattern.pattern!r} matches no module that ran (module paths: "
                      f"{shown or 'none'})")


def _capture(regex: re.Pattern, run: Callable) -> tuple[Any, dict[str, Any]]:
    """``run(select, on_output) -> (out, paths)``, recording the outputs of matched modules."""
    captured: dict[str, Any] = {}

    def record(path, y):
        captured[path] = y  # the last call wins (a first Linen apply also runs a shape pass)
        return y

    out, seen = run(regex.fullmatch, record)
    if not captured:
        raise _no_match(regex, seen)
    return out, captured


def _intervene(teacher: dict[str, Any], lam, run: Callable) -> Any:
    hit: set[str] = set()

    def replace(path, y):
        hit.add(path)
        return _mix(y, teacher[path], lam, f"module {path!r}")

    out, _ = run(teacher.__contains__, replace)
    if len(hit) < len(teacher):
        raise ValueError(f"teacher_outputs paths {sorted(set(teacher) - hit)} match no module "
                         "that ran")
    return out


def _run_linen(apply_fn: Callable, args, kwargs, select: Callable, on_output: Callable):
    """``(apply_fn(*args, **kwargs), paths)``; the ``__call__`` output ``y`` of each bound
    submodule whose path passes ``select`` is replaced by ``on_output(path, y)``."""
    seen: list[str] = []

    def interceptor(next_fun, a, kw, context):
        y = next_fun(*a, **kw)
        m = context.module
        # The root (path ()) and the unbound clones a quantized layer runs itself on are skipped.
        if context.method_name != "__call__" or m.scope is None or not m.path:
            return y
        path = "/".join(m.path)
        seen.append(path)
        return on_output(path, y) if select(path) else y

    with nn.intercept_methods(interceptor):
        return apply_fn(*args, **kwargs), seen


def _check_apply(apply_fn) -> None:
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")


def capture_linen(apply_fn: Callable, pattern: str | re.Pattern
                  ) -> Callable[..., tuple[Any, dict[str, Any]]]:
    """Wraps a Linen ``apply`` so it also returns the outputs of the modules matching ``pattern``.

    Args:
      apply_fn: e.g. ``model.apply`` of a ``flax.linen.Module`` or of a
        :class:`~qjax.nn.QuantizedLinenModel` (``qat=`` and other arguments pass through).
      pattern: a regex ``re.fullmatch``-ed against ``"/".join(module.path)`` (the root module,
        path ``""``, is never matched).

    Returns:
      ``fn(*args, **kwargs) -> (apply_fn(*args, **kwargs), {path: output})``; a call raises
      ValueError when the pattern matches no module that ran (naming the pattern).
    """
    _check_apply(apply_fn)
    regex = _compile(pattern)
    return lambda *a, **kw: _capture(regex, functools.partial(_run_linen, apply_fn, a, kw))


def intervene_linen(apply_fn: Callable, teacher_outputs: Mapping[str, Any], lam
                    ) -> Callable[..., Any]:
    """Wraps a Linen ``apply``: the output of each module whose path is a key of
    ``teacher_outputs`` becomes ``mix_teacher(output, teacher_outputs[path], lam)``.

    Args:
      apply_fn: as for :func:`capture_linen` (the student, e.g. ``qmodel.apply``).
      teacher_outputs: ``{path: output}``, e.g. from :func:`capture_linen` on the teacher.
      lam: the teacher's weight in ``[0, 1]`` (see :func:`mix_teacher`).

    Returns:
      ``fn(*args, **kwargs) -> apply_fn(*args, **kwargs)`` with the interventions; a call
      raises ValueError for a path that no module ran at, or an output shape mismatch.
    """
    _check_apply(apply_fn)
    teacher, lam = _check_teacher(teacher_outputs), _check_lam(lam)
    return lambda *a, **kw: _intervene(teacher, lam, functools.partial(_run_linen, apply_fn, a,
                                                                        kw))


class _Tap(nnx.Module):
    """Calls ``inner`` and passes its output through ``fn`` (a plain, static attribute)."""

    def __init__(self, inner: nnx.Module, fn: Callable[[Any], Any]):
        self.inner = inner
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(self.inner(*args, **kwargs))


def _check_nnx(model, method: str) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an NNX module, got {type(model).__name__}")
    if not isinstance(method, str) or not callable(getattr(model, method, None)):
        raise TypeError(f"method must name a method of the model, got {method!r}")


def _run_nnx(model, method: str, args, kwargs, select: Callable, on_output: Callable):
    """``(getattr(model, method)(*args, **kwargs), paths)``; each callable submodule (not a
    container like ``nnx.List``) whose path passes ``select`` is wrapped in a :class:`_Tap`
    calling ``on_output(path, y)`` for the call."""
    # Imported here: qjax.nn imports qjax.methods (for QuEST), so a top-level import would cycle.
    from qjax._src.nn.nnx import QuantizedLayer
    from qjax._src.nn.rewrite import set_submodule

    targets = {"/".join(map(str, p)): (p, m) for p, m in nnx.iter_modules(model)
               if p and callable(m)}
    names = [n for n in targets if select(n)]
    for name in names:
        outer = "/".join(name.split("/")[:-1])
        if name.endswith("/inner") and isinstance(targets.get(outer, (0, 0))[1], QuantizedLayer):
            raise ValueError(f"module {name!r} is the layer inside a QuantizedLayer, which reads "
                             f"its kernel: select the QuantizedLayer {outer!r} instead")
    # Deepest first, so a parent is wrapped after its children; undone in the reverse order.
    done = []
    try:
        for name in sorted(names, key=lambda n: -len(targets[n][0])):
            path, module = targets[name]
            set_submodule(model, path, _Tap(module, functools.partial(on_output, name)))
            done.append(name)
        return getattr(model, method)(*args, **kwargs), list(targets)
    finally:
        for name in reversed(done):
            set_submodule(model, *targets[name])


def capture_nnx(model: nnx.Module, pattern: str | re.Pattern, method: str = "__call__"
                ) -> Callable[..., tuple[Any, dict[str, Any]]]:
    """Wraps a call of an NNX model so it also returns the outputs of the submodules whose path
    (attribute names and list indices joined by ``/``, e.g. ``"layers/0"``) fully matches
    ``pattern``. Each one is wrapped for the duration of the call. Inside ``nnx.jit`` /
    ``nnx.grad``, use the model passed in (NNX refuses changes to a module of an outer trace).

    Returns:
      ``fn(*args, **kwargs) -> (getattr(model, method)(*args, **kwargs), {path: output})``; a
      call raises ValueError when the pattern matches no submodule that ran.
    """
    _check_nnx(model, method)
    regex = _compile(pattern)
    return lambda *a, **kw: _capture(regex, functools.partial(_run_nnx, model, method, a, kw))


def intervene_nnx(model: nnx.Module, teacher_outputs: Mapping[str, Any], lam,
                  method: str = "__call__") -> Callable[..., Any]:
    """Like :func:`intervene_linen` for an NNX model (paths as in :func:`capture_nnx`).

    Returns:
      ``fn(*args, **kwargs) -> getattr(model, method)(*args, **kwargs)``, each submodule at a
      path of ``teacher_outputs`` returning ``mix_teacher(output, teacher_outputs[path], lam)``;
      a call raises ValueError for a path no submodule ran at, or an output shape mismatch.
    """
    _check_nnx(model, method)
    teacher, lam = _check_teacher(teacher_outputs), _check_lam(lam)
    return lambda *a, **kw: _intervene(teacher, lam, functools.partial(_run_nnx, model, method,
                                                                        a, kw))
