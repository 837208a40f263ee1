"""Shardings carried in array types: what quantizers need to stay valid on explicit meshes.

On a mesh whose axes are ``AxisType.Explicit`` (the default of ``jax.make_mesh`` in current JAX)
every array's type carries its sharding, and ops whose output sharding JAX cannot infer (a reshape
that merges a sharded dimension, a matmul whose operands disagree) raise ``ShardingTypeError``
unless they are given ``out_sharding``. qjax's quantizers reshape into blocks and back, and its
custom backward rules compute matmuls of their own; these helpers give those ops the sharding the
array types call for, and are no-ops on automatic meshes, inside ``shard_map`` and off-mesh.

A mesh axis that shards the axis a quantizer reduces over (per-token scales over sharded
features, a Hadamard block over a sharded contraction axis) is handled by the type system too: the
reductions are global, and :func:`axis_shards` lets callers check that blocks do not straddle
shards.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["axis_names", "explicit_sharding", "explicit_spec", "reshape", "axis_shards",
           "dot_general", "dot_out_spec", "cotangent_like", "varying_axes"]


def axis_names(entry) -> tuple[str, ...]:
    """Mesh axis names of a spec entry or an ``axis_name`` argument: None, a name or names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def explicit_sharding(x: jax.Array) -> NamedSharding | None:
    """The sharding in ``x``'s type if it is on a mesh with explicit axes, else None."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh._any_axis_explicit:
        return None
    return sharding


def explicit_spec(x: jax.Array) -> tuple | None:
    """``x``'s explicit partition spec padded to ``x.ndim`` entries, or None (see above)."""
    sharding = explicit_sharding(x)
    if sharding is None:
        return None
    return tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))


def reshape(x: jax.Array, shape: tuple[int, ...], like: jax.Array | None = None) -> jax.Array:
    """``x.reshape(shape)``, giving the result the explicit sharding of ``like`` if it has one.

    Used to undo a block reshape: ``like`` is the array before blocking, with the same shape.
    """
    sharding = None if like is None else explicit_sharding(like)
    return jnp.reshape(x, shape, out_sharding=sharding)


def axis_shards(x: jax.Array, axis: int) -> int:
    """How many explicit-mesh shards split ``x`` along ``axis`` (1 when unknown or unsharded)."""
    spec = explicit_spec(x)
    if spec is None:
        return 1
    mesh = explicit_sharding(x).mesh
    return math.prod(mesh.shape[name] for name in axis_names(spec[axis % x.ndim]))


def dot_out_spec(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> P | None:
    """The output spec of a ``dot_general`` on explicit meshes: batch, then lhs free, then rhs free.

    Each output axis keeps its operand's mesh axes; a mesh axis already used by an earlier output
    axis is dropped (so a contraction sharded on both sides is all-reduced, and a mesh axis shared
    by the lhs batch and the rhs features goes to the lhs, as in data + tensor parallelism).
    None when neither operand is on an explicit mesh.
    """
    ls, rs = explicit_spec(lhs), explicit_spec(rhs)
    if ls is None and rs is None:
        return None
    ls = ls or (None,) * lhs.ndim
    rs = rs or (None,) * rhs.ndim
    (lc, rc), (lb, rb) = dimension_numbers
    lfree = [i for i in range(lhs.ndim) if i not in lc and i not in lb]
    rfree = [i for i in range(rhs.ndim) if i not in rc and i not in rb]
    entries = [axis_names(ls[i]) or axis_names(rs[j]) for i, j in zip(lb, rb, strict=True)]
    entries += [axis_names(ls[i]) for i in lfree] + [axis_names(rs[i]) for i in rfree]
    used: set[str] = set()
    out = []
    for names in entries:
        kept = tuple(n for n in names if n not in used)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*out)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                out_sharding=None, **kwargs) -> jax.Array:
    """``lax.dot_general`` that names its output sharding on explicit meshes.

    ``out_sharding`` wins when given; otherwise :func:`dot_out_spec`. A drop-in for the
    ``dot_general`` argument of Flax layers, so a row-parallel ``nn.Dense`` (contraction sharded
    on both operands) works on explicit meshes.
    """
    if out_sharding is None:
        out_sharding = dot_out_spec(lhs, rhs, dimension_numbers)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding, **kwargs)


def varying_axes(x: jax.Array) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (empty elsewhere)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # JAX <= 0.8 spelling
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return frozenset(vma or ())


def cotangent_like(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """Gives a custom backward rule's cotangent ``ct`` the type of its ``primal`` input.

    Inside ``shard_map`` (``check_vma=True``), a cotangent that varies over mesh axes its primal
    is invariant over (a replicated learned step fed by sharded activations) is summed over those
    axes, as JAX's own transpose of ``pvary`` does. On explicit meshes, the cotangent is resharded
    to the primal's sharding. Elsewhere it is returned unchanged.
    """
    extra = varying_axes(ct) - varying_axes(primal)
    if extra:
        ct = jax.lax.psum(ct, tuple(sorted(extra)))
    target = explicit_sharding(primal)
    if target is not None and explicit_sharding(ct) != target:
        ct = jax.sharding.reshard(ct, target.spec)
    return ct
