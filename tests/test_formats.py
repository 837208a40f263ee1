"""Tests for qjax.formats: code ranges, midrise levels and mini-float rounding."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qjax
from qjax._src import formats as F
from qjax._src.formats import format_from_name


@pytest.mark.parametrize("bits", range(1, 9))
def test_int_ranges(bits):
    s = qjax.IntFormat(bits)
    u = qjax.IntFormat(bits, signed=False)
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (u.qmin, u.qmax) == (0, 2**bits - 1)


def test_int_encode_half_to_even_and_saturate():
    f = qjax.IntFormat(4)
    v = jnp.array([0.5, 1.5, 2.5, -0.5, -2.5, 6.6, 7.5, -8.4, -100.0, 100.0])
    np.testing.assert_array_equal(f.encode(v), [0, 2, 2, 0, -2, 7, 7, -8, -8, 7])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_midrise_levels(bits):
    f = qjax.Midrise(bits)
    v = jnp.linspace(-(2**bits), 2**bits, 4001)
    levels = np.unique(np.asarray(f.decode(f.encode(v))))
    expected = np.arange(-(2**bits - 1), 2**bits, 2) / 2
    np.testing.assert_array_equal(levels, expected)
    assert 0.0 not in levels


def test_midrise_matches_design_formula():
    # xq = round(xc/step + 1/2)*step - step/2 with xc = clip(x, -c, c), step = 2c/(2^b - 1).
    rng = np.random.default_rng(0)
    for bits in (1, 2, 3, 4):
        c = 1.7
        step = 2 * c / (2**bits - 1)
        x = rng.normal(size=1000).astype(np.float32) * 2
        ref = np.round(np.clip(x, -c, c) / step + 0.5) * step - step / 2
        f = qjax.Midrise(bits)
        got = np.asarray(f.decode(f.encode(jnp.asarray(x) / np.float32(step)))) * np.float32(step)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_midrise_zero_goes_to_negative_half_step():
    f = qjax.Midrise(2)
    assert float(f.decode(f.encode(jnp.float32(0.0)))) == -0.5


def test_ternary():
    f = qjax.Ternary()
    np.testing.assert_array_equal(f.encode(jnp.array([-3.0, -0.6, -0.5, 0.4, 0.5, 1.5, 9.0])),
                                  [-1, -1, 0, 0, 0, 1, 1])


@pytest.mark.parametrize(
    "name,dtype,maxval",
    [("e4m3", ml_dtypes.float8_e4m3fn, 448.0), ("e5m2", ml_dtypes.float8_e5m2, 57344.0),
     ("e2m1", ml_dtypes.float4_e2m1fn, 6.0)],
)
def test_float_encode_matches_ml_dtypes_rounding(name, dtype, maxval):
    fmt = qjax.FloatFormat(name)
    assert fmt.max_level == maxval
    rng = np.random.default_rng(1)
    x = np.concatenate([
        rng.normal(size=4000) * maxval / 4,
        rng.normal(size=2000) * 2.0 ** rng.integers(-20, 0, size=2000),  # subnormals
        np.asarray(fmt.levels()) * 1.0,  # exact levels
    ]).astype(np.float32)
    # exact ties between neighbouring levels
    lv = fmt.levels()
    ties = ((lv[1:] + lv[:-1]) / 2).astype(np.float32)
    x = np.concatenate([x, ties, -ties])
    x = x[np.abs(x) <= maxval]
    ref = x.astype(dtype).astype(np.float32)  # ml_dtypes: round to nearest even
    got = np.asarray(fmt.encode(jnp.asarray(x)))
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m1"])
def test_float_saturates(name):
    fmt = qjax.FloatFormat(name)
    m = fmt.max_level
    got = np.asarray(fmt.encode(jnp.array([m * 1.01, m * 100, -m * 3, 1e38, -1e38], jnp.float32)))
    np.testing.assert_array_equal(got, [m, m, -m, m, -m])


def test_float_levels():
    np.testing.assert_array_equal(qjax.FloatFormat("fp4").levels(), [0, 0.5, 1, 1.5, 2, 3, 4, 6])
    lv = qjax.FloatFormat("e4m3").levels()
    assert lv[-1] == 448 and lv[1] == 2.0**-9 and len(lv) == 127


@pytest.mark.parametrize("name,expected", [
    ("int4", qjax.IntFormat(4)), ("uint8", qjax.IntFormat(8, signed=False)),
    ("midrise2", qjax.Midrise(2)), ("ternary", qjax.Ternary()), ("fp8", qjax.FloatFormat("e4m3")),
    ("FP4", qjax.FloatFormat("e2m1")), ("float8_e5m2", qjax.FloatFormat("e5m2")),
])
def test_format_from_name(name, expected):
    assert format_from_name(name) == expected


@pytest.mark.parametrize("bad", [0, 9, -1, 16])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        qjax.IntFormat(bad)
    with pytest.raises(ValueError, match="bits"):
        qjax.Midrise(bad)


def test_bad_types_and_names():
    with pytest.raises(TypeError, match="bits"):
        qjax.IntFormat(4.0)
    with pytest.raises(TypeError, match="bits"):
        qjax.IntFormat(True)
    with pytest.raises(ValueError, match="unknown float format"):
        qjax.FloatFormat("e3m4")
    with pytest.raises(ValueError, match="unknown format 'int9'"):
        format_from_name("int9")
    with pytest.raises(TypeError, match="format"):
        F.as_format(4)


def test_formats_are_hashable_static():
    assert hash(qjax.IntFormat(4)) == hash(qjax.IntFormat(4))
    assert len({qjax.Midrise(2), qjax.Midrise(2), qjax.Ternary(), qjax.Ternary()}) == 2


def test_int_encode_half_away_and_half_up():
    f = qjax.IntFormat(4)
    v = jnp.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 7.5, -8.6])
    np.testing.assert_array_equal(f.encode(v, rounding="half_away"), [1, 2, 3, -1, -3, 0, 7, -8])
    # half_up adds 0.5 - qmin = 8.5 in float32 first (llama.cpp), so 0.5 - 2^-24 rounds up too.
    w = jnp.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.5 - 2.0**-24, 0.5 - 2.0**-19, -8.6])
    np.testing.assert_array_equal(f.encode(w, rounding="half_up"), [1, 2, 3, 0, -2, 1, 0, -8])
    u = qjax.IntFormat(4, signed=False)  # qmin = 0: plain floor(v + 0.5), zero point added after
    np.testing.assert_array_equal(u.encode(jnp.array([0.5, 1.5, -0.5]), jnp.float32(2.0),
                                           rounding="half_up"), [3, 4, 2])
    with pytest.raises(ValueError, match="rounding must be one of"):
        f.encode(v, rounding="up")


def test_midrise_encode_half_up_is_floor():
    f = qjax.Midrise(2)  # codes -2..1, levels (q + 1/2) * step
    v = jnp.array([-2.5, -2.0, -1.5, -1e-30, 0.0, 0.5, 1.0, 1.999, 2.0, 100.0])
    np.testing.assert_array_equal(f.encode(v, rounding="half_up"),
                                  [-2, -2, -2, -1, 0, 0, 1, 1, 1, 1])
    # Nearest rounds an edge half to even: 0 -> round(0.5) - 1 = -1, 2 -> round(2.5) - 1 = 1.
    np.testing.assert_array_equal(f.encode(v), [-2, -2, -2, -1, -1, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="rounding must be one of"):
        f.encode(v, rounding="half_away")


def test_format_arguments_are_checked():
    with pytest.raises(TypeError, match="signed must be a bool"):
        qjax.IntFormat(4, signed="no")
    assert qjax.IntFormat(np.int64(4), np.bool_(False)) == qjax.IntFormat(4, signed=False)


def test_signed_one_bit_int_has_no_positive_level():
    with pytest.raises(ValueError, match=r"int1 has no positive level.*'midrise1'.*'uint1'"):
        F.check_positive_level(qjax.IntFormat(1), "LSQ")
    for ok in (qjax.IntFormat(1, signed=False), qjax.Midrise(1), qjax.Ternary(), qjax.IntFormat(2)):
        F.check_positive_level(ok, "LSQ")


def test_post_format_example_names_and_storage():
    f = qjax.POST(4)  # levels 0, +-2^(-k/2), k = 0..6; codes -7..7
    assert F.format_from_name("post4") == f and f.name == "post4" and f.num_levels == 15
    assert (f.qmin, f.qmax, f.max_level, f.uniform) == (-7, 7, 1.0, False)
    x = jnp.array([0.3, -1.2, 2.5, -0.05, 0.9, -3.1, 1.7, 0.02])
    spec = qjax.QuantSpec(f, qjax.PerTensor(), "absmax", "ste")
    qa = qjax.quantize(x, spec)  # step = max|x| = 3.1
    codes = np.asarray(qa.codes_float32())
    np.testing.assert_array_equal(f.decode(jnp.asarray(codes)) * np.float32(3.1),
                                  np.asarray(qjax.dequantize(qa)))
    # |x| / 3.1 = 0.097 -> 0.125 (above the midpoint 0.0625), 0.387 -> 2^-1.5 = 0.354,
    # 0.806 -> 2^-0.5 = 0.707 (below 0.854), 0.290 -> 0.25 (below 0.302), 0.016 -> 0
    np.testing.assert_array_equal(codes, [1, -4, 6, 0, 3, -7, 5, 0])
    np.testing.assert_array_equal(np.asarray(qjax.fake_quant(x, spec)),
                                  np.asarray(qjax.dequantize(qa)))
    assert qa.packed and qa.codes.dtype == np.uint8  # 4-bit codes, two per byte
    with pytest.raises(ValueError, match="bits"):
        qjax.POST(1)
    for bad, message in ((dict(rounding="stochastic"), "stochastic rounding is supported for"),
                         (dict(estimator="pact"), "PACT needs a uniform grid"),
                         (dict(estimator="trust"), "Trust needs a uniform grid")):
        with pytest.raises(ValueError, match=message):
            qjax.QuantSpec("post4", **bad)
    assert qjax.QuantSpec("post4", estimator="lsq").format == f
