"""Implementation of :mod:`qjax.nn.linen` (documented there)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax._src.nn import ops as O
from qjax._src.nn import recipe as R
from qjax._src.nn.layout import conv_layout, dense_layout, einsum_layout, embed_layout
from qjax._src.nn.linen_intercept import quant_key
from qjax._src.spec import QuantSpec

__all__ = ["QDense", "QEinsum", "QConv", "QEmbed"]

_default_kernel_init = nn.initializers.lecun_normal()


class _QLayer(nn.Module):
    def _lq(self, layout):
        if self.method is not None:
            if self.weight is not None or self.activation is not None:
                raise ValueError("pass either method or weight/activation specs, not both")
            return R.resolve(self.method, layout)
        return R.resolve(R.LayerQuant(self.weight, self.activation), layout)

    def _scales(self, lq, kernel, layout, features):
        w = (self.param("kernel_scale", lambda _: O.init_kernel_scale(kernel, lq.weight, layout))
             if R.learned(lq.weight) else None)
        a = (self.param("input_scale", lambda _: O.init_input_scale(lq.activation, features))
             if R.learned(lq.activation) else None)
        return w, a

    def _backward_key(self, lq: R.LayerQuant, qat: bool) -> jax.Array | None:
        """The key of ``lq``'s quantized backward when this call runs it: a draw from the
        ``"quant"`` stream (:func:`qjax._src.nn.linen_intercept.quant_key`), or None (float
        backward,
        ``qat=False``, or no such stream: then differentiating raises, naming the fix)."""
        if lq.backward == "float" or not qat:
            return None  # no draw: the float backward needs no noise, and make_rng counts calls
        return quant_key(self)


class QDense(_QLayer):
    """Quantized ``nn.Dense``: ``y = Q_a(x) @ Q_w(kernel) + bias``, kernel ``(K, features)``.

    ``x (..., K) -> (..., features)``. With ``backward="int8"`` in the recipe, a QAT call draws
    one key from the ``"quant"`` rng stream for the stochastic rounding of its int8 gradient
    matmuls (:func:`qjax._src.nn.ops.integer_dense`): ``apply(..., rngs={"quant": key})``, a new key
    per training step. The same ``rngs`` give the same gradients; a model of ``QDense`` layers
    draws the keys its ``nn.Dense`` twin draws under :func:`qjax.nn.quantize_model` (same module
    paths). Without the stream the forward runs, and differentiating it raises a ValueError
    naming the fix.
    """

    features: int
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    method: Any = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = _default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x, qat: bool = True, out_sharding=None):
        O.check_sizes({"features": self.features})
        layout = dense_layout((x.shape[-1], self.features))
        lq = self._lq(layout)
        kernel = self.param("kernel", self.kernel_init, layout.shape, self.param_dtype)
        w_scale, a_scale = self._scales(lq, kernel, layout, x.shape[-1])
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        return O.dense_op(x, kernel, bias, lq, w_scale, a_scale, qat=qat, dtype=self.dtype,
                          precision=self.precision, out_sharding=out_sharding,
                          key=self._backward_key(lq, qat))


class QEinsum(_QLayer):
    """Quantized ``nn.Einsum`` (no bias): ``einsum(einsum_str, Q_a(x), Q_w(kernel))``.

    Method presets need the input's last axis contracted with exactly one kernel axis (as in
    attention projections ``"btd,dnh->btnh"``). A quantized backward (``backward="int8"``, an
    einsum without batch axes) draws its key from the ``"quant"`` rng stream, as
    :class:`QDense`.
    """

    shape: Sequence[int]
    einsum_str: str
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    method: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = _default_kernel_init

    @nn.compact
    def __call__(self, x, qat: bool = True, out_sharding=None):
        shape = O.as_tuple(self.shape, len(self.shape), "shape")
        layout = einsum_layout(self.einsum_str, shape)
        lq = self._lq(layout)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        w_scale, a_scale = self._scales(lq, kernel, layout, layout.k)
        return O.einsum_op(self.einsum_str, x, kernel, None, lq, w_scale, a_scale, qat=qat,
                           dtype=self.dtype, precision=self.precision, out_sharding=out_sharding,
                           key=self._backward_key(lq, qat))


class QConv(_QLayer):
    """Quantized channel-last ``nn.Conv``; kernel ``(*kernel_size, C, features)``."""

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    method: Any = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = _default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x, qat: bool = True):
        O.check_sizes({"features": self.features})
        n = len(self.kernel_size)
        shape = O.as_tuple(self.kernel_size, n, "kernel_size") + (x.shape[-1], self.features)
        layout = conv_layout(shape)
        lq = self._lq(layout)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        w_scale, a_scale = self._scales(lq, kernel, layout, x.shape[-1])
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        return O.conv_op(
            x, kernel, bias, lq, w_scale, a_scale, qat=qat,
            strides=O.as_tuple(self.strides, n, "strides"), padding=self.padding,
            kernel_dilation=O.as_tuple(self.kernel_dilation, n, "kernel_dilation"),
            dtype=self.dtype, precision=self.precision,
        )


class QEmbed(_QLayer):
    """Weight-only quantized ``nn.Embed``: rows of ``Q_w(embedding)``; ``activation`` unused."""

    num_embeddings: int
    features: int
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    method: Any = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    embedding_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)

    @nn.compact
    def __call__(self, ids, qat: bool = True):
        O.check_sizes({"num_embeddings": self.num_embeddings, "features": self.features})
        layout = embed_layout((self.num_embeddings, self.features))
        lq = self._lq(layout)
        if lq.activation is not None:
            raise ValueError("QEmbed is weight-only: activation must be None")
        table = self.param("embedding", self.embedding_init, layout.shape, self.param_dtype)
        w_scale, _ = self._scales(lq, table, layout, self.features)
        return O.embed_op(ids, table, lq, w_scale, qat=qat, dtype=self.dtype)
