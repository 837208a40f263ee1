"""Tests for qjax.methods.scaling_law: the published preset and recovery of known parameters."""

import dataclasses
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
    with pytest.raises(ValueError, match=r"runs\[0\]\.n"):
        fit([Run(-1, 1e9, 4, 3.0)] * 8)
    with pytest.raises(ValueError, match="no efficiency"):
        QUEST_PUBLISHED.predict(1e6, 1e9, 5)


NAN, INF = float("nan"), float("inf")
RUNS = [Run(n, d, p, QUEST_PUBLISHED.predict(n, d, p))
        for n, d, p in itertools.product((1e6, 1e7), (1e8, 1e9), (4, 8))]


@pytest.mark.parametrize("field, value", [("loss", NAN), ("n", NAN), ("d", INF), ("bits", 0),
                                          ("bits", -4), ("bits", NAN), ("loss", 0.0)])
def test_fit_rejects_runs_that_are_not_finite_and_positive(field, value):
    runs = RUNS[:-1] + [dataclasses.replace(RUNS[-1], **{field: value})]
    with pytest.raises(ValueError, match=rf"runs\[7\]\.{field}"):
        fit(runs)


def test_fit_rejects_empty_and_malformed_runs():
    with pytest.raises(ValueError, match="runs"):
        fit([])
    with pytest.raises(TypeError, match=r"runs\[0\]"):
        fit([(1e6, 1e8, 4, 3.0)] * 10)
    with pytest.raises(ValueError, match="reference_bits"):
        fit(RUNS, reference_bits=NAN)


@pytest.mark.parametrize("args, error, match", [
    ((0, 1e9, 4), ValueError, "n"),
    ((-1e6, 1e9, 4), ValueError, "n"),
    ((1e6, -1e9, 4), ValueError, "d"),
    ((NAN, 1e9, 4), ValueError, "n"),
    ((1e6, 1e9, True), TypeError, "bits"),
    (("1e6", 1e9, 4), TypeError, "n"),
])
def test_predict_rejects_bad_arguments(args, error, match):
    with pytest.raises(error, match=rf"^{match} must be"):
        QUEST_PUBLISHED.predict(*args)


@pytest.mark.parametrize("kwargs, match", [
    ({"memory_bits": 0}, "memory_bits"),
    ({"memory_bits": NAN}, "memory_bits"),
    ({"tokens": 0}, "tokens"),
    ({"candidates": []}, "candidates"),
    ({"candidates": [0]}, r"candidates\[0\]"),
])
def test_best_bits_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QUEST_PUBLISHED.best_bits(**({"memory_bits": 1e9, "tokens": 1e9} | kwargs))


def test_scaling_law_rejects_bad_parameters():
    with pytest.raises(ValueError, match="^a must be"):
        ScalingLaw(-1.0, 0.1, 1.0, 0.1, 0.0, {4: 1.0})
    with pytest.raises(TypeError, match="eff"):
        ScalingLaw(1.0, 0.1, 1.0, 0.1, 0.0, None)
    with pytest.raises(ValueError, match="eff"):
        ScalingLaw(1.0, 0.1, 1.0, 0.1, 0.0, {0: 1.0})
    with pytest.raises(ValueError, match=r"eff\[4\]"):
        ScalingLaw(1.0, 0.1, 1.0, 0.1, 0.0, {4: -1.0})
