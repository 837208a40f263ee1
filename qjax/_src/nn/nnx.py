"""Implementation of :mod:`qjax.nn.nnx` (documented there)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qjax._src.nn import double_rounding as DR
from qjax._src.nn import lowrank as LR
from qjax._src.nn import ops as O
from qjax._src.nn import recipe as R
from qjax._src.nn.layout import KernelLayout, conv_layout, dense_layout, einsum_layout, embed_layout
from qjax._src.spec import QuantSpec

__all__ = ["QDense", "QEinsum", "QConv", "QEmbed", "QuantizedLayer", "LowRankLayer",
           "FrozenWeight", "MultiPrecisionLayer", "set_qat", "set_bits", "set_quant_rngs",
           "call_with_kernel"]

_default_kernel_init = nnx.initializers.lecun_normal()
_zeros_init = nnx.initializers.zeros_init()
_embed_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


def _backward_key(layer: nnx.Module) -> jax.Array | None:
    """The next key of ``layer.rngs``'s ``"quant"`` stream if the layer's backward needs one."""
    if layer.lq.backward == "float" or layer.rngs is None:
        return None
    return getattr(layer.rngs, O.QUANT_RNG)()


class _QLayer(nnx.Module):
    def _setup_quant(self, weight, activation, method, layout, features):
        self.lq = _resolve_layer(weight, activation, method, layout)
        self.qat = True
        self.rngs = None
        self.kernel_scale = (nnx.Param(O.init_kernel_scale(self._kernel_value(), self.lq.weight,
                                                           layout))
                             if R.learned(self.lq.weight) else None)
        self.input_scale = (nnx.Param(O.init_input_scale(self.lq.activation, features))
                            if R.learned(self.lq.activation) else None)

    def _kernel_value(self):
        return self.kernel[...]

    def _scale_values(self):
        w = None if self.kernel_scale is None else self.kernel_scale[...]
        a = None if self.input_scale is None else self.input_scale[...]
        return w, a


def _resolve_layer(weight, activation, method, layout: KernelLayout) -> R.LayerQuant:
    if method is not None:
        if weight is not None or activation is not None:
            raise ValueError("pass either method or weight/activation specs, not both")
        return R.resolve(method, layout)
    return R.resolve(R.LayerQuant(weight, activation), layout)


def _bias(rngs, init, shape, dtype, use_bias):
    return nnx.Param(init(rngs.params(), shape, dtype)) if use_bias else None


class QDense(_QLayer):
    """Quantized dense layer ``y = Q_a(x) @ Q_w(kernel) + bias``, kernel ``(in, out)``."""

    def __init__(self, in_features: int, out_features: int, *, weight: QuantSpec | None = None,
                 activation: QuantSpec | None = None, method: Any = None, use_bias: bool = True,
                 dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Callable = _default_kernel_init,
                 bias_init: Callable = _zeros_init, rngs: nnx.Rngs):
        O.check_sizes({"in_features": in_features, "out_features": out_features})
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features),
                                            param_dtype))
        self.bias = _bias(rngs, bias_init, (out_features,), param_dtype, use_bias)
        self.dtype, self.precision = dtype, precision
        self._setup_quant(weight, activation, method,
                          dense_layout((in_features, out_features)), in_features)

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        key = _backward_key(self) if self.qat else None
        return O.dense_op(x, self.kernel[...], bias, self.lq, *self._scale_values(),
                          qat=self.qat, dtype=self.dtype, precision=self.precision,
                          out_sharding=out_sharding, key=key)


class QEinsum(_QLayer):
    """Quantized einsum layer (no bias); see :class:`qjax.nn.linen.QEinsum`."""

    def __init__(self, einsum_str: str, kernel_shape: Sequence[int], *,
                 weight: QuantSpec | None = None, activation: QuantSpec | None = None,
                 method: Any = None, dtype: Any = None, param_dtype: Any = jnp.float32,
                 precision: Any = None, kernel_init: Callable = _default_kernel_init,
                 rngs: nnx.Rngs):
        kernel_shape = O.as_tuple(kernel_shape, len(kernel_shape), "kernel_shape")
        layout = einsum_layout(einsum_str, kernel_shape)
        self.einsum_str = einsum_str
        self.kernel = nnx.Param(kernel_init(rngs.params(), kernel_shape, param_dtype))
        self.dtype, self.precision = dtype, precision
        self._setup_quant(weight, activation, method, layout, layout.k)

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        key = _backward_key(self) if self.qat else None
        return O.einsum_op(self.einsum_str, x, self.kernel[...], None, self.lq,
                           *self._scale_values(), qat=self.qat, dtype=self.dtype,
                           precision=self.precision, out_sharding=out_sharding, key=key)


class QConv(_QLayer):
    """Quantized channel-last convolution; kernel ``(*kernel_size, in, out)``."""

    def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int], *,
                 strides: int | Sequence[int] = 1, padding: Any = "SAME",
                 kernel_dilation: int | Sequence[int] = 1, weight: QuantSpec | None = None,
                 activation: QuantSpec | None = None, method: Any = None, use_bias: bool = True,
                 dtype: Any = None, param_dtype: Any = jnp.float32, precision: Any = None,
                 kernel_init: Callable = _default_kernel_init,
                 bias_init: Callable = _zeros_init, rngs: nnx.Rngs):
        O.check_sizes({"in_features": in_features, "out_features": out_features})
        n = len(kernel_size)
        shape = O.as_tuple(kernel_size, n, "kernel_size") + (in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = _bias(rngs, bias_init, (out_features,), param_dtype, use_bias)
        self.strides = O.as_tuple(strides, n, "strides")
        self.kernel_dilation = O.as_tuple(kernel_dilation, n, "kernel_dilation")
        self.padding, self.dtype, self.precision = padding, dtype, precision
        self._setup_quant(weight, activation, method, conv_layout(shape), in_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return O.conv_op(x, self.kernel[...], bias, self.lq, *self._scale_values(), qat=self.qat,
                         strides=self.strides, padding=self.padding,
                         kernel_dilation=self.kernel_dilation, dtype=self.dtype,
                         precision=self.precision)


class QEmbed(_QLayer):
    """Weight-only quantized embedding table ``(num_embeddings, features)``."""

    def __init__(self, num_embeddings: int, features: int, *, weight: QuantSpec | None = None,
                 method: Any = None, dtype: Any = None, param_dtype: Any = jnp.float32,
                 embedding_init: Callable = _embed_init, rngs: nnx.Rngs):
        O.check_sizes({"num_embeddings": num_embeddings, "features": features})
        self.embedding = nnx.Param(embedding_init(rngs.params(), (num_embeddings, features),
                                                  param_dtype))
        self.dtype = dtype
        self._setup_quant(weight, None, method,
                          embed_layout((num_embeddings, features)), features)

    def _kernel_value(self):
        return self.embedding[...]

    def __call__(self, ids: jax.Array) -> jax.Array:
        w, _ = self._scale_values()
        return O.embed_op(ids, self.embedding[...], self.lq, w, qat=self.qat, dtype=self.dtype)


class QuantizedLayer(nnx.Module):
    """Wraps an existing NNX layer (``Linear``, ``LinearGeneral``, ``Einsum``, ``Conv``): its
    input and ``kernel`` are quantized, then the layer itself runs on them.

    The layer is split into its graph and state, ``kernel`` is replaced by the quantized kernel
    and the layer is merged back for the call, so any layer whose op is linear in ``kernel`` and
    in its input works unchanged; gradients reach the original ``kernel``. A stacked layer
    (``nnx.vmap`` of a constructor: kernel ``(L, *layout.shape)``) gets stacked learned
    parameters, so ``nnx.scan`` over the stack hands each layer its own.
    """

    def __init__(self, inner: nnx.Module, lq: R.LayerQuant, layout: KernelLayout):
        self.inner = inner
        self.layout = layout
        self.lq = lq
        self.qat = True
        self.rngs = None
        kernel = inner.kernel[...]
        stack = tuple(kernel.shape[:kernel.ndim - len(layout.shape)])
        features = inner.in_features if layout.kind == "conv" else layout.k
        self.kernel_scale = (nnx.Param(O.init_kernel_scale(kernel, lq.weight, layout))
                             if R.learned(lq.weight) else None)
        self.input_scale = (nnx.Param(O.init_input_scale(lq.activation, features, stack))
                            if R.learned(lq.activation) else None)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Sizes of the leading stack axes of the kernel (``()`` when not stacked)."""
        kernel = self.inner.kernel[...]
        return tuple(kernel.shape[:kernel.ndim - len(self.layout.shape)])

    def __call__(self, *args, **kwargs) -> jax.Array:
        x, args, kwargs = O.split_input(args, kwargs)
        O.check_bool("qat", self.qat)  # a plain attribute: set_qat checks it, assignments do not
        if not self.qat:
            return self.inner(x, *args, **kwargs)
        w = None if self.kernel_scale is None else self.kernel_scale[...]
        a = None if self.input_scale is None else self.input_scale[...]
        kernel = self.inner.kernel[...]
        if self.lq.integer_forward:
            bias = getattr(self.inner, "bias", None)
            return O.integer_dense(x, kernel, None if bias is None else bias[...], self.lq,
                                   self.layout, dtype=getattr(self.inner, "dtype", None),
                                   key=_backward_key(self))
        xq = O.quantize_input(x, self.lq, self.layout, a)
        return call_with_kernel(self.inner, O.quantize_kernel(kernel, self.lq, self.layout, w),
                                xq, *args, **kwargs)


def call_with_kernel(layer: nnx.Module, kernel: jax.Array, *args, **kwargs):
    """Calls an NNX layer with its ``kernel`` replaced by ``kernel`` (the layer is unchanged; a
    layer whose ``kernel`` was removed, None, gets one on a copy)."""
    graphdef, state = nnx.split(layer)
    if "kernel" in state:
        state["kernel"] = state["kernel"].replace(kernel)
        return nnx.merge(graphdef, state)(*args, **kwargs)
    copy = nnx.merge(graphdef, state)
    copy.kernel = nnx.Param(kernel)
    return copy(*args, **kwargs)


class FrozenWeight(nnx.Variable):
    """A frozen tensor (LR-QAT's ``Phi0``, QALoRA's dequantized ``W0``): not an ``nnx.Param``,
    so ``nnx.Optimizer(..., wrt=nnx.Param)`` and ``nnx.grad`` leave it alone."""


_ADAPTERS = ("lora_down", "lora_up", "kernel_scale")


class LowRankLayer(nnx.Module):
    """Wraps an NNX layer for LR-QAT or QALoRA (:mod:`qjax.nn.lowrank`): its kernel becomes a
    frozen tensor plus trained adapters; the float kernel is dropped (``inner.kernel = None``).

    A stacked layer (``nnx.vmap`` of a constructor) gets stacked tensors, each layer's computed
    on its own slice with the ops of an unstacked one.
    """

    def __init__(self, inner: nnx.Module, lq: R.LayerQuant, layout: KernelLayout,
                 recipe: LR.LowRankQAT, key: jax.Array):
        kernel = inner.kernel[...]
        m = layout.to_matrix(kernel)
        stack = tuple(m.shape[:-2])
        flat = m.reshape((-1,) + m.shape[-2:])
        keys = jax.random.split(key, flat.shape[0])
        parts = [LR.init_state(flat[i], recipe, keys[i]) for i in range(flat.shape[0])]
        frozen, trained = jax.tree.map(
            lambda *a: jnp.stack(a).reshape(stack + a[0].shape), *parts)
        self.frozen_names = tuple(frozen)
        for name, value in frozen.items():
            setattr(self, name, FrozenWeight(value))
        for name in _ADAPTERS:
            setattr(self, name, nnx.Param(trained[name]))
        features = inner.in_features if layout.kind == "conv" else layout.k
        self.input_scale = (nnx.Param(O.init_input_scale(lq.activation, features, stack))
                            if R.learned(lq.activation) else None)
        self.dtype = kernel.dtype
        self.stack_shape = stack
        inner.kernel = None
        self.inner, self.lq, self.layout, self.recipe = inner, lq, layout, recipe
        self.qat = True

    def tensors(self) -> tuple[dict, dict]:
        """(frozen, adapters) as arrays."""
        frozen = {k: getattr(self, k)[...] for k in self.frozen_names}
        return frozen, {k: getattr(self, k)[...] for k in _ADAPTERS}

    def __call__(self, *args, **kwargs) -> jax.Array:
        x, args, kwargs = O.split_input(args, kwargs)
        O.check_bool("qat", self.qat)
        frozen, adapters = self.tensors()
        layout, recipe, inner = self.layout, self.recipe, self.inner
        if not self.qat:
            kernel = layout.from_matrix(LR.float_kernel(frozen, adapters, recipe, self.dtype))
            return call_with_kernel(inner, kernel, x, *args, **kwargs)
        a = None if self.input_scale is None else self.input_scale[...]
        xq = O.quantize_input(x, self.lq, layout, a)

        def run(xq, frozen, adapters):
            kernel = layout.from_matrix(LR.effective_kernel(frozen, adapters, recipe,
                                                            self.dtype))
            return call_with_kernel(inner, kernel, xq, *args, **kwargs)

        return jax.checkpoint(run)(xq, frozen, adapters)


def set_qat(model: nnx.Module, enabled: bool) -> int:
    """Turns quantization on or off in every quantized layer of ``model``; returns their count."""
    O.check_bool("enabled", enabled)
    n = 0
    for _, module in nnx.iter_modules(model):
        if isinstance(module, (_QLayer, QuantizedLayer, LowRankLayer)):
            module.qat = enabled
            n += 1
    return n


def set_quant_rngs(model: nnx.Module, rngs: nnx.Rngs | None) -> int:
    """Gives every quantized layer of ``model`` (wrappers and explicit layers) ``rngs`` as the
    source of its quantized backward's keys (None removes it); returns how many layers got it.

    One ``nnx.Rngs`` is shared: each call of a layer with ``backward="int8"`` draws the next key
    of its ``"quant"`` stream (``"default"`` if it has none). Without it, differentiating such a
    layer raises.
    """
    if rngs is not None and not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"rngs must be an nnx.Rngs or None, got {type(rngs).__name__}")
    n = 0
    for _, module in nnx.iter_modules(model):
        if isinstance(module, (_QLayer, QuantizedLayer)):
            module.rngs = nnx.data(rngs)  # data, not a static attribute: its count advances
            n += 1
    return n


class MultiPrecisionLayer(QuantizedLayer):
    """Wraps an NNX layer for Double Rounding (:mod:`qjax.nn.double_rounding`): ``kernel_scale``
    is ``s_h`` (``max|W| / qmax_h`` per block at init); the attribute ``bits`` picks the
    precision of the forward (:func:`set_bits`; default the highest)."""

    def __init__(self, inner: nnx.Module, lq: R.LayerQuant, layout: KernelLayout,
                 recipe: DR.DoubleRounding):
        self.inner, self.layout, self.lq, self.recipe = inner, layout, lq, recipe
        self.qat = True
        self.bits = recipe.highest
        m = layout.to_matrix(inner.kernel[...])
        stack = tuple(m.shape[:-2])
        self.kernel_scale = nnx.Param(O.per_matrix(
            lambda t: DR.init_scale(t["w"], recipe), {"w": m}, stack))
        features = inner.in_features if layout.kind == "conv" else layout.k
        self.input_scale = (nnx.Param(O.init_input_scale(lq.activation, features, stack))
                            if R.learned(lq.activation) else None)

    def __call__(self, *args, **kwargs) -> jax.Array:
        x, args, kwargs = O.split_input(args, kwargs)
        O.check_bool("qat", self.qat)
        if not self.qat:
            return self.inner(x, *args, **kwargs)
        kernel = self.inner.kernel[...]
        w = DR.double_round(self.layout.to_matrix(kernel), self.kernel_scale[...], self.recipe,
                            self.bits)
        a = None if self.input_scale is None else self.input_scale[...]
        xq = O.quantize_input(x, self.lq, self.layout, a)
        return call_with_kernel(self.inner, self.layout.from_matrix(w), xq, *args, **kwargs)


def set_bits(model: nnx.Module, bits: int) -> int:
    """Sets the precision of every multi-precision layer of ``model``; returns their count."""
    n = 0
    for _, module in nnx.iter_modules(model):
        if isinstance(module, MultiPrecisionLayer):
            module.bits = module.recipe.check(bits)
            n += 1
    return n
