"""Block sizes: the dataclass, per-backend defaults and the rules they are validated against.

TPU (Mosaic) rules, from the (8, 128) tiling of VMEM: the last two dims of every block are
multiples of (sublane, 128) or equal the full array dims; the sublane multiple is 8 for 32-bit,
16 for 16-bit and 32 for 8-bit dtypes. With the operand layout of :mod:`qjax._src.kernels.cases`
that
means ``block_n % 128 == 0``; ``block_k % (128 * per) == 0`` (the activation phases have
``block_k / per`` lanes); ``block_m`` a multiple of the activation/output sublane tile; and for
per-group scales ``block_k % g == 0`` with ``block_k / g`` a multiple of 8 unless one K block
covers all of K. The default ``block_k`` is a multiple of ``lcm(8 g, 128 per)``, legal for any
group size.

GPU (Triton-lowered Pallas) rules: block dims are powers of two, at least 16 for ``tl.dot``.

References:
  JAX documentation, "Pallas TPU: pipelining / block shapes" (the (8, 128) rule) and the
  Pallas TPU lowering's own check (``divisible by 8 and 128``), which tests exercise.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from qjax._src._checks import check_pos_int
from qjax._src.kernels.cases import Case, round_up

__all__ = ["BlockSizes", "default_hadamard_blocks", "validate_block_sizes"]

BACKENDS_WITH_BLOCKS = ("pallas_tpu", "pallas_gpu", "interpret")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the M (rows of x), N (output features) and K (contraction) axes."""

    block_m: int
    block_n: int
    block_k: int

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            check_pos_int(name, getattr(self, name))
            # Python ints: block shapes of Pallas BlockSpecs and parts of a static jit argument.
            object.__setattr__(self, name, int(getattr(self, name)))


_SUBLANES = {4: 8, 2: 16, 1: 32}


def sublanes(dtype, name: str = "dtype") -> int:
    """TPU sublane tile of a dtype: 8 (32-bit), 16 (16-bit), 32 (8-bit); ``name`` for errors."""
    itemsize = jnp.dtype(dtype).itemsize
    if itemsize not in _SUBLANES:
        raise ValueError(f"{name}={jnp.dtype(dtype)} has no TPU tile: the kernels take 8-, 16- "
                         "or 32-bit dtypes")
    return _SUBLANES[itemsize]


def _check_case_and_backend(case: Case, backend: str) -> None:
    if not isinstance(case, Case):
        raise TypeError(f"case must be a qjax.kernels.Case, got {type(case).__name__}")
    if backend not in BACKENDS_WITH_BLOCKS:
        raise ValueError(f"backend must be one of {BACKENDS_WITH_BLOCKS}, got {backend!r}")


def _tpu_sublanes(x_dtype, out_dtype) -> int:
    return max(sublanes(x_dtype, "x_dtype"), sublanes(out_dtype, "out_dtype"))


def k_unit(case: Case, gpu: bool = False) -> int:
    """Smallest legal ``block_k`` step (before the one-K-block exception)."""
    if gpu:
        unit = 16 * case.per
        return unit if case.group is None else math.lcm(unit, case.group)
    unit = 128 * case.per
    return unit if case.group is None else math.lcm(unit, 8 * case.group)


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def default_hadamard_blocks(case: Case, m: int, x_dtype, out_dtype, backend: str) -> BlockSizes:
    """Per-backend defaults, clipped to the problem so that tiny shapes pad little.

    ``m`` is the number of rows of x (at least 1); ``backend`` one of ``BACKENDS_WITH_BLOCKS``
    (``"interpret"`` runs the TPU kernels, so it gets the TPU defaults).
    """
    _check_case_and_backend(case, backend)
    check_pos_int("m", m)
    if backend == "pallas_gpu":
        bm = min(64, max(16, _pow2(m)))
        bn = min(128, max(16, _pow2(case.n)))
        unit = _pow2(k_unit(case, gpu=True))
        bk = min(max(unit, 128 * case.per // 2), max(unit, _pow2(case.k)))
        return BlockSizes(bm, bn, bk)
    sub = _tpu_sublanes(x_dtype, out_dtype)
    bm = min(256, round_up(m, sub))
    bn = 256 if case.n >= 256 else 128
    unit = k_unit(case)
    bk = min(unit * max(1, 512 // unit), round_up(case.k, unit))
    return BlockSizes(bm, bn, bk)


def validate_block_sizes(bs: BlockSizes, case: Case, x_dtype, out_dtype, backend: str) -> None:
    """Raises ValueError naming the rule a block size breaks."""
    if not isinstance(bs, BlockSizes):
        raise TypeError(f"block_sizes must be a qjax.kernels.BlockSizes or None, got "
                        f"{type(bs).__name__}")
    _check_case_and_backend(case, backend)

    def bad(msg):
        raise ValueError(f"block_sizes={bs} invalid for backend {backend!r}: {msg}")

    if bs.block_k % case.per:
        bad(f"block_k must be a multiple of {case.per} ({case.bits}-bit codes per byte)")
    if case.group is not None and bs.block_k % case.group:
        bad(f"block_k must be a multiple of the group size {case.group}")
    if backend == "pallas_gpu":
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(bs, name)
            if v & (v - 1) or v < 16:
                bad(f"{name} must be a power of two >= 16 (Triton blocks)")
        if bs.block_k // case.per < 16:
            bad(f"block_k / {case.per} must be >= 16 (Triton dot)")
        return
    sub = _tpu_sublanes(x_dtype, out_dtype)
    if bs.block_m % sub:
        bad(f"block_m must be a multiple of {sub} (TPU sublane tile of the activation/output "
            "dtypes)")
    if bs.block_n % 128:
        bad("block_n must be a multiple of 128 (TPU lanes)")
    if bs.block_k % (128 * case.per):
        bad(f"block_k must be a multiple of {128 * case.per} (128 lanes per activation phase)")
    if case.group is not None:
        kp = round_up(case.k, bs.block_k)
        if (bs.block_k // case.group) % 8 and kp != bs.block_k:
            bad(f"block_k / group size = {bs.block_k // case.group} scale rows per block must be "
                f"a multiple of 8 (TPU sublanes) unless one block covers all of K; use a "
                f"multiple of {k_unit(case)}")
