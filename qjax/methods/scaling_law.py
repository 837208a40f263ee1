"""QuEST's precision-aware scaling law: fit it to runs and read off the best bit width.

``L(N, D, P) = A / (N * eff(P))^alpha + B / D^beta + E`` with ``N`` non-embedding parameters,
``D`` training tokens and ``P`` bits; ``eff(P)`` is the parameter efficiency of precision ``P``
(1 at the reference precision). At a fixed memory budget of ``M = N * P`` bits the model with the
most effective parameters ``(M / P) * eff(P)`` wins, so the best precision maximises ``eff(P)/P``.

:func:`fit` fits the law to runs by least squares on ``log L`` (``scipy.optimize.least_squares``
from a grid of starting points, as Hoffmann et al. fit theirs); :data:`QUEST_PUBLISHED` holds the
authors' fitted parameters, which reproduce the paper's 30M-parameter results.

References:
  Panferov et al., 2025. QuEST: Stable Training of LLMs with 1-Bit Weights and Activations.
"""

from qjax._src.methods.scaling_law import (
    QUEST_PUBLISHED,
    Run,
    ScalingLaw,
    fit,
)

__all__ = [
    "fit",
    "QUEST_PUBLISHED",
    "Run",
    "ScalingLaw",
]
