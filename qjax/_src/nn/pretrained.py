"""Start QAT from pretrained float weights (Linen).

``init_from_float(model, variables, float_params)`` takes the variables of a quantized Linen
model (``model.init``) and the float model's parameters (a pretrained checkpoint of the same
architecture) and returns variables that start from the pretrained weights: every float leaf
the two share is copied, learned scales (LSQ steps, PACT clips, Double Rounding's ``s_h``) are
recomputed from the copied kernels, and each low-rank QAT layer (:mod:`qjax.nn.lowrank`) gets
its frozen tensor (``Phi0`` or ``W0'``) and its scale ``s0`` from the pretrained kernel,
``lora_up = 0`` (so the model is round-to-nearest PTQ of the pretrained one) and the random
``lora_down`` of ``init``. NNX models need nothing of the kind: ``quantize_model`` wraps the
pretrained model's own layers.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from qjax._src.nn import double_rounding as DR
from qjax._src.nn import lowrank
from qjax._src.nn.double_rounding import DoubleRounding
from qjax._src.nn.layout import dense_layout
from qjax._src.nn.lowrank import LowRankQAT
from qjax._src.nn.ops import init_kernel_scale, per_matrix
from qjax._src.nn.rewrite import QuantizedLinenModel
from qjax._src.nn.site import subtree

__all__ = ["init_from_float"]


def _copy(t):
    return {k: _copy(v) for k, v in t.items()} if isinstance(t, Mapping) else t


def _fill(dst: dict, src: Mapping, path: str = "") -> int:
    """Copies ``src``'s leaves into ``dst`` where ``dst`` has the same path (and must have the
    same shape); returns how many were copied."""
    n = 0
    for k, v in src.items():
        if k not in dst:
            continue
        if isinstance(v, Mapping):
            if isinstance(dst[k], Mapping):
                n += _fill(dst[k], v, f"{path}/{k}")
            continue
        if jnp.shape(dst[k]) != jnp.shape(v):
            raise ValueError(f"{path}/{k}: shape {jnp.shape(v)} in the checkpoint, "
                             f"{jnp.shape(dst[k])} in the model: the checkpoint does not match "
                             "the model")
        dst[k] = jnp.asarray(v, jnp.asarray(dst[k]).dtype)
        n += 1
    return n


def _refresh_scale(site, params: dict) -> None:
    """A learned ``kernel_scale`` recomputed from the copied pretrained kernel (LSQ, PACT,
    Double Rounding's ``s_h``): the one ``init`` made came from the random kernel."""
    node = subtree(params, site.keys, "the model's params")
    if "kernel_scale" not in node or site.raw:
        return
    m = site.layout.to_matrix(jnp.asarray(node["kernel"]))
    if isinstance(site.adapter, DoubleRounding):
        fresh = per_matrix(lambda t: DR.init_scale(t["w"], site.adapter), {"w": m},
                           site.stack_shape)
    else:
        fresh = per_matrix(lambda t: init_kernel_scale(t["w"], site.recipe.weight,
                                                       dense_layout(t["w"].shape)),
                           {"w": m}, site.stack_shape)
    node["kernel_scale"] = fresh.reshape(jnp.shape(node["kernel_scale"]))


def init_from_float(model: QuantizedLinenModel, variables: Mapping,
                    float_params: Mapping) -> dict:
    """Variables of ``model`` starting from the pretrained ``float_params`` (module docstring).

    Raises:
      TypeError: not a QuantizedLinenModel, or variables without a ``params`` collection.
      ValueError: a checkpoint that does not match the model (a layer missing, a shape that
        differs), or a model without low-rank QAT layers and no shared leaves.
    """
    if not isinstance(model, QuantizedLinenModel):
        raise TypeError(f"model must be a qjax.nn.QuantizedLinenModel, got "
                        f"{type(model).__name__}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError("variables must be the model's variables (from model.init)")
    if "params" in float_params and isinstance(float_params["params"], Mapping):
        float_params = float_params["params"]
    out = _copy(dict(variables))
    copied = _fill(out["params"], float_params)
    if not copied:
        raise ValueError("the float params share no leaf with the model: the checkpoint does "
                         "not match the model")
    for site in model.sites().values():
        if not isinstance(site.adapter, LowRankQAT):
            _refresh_scale(site, out["params"])
            continue
        kernel = subtree(float_params, site.keys, "the float params")
        if "kernel" not in kernel:
            raise ValueError(f"the float params have no kernel at {site.path!r}")
        kernel = jnp.asarray(kernel["kernel"])
        if tuple(kernel.shape) != site.kernel_shape:
            raise ValueError(f"{site.path}/kernel: shape {kernel.shape} in the checkpoint, "
                             f"{site.kernel_shape} in the model: the checkpoint does not match "
                             "the model")
        node = subtree(out["params"], site.keys, "the model's params")
        frozen = subtree(out[lowrank.FROZEN], site.keys, "the model's frozen tensors")
        def one(t, site=site):
            f, a = lowrank.init_state(t["w"], site.adapter, jax.random.key(0))
            return {"frozen": f, "scale": a["kernel_scale"]}

        fresh = per_matrix(one, {"w": site.layout.to_matrix(kernel)}, site.stack_shape)
        for k, v in fresh["frozen"].items():
            frozen[k] = v
        node["kernel_scale"] = fresh["scale"]
        node["lora_up"] = jnp.zeros_like(node["lora_up"])
    return out
