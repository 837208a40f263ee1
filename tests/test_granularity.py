"""Tests for qjax.granularity: block layouts and their validation."""

import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax._src import granularity as G


@pytest.mark.parametrize(
    "gran,shape,blocked,axes,scale_shape",
    [
        (qjax.PerTensor(), (4, 6), (4, 6), (0, 1), (1, 1)),
        (qjax.PerAxis(0), (4, 6), (4, 6), (1,), (4, 1)),
        (qjax.PerAxis(-1), (2, 3, 6), (2, 3, 6), (0, 1), (1, 1, 6)),
        (qjax.PerAxis((0, 1)), (2, 3, 6), (2, 3, 6), (2,), (2, 3, 1)),
        (qjax.PerRow(), (2, 3, 6), (2, 3, 6), (2,), (2, 3, 1)),
        (qjax.PerRow(0), (8, 5), (8, 5), (0,), (1, 5)),
        (qjax.PerGroup(-1, 2), (4, 6), (4, 3, 2), (2,), (4, 3, 1)),
        (qjax.PerGroup(0, 4), (8, 5), (2, 4, 5), (1,), (2, 1, 5)),
    ],
)
def test_layouts(gran, shape, blocked, axes, scale_shape):
    lay = G.layout(gran, shape)
    assert lay.blocked_shape == blocked
    assert lay.reduce_axes == axes
    assert lay.scale_shape == scale_shape
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    np.testing.assert_array_equal(lay.unblock(lay.block(x)), x)


def test_group_contents_are_contiguous():
    x = jnp.arange(12.0).reshape(2, 6)
    xb, lay = G.to_blocks(x, qjax.PerGroup(-1, 3))
    np.testing.assert_array_equal(xb[0, 1], [3, 4, 5])
    assert lay.block_elements == 3


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="group size 4 does not divide axis -1 of size 6"):
        G.layout(qjax.PerGroup(-1, 4), (2, 6))


@pytest.mark.parametrize("bad", [0, -3])
def test_group_size_positive(bad):
    with pytest.raises(ValueError, match="group size"):
        qjax.PerGroup(-1, bad)


def test_axis_validation():
    with pytest.raises(TypeError, match="axis"):
        qjax.PerAxis(1.5)
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        G.layout(qjax.PerRow(2), (3, 4))
    with pytest.raises(ValueError, match="axis=-3 is out of range"):
        G.layout(qjax.PerAxis(-3), (3, 4))
    with pytest.raises(TypeError, match="granularity"):
        G.layout("per_row", (3, 4))
    with pytest.raises(ValueError, match="unknown granularity"):
        G.as_granularity("channel")


def test_layout_shape_validated():
    with pytest.raises(ValueError, match="shape dimension must be >= 0, got -8"):
        G.layout(qjax.PerGroup(-1, 4), (2, -8))
    with pytest.raises(TypeError, match="shape dimension must be an int"):
        G.layout(qjax.PerRow(-1), (2, 4.0))
    with pytest.raises(TypeError, match="shape must be a tuple of ints"):
        G.layout(qjax.PerRow(-1), 8)
    assert G.layout(qjax.PerGroup(-1, 4), [np.int64(2), 8]).scale_shape == (2, 2, 1)
