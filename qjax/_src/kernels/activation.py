"""Dynamic activation quantization for the kernels: codes and scales per token or per tensor.

``activation_codes(x32, spec)`` gives the codes an integer or fp8 matmul consumes. Integer grids
go through :func:`qjax._src.int8.quantize_operand`, the very ops of QAT's integer forward: the int8
code ``q``, or for QuEST's midrise grid the odd integer ``u = 2q + 1`` with half the scale, so
``s * q_level = (s/2) * u`` exactly; fp8 grids give the e4m3/e5m2 value
(:func:`qjax._src.int8.operand_codes`, then a cast). The scale rule and the rounding are the spec's
own, so the codes equal :func:`qjax.quantize`'s bit for bit. Per-tensor specs get one scale over
the whole ``x``, broadcast to every row: the kernels always read one multiplier per row.

:func:`quantize_rows` runs the same function as a small Pallas kernel over blocks of whole rows
(per-token statistics need the full row: the block is ``(bm, K)``). It serves per-token specs
whose scale rule is a row statistic the kernel computes (:func:`row_kernel_reason`: ``AbsMax``,
``RmsGaussian``); every other accepted spec (per tensor, MSE search, percentile) is quantized by
``activation_codes`` as XLA ops before the matmul kernel. QuEST's Hadamard rotation is applied by
the caller before this op (``act_spec.hadamard_block`` is ignored here).

Both refuse a spec whose codes they cannot reproduce (unsigned or fp4 grids, zero points, other
granularities, learned scales, ...): for integer grids the rule is the activation half of
:func:`qjax._src.int8.integer_forward_reason`, as :func:`qjax.kernels.classify` applies it
(:func:`qjax._src.kernels.cases.check_act_spec`).

References:
  Panferov et al., 2025. QuEST: Stable Training of LLMs with 1-Bit Weights and Activations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qjax._src import formats as F
from qjax._src import granularity as G
from qjax._src import int8
from qjax._src import scales as S
from qjax._src import spec as SP
from qjax._src._checks import check_floating, check_pos_int
from qjax._src.kernels.cases import check_act_spec

__all__ = ["activation_codes", "codes_dtype", "quantize_rows", "row_block", "row_kernel_reason"]

#: Scale rules the row kernel computes in Pallas (plain row statistics).
ROW_KERNEL_SCALES = (S.AbsMax, S.RmsGaussian)


def codes_dtype(fmt: F.Format):
    """Storage dtype of activation codes: int8, or the fp8 dtype."""
    return fmt.dtype if isinstance(fmt, F.FloatFormat) else jnp.int8


def activation_codes(x32: jax.Array, spec: SP.QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Codes ``(..., K)`` and float32 kernel multipliers ``(..., 1)`` of float32 ``x32 (..., K)``.

    Integer grids: :func:`qjax._src.int8.quantize_operand` along the last axis (odd ``2q + 1`` codes
    and ``s/2`` for midrise); fp8: the fp8 value of ``encode(x / s)`` with ``s``. A per-tensor
    scale is broadcast to ``(..., 1)``.

    Raises:
      TypeError: ``x32`` not a floating array, ``spec`` not a QuantSpec.
      ValueError: a spec the kernels cannot honour (see the module docstring).
    """
    check_floating(x32, "x32")
    check_act_spec(spec, "spec")
    fmt = spec.format
    if isinstance(fmt, F.FloatFormat):
        q, scale = int8.operand_codes(x32, spec, -1)
        codes = q.astype(fmt.dtype)
    else:
        codes, scale = int8.quantize_operand(x32, spec, -1)
    return codes, jnp.broadcast_to(scale, x32.shape[:-1] + (1,))


def row_kernel_reason(spec: SP.QuantSpec) -> str | None:
    """Why :func:`quantize_rows` cannot compute an (accepted) ``spec``, or None if it can.

    The row kernel sees one block of whole rows: it needs a per-token spec (``PerRow(-1)``) and a
    scale rule it computes in Pallas (:data:`ROW_KERNEL_SCALES`).
    """
    SP.check_spec(spec, "spec")
    if spec.granularity != G.PerRow(-1):
        return (f"spec granularity must be PerRow(-1) (per token) for the row kernel, got "
                f"{spec.granularity}; use activation_codes (XLA) for per-tensor scales")
    if not isinstance(spec.scale_rule, ROW_KERNEL_SCALES):
        return ("spec scale must be AbsMax or RmsGaussian for the row kernel, got "
                f"{spec.scale_rule}; "
                "use activation_codes (XLA)")
    return None


def row_block(rows: int, k: int, x_dtype, block_m: int, vmem_limit_bytes: int,
              sublane: int = 32) -> int:
    """Largest multiple of ``sublane`` dividing ``block_m`` whose whole-row blocks fit in VMEM.

    Footprint per row: the input and the 1-byte codes double-buffered, plus two float32
    temporaries (``x`` upcast and the scaled values). ``rows`` (the padded row count) is not
    used. Raises ValueError if no block fits, TypeError/ValueError on invalid arguments.
    """
    check_pos_int("rows", rows, allow_zero=True)
    for name, value in (("k", k), ("block_m", block_m), ("vmem_limit_bytes", vmem_limit_bytes),
                        ("sublane", sublane)):
        check_pos_int(name, value)
    if block_m % sublane:
        raise ValueError(f"block_m={block_m} must be a multiple of sublane={sublane}")
    per_row = 2 * k * (jnp.dtype(x_dtype).itemsize + 1) + 2 * k * 4 + 16
    for bm in range(block_m, 0, -sublane):
        if block_m % bm == 0 and bm % sublane == 0 and bm * per_row <= vmem_limit_bytes:
            return bm
    raise ValueError(f"activation quantization needs whole rows of K = {k} in VMEM: "
                     f"{sublane} rows take about {sublane * per_row} bytes, more than "
                     f"vmem_limit_bytes={vmem_limit_bytes}")


def _kernel(x_ref, c_ref, s_ref, *, spec):
    codes, scale = activation_codes(x_ref[...].astype(jnp.float32), spec)
    c_ref[...] = codes
    s_ref[...] = scale


@functools.partial(jax.jit, static_argnames=("spec", "block_m", "interpret", "compiler_params"))
def quantize_rows(x: jax.Array, spec: SP.QuantSpec, block_m: int, interpret=False,
                  compiler_params=None) -> tuple[jax.Array, jax.Array]:
    """Pallas kernel form of :func:`activation_codes` for ``x (M, K)``, ``M % block_m == 0``.

    Serves the specs :func:`row_kernel_reason` accepts (per token, absmax or RMS scales).

    Returns codes ``(M, K)`` (:func:`codes_dtype`) and float32 scales ``(M, 1)``.

    Raises:
      TypeError: ``x`` not a floating array, ``spec`` not a QuantSpec.
      ValueError: a spec the kernels or the row kernel cannot honour, bad shapes or block_m.
    """
    check_floating(x, "x")
    check_act_spec(spec, "spec")
    reason = row_kernel_reason(spec)
    if reason:
        raise ValueError(reason)
    check_pos_int("block_m", block_m)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (M, K), got shape {x.shape}")
    m, k = x.shape
    if m % block_m:
        raise ValueError(f"block_m={block_m} must divide the number of rows {m}")
    return pl.pallas_call(
        functools.partial(_kernel, spec=spec),
        grid=(m // block_m,),
        in_specs=[pl.BlockSpec((block_m, k), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((block_m, k), lambda i: (i, 0)),
                   pl.BlockSpec((block_m, 1), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((m, k), codes_dtype(spec.format)),
                   jax.ShapeDtypeStruct((m, 1), jnp.float32)],
        interpret=interpret,
        compiler_params=compiler_params,
        name="qjax_quantize_rows",
    )(x)
