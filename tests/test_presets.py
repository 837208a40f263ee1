"""Tests for qjax.presets: bit-exact against gguf-py's quantizers; torchao values by hand."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import quants as GQ
from gguf.constants import GGMLQuantizationType as GT

import qjax
from qjax import presets as P

BF16 = ml_dtypes.bfloat16
Q8, Q4 = P.gguf_q8_0(), P.gguf_q4_0()
GGUF = [(Q8, GT.Q8_0), (Q4, GT.Q4_0)]


@functools.partial(jax.jit, static_argnums=1)
def _fq(x, spec):
    return qjax.fake_quant(x, spec)


@functools.partial(jax.jit, static_argnums=1)
def _q(x, spec):
    return qjax.quantize(x, spec)


_dq = jax.jit(qjax.dequantize)


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _gguf_blocks(x, qtype):
    """gguf-py's bytes as (codes in [-8, 7] or [-128, 127], fp16 scale bits), by block."""
    raw = GQ.quantize(np.asarray(x, np.float32), qtype)
    blocks = raw.reshape(-1, 34 if qtype == GT.Q8_0 else 18)
    d = blocks[:, :2].copy().view(np.uint16)[:, 0]
    if qtype == GT.Q8_0:
        codes = blocks[:, 2:].copy().view(np.int8).astype(np.int32)
    else:  # element j < 16 in the low nibble of byte j, element 16 + j in its high nibble
        qs = blocks[:, 2:].astype(np.int32)
        codes = np.concatenate([qs & 15, qs >> 4], axis=1) - 8
    return codes.reshape(x.shape), d.reshape(x.shape[:-1] + (-1,))


def _gguf_values(x, qtype):
    return GQ.dequantize(GQ.quantize(np.asarray(x, np.float32), qtype), qtype)


def _gguf_inputs():
    rng = np.random.default_rng(0)
    mags = np.exp(rng.uniform(-12, 9, (24, 1)))
    x = (rng.standard_normal((24, 64)) * mags).astype(np.float32)
    x[0, :32] = 0.0  # all-zero block
    x[1, :32] = np.arange(32) - 16.0  # Q4_0 scale 2: codes on exact ties of the 4-bit grid
    x[1, 32:] = np.arange(32) * 2.0 - 31.0  # Q4_0 ties with a positive-extreme block
    x[2, :32] = 0.5
    x[2, 0] = -8.0  # d = 1 for Q4_0; 0.5 is a tie
    x[2, 1] = np.float32(0.5) - np.float32(2.0**-24)  # rounds up in Q4_0's float32 "+ 8.5"
    x[2, 2] = -2.5
    x[2, 32:] = rng.integers(-126, 126, 32) + 0.5
    x[2, 32] = -127.0  # d = 1 for Q8_0: the others are exact ties (half away from zero)
    x[3, :32] = rng.standard_normal(32)
    x[3, 5], x[3, 9] = 3.0, -3.0  # equal |x|: the first one sets Q4_0's sign
    x[3, 32:] = -x[3, :32]
    x[4, :32] = 1e-30 * rng.standard_normal(32)  # fp16 scale underflows to 0
    x[4, 32:] = 4e4 * rng.standard_normal(32)  # large but inside fp16's scale range
    x[5] = x[5].astype(BF16).astype(np.float32)  # bfloat16-representable values
    return x


X_GGUF = _gguf_inputs()


@pytest.mark.parametrize("spec, qtype", GGUF, ids=["q8_0", "q4_0"])
def test_gguf_codes_scales_and_values_bit_exact(spec, qtype):
    codes, d_bits = _gguf_blocks(X_GGUF, qtype)
    ref = _gguf_values(X_GGUF, qtype)
    qa = _q(jnp.asarray(X_GGUF), spec)
    np.testing.assert_array_equal(np.asarray(qa.codes_float32()).astype(np.int32), codes)
    np.testing.assert_array_equal(
        _bits(np.asarray(qa.scale).astype(np.float16)).reshape(d_bits.shape), d_bits
    )
    # The stored scale is exactly the fp16 value (nothing lost by keeping it as float32).
    np.testing.assert_array_equal(
        _bits(qa.scale), _bits(np.asarray(qa.scale).astype(np.float16).astype(np.float32))
    )
    for y in (_fq(jnp.asarray(X_GGUF), spec), qjax.fake_quant(jnp.asarray(X_GGUF), spec),
              _dq(qa)):
        np.testing.assert_array_equal(_bits(y), _bits(ref))


@pytest.mark.parametrize("spec, qtype", GGUF, ids=["q8_0", "q4_0"])
def test_gguf_random_rows_bit_exact(spec, qtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 96)) * rng.uniform(1e-3, 10, (64, 1))).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = 0.0
    np.testing.assert_array_equal(_bits(_fq(jnp.asarray(x), spec)), _bits(_gguf_values(x, qtype)))


@pytest.mark.parametrize("spec, qtype", GGUF, ids=["q8_0", "q4_0"])
def test_gguf_bfloat16_input(spec, qtype):
    x = X_GGUF[5:9].astype(BF16)
    ref = _gguf_values(x.astype(np.float32), qtype).astype(BF16)
    y = _fq(jnp.asarray(x), spec)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(y), _bits(ref))
    np.testing.assert_array_equal(_bits(_dq(_q(jnp.asarray(x), spec))), _bits(ref))


def test_gguf_axis_zero_blocks_a_flax_kernel():
    kernel = X_GGUF[6:10].T.copy()  # (K=64, N=4): blocks run along K
    y = _fq(jnp.asarray(kernel), P.gguf_q4_0(axis=0))
    np.testing.assert_array_equal(_bits(y), _bits(_gguf_values(kernel.T, GT.Q4_0).T))


def test_q4_0_packed_nibbles_are_gguf_nibbles():
    qa = _q(jnp.asarray(X_GGUF[:4]), Q4)
    codes, _ = _gguf_blocks(X_GGUF[:4], GT.Q4_0)
    packed = np.asarray(qa.codes)
    assert packed.dtype == np.uint8 and packed.shape == (4, 32)
    # qjax packs element 2i in the low and 2i + 1 in the high nibble of byte i, as q + 8.
    np.testing.assert_array_equal(packed & 15, codes[:, 0::2] + 8)
    np.testing.assert_array_equal(packed >> 4, codes[:, 1::2] + 8)


def test_gguf_beyond_fp16_scale_range_is_finite():
    x = np.zeros((2, 32), np.float32)
    x[0, 0], x[1, 0] = 3e7, -3e7  # d beyond 65504: llama.cpp stores inf (and 0 * inf = NaN)
    for spec in (Q8, Q4):
        y = np.asarray(_fq(jnp.asarray(x), spec))
        assert np.isfinite(y).all()
        assert np.abs(y[:, 0]).max() == pytest.approx(65504.0 * (127 if spec is Q8 else 8))


def test_gguf_ste_gradient_is_identity():
    g = jax.grad(lambda x: jnp.sum(qjax.fake_quant(x, Q4) * jnp.arange(64.0)))(
        jnp.asarray(X_GGUF[1]))
    np.testing.assert_array_equal(g, np.arange(64.0))


@pytest.mark.parametrize("make", [P.gguf_q8_0, P.gguf_q4_0])
def test_gguf_rejects_axis_not_divisible_by_32(make):
    with pytest.raises(ValueError, match="group size 32 does not divide axis -1 of size 48"):
        qjax.fake_quant(jnp.ones((2, 48)), make())
    with pytest.raises(ValueError, match="rank >= 1"):
        qjax.quantize(jnp.float32(1.0), make())
    with pytest.raises(TypeError, match="axis must be an int"):
        make(axis=1.0)
