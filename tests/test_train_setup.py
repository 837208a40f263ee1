"""What a TrainConfig builds (qjax.train_setup), checked without training."""

import pytest
from train_configs import train_config

from qjax._src import train_setup as S
from qjax.config import TrainConfig
from qjax.nn import Method


def test_validate_accepts_the_default_and_auto_blocks():
    S.validate(TrainConfig())
    S.validate(train_config(d_model=96, hadamard_block=None))  # auto block: 32 divides 96


@pytest.mark.parametrize("fields, message", [
    (dict(d_model=96),
     "layer 'attention and output projections': Hadamard block hadamard_block=128"),
    (dict(d_model=96, n_heads=5), "must split into n_heads"),
    (dict(estimator="foo"), "estimator of quest must be one of"),
    (dict(grid="foo"), r"grid must be one of \('auto', 'midrise', 'int', 'post'\)"),
    (dict(grid="post"), "grid='post' .* is for methods lsq and ste"),
    (dict(schedule="wsd_fused", qat_fraction="optimal", weight_bits=None, act_bits=4),
     "needs weight_bits"),
], ids=["block", "heads", "estimator", "grid", "post_on_quest", "optimal_without_bits"])
def test_validate_names_the_mistake(fields, message):
    with pytest.raises(ValueError, match=message):
        S.validate(train_config(**fields)) if "schedule" not in fields else train_config(**fields)


def test_method_from_config():
    assert S.method_from_config(train_config(method=None)) is None
    m = S.method_from_config(train_config(method="lsq", weight_bits=2, act_bits=8))
    assert isinstance(m, Method) and (m.weight_bits, m.act_bits) == (2, 8)
    # every QuantConfig field reaches the Method under its own name
    m = S.method_from_config(train_config(method="quest", trust=1.5, clip_ratio=1.3,
                                          hadamard_mode="full", hadamard_block=32,
                                          scale_rule="mse:8:0.6", grid="int", estimator="ste"))
    assert (m.trust, m.clip_ratio, m.hadamard_mode, m.hadamard_block, m.grid, m.estimator) == (
        1.5, 1.3, "full", 32, "int", "ste")


def test_method_from_config_passes_the_backward():
    config = train_config(method="ste", integer_forward=True, backward="int8", d_model=64,
                          hadamard_block=64)
    assert S.method_from_config(config).backward == "int8"
    S.validate(config)
    assert S.method_from_config(TrainConfig()).backward == "float"
    # backward="int8" needs the integer forward, which learned scales (lsq, pact) do not have:
    # refused as integer_forward is, naming the layer.
    with pytest.raises(ValueError, match="integer_forward is not available"):
        S.validate(train_config(method="lsq", integer_forward=True, backward="int8"))


def test_post_and_ofq_from_config():
    m = S.method_from_config(train_config(method="lsq", grid="post", weight_bits=4, act_bits=4))
    assert m.grid == "post"
    m = S.method_from_config(train_config(method="ofq", weight_bits=2, act_bits=4))
    assert m.name == "ofq"
    S.validate(train_config(method="ofq", weight_bits=2, act_bits=2))


def test_token_adaptive_attention_from_config():
    config = train_config(attn_bits=8, attn_prob_bits=8, attn_low_bits=4, attn_low_fraction=0.25)
    attention = S.attention_from_config(config)
    assert attention.token_adaptive and attention.low_fraction == 0.25
    assert attention.q.format.bits == 8 and attention.v_low.format.bits == 4
    assert not S.attention_from_config(train_config(attn_bits=8)).token_adaptive
    for fields, message in ((dict(attn_low_bits=4), "set attn_bits"),
                            (dict(attn_bits=4, attn_low_bits=4), "below the widths"),
                            (dict(attn_bits=8, attn_low_bits=4, attn_low_fraction=0.0),
                             "low_fraction")):
        with pytest.raises(ValueError, match=message):
            train_config(**fields)


def test_double_rounding_weights_follow_the_widths_and_sum_to_one():
    base = dict(method="double_rounding", weight_bits=8, act_bits=None)
    equal = S.double_rounding_weights(train_config(**base, double_rounding_bits=(8, 6, 4, 2)))
    assert equal == (0.25, 0.25, 0.25, 0.25)
    # given in the order of double_rounding_bits, returned in the recipe's (highest first)
    config = train_config(**base, double_rounding_bits=(4, 8, 2),
                          double_rounding_weights=(1, 2, 0.5))
    assert S.method_from_config(config).bits == (8, 4, 2)
    assert S.double_rounding_weights(config) == pytest.approx((2 / 3.5, 1 / 3.5, 0.5 / 3.5))


@pytest.mark.parametrize("weights", [(1.0,), (1.0, -1.0), (0.0, 0.0), (1.0, float("nan")),
                                     "1,1"])
def test_double_rounding_weights_are_checked(weights):
    with pytest.raises(ValueError, match="double_rounding_weights must be one finite weight"):
        train_config(method="double_rounding", weight_bits=8, double_rounding_bits=(8, 4),
                     double_rounding_weights=weights)
