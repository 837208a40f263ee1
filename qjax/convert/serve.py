"""The serving forward: the same Flax model, run on converted params (packed QArray kernels).

``serve(model, serving_params, *args)`` runs ``model.model`` (the original Flax module) and
intercepts each quantized ``Dense`` (``flax.linen.intercept_methods``, as
:func:`qjax.nn.quantize_model` does for QAT), replacing its matmul by :func:`serving_matmul`:

* weight-only layers (and layers whose activation spec has no exact int8 code, e.g. learned
  LSQ/PACT scales): the input is quantized or rotated exactly as in QAT, then multiplied by the
  dequantized kernel. The ops are those of the QAT forward on the same values, so the output
  equals it bit for bit;
* weight + activation layers accepted by :func:`qjax.qdot.integer_forward_reason`: the input is
  rotated (QuEST's half Hadamard form), quantized per token on the fly, and multiplied by the
  int8 weight codes with an int8 x int8 -> int32 ``lax.dot_general``; scales are applied after
  (:func:`qjax.qdot.int8_matmul`, the op of QAT's integer forward). Against the fake-quant QAT
  forward the result differs by float accumulation order only; against QAT with
  ``integer_forward=True`` it is the same computation.

Contract (design.md section 2), tested under ``jax.jit`` and in eager mode.

References:
  Panferov et al., 2025, QuEST (odd-integer codes ``u = 2q + 1`` for the int8 matmul).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax import formats as F
from qjax import granularity as G
from qjax import spec as SP
from qjax._checks import check_floating
from qjax.convert.weights import serving_layers, serving_spec
from qjax.kernels import quantized_matmul
from qjax.nn import common as C
from qjax.nn.rewrite import QuantizedLinenModel
from qjax.qarray import QArray
from qjax.qdot import (
    check_int32_sum,
    int8_matmul,
    int8_operand,
    integer_forward_reason,
    operand_codes,
)
from qjax.quantize import dequantize

__all__ = ["serve", "serving_matmul", "BACKENDS", "uses_integer_matmul"]

#: ``"xla"``: the serving path below, whose weight-only product is bit-exact against the QAT
#: forward; the others delegate to :func:`qjax.kernels.quantized_matmul` (``"auto"`` is
#: ``"xla"`` on CPU, the platform's Pallas kernels on TPU and GPU).
BACKENDS = ("xla", "auto", "pallas_tpu", "pallas_gpu", "interpret")


def _training_view(spec: SP.QuantSpec) -> SP.QuantSpec:
    """A serving ``(N, K)`` weight spec as :func:`integer_forward_reason` sees a ``(K, N)`` one."""
    if isinstance(spec.granularity, G.PerRow) and spec.granularity.axis in (-1, 1):
        return spec.replace(granularity=G.PerRow(0))
    return spec


def _weight_int8(w: QArray) -> tuple[jax.Array, jax.Array]:
    fmt = w.spec.format
    if isinstance(fmt, F.IntFormat) and fmt.bits == 8 and w.codes.dtype == jnp.int8:
        return w.codes, w.scale  # stored as the int8 codes themselves
    return int8_operand(w.codes_float32(), w.scale, fmt)


def serving_matmul(
    x: jax.Array,
    w: QArray,
    *,
    act_spec: SP.QuantSpec | None = None,
    precision=None,
    backend: str = "xla",
) -> jax.Array:
    """``x @ dequantize(w).T``, or with ``act_spec`` the int8 product ``Q_a(x) @ w.T``.

    The signature of ``qjax.kernels.quantized_matmul``, which can replace it for other backends.

    Args:
      x: ``(..., K)`` float input (already rotated when the specs use the half Hadamard form).
      w: serving QArray ``(N, K)`` (from :func:`qjax.convert.convert`).
      act_spec: None (weight-only: dequantize, then a float ``lax.dot_general`` like
        ``flax.linen.Dense``'s), or an activation spec accepted by
        :func:`qjax.qdot.integer_forward_reason` (quantize per token on the fly; int8 x int8 ->
        int32 dot; float32 scales after).
      precision: ``lax.dot_general`` precision of the float product.
      backend: one of :data:`BACKENDS`. Pallas kernels agree with ``"xla"`` to float
        accumulation order (integer codes identical), not bit for bit.

    Returns:
      ``(..., N)`` in ``x``'s dtype (weight-only: ``result_type(x, w.dtype)``).

    Raises:
      TypeError: ``x`` not a floating array, ``w`` not a QArray, ``act_spec`` not a QuantSpec.
      ValueError: an unknown backend, mismatched shapes, specs without an integer matmul, or a K
        whose int32 sum could overflow (:func:`qjax.qdot.check_int32_sum`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_floating(x, "x")
    if not isinstance(w, QArray):
        raise TypeError(f"w must be a qjax.QArray, got {type(w).__name__}")
    SP.check_spec(act_spec, "act_spec", optional=True)
    if w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"need x (..., K) and w (N, K), got {x.shape} and {w.shape}")
    if backend == "auto" and jax.default_backend() not in ("tpu", "gpu", "cuda"):
        backend = "xla"
    if backend != "xla":
        return quantized_matmul(x, w, act_spec=act_spec, backend=backend)
    if act_spec is None:
        dtype = jnp.result_type(x, jnp.dtype(w.dtype))
        wt = dequantize(w).T.astype(dtype)
        return jax.lax.dot_general(x.astype(dtype), wt, (((x.ndim - 1,), (0,)), ((), ())),
                                   precision=precision)
    reason = integer_forward_reason(_training_view(w.spec), act_spec)
    if reason:
        raise ValueError(f"no integer matmul for these specs: {reason}")
    check_int32_sum(w.shape[1], act_spec.format, w.spec.format)
    q, s = operand_codes(x.astype(jnp.float32), act_spec.replace(hadamard=None), -1)
    xi, xs = int8_operand(q, s, act_spec.format)
    wi, ws = _weight_int8(w)
    return int8_matmul(xi, xs, wi, ws, 1).astype(x.dtype)


def uses_integer_matmul(lq: C.LayerQuant) -> bool:
    """Whether :func:`serve` runs this layer as an int8 x int8 matmul."""
    if not isinstance(lq, C.LayerQuant):
        raise TypeError(f"lq must be a qjax.nn.LayerQuant, got {type(lq).__name__}")
    return lq.activation is not None and integer_forward_reason(lq.weight, lq.activation) is None


def _discover(model: QuantizedLinenModel, args, kwargs) -> dict:
    model._discover(args, kwargs)
    return serving_layers(model)


def _check_params(serving_params: Mapping, layers: dict) -> None:
    for path, lq in layers.items():
        node = serving_params
        for name in path:
            if not isinstance(node, Mapping) or name not in node:
                raise ValueError(f"serving params have no layer {'/'.join(path)!r}: they do not "
                                 "match the model")
            node = node[name]
        kernel = node.get("kernel") if isinstance(node, Mapping) else None
        if lq.weight is not None and not isinstance(kernel, QArray):
            raise ValueError(f"layer {'/'.join(path)!r}: kernel is not a QArray; convert the "
                             "params with qjax.convert.convert first")
        if lq.weight is not None and kernel.spec != serving_spec(lq.weight):
            raise ValueError(f"layer {'/'.join(path)!r}: the kernel was converted with "
                             f"{kernel.spec}, not with the model's weight spec")
        if "kernel_scale" in node:
            raise ValueError(f"layer {'/'.join(path)!r} still has a kernel_scale: these are QAT "
                             "params, not serving params")


def _input_scale(module: nn.Module):
    return module.variables["params"].get("input_scale")


def serve(model: QuantizedLinenModel, serving_params: Mapping, *args, backend: str = "xla",
          **kwargs):
    """The serving forward of ``model`` on ``serving_params`` (see the module docstring).

    Args:
      model: the :class:`~qjax.nn.QuantizedLinenModel` the params were trained with.
      serving_params: the output of :func:`qjax.convert.convert` (the ``params`` collection).
      *args, **kwargs: the model's inputs, as for ``model.apply``.
      backend: the integer matmul's backend (see :func:`serving_matmul`).

    Returns:
      What the model returns.
    """
    if not isinstance(model, QuantizedLinenModel):
        raise TypeError(f"model must be a qjax.nn.QuantizedLinenModel, got "
                        f"{type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(serving_params, Mapping):
        raise TypeError(f"serving_params must be a mapping, got {type(serving_params).__name__}")
    layers = _discover(model, args, {k: v for k, v in kwargs.items()
                                     if k not in ("rngs", "mutable", "method")})
    _check_params(serving_params, layers)

    def intercept(next_fun, a, kw, context):
        m = context.module
        lq = layers.get(tuple(m.path)) if context.method_name == "__call__" else None
        if lq is None:
            return next_fun(*a, **kw)
        if lq.weight is None:
            return next_fun(C.quantize_input(a[0], lq, _input_scale(m)), *a[1:], **kw)
        if type(m) is not nn.Dense:
            raise ValueError(f"layer {'/'.join(m.path)!r} ({type(m).__name__}): serving "
                             "supports quantized nn.Dense layers only")
        params = m.variables["params"]
        w, bias = params["kernel"], params.get("bias")
        if uses_integer_matmul(lq):
            x = C._rotate(a[0], lq.rotation, -1)
            y = serving_matmul(x, w, act_spec=lq.activation, backend=backend)
        else:
            x = C.quantize_input(a[0], lq, _input_scale(m))
            dtype = m.dtype or jnp.result_type(x, jnp.dtype(w.dtype))
            y = serving_matmul(x.astype(dtype), w, precision=m.precision, backend=backend)
        if bias is not None:
            y = y + jnp.reshape(bias.astype(y.dtype), (1,) * (y.ndim - 1) + (-1,))
        return y

    with nn.intercept_methods(intercept):
        return model.model.apply({"params": serving_params}, *args, **kwargs)
