"""int8 products with per-block scales and zero points: W4A8, Q4_0 x Q8_0, torchao 8da4w.

:mod:`qjax._src.int8`'s rule serves one scale per token and per output channel, symmetric and
recomputed by the op: the int32 sum over all of K is then scaled once. Deployment formats are
blockwise: llama.cpp multiplies Q4_0 weights (blocks of 32 along K) with Q8_0 activations (blocks
of 32), torchao's 8da4w pairs asymmetric int8 activations per token with int4 weights per group.
Their exact integer form cuts K into blocks of ``b`` elements, on which both operands have one
scale (and zero point) each, and sums the blocks' int32 dots in float32:

``y[m, n] = sum_j s_x[m, j] s_w[n, j] (sum_{k in block j} (X[m, k] - z_x[m, j]) C[n, k])``

with ``X`` the activation codes, ``C = q_w - z_w`` the weight's centred codes (int8: a weight
with a zero point needs at most 7 bits), midrise codes as the odd integers ``2q + 1`` with half the
scale (:func:`qjax._src.int8.int8_operand`). The activation zero point leaves the int8 dot as a
correction, ``X . C - z_x * sum_k C``, so every block sum is an exact int32. ``b`` is the smaller
of the two group sizes (K for one scale per token, channel or tensor); the larger must be a
multiple of it.

The codes are those of :func:`qjax.quantize` with the same spec, so for a layer trained with these
specs the product equals the fake-quant forward up to float32 accumulation order (the scales are
applied per block instead of per element); with a weight-only layer it is an opt-in change of
numerics (the activations are quantized at serving time only).

On XLA:CPU a single block (per-channel weights) is one int8 dot, about 2x faster than float32 at
32 tokens or more (``benchmarks/serve.py``); small blocks run as a ``lax.scan`` of
``(M, b) x (b, N)`` int8 dots, which the CPU does not run faster than one float32 matmul: the
structure is that of an int8 tensor-core kernel (llama.cpp's ``vec_dot_q4_0_q8_0``), not a CPU
speed-up.

References:
  llama.cpp ``ggml/src/ggml-quants.c`` (``ggml_vec_dot_q4_0_q8_0``: per-block int sums times
  ``d_x * d_w``); torchao ``Int8DynActInt4WeightLinear`` (8da4w); Jacob et al., 2018 (zero-point
  correction terms, int32 accumulation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax._src import formats as F
from qjax._src import granularity as G
from qjax._src import int8
from qjax._src import spec as SP
from qjax._src._checks import check_floating
from qjax._src.qarray import QArray
from qjax._src.quantize import quantize

__all__ = ["block_reason", "block_length", "activation_operand", "weight_operand",
           "block_matmul", "matmul"]

#: Roundings with deterministic codes (stochastic rounding has no serving codes).
_DETERMINISTIC = ("nearest", "half_away", "half_up")


def _group(spec: SP.QuantSpec) -> int | None:
    """The group size along K of ``spec``'s scales, or None for one scale over all of K."""
    g = spec.granularity
    return g.size if isinstance(g, G.PerGroup) else None


def _code_range(fmt: F.Format, has_zero: bool) -> int:
    """Largest ``|q - z|`` (with a zero point) or ``|code|`` of an int8 operand of ``fmt``."""
    if has_zero or int8.code_max(fmt) is None:
        return 2**int(fmt.bits) - 1
    return int8.code_max(fmt)


def _operand_reason(spec: SP.QuantSpec, role: int8.Role, name: str) -> str | None:
    fmt = spec.format
    if int8.code_max(fmt) is None and not (isinstance(fmt, F.IntFormat) and fmt.bits <= 7):
        return (f"{name} format {fmt.name} has no int8 code; use a signed int, ternary or midrise "
                "(<= 7 bits) format, or an unsigned int of <= 7 bits")
    along_k = {"activation": (G.PerRow(-1), G.PerTensor()),
               "weight": (G.PerRow(0), G.PerTensor())}[role]
    g = spec.granularity
    if g not in along_k and not (isinstance(g, G.PerGroup) and g.axis == along_k[0].axis):
        return (f"{name} granularity must be {along_k[0]}, PerGroup({along_k[0].axis}, g) or "
                f"PerTensor(), got {g}")
    if spec.rounding not in _DETERMINISTIC:
        return f"{name} rounding must be one of {_DETERMINISTIC}, got {spec.rounding!r}"
    if spec.hadamard_block is not None and spec.hadamard_mode != "half":
        return f"{name} with a Hadamard rotation must use hadamard_mode='half'"
    return None


def block_reason(weight: SP.QuantSpec | None, activation: SP.QuantSpec | None) -> str | None:
    """Why no blockwise int8 product serves these specs, or None (see the module docstring).

    Args:
      weight: spec of a kernel ``(K, N)`` in the training layout (map a serving ``(N, K)`` spec
        with :func:`qjax._src.int8.training_weight_spec`).
      activation: spec of ``x (..., K)``.

    The conditions: integer codes that fit int8 (a weight with a zero point at most 7 bits);
    scales per token / output channel, per tensor or per group along K (any scale rule, presets
    included, but no learned activation scale: the op recomputes it); deterministic rounding; no
    rotation or QuEST's ``"half"`` form; two group sizes of which the larger is a multiple of the
    smaller.
    """
    SP.check_spec(weight, "weight", optional=True)
    SP.check_spec(activation, "activation", optional=True)
    if weight is None or activation is None:
        return "both the weight and the activation must be quantized"
    reason = (_operand_reason(activation, "activation", "activation")
              or _operand_reason(weight, "weight", "weight"))
    if reason:
        return reason
    if isinstance(activation.estimator, SP.LEARNED_SCALE_ESTIMATORS):
        return "activation must not use a learned-scale estimator (LSQ, PACT)"
    if weight.format.bits > 7 and not getattr(weight.scale_rule, "symmetric", True):
        return "an 8-bit weight must be symmetric (its centred codes q - z would not fit int8)"
    ga, gw = _group(activation), _group(weight)
    if ga and gw and max(ga, gw) % min(ga, gw):
        return (f"the group sizes {ga} (activation) and {gw} (weight) must divide one another")
    return None


def block_length(weight: SP.QuantSpec, activation: SP.QuantSpec, k: int) -> int:
    """The block length ``b`` of the product along ``K = k`` (the smaller group size, or K).

    Raises:
      ValueError: a group size that does not divide ``k``.
    """
    ga, gw = _group(activation) or k, _group(weight) or k
    b = min(ga, gw)
    if k % ga or k % gw:
        raise ValueError(f"the group sizes ({ga} activation, {gw} weight) must divide K = {k}")
    return b


def _per_block(a: jax.Array, rows: int, groups: int, blocks: int) -> jax.Array:
    """Per-group values (any of the granularities' scale shapes) as ``(rows, blocks)``."""
    a = jnp.broadcast_to(a.reshape(-1, groups) if a.size > 1 else a.reshape(1, 1),
                         (rows, groups))
    return jnp.repeat(a, blocks // groups, axis=1)


def activation_operand(x: jax.Array, spec: SP.QuantSpec, b: int
                       ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """int8 codes ``(M, K)``, float32 multipliers ``(M, K/b)`` and int32 zero points (or None).

    ``x (..., K)`` is quantized in its own shape with :func:`qjax.quantize` (the codes and scales
    of :func:`qjax.fake_quant`), then viewed as ``M`` rows.
    """
    check_floating(x, "x")
    k = x.shape[-1]
    qa = quantize(x, spec.replace(hadamard_block=None))
    codes, mult = int8.int8_operand(qa.codes_float32(), qa.scale.astype(jnp.float32),
                                    spec.format)
    rows = codes.size // k
    groups = k // (_group(spec) or k)
    xs = _per_block(mult, rows, groups, k // b)
    xz = None if qa.zero_point is None else _per_block(qa.zero_point, rows, groups, k // b)
    return codes.reshape(rows, k), xs, xz


def weight_operand(w: QArray, b: int) -> tuple[jax.Array, jax.Array]:
    """Centred int8 codes ``C = q - z`` ``(N, K)`` and float32 multipliers ``(N, K/b)`` of a
    serving weight ``(N, K)``."""
    n, k = w.shape
    q = w.codes_float32()
    gspec = int8.training_weight_spec(w.spec)
    groups = k // (_group(gspec) or k)
    if w.zero_point is not None:
        z = _per_block(w.zero_point.astype(jnp.float32), n, groups, k)
        q = q - z
    codes, mult = int8.int8_operand(q, w.scale.astype(jnp.float32), w.spec.format)
    return codes, _per_block(mult, n, groups, k // b)


def _bound(codes_max: int, b: int) -> None:
    if b * codes_max > int8.INT32_MAX:
        raise ValueError(f"blocks of {b} are too long for an exact int32 sum of these codes "
                         f"(|product| up to {codes_max}); use smaller groups")


def block_matmul(xq: jax.Array, xs: jax.Array, xz: jax.Array | None, wq: jax.Array,
                 ws: jax.Array) -> jax.Array:
    """``sum_j xs[:, j] ws[:, j] ((xq - xz) . wq)_j`` over blocks ``j``: float32 ``(M, N)``.

    Args:
      xq: int8 ``(M, K)``; xs: float32 ``(M, B)``; xz: int32 ``(M, B)`` or None.
      wq: int8 ``(N, K)``; ws: float32 ``(N, B)``. ``B`` blocks of ``K / B`` elements.
    """
    m, k = xq.shape
    n, blocks = ws.shape
    b = k // blocks
    nt = (((1,), (1,)), ((), ()))

    def block(x_j, w_j, xs_j, ws_j, xz_j):
        acc = jax.lax.dot_general(x_j, w_j, nt, preferred_element_type=jnp.int32)
        if xz_j is not None:
            acc = acc - xz_j[:, None] * jnp.sum(w_j.astype(jnp.int32), axis=1)[None, :]
        return acc.astype(jnp.float32) * (xs_j[:, None] * ws_j[None, :])

    if blocks == 1:
        y = block(xq, wq, xs[:, 0], ws[:, 0], None if xz is None else xz[:, 0])
    else:
        split = lambda a, r: jnp.moveaxis(a.reshape(r, blocks, b), 1, 0)  # noqa: E731
        xs_t, ws_t = xs.T, ws.T
        xz_t = None if xz is None else xz.T

        def body(acc, j):
            x_j, w_j, xs_j, ws_j, xz_j = j
            return acc + block(x_j, w_j, xs_j, ws_j, xz_j), None

        y, _ = jax.lax.scan(body, jnp.zeros((m, n), jnp.float32),
                            (split(xq, m), split(wq, n), xs_t, ws_t, xz_t))
    # As qjax._src.int8.matmul: no FMA into a following add under jit (jit == eager).
    return jnp.maximum(y, jnp.finfo(jnp.float32).min)


def matmul(x: jax.Array, w: QArray, act_spec: SP.QuantSpec) -> jax.Array:
    """``Q_a(x) @ dequantize(w).T`` as a blockwise int8 product: float32 ``(..., N)``.

    Args:
      x: float ``(..., K)`` (rotated by the caller when the specs use the ``"half"`` form).
      w: serving QArray ``(N, K)`` (from :func:`qjax.convert.convert`).
      act_spec: the activation spec.

    Raises:
      TypeError / ValueError: a spec pair :func:`block_reason` refuses, or blocks too long for an
        exact int32 sum.
    """
    if not isinstance(w, QArray) or w.ndim != 2:
        raise TypeError(f"w must be a 2-D qjax.QArray (N, K), got {type(w).__name__}")
    check_floating(x, "x")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"need x (..., K) and w (N, K), got {x.shape} and {w.shape}")
    wspec = int8.training_weight_spec(w.spec)
    reason = block_reason(wspec, act_spec)
    if reason:
        raise ValueError(f"no blockwise int8 product for these specs: {reason}")
    k = x.shape[-1]
    b = block_length(wspec, act_spec, k)
    xq, xs, xz = activation_operand(x, act_spec, b)
    wq, ws = weight_operand(w, b)
    _bound(_code_range(act_spec.format, xz is not None)
           * _code_range(w.spec.format, w.zero_point is not None), b)
    y = block_matmul(xq, xs, xz, wq, ws)
    return y.reshape(x.shape[:-1] + (w.shape[0],))
