"""Trained QAT params -> serving params: every quantized kernel becomes a packed QArray.

``convert(params, model)`` walks the quantized layers (:class:`~qjax.nn.Site`) of a model built
with :func:`qjax.nn.quantize_model` (Dense, DenseGeneral, Einsum, Conv, raw einsum parameters,
stacked or not; or, for rules, unstacked Dense kernels) and replaces each kernel by a
:class:`~qjax.QArray` of its matrix view ``(K, N)`` (:mod:`qjax._src.nn.layout`) in the serving
layout ``(N, K)``, stacks and batch axes in front:

1. codes and scales come from :func:`qjax.quantize` on the matrix **in its training layout**,
   with the learned ``kernel_scale`` if the spec learns one, so they are the very codes the QAT
   forward decodes (QuEST weights are quantized after their Hadamard rotation, so they are stored
   pre-rotated);
2. the float32 codes and the scales are transposed (exact: integers and copies);
3. the codes are stored with :func:`qjax._src.qarray.codes_to_storage` along the new last axis ``K``
   (int8; int4 two per byte; int2 four; 1-bit eight), the layout of GGUF and of
   ``qjax.kernels.quantized_matmul`` (``x @ dequantize(w).T``).

The serving spec is the training spec with its axes moved to the transposed layout (``PerRow(0)``
becomes ``PerRow(-1)``, a Hadamard along axis 0 one along axis -1), so
``dequantize(w).T == fake_quant(matrix)`` bit for bit. ``kernel_scale`` is folded into the QArray;
``input_scale`` (a learned activation scale) and every float leaf stay as they are. Low-rank QAT
layers are merged (:func:`adapter_to_qarray`), Double Rounding layers give their highest (or a
chosen) precision (:func:`multi_precision_qarray`).

References:
  docs/design.md sections 3 and 9 (numerics contract); Panferov et al., 2025, QuEST
  (pre-rotated weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from qjax._src import granularity as G
from qjax._src import spec as SP
from qjax._src.nn import double_rounding, lowrank
from qjax._src.nn.layout import dense_layout
from qjax._src.nn.ops import per_matrix, quantize_kernel
from qjax._src.nn.recipe import LayerQuant, learned, resolve
from qjax._src.nn.rewrite import QuantizedLinenModel, parse_rules
from qjax._src.nn.site import Site, subtree
from qjax._src.qarray import QArray, codes_to_storage, relayout
from qjax._src.quantize import dequantize, quantize

__all__ = ["convert", "serving_layers", "serving_spec", "kernel_to_qarray", "layer_to_qarray",
           "dequantize_kernel", "convert_layer", "check_layer_params", "transpose_qarray",
           "adapter_to_qarray", "multi_precision_qarray", "relayout_params"]


def _other_axis(axis: int, name: str) -> int:
    """Axis of a 2-D ``(K, N)`` array after the transpose to ``(N, K)``, as -1 or -2.

    Raises ValueError for an axis a rank-2 kernel does not have (``axis % 2`` would wrap it).
    """
    return -1 if G.normalize_axis(axis, 2, name) == 0 else -2


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
    moved = {} if spec.hadamard_block is None else {
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
    serving_spec(spec)  # first: it checks that spec is a QuantSpec for a 2-D kernel
    if spec.rounding == "stochastic":
        raise ValueError("stochastic rounding has no deterministic serving codes; use "
                         "rounding='nearest' for the weights")
    return transpose_qarray(quantize(kernel, spec, scale=kernel_scale))


def transpose_qarray(qa: QArray) -> QArray:
    """A training-layout QArray ``(K, N)`` in the serving layout ``(N, K)`` (exact: integer codes
    and copies of the scales; the spec's axes move with them, :func:`serving_spec`)."""
    spec = qa.spec
    new_spec = serving_spec(spec)
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


def layer_to_qarray(kernel: jax.Array, spec: SP.QuantSpec, layout,
                    kernel_scale: jax.Array | None = None) -> QArray:
    """A layer's kernel ``(*stack, *layout.shape)`` as a serving QArray ``(*stack, *batch, N, K)``.

    Each ``(K, N)`` matrix of :meth:`~qjax.nn.KernelLayout.to_matrix` becomes a
    :func:`kernel_to_qarray`; stacked layers and batch axes stay in front (the QArray's leaves
    carry them, so ``nn.scan`` / ``nnx.scan`` hand each layer its own ``(N, K)`` QArray).
    """
    m = layout.to_matrix(kernel)
    return per_matrix(lambda t: kernel_to_qarray(t["m"], spec, t["s"]),
                      {"m": m, "s": kernel_scale}, m.shape[:-2])


def adapter_to_qarray(site: Site, frozen: Mapping, adapters: Mapping) -> QArray:
    """A low-rank QAT layer merged for serving: QArray ``(*stack, N, K)``.

    LR-QAT: the codes ``W_int`` and the stored scale ``s``; QALoRA: the merged weight
    ``W0' + delta`` quantized with the learned step. Both dequantize to the trained forward's
    kernel bit for bit.
    """
    recipe = site.adapter
    dtype = jnp.dtype(adapters["lora_down"].dtype)  # the layer's param dtype (init_state)
    tree = {"frozen": dict(frozen), "adapters": dict(adapters)}

    def one(t):
        if recipe.kind == "lr_qat":
            return transpose_qarray(lowrank.merged_codes(t["frozen"], t["adapters"], recipe,
                                                         dtype))
        w = lowrank.float_kernel(t["frozen"], t["adapters"], recipe, jnp.float32)
        qa = kernel_to_qarray(w, recipe.training_spec, t["adapters"]["kernel_scale"])
        return dataclasses.replace(qa, dtype=dtype.name)

    return per_matrix(one, tree, site.stack_shape)


def dequantize_kernel(w: QArray, layout) -> jax.Array:
    """Inverse view of :func:`layer_to_qarray`: the dequantized kernel in the layer's layout,
    equal bit for bit to QAT's :func:`qjax.nn.ops.quantize_kernel` (float32 and bfloat16)."""
    kernel = layout.from_matrix(jnp.swapaxes(dequantize(w), -1, -2))
    # Materialized: XLA would otherwise fold the transpose into the layer's dot, whose other
    # operand layout sums in another order than QAT's dot with the (K, N) kernel.
    return jax.lax.optimization_barrier(kernel)


def multi_precision_qarray(site: Site, kernel: jax.Array, kernel_scale: jax.Array,
                           bits: int | None = None) -> QArray:
    """A Double Rounding layer for serving: its highest-precision codes ``q_h`` and ``s_h`` as a
    QArray ``(*stack, N, K)``, or at ``bits`` (:func:`qjax.nn.double_rounding.lower_precision`);
    it dequantizes to QAT's weights at that precision bit for bit."""
    recipe = site.adapter
    spec = recipe.spec()

    def one(t):
        q = double_rounding.codes(t["w"], t["s"], recipe, recipe.highest)
        qa = QArray(codes=codes_to_storage(q.reshape(t["w"].shape), spec.format),
                    scale=t["s"], zero_point=None, spec=spec, shape=tuple(t["w"].shape),
                    dtype=jnp.dtype(t["w"].dtype).name)
        return transpose_qarray(qa)

    m = site.layout.to_matrix(kernel)
    w = per_matrix(one, {"w": m, "s": kernel_scale}, m.shape[:-2])
    return w if bits is None else double_rounding.lower_precision(w, recipe, bits)


def _walk_kernels(params, prefix=()):
    if isinstance(params, Mapping):
        if "kernel" in params and not isinstance(params["kernel"], Mapping):
            yield prefix
        for k, v in params.items():
            if isinstance(v, Mapping):
                yield from _walk_kernels(v, prefix + (str(k),))


def serving_layers(model_or_rules: QuantizedLinenModel | Rules,
                   params: Mapping | None = None) -> dict[str, Site]:
    """The quantized layers to convert: ``{path: Site}``.

    Args:
      model_or_rules: a :class:`~qjax.nn.QuantizedLinenModel` after ``init`` or ``apply`` (its
        :meth:`~qjax.nn.QuantizedLinenModel.sites`: every layer kind, stacked or not), or rules
        as :func:`qjax.nn.quantize_model` takes them, matched against the paths of ``params``
        that hold a ``kernel`` (taken as unstacked Dense kernels ``(K, N)``).
      params: needed with rules.

    Raises:
      ValueError: a model whose layers are not discovered yet; rules without params, or that
        match no kernel of ``params``.
    """
    if isinstance(model_or_rules, QuantizedLinenModel):
        return model_or_rules.sites()
    if params is None:
        raise ValueError("converting by rules needs params")
    rules = parse_rules(model_or_rules)
    out = {}
    for path in _walk_kernels(params):
        name = "/".join(path)
        for pattern, target in rules:
            if pattern.fullmatch(name):
                if target is not None:
                    kernel = params
                    for key in path + ("kernel",):
                        kernel = kernel[key]
                    if jnp.ndim(kernel) != 2:
                        raise ValueError(f"layer {name!r}: converting by rules takes Dense "
                                         f"kernels (K, N), got shape {jnp.shape(kernel)}; pass "
                                         "the quantized model for other layers")
                    layout = dense_layout(jnp.shape(kernel))
                    out[name] = Site(name, "Dense", resolve(target, layout, name), layout)
                break
    if not out:
        raise ValueError("the rules match no kernel of the params: nothing would be converted")
    return out


def _copy_tree(t):
    return {k: _copy_tree(v) for k, v in t.items()} if isinstance(t, Mapping) else t


def check_layer_params(site: Site, kernel, kernel_scale, input_scale) -> None:
    """Raises ValueError naming the layer if its QAT params do not fit its recipe: a learned
    scale the recipe does not have (params trained with another method) or lacks, a kernel of
    another shape, or a stack that is not on the leading axes."""
    name, lq = site.path, site.recipe
    if isinstance(kernel, QArray):
        raise ValueError(f"layer {name!r} is already converted")
    if tuple(jnp.shape(kernel)) != site.kernel_shape:
        raise ValueError(f"layer {name!r}: kernel of shape {jnp.shape(kernel)}, the model's is "
                         f"{site.kernel_shape}: the params do not match the model")
    if site.stacked != tuple(range(len(site.stacked))):
        raise ValueError(f"layer {name!r}: its layers are stacked along kernel axes "
                         f"{site.stacked}; convert needs them leading (nn.scan with "
                         "variable_axes={'params': 0})")
    for what, value, spec in (("kernel_scale", kernel_scale, lq.weight),
                              ("input_scale", input_scale, lq.activation)):
        if value is not None and not learned(spec):
            raise ValueError(f"layer {name!r} has a {what}, but its recipe learns none: the "
                             "params were trained with another method than the model's rules")
        if value is None and learned(spec):
            raise ValueError(f"layer {name!r}: the recipe learns a {what}, but the params have "
                             "none")


def convert_layer(site: Site, kernel, kernel_scale=None):
    """One layer's serving kernel: a QArray, or (no weight spec) the float kernel as QAT sees it
    (rotated when the input is)."""
    lq: LayerQuant = site.recipe
    if lq.weight is None:
        return quantize_kernel(kernel, lq, site.layout)
    try:
        return layer_to_qarray(kernel, lq.weight, site.layout, kernel_scale)
    except ValueError as e:
        raise ValueError(f"layer {site.path!r}: {e}") from None


def convert(params, model_or_rules=None, *, frozen: Mapping | None = None,
            bits: int | None = None, packed: bool = True, k_major: bool = False):
    """Serving params of a QAT model: quantized kernels as packed QArrays, the rest unchanged.

    Args:
      params: a Linen model's ``params`` collection (as returned by ``init`` / training), with
        learned ``kernel_scale`` / ``input_scale`` beside the kernels where the recipes learn
        them; or a quantized NNX model (then ``model_or_rules`` is omitted).
      model_or_rules: the :class:`~qjax.nn.QuantizedLinenModel` (after ``init``) or its rules
        (Dense kernels only).
      frozen: the model's ``qjax_frozen`` collection (``variables["qjax_frozen"]``), needed when
        it has low-rank QAT layers (:mod:`qjax.nn.lowrank`): their adapters are merged.
      bits: the precision of multi-precision layers (:mod:`qjax.nn.double_rounding`); default
        their highest (the integer checkpoint every lower precision derives from).
      packed: False stores sub-byte integer codes one per byte: the layout the int8 products
        read without unpacking nibbles on every call, at twice int4's packed bytes (a quarter of
        float32's). Same values either way (:func:`qjax._src.qarray.relayout`).
      k_major: True stores the codes ``(K/per, N)``, the Pallas kernels' operand layout (no
        per-call transpose); the ``"xla"`` path then transposes them back per call.

    Returns:
      Linen: a new nested dict; at each quantized layer ``kernel`` is a QArray
      ``(*stack, *batch, N, K)`` (see :func:`layer_to_qarray`), ``kernel_scale`` is gone,
      ``input_scale`` stays. NNX: a new serving model (:func:`qjax._src.convert.nnx_serving_model`);
      the QAT model is left unchanged.

    Raises:
      TypeError: params that are not a mapping (nor an NNX model).
      ValueError: params that do not match the model (see :func:`check_layer_params`), rules that
        convert nothing.
    """
    from flax import nnx

    if isinstance(params, nnx.Module):
        if model_or_rules is not None:
            raise TypeError("an NNX model carries its own rules: call convert(model)")
        from qjax._src.convert.nnx_serving import serving_model

        return serving_model(params, bits=bits, packed=packed, k_major=k_major)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping (the 'params' collection) or an NNX model, "
                        f"got {type(params).__name__}")
    if "params" in params and len(params) <= 2 and isinstance(params["params"], Mapping):
        raise ValueError("pass the 'params' collection (variables['params']), not the variables")
    if model_or_rules is None:
        raise TypeError("convert(params, model_or_rules) needs the quantized model or its rules")
    layers = serving_layers(model_or_rules, params)
    out = _copy_tree(params)
    for site in layers.values():
        node = subtree(out, site.keys)
        if isinstance(site.adapter, double_rounding.DoubleRounding):
            if bits is not None:
                site.adapter.check(bits)
            node["kernel"] = multi_precision_qarray(site, node["kernel"],
                                                    node.pop("kernel_scale"), bits)
            continue
        if site.adapter is not None:
            _merge_adapter(site, node, frozen)
            continue
        kernel_scale = None if site.raw else node.pop("kernel_scale", None)
        input_scale = None if site.raw else node.get("input_scale")
        check_layer_params(site, node[site.param], kernel_scale, input_scale)
        node[site.param] = convert_layer(site, node[site.param], kernel_scale)
    return relayout_params(out, packed=packed, k_major=k_major)


def relayout_params(serving_params: Mapping, *, packed: bool | None = None,
                    k_major: bool | None = None) -> dict:
    """``serving_params`` with every QArray in another code layout (:func:`qjax.relayout`;
    see :func:`convert`'s ``packed`` and ``k_major``); None keeps a QArray's own."""
    if not isinstance(serving_params, Mapping):
        raise TypeError(f"serving_params must be a mapping, got {type(serving_params).__name__}")
    return jax.tree_util.tree_map(
        lambda a: relayout(a, packed=packed, k_major=k_major) if isinstance(a, QArray) else a,
        dict(serving_params), is_leaf=lambda a: isinstance(a, QArray))


def _merge_adapter(site: Site, node: dict, frozen: Mapping | None) -> None:
    if frozen is None:
        raise ValueError(f"layer {site.path!r} has a low-rank QAT recipe: pass "
                         "frozen=variables['qjax_frozen'] to merge its adapters")
    missing = [k for k in ("lora_down", "lora_up", "kernel_scale") if k not in node]
    if missing:
        raise ValueError(f"layer {site.path!r}: the params have no {missing}: they were not "
                         f"trained with the model's {site.adapter.kind} recipe")
    frozen_node = subtree(frozen, site.keys)
    adapters = {k: node.pop(k) for k in ("lora_down", "lora_up", "kernel_scale")}
    node["kernel"] = adapter_to_qarray(site, frozen_node, adapters)
