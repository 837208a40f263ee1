"""Shardings in array types: no-ops off explicit meshes, the right sharding on them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qjax import sharding as S
from qjax._src import typed_sharding as T

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _mesh(shape, axis_types="explicit"):
    return S.make_mesh(shape, axis_types=axis_types,
                       devices=jax.devices()[:math.prod(shape.values())])


def test_off_mesh_everything_is_a_no_op():
    x = jnp.ones((4, 6))
    assert T.explicit_sharding(x) is None and T.explicit_spec(x) is None
    assert T.axis_shards(x, 1) == 1
    assert T.dot_out_spec(x, x.T, (((1,), (0,)), ((), ()))) is None
    assert T.varying_axes(x) == frozenset()
    np.testing.assert_array_equal(T.cotangent_like(x, x), x)
    auto = _mesh({"data": 2}, "auto")
    xa = S.put(x, NamedSharding(auto, P("data")))
    assert T.explicit_sharding(xa) is None  # automatic axes leave shardings to the compiler


def test_explicit_spec_and_axis_shards():
    mesh = _mesh({"data": 2, "tensor": 4})
    x = S.put(jnp.ones((4, 8, 16)), NamedSharding(mesh, P("data", None, "tensor")))
    assert T.explicit_spec(x) == ("data", None, "tensor")
    assert [T.axis_shards(x, a) for a in (0, 1, 2, -1)] == [2, 1, 4, 4]
    y = S.put(jnp.ones((8, 4)), NamedSharding(mesh, P(("data", "tensor"))))
    assert T.axis_shards(y, 0) == 8


def test_reshape_back_keeps_the_sharding_of_the_original():
    mesh = _mesh({"data": 2, "tensor": 2})
    x = S.put(jnp.arange(8 * 16.0).reshape(8, 16), NamedSharding(mesh, P("data", "tensor")))
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x: T.reshape(x.reshape(8, 2, 8) * 2.0, (8, 16), like=x))(x)
    assert y.sharding.spec == P("data", "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2.0 * np.arange(8 * 16.0).reshape(8, 16))


@pytest.mark.parametrize("lhs,rhs,want", [
    (P("data", "tensor"), P("tensor", None), P("data", None)),      # row-parallel: all-reduce
    (P("data", None), P(None, "tensor"), P("data", "tensor")),      # column-parallel
    (P("data", None), P(None, "data"), P("data", None)),            # axis used twice: lhs wins
])
def test_dot_out_spec(lhs, rhs, want):
    mesh = _mesh({"data": 2, "tensor": 4})
    x = S.put(jnp.ones((4, 8)), NamedSharding(mesh, lhs))
    w = S.put(jnp.ones((8, 8)), NamedSharding(mesh, rhs))
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x, w: T.dot_general(x, w, (((1,), (0,)), ((), ()))))(x, w)
    assert y.sharding.spec == want
    np.testing.assert_allclose(np.asarray(y), 8.0)


def test_cotangent_like_sums_over_axes_the_primal_does_not_vary_on():
    mesh = _mesh({"data": 4})

    def f(x, s):
        assert T.varying_axes(x) == {"data"} and T.varying_axes(s) == frozenset()
        return T.cotangent_like(x.sum(keepdims=True).reshape(()), s)

    x = S.put(jnp.arange(8.0), NamedSharding(mesh, P("data")))
    s = S.put(jnp.float32(0.0), NamedSharding(mesh, P()))
    out = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P()), out_specs=P()))(x, s)
    assert float(out) == 28.0  # the sum over all shards, now invariant like s
