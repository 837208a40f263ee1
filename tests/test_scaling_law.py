"""Tests for qjax.methods.scaling_law: the published preset and recovery of known parameters."""

import itertools

import numpy as np
import pytest

from qjax.methods.scaling_law import QUEST_PUBLISHED, Run, ScalingLaw, fit

# design.md: C4 validation loss of a 30M model after 3B tokens
PAPER_30M = {16: 3.207, 8: 3.209, 4: 3.272, 3: 3.372, 2: 3.574, 1: 3.945}


@pytest.mark.parametrize("bits", sorted(PAPER_30M))
def test_published_law_predicts_the_30m_results(bits):
    # The law is a fit over many runs: it reproduces the 30M row within 1% (1-bit: +0.7%).
    assert QUEST_PUBLISHED.predict(30e6, 3e9, bits) == pytest.approx(PAPER_30M[bits], rel=0.01)


def test_four_bits_maximise_efficiency_per_bit():
    per_bit = QUEST_PUBLISHED.efficiency_per_bit()
    assert max(per_bit, key=per_bit.get) == 4
    assert QUEST_PUBLISHED.best_bits(memory_bits=16 * 30e6, tokens=3e9) == 4


def test_fit_recovers_known_parameters():
    truth = ScalingLaw(a=6.0, alpha=0.08, b=60.0, beta=0.25, e=0.5,
                       eff={1: 0.05, 2: 0.2, 4: 0.7, 16: 1.0})
    runs = [Run(n, d, p, truth.predict(n, d, p))
            for n, d, p in itertools.product((1e6, 4e6, 16e6, 64e6), (1e8, 1e9, 1e10),
                                             (1, 2, 4, 16))]
    got = fit(runs)
    for name in ("a", "alpha", "b", "beta", "e"):
        assert getattr(got, name) == pytest.approx(getattr(truth, name), rel=1e-3), name
    for p in truth.eff:
        assert got.eff[p] == pytest.approx(truth.eff[p], rel=1e-3)
    rng = np.random.default_rng(0)
    noisy = [Run(r.n, r.d, r.bits, r.loss * (1 + 1e-3 * rng.standard_normal())) for r in runs]
    got = fit(noisy)
    for p in truth.eff:
        assert got.eff[p] == pytest.approx(truth.eff[p], rel=0.15)
    assert got.best_bits(16 * 1e7, 1e9) == truth.best_bits(16 * 1e7, 1e9)


def test_fit_validates_input():
    with pytest.raises(ValueError, match="at least"):
        fit([Run(1e6, 1e9, 4, 3.0)] * 3)
    with pytest.raises(ValueError, match="reference_bits"):
        fit([Run(1e6, 1e9, 4, 3.0)] * 8, reference_bits=16)
    with pytest.raises(ValueError, match="positive"):
        fit([Run(-1, 1e9, 4, 3.0)] * 8)
    with pytest.raises(ValueError, match="no efficiency"):
        QUEST_PUBLISHED.predict(1e6, 1e9, 5)
