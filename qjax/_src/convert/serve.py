"""The serving forward: the same Flax model, run on converted params (packed QArray kernels).

``serve(model, serving_params, *args)`` (Linen) runs ``model.model`` and intercepts each quantized
layer (as QAT does, :mod:`qjax._src.nn.rewrite`); an NNX serving model (from
:func:`qjax.convert.convert`) holds :class:`~qjax._src.convert.nnx_serving.ServingLayer` modules
that
do the same. Both call :func:`serve_layer`:

* **integer dense** (Dense, DenseGeneral, Einsum without batch axes; weight and activation specs
  accepted by :func:`qjax._src.qdot.integer_forward_reason`): the input is rotated (QuEST's half
  Hadamard form) and viewed as rows ``(..., K)``, then :func:`qjax.kernels.quantized_matmul`
  quantizes it per token or per tensor and multiplies the int8 codes with the weight's
  (``"xla"``: an int8 x int8 -> int32 ``lax.dot_general``, scales after). The same computation
  as QAT with ``integer_forward=True`` (bit for bit in float32); against fake-quant QAT it differs
  by float accumulation order only.
* **integer conv** (activations per example or per tensor, weights per output channel): an int8
  ``lax.conv_general_dilated`` with int32 accumulation, scales after.
* **everything else** (weight-only, learned activation scales, asymmetric or grouped weights,
  batch axes, Conv padding modes other than SAME/VALID/explicit): the input is quantized exactly
  as in QAT and the layer's own op runs on the dequantized kernel; the ops are QAT's on the same
  values, so the output equals it bit for bit. With a Pallas backend, dense weight-only layers
  use :func:`qjax.kernels.quantized_matmul`'s kernels instead (equal up to float accumulation
  order).

Contract (docs/design.md section 9), tested under ``jax.jit`` and in eager mode.

References:
  Panferov et al., 2025, QuEST (odd-integer codes ``u = 2q + 1`` for the int8 matmul).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax._src import estimators as E
from qjax._src import granularity as G
from qjax._src import int8_blocks
from qjax._src import spec as SP
from qjax._src._checks import check_floating
from qjax._src.convert.weights import dequantize_kernel, serving_spec
from qjax._src.int8 import training_weight_spec
from qjax._src.int8_blocks import block_reason
from qjax._src.kernels.api import BACKENDS, quantized_matmul
from qjax._src.nn.double_rounding import DoubleRounding
from qjax._src.nn.layout import KernelLayout
from qjax._src.nn.linen_intercept import call_linen_layer, raw_site_call, run_linen
from qjax._src.nn.ops import (
    add_bias,
    arrange_output,
    conv_dimension_numbers,
    quantize_input,
    rotate_input,
)
from qjax._src.nn.recipe import LayerQuant
from qjax._src.nn.rewrite import QuantizedLinenModel
from qjax._src.nn.site import Site, subtree
from qjax._src.qarray import QArray
from qjax._src.qdot import check_int32_sum, int8_operand, integer_forward_reason

__all__ = ["serve", "serve_layer", "serving_matmul", "BACKENDS", "uses_integer_matmul",
           "integer_product", "conv_config"]


def serving_matmul(x: jax.Array, w: QArray, *, act_spec: SP.QuantSpec | None = None,
                   precision=None, backend: str = "xla") -> jax.Array:
    """``x @ dequantize(w).T``, or with ``act_spec`` the int8 product ``Q_a(x) @ w.T``.

    Weight-only on ``"xla"``: a float ``lax.dot_general`` like ``flax.linen.Dense``'s (with
    ``precision``); spec pairs of :mod:`qjax._src.int8_blocks` (per-block scales, zero points): its
    blockwise product, in XLA ops on every backend; otherwise
    :func:`qjax.kernels.quantized_matmul`.

    Args:
      x: ``(..., K)`` float input (already rotated when the specs use the half Hadamard form).
      w: serving QArray ``(N, K)`` (from :func:`qjax.convert.convert`).
      act_spec: None (weight-only) or an activation spec with an integer matmul.
      precision: ``lax.dot_general`` precision of the float product.
      backend: one of :data:`BACKENDS`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_floating(x, "x")
    if not isinstance(w, QArray):
        raise TypeError(f"w must be a qjax.QArray, got {type(w).__name__}")
    SP.check_spec(act_spec, "act_spec", optional=True)
    if w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"need x (..., K) and w (N, K), got {x.shape} and {w.shape}")
    if act_spec is None and backend == "xla":
        from qjax._src.quantize import dequantize

        dtype = jnp.result_type(x, jnp.dtype(w.dtype))
        wt = dequantize(w).T.astype(dtype)
        return jax.lax.dot_general(x.astype(dtype), wt, (((x.ndim - 1,), (0,)), ((), ())),
                                   precision=precision)
    if act_spec is not None:
        reason = integer_forward_reason(training_weight_spec(w.spec), act_spec)
        if reason and block_reason(training_weight_spec(w.spec), act_spec) is None:
            return int8_blocks.matmul(x, w, act_spec).astype(x.dtype)
        if reason:
            raise ValueError(f"no integer matmul for these specs: {reason}")
    return quantized_matmul(x, w, act_spec=act_spec, backend=backend)


IntegerProduct = Literal["int8", "int8_blocks"]


def integer_product(lq: LayerQuant, layout: KernelLayout | None = None,
                    act_spec: SP.QuantSpec | None = None) -> IntegerProduct | None:
    """Which integer product :func:`serve_layer` runs for this layer, or None (dequantized).

    ``"int8"``: :mod:`qjax._src.int8`'s rule (one int32 sum over K; dense and conv layers);
    ``"int8_blocks"``: :mod:`qjax._src.int8_blocks` (per-block scales and zero points: Q4_0 x Q8_0,
    torchao 8da4w; dense layers). ``act_spec`` is the opt-in activation spec of a weight-only
    layer (:func:`serve`); a layer trained with an activation spec keeps its own.
    """
    if not isinstance(lq, LayerQuant):
        raise TypeError(f"lq must be a qjax.nn.LayerQuant, got {type(lq).__name__}")
    SP.check_spec(act_spec, "act_spec", optional=True)
    activation = lq.activation if lq.activation is not None else act_spec
    if activation is None or lq.weight is None:
        return None
    if layout is not None and layout.kind == "conv":
        if lq.activation is None:
            return None
        g = lq.activation.granularity
        if g != G.PerTensor() and g != G.PerAxis(0):
            return None
        return "int8" if integer_forward_reason(lq.weight, lq.activation.replace(
            granularity=G.PerTensor())) is None else None
    if layout is not None and (layout.kind != "dense" or layout.batch):
        return None
    if integer_forward_reason(lq.weight, activation) is None:
        return "int8"
    return "int8_blocks" if block_reason(lq.weight, activation) is None else None


def uses_integer_matmul(lq: LayerQuant, layout: KernelLayout | None = None,
                        act_spec: SP.QuantSpec | None = None) -> bool:
    """Whether :func:`serve_layer` runs this layer with int8 x int8 products
    (:func:`integer_product` is not None)."""
    return integer_product(lq, layout, act_spec) is not None


def conv_config(module) -> dict | None:
    """``lax.conv_general_dilated`` arguments of a Flax ``Conv`` (Linen or NNX), or None if its
    padding mode or mask has no integer convolution (CIRCULAR, CAUSAL, masked kernels)."""
    padding = module.padding
    if getattr(module, "mask", None) is not None:
        return None
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            return None
        padding = padding.upper()
    elif isinstance(padding, int):
        padding = None if padding < 0 else padding
    n = len(module.kernel_size)

    def tup(v):
        return (1,) * n if v is None else ((v,) * n if isinstance(v, int) else tuple(v))

    if isinstance(padding, int):
        padding = [(padding, padding)] * n
    elif not isinstance(padding, str):
        padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    return dict(window_strides=tup(module.strides), padding=padding,
                lhs_dilation=tup(getattr(module, "input_dilation", 1)),
                rhs_dilation=tup(module.kernel_dilation),
                feature_group_count=int(getattr(module, "feature_group_count", 1)))


def _integer_conv(x, w: QArray, lq: LayerQuant, layout: KernelLayout, cfg: dict):
    spec = lq.activation
    x32 = rotate_input(x, lq, layout).astype(jnp.float32)
    reduce = tuple(range(x32.ndim)) if spec.granularity == G.PerTensor() else tuple(
        range(1, x32.ndim))
    scale, _ = spec.scale_rule.compute(x32, reduce, spec.format)
    xi, xs = int8_operand(E.encode(x32, scale, None, spec.format), scale, spec.format)
    wi, ws = int8_operand(w.codes_float32(), w.scale, w.spec.format)
    check_int32_sum(layout.k, spec.format, w.spec.format)
    wi = layout.from_matrix(jnp.swapaxes(wi, -1, -2))
    acc = jax.lax.conv_general_dilated(
        xi, wi, dimension_numbers=conv_dimension_numbers(x.ndim, wi.ndim),
        preferred_element_type=jnp.int32, **cfg)
    y = acc.astype(jnp.float32) * xs * ws.reshape(-1)
    return jnp.maximum(y, jnp.finfo(jnp.float32).min)  # no FMA with a following add (jit == eager)


def serve_layer(x: jax.Array, w, lq: LayerQuant, layout: KernelLayout, input_scale,
                run_with_kernel: Callable, *, bias=None, dtype=None, conv: dict | None = None,
                backend: str = "xla", act_spec: SP.QuantSpec | None = None) -> jax.Array:
    """The serving forward of one layer (see the module docstring).

    Args:
      x: the layer's input.
      w: its serving kernel: a QArray ``(*batch, N, K)``, or a float kernel (no weight spec).
      lq, layout: the layer's recipe and kernel layout.
      input_scale: the learned activation parameter, or None.
      run_with_kernel: ``f(x, kernel)`` runs the layer's own op (bias included) with ``kernel``.
      bias: the layer's bias (integer paths add it as the layer would).
      dtype: the layer's compute dtype (None: from the input and the weight).
      conv: :func:`conv_config` of a convolution, or None.
      backend: one of :data:`BACKENDS`.
      act_spec: the opt-in activation spec of a weight-only layer (see :func:`serve`).
    """
    if not isinstance(w, QArray):
        return run_with_kernel(quantize_input(x, lq, layout, input_scale), w)
    dtype = dtype or jnp.result_type(x, jnp.dtype(w.dtype))
    x = x.astype(dtype)
    dense = layout.kind == "dense" and not layout.batch
    product = integer_product(lq, layout, act_spec)
    if product is not None:
        if dense:
            rows = layout.input_to_rows(rotate_input(x, lq, layout))
            spec = lq.activation if lq.activation is not None else act_spec
            if product == "int8":
                y = quantized_matmul(rows, w, act_spec=spec, backend=backend)
            else:  # XLA ops on every backend: the Pallas kernels have no per-block int kind
                y = int8_blocks.matmul(rows, w, spec).astype(dtype)
            return add_bias(arrange_output(y, x.shape, layout), bias, layout)
        if conv is not None and x.ndim == len(layout.shape):
            y = _integer_conv(x, w, lq, layout, conv).astype(dtype)
            return add_bias(y, bias, layout)
    xq = quantize_input(x, lq, layout, input_scale)
    if dense and backend != "xla" and lq.activation is None:
        y = quantized_matmul(layout.input_to_rows(xq), w, backend=backend)
        return add_bias(arrange_output(y, x.shape, layout), bias, layout)
    return run_with_kernel(xq, dequantize_kernel(w, layout))


def _check_params(serving_params: Mapping, sites: dict[str, Site]) -> None:
    for path, site in sites.items():
        node = subtree(serving_params, site.keys, "serving params")
        kernel = node.get(site.param)
        lq = site.recipe
        if lq.weight is not None and not isinstance(kernel, QArray):
            raise ValueError(f"layer {path!r}: kernel is not a QArray; convert the params with "
                             "qjax.convert.convert first")
        want = serving_spec(lq.weight) if lq.weight is not None else None
        if isinstance(site.adapter, DoubleRounding) and isinstance(kernel, QArray) and (
                kernel.spec.format.bits in site.adapter.bits):
            want = want.replace(format=kernel.spec.format)  # any of its precisions serves
        if lq.weight is not None and kernel.spec != want:
            raise ValueError(f"layer {path!r}: the kernel was converted with {kernel.spec}, not "
                             "with the model's weight spec")
        if "kernel_scale" in node:
            raise ValueError(f"layer {path!r} still has a kernel_scale: these are QAT params, "
                             "not serving params")


def _linen_handler(backend: str, act_spec: SP.QuantSpec | None) -> Callable:
    def handler(site: Site, m, a, kw, next_fun):
        p = dict(nn.unbox(m.variables["params"]))
        w, input_scale = p.pop("kernel"), p.pop("input_scale", None)
        run = lambda xq, kernel: call_linen_layer(m, {**p, "kernel": kernel}, xq, *a[1:], **kw)
        conv = conv_config(m) if site.layout.kind == "conv" else None
        return serve_layer(a[0], w, site.recipe, site.layout, input_scale, run,
                           bias=p.get("bias"), dtype=getattr(m, "dtype", None), conv=conv,
                           backend=backend, act_spec=act_spec)

    return handler


def serve(model, *args, backend: str = "xla", act_spec: SP.QuantSpec | None = None, **kwargs):
    """The serving forward of a converted model.

    * Linen: ``serve(model, serving_params, *inputs)`` with the
      :class:`~qjax.nn.QuantizedLinenModel` the params were trained with and the output of
      :func:`qjax.convert.convert`.
    * NNX: ``serve(serving_model, *inputs)`` with the model :func:`qjax.convert.convert`
      returned (the same as calling it, with ``backend`` set on its layers).

    Args:
      backend: the matmul backend, one of :data:`BACKENDS` (see :func:`serve_layer`).
      act_spec: opt-in activation quantization of the **weight-only** layers (W4A8, W8A8): their
        dense inputs are quantized with this spec and multiplied as int8 codes
        (:func:`integer_product`: ``QuantSpec("int8", "row")`` per token, or a preset such as
        :func:`qjax.presets.gguf_q8_0` for llama.cpp's Q4_0 x Q8_0). It changes the numerics
        relative to the weight-only QAT forward; layers trained with an activation spec, and
        layers with no integer product for it (convolutions, einsums with batch axes), keep
        their own forward. None: every layer as trained.

    Returns:
      What the model returns.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    SP.check_spec(act_spec, "act_spec", optional=True)
    from flax import nnx

    if isinstance(model, nnx.Module):
        from qjax._src.convert.nnx_serving import call_serving_model

        return call_serving_model(model, *args, backend=backend, act_spec=act_spec, **kwargs)
    if not isinstance(model, QuantizedLinenModel):
        raise TypeError(f"model must be a qjax.nn.QuantizedLinenModel or an NNX serving model, "
                        f"got {type(model).__name__}")
    if not args or not isinstance(args[0], Mapping):
        raise TypeError("serve(model, serving_params, *inputs): serving_params must be a mapping")
    serving_params, args = args[0], args[1:]
    sites = model.sites(*args, **kwargs)
    _check_params(serving_params, sites)
    params = _raw_placeholders(serving_params, sites)
    return run_linen(model.model, lambda: model.model.apply({"params": params}, *args, **kwargs),
                     _linen_handler(backend, act_spec), sites,
                     _raw_serve_handler(sites, backend, act_spec))


_RAW_PREFIX = "qjax_serving_"


def _raw_placeholders(serving_params: Mapping, sites: Mapping[str, Site]) -> Mapping:
    """A raw kernel's module reads its parameter with ``self.param``, which checks its shape: the
    QArray moves beside it (``qjax_serving_<name>``, so scans slice it per layer too) and the
    parameter becomes a zero placeholder of the float kernel's shape, which the op handler
    recognises and never multiplies (under ``jit`` it is not materialized)."""
    raw = [s for s in sites.values() if s.raw]
    if not raw:
        return serving_params
    out = jax.tree_util.tree_map(lambda a: a, dict(serving_params),
                                 is_leaf=lambda a: isinstance(a, QArray))
    for site in raw:
        node = out
        for key in site.keys:
            node[key] = dict(node[key])
            node = node[key]
        w = node[site.param]
        node[_RAW_PREFIX + site.param] = w
        node[site.param] = jnp.broadcast_to(jnp.zeros((), w.dtype), site.kernel_shape)
    return out


def _raw_serve_handler(sites: Mapping[str, Site], backend: str,
                       act_spec: SP.QuantSpec | None) -> Callable | None:
    if not any(s.raw for s in sites.values()):
        return None

    def handler(m, op, args, kwargs, original):
        hit = raw_site_call(sites, m, op, args, kwargs)
        if hit is None:
            return original(*args, **kwargs)
        site, x, _, call = hit
        w = m.variables["params"][_RAW_PREFIX + site.param]
        return serve_layer(x, w, site.recipe, site.layout, None, call, backend=backend,
                           act_spec=act_spec)

    return handler
