"""MSE-optimal clipping of a standard Gaussian on a uniform grid (QuEST's scale constants).

For ``n`` evenly spaced levels from ``-a`` to ``a`` with nearest rounding, :func:`gaussian_mse` is
the exact mean squared error of ``N(0, 1)``; :func:`optimal_gaussian_clip` the ``a`` that
minimises it; :func:`gaussian_clip` that constant for a format's grid, from the table
:data:`QUEST_GAUSSIAN_CLIP` (docs/design.md section 6) where it has the level count. The scale rule
:class:`qjax._src.scales.RmsGaussian` multiplies it by a block's RMS.

References:
  Panferov et al., 2025. QuEST: Stable Training of LLMs with 1-Bit Weights and Activations.
"""

from __future__ import annotations

import functools
import math

from qjax._src import formats as F
from qjax._src._checks import check_int, check_number

__all__ = ["QUEST_GAUSSIAN_CLIP", "gaussian_mse", "optimal_gaussian_clip", "gaussian_clip"]

# docs/design.md section 6: MSE-optimal clipping value a for a midrise grid of 2^bits levels (key:
# number of levels). Three levels (ternary) is the symmetric 1.585-bit grid.
QUEST_GAUSSIAN_CLIP: dict[int, float] = {
    2: 0.7978845587140913,
    3: 1.2240089519030855,
    4: 1.4935346200015913,
    8: 2.051068354131873,
    16: 2.513930578568423,
    32: 2.9160938834961225,
    64: 3.276597282593217,
    128: 3.6010497188221655,
    256: 3.884938678807525,
}


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0


def _cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def gaussian_mse(num_levels: int, clip: float) -> float:
    """Exact MSE of nearest rounding of ``N(0, 1)`` to ``num_levels`` evenly spaced levels.

    The levels run from ``-clip`` to ``clip``; each decision threshold is the midpoint of two
    levels. Uses ``int_a^b (x - l)^2 phi = [Phi - x phi]_a^b + 2 l [phi]_a^b + l^2 [Phi]_a^b``.
    """
    num_levels = check_int("num_levels", num_levels, lo=2)
    clip = check_number("clip", clip)
    if not (math.isfinite(clip) and clip >= 0):
        raise ValueError(f"clip must be finite and >= 0, got {clip!r}")
    step = 2.0 * clip / (num_levels - 1)
    levels = [-clip + k * step for k in range(num_levels)]
    edges = [-math.inf] + [lv + step / 2 for lv in levels[:-1]] + [math.inf]
    total = 0.0
    for lv, a, b in zip(levels, edges[:-1], edges[1:], strict=True):

        def xphi(t):
            return t * _phi(t) if math.isfinite(t) else 0.0

        second = (_cdf(b) - xphi(b)) - (_cdf(a) - xphi(a))
        first = _phi(b) - _phi(a)
        zeroth = _cdf(b) - _cdf(a)
        total += second + 2 * lv * first + lv * lv * zeroth
    return total


@functools.cache
def optimal_gaussian_clip(num_levels: int) -> float:
    """Clipping value minimising :func:`gaussian_mse` (golden-section search, tol 1e-12)."""
    lo, hi = 1e-3, 10.0
    inv_phi = (math.sqrt(5) - 1) / 2
    c = hi - inv_phi * (hi - lo)
    d = lo + inv_phi * (hi - lo)
    fc, fd = gaussian_mse(num_levels, c), gaussian_mse(num_levels, d)
    while hi - lo > 1e-12:
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - inv_phi * (hi - lo)
            fc = gaussian_mse(num_levels, c)
        else:
            lo, c, fc = c, d, fd
            d = lo + inv_phi * (hi - lo)
            fd = gaussian_mse(num_levels, d)
    return (lo + hi) / 2


def gaussian_clip(fmt: F.Format) -> float:
    """The MSE-optimal clipping constant ``a`` (in standard deviations) for ``fmt``'s grid.

    ``fmt`` is a uniform format with a positive level, or its name.
    """
    fmt = F.as_format(fmt)
    if not fmt.uniform:
        raise ValueError(f"rms_gaussian needs a uniform grid, not the float format {fmt.name}")
    F.check_positive_level(fmt, "rms_gaussian")
    n = fmt.num_levels
    return QUEST_GAUSSIAN_CLIP.get(n) or optimal_gaussian_clip(n)
