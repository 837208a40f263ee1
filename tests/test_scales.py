"""Tests for qjax.scales: absmax, MSE search, percentile, zero blocks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax._src import scales as S


def test_absmax_symmetric_values():
    x = jnp.array([[1.0, -3.0, 2.0], [0.5, 0.25, -0.1]])
    s, z = S.AbsMax().compute(x, (1,), qjax.IntFormat(8))
    np.testing.assert_allclose(s[:, 0], [3 / 127, 0.5 / 127], rtol=1e-7)
    assert z is None
    s, _ = S.AbsMax().compute(x, (1,), qjax.Midrise(2))
    np.testing.assert_allclose(s[:, 0], [3 / 1.5, 0.5 / 1.5], rtol=1e-7)
    s, _ = S.AbsMax().compute(x, (1,), qjax.FloatFormat("e4m3"))
    np.testing.assert_allclose(s[:, 0], [3 / 448, 0.5 / 448], rtol=1e-7)


def test_absmax_asymmetric_zero_point():
    x = jnp.array([[0.0, 1.0, 3.0], [-1.0, 0.5, 2.0]])
    fmt = qjax.IntFormat(8, signed=False)
    s, z = S.AbsMax(symmetric=False).compute(x, (1,), fmt)
    np.testing.assert_allclose(s[:, 0], [3 / 255, 3 / 255], rtol=1e-7)
    np.testing.assert_array_equal(z[:, 0], [0, round(1 / (3 / 255))])
    # 0 is exactly representable: x = 0 decodes to 0.
    y = qjax.estimators.ste(jnp.zeros_like(x), s, fmt, z)
    np.testing.assert_array_equal(y, 0.0)


def test_absmax_symmetric_needs_a_positive_level():
    with pytest.raises(ValueError, match="symmetric absmax"):
        S.AbsMax().compute(jnp.ones((2, 2)), (1,), qjax.IntFormat(1))
    with pytest.raises(ValueError, match="asymmetric absmax needs an IntFormat"):
        S.AbsMax(symmetric=False).compute(jnp.ones((2, 2)), (1,), qjax.Midrise(2))


@pytest.mark.parametrize("rule", [S.AbsMax(), S.AbsMax(False), S.RmsGaussian(), S.MseSearch(8),
                                  S.Percentile(99.0)])
def test_zero_and_tiny_blocks_give_finite_positive_scales(rule):
    fmt = qjax.IntFormat(4) if not isinstance(rule, S.RmsGaussian) else qjax.Midrise(4)
    x = jnp.array([[0.0, 0.0, 0.0, 0.0], [1e-42, -1e-41, 0.0, 1e-40], [1.0, 2.0, 3.0, 4.0]])
    s, z = rule.compute(x, (1,), fmt)
    assert np.all(np.isfinite(s)) and np.all(np.asarray(s) > 0)


def test_mse_search_never_worse_than_absmax():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_t(3, size=(16, 256)).astype(np.float32))
    fmt = qjax.IntFormat(3)

    def err(s):
        return np.asarray(jnp.sum((fmt.decode(fmt.encode(x / s)) * s - x) ** 2, axis=1))

    s_abs, _ = S.AbsMax().compute(x, (1,), fmt)
    s_mse, _ = S.MseSearch(32).compute(x, (1,), fmt)
    assert np.all(err(s_mse) <= err(s_abs))
    assert np.mean(err(s_mse)) < 0.8 * np.mean(err(s_abs))  # heavy tails: clipping pays


def test_percentile():
    x = jnp.arange(1.0, 101.0)[None]
    s, _ = S.Percentile(50.0).compute(x, (1,), qjax.IntFormat(8))
    np.testing.assert_allclose(s, [[50.5 / 127]], rtol=1e-6)
    with pytest.raises(ValueError, match="percentile"):
        S.Percentile(0.0)


def test_lsq_init():
    v = jnp.array([[1.0, -3.0], [0.5, 0.5]])
    np.testing.assert_allclose(S.lsq_init(v, 7, (1,))[:, 0], [2 * 2 / math.sqrt(7),
                                                                2 * 0.5 / math.sqrt(7)], rtol=1e-6)
    assert float(S.lsq_init(jnp.zeros(4), 7)) > 0


def test_scale_rule_names():
    assert S.as_scale_rule("absmax_asymmetric") == S.AbsMax(symmetric=False)
    assert S.as_scale_rule("mse:8:0.6") == S.MseSearch(8, 0.6)
    assert S.as_scale_rule("mse:8") == S.MseSearch(8)
    assert S.as_scale_rule("rms_gaussian:3") == S.RmsGaussian(clip=3.0)
    assert S.as_scale_rule("percentile:99.5") == S.Percentile(99.5)
    assert S.as_scale_rule("mean_abs") == S.MeanAbs(2.0)
    assert S.as_scale_rule("mean_abs:3") == S.MeanAbs(3.0)
    with pytest.raises(ValueError, match="unknown scale rule 'max'"):
        S.as_scale_rule("max")
    with pytest.raises(ValueError, match=r"'absmax' takes at most 0 arguments"):
        S.as_scale_rule("absmax:1")
    with pytest.raises(ValueError, match=r"at most 2 arguments \(num_candidates, min_ratio\)"):
        S.as_scale_rule("mse:8:0.6:1")
    with pytest.raises(ValueError, match="num_candidates: int"):
        S.as_scale_rule("mse:8.5")
    with pytest.raises(ValueError, match="min_ratio must be in"):
        S.as_scale_rule("mse:8:0")
    with pytest.raises(TypeError, match="rule object or a name"):
        S.as_scale_rule(3)


def test_exact_divide_is_correctly_rounded():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(20000) * np.exp(rng.uniform(-20, 20, 20000))).astype(np.float32)
    for c in (127.0, 7.5, 255.0):
        np.testing.assert_array_equal(S.exact_divide(jnp.asarray(a), c), a / np.float32(c))
    # under vmap the divisor must be batched too, or XLA multiplies by a broadcast reciprocal
    rows = jax.jit(jax.vmap(lambda r: S.exact_divide(r, 127.0)))(a.reshape(100, 200))
    np.testing.assert_array_equal(rows, (a / np.float32(127)).reshape(100, 200))


def test_store_scale_rounds_and_saturates():
    s = jnp.array([1.0 + 2.0**-12, 1e5, -1e9, 3e-8, -0.0, 1.0 + 2.0**-9])
    got = np.asarray(S.store_scale(s, "float16"))
    # 3e-8 rounds to the smallest fp16 subnormal 2^-24; -0.0 keeps its sign.
    np.testing.assert_array_equal(got, [1.0, 65504.0, -65504.0, 2.0**-24, -0.0, 1.0 + 2.0**-9])
    assert np.signbit(got[4])
    assert S.store_scale(s, "bfloat16")[0] == 1.0 and S.store_scale(s, None) is s
    with pytest.raises(ValueError, match="scale_dtype must be None or one of"):
        S.store_scale(s, "float8")


def test_ggml_max_scales():
    x = jnp.array([[1.0, -4.0, 4.0, 2.0], [0.0, 0.0, -0.0, 0.0], [3.0, -1.0, 0.0, 0.0]])
    d, z = S.GgmlMax().compute(x, (1,), qjax.IntFormat(8))
    assert z is None
    np.testing.assert_array_equal(d[:, 0], [np.float32(4) / np.float32(127), 2.0**-126,
                                             np.float32(3) / np.float32(127)])
    d, _ = S.GgmlMax(signed=True).compute(x, (1,), qjax.IntFormat(4))
    # The first element of largest |x| maps to -8: -4 gives +0.5; a zero block keeps -0.0's sign.
    np.testing.assert_array_equal(d[:, 0], [0.5, -(2.0**-126), -0.375])
    assert np.signbit(np.asarray(d)[1, 0])
    with pytest.raises(ValueError, match="GgmlMax needs a signed IntFormat"):
        S.GgmlMax().compute(x, (1,), qjax.IntFormat(8, signed=False))


def test_torchao_affine_rule():
    x = jnp.array([[-1.0, 0.5, 2.0, 0.25], [0.0, 0.0, 0.0, 0.0]])
    s, z = S.TorchAOAffine().compute(x, (1,), qjax.IntFormat(4))
    np.testing.assert_array_equal(s[:, 0], [np.float32(2) / np.float32(7.5), 2.0**-23])
    assert z is None
    s, z = S.TorchAOAffine(symmetric=False).compute(x, (1,), qjax.IntFormat(8))
    np.testing.assert_array_equal(s[:, 0], [np.float32(3) / np.float32(255), 2.0**-23])
    np.testing.assert_array_equal(z[:, 0], [-128 - np.round(np.float32(-1) / s[0, 0]), -128])
    # bfloat16 input: qparams in bfloat16 and its epsilon 2^-7 as the floor.
    s, _ = S.TorchAOAffine().compute(x, (1,), qjax.IntFormat(4), jnp.bfloat16)
    np.testing.assert_array_equal(s[:, 0], [float(jnp.bfloat16(2.0 / 7.5)), 2.0**-7])
    with pytest.raises(ValueError, match="symmetric TorchAOAffine needs a signed IntFormat"):
        S.TorchAOAffine().compute(x, (1,), qjax.IntFormat(4, signed=False))
    with pytest.raises(ValueError, match="eps must be positive"):
        S.TorchAOAffine(eps=0.0)


@pytest.mark.parametrize("shape,axes", [((7, 5), (0,)), ((4, 129), (1,)), ((3, 6, 10), (0, 2)),
                                        ((1, 8), (0, 1))])
def test_ordered_sum_equals_sum(shape, axes):
    x = jax.random.normal(jax.random.key(11), shape)
    got = S.ordered_sum(x, axes)
    assert got.shape == tuple(1 if i in axes else d for i, d in enumerate(shape))
    np.testing.assert_allclose(got, np.sum(np.asarray(x, np.float64), axis=axes, keepdims=True),
                               rtol=1e-5, atol=1e-5)
    # Exact on integers: pairwise halving with a zero pad for odd lengths.
    ints = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    np.testing.assert_array_equal(S.ordered_sum(ints, axes),
                                  np.sum(np.asarray(ints), axis=axes, keepdims=True))


def test_rms_gaussian_scale_is_identical_under_jit_and_eager():
    # A converted model stores these scales; the jitted QAT forward must compute the same bits.
    x = jax.random.normal(jax.random.key(12), (256, 96)) * 0.02
    fmt = qjax.Midrise(4)
    for axes in ((0,), (1,), (0, 1)):
        eager = S.RmsGaussian().compute(x, axes, fmt)[0]
        jitted = jax.jit(lambda x, axes=axes: S.RmsGaussian().compute(x, axes, fmt)[0])(x)
        np.testing.assert_array_equal(eager, jitted)


def test_clamp_scale_bounds_overflowing_scales_and_keeps_ordinary_ones():
    s = jnp.array([0.0, 1e-39, 2.0**-126, 0.37, 1e30, 2.0**126, 3e38, jnp.inf])
    np.testing.assert_array_equal(
        S.clamp_scale(s), [2.0**-126, 2.0**-126, 2.0**-126, np.float32(0.37), np.float32(1e30),
                           2.0**126, 2.0**126, 2.0**126])
    # midrise1's max level is 1/2: max|x| / (1/2) overflowed to inf (values -inf) before.
    s, _ = S.AbsMax().compute(jnp.array([[2e38, -1.0]]), (1,), qjax.Midrise(1))
    assert float(s[0, 0]) == 2.0**126
    # uint1 asymmetric: (max - min) / 1 overflowed (NaN values) before.
    s, z = S.AbsMax(False).compute(jnp.array([[2e38, -2e38]]), (1,), qjax.IntFormat(1, False))
    assert float(s[0, 0]) == 2.0**126 and np.isfinite(np.asarray(z)).all()
    s, _ = S.RmsGaussian(clip=1e38).compute(jnp.full((1, 4), 1e16), (1,), qjax.Midrise(2))
    assert float(s[0, 0]) == 2.0**126


@pytest.mark.parametrize("dtype,big", [(jnp.float32, 2e38), (jnp.bfloat16, 2e38),
                                       (jnp.float16, 6e4)])
def test_torchao_affine_range_wider_than_the_dtype_gives_a_finite_scale(dtype, big):
    # hi - lo overflows the input dtype; half of it divided by half of (qmax - qmin) is the same
    # quotient, and the usual formula is kept wherever it does not overflow.
    x = jnp.array([[big, -big], [6.0, -1.5]], dtype).astype(jnp.float32)
    s, z = S.TorchAOAffine(symmetric=False).compute(x, (1,), qjax.IntFormat(8), dtype)
    hi = np.float32(x[0, 0])
    expect = float(jnp.asarray(np.float32(hi) / np.float32(127.5), dtype))
    assert np.isfinite(np.asarray(s)).all() and np.isfinite(np.asarray(z)).all()
    assert float(s[0, 0]) == expect
    ordinary = float(jnp.asarray(np.float32(7.5) / np.float32(255), dtype))
    assert float(s[1, 0]) == ordinary


def test_rule_hyperparameters_validated():
    for bad in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="RmsGaussian clip must be positive and finite"):
            S.RmsGaussian(clip=bad)
    for bad in ("3", True):
        with pytest.raises(TypeError, match="RmsGaussian clip must be a number"):
            S.RmsGaussian(clip=bad)
    with pytest.raises(ValueError, match="eps must be positive and finite"):
        S.TorchAOAffine(eps=float("inf"))
    for bad in (float("nan"), float("inf"), 0):
        with pytest.raises(ValueError, match="qmax must be positive and finite"):
            S.lsq_init(jnp.ones(4), bad)
    for bad in ("7", True):
        with pytest.raises(TypeError, match="qmax must be a number"):
            S.lsq_init(jnp.ones(4), bad)
    with pytest.raises(TypeError, match="min_ratio must be a number"):
        S.MseSearch(min_ratio="0.5")
    with pytest.raises(TypeError, match="num_candidates must be an int"):
        S.MseSearch(num_candidates=True)
    assert S.MseSearch(np.int64(8)) == S.MseSearch(8)
    assert type(S.MseSearch(np.int64(8)).num_candidates) is int
    for bad in ("x", True):
        with pytest.raises(TypeError, match="percentile q must be a number"):
            S.Percentile(q=bad)
    for rule, field in ((S.AbsMax, "symmetric"), (S.TorchAOAffine, "symmetric"),
                        (S.GgmlMax, "signed")):
        with pytest.raises(TypeError, match=f"{field} must be a bool"):
            rule(**{field: "no"})
    with pytest.raises(TypeError, match="num_levels must be an int"):
        S.gaussian_mse(2.5, 1.0)
    with pytest.raises(ValueError, match="num_levels must be >= 2"):
        S.optimal_gaussian_clip(1)
    with pytest.raises(ValueError, match="clip must be finite"):
        S.gaussian_mse(3, float("nan"))
    assert S.gaussian_clip("midrise4") == S.gaussian_clip(qjax.Midrise(4))


@pytest.mark.parametrize("rule", [S.RmsGaussian(), S.RmsGaussian(clip=2.0), S.Percentile()])
def test_rules_refuse_the_signed_one_bit_grid(rule):
    # int1's max level is 0: these divided by it (ZeroDivisionError) before.
    with pytest.raises(ValueError, match=r"int1 has no positive level.*'midrise1'"):
        rule.compute(jnp.ones((2, 4)), (1,), qjax.IntFormat(1))


def test_mean_abs_values_jit_eager_and_zero_blocks():
    x = jnp.array([[1.0, -2.0, 3.0, -6.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.5, -0.5, 0.5]])
    # mean|x| per row: 3, 0, 0.5; step = 2 mean / 2^(b-1).
    for fmt, half in ((qjax.Midrise(2), 2), (qjax.IntFormat(4), 8), (qjax.Midrise(1), 1)):
        step = S.MeanAbs().step(x, (1,), fmt)
        np.testing.assert_array_equal(np.asarray(step).ravel(), [6 / half, 0.0, 1 / half])
        s, z = S.MeanAbs().compute(x, (1,), fmt)
        assert z is None and float(s[1, 0]) == float(np.finfo(np.float32).tiny)
    s3, _ = S.MeanAbs(3.0).compute(x, (1,), qjax.Midrise(2))
    assert float(s3[0, 0]) == 4.5
    big = jax.random.normal(jax.random.key(1), (16, 1000)) * 1e37  # the plain sum overflows
    eager, _ = S.MeanAbs().compute(big, (1,), qjax.Midrise(4))
    jitted, _ = jax.jit(lambda v: S.MeanAbs().compute(v, (1,), qjax.Midrise(4)))(big)
    assert np.isfinite(np.asarray(eager)).all()
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


@pytest.mark.parametrize("fmt", ["ternary", "uint4", "e4m3"])
def test_mean_abs_needs_a_signed_uniform_grid(fmt):
    with pytest.raises(ValueError, match="mean_abs needs a midrise or signed integer grid"):
        S.MeanAbs().compute(jnp.ones((2, 4)), (1,), qjax.QuantSpec(fmt).format)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="MeanAbs multiple must be positive and finite"):
            S.MeanAbs(bad)
