"""``quantized_matmul``: dispatch to a backend, validation, padding and the custom VJP.

Semantics: ``y = Q_a(x) @ dequantize(w).T`` for ``x (..., K)`` and a weight :class:`~qjax.QArray`
``w`` of shape ``(N, K) = (out_features, in_features)``, quantized along K (the last axis: groups,
packing and per-channel scales all run along K); ``y`` is ``(..., N)``. ``Q_a`` is
``fake_quant(., act_spec)`` without its Hadamard rotation, or the identity when ``act_spec`` is
None.

How the activation spec is passed (``act_spec``):

* ``None``: weight-only (W8A16, W4A16 with per-group scales and optional zero points, W2,
  ternary, W1 sign codes as ``Midrise(1)``, fp8 weights): float activations, float32 accumulation.
* a signed-int / midrise / ternary spec, per token (``PerRow(-1)``) or per tensor: the integer
  kind, e.g. W8A8 (``QuantSpec("int8", "row")``) or W4A4 QuEST (``qjax.methods.quest.spec(4)``;
  the caller applies the Hadamard rotation to ``x``, and ``w`` holds the codes of the rotated
  weight, as ``hadamard_mode="half"`` stores them). Which pairs qualify is THE int8 rule,
  :func:`qjax._src.int8.integer_forward_reason`, the one QAT's integer forward uses (see
  :func:`qjax.kernels.classify`); the ``"xla"`` backend is then QAT's integer forward bit for
  bit (:func:`qjax._src.int8.matmul` on the same codes); the Pallas backends agree with it to float
  rounding (the same int32 sums; per-tensor and non-row-statistic scales come from the same XLA
  ops, per-token absmax/RMS scales from the Pallas row kernel).
* an ``e4m3``/``e5m2`` spec per token with fp8 weights: the fp8 kind.

Backends: ``"xla"`` (:mod:`qjax._src.kernels.reference`), ``"pallas_tpu"``, ``"pallas_gpu"``,
``"interpret"`` (the TPU Pallas kernels run by the Pallas interpreter, on any platform) and
``"auto"``: the platform's Pallas backend (``tpu``/``gpu``), falling back to ``"xla"`` when that
backend cannot serve the case; ``"xla"`` on CPU.

Gradient: a ``custom_vjp``. ``dx`` is the fake-quant matmul's: ``g @ dequantize(w)`` passed
through the activation spec's estimator (STE, clipped STE or QuEST's trust mask). ``w`` holds frozen
integer codes (serving), so its cotangent is zero.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from qjax._src import spec as SP
from qjax._src._checks import check_floating, check_pos_int
from qjax._src.kernels import blocks as B
from qjax._src.kernels import cases as C
from qjax._src.kernels import pallas_gpu, pallas_tpu, reference
from qjax._src.kernels.activation import (
    activation_codes,
    codes_dtype,
    quantize_rows,
    row_block,
    row_kernel_reason,
)
from qjax._src.qarray import QArray
from qjax._src.quantize import dequantize, fake_quant

__all__ = ["quantized_matmul", "BACKENDS", "resolve_backend"]

BACKENDS = ("auto", "xla", "pallas_tpu", "pallas_gpu", "interpret")
_AUTO = {"tpu": ("pallas_tpu", "xla"), "gpu": ("pallas_gpu", "xla"), "cuda": ("pallas_gpu", "xla")}


@dataclasses.dataclass(frozen=True)
class _Config:
    case: C.Case
    backend: str
    block_sizes: B.BlockSizes | None
    out_dtype: str
    vmem_limit_bytes: int
    interpret: object


def _unsupported(case: C.Case, backend: str) -> str | None:
    if backend == "pallas_gpu":
        return pallas_gpu.unsupported_reason(case)
    return None


def resolve_backend(backend: str, case: C.Case, platform: str | None = None) -> str:
    """The concrete backend ``backend`` means for ``case`` on ``platform`` (default: JAX's)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(case, C.Case):
        raise TypeError(f"case must be a qjax.kernels.Case (from classify), got "
                        f"{type(case).__name__}")
    if backend != "auto":
        reason = _unsupported(case, backend)
        if reason:
            raise ValueError(f"backend {backend!r} cannot serve this case: {reason}")
        return backend
    platform = platform or jax.default_backend()
    for candidate in _AUTO.get(platform, ("xla",)):
        if _unsupported(case, candidate) is None:
            return candidate
    return "xla"


def _operand_dtype(case: C.Case, x_dtype, w_dtype):
    if case.kind == "float":
        return jnp.result_type(x_dtype, jnp.dtype(w_dtype))
    return codes_dtype(case.act_spec.format)


def _activation_operands(x: jax.Array, cfg: _Config, mp: int):
    """Kernel activations ``(M or Mp, K)`` and multipliers ``(M or Mp, 1)`` (None: float kind).

    Per-token specs with a row-statistic scale rule on TPU: the Pallas row kernel on ``x``
    padded to ``mp`` rows. Everything else the rule accepts (per tensor: one scale over the
    whole ``x``, broadcast to its rows; other scale rules; the GPU backend): the XLA ops of
    :func:`~qjax._src.kernels.activation.activation_codes` on ``x`` itself, as the ``"xla"`` backend
    computes them, so the codes are identical.
    """
    case = cfg.case
    x2 = x.reshape(-1, case.k)
    if case.kind == "float":
        return x2.astype(_operand_dtype(case, x.dtype, case.w_dtype)), None
    if cfg.backend == "pallas_gpu" or row_kernel_reason(case.act_spec) is not None:
        xq, xs = activation_codes(x.astype(jnp.float32), case.act_spec)
        return xq.reshape(-1, case.k), xs.reshape(-1, 1)
    rows = row_block(mp, case.k, x.dtype, cfg.block_sizes.block_m, cfg.vmem_limit_bytes)
    return quantize_rows(jnp.pad(x2, ((0, mp - x2.shape[0]), (0, 0))), case.act_spec, rows,
                         interpret=cfg.interpret,
                         compiler_params=pallas_tpu.compiler_params(cfg.vmem_limit_bytes))


def _pallas(x: jax.Array, w: QArray, cfg: _Config) -> jax.Array:
    """The Pallas backends on ``x (..., K)``: ``(M, N)``."""
    case, bs = cfg.case, cfg.block_sizes
    m = math.prod(x.shape[:-1])
    out = jnp.dtype(cfg.out_dtype)
    if m == 0 or case.n == 0:  # nothing to tile (a grid of zero blocks): an empty product
        return jnp.zeros((m, case.n), out)
    mp = -(-m // bs.block_m) * bs.block_m
    xq, xs = _activation_operands(x, cfg, mp)
    ops = C.prepare_operands(xq, xs, w, case, bs.block_m, bs.block_n, bs.block_k)
    if cfg.backend == "pallas_gpu":
        y = pallas_gpu.matmul(ops, case, bs, out, interpret=cfg.interpret)
    else:
        y = pallas_tpu.matmul(ops, case, bs, out, interpret=cfg.interpret,
                              vmem_limit_bytes=cfg.vmem_limit_bytes)
    return y[:m, : case.n]


def _forward(x: jax.Array, w: QArray, cfg: _Config) -> jax.Array:
    if cfg.backend == "xla":
        return reference.matmul(x, w, cfg.case, jnp.dtype(cfg.out_dtype))
    return _pallas(x, w, cfg).reshape(x.shape[:-1] + (cfg.case.n,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qmm(x, w, cfg):
    return _forward(x, w, cfg)


def _qmm_fwd(x, w, cfg):
    return _forward(x, w, cfg), (x, w)


def _qmm_bwd(cfg, res, g):
    x, w = res
    x32 = x.astype(jnp.float32)
    gx = jnp.matmul(g.astype(jnp.float32), dequantize(w).astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
    if cfg.case.act_spec is not None:
        gx = jax.vjp(lambda a: fake_quant(a, cfg.case.act_spec), x32)[1](gx)[0]
    zeros = jax.tree.map(_zero_cotangent, w)
    return gx.astype(x.dtype), zeros


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.zeros_like(a)
    return jnp.zeros(a.shape, jax.dtypes.float0)


_qmm.defvjp(_qmm_fwd, _qmm_bwd)


def quantized_matmul(
    x: jax.Array,
    w: QArray,
    *,
    act_spec: SP.QuantSpec | None = None,
    backend: str = "auto",
    block_sizes: B.BlockSizes | None = None,
    out_dtype=None,
    vmem_limit_bytes: int = pallas_tpu.DEFAULT_VMEM_LIMIT_BYTES,
    interpret=None,
) -> jax.Array:
    """``Q_a(x) @ dequantize(w).T`` with a low-bit kernel (see the module docstring).

    Args:
      x: floating ``(..., K)`` (float32, bfloat16, float16); with a QuEST ``act_spec``, already
        Hadamard-rotated.
      w: :class:`~qjax.QArray` of shape ``(N, K)``, quantized along K.
      act_spec: activation quantization (None: weight-only).
      backend: one of :data:`BACKENDS`.
      block_sizes: :class:`~qjax.kernels.BlockSizes` for the Pallas backends (None: per-backend
        defaults); validated against the backend's tiling rules. Shapes that are not multiples of
        the blocks are zero-padded (padding adds exact zeros to the sums; see
        :mod:`qjax._src.kernels.cases`).
      out_dtype: output dtype (default ``x.dtype``).
      vmem_limit_bytes: TPU scoped VMEM limit; the blocks' footprint is checked against it.
      interpret: None (``backend="interpret"`` runs the TPU kernels in the interpreter, the
        device backends compile), ``True`` or a ``pltpu.InterpretParams`` (e.g. with
        ``detect_races=True``); with ``backend="pallas_gpu"``, ``True`` runs the GPU kernels in
        the interpreter (how they are tested on CPU).

    Returns:
      ``(..., N)`` in ``out_dtype``. Empty products are served on every backend (arguments are
      still validated): an empty ``x`` (a zero-size leading axis, e.g. ``(0, K)``) or ``N = 0``
      gives the empty result; ``K = 0`` raises ValueError.

    References:
      Panferov et al., 2025 (QuEST odd-integer int4 codes); Frantar et al., 2024 (Marlin,
      W4A16 kernels); Micikevicius et al., 2022 (FP8 formats for deep learning).
    """
    check_floating(x, "x")
    check_pos_int("vmem_limit_bytes", vmem_limit_bytes)
    vmem_limit_bytes = int(vmem_limit_bytes)  # a Python int in the static config
    out = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    if not jnp.issubdtype(out, jnp.floating):
        raise TypeError(f"out_dtype must be a floating dtype, got {out}")
    case = C.classify(x.shape, w, act_spec)
    resolved = resolve_backend(backend, case)
    bs = None
    if resolved != "xla":
        kind = "pallas_gpu" if resolved == "pallas_gpu" else "pallas_tpu"
        m = max(1, math.prod(x.shape[:-1]))
        opd = _operand_dtype(case, x.dtype, w.dtype)
        bs = block_sizes or B.default_hadamard_blocks(case, m, opd, out, kind)
        B.validate_block_sizes(bs, case, opd, out, kind)
    elif block_sizes is not None:
        B.validate_block_sizes(block_sizes, case, x.dtype, out, "pallas_tpu")
    if interpret is None:
        interpret = resolved == "interpret"
    elif resolved == "xla":
        raise ValueError("interpret applies to the Pallas backends, not to backend='xla'")
    cfg = _Config(case, resolved, bs, out.name, vmem_limit_bytes, interpret)
    return _qmm(x, w, cfg)
