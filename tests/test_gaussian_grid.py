"""Tests for qjax.gaussian_grid: the Gaussian clipping constants, derived independently."""

import math

import numpy as np
import pytest

import qjax
from qjax._src import gaussian_grid as G

# docs/design.md section 6: (levels, a_b, Gaussian MSE / var at a_b)
TABLE = [
    (2, 0.7978845587140913, 0.36338),
    (3, 1.2240089519030855, 0.19017),
    (4, 1.4935346200015913, 0.11885),
    (8, 2.051068354131873, 0.037440),
    (16, 2.513930578568423, 0.011543),
    (32, 2.9160938834961225, 0.0034952),
    (64, 3.276597282593217, 0.0010400),
    (128, 3.6010497188221655, 0.00030437),
    (256, 3.884938678807525, 0.0000878),
]


@pytest.mark.parametrize("levels,a,mse", TABLE)
def test_design_constants_are_gaussian_optimal(levels, a, mse):
    # Independent derivation: golden-section minimisation of the closed-form Gaussian MSE.
    # The published constants match the exact optimum to 1e-5 up to 8 levels; beyond, the MSE is
    # so flat in the clip that they sit up to 1% off it while losing at most 0.2% MSE.
    best = G.optimal_gaussian_clip(levels)
    assert best == pytest.approx(a, abs=1e-5 if levels <= 8 else 1e-2 * a)
    assert G.gaussian_mse(levels, a) == pytest.approx(G.gaussian_mse(levels, best), rel=2e-3)
    assert G.gaussian_mse(levels, a) == pytest.approx(mse, rel=2e-3)


def test_gaussian_mse_by_quadrature():
    x = np.linspace(-12, 12, 2_000_001)
    pdf = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    c, n = 1.3, 4
    step = 2 * c / (n - 1)
    q = np.clip(np.round((np.clip(x, -c, c) + c) / step), 0, n - 1) * step - c
    ref = np.trapezoid((x - q) ** 2 * pdf, x)
    assert G.gaussian_mse(n, c) == pytest.approx(ref, rel=1e-6)


def test_gaussian_clip_per_format():
    assert G.gaussian_clip(qjax.Midrise(4)) == TABLE[4][1]
    assert G.gaussian_clip(qjax.Ternary()) == TABLE[1][1]
    assert G.gaussian_clip(qjax.IntFormat(2)) == TABLE[1][1]  # -1, 0, 1
    assert G.gaussian_clip(qjax.IntFormat(4)) == pytest.approx(G.optimal_gaussian_clip(15))
    with pytest.raises(ValueError, match="uniform grid"):
        G.gaussian_clip(qjax.FloatFormat("e4m3"))
