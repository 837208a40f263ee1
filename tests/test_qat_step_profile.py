"""Tests for benchmarks/qat_step_profile.py: compiled ops attributed to the code they came from."""

import collections

import jax
import jax.numpy as jnp

import qjax
from benchmarks.qat_step_profile import PARTS, op_parts


def test_ops_are_attributed_to_rotation_quantizer_and_matmul():
    spec = qjax.QuantSpec("int4", "row", hadamard_block=32)

    def f(x, w):
        y = qjax.fake_quant(x, spec) @ w  # rotation, quantizer arithmetic, a matmul
        return jnp.sum(jnp.tanh(y))  # other

    x, w = jnp.ones((16, 64)), jnp.ones((64, 8))
    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).compile().as_text()
    parts = op_parts(hlo)
    assert parts and set(parts.values()) <= set(PARTS)
    seen = collections.Counter(parts.values())
    for part in ("hadamard rotation", "matmuls", "quantizer arithmetic"):
        assert seen[part] >= 1, (part, seen)


def test_a_float_function_has_no_quantizer_parts():
    hlo = jax.jit(lambda x, w: jnp.tanh(x @ w)).lower(jnp.ones((4, 8)), jnp.ones((8, 2))) \
        .compile().as_text()
    assert set(op_parts(hlo).values()) <= {"matmuls", "other"}
