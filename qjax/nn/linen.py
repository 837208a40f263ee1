"""Quantized Flax Linen layers: ``QDense``, ``QEinsum``, ``QConv``, ``QEmbed``.

Each takes a weight spec and an activation spec (either may be None) or a ``method``
(``"quest"``, ``"lsq"``, ``"pact"``, ``"ste"`` or a :class:`~qjax.nn.Method`). Parameters have the
names and initializers of the matching Flax layer (``kernel``, ``bias``, ``embedding``) plus the
learned quantizer parameters ``kernel_scale`` / ``input_scale`` when the specs need them. Call with
``qat=False`` to run the float layer on the same parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qjax.nn import common as C
from qjax.spec import QuantSpec

__all__ = ["QDense", "QEinsum", "QConv", "QEmbed"]

_default_kernel_init = nn.initializers.lecun_normal()


class _QLayer(nn.Module):
    def _lq(self, contract_axis):
        return C._resolve_layer(self.weight, self.activation, self.method, contract_axis)

    def _scales(self, lq, kernel, features):
        w = (self.param("kernel_scale", lambda _: C.init_kernel_scale(kernel, lq.weight))
             if C.learned(lq.weight) else None)
        a = (self.param("input_scale", lambda _: C.init_input_scale(lq.activation, features))
             if C.learned(lq.activation) else None)
        return w, a


class QDense(_QLayer):
    """Quantized ``nn.Dense``: ``y = Q_a(x) @ Q_w(kernel) + bias``, kernel ``(K, features)``."""

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
        C.check_sizes({"features": self.features})
        lq = self._lq(0)
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                            self.param_dtype)
        w_scale, a_scale = self._scales(lq, kernel, x.shape[-1])
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        return C.dense_op(x, kernel, bias, lq, w_scale, a_scale, qat=qat, dtype=self.dtype,
                          precision=self.precision, out_sharding=out_sharding)


class QEinsum(_QLayer):
    """Quantized ``nn.Einsum`` (no bias): ``einsum(einsum_str, Q_a(x), Q_w(kernel))``.

    Method presets need the input's last axis contracted with exactly one kernel axis (as in
    attention projections ``"btd,dnh->btnh"``).
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
        lq = self._lq(C.einsum_contract_axis(self.einsum_str))
        shape = C.as_tuple(self.shape, len(self.shape), "shape")
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        w_scale, a_scale = self._scales(lq, kernel, x.shape[-1])
        return C.einsum_op(self.einsum_str, x, kernel, None, lq, w_scale, a_scale, qat=qat,
                           dtype=self.dtype, precision=self.precision, out_sharding=out_sharding)


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
        C.check_sizes({"features": self.features})
        lq = self._lq(-2)
        n = len(self.kernel_size)
        shape = C.as_tuple(self.kernel_size, n, "kernel_size") + (x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        w_scale, a_scale = self._scales(lq, kernel, x.shape[-1])
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        return C.conv_op(
            x, kernel, bias, lq, w_scale, a_scale, qat=qat,
            strides=C.as_tuple(self.strides, n, "strides"), padding=self.padding,
            kernel_dilation=C.as_tuple(self.kernel_dilation, n, "kernel_dilation"),
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
        C.check_sizes({"num_embeddings": self.num_embeddings, "features": self.features})
        lq = self._lq(None)
        if lq.activation is not None:
            raise ValueError("QEmbed is weight-only: activation must be None")
        table = self.param("embedding", self.embedding_init,
                           (self.num_embeddings, self.features), self.param_dtype)
        w_scale, _ = self._scales(lq, table, self.features)
        return C.embed_op(ids, table, lq, w_scale, qat=qat, dtype=self.dtype)
