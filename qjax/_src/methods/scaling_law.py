"""Implementation of :mod:`qjax.methods.scaling_law` (documented there)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from qjax._src._checks import check_real

__all__ = ["ScalingLaw", "Run", "fit", "QUEST_PUBLISHED"]


def _check_positive(values: Mapping[str, float]) -> None:
    # The law takes powers and logs of these: a non-positive one gives a complex number or a
    # division by zero, a NaN a NaN loss (or a failed fit).
    for name, value in values.items():
        check_real(name, value, 0.0, low_open=True)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: ``n`` non-embedding params, ``d`` tokens, ``bits``, final ``loss``."""

    n: float
    d: float
    bits: float
    loss: float


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
    """Parameters of ``L = A/(N eff(P))^alpha + B/D^beta + E``; ``eff`` maps bits to efficiency."""

    a: float
    alpha: float
    b: float
    beta: float
    e: float
    eff: Mapping[float, float]

    def __post_init__(self):
        _check_positive({"a": self.a, "alpha": self.alpha, "b": self.b, "beta": self.beta})
        check_real("e", self.e, 0.0)
        if not isinstance(self.eff, Mapping):
            raise TypeError(f"eff must be a mapping of bits to efficiency, got {self.eff!r}")
        if not self.eff:
            raise ValueError("eff must hold the efficiency of at least one precision")
        _check_positive({f"eff key {p!r}": p for p in self.eff})
        _check_positive({f"eff[{p!r}]": e for p, e in self.eff.items()})

    def predict(self, n: float, d: float, bits: float) -> float:
        """The predicted loss; ``n``, ``d`` and ``bits`` must be finite and positive."""
        _check_positive({"n": n, "d": d, "bits": bits})
        if bits not in self.eff:
            raise ValueError(f"no efficiency for {bits} bits; known: {sorted(self.eff)}")
        return float(self.a / (n * self.eff[bits]) ** self.alpha + self.b / d**self.beta + self.e)

    def best_bits(self, memory_bits: float, tokens: float,
                  candidates: Sequence[float] | None = None) -> float:
        """The precision with the lowest predicted loss for ``N = memory_bits / P`` parameters.

        ``candidates`` (default: every precision of ``eff``) must be a non-empty sequence of
        finite positive bit widths that ``eff`` knows.
        """
        _check_positive({"memory_bits": memory_bits, "tokens": tokens})
        cands = sorted(self.eff) if candidates is None else list(candidates)
        if not cands:
            raise ValueError(f"candidates must name at least one precision; known: "
                             f"{sorted(self.eff)}")
        _check_positive({f"candidates[{i}]": p for i, p in enumerate(cands)})
        return min(cands, key=lambda p: self.predict(memory_bits / p, tokens, p))

    def efficiency_per_bit(self) -> dict[float, float]:
        """``eff(P) * 16 / P``: effective parameters per 16 bits of memory."""
        return {p: e * 16 / p for p, e in sorted(self.eff.items())}


QUEST_PUBLISHED = ScalingLaw(
    a=8.134, alpha=0.06273, b=86.41, beta=0.2413, e=0.00142,
    eff={1: 0.0205, 2: 0.152, 3: 0.433, 4: 0.692, 8: 1.016, 16: 1.0},
)


def fit(runs: Sequence[Run], reference_bits: float | None = None) -> ScalingLaw:
    """Fits the law to ``runs`` (at least 5 + number of precisions, spanning N, D and P).

    ``eff(reference_bits) = 1`` fixes the scale that ``A`` and ``eff`` share; the default is the
    highest precision among the runs.

    Raises:
      TypeError: a run that is not a :class:`Run`.
      ValueError: no or too few runs, values that are not finite and positive, or a reference
        precision with no runs.
    """
    from scipy.optimize import least_squares

    runs = list(runs)
    if not runs:
        raise ValueError("runs must hold at least one Run")
    for i, r in enumerate(runs):
        if not isinstance(r, Run):
            raise TypeError(f"runs[{i}] must be a Run, got {type(r).__name__}")
        _check_positive({f"runs[{i}].{f}": getattr(r, f) for f in ("n", "d", "bits", "loss")})
    precisions = sorted({float(r.bits) for r in runs})
    if reference_bits is not None:
        _check_positive({"reference_bits": reference_bits})
    ref = float(max(precisions) if reference_bits is None else reference_bits)
    if ref not in precisions:
        raise ValueError(f"reference_bits {ref} has no runs; precisions: {precisions}")
    free = [p for p in precisions if p != ref]
    if len(runs) < 5 + len(free):
        raise ValueError(f"need at least {5 + len(free)} runs for {len(precisions)} precisions")
    arr = np.array([[r.n, r.d, r.bits, r.loss] for r in runs], dtype=np.float64)
    n, d, bits, loss = arr.T
    idx = np.array([free.index(b) if b in free else -1 for b in bits])

    # params: log A, alpha, log B, beta, log E, log eff(p) for p in free
    def unpack(x):
        log_eff = np.concatenate([x[5:], [0.0]])[idx]
        return np.exp(x[0]), x[1], np.exp(x[2]), x[3], np.exp(x[4]), log_eff

    def residuals(x):
        a, alpha, b, beta, e, log_eff = unpack(x)
        pred = a * np.exp(-alpha * (np.log(n) + log_eff)) + b * np.exp(-beta * np.log(d)) + e
        return np.log(pred) - np.log(loss)

    best = None
    for alpha0, beta0, e0 in itertools.product((0.05, 0.2, 0.5), (0.1, 0.3, 0.6), (1e-3, 0.5)):
        x0 = np.concatenate([[np.log(10.0), alpha0, np.log(100.0), beta0, np.log(e0)],
                             np.zeros(len(free))])
        lower = [-20, 1e-4, -20, 1e-4, -30] + [-15] * len(free)
        upper = [30, 3.0, 40, 3.0, 5] + [5] * len(free)
        res = least_squares(residuals, x0, bounds=(lower, upper), xtol=1e-15, ftol=1e-15,
                            gtol=1e-15, max_nfev=20000)
        if best is None or res.cost < best.cost:
            best = res
    x = best.x
    eff = {p: float(np.exp(v)) for p, v in zip(free, x[5:], strict=True)} | {ref: 1.0}
    return ScalingLaw(float(np.exp(x[0])), float(x[1]), float(np.exp(x[2])), float(x[3]),
                      float(np.exp(x[4])), dict(sorted(eff.items())))
