"""Quantize an existing Flax model without rewriting it: ``quantize_model(model, rules)``.

``rules`` is an ordered mapping (or a sequence of pairs) from regular expressions to targets. A
layer's path (``"blocks_0/attn/q_proj"`` in Linen, ``"layers/0/attn/q"`` in NNX) is matched with
``re.fullmatch``; the first rule that matches wins; a target of None keeps the layer in float, as
does matching no rule. Targets are a method name (``"quest"``, ``"lsq"``, ``"pact"``, ``"ste"``), a
:class:`~qjax.nn.Method` or a :class:`~qjax.nn.LayerQuant`. Layers that can be quantized: Linen
``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``; NNX ``Linear``, ``LinearGeneral``, ``Einsum``,
``Conv``, also stacked by ``nn.scan`` / ``nnx.vmap`` (each layer of the stack is quantized on its
own). A rule that matches no layer triggers a warning; a recipe that does not fit a layer (a
Hadamard block or group that does not divide its K, a weight spec along N) is a ValueError
naming the layer.

* **Linen**: returns a :class:`QuantizedLinenModel` with ``init`` and ``apply`` like the model's.
  Each matched layer's ``__call__`` is intercepted (``flax.linen.intercept_methods``): the layer
  runs its own op on the quantized input and a quantized copy of its kernel
  (:mod:`qjax.nn.ops`). Learned quantizer parameters are created in the layer's own scope as
  ``kernel_scale`` / ``input_scale`` beside ``kernel`` (so ``nn.scan`` stacks them like the
  kernel). ``apply(..., qat=False)`` runs in float. :meth:`QuantizedLinenModel.sites` lists the
  quantized layers.
* **NNX**: replaces each matched submodule in place by a
  :class:`~qjax.nn.nnx.QuantizedLayer` wrapping it, and returns the model;
  :func:`qjax.nn.sites` lists them.
"""

from __future__ import annotations

import re
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from qjax._src import granularity as G
from qjax._src._checks import check_bool
from qjax._src.nn import double_rounding as DR
from qjax._src.nn import lowrank, ops
from qjax._src.nn.double_rounding import DoubleRounding
from qjax._src.nn.linen_intercept import (
    call_linen_layer,
    create_input_scale,
    layer_params,
    own_params,
    raw_site_call,
    run_linen,
)
from qjax._src.nn.lowrank import LowRankQAT
from qjax._src.nn.nnx import LowRankLayer, MultiPrecisionLayer, QuantizedLayer
from qjax._src.nn.op_intercept import match_raw_call
from qjax._src.nn.recipe import as_target, learned, resolve
from qjax._src.nn.site import Site, linen_layout, nnx_layout, path_keys

__all__ = ["quantize_model", "QuantizedLinenModel", "parse_rules", "sites", "set_submodule"]

Rules = Mapping[str, Any] | Sequence[tuple[str, Any]]

# Distinct primes no layer size equals: a probe parameter of this shape, created beside each
# matched kernel while discovering the layers (under eval_shape), shows where nn.scan / nn.vmap
# insert stack axes: the probe's extra axes are the kernel's.
_PROBE = "qjax_stack_probe"
_PROBE_DIMS = (7919, 7907, 7901, 7883, 7879, 7877, 7873, 7867)

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
        if target is not None and not isinstance(target, (LowRankQAT, DoubleRounding)):
            target = as_target(target)
        out.append((compiled, target))
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


def _stack_axes(probe_shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple]:
    axes = tuple(i for i, d in enumerate(probe_shape) if d not in _PROBE_DIMS[:rank])
    if len(probe_shape) - len(axes) != rank:
        raise ValueError(f"cannot tell the stacked axes of a probe of shape {probe_shape}")
    return axes, tuple(probe_shape[i] for i in axes)


def _tree_get(tree: Mapping, path: tuple[str, ...]):
    node = tree
    for name in path:
        node = node[name]
    return node


class QuantizedLinenModel:
    """A Linen model with quantized layers; ``init``/``apply`` mirror ``flax.linen.Module``'s."""

    def __init__(self, model: nn.Module, rules: Rules):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a flax.linen.Module, got {type(model).__name__}")
        self.model = model
        self.rules = parse_rules(rules)
        self._sites: dict[str, Site] | None = None
        self._signature: tuple | None = None

    @property
    def layers(self) -> dict[str, Any]:
        """Quantized layer paths and their :class:`~qjax.nn.LayerQuant` (after ``init`` or a
        first ``apply``; see :meth:`sites`)."""
        return {p: s.recipe for p, s in (self._sites or {}).items()}

    def sites(self, *args, **kwargs) -> dict[str, Site]:
        """The quantized layers, ``{path: Site}``, for inputs like ``args`` / ``kwargs``.

        Without arguments, those of the last ``init`` / ``apply``.

        Raises:
          ValueError: no arguments and the model has not run yet; a recipe that does not fit a
            layer (naming it).
        """
        if args or kwargs:
            return dict(self._discover(args, kwargs))
        if self._sites is None:
            raise ValueError("the model's quantized layers are unknown until it has run: call "
                             "model.init(...) or model.apply(...) once, or pass example inputs")
        return dict(self._sites)

    def _discover(self, args, kwargs) -> dict[str, Site]:
        # Which layers run, and what they see, depends on the method, the inputs' structure and
        # shapes, and static (non-array) arguments such as a train flag.
        method = kwargs.get("method")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("rngs", "mutable", "method")}
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        signature = (getattr(method, "__qualname__", method), treedef, tuple(
            (jnp.shape(a), jnp.result_type(a).name) if hasattr(a, "shape") or isinstance(
                a, (int, float, complex)) and not isinstance(a, bool) else repr(a)
            for a in leaves))
        if self._sites is not None and signature == self._signature:
            return self._sites
        if method is not None:
            kwargs = {**kwargs, "method": method}
        found: dict[str, tuple] = {}
        used: set[int] = set()

        def record(_, m, a, kw, next_fun):
            path = "/".join(m.path)
            i, target = _match(self.rules, path)
            if i is not None:
                used.add(i)
            y = next_fun(*a, **kw)
            if target is None:
                return y
            if path not in found:
                kernel_shape = jnp.shape(layer_params(m)["kernel"])
                eq = kw.get("einsum_str") or next((v for v in a[1:2] if isinstance(v, str)),
                                                   None)
                layout = linen_layout(m, kernel_shape, jnp.ndim(a[0]), eq)
                if layout is None:
                    raise ValueError(f"layer {path!r} ({type(m).__name__}): its kernel layout "
                                     "is unknown (an Einsum needs an einsum_str)")
                found[path] = (type(m).__name__, _fit(target, layout, path), layout,
                               target if isinstance(target, (LowRankQAT, DoubleRounding))
                               else None)
            # Every trace of the layer creates it: nn.scan may trace its body more than once.
            rank = len(found[path][2].shape)
            m.param(_PROBE, lambda _: jnp.zeros(_PROBE_DIMS[:rank], jnp.int8))
            return y

        raw: dict[str, tuple] = {}

        def record_op(m, op, args, kwargs, original):
            hit = match_raw_call(op, args, kwargs, own_params(m))
            if hit is None:
                return original(*args, **kwargs)
            name, _, _, layout_of, _ = hit
            path = "/".join(tuple(m.path) + (name,))
            i, target = _match(self.rules, path)
            if i is not None:
                used.add(i)
            if target is None:
                return original(*args, **kwargs)
            if path not in raw:
                raw[path] = (type(m).__name__, _raw_recipe(target, layout_of(), path), name)
            rank = len(raw[path][1][1].shape)
            m.param(f"{_PROBE}_{name}", lambda _: jnp.zeros(_PROBE_DIMS[:rank], jnp.int8))
            return original(*args, **kwargs)

        shapes = run_linen(self.model, lambda: jax.eval_shape(
            lambda: self.model.init(jax.random.key(0), *args, **kwargs)), record, None,
            record_op)
        _warn_unused(self.rules, used)
        params = nn.unbox(shapes).get("params", {})
        sites = {}
        for path, (module, lq, layout, adapter) in found.items():
            probe = _tree_get(params, path_keys(path) + (_PROBE,))
            stacked, stack_shape = _stack_axes(tuple(probe.shape), len(layout.shape))
            if stacked and stacked[0] != 0 and learned(lq.activation) and isinstance(
                    lq.activation.granularity, G.PerTensor):
                raise ValueError(f"layer {path!r}: stacked along axis {stacked[0]}, where Flax "
                                 "cannot stack its scalar learned input_scale; use "
                                 "variable_axes={'params': 0} or a recipe without a learned "
                                 "per-tensor input scale")
            sites[path] = Site(path, module, lq, layout, stacked, stack_shape, adapter=adapter)
        for path, (module, (lq, layout), name) in raw.items():
            probe = _tree_get(params, path_keys(path)[:-1] + (f"{_PROBE}_{name}",))
            stacked, stack_shape = _stack_axes(tuple(probe.shape), len(layout.shape))
            sites[path] = Site(path, module, lq, layout, stacked, stack_shape, name, True)
        self._sites, self._signature = sites, signature
        return sites

    def init(self, rngs, *args, **kwargs) -> dict:
        """The model's variables plus learned quantizer parameters beside matched kernels."""
        sites = self._discover(args, kwargs)
        variables = nn.unbox(run_linen(self.model, lambda: self.model.init(rngs, *args, **kwargs),
                                       _qat_handler(True), sites, _raw_handler(sites, True)))
        adapted = [s for s in sites.values() if isinstance(s.adapter, LowRankQAT)]
        if not adapted:
            return variables
        params = jax.tree_util.tree_map(lambda a: a, dict(variables["params"]))
        for site in adapted:  # the float kernel is not kept: the frozen tensor replaces it
            node = params
            for key in site.keys:
                node[key] = dict(node[key])
                node = node[key]
            node.pop("kernel", None)
        return {**variables, "params": params}

    def apply(self, variables, *args, qat: bool = True, bits: int | None = None, **kwargs):
        """Runs the model; with ``qat`` its matched layers see quantized inputs and kernels.

        ``bits`` picks the precision of multi-precision layers
        (:class:`~qjax.nn.double_rounding.DoubleRounding`; default: their highest).
        """
        check_bool("qat", qat)
        sites = self._discover(args, kwargs)
        for site in sites.values():
            if bits is not None and isinstance(site.adapter, DoubleRounding):
                site.adapter.check(bits)
        with ops.qat_scope(qat):
            return run_linen(self.model, lambda: self.model.apply(variables, *args, **kwargs),
                             _qat_handler(qat, bits), sites, _raw_handler(sites, qat))


def _fit(target, layout, path: str):
    if isinstance(target, (LowRankQAT, DoubleRounding)):
        return target.layer_quant(layout, path)
    return resolve(target, layout, path)


_ADAPTER_PARAMS = ("kernel", "lora_down", "lora_up", "kernel_scale", "input_scale")


def _lowrank_call(site: Site, m, a, kw, next_fun, qat: bool):
    """A layer with a low-rank QAT recipe (:mod:`qjax.nn.lowrank`)."""
    lq, layout, recipe = site.recipe, site.layout, site.adapter
    if m.is_initializing():
        next_fun(*a, **kw)
        w0 = layout.to_matrix(layer_params(m)["kernel"])
        frozen0, trained0 = lowrank.init_state(w0, recipe, m.make_rng("params"))
        for name, value in frozen0.items():
            m.variable(lowrank.FROZEN, name, lambda v=value: v)
        for name, value in trained0.items():
            m.param(name, lambda _, v=value: v)
        create_input_scale(m, lq, layout, a[0])
    p = layer_params(m)
    frozen = dict(m.variables[lowrank.FROZEN])
    adapters = {k: p[k] for k in ("lora_down", "lora_up", "kernel_scale")}
    rest = {k: v for k, v in p.items() if k not in _ADAPTER_PARAMS}
    dtype = getattr(m, "param_dtype", None) or jnp.float32
    if not qat:
        kernel = layout.from_matrix(lowrank.float_kernel(frozen, adapters, recipe, dtype))
        return call_linen_layer(m, {**rest, "kernel": kernel}, *a, **kw)
    xq = ops.quantize_input(a[0], lq, layout, p.get("input_scale"))

    def run(xq, frozen, adapters, rest):
        kernel = layout.from_matrix(lowrank.effective_kernel(frozen, adapters, recipe, dtype))
        return call_linen_layer(m, {**rest, "kernel": kernel}, xq, *a[1:], **kw)

    return jax.checkpoint(run)(xq, frozen, adapters, rest)


def _double_rounding_call(site: Site, m, a, kw, next_fun, qat: bool, bits: int | None):
    """A layer with a multi-precision recipe (:mod:`qjax.nn.double_rounding`)."""
    lq, layout, recipe = site.recipe, site.layout, site.adapter
    if m.is_initializing():
        next_fun(*a, **kw)
        w = layout.to_matrix(layer_params(m)["kernel"])
        m.param("kernel_scale", lambda _: DR.init_scale(w, recipe))
        create_input_scale(m, lq, layout, a[0])
    if not qat:
        return next_fun(*a, **kw)
    p = layer_params(m)
    scale, a_scale = p.pop("kernel_scale"), p.pop("input_scale", None)
    w = DR.double_round(layout.to_matrix(p["kernel"]), scale, recipe, bits)
    p["kernel"] = layout.from_matrix(w)
    return call_linen_layer(m, p, ops.quantize_input(a[0], lq, layout, a_scale), *a[1:], **kw)


def _qat_handler(qat: bool, bits: int | None = None) -> Callable:
    def handler(site: Site, m, a, kw, next_fun):
        lq, layout = site.recipe, site.layout
        if isinstance(site.adapter, LowRankQAT):
            return _lowrank_call(site, m, a, kw, next_fun, qat)
        if isinstance(site.adapter, DoubleRounding):
            return _double_rounding_call(site, m, a, kw, next_fun, qat, bits)
        if m.is_initializing():
            next_fun(*a, **kw)  # creates the layer's own parameters
            kernel = layer_params(m)["kernel"]
            if learned(lq.weight):
                m.param("kernel_scale", lambda _: ops.init_kernel_scale(kernel, lq.weight, layout))
            create_input_scale(m, lq, layout, a[0])
        if not qat:
            return next_fun(*a, **kw)
        p = layer_params(m)
        w_scale, a_scale = p.pop("kernel_scale", None), p.pop("input_scale", None)
        if lq.integer_forward:
            return ops.integer_dense(a[0], p["kernel"], p.get("bias"), lq, layout,
                                     dtype=getattr(m, "dtype", None))
        xq = ops.quantize_input(a[0], lq, layout, a_scale)
        p["kernel"] = ops.quantize_kernel(p["kernel"], lq, layout, w_scale)
        return call_linen_layer(m, p, xq, *a[1:], **kw)

    return handler


def _raw_recipe(target, layout, path: str):
    if isinstance(target, (LowRankQAT, DoubleRounding)):
        raise ValueError(f"parameter {path!r}: {type(target).__name__} recipes need a Flax layer "
                         "(they replace its kernel parameter); use quest, ste or a LayerQuant "
                         "for a raw parameter")
    if layout is None:
        raise ValueError(f"parameter {path!r}: its einsum / dot_general has no kernel layout "
                         "qjax can quantize (an einsum 'x,kernel->out' with the parameter as one "
                         "operand, or a dot_general with it on the right)")
    lq = resolve(target, layout, path)
    if learned(lq.weight) or learned(lq.activation):
        raise ValueError(f"parameter {path!r}: learned scales (LSQ, PACT) need a Flax layer to "
                         "hold kernel_scale / input_scale; use quest, ste or a LayerQuant "
                         "without learned scales for a raw parameter")
    return lq, layout


def _raw_handler(sites: Mapping[str, Site], qat: bool) -> Callable | None:
    """QAT of raw kernels (a module's own parameter in jnp.einsum / lax.dot_general)."""
    if not qat or not any(s.raw for s in sites.values()):
        return None

    def handler(m, op, args, kwargs, original):
        hit = raw_site_call(sites, m, op, args, kwargs)
        if hit is None:
            return original(*args, **kwargs)
        site, x, kernel, call = hit
        lq, layout = site.recipe, site.layout
        if lq.integer_forward:
            return ops.integer_dense(x, kernel, None, lq, layout)
        return call(ops.quantize_input(x, lq, layout), ops.quantize_kernel(kernel, lq, layout))

    return handler


def _quantize_nnx(model: nnx.Module, rules) -> nnx.Module:
    replacements = []
    used: set[int] = set()
    for path, module in nnx.iter_modules(model):
        if isinstance(module, (QuantizedLayer, LowRankLayer, MultiPrecisionLayer)):
            raise ValueError(f"layer {'/'.join(map(str, path))!r} is already quantized")
        info = nnx_layout(module) if path else None
        if info is None:
            continue
        name = "/".join(str(p) for p in path)
        i, target = _match(rules, name)
        if i is not None:
            used.add(i)
        if target is None:
            continue
        layout, _ = info
        if isinstance(target, DoubleRounding):
            wrapper = MultiPrecisionLayer(module, target.layer_quant(layout, name), layout,
                                          target)
        elif isinstance(target, LowRankQAT):
            wrapper = LowRankLayer(module, target.layer_quant(layout, name), layout, target,
                                   jax.random.fold_in(jax.random.key(0), zlib.crc32(
                                       name.encode())))
        else:
            wrapper = QuantizedLayer(module, resolve(target, layout, name), layout)
        replacements.append((path, wrapper))
    _warn_unused(rules, used)
    for path, wrapper in replacements:
        set_submodule(model, path, wrapper)
    return model


def set_submodule(model: nnx.Module, path: tuple, value) -> None:
    """Replaces the NNX submodule at ``path`` (attribute names and list indices)."""
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def sites(model) -> dict[str, Site]:
    """The quantized layers of a model: ``{path: Site}``.

    Args:
      model: an NNX model quantized by :func:`quantize_model` (or holding
        :class:`~qjax.nn.nnx.QuantizedLayer` modules), or a :class:`QuantizedLinenModel` after
        ``init`` / ``apply`` (see :meth:`QuantizedLinenModel.sites` for example inputs).
    """
    if isinstance(model, QuantizedLinenModel):
        return model.sites()
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a QuantizedLinenModel or an NNX module, got "
                        f"{type(model).__name__}")
    out = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, (QuantizedLayer, LowRankLayer, MultiPrecisionLayer)):
            name = "/".join(str(p) for p in path)
            stack_shape = module.stack_shape
            adapter = getattr(module, "recipe", None)
            out[name] = Site(name, type(module.inner).__name__, module.lq, module.layout,
                             tuple(range(len(stack_shape))), stack_shape, adapter=adapter)
    return out


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
