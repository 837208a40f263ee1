"""Quantize an existing Flax model without rewriting it: ``quantize_model(model, rules)``.

``rules`` is an ordered mapping (or a sequence of pairs) from regular expressions to targets. A
layer's path (``"blocks_0/attn/q_proj"`` in Linen, ``"layers/0/attn/q"`` in NNX) is matched with
``re.fullmatch``; the first rule that matches wins; a target of None keeps the layer in float, as
does matching no rule. Targets are a method name (``"quest"``, ``"lsq"``, ``"pact"``, ``"ste"``), a
:class:`~qjax.nn.Method` or a :class:`~qjax.nn.LayerQuant`. Layers that can be quantized: Linen
``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``; NNX ``Linear``, ``LinearGeneral``, ``Einsum``,
``Conv``. A rule that matches no layer triggers a warning.

* **Linen**: returns a :class:`QuantizedLinenModel` with ``init`` and ``apply`` like the model's.
  Weights are fake-quantized in the parameter tree before the model runs (so any layer whose op is
  linear in ``kernel`` works unchanged), and inputs are quantized by intercepting the matched
  layers' ``__call__`` (``flax.linen.intercept_methods``). Learned quantizer parameters are stored
  beside each kernel as ``kernel_scale`` / ``input_scale``. ``apply(..., qat=False)`` runs in float.
* **NNX**: replaces each matched submodule in place by a
  :class:`~qjax.nn.nnx.QuantizedLayer` wrapping it, and returns the model.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from qjax.nn import common as C
from qjax.nn.nnx import QuantizedLayer

__all__ = ["quantize_model", "QuantizedLinenModel", "parse_rules"]

Rules = Mapping[str, Any] | Sequence[tuple[str, Any]]


def parse_rules(rules: Rules) -> tuple[tuple[re.Pattern, Any], ...]:
    """Compiles ``rules``; validates every target (None, a method name, Method or LayerQuant)."""
    if isinstance(rules, str) or not isinstance(rules, Iterable):
        raise TypeError(f"rules must be a mapping or a sequence of (regex, target) pairs, got "
                        f"{rules!r}")
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2
                and isinstance(item[0], (str, re.Pattern))):
            raise TypeError(f"each rule must be a (regex, target) pair, got {item!r}")
        pattern, target = item
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"rule {pattern!r} is not a valid regular expression: {e}") from None
        out.append((compiled, None if target is None else C.as_target(target)))
    return tuple(out)


def _match(rules, path: str):
    for i, (pattern, target) in enumerate(rules):
        if pattern.fullmatch(path):
            return i, target
    return None, None


def _warn_unused(rules, used: set[int]) -> None:
    for i, (pattern, _) in enumerate(rules):
        if i not in used:
            warnings.warn(f"quantization rule {pattern.pattern!r} matches no layer", stacklevel=4)


@dataclasses.dataclass(frozen=True)
class _Layer:
    path: tuple[str, ...]
    lq: C.LayerQuant
    contract_axis: int


def _general_contract_axis(axis, x_ndim: int | None) -> int | None:
    """Kernel axis of a DenseGeneral/LinearGeneral that meets the input's last axis, or None."""
    axes = tuple(axis) if isinstance(axis, Sequence) else (axis,)
    if x_ndim is not None:
        axes = tuple(a % x_ndim for a in axes)
        last = x_ndim - 1
    else:
        last = -1
    return axes.index(last) if last in axes else None


def _linen_contract_axis(module: nn.Module, x_ndim: int) -> int | None:
    if isinstance(module, nn.Dense):
        return 0
    if isinstance(module, nn.Conv):
        return -2
    if isinstance(module, nn.Einsum) and module.einsum_str is not None:
        return C.einsum_contract_axis(module.einsum_str)
    if isinstance(module, nn.DenseGeneral) and not module.batch_dims:
        return _general_contract_axis(module.axis, x_ndim)
    return None


_LINEN_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)


class QuantizedLinenModel:
    """A Linen model with quantized layers; ``init``/``apply`` mirror ``flax.linen.Module``'s."""

    def __init__(self, model: nn.Module, rules: Rules):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a flax.linen.Module, got {type(model).__name__}")
        self.model = model
        self.rules = parse_rules(rules)
        self._layers: dict[tuple[str, ...], _Layer] | None = None
        self._signature: tuple | None = None

    @property
    def layers(self) -> dict[str, C.LayerQuant]:
        """Quantized layer paths and their specs (after ``init`` or a first ``apply``)."""
        return {"/".join(k): v.lq for k, v in (self._layers or {}).items()}

    def _discover(self, args, kwargs) -> dict[tuple[str, ...], _Layer]:
        # Which layers run, and the input rank they see, can depend on the inputs' ranks.
        signature = tuple(jax.numpy.ndim(a) for a in jax.tree_util.tree_leaves((args, kwargs)))
        if self._layers is not None and signature == self._signature:
            return self._layers
        self._signature = signature
        found: dict[tuple[str, ...], _Layer] = {}
        used: set[int] = set()

        def record(next_fun, a, kw, context):
            m = context.module
            if context.method_name == "__call__" and isinstance(m, _LINEN_TYPES):
                path = tuple(m.path)
                i, target = _match(self.rules, "/".join(path))
                if i is not None:
                    used.add(i)
                if target is not None and path not in found:
                    axis = _linen_contract_axis(m, jax.numpy.ndim(a[0]))
                    if axis is None and not isinstance(target, C.LayerQuant):
                        raise ValueError(
                            f"layer {'/'.join(path)!r} ({type(m).__name__}) does not contract "
                            "its input's last axis with one kernel axis; give a LayerQuant"
                        )
                    lq = C.resolve(target, axis)
                    if lq.integer_forward and type(m) is not nn.Dense:
                        raise ValueError(f"integer_forward supports nn.Dense layers only, not "
                                         f"{'/'.join(path)!r} ({type(m).__name__})")
                    found[path] = _Layer(path, lq, axis)
            return next_fun(*a, **kw)

        with nn.intercept_methods(record):
            jax.eval_shape(lambda: self.model.init(jax.random.key(0), *args, **kwargs))
        _warn_unused(self.rules, used)
        self._layers = found
        return found

    def init(self, rngs, *args, **kwargs) -> dict:
        """The model's variables plus learned quantizer parameters beside matched kernels."""
        layers = self._discover(args, kwargs)
        variables = nn.unbox(self.model.init(rngs, *args, **kwargs))
        params = jax.tree_util.tree_map(lambda a: a, dict(variables["params"]))
        for layer in layers.values():
            node = _subtree(params, layer.path)
            if C.learned(layer.lq.weight):
                node["kernel_scale"] = C.init_kernel_scale(node["kernel"], layer.lq.weight)
            if C.learned(layer.lq.activation):
                features = node["kernel"].shape[layer.contract_axis]
                node["input_scale"] = C.init_input_scale(layer.lq.activation, features)
        return {**variables, "params": params}

    def apply(self, variables, *args, qat: bool = True, **kwargs):
        """Runs the model; with ``qat`` its matched layers see quantized inputs and kernels."""
        C.check_bool("qat", qat)
        layers = self._discover(args, {k: v for k, v in kwargs.items()
                                       if k not in ("rngs", "mutable", "method")})
        params = jax.tree_util.tree_map(lambda a: a, dict(variables["params"]))
        input_scales = {}
        for layer in layers.values():
            node = _subtree(params, layer.path)
            w_scale = node.pop("kernel_scale", None)
            input_scales[layer.path] = node.pop("input_scale", None)
            if qat and not layer.lq.integer_forward:
                node["kernel"] = C.quantize_kernel(node["kernel"], layer.lq,
                                                   layer.contract_axis, w_scale)
        new_vars = {**variables, "params": params}
        if not qat:
            return self.model.apply(new_vars, *args, **kwargs)

        def quantize_inputs(next_fun, a, kw, context):
            m = context.module
            layer = layers.get(tuple(m.path)) if context.method_name == "__call__" else None
            if layer is not None and layer.lq.integer_forward:
                # The whole Dense runs as an integer-forward QAT matmul (kernel left in float).
                p = m.variables["params"]
                return C.dense_op(a[0], p["kernel"], p.get("bias"), layer.lq, None, None,
                                  qat=True, dtype=m.dtype, precision=m.precision)
            if layer is not None and isinstance(m, _LINEN_TYPES):
                a = (C.quantize_input(a[0], layer.lq, input_scales[layer.path]),) + tuple(a[1:])
            return next_fun(*a, **kw)

        with nn.intercept_methods(quantize_inputs):
            return self.model.apply(new_vars, *args, **kwargs)


def _subtree(params: dict, path: tuple[str, ...]) -> dict:
    node = params
    for name in path:
        if name not in node:
            raise ValueError(f"no parameters at {'/'.join(path)!r}: params do not match the model")
        node[name] = dict(node[name])
        node = node[name]
    return node


def _nnx_layer_info(module) -> tuple[int | None, int] | None:
    """(contract axis, input features) of a quantizable NNX layer, or None."""
    if isinstance(module, nnx.Linear):
        return 0, module.in_features
    if isinstance(module, nnx.Conv):
        return -2, module.in_features
    if isinstance(module, nnx.Einsum):
        axis = C.einsum_contract_axis(module.einsum_str)
        return axis, module.kernel[...].shape[axis]
    if isinstance(module, nnx.LinearGeneral):
        ins = module.in_features
        ins = (ins,) if isinstance(ins, int) else tuple(ins)
        axis = _general_contract_axis(module.axis, None)
        return axis, (ins[axis] if axis is not None else ins[-1])
    return None


def _quantize_nnx(model: nnx.Module, rules) -> nnx.Module:
    replacements = []
    used: set[int] = set()
    for path, module in nnx.iter_modules(model):
        info = _nnx_layer_info(module)
        if info is None or not path:
            continue
        i, target = _match(rules, "/".join(str(p) for p in path))
        if i is not None:
            used.add(i)
        if target is None:
            continue
        axis, features = info
        if axis is None and not isinstance(target, C.LayerQuant):
            raise ValueError(f"layer {path!r} has several contraction axes; give a LayerQuant")
        replacements.append((path, QuantizedLayer(module, C.resolve(target, axis), axis,
                                                  features)))
    _warn_unused(rules, used)
    for path, wrapper in replacements:
        parent = model
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        if isinstance(path[-1], int):
            parent[path[-1]] = wrapper
        else:
            setattr(parent, path[-1], wrapper)
    return model


def quantize_model(model, rules: Rules):
    """Quantizes a Flax Linen or NNX model by path rules (see the module docstring).

    Returns:
      A :class:`QuantizedLinenModel` for a Linen module; the same (modified) NNX module.
    """
    parsed = parse_rules(rules)
    if isinstance(model, nn.Module):
        return QuantizedLinenModel(model, parsed)
    if isinstance(model, nnx.Module):
        return _quantize_nnx(model, parsed)
    raise TypeError(f"model must be a Flax Linen or NNX module, got {type(model).__name__}")
