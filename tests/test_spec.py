"""QuantSpec and the estimator specs (qjax.spec): normalization, hashing, validation."""

import jax
import jax.numpy as jnp
import pytest

import qjax
from qjax._src import formats as F
from qjax._src import granularity as G
from qjax._src import scales as S
from qjax._src.spec import (
    LSQ,
    PACT,
    STE,
    ClippedSTE,
    QuantSpec,
    Trust,
    as_estimator,
    check_rounding,
    check_spec,
)


def test_names_normalize_to_the_objects_they_name():
    by_name = QuantSpec("int4", "row", "absmax", "clipped_ste")
    by_object = QuantSpec(F.IntFormat(4), G.PerRow(-1), S.AbsMax(), ClippedSTE())
    assert by_name == by_object and hash(by_name) == hash(by_object)
    assert isinstance(by_name.format, F.IntFormat) and by_name.format.bits == 4
    assert QuantSpec("int8").granularity == G.PerTensor()
    assert isinstance(QuantSpec("int8").estimator, STE)
    assert {as_estimator(n).__class__ for n in ("ste", "clipped_ste", "trust", "lsq", "pact")} \
        == {STE, ClippedSTE, Trust, LSQ, PACT}


def test_spec_is_a_static_jit_argument_and_replace_revalidates():
    spec = QuantSpec("int8", "row")
    f = jax.jit(qjax.fake_quant, static_argnums=1)
    x = jnp.linspace(-1, 1, 32).reshape(2, 16)
    assert f(x, spec).shape == (2, 16)
    assert spec.replace(rounding="half_away").rounding == "half_away"
    with pytest.raises(ValueError, match="rounding must be one of"):
        spec.replace(rounding="up")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(format="int9"), ValueError, "int9|bits"),
    (dict(format="int1"), ValueError, "no positive level|int1"),
    (dict(format="int4", rounding="up"), ValueError, "rounding must be one of"),
    (dict(format="fp8_e4m3", rounding="stochastic"), ValueError, "uniform formats only"),
    (dict(format="midrise4", rounding="half_away"), ValueError, "needs an IntFormat"),
    (dict(format="int4", scale_dtype="float64"), ValueError, "scale_dtype must be None or one"),
    (dict(format="int4", estimator="lsq", scale_dtype="float16"), ValueError,
     "nearest rounding and float32 scales only"),
    (dict(format="int4", hadamard_block=48), ValueError,
     "hadamard_block must be a positive power of two"),
    (dict(format="int4", hadamard_block=64, hadamard_method="fft"), ValueError,
     "hadamard_method must be one of"),
    (dict(format="int4", hadamard_block=64, hadamard_mode="quarter"), ValueError,
     "hadamard_mode must be one of"),
    (dict(format="fp8_e4m3", estimator="trust"), ValueError, "needs a uniform grid"),
    (dict(format="int4", estimator="lsq", scale_rule=S.AbsMax(symmetric=False)), ValueError,
     "symmetric"),
    (dict(format="int4", estimator="magic"), ValueError, "unknown estimator"),
    (dict(format="int4", hadamard_axis=1.5), TypeError, "hadamard_axis"),
], ids=["bits", "int1", "rounding", "stochastic_fp8", "half_away_midrise", "scale_dtype",
        "lsq_fp16_scale", "hadamard_block", "hadamard_method", "hadamard_mode", "trust_fp8",
        "lsq_asymmetric", "estimator_name", "hadamard_axis"])
def test_bad_specs_name_the_field(kwargs, error, message):
    with pytest.raises(error, match=message):
        QuantSpec(**kwargs)


@pytest.mark.parametrize("make, message", [
    (lambda: Trust(multiplier=0.0), "trust multiplier"),
    (lambda: Trust(multiplier=float("nan")), "trust multiplier"),
    (lambda: Trust(clip_ratio=-1.0), "trust clip_ratio"),
    (lambda: LSQ(grad_scale_n=0), "grad_scale_n"),
    (lambda: ClippedSTE(on_codes="yes"), "on_codes"),
], ids=["trust_zero", "trust_nan", "trust_clip", "lsq_n", "on_codes"])
def test_bad_estimator_fields(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_check_spec_and_check_rounding():
    spec = QuantSpec("int8")
    assert check_spec(spec) is spec and check_spec(None, optional=True) is None
    with pytest.raises(TypeError, match="weight must be a qjax.QuantSpec, got str"):
        check_spec("int8", "weight")
    with pytest.raises(TypeError, match="a qjax.QuantSpec or None"):
        check_spec(3, optional=True)
    assert check_rounding("half_up", F.IntFormat(8)) == "half_up"
    with pytest.raises(ValueError, match="rounding must be one of"):
        check_rounding(None, F.IntFormat(8))
