"""Tests for qjax.presets: bit-exact against gguf-py's quantizers; torchao values by hand."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import quants as GQ
from gguf.constants import GGMLQuantizationType as GT

import qjax
from qjax import presets as P
from qjax.nn import LayerQuant

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


# ---- torchao: expected values derived by hand or with numpy from torchao's formulas ----------

ACT, W4 = P.torchao_int8_per_token_activation(), P.torchao_int4_weight(4)
F32 = np.float32


def _in(v, dt):
    """A float32 result rounded to ``dt`` (torch computes bf16 ops in float32, then rounds)."""
    return np.asarray(v, F32).astype(dt).astype(F32)


def _torchao_act_ref(x):
    """choose_qparams_affine(ASYMMETRIC, int8, per token) + fake_quantize_affine, in numpy."""
    dt = x.dtype
    lo = np.minimum(x.min(-1, keepdims=True).astype(F32), 0)
    hi = np.maximum(x.max(-1, keepdims=True).astype(F32), 0)
    scale = np.maximum(_in(_in(hi - lo, dt) / F32(255), dt), _in(ml_dtypes.finfo(dt).eps, dt))
    zp = np.clip(_in(-128 - np.round(_in(lo / scale, dt)), dt), -128, 127)
    q = np.clip(np.round(x.astype(F32) * (F32(1) / scale)) + zp, -128, 127)
    # dequantize_affine: (q.to(int32) - zp.to(int32)).to(dtype) * scale, so zeros are +0.
    return ((q.astype(np.int32) - zp.astype(np.int32)).astype(F32) * scale).astype(dt)


def _torchao_weight_ref(w, bits, group):
    """get_group_qparams_symmetric (eps = float32 eps) + fake quantize, in numpy."""
    dt, qmin, qmax = w.dtype, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    g = w.reshape(w.shape[0], -1, group).astype(F32)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    amax = np.maximum(-np.minimum(lo, 0), np.maximum(hi, 0))
    scale = np.maximum(_in(amax / F32((qmax - qmin) / 2), dt), F32(2.0**-23))
    q = np.clip(np.round(g * (F32(1) / scale)), qmin, qmax).astype(np.int32)
    return (q.astype(F32) * scale).astype(dt).reshape(w.shape)


def test_torchao_activation_hand_values_float32_and_bfloat16():
    u = 1.0 / 256
    x = np.array([[-128, 127, 2.5, 3.5, -0.5, -1.5, 0, 64],  # scale 1/256, zero point 0
                  [-2.5, 252.5, 0, 1.5, 1, 2, 3, 4]], F32) * u  # scale 1/256, zero point -126
    want = np.array([[-128, 127, 2, 4, 0, -2, 0, 64], [-2, 252, 0, 2, 1, 2, 3, 4]], F32) * u
    np.testing.assert_array_equal(_fq(jnp.asarray(x), ACT), want)
    qa = _q(jnp.asarray(x), ACT)
    np.testing.assert_array_equal(np.asarray(qa.scale).ravel(), [u, u])
    np.testing.assert_array_equal(np.asarray(qa.zero_point).ravel(), [0, -126])
    # bfloat16: qparams in bfloat16 with its eps 2^-7 as the floor, so the first row's scale is
    # 1/128 and its zero point -128 - round(-0.5 * 128) = -64; 63.5 is a tie (to even, 64).
    y = _fq(jnp.asarray(x[:1].astype(BF16)), ACT)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(y, F32), np.array([[-64, 64, 1, 2, 0, -1, 0, 32]], F32) / 128)
    qa = _q(jnp.asarray(x[:1].astype(BF16)), ACT)
    np.testing.assert_array_equal(np.asarray(qa.zero_point).ravel(), [-64])


@pytest.mark.parametrize("dt", [np.float32, BF16])
def test_torchao_activation_random_matches_formula(dt):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, 64)) * rng.uniform(0.01, 50, (16, 1))
    x = x + rng.uniform(-3, 3, (16, 1))
    x[0] = np.abs(x[0])  # all positive: zero point -128
    x[1] = -np.abs(x[1])
    x[2] = 0.0
    x = x.astype(dt)
    want = _torchao_act_ref(x)
    for y in (_fq(jnp.asarray(x), ACT), _dq(_q(jnp.asarray(x), ACT))):
        np.testing.assert_array_equal(_bits(y), _bits(want))


def test_torchao_int4_weight_hand_values():
    w = np.array([[7.5, -3.75, 0.5, 1.5, -7.5, 2.5, 3.5, -0.5],
                  [0.0, 0.0, 0.0, 0.0, 1.5, 0.25, -0.75, 0.1875]], F32)
    # scale = amax / 7.5: 1 for the first two groups, 2^-23 for the zero group, 0.2 for the last
    s = F32(1.5) / F32(7.5)
    last = np.clip(np.round(w[1, 4:] * (F32(1) / s)), -8, 7) * s
    want = np.array([[7, -4, 0, 2, -8, 2, 4, 0], [0, 0, 0, 0, *last]], F32)
    for dt in (np.float32, BF16):
        y = _fq(jnp.asarray(w.astype(dt)), W4)
        np.testing.assert_array_equal(np.asarray(y, F32), want.astype(dt).astype(F32))
    np.testing.assert_array_equal(np.asarray(_q(jnp.asarray(w), W4).scale).ravel(),
                                  [1, 1, 2.0**-23, s])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dt", [np.float32, BF16])
def test_torchao_intx_weight_random_matches_formula(bits, dt):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((8, 64)) * 0.05).astype(dt)
    spec = P.torchao_intx_weight(bits, 16)
    want = _torchao_weight_ref(w, bits, 16)
    np.testing.assert_array_equal(_bits(_fq(jnp.asarray(w), spec)), _bits(want))
    np.testing.assert_array_equal(_bits(_dq(_q(jnp.asarray(w), spec))), _bits(want))


def test_torchao_bfloat16_qparams_differ_from_float32_ones():
    # amax / 7.5 rounded to bfloat16 is not the float32 quotient: the preset must round it.
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((8, 64)) * 0.05).astype(BF16)
    f32_qparams = _torchao_weight_ref(w.astype(F32), 4, 16).astype(BF16)
    y = _fq(jnp.asarray(w), P.torchao_int4_weight(16))
    assert (_bits(y) != _bits(f32_qparams)).any()
    np.testing.assert_array_equal(_bits(y), _bits(_torchao_weight_ref(w, 4, 16)))


def test_torchao_weight_eps_of_the_input_dtype():
    w = np.full((1, 4), 0.03, F32).astype(BF16)  # amax / 7.5 = 0.004 < 2^-7 = bfloat16's eps
    y = _fq(jnp.asarray(w), P.torchao_int4_weight(4, eps=None))
    np.testing.assert_array_equal(np.asarray(y, F32), np.full((1, 4), 4 * 2.0**-7, F32))
    y = _fq(jnp.asarray(w), P.torchao_int4_weight(4))
    np.testing.assert_array_equal(_bits(y), _bits(_torchao_weight_ref(w, 4, 4)))


def test_torchao_backward_masks_rounded_codes_outside_the_grid():
    # scale 1: 7.5 rounds to 8 > 7 (masked); 7.4 rounds to 7 (kept, though above 7); -7.5 -> -8.
    w = jnp.asarray([[-7.5, 7.5, 7.4, 0.3]])
    g = jax.grad(lambda w: jnp.sum(qjax.fake_quant(w, W4)))(w)
    np.testing.assert_array_equal(g, [[1, 0, 1, 1]])
    x = jnp.asarray([[-2.5, 252.5, 0, 1.5, 1, 2, 3, 4]]) / 256
    g = jax.grad(lambda x: jnp.sum(qjax.fake_quant(x, ACT) * 3.0))(x)
    np.testing.assert_array_equal(g, np.full((1, 8), 3.0))


def test_torchao_preset_argument_errors():
    with pytest.raises(ValueError, match="bits must be in"):
        P.torchao_intx_weight(1, 32)
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        P.torchao_int4_weight(1)
    with pytest.raises(ValueError, match="group size 32 does not divide"):
        qjax.fake_quant(jnp.ones((2, 48)), P.torchao_int4_weight(32))


# ---- Flax layers and quantize_model --------------------------------------------------------

def test_presets_in_qdense_and_quantize_model():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 64)), jnp.float32)
    layer = qjax.nn.linen.QDense(8, weight=P.torchao_int4_weight(32, axis=0), activation=ACT)
    v = layer.init(jax.random.key(0), x)
    p = v["params"]
    want = qjax.fake_quant(x, ACT) @ qjax.fake_quant(p["kernel"], P.torchao_int4_weight(32, axis=0))
    np.testing.assert_allclose(layer.apply(v, x), want + p["bias"], rtol=1e-6, atol=1e-6)

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="out")(nn.relu(nn.Dense(32, name="up")(x)))

    qm = qjax.nn.quantize_model(MLP(), {"up|out": LayerQuant(weight=P.gguf_q4_0(axis=0))})
    v = qm.init(jax.random.key(1), x)
    p = v["params"]
    kq = {k: _gguf_values(np.asarray(p[k]["kernel"]).T, GT.Q4_0).T for k in ("up", "out")}
    h = jax.nn.relu(x @ kq["up"] + p["up"]["bias"])
    np.testing.assert_allclose(qm.apply(v, x), h @ kq["out"] + p["out"]["bias"], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("spec", [Q8, Q4, ACT, W4], ids=["q8_0", "q4_0", "act", "w4"])
def test_presets_under_vmap_match_the_batch(spec):
    x = jnp.asarray(X_GGUF[6:18].reshape(3, 4, 64))
    y = jax.jit(jax.vmap(lambda r: qjax.fake_quant(r, spec)))(x)
    np.testing.assert_array_equal(_bits(y), _bits(_fq(x, spec)))


@pytest.mark.parametrize("spec, qtype, top", [(Q8, GT.Q8_0, 8.3e6), (Q4, GT.Q4_0, 5.2e5)],
                         ids=["q8_0", "q4_0"])
def test_gguf_scales_at_the_ends_of_fp16(spec, qtype, top):
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, (6, 32)).astype(np.float32)
    x[:, 0] = [top, -top, 1e-4, 1e-6, 3e-9, 2.0**-100]  # fp16 scale near 65504 ... subnormal, 0
    x = (x * np.abs(x[:, :1])).astype(np.float32)
    x[:, 0] = [top, -top, 1e-4, 1e-6, 3e-9, 2.0**-100]
    codes, d_bits = _gguf_blocks(x, qtype)
    qa = _q(jnp.asarray(x), spec)
    np.testing.assert_array_equal(np.asarray(qa.codes_float32()).astype(np.int32), codes)
    np.testing.assert_array_equal(_bits(np.asarray(qa.scale).astype(np.float16)).ravel(),
                                  d_bits.ravel())
    np.testing.assert_array_equal(_bits(_dq(qa)), _bits(_gguf_values(x, qtype)))
