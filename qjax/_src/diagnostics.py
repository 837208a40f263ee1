"""Implementation of :mod:`qjax.diagnostics` (documented there)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax._src import scales as S
from qjax._src._checks import check_real
from qjax._src.quantize import fake_quant, rotate_like_spec
from qjax._src.spec import QuantSpec, check_spec

__all__ = ["gradient_cosine", "dense_inputs", "clip_error"]


def _path(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def gradient_cosine(loss_fn: Callable[..., jax.Array], params, *args,
                    leaf_name: str = "kernel") -> dict[str, float]:
    """Per-layer cosine similarity between the QAT gradient and the float gradient.

    Args:
      loss_fn: ``loss_fn(params, *args, qat=bool) -> scalar``.
      params: the parameter pytree.
      *args: the batch (or anything else ``loss_fn`` takes).
      leaf_name: which leaves to compare (default: every ``kernel``); the key is the layer path.

    Returns:
      ``{layer path: cosine}`` plus ``"all"``, the cosine of the concatenated gradients.
    """
    g_q = jax.grad(lambda p: loss_fn(p, *args, qat=True))(params)
    g_f = jax.grad(lambda p: loss_fn(p, *args, qat=False))(params)
    out, dots, nq, nf = {}, 0.0, 0.0, 0.0
    flat_q = jax.tree_util.tree_flatten_with_path(g_q)[0]
    flat_f = jax.tree_util.tree_leaves(g_f)
    for (path, a), b in zip(flat_q, flat_f, strict=True):
        name = _path(path)
        if not name.endswith(leaf_name):
            continue
        a, b = a.astype(jnp.float32).ravel(), b.astype(jnp.float32).ravel()
        dot, na, nb = float(a @ b), float(a @ a), float(b @ b)
        out[name.rsplit("/", 1)[0]] = dot / max((na * nb) ** 0.5, 1e-30)
        dots, nq, nf = dots + dot, nq + na, nf + nb
    if not out:
        raise ValueError(f"no parameter leaf is named {leaf_name!r}")
    out["all"] = dots / max((nq * nf) ** 0.5, 1e-30)
    return out


def dense_inputs(module, variables, *args, **kwargs) -> dict[str, jax.Array]:
    """The input of every ``nn.Dense`` call in one forward pass ``module.apply(variables, ...)``.

    ``module`` is a Linen module or a model from :func:`qjax.nn.quantize_model` (its quantized
    layers report the input before quantization).

    Returns:
      ``{module path: input}`` (the first call of a layer called more than once), inputs of shape
      ``(..., in_features)`` in the layer's input dtype.
    """
    if not callable(getattr(module, "apply", None)):
        raise TypeError(f"module must be a flax.linen Module or a quantized model, got "
                        f"{type(module).__name__}")
    seen: dict[str, jax.Array] = {}

    def record(next_fun, call_args, call_kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            path, x = "/".join(context.module.path), call_args[0]
            # A quantized model may trace its layers once to find them before the forward runs:
            # that tracer is not the forward's input, the concrete value that follows is.
            if path not in seen or (isinstance(seen[path], jax.core.Tracer)
                                    and not isinstance(x, jax.core.Tracer)):
                seen[path] = x
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
        module.apply(variables, *args, **kwargs)
    return seen


def clip_error(x: jax.Array, spec: QuantSpec, clips: Sequence[float]) -> dict[float, float]:
    """Relative error ``||Q_a(x) - x||^2 / ||x||^2`` of ``spec`` with the clip ``a * RMS``.

    ``spec`` must use :class:`~qjax._src.scales.RmsGaussian` scales (QuEST); each ``a`` in ``clips``
    replaces the Gaussian-optimal constant. ``x`` is rotated once by the spec's Hadamard transform
    and the error measured in the rotated space (the transform is orthogonal, so it is the error
    of the rotated-back result too).

    Args:
      x: floating array, rows along ``spec``'s row axis (e.g. from :func:`dense_inputs`).
      spec: a QuEST-style :class:`~qjax.QuantSpec`.
      clips: a non-empty sequence of finite positive clip constants in RMS units.

    Returns:
      ``{a: relative squared error}``. An all-zero ``x`` has no relative error to measure; it is
      reported as 0 (the quantized zeros are not exactly 0 on a midrise grid, but lie at the
      scale floor ``S.RMS_EPS``, far below any real signal).

    Raises:
      TypeError: ``spec`` not a QuantSpec, ``clips`` not a sequence of numbers.
      ValueError: ``spec`` without RmsGaussian scales, no clips, a clip that is not finite and
        positive.
    """
    if not isinstance(check_spec(spec).scale_rule, S.RmsGaussian):
        raise ValueError("clip_error needs RmsGaussian scales, got "
                         f"{type(spec.scale_rule).__name__}")
    if isinstance(clips, str) or not isinstance(clips, Iterable):
        raise TypeError(f"clips must be a sequence of clip constants, got {clips!r}")
    clips = [check_real(f"clips[{i}]", a, 0.0, low_open=True) for i, a in enumerate(clips)]
    if not clips:
        raise ValueError("clips must name at least one clip constant")
    xr = rotate_like_spec(jnp.asarray(x, jnp.float32), spec)
    power = jnp.mean(jnp.square(xr))
    out = {}
    for a in clips:
        spec_a = dataclasses.replace(spec, scale_rule=S.RmsGaussian(clip=a), hadamard_block=None)
        err = jnp.mean(jnp.square(fake_quant(xr, spec_a) - xr))
        out[a] = float(jnp.where(power > 0, err / jnp.maximum(power, 1e-30), 0.0))
    return out
