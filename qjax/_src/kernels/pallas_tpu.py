"""Mosaic TPU kernels: a 3-D grid (M, N, K blocks) with a VMEM accumulator.

One kernel body serves every case (:mod:`qjax._src.kernels.tiles` holds the arithmetic): at each K
step it reads the activation phases ``(per, bm, bk/per)``, the K-major weight bytes
``(bk/per, bn)`` and the scale (and zero point) rows ``(bk/g, bn)``, adds the partial product into
an int32 (integer kind) or float32 accumulator, and at the last K step applies the epilogue. M and
N are ``"parallel"`` grid axes (split across TensorCores on multi-core chips), K is
``"arbitrary"`` (sequential, the accumulator is carried). The same ``pallas_call`` runs in the
Pallas interpreter on any platform (``interpret=True`` or ``pltpu.InterpretParams``).

Hardware facts are parameters: ``vmem_limit_bytes`` (the scoped VMEM the compiler may use) is
passed to Mosaic and the blocks' double-buffered footprint is checked against it at trace time.
On the newest TPUs the matrix unit has no int8 path (only bf16/fp8): use the fp8 case there.

References:
  JAX documentation, "Pallas TPU matmul" (grid over M, N, K with a VMEM accumulator).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qjax._src.kernels import tiles
from qjax._src.kernels.blocks import BlockSizes
from qjax._src.kernels.cases import Case, Operands, dtype_bytes

__all__ = ["matmul", "vmem_footprint", "DEFAULT_VMEM_LIMIT_BYTES"]

DEFAULT_VMEM_LIMIT_BYTES = 16 * 2**20  # the default scoped VMEM of v5e/v6e (v4: 16 MiB too)


def _kernel(*refs, case: Case, out_dtype, has_xs: bool, has_z: bool):
    it = iter(refs)
    x_ref = next(it)
    xs_ref = next(it) if has_xs else None
    c_ref, s_ref = next(it), next(it)
    z_ref = next(it) if has_z else None
    o_ref, acc_ref = next(it), next(it)
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    xs = [x_ref[p] for p in range(x_ref.shape[0])]
    z = None if z_ref is None else z_ref[...]
    acc_ref[...] += tiles.partial_product(xs, c_ref[...], s_ref[...], z, case)

    @pl.when(k == pl.num_programs(2) - 1)
    def _done():
        xscale = None if xs_ref is None else xs_ref[...]
        o_ref[...] = tiles.epilogue(acc_ref[...], xscale, s_ref[...], case, out_dtype)


def vmem_footprint(ops: Operands, case: Case, bs: BlockSizes, out_dtype) -> int:
    """Bytes of VMEM the blocks need: inputs and output double-buffered, plus the accumulator and
    one dequantized float32 weight tile (the largest temporary)."""
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    gb = 1 if case.group is None else bk // case.group
    ins = bm * bk * dtype_bytes(ops.xp.dtype) + (bk // case.per) * bn * dtype_bytes(ops.wc.dtype)
    ins += gb * bn * 4 * (2 if ops.wz is not None else 1) + (bm * 4 if ops.xs is not None else 0)
    return 2 * (ins + bm * bn * dtype_bytes(out_dtype)) + bm * bn * 4 + (bk // case.per) * bn * 4


def matmul(ops: Operands, case: Case, bs: BlockSizes, out_dtype, *, interpret=False,
           vmem_limit_bytes: int = DEFAULT_VMEM_LIMIT_BYTES) -> jax.Array:
    """The padded product ``(Mp, Np)`` of prepared operands (see :mod:`qjax._src.kernels.cases`)."""
    need = vmem_footprint(ops, case, bs, out_dtype)
    if need > vmem_limit_bytes:
        raise ValueError(f"block_sizes={bs} need about {need} bytes of VMEM, more than "
                         f"vmem_limit_bytes={vmem_limit_bytes}; use smaller blocks")
    per, mp, _ = ops.xp.shape
    kp = ops.wc.shape[0] * per
    np_ = ops.wc.shape[1]
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    gb = 1 if case.group is None else bk // case.group
    grouped = case.group is not None
    scale_spec = pl.BlockSpec((gb, bn), (lambda i, j, k: (k, j)) if grouped else
                              (lambda i, j, k: (0, j)))
    in_specs = [pl.BlockSpec((per, bm, bk // per), lambda i, j, k: (0, i, k))]
    args = [ops.xp]
    if ops.xs is not None:
        in_specs.append(pl.BlockSpec((bm, 1), lambda i, j, k: (i, 0)))
        args.append(ops.xs)
    in_specs += [pl.BlockSpec((bk // per, bn), lambda i, j, k: (k, j)), scale_spec]
    args += [ops.wc, ops.ws]
    if ops.wz is not None:
        in_specs.append(scale_spec)
        args.append(ops.wz)
    kernel = functools.partial(_kernel, case=case, out_dtype=out_dtype,
                               has_xs=ops.xs is not None, has_z=ops.wz is not None)
    return pl.pallas_call(
        kernel,
        grid=(mp // bm, np_ // bn, kp // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), tiles.accumulator_dtype(case))],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"),
            vmem_limit_bytes=vmem_limit_bytes),
        interpret=interpret,
        name=f"qjax_quantized_matmul_{case.kind}",
    )(*args)


def compiler_params(vmem_limit_bytes: int = DEFAULT_VMEM_LIMIT_BYTES):
    """Mosaic parameters of the small row kernels (activation quantization)."""
    return pltpu.CompilerParams(dimension_semantics=("parallel",),
                                vmem_limit_bytes=vmem_limit_bytes)
