"""Tests for qjax.methods.compute_optimal: S, f*, WSD and the fused / classical schedules."""

import math

import jax
import numpy as np
import pytest

from qjax.methods import compute_optimal as co
from qjax.optim import QATSchedule

# f*(S) = exp(-6.7297 / ln S) evaluated with numpy (float64), not read from a published table:
# np.exp(-6.7297 / np.log(S)). The last row is S = e^6.7297, where f* = e^-1 by construction.
F_STAR = [
    (10.0, 0.053789791716522685),
    (100.0, 0.2319262635333107),
    (1000.0, 0.3774852219211377),
    (1e4, 0.4815872335655408),
    (1e5, 0.5573653580876257),
    (math.exp(6.7297), math.exp(-1.0)),
]


def lr_at(schedule, t):
    return np.float32(schedule(t))


def test_tokens_per_param_byte():
    assert co.tokens_per_param_byte(1e9, 1e8, 4) == 20.0  # 1e9 / (1e8 * 4 / 8)
    assert co.tokens_per_param_byte(1e9, 1e8, 8) == 10.0
    with pytest.raises(ValueError, match="tokens"):
        co.tokens_per_param_byte(0, 1e8, 4)
    with pytest.raises(TypeError, match="bits"):
        co.tokens_per_param_byte(1e9, 1e8, "4")


@pytest.mark.parametrize("s, expected", F_STAR)
def test_optimal_fraction_hand_values(s, expected):
    assert co.optimal_qat_fraction_from_s(s) == pytest.approx(expected, rel=1e-12, abs=0)


def test_optimal_fraction_monotone_clipped_and_undefined_at_s_le_1():
    s = np.geomspace(1.0 + 1e-9, 1e300, 200)
    f = [co.optimal_qat_fraction_from_s(float(x)) for x in s]
    assert all(0.0 <= v <= 1.0 for v in f) and f[0] == 0.0
    assert all(b >= a for a, b in zip(f, f[1:], strict=False)) and f[-1] > f[0]
    # 1e9 tokens, 1e8 params, 4 bits: S = 20
    assert co.optimal_qat_fraction(1e9, 1e8, 4) == co.optimal_qat_fraction_from_s(20.0)
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match="s "):
            co.optimal_qat_fraction_from_s(bad)
    with pytest.raises(ValueError, match="S = .* <= 1"):
        co.optimal_qat_fraction(1e6, 1e6, 8)


@pytest.mark.parametrize("decay", co.DECAYS)
def test_wsd_key_values(decay):
    lr = co.wsd(0.5, 100, 0.1, 0.2, decay=decay, final_ratio=0.1)  # warmup 10, cooldown from 80
    assert lr_at(lr, 0) == np.float32(0.005)
    assert lr_at(lr, 5) == pytest.approx(0.005 + 0.495 * 0.5, rel=1e-6)
    for t in (10, 50, 80):  # warmup end, stable, cooldown start
        assert lr_at(lr, t) == np.float32(0.5)
    mid = 0.275 if decay == "linear" else 0.05 + 0.45 * (1 - math.sqrt(0.5))
    assert lr_at(lr, 90) == pytest.approx(mid, rel=1e-6)
    assert lr_at(lr, 100) == lr_at(lr, 120) == np.float32(0.05)
    assert jax.jit(lr)(np.int32(81)) == lr_at(lr, 81) < np.float32(0.5)
    with pytest.raises(ValueError, match="decay"):
        co.wsd(0.5, 100, decay="cosine")
    with pytest.raises(ValueError, match="warmup_fraction \\+ cooldown_fraction"):
        co.wsd(0.5, 100, 0.6, 0.5)


@pytest.mark.parametrize("decay", co.DECAYS)
def test_fused_cooldown(decay):
    lr, qat = co.fused_cooldown(100, 0.5, 0.3, 0.1, decay=decay)
    assert isinstance(qat, QATSchedule) and qat.start_step == 70
    assert not qat.enabled(69) and qat.enabled(70)
    assert lr_at(lr, 10) == lr_at(lr, 69) == lr_at(lr, 70) == np.float32(0.5)
    tail = [lr_at(lr, t) for t in range(70, 101)]
    assert all(b < a for a, b in zip(tail, tail[1:], strict=False))
    assert tail[-1] == np.float32(0.0)
    with pytest.raises(ValueError, match="qat_fraction"):
        co.fused_cooldown(100, 0.5, 1.5)
    with pytest.raises(ValueError, match="warmup must end before"):
        co.fused_cooldown(100, 0.5, 0.95, 0.1)


def test_classical_qat():
    # float phase 0..69: warmup 10, cooldown over round(0.2 * 70) = 14 steps from step 56;
    # QAT phase 70..99: re-warmup over round(0.1 * 30) = 3 steps, then decay to 0 at 100.
    lr, qat = co.classical_qat(100, 0.5, 0.3, 0.1, cooldown_fraction=0.2)
    fused_qat = co.fused_cooldown(100, 0.5, 0.3, 0.1)[1]
    assert qat == fused_qat and not qat.enabled(69) and qat.enabled(70)
    assert lr_at(lr, 10) == lr_at(lr, 56) == np.float32(0.5)
    cool = [lr_at(lr, t) for t in range(56, 70)]
    assert all(b < a for a, b in zip(cool, cool[1:], strict=False)) and cool[-1] > 0
    assert lr_at(lr, 70) == np.float32(0.005)  # re-warmup from init_ratio * peak
    assert lr_at(lr, 73) == np.float32(0.5)
    tail = [lr_at(lr, t) for t in range(73, 101)]
    assert all(b < a for a, b in zip(tail, tail[1:], strict=False))
    assert tail[-1] == np.float32(0.0)
    assert jax.jit(lr)(np.int32(71)) == lr_at(lr, 71)
    with pytest.raises(ValueError, match="float phase"):
        co.classical_qat(100, 0.5, 0.9, 0.1)
