"""Implementation of :mod:`qjax.sharding` (documented there)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qjax._src import typed_sharding
from qjax._src._checks import check_pos_int
from qjax._src.hadamard import check_block_size

__all__ = [
    "MESH_AXES", "BATCH_AXES", "QUANTIZER_STATE", "make_mesh", "param_specs",
    "opt_state_specs", "named_shardings", "batch_spec", "check_batch", "check_hadamard_blocks",
    "shard_key", "put", "path_str",
]

#: Mesh axis names qjax understands, in mesh order.
MESH_AXES = ("data", "fsdp", "tensor")
#: Axes the batch is split over.
BATCH_AXES = ("data", "fsdp")
#: Names of quantizer-state leaves stored beside a layer's ``kernel``.
QUANTIZER_STATE = ("kernel_scale", "input_scale")
_AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}

def make_mesh(shape: Mapping[str, int], *, axis_types: str = "explicit",
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from ``{"data": 2, "fsdp": 2, "tensor": 2}`` (any subset of :data:`MESH_AXES`).

    Args:
      shape: axis name -> size; the sizes multiply to the number of devices.
      axis_types: ``"explicit"`` (shardings in the array types, the default of
        ``jax.make_mesh``) or ``"auto"`` (the compiler propagates shardings).
      devices: defaults to ``jax.devices()`` (all processes' devices when multi-host).

    Raises:
      ValueError: an unknown axis name or type, a non-positive size, or sizes whose product is
        not the device count.
    """
    if not isinstance(shape, Mapping) or not shape:
        raise TypeError(f"mesh shape must be a non-empty mapping of axis sizes, got {shape!r}")
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown}; allowed axes are {MESH_AXES}")
    for name, size in shape.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"mesh axis {name!r} must have a positive int size, got {size!r}")
    if axis_types not in _AXIS_TYPES:
        raise ValueError(f"axis_types must be one of {tuple(_AXIS_TYPES)}, got {axis_types!r}")
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(a for a in MESH_AXES if a in shape)
    sizes = tuple(int(shape[a]) for a in names)
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes, strict=True))} needs {math.prod(sizes)} "
                         f"devices, but {len(devices)} are available")
    return jax.make_mesh(sizes, names, axis_types=(_AXIS_TYPES[axis_types],) * len(names),
                         devices=devices)


def path_str(path) -> str:
    """``/``-joined names of a pytree key path (dict keys, attributes, indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, where: str) -> P:
    """``spec`` without axes the mesh lacks, checked against ``shape``."""
    if len(spec) > len(shape):
        raise ValueError(f"{where}: spec {spec} has more entries than the rank of {shape}")
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        kept = tuple(a for a in typed_sharding.axis_names(entry) if mesh.shape.get(a, 1) > 1)
        n = math.prod(mesh.shape[a] for a in kept)
        if dim % n:
            raise ValueError(f"{where}: dimension {dim} of shape {shape} is not divisible by "
                             f"mesh axes {kept} of total size {n}")
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _fsdp_default(shape: tuple[int, ...], mesh: Mesh) -> P:
    n = mesh.shape.get("fsdp", 1)
    if n == 1 or len(shape) < 2:
        return P()
    dims = [i for i in sorted(range(len(shape)), key=lambda i: -shape[i]) if shape[i] % n == 0]
    if not dims:
        return P()
    return P(*("fsdp" if i == dims[0] else None for i in range(len(shape))))


def _like(shape, kernel_shape, ks) -> list | None:
    """Entries of ``ks`` for a same-rank broadcast shape (None where broadcast), or None."""
    if any(d not in (1, kd) for d, kd in zip(shape, kernel_shape, strict=True)):
        return None
    return [e if d == kd and d > 1 else None for d, kd, e in zip(shape, kernel_shape, ks,
                                                                   strict=True)]


def _scale_spec(shape: tuple[int, ...], kernel_shape: tuple[int, ...], kernel_spec: P) -> P:
    """The spec of a scale broadcast against a kernel (or its blocked view) of ``kernel_spec``."""
    ks = tuple(kernel_spec) + (None,) * (len(kernel_shape) - len(kernel_spec))
    if len(shape) == len(kernel_shape):
        return P(*(_like(shape, kernel_shape, ks) or ()))
    if len(shape) == len(kernel_shape) + 1:
        # Blocked view (..., groups, 1, ...) of a per-group scale: groups split like their axis.
        for a in range(len(kernel_shape)):
            groups = shape[a]
            rest = _like(shape[:a] + shape[a + 2:], kernel_shape[:a] + kernel_shape[a + 1:],
                         ks[:a] + ks[a + 1:])
            if rest is not None and shape[a + 1] == 1 and groups > 1 and \
                    kernel_shape[a] % groups == 0:
                return P(*rest[:a], ks[a], None, *rest[a:])
    return P()


def _check_rule_axes(pattern: str, spec: P, mesh: Mesh) -> None:
    """Every axis a rule's spec names is a known one (:data:`MESH_AXES` or the mesh's own; known
    axes the mesh lacks are dropped later), and none is named twice."""
    allowed = tuple(MESH_AXES) + tuple(a for a in mesh.axis_names if a not in MESH_AXES)
    seen = set()
    for entry in spec:
        if entry is P.UNCONSTRAINED:
            continue
        for a in typed_sharding.axis_names(entry):
            if not isinstance(a, str) or a not in allowed:
                raise ValueError(f"rule {pattern!r}: {spec} names unknown mesh axis {a!r}; "
                                 f"allowed axes are {allowed}")
            if a in seen:
                raise ValueError(f"rule {pattern!r}: {spec} names mesh axis {a!r} more than once "
                                 "(an axis can split only one dimension)")
            seen.add(a)


def param_specs(params: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = ()) -> Any:
    """A ``PartitionSpec`` per leaf of ``params`` (same tree structure).

    Args:
      params: a params tree (arrays or ``jax.ShapeDtypeStruct``).
      mesh: the mesh (its axis names and sizes).
      rules: ``(regex, PartitionSpec)`` pairs, first full match on the leaf's path wins;
        unmatched leaves use the ``fsdp`` default (e.g.
        :data:`qjax.models.llama.PARTITION_RULES` for the reference Llama; a model's rules live
        beside the model). Quantizer-state leaves
        (:data:`QUANTIZER_STATE`) follow the ``kernel`` beside them.

    Raises:
      ValueError: a bad rule (not ``(regex, PartitionSpec)``, a spec naming a mesh axis that is
        neither in :data:`MESH_AXES` nor the mesh's, or one axis twice), or a dimension the mesh
        axes of its spec do not divide.
    """
    compiled = []
    for item in rules:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], P)):
            raise ValueError(f"a rule must be (regex, PartitionSpec), got {item!r}")
        _check_rule_axes(item[0], item[1], mesh)
        compiled.append((re.compile(item[0]), item[1]))
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    specs: dict[str, P] = {}
    for path, (_, leaf) in zip(paths, flat, strict=True):
        if path.rsplit("/", 1)[-1] in QUANTIZER_STATE:
            continue
        spec = next((s for r, s in compiled if r.fullmatch(path)), None)
        shape = tuple(np.shape(leaf))
        specs[path] = (_fsdp_default(shape, mesh) if spec is None
                       else _fit(spec, shape, mesh, f"param {path!r}"))
    shapes = {p: tuple(np.shape(leaf)) for p, (_, leaf) in zip(paths, flat, strict=True)}
    for path in paths:
        if path in specs:
            continue
        kernel = path.rsplit("/", 1)[0] + "/kernel"
        if kernel in specs:
            spec = _scale_spec(shapes[path], shapes[kernel], specs[kernel])
            if path.endswith("input_scale"):  # activation features are the kernel's rows
                spec = _scale_spec(shapes[path], shapes[kernel][:1], P(*tuple(specs[kernel])[:1]))
            specs[path] = _fit(spec, shapes[path], mesh, f"quantizer state {path!r}")
        else:
            specs[path] = P()
    return jax.tree_util.tree_unflatten(treedef, [specs[p] for p in paths])


def opt_state_specs(tx: optax.GradientTransformation, params: Any, specs: Any) -> Any:
    """Specs for ``tx.init(params)``: state shaped like a param (Adam's moments, also under
    ``optax.masked``) gets that param's spec, everything else (counts, scalars) is replicated.

    A state leaf belongs to the param whose path ends its own path and whose shape it has.
    """
    state = jax.eval_shape(tx.init, params)
    by_path = {}
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                  jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)),
                                  strict=True):
        by_path[path_str(path)] = (tuple(np.shape(leaf)), spec)

    def spec_of(path, leaf):
        name, shape = path_str(path), tuple(np.shape(leaf))
        for param, (pshape, spec) in sorted(by_path.items(), key=lambda kv: -len(kv[0])):
            if (name == param or name.endswith("/" + param)) and shape == pshape:
                return spec
        return P()

    return jax.tree_util.tree_map_with_path(spec_of, state)


def named_shardings(specs: Any, mesh: Mesh) -> Any:
    """``NamedSharding(mesh, spec)`` for every spec of a tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def batch_spec(mesh: Mesh, ndim: int = 2) -> P:
    """The spec of a ``(batch, ...)`` array: batch over the mesh's data-parallel axes.

    ``ndim`` (a positive int) is the array's rank, batch axis included.
    """
    check_pos_int("ndim", ndim)
    axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    first = None if not axes else axes[0] if len(axes) == 1 else axes
    return P(first, *([None] * (ndim - 1)))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """Raises TypeError/ValueError unless ``batch_size`` is a positive int that the
    data-parallel axes divide."""
    check_pos_int("batch_size", batch_size)
    n = math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)
    if batch_size % n:
        raise ValueError(f"batch_size {batch_size} is not divisible by the data-parallel mesh "
                         f"axes {BATCH_AXES} of total size {n}")


def check_hadamard_blocks(params: Any, specs: Any, mesh: Mesh, block_size: int,
                          pattern: str, axis: int = 0) -> None:
    """Raises ValueError if a rotated kernel's Hadamard blocks would straddle shards.

    ``pattern`` matches the paths of the rotated kernels (e.g. ``".*/kernel"`` for every layer a
    rule set quantizes with QuEST); their rotated (contraction) ``axis`` is split by its spec, and
    so are the activations of a row-parallel layer, so the per-device size must be a multiple of
    ``block_size`` (a positive power of two, as every Hadamard block is).
    """
    check_block_size(block_size)
    regex = re.compile(pattern)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), spec in zip(leaves, spec_leaves, strict=True):
        name = path_str(path)
        if not regex.fullmatch(name):
            continue
        shape = np.shape(leaf)
        entries = tuple(spec) + (None,) * (len(shape) - len(spec))
        n = math.prod(mesh.shape[a] for a in typed_sharding.axis_names(entries[axis]))
        local = shape[axis] // n
        if local % block_size:
            raise ValueError(
                f"Hadamard block {block_size} straddles shards of {name!r}: axis {axis} of size "
                f"{shape[axis]} is split over {n} devices into {local}; use a block that divides "
                f"{local} or a mesh that splits this axis less")


def shard_key(key: jax.Array, axis_names: str | Sequence[str]) -> jax.Array:
    """Inside ``shard_map``: ``key`` folded with this shard's index along ``axis_names``.

    Gives every shard its own stochastic-rounding noise (fold the step in first with
    ``jax.random.fold_in(key, step)`` so that it also differs per step). Under ``jax.jit`` no
    folding is needed: random bits are generated for the global array.
    """
    for name in typed_sharding.axis_names(axis_names):
        key = jax.random.fold_in(key, jax.lax.axis_index(name))
    return key


def put(tree: Any, shardings: Any, source: Callable[[Any], Any] | None = None) -> Any:
    """Places host values on ``shardings``; works across processes (every process passes the
    same global values, each materialises only its addressable shards)."""
    def one(x, sharding):
        x = np.asarray(x) if source is None else source(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)
