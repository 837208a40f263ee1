"""Tests for qjax.qarray: bit packing layout, round trips and the QArray pytree."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qjax
from qjax._src import qarray as QA


def test_pack_layout_low_bits_first():
    np.testing.assert_array_equal(qjax.pack_bits(jnp.array([1, 2, 3, 0xF]), 4), [0x21, 0xF3])
    np.testing.assert_array_equal(qjax.pack_bits(jnp.array([1, 0, 3, 2, 1]), 2),
                                  [0b10_11_00_01, 0b01])
    np.testing.assert_array_equal(qjax.pack_bits(jnp.array([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1),
                                  [0b1000_0001, 0b1])


@given(bits=st.sampled_from([1, 2, 4]), rows=st.integers(1, 3), n=st.integers(1, 40),
       seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(bits, rows, n, seed):
    u = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, n)).astype(np.uint8)
    p = qjax.pack_bits(jnp.asarray(u), bits)
    assert p.dtype == jnp.uint8 and p.shape == (rows, -(-n * bits // 8))
    np.testing.assert_array_equal(qjax.unpack_bits(p, bits, n), u)


def test_pack_bad_bits():
    with pytest.raises(ValueError, match="bits must be one of"):
        qjax.pack_bits(jnp.zeros(4, jnp.uint8), 3)


@pytest.mark.parametrize("fmt,dtype,last", [
    ("int4", jnp.uint8, 32), ("uint2", jnp.uint8, 16), ("midrise1", jnp.uint8, 8),
    ("ternary", jnp.uint8, 16), ("int8", jnp.int8, 64), ("uint8", jnp.uint8, 64),
    ("int3", jnp.int8, 64), ("e4m3", jnp.float8_e4m3fn, 64), ("e5m2", jnp.float8_e5m2, 64),
    ("e2m1", jnp.uint8, 32),
])
def test_storage_dtype_and_size(fmt, dtype, last):
    x = jax.random.normal(jax.random.key(0), (3, 64))
    rule = "absmax_asymmetric" if fmt.startswith("uint") else "absmax"
    qa = qjax.quantize(x, qjax.QuantSpec(fmt, qjax.PerRow(-1), rule))
    assert qa.codes.dtype == dtype and qa.codes.shape == (3, last)
    codes = np.asarray(qa.codes_float32())
    fmt_obj = qa.spec.format
    if fmt_obj.uniform:
        assert codes.min() >= fmt_obj.qmin and codes.max() <= fmt_obj.qmax
        np.testing.assert_array_equal(codes, np.round(codes))
    assert qa.nbytes == qa.codes.size * qa.codes.dtype.itemsize + 3 * 4 + (
        3 * 4 if qa.zero_point is not None else 0)


def test_e2m1_codes_are_the_real_bit_patterns():
    fmt = qjax.FloatFormat("e2m1")
    vals = jnp.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0])
    packed = QA.codes_to_storage(vals, fmt)
    pattern = np.asarray(qjax.unpack_bits(packed, 4, 10))
    np.testing.assert_array_equal(pattern, [0, 1, 2, 3, 4, 5, 6, 7, 9, 15])
    np.testing.assert_array_equal(QA.storage_to_codes(packed, fmt, 10), vals)


def test_qarray_is_a_pytree_through_jit():
    x = jax.random.normal(jax.random.key(1), (4, 32))
    spec = qjax.QuantSpec("int4", qjax.PerGroup(-1, 8))
    qa = qjax.quantize(x, spec)
    leaves, treedef = jax.tree_util.tree_flatten(qa)
    assert len(leaves) == 2  # codes, scale (zero point None)
    qa2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert qa2.spec == spec and qa2.shape == (4, 32) and qa2.dtype == "float32"
    np.testing.assert_array_equal(jax.jit(qjax.dequantize)(qa), qjax.dequantize(qa))
    doubled = jax.tree_util.tree_map(lambda a: a, qa)
    assert isinstance(doubled, qjax.QArray)


@pytest.mark.parametrize("fmt", ["int4", "uint4", "int2", "midrise1", "ternary", "midrise4"])
def test_unpack_stores_one_code_per_byte_with_the_same_values(fmt):
    x = jax.random.normal(jax.random.key(2), (3, 10))
    spec = qjax.QuantSpec(fmt, "row") if fmt != "uint4" else qjax.QuantSpec(
        fmt, "row", qjax.AbsMax(symmetric=False))
    qa = qjax.quantize(x, spec)
    un = QA.relayout(qa, packed=False)
    assert qa.packed and not un.packed and un.codes.shape == (3, 10)
    assert un.codes.dtype == (jnp.uint8 if fmt == "uint4" else jnp.int8)
    np.testing.assert_array_equal(un.codes_float32(), qa.codes_float32())
    np.testing.assert_array_equal(jax.jit(qjax.dequantize)(un), qjax.dequantize(qa))
    back = QA.relayout(un, packed=True)
    assert back.packed
    np.testing.assert_array_equal(back.codes, qa.codes)
    leaves, treedef = jax.tree_util.tree_flatten(un)  # packed is static metadata
    assert not jax.tree_util.tree_unflatten(treedef, leaves).packed
    assert un.codes.nbytes == 30 and qa.codes.nbytes < 30


@pytest.mark.parametrize("fmt", ["int8", "e2m1", "e4m3"])
def test_unpack_leaves_formats_without_two_layouts(fmt):
    qa = qjax.quantize(jnp.linspace(-1.0, 1.0, 16).reshape(2, 8), qjax.QuantSpec(fmt, "row"))
    assert QA.relayout(qa, packed=False) is qa and qa.packed
    with pytest.raises(TypeError, match="packed must be a bool"):
        dataclasses.replace(qa, packed=0)
    with pytest.raises(TypeError, match="q must be a qjax.QArray"):
        QA.relayout(np.zeros(3), packed=False)
    with pytest.raises(TypeError, match="k_major must be a bool or None"):
        QA.relayout(qa, k_major="yes")


@pytest.mark.parametrize("packed", [True, False])
def test_k_major_swaps_the_stored_axes_and_follows_leading_slices(packed):
    x = jax.random.normal(jax.random.key(4), (3, 6, 16))  # a stack of three (6, 16) matrices
    qa = QA.relayout(qjax.quantize(x, qjax.QuantSpec("int4", "row")), packed=packed)
    km = QA.relayout(qa, k_major=True)
    assert km.k_major and km.codes.shape == qa.codes.shape[:-2] + qa.codes.shape[::-1][:2]
    np.testing.assert_array_equal(qjax.dequantize(km), qjax.dequantize(qa))
    np.testing.assert_array_equal(QA.relayout(km, k_major=False).codes, qa.codes)
    both = QA.relayout(km, packed=not packed)  # repacking keeps the K-major layout
    assert both.k_major and both.packed != packed
    np.testing.assert_array_equal(qjax.dequantize(both), qjax.dequantize(qa))
    per_layer = jax.lax.map(qjax.dequantize, km)  # leading-axis slices keep (6, 16)
    np.testing.assert_array_equal(per_layer, qjax.dequantize(qa))
    with pytest.raises(ValueError, match="rank >= 2"):
        QA.relayout(qjax.quantize(x[0, 0], qjax.QuantSpec("int4", "tensor")), k_major=True)


def test_rank0_and_odd_last_axis():
    spec = qjax.QuantSpec("int4")
    x = jnp.float32(0.7)
    np.testing.assert_array_equal(qjax.dequantize(qjax.quantize(x, spec)), qjax.fake_quant(x, spec))
    x = jax.random.normal(jax.random.key(2), (2, 7))
    qa = qjax.quantize(x, spec)
    assert qa.codes.shape == (2, 4)
    np.testing.assert_array_equal(qjax.dequantize(qa), qjax.fake_quant(x, spec))


def test_pack_masks_each_code_to_its_width():
    # An out-of-range code keeps its own low bits and leaves its neighbours alone.
    np.testing.assert_array_equal(
        qjax.unpack_bits(qjax.pack_bits(jnp.array([5, 0, 0, 0]), 2), 2, 4), [1, 0, 0, 0])
    np.testing.assert_array_equal(
        qjax.unpack_bits(qjax.pack_bits(jnp.array([-1, 0, 3]), 4), 4, 3), [15, 0, 3])
    np.testing.assert_array_equal(
        jax.jit(qjax.pack_bits, static_argnums=1)(jnp.array([2, 1, 0, 1, 1]), 1),
        qjax.pack_bits(jnp.array([0, 1, 0, 1, 1]), 1))


def test_pack_and_unpack_arguments_validated():
    with pytest.raises(TypeError, match="u must be an integer array"):
        qjax.pack_bits(jnp.array([1.7, 0.2]), 4)
    with pytest.raises(TypeError, match="bits must be an int"):
        qjax.pack_bits(jnp.array([1, 0]), True)
    p = qjax.pack_bits(jnp.array([1, 2, 3]), 4)  # 2 bytes: n in [3, 4]
    for bad in (10, -1, 2, 5):
        with pytest.raises(ValueError, match=r"n must be in \[3, 4\]"):
            qjax.unpack_bits(p, 4, bad)
    with pytest.raises(TypeError, match="n must be an int"):
        qjax.unpack_bits(p, 4, 3.0)
    with pytest.raises(TypeError, match="p must be a packed integer"):
        qjax.unpack_bits(jnp.array([3.0]), 4, 2)
    np.testing.assert_array_equal(qjax.unpack_bits(p, 4, 4), [1, 2, 3, 0])


def test_qarray_static_fields_validated():
    qa = qjax.quantize(jnp.ones((4, 8)), qjax.QuantSpec("int4", qjax.PerRow(-1)))
    for bad in ("int32", "bogus", jnp.int8):
        with pytest.raises(TypeError, match="dtype must name a floating dtype"):
            dataclasses.replace(qa, dtype=bad)
    with pytest.raises(TypeError, match="spec must be a qjax.QuantSpec"):
        dataclasses.replace(qa, spec="int4")
    assert dataclasses.replace(qa, dtype=jnp.bfloat16).dtype == "bfloat16"
