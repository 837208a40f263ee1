"""GPU kernels: Pallas lowered through Triton, a 2-D grid (M, N blocks) with a loop over K.

Why Triton and not Mosaic GPU: in jax 0.10 the Mosaic GPU Pallas lowering has no ``dot_general``
(``NotImplementedError: Unimplemented primitive in Pallas Mosaic GPU lowering: dot_general``);
matrix products there are written with ``plgpu.wgmma`` (Hopper) or ``tcgen05`` (Blackwell) on
swizzled shared-memory tiles with explicit barriers, a different kernel per architecture. JAX's
own Hopper kernels (``pallas.ops.gpu.hopper_mixed_type_matmul_mgpu``, int8 x bf16 without
scales) read the SM count from the local device while tracing, so they cannot even trace on a
CPU host. A Mosaic GPU kernel is left undone; the Triton path serves every case (Ampere+).
Two consequences, both tested: (1) ``jax.export`` refuses the Triton custom call by default
(Triton IR has no compatibility guarantee), so serializing needs
``disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]``;
(2) the final Triton compilation (power-of-two tensor shapes, shared memory) happens only on a
device, so block sizes follow Triton's rules (powers of two) by validation, not by proof.

The arithmetic per K step is :mod:`qjax._src.kernels.tiles`, as on TPU. Activation quantization for
the
integer and fp8 kinds runs as XLA ops before the kernel
(:func:`qjax._src.kernels.activation.activation_codes`, called by :mod:`qjax._src.kernels.api`: a
fused
elementwise/reduction prologue; a whole-row Pallas block would need a power-of-two K under
Triton).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from qjax._src.kernels import tiles
from qjax._src.kernels.blocks import BlockSizes
from qjax._src.kernels.cases import Case, Operands

__all__ = ["matmul", "unsupported_reason", "TRITON_CUSTOM_CALL"]

TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


def unsupported_reason(case: Case) -> str | None:
    """Why the Triton kernel cannot serve ``case`` (None if it can)."""
    g = case.group
    if g is not None and g & (g - 1):
        return f"group size {g} is not a power of two (Triton blocks are powers of two)"
    return None


def _kernel(*refs, case: Case, out_dtype, has_xs: bool, has_z: bool, bk: int, nk: int):
    it = iter(refs)
    x_ref = next(it)
    xs_ref = next(it) if has_xs else None
    c_ref, s_ref = next(it), next(it)
    z_ref = next(it) if has_z else None
    o_ref = next(it)
    per = x_ref.shape[0]
    bkp = bk // per
    gb = None if case.group is None else bk // case.group

    def rows(ref, k):
        return ref[...] if gb is None else ref[pl.ds(k * gb, gb), :]

    def body(k, acc):
        xs = [x_ref[p, :, pl.ds(k * bkp, bkp)] for p in range(per)]
        c = c_ref[pl.ds(k * bkp, bkp), :]
        z = None if z_ref is None else rows(z_ref, k)
        return acc + tiles.partial_product(xs, c, rows(s_ref, k), z, case)

    acc0 = jnp.zeros(o_ref.shape, tiles.accumulator_dtype(case))
    acc = jax.lax.fori_loop(0, nk, body, acc0)
    xscale = None if xs_ref is None else xs_ref[...]
    o_ref[...] = tiles.epilogue(acc, xscale, s_ref[...] if gb is None else None, case, out_dtype)


def matmul(ops: Operands, case: Case, bs: BlockSizes, out_dtype, *, interpret=False,
           num_warps: int = 4, num_stages: int = 3) -> jax.Array:
    """The padded product ``(Mp, Np)`` of prepared operands (see :mod:`qjax._src.kernels.cases`).

    ``num_warps`` and ``num_stages`` are Triton's launch parameters (hardware tuning knobs).
    """
    per, mp, kpp = ops.xp.shape
    np_ = ops.wc.shape[1]
    bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
    kp = kpp * per
    in_specs = [pl.BlockSpec((per, bm, kpp), lambda i, j: (0, i, 0))]
    args = [ops.xp]
    if ops.xs is not None:
        in_specs.append(pl.BlockSpec((bm, 1), lambda i, j: (i, 0)))
        args.append(ops.xs)
    gs = ops.ws.shape[0]
    in_specs += [pl.BlockSpec((kpp, bn), lambda i, j: (0, j)),
                 pl.BlockSpec((gs, bn), lambda i, j: (0, j))]
    args += [ops.wc, ops.ws]
    if ops.wz is not None:
        in_specs.append(pl.BlockSpec((gs, bn), lambda i, j: (0, j)))
        args.append(ops.wz)
    kernel = functools.partial(_kernel, case=case, out_dtype=out_dtype,
                               has_xs=ops.xs is not None, has_z=ops.wz is not None, bk=bk,
                               nk=kp // bk)
    return pl.pallas_call(
        kernel,
        grid=(mp // bm, np_ // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"qjax_quantized_matmul_{case.kind}_gpu",
    )(*args)
