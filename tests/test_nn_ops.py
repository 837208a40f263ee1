"""Tests for qjax.nn.ops: the quantized-op core the Flax front ends share."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxpr_walk import equations

import qjax
from qjax.nn import Method, dense_layout
from qjax.nn import ops as O

X = jax.random.normal(jax.random.key(0), (4, 64))
QUEST = qjax.nn.resolve(Method("quest", 4, 4, hadamard_block=64), dense_layout((64, 32)))


def _rotations(closed) -> int:
    """Custom-VJP calls (a quantizer's rotation and estimator) in a forward jaxpr, nested ones
    included: each is one backward pass of the step."""
    return sum(e.primitive.name == "custom_vjp_call" for e, _ in equations(closed.jaxpr))


def _two_layers(lq, w1, w2, x, scale=None):
    layout = dense_layout(w1.shape)
    a = O.quantize_input(x, lq, layout, scale) @ w1
    b = O.quantize_input(x, lq, layout, scale) @ w2
    return jnp.sum(jnp.sin(a) * jnp.cos(b))


def test_layers_on_one_traced_input_share_its_quantization():
    w1, w2 = jax.random.normal(jax.random.key(1), (2, 64, 32))
    f = jax.jit(jax.value_and_grad(lambda x: _two_layers(QUEST, w1, w2, x)))
    loss, g = f(X)
    # The reference: each layer quantizes the input itself (eager arrays are never shared).
    layout = dense_layout((64, 32))
    xq1 = O.quantize_input(X, QUEST, layout)
    xq2 = O.quantize_input(X, QUEST, layout)
    assert xq1 is not xq2
    ref_loss = jnp.sum(jnp.sin(xq1 @ w1) * jnp.cos(xq2 @ w2))
    ref_g = (jax.grad(lambda x: jnp.sum(jnp.sin(O.quantize_input(x, QUEST, layout) @ w1)
                                        * jnp.cos(jax.lax.stop_gradient(xq2) @ w2)))(X)
             + jax.grad(lambda x: jnp.sum(jnp.sin(jax.lax.stop_gradient(xq1) @ w1)
                                          * jnp.cos(O.quantize_input(x, QUEST, layout) @ w2)))(X))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-6)
    # One quantization (and so one backward) in the traced program, not two.
    jaxpr = jax.make_jaxpr(lambda x: _two_layers(QUEST, w1, w2, x))(X)
    single = jax.make_jaxpr(lambda x: jnp.sum(O.quantize_input(x, QUEST, layout)))(X)
    assert _rotations(jaxpr) == _rotations(single) > 0


def test_learned_scales_and_other_recipes_are_not_shared():
    w1, w2 = jax.random.normal(jax.random.key(1), (2, 64, 32))
    lsq = qjax.nn.resolve(Method("lsq", 4, 4), dense_layout((64, 32)))
    s = jnp.float32(0.3)
    g = jax.jit(jax.grad(lambda x, s: _two_layers(lsq, w1, w2, x, s), argnums=1))(X, s)
    ref = jax.grad(lambda x, s: _two_layers(lsq, w1, w2, x, s), argnums=1)(X, s)  # eager
    np.testing.assert_allclose(g, ref, rtol=1e-5)
    other = qjax.nn.resolve(Method("quest", 2, 2, hadamard_block=64), dense_layout((64, 32)))

    def mixed(x):
        layout = dense_layout((64, 32))
        return jnp.sum(O.quantize_input(x, QUEST, layout) - O.quantize_input(x, other, layout))
    assert float(jax.jit(mixed)(X)) != 0.0  # 4-bit and 2-bit inputs differ


def test_a_value_made_inside_a_scan_is_not_used_outside_it():
    w = jax.random.normal(jax.random.key(1), (64, 32))
    layout = dense_layout((64, 32))

    def f(x):
        def body(c, _):
            return c + jnp.sum(O.quantize_input(x, QUEST, layout) @ w), None
        inner, _ = jax.lax.scan(body, 0.0, None, length=2)
        return inner + jnp.sum(O.quantize_input(x, QUEST, layout) @ w)  # outer trace: recomputed

    y = jax.jit(f)(X)
    ref = 3 * jnp.sum(O.quantize_input(X, QUEST, layout) @ w)
    np.testing.assert_allclose(float(y), float(ref), rtol=1e-5)
    jax.jit(jax.grad(f))(X)


class _QKV(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.Dense(32, name=n)(x) for n in "qkv")
        return jnp.sum(jax.nn.softmax(q @ k.T) @ v)


class _QKVnnx(nnx.Module):
    def __init__(self, rngs):
        self.q, self.k, self.v = (nnx.Linear(64, 32, rngs=rngs) for _ in range(3))

    def __call__(self, x):
        return jnp.sum(jax.nn.softmax(self.q(x) @ self.k(x).T) @ self.v(x))


def test_quantized_models_share_q_k_v_inputs_linen_and_nnx():
    """The whole-model path: q, k and v of one input quantize it once in the traced step (Linen
    interception and NNX wrapping), with the gradients of the per-layer computation."""
    rules = {"q|k|v": Method("quest", 4, 4, hadamard_block=64)}
    qm = qjax.nn.quantize_model(_QKV(), rules)
    p = qm.init(jax.random.key(2), X)["params"]
    loss = lambda p, x: qm.apply({"params": p}, x)  # noqa: E731
    jaxpr = jax.make_jaxpr(loss)(p, X)
    g = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, X)
    ref = jax.grad(loss, argnums=(0, 1))(p, X)  # eager: each layer quantizes its own copy
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)
    layout = dense_layout((64, 32))
    per_input = _rotations(jax.make_jaxpr(lambda x: O.quantize_input(x, QUEST, layout))(X))
    weights = 3 * _rotations(jax.make_jaxpr(lambda w: O.quantize_kernel(w, QUEST, layout))(
        p["q"]["kernel"]))
    assert per_input > 0 and weights > 0
    assert _rotations(jaxpr) == per_input + weights

    m = qjax.nn.quantize_model(_QKVnnx(nnx.Rngs(3)), rules)
    graphdef, state = nnx.split(m)
    f = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    assert _rotations(jax.make_jaxpr(f)(state, X)) == per_input + weights
