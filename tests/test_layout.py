"""KernelLayout: the (K, N) matrix view of every kernel, against the layers' own ops."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax._src.nn.ops import add_bias, arrange_output
from qjax.nn import conv_layout, dense_layout, einsum_layout, embed_layout, general_layout

KEY = jax.random.key(0)


def _rand(shape, i=0):
    return jax.random.normal(jax.random.fold_in(KEY, i), shape)


@pytest.mark.parametrize("eq,kshape,xshape", [
    ("btd,dnh->btnh", (16, 2, 8), (2, 3, 16)),
    ("btnh,nhd->btd", (2, 8, 16), (2, 3, 2, 8)),
    ("btd,dnh->nbth", (16, 2, 8), (2, 3, 16)),  # output order differs from the canonical one
    ("...d,dn->...n", (16, 4), (2, 3, 16)),
])
def test_einsum_rows_times_matrix_is_the_einsum(eq, kshape, xshape):
    layout = einsum_layout(eq, kshape)
    x, k = _rand(xshape, 1), _rand(kshape, 2)
    y = arrange_output(layout.input_to_rows(x) @ layout.to_matrix(k), x.shape, layout)
    np.testing.assert_allclose(y, jnp.einsum(eq, x, k), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layout.from_matrix(layout.to_matrix(k)), k)
    np.testing.assert_array_equal(layout.rows_to_input(layout.input_to_rows(x), x.shape), x)


def test_stacked_kernels_keep_leading_axes():
    layout = einsum_layout("btnh,nhd->btd", (2, 8, 16))
    k = _rand((3, 2, 8, 16))
    m = layout.to_matrix(k)
    assert m.shape == (3, 16, 16)
    np.testing.assert_array_equal(m[1], layout.to_matrix(k[1]))
    np.testing.assert_array_equal(layout.from_matrix(m), k)


def test_general_layout_matches_dense_general():
    x = _rand((2, 4, 6), 3)
    m = nn.DenseGeneral((3, 5), axis=(-2, -1))
    p = m.init(KEY, x)["params"]
    layout = general_layout(p["kernel"].shape, (-2, -1), (), x.ndim)
    assert (layout.k, layout.n, layout.out_shape) == (24, 15, (3, 5))
    rows = layout.input_to_rows(x) @ layout.to_matrix(p["kernel"])
    y = add_bias(arrange_output(rows, x.shape, layout), p["bias"], layout)
    np.testing.assert_allclose(y, m.apply({"params": p}, x), rtol=1e-5, atol=1e-5)


def test_einsum_bias_broadcast_matches_flax():
    x = _rand((2, 3, 16), 4)
    m = nn.Einsum((16, 2, 8), "btd,dnh->btnh", use_bias=True,
                  bias_init=nn.initializers.normal(1.0))
    p = m.init(KEY, x)["params"]
    layout = einsum_layout("btd,dnh->btnh", p["kernel"].shape)
    y = add_bias(jnp.einsum("btd,dnh->btnh", x, p["kernel"]), p["bias"], layout)
    np.testing.assert_allclose(y, m.apply({"params": p}, x), rtol=1e-6)


def test_conv_and_embed_views():
    conv = conv_layout((3, 3, 16, 32))
    assert (conv.k, conv.n, conv.channels) == (144, 32, 16)
    k = _rand((3, 3, 16, 32))
    # K runs window-major, channels fastest: a block of 16 rows is one kernel tap.
    np.testing.assert_array_equal(conv.to_matrix(k)[16:32], k[0, 1])
    table = embed_layout((10, 8))
    assert table.matrix_shape == (8, 10)  # one column per embedding row
    assert dense_layout((8, 4)).to_matrix(_rand((8, 4))).shape == (8, 4)


@pytest.mark.parametrize("eq,match", [
    ("btd,dn", "x,kernel->out"),
    ("btd,dn->bt...n", "ellipsis"),
    ("btd,dd->btd", "repeated labels"),
    ("bt,nh->btnh", "contracts no input axis"),
    ("btd,nh->btnh", "summed on one side only"),
])
def test_einsum_layout_errors(eq, match):
    with pytest.raises(ValueError, match=match):
        einsum_layout(eq, (4, 4))


def test_layout_errors():
    with pytest.raises(ValueError, match="Dense kernel is"):
        dense_layout((2, 3, 4))
    with pytest.raises(ValueError, match="does not end in"):
        dense_layout((4, 8)).to_matrix(jnp.zeros((8, 4)))
    with pytest.raises(ValueError, match="conv kernel"):
        conv_layout((3, 4))
