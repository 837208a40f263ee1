"""Diagnostics for QAT: how well a quantized model's gradient follows the float gradient.

:func:`gradient_cosine` evaluates the gradient of a loss twice on the same parameters and batch,
once with quantization (the estimators' backward rules) and once in float, and returns the cosine
similarity per layer. An estimator whose gradient points where the float gradient points lets QAT
follow the float optimisation path; QuEST's trust estimator is meant to align better than STE at
low bit widths.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["gradient_cosine"]


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
