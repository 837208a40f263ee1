"""QAT matmul with an integer forward: fake-quant semantics, real int8 dot.

``qat_dense(x, kernel, weight_spec, activation_spec)`` computes what
``fake_quant(x, a) @ fake_quant(kernel, w)`` computes, but the forward multiplies the int8 codes
with an int8 x int8 -> int32 dot and applies the scales after (:func:`qjax._src.int8.matmul`): for
integer grids ``y = s_x s_w sum(q_x q_w)``; for QuEST's midrise grid the codes are the odd
integers ``u = 2q + 1`` and ``y = (s_x/2)(s_w/2) sum(u_x u_w)`` (no correction term). The integer
sum is exact below the K limit :func:`qjax._src.int8.check_int32_sum` enforces at trace time, so the
result differs from the fake-quant float matmul only by float rounding. The backward is the
fake-quant matmul's, with each operand's estimator mask: ``dx = (g @ w_q^T) * M_x`` and
``dW = (x_q^T @ g) * M_w``.

With ``backward="int8"`` those two matmuls run as int8 x int8 -> int32 dots too
(:mod:`qjax._src.quantized_backward`): the output gradient is quantized to int8 with stochastic
rounding from an explicit ``key`` after the forward's multipliers are moved onto it, so the
forward's int8 codes are reused as they are, every scale stays off the contraction axis and
``E[dx] = (g @ w_q^T) * M_x``, ``E[dW] = (x_q^T @ g) * M_w``. The key is needed only to
differentiate: without one the primal runs, and ``jax.grad`` raises.

CPU int8 dots are faster than float32 ones for more than a couple of rows (docs/design.md
section 13), so this is the option the QAT benchmark measures against Qwix's quantized-forward
training.

Which specs are supported, the operand codes and the product itself belong to :mod:`qjax._src.int8`
(the one int8 path, shared with :mod:`qjax.kernels` and serving); this module adds the QAT
custom VJP. The names below that :mod:`qjax._src.int8` owns are re-exported for existing callers.
Rotations (QuEST's half Hadamard) are applied by the caller before this op.

References:
  Panferov et al., 2025. QuEST: Stable Training of LLMs with 1-Bit Weights and Activations;
  Gupta et al., 2015. Deep Learning with Limited Numerical Precision (stochastic rounding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qjax._src import estimators as E
from qjax._src import int8, typed_sharding
from qjax._src import quantized_backward as QB
from qjax._src import spec as SP
from qjax._src._checks import check_floating

__all__ = [
    "qat_dense", "integer_forward_reason", "operand_codes", "int8_operand", "int8_matmul",
    "int8_code_max", "check_int32_sum",
]

# Owned by qjax._src.int8 (one rule, one product); kept here under their historical names.
integer_forward_reason = int8.integer_forward_reason
operand_codes = int8.operand_codes
int8_operand = int8.int8_operand
int8_matmul = int8.matmul
int8_code_max = int8.code_max
check_int32_sum = int8.check_int32_sum
INT32_MAX = int8.INT32_MAX


def _codes(a32: jax.Array, spec: SP.QuantSpec, axis: int):
    """(fake-quant values, backward mask, int8 codes, multiplier) of one operand."""
    fmt = spec.format
    q, scale = int8.operand_codes(a32, spec, axis)
    values = E.decode(q, scale, None, fmt)
    mask = E.estimator_mask(a32, values, scale, None, fmt, spec.estimator)
    return (values, mask) + int8.int8_operand(q, scale, fmt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _qat_dense(x32, kernel32, weight, activation, out_sharding):
    return _forward(x32, kernel32, weight, activation, out_sharding)[0]


def _forward(x32, kernel32, weight, activation, out_sharding):
    """``(y, float-backward residuals, int8-backward residuals)``; XLA drops the unused ones."""
    xv, xm, xi, xs = _codes(x32, activation, -1)
    wv, wm, wi, ws = _codes(kernel32, weight, 0)
    y = int8.matmul(xi, xs, wi, ws, 0, out_sharding)
    return y, (xv, xm, wv, wm), (xi, xs, xm, wi, ws, wm)


def _qat_dense_fwd(x32, kernel32, weight, activation, out_sharding):
    return _forward(x32, kernel32, weight, activation, out_sharding)[:2]


def _qat_dense_bwd(weight, activation, out_sharding, res, g):
    xv, xm, wv, wm = res
    # Each cotangent gets its operand's sharding type (explicit meshes, shard_map).
    dx = typed_sharding.dot_general(g, wv, (((g.ndim - 1,), (1,)), ((), ())))
    lead = tuple(range(g.ndim - 1))
    dw = typed_sharding.dot_general(xv, g, ((lead, lead), ((), ())))
    dx = dx if xm is None else jnp.where(xm, dx, 0.0)
    dw = dw if wm is None else jnp.where(wm, dw, 0.0)
    return typed_sharding.cotangent_like(dx, xv), typed_sharding.cotangent_like(dw, wv)


_qat_dense.defvjp(_qat_dense_fwd, _qat_dense_bwd)

_NO_KEY = ("backward='int8' needs a PRNG key to differentiate: pass key= to qat_dense, "
          "rngs={'quant': key} to a Linen apply (fold the step into the key), or "
          "qjax.nn.nnx.set_quant_rngs(model, nnx.Rngs(quant=seed)) for NNX")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _qat_dense_int8(x32, kernel32, key, weight, activation, out_sharding):
    return _forward(x32, kernel32, weight, activation, out_sharding)[0]


def _qat_dense_int8_fwd(x32, kernel32, key, weight, activation, out_sharding):
    if key is None:
        raise ValueError(_NO_KEY)
    y, _, codes = _forward(x32, kernel32, weight, activation, out_sharding)
    return y, codes + (key,)  # int8 codes: a quarter of the float32 values' memory


def _qat_dense_int8_bwd(weight, activation, out_sharding, res, g):
    xi, xs, xm, wi, ws, wm, key = res
    dx, dw = QB.dense_grads(g, xi, xs, wi, ws, key, x_format=activation.format,
                            w_format=weight.format)
    dx = dx if xm is None else jnp.where(xm, dx, 0.0)
    dw = dw if wm is None else jnp.where(wm, dw, 0.0)
    return typed_sharding.cotangent_like(dx, xi), typed_sharding.cotangent_like(dw, wi), None


_qat_dense_int8.defvjp(_qat_dense_int8_fwd, _qat_dense_int8_bwd)


def qat_dense(x: jax.Array, kernel: jax.Array, weight: SP.QuantSpec,
              activation: SP.QuantSpec, *, out_sharding=None, backward: QB.Backward = "float",
              key: jax.Array | None = None) -> jax.Array:
    """``Q_a(x) @ Q_w(kernel)`` with an int8 x int8 -> int32 forward (see the module docstring).

    Args:
      x: ``(..., K)`` floating input, already rotated if the specs use the half Hadamard form.
      kernel: ``(K, N)`` floating kernel, rotated likewise.
      weight, activation: specs accepted by :func:`qjax._src.int8.integer_forward_reason`.
      out_sharding: output sharding on explicit meshes (``PartitionSpec`` or ``NamedSharding``);
        by default :func:`qjax._src.typed_sharding.dot_out_spec`.
      backward: ``"float"`` (float32 gradient matmuls on the fake-quant values) or ``"int8"``
        (int8 x int8 -> int32 gradient matmuls, stochastically rounded output gradient,
        :func:`qjax._src.quantized_backward.dense_grads`).
      key: PRNG key of the stochastic rounding (``backward="int8"`` only); fold the training step
        (and the layer) into it so that every step draws new noise. The same key gives the same
        gradients.

    Returns:
      ``(..., N)`` in ``x``'s dtype.

    Raises:
      TypeError: ``x`` or ``kernel`` not a floating array, a spec that is not a QuantSpec, a key
        that is not one PRNG key.
      ValueError: specs the integer forward cannot serve, mismatched shapes, a K for which the
        int32 sum could overflow (:func:`qjax._src.int8.check_int32_sum`), ``backward`` not in
        :data:`qjax._src.quantized_backward.BACKWARDS` or a key with ``backward="float"``; under
        differentiation, ``backward="int8"`` without a key.
    """
    check_floating(x, "x")
    check_floating(kernel, "kernel")
    QB.check_backward(backward)
    if key is not None:
        if backward == "float":
            raise ValueError("key= is for backward='int8' (the float backward draws no noise)")
        QB.check_key(key)
    reason = int8.integer_forward_reason(weight, activation)
    if reason:
        raise ValueError(f"integer forward not available: {reason}")
    if kernel.ndim != 2 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"need x (..., K) and kernel (K, N), got {x.shape} and {kernel.shape}")
    int8.check_int32_sum(kernel.shape[0], activation.format, weight.format)
    plain = lambda s: s.replace(hadamard_block=None)  # rotation already applied by the caller
    x32, kernel32 = x.astype(jnp.float32), kernel.astype(jnp.float32)
    if backward == "int8":
        y = _qat_dense_int8(x32, kernel32, key, plain(weight), plain(activation), out_sharding)
    else:
        y = _qat_dense(x32, kernel32, plain(weight), plain(activation), out_sharding)
    return y.astype(x.dtype)
