"""Trained QAT params -> serving params: every quantized kernel becomes a packed QArray.

``convert(params, model_or_rules)`` walks the quantized layers of a model built with
:func:`qjax.nn.quantize_model` (or matched by path rules) and replaces each Flax ``Dense`` kernel
``(K, N)`` by a :class:`~qjax.QArray` in the serving layout ``(N, K)``:

1. codes and scales come from :func:`qjax.quantize` on the kernel **in its training layout**,
   with the learned ``kernel_scale`` if the spec learns one, so they are the very codes the QAT
   forward decodes (QuEST weights are quantized after their Hadamard rotation, so they are stored
   pre-rotated);
2. the float32 codes and the scales are transposed (exact: integers and copies);
3. the codes are stored with :func:`qjax.qarray.codes_to_storage` along the new last axis ``K``
   (int8; int4 two per byte; int2 four; 1-bit eight), the layout of GGUF and of
   ``qjax.kernels.quantized_matmul`` (``x @ dequantize(w).T``).

The serving spec is the training spec with its axes moved to the transposed layout (``PerRow(0)``
becomes ``PerRow(-1)``, a Hadamard along axis 0 one along axis -1), so
``dequantize(w).T == fake_quant(kernel)`` bit for bit. ``kernel_scale`` is folded into the QArray;
``input_scale`` (a learned activation scale) and every float leaf stay as they are.

References:
  design.md section 2 (numerics contract); Panferov et al., 2025, QuEST (pre-rotated weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from qjax import granularity as G
from qjax import spec as SP
from qjax.nn import common as C
from qjax.nn.rewrite import QuantizedLinenModel, parse_rules
from qjax.qarray import QArray, codes_to_storage
from qjax.quantize import quantize

__all__ = ["convert", "serving_layers", "serving_spec", "kernel_to_qarray"]


def _other_axis(axis: int, name: str) -> int:
    """Axis of a 2-D ``(K, N)`` array after the transpose to ``(N, K)``, as -1 or -2.

    Raises ValueError for an axis a rank-2 kernel does not have (``axis % 2`` would wrap it).
    """
    return -1 if G._normalize(axis, 2, name) == 0 else -2


def _transpose_granularity(g: G.Granularity) -> G.Granularity:
    if isinstance(g, G.PerTensor):
        return g
    if isinstance(g, G.PerRow):
        return G.PerRow(_other_axis(g.axis, "spec.granularity axis"))
    if isinstance(g, G.PerGroup):
        return G.PerGroup(_other_axis(g.axis, "spec.granularity axis"), g.size)
    if isinstance(g, G.PerAxis):
        axes = g.axis if isinstance(g.axis, tuple) else (g.axis,)
        moved = tuple(_other_axis(a, "spec.granularity axis") for a in axes)
        return G.PerAxis(moved if isinstance(g.axis, tuple) else moved[0])
    raise TypeError(f"unsupported granularity {g!r}")


def serving_spec(spec: SP.QuantSpec) -> SP.QuantSpec:
    """``spec`` of a 2-D ``(K, N)`` kernel, moved to the transposed ``(N, K)`` layout.

    Raises:
      TypeError: ``spec`` is not a QuantSpec.
      ValueError: a granularity or Hadamard axis out of range for a 2-D kernel.
    """
    if not isinstance(spec, SP.QuantSpec):
        raise TypeError(f"spec must be a qjax.QuantSpec, got {type(spec).__name__}")
    moved = {} if spec.hadamard is None else {
        "hadamard_axis": _other_axis(spec.hadamard_axis, "spec.hadamard_axis")}
    return spec.replace(granularity=_transpose_granularity(spec.granularity), **moved)


def _transpose_blocked(a: jax.Array, old: G.Layout, new: G.Layout) -> jax.Array:
    """Per-block values ``a`` (``old.scale_shape``) of a ``(K, N)`` array, for its transpose."""
    full = jnp.broadcast_to(a, old.blocked_shape).reshape(old.shape).T
    idx = tuple(slice(0, 1) if i in new.reduce_axes else slice(None)
                for i in range(len(new.blocked_shape)))
    return new.block(full)[idx]


def kernel_to_qarray(kernel: jax.Array, spec: SP.QuantSpec,
                     kernel_scale: jax.Array | None = None) -> QArray:
    """A Dense kernel ``(K, N)`` as a serving QArray ``(N, K)`` (see the module docstring).

    Args:
      kernel: float ``(K, N)``, contracted along axis 0.
      spec: the layer's weight spec in the training layout.
      kernel_scale: the learned scale (LSQ step, PACT clip) if the spec learns one.

    Returns:
      QArray of shape ``(N, K)`` with ``spec = serving_spec(spec)`` and
      ``dequantize(result).T == fake_quant(kernel, spec, scale=kernel_scale)``.
    """
    if getattr(kernel, "ndim", None) != 2:
        raise ValueError(f"kernel must be a 2-D (K, N) array, got shape "
                         f"{getattr(kernel, 'shape', None)}")
    new_spec = serving_spec(spec)  # first: it checks that spec is a QuantSpec for a 2-D kernel
    if spec.rounding == "stochastic":
        raise ValueError("stochastic rounding has no deterministic serving codes; use "
                         "rounding='nearest' for the weights")
    qa = quantize(kernel, spec, scale=kernel_scale)
    old_lay = G.layout(spec.granularity, qa.shape)
    new_lay = G.layout(new_spec.granularity, qa.shape[::-1])
    codes = qa.codes_float32().T
    zp = qa.zero_point
    return QArray(
        codes=codes_to_storage(codes, spec.format),
        scale=_transpose_blocked(qa.scale, old_lay, new_lay),
        zero_point=None if zp is None else _transpose_blocked(zp, old_lay, new_lay),
        spec=new_spec,
        shape=new_lay.shape,
        dtype=qa.dtype,
    )


Rules = Mapping[str, Any] | Sequence[tuple[str, Any]]


def _walk_kernels(params, prefix=()):
    if isinstance(params, Mapping):
        if "kernel" in params and not isinstance(params["kernel"], Mapping):
            yield prefix
        for k, v in params.items():
            if isinstance(v, Mapping):
                yield from _walk_kernels(v, prefix + (str(k),))


def serving_layers(model_or_rules: QuantizedLinenModel | Rules,
                   params: Mapping | None = None) -> dict[tuple[str, ...], C.LayerQuant]:
    """Quantized Dense layers: ``{path: LayerQuant}``.

    Args:
      model_or_rules: a :class:`~qjax.nn.QuantizedLinenModel` after ``init`` or ``apply`` (its
        discovered layers), or rules as :func:`qjax.nn.quantize_model` takes them, matched
        against the paths of ``params`` that hold a ``kernel`` (taken as Dense kernels ``(K, N)``).
      params: needed with rules.

    Raises:
      ValueError: a model whose layers are not discovered yet, or a quantized layer that is not
        a Dense (kernel contracted along axis 0).
    """
    if isinstance(model_or_rules, QuantizedLinenModel):
        found = model_or_rules._layers
        if found is None:
            raise ValueError("the model's quantized layers are unknown until it has run: call "
                             "model.init(...) or model.apply(...) once before converting")
        out = {}
        for path, layer in found.items():
            if layer.contract_axis != 0:
                raise ValueError(f"layer {'/'.join(path)!r}: convert supports Dense layers "
                                 f"(kernel (K, N) contracted along axis 0) only")
            out[path] = layer.lq
        return out
    if params is None:
        raise ValueError("converting by rules needs params")
    rules = parse_rules(model_or_rules)
    out = {}
    for path in _walk_kernels(params):
        for pattern, target in rules:
            if pattern.fullmatch("/".join(path)):
                if target is not None:
                    out[path] = C.resolve(target, 0)
                break
    return out


def _node(params: Mapping, path: tuple[str, ...]) -> Mapping:
    node = params
    for i, name in enumerate(path):
        if not isinstance(node, Mapping) or name not in node:
            raise ValueError(f"params have no layer {'/'.join(path[:i + 1])!r}: the params do "
                             "not match the model")
        node = node[name]
    if not isinstance(node, Mapping) or "kernel" not in node:
        raise ValueError(f"params of layer {'/'.join(path)!r} have no kernel: the params do not "
                         "match the model")
    return node


def _copy_tree(t):
    return {k: _copy_tree(v) for k, v in t.items()} if isinstance(t, Mapping) else t


def convert(params: Mapping, model_or_rules: QuantizedLinenModel | Rules) -> dict:
    """Serving params: quantized kernels as packed QArrays ``(N, K)``, float leaves unchanged.

    Args:
      params: the QAT model's ``params`` collection (as returned by ``init`` / training), with
        learned ``kernel_scale`` / ``input_scale`` beside the kernels where the specs learn them.
      model_or_rules: the :class:`~qjax.nn.QuantizedLinenModel` (after ``init``) or its rules.

    Returns:
      A new nested dict; at each quantized layer ``kernel`` is a QArray (see
      :func:`kernel_to_qarray`), ``kernel_scale`` is gone, ``input_scale`` stays.

    Raises:
      TypeError: params that are not a mapping.
      ValueError: params that do not match the model (a quantized layer missing, a kernel that is
        not 2-D or of another width than its learned scale, a missing learned scale).
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping (the 'params' collection), got "
                        f"{type(params).__name__}")
    if "params" in params and len(params) <= 2 and isinstance(params["params"], Mapping):
        raise ValueError("pass the 'params' collection (variables['params']), not the variables")
    layers = serving_layers(model_or_rules, params)
    out = _copy_tree(params)
    for path, lq in layers.items():
        node = _node(out, path)
        kernel = node["kernel"]
        if isinstance(kernel, QArray):
            raise ValueError(f"layer {'/'.join(path)!r} is already converted")
        w_scale = node.pop("kernel_scale", None)
        if lq.weight is None:
            if w_scale is not None:
                raise ValueError(f"layer {'/'.join(path)!r} has a kernel_scale but no weight spec")
            # A float kernel whose input is rotated is rotated too, as the QAT forward does.
            node["kernel"] = C.quantize_kernel(kernel, lq, 0)
            continue
        if C.learned(lq.weight) and w_scale is None:
            raise ValueError(f"layer {'/'.join(path)!r}: the weight spec learns its scale but "
                             "the params have no kernel_scale")
        if C.learned(lq.activation) and "input_scale" not in node:
            raise ValueError(f"layer {'/'.join(path)!r}: the activation spec learns its scale "
                             "but the params have no input_scale")
        try:
            node["kernel"] = kernel_to_qarray(kernel, lq.weight, w_scale)
        except ValueError as e:
            raise ValueError(f"layer {'/'.join(path)!r}: {e}") from None
    return out
