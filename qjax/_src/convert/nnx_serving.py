"""NNX serving models: a quantized NNX model with each quantized layer replaced by a
:class:`ServingLayer` holding its packed kernel.

``serving_model(model)`` (what :func:`qjax.convert.convert` returns for an NNX model) copies the
model and, for every :class:`~qjax.nn.nnx.QuantizedLayer`, builds a :class:`ServingLayer`: the
wrapped Flax layer without its float kernel, the kernel as a :class:`~qjax.QArray`
(:func:`qjax.convert.layer_to_qarray`, stacked layers in front), the learned input parameter, the
recipe and the layout. Calling it runs :func:`qjax.convert.serve_layer`, so NNX and Linen serve
through the same code. The serving model is an ordinary NNX module: ``nnx.split`` gives a graph
definition and a state of arrays (the QArray's codes and scales), which
:func:`qjax.convert.save` / :func:`~qjax.convert.restore` and
:func:`~qjax.convert.export_serving` take.
"""

from __future__ import annotations

import jax
from flax import nnx

from qjax._src.convert.serve import BACKENDS, conv_config, serve_layer
from qjax._src.convert.weights import (
    adapter_to_qarray,
    check_layer_params,
    convert_layer,
    multi_precision_qarray,
)
from qjax._src.nn.layout import KernelLayout
from qjax._src.nn.nnx import LowRankLayer, MultiPrecisionLayer, QuantizedLayer, call_with_kernel
from qjax._src.nn.ops import split_input
from qjax._src.nn.recipe import LayerQuant
from qjax._src.nn.rewrite import set_submodule, sites
from qjax._src.qarray import QArray, relayout

__all__ = ["ServingLayer", "ServingKernel", "serving_model", "call_serving_model"]


class ServingKernel(nnx.Variable):
    """A layer's serving kernel: a :class:`~qjax.QArray` (or a float kernel without a weight
    spec)."""


class ServingLayer(nnx.Module):
    """One quantized NNX layer in serving form (see the module docstring).

    Attributes:
      inner: the Flax layer (``Linear``, ``LinearGeneral``, ``Einsum``, ``Conv``) without its
        ``kernel`` (None); its bias and settings are used as they are.
      kernel: :class:`ServingKernel` holding the QArray ``(*stack, *batch, N, K)``.
      input_scale: the learned activation parameter (``nnx.Param``) or None.
      lq, layout: the recipe and the kernel layout (static).
      backend: the matmul backend (static, one of :data:`qjax.convert.BACKENDS`).
    """

    def __init__(self, inner: nnx.Module, kernel, input_scale, lq: LayerQuant,
                 layout: KernelLayout, backend: str = "xla"):
        self.inner = inner
        self.kernel = ServingKernel(kernel)
        self.input_scale = input_scale
        self.lq = lq
        self.layout = layout
        self.backend = backend
        self.act_spec = None  # opt-in activation spec of a weight-only layer (serve's act_spec)

    def __call__(self, *args, **kwargs) -> jax.Array:
        x, args, kwargs = split_input(args, kwargs)
        inner = self.inner

        def run(xq, kernel):
            return call_with_kernel(inner, kernel, xq, *args, **kwargs)

        bias = getattr(inner, "bias", None)
        a_scale = None if self.input_scale is None else self.input_scale[...]
        conv = conv_config(inner) if self.layout.kind == "conv" else None
        return serve_layer(x, self.kernel.get_value(), self.lq, self.layout, a_scale, run,
                           bias=None if bias is None else bias[...],
                           dtype=getattr(inner, "dtype", None), conv=conv, backend=self.backend,
                           act_spec=self.act_spec)


def serving_model(model: nnx.Module, backend: str = "xla", bits: int | None = None,
                  packed: bool = True, k_major: bool = False) -> nnx.Module:
    """A serving copy of a quantized NNX model (the model itself is left unchanged).

    ``bits``, ``packed`` and ``k_major`` as :func:`qjax.convert.convert`'s.

    Raises:
      ValueError: the model has no quantized layer, or a layer's params do not fit its recipe
        (naming the layer; see :func:`qjax._src.convert.check_layer_params`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    found = sites(model)
    if not found:
        raise ValueError("the model has no quantized layer (qjax.nn.quantize_model wraps them): "
                         "nothing would be converted")
    out = nnx.clone(model)
    for path, module in list(nnx.iter_modules(out)):
        if not isinstance(module, (MultiPrecisionLayer, LowRankLayer, QuantizedLayer)):
            continue
        site = found["/".join(str(p) for p in path)]
        if isinstance(module, MultiPrecisionLayer):
            served = multi_precision_qarray(site, module.inner.kernel[...],
                                            module.kernel_scale[...], bits)
        elif isinstance(module, LowRankLayer):
            served = adapter_to_qarray(site, *module.tensors())
        else:
            w_scale = None if module.kernel_scale is None else module.kernel_scale[...]
            a_scale = module.input_scale
            kernel = module.inner.kernel[...]
            check_layer_params(site, kernel, w_scale, None if a_scale is None else a_scale[...])
            served = convert_layer(site, kernel, w_scale)
        if isinstance(served, QArray):
            served = relayout(served, packed=packed, k_major=k_major)
        module.inner.kernel = None
        layer = ServingLayer(module.inner, served, module.input_scale, module.lq, module.layout,
                             backend)
        set_submodule(out, path, layer)
    return out


def call_serving_model(model: nnx.Module, *args, backend: str = "xla", act_spec=None, **kwargs):
    """Calls a serving model with ``backend`` and ``act_spec`` (see :func:`qjax.convert.serve`)
    on its serving layers."""
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, ServingLayer)]
    if not layers:
        raise ValueError("the model has no serving layer: convert it with "
                         "qjax.convert.convert(model) first")
    for layer in layers:
        layer.backend = backend
        layer.act_spec = act_spec
    return model(*args, **kwargs)
