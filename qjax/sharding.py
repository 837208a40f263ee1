"""Sharded QAT on JAX's SPMD runtime: meshes and partition rules for params, quantizer state and
optimizer state.

qjax adds no communication of its own. A QAT step is an ordinary ``jax.jit`` program over a
``Mesh`` with up to three axes:

* ``data``: batch parallelism (params replicated);
* ``fsdp``: the batch *and* the params are split (ZeRO-3 / FSDP); XLA all-gathers each weight
  where it is used and reduce-scatters its gradient;
* ``tensor``: Megatron-style tensor parallelism; column-parallel linears split their output
  features (``kernel (K, N)`` as ``P("fsdp", "tensor")``), row-parallel ones their input features
  (``P("tensor", "fsdp")``), so the activations between them stay split over ``tensor``.

Partition rules are ``(regex, PartitionSpec)`` pairs matched (``re.fullmatch``, first match wins)
against ``/``-joined param paths, as in t5x and MaxText. Axes of :data:`MESH_AXES` a spec names
but the mesh lacks (or has with size 1) are dropped, so one rule set serves every mesh; any other
name (a typo) or an axis named twice is a ValueError. Leaves no rule matches are
split over ``fsdp`` along their largest divisible axis (matrices only) or replicated.

Quantizer state is sharded like the axis it scales: a learned step ``kernel_scale`` of shape
``(1, N)`` next to a kernel ``P("fsdp", "tensor")`` gets ``P(None, "tensor")``; per-group steps
follow their groups. Optimizer state is sharded like its params (:func:`opt_state_specs`).

Quantization under sharding needs no special code in ``jit`` (automatic or explicit mesh axes):
a per-token RMS or absmax over a sharded contraction axis is a global reduction in the SPMD
program. Hadamard blocks must not straddle shards (:func:`check_hadamard_blocks`; on explicit
meshes :func:`qjax.hadamard_transform` checks the types itself). Inside ``shard_map``, pass
``axis_name=`` to :func:`qjax.fake_quant` for global statistics and fold the shard index into
stochastic-rounding keys with :func:`shard_key`.
"""

from qjax._src.sharding import (
    BATCH_AXES,
    MESH_AXES,
    batch_spec,
    check_hadamard_blocks,
    make_mesh,
    named_shardings,
    opt_state_specs,
    param_specs,
    path_str,
    put,
    shard_key,
)

__all__ = [
    "check_hadamard_blocks",
    "path_str",
    "BATCH_AXES",
    "batch_spec",
    "make_mesh",
    "MESH_AXES",
    "named_shardings",
    "opt_state_specs",
    "param_specs",
    "put",
    "shard_key",
]
