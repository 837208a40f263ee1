"""Exact HAWQ-V2 bit allocation: multiple-choice knapsack by dynamic programming.

Choose one width ``b_l`` per layer to

    minimize  sum_l Omega_l(b_l)
    subject to  sum_l n_l * b_l / 8 + overhead <= budget_bytes        (model size), or
                sum_l macs_l * b_l * a_l <= budget_bitops               (bit operations),

with ``a_l`` the layer's activation bits. Layers ``tied`` together share one width: they are
merged into one item whose cost and ``Omega`` are the sums over its layers.

The DP runs over an integer cost grid, which makes it exact. Costs are kept as integers (bits
for sizes, bit operations for bitops); each item's cost is taken relative to its cheapest
option, and the grid step is the greatest common divisor of those excess costs (so the grid is
as coarse as exactness allows). ``best[i][c]`` is the least objective of the first ``i`` items
at an excess cost of *exactly* ``c`` steps:

    best[i][c] = min_j best[i-1][c - cost_ij] + Omega_ij,

with the minimizing ``j`` stored for back-tracking. The optimum under a budget is the best
``best[last][c]`` with ``c <= budget``; the Pareto front (size vs ``Omega``) is every ``c``
whose value is below that of every cheaper ``c``. Time ``O(items * options * C)``, memory
``items * C`` bytes, ``C`` the grid size. When ``C`` is too large (bitops of big layers),
``resolution`` coarsens the grid: each excess cost is rounded *up* to a multiple of it and the
budget down, so the answer stays feasible; it is exact whenever ``resolution`` divides every
excess cost.

References:
  Dong, Yao, Arfeen, Gholami, Mahoney, Keutzer. HAWQ-V2: Hessian Aware trace-Weighted
  Quantization of Neural Networks. NeurIPS 2020.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

from qjax._src._checks import check_int, check_real
from qjax._src.nn.recipe import METHODS, Method
from qjax._src.precision.hessian import SensitivityTable

__all__ = ["Allocation", "ParetoFront", "allocate", "pareto_front", "rules_from_allocation",
           "layer_path",
           "MAX_GRID_CELLS"]

CostKind = Literal["bytes", "bitops"]
MAX_GRID_CELLS = 50_000_000  # items x grid points (one int8 back-pointer each)


@dataclasses.dataclass(frozen=True)
class Allocation:
    """One bit width per layer (not hashable: ``bits`` is a read-only mapping).

    Attributes:
      bits: ``{layer: bits}`` in the sensitivity table's layer order.
      objective: ``sum_l Omega_l(bits_l)``.
      cost: in ``unit``: bytes (weights plus overhead) or bit operations.
      unit: ``"bytes"`` or ``"bitops"``.
      budget: the budget it was solved for (None on a full Pareto front).
    """

    bits: Mapping[str, int]
    objective: float
    cost: float
    unit: CostKind
    budget: float | None = None


@dataclasses.dataclass(frozen=True)
class ParetoFront:
    """Non-dominated (cost, objective) allocations, cost ascending, objective descending."""

    points: tuple[Allocation, ...]
    unit: CostKind

    @property
    def costs(self) -> np.ndarray:
        return np.array([p.cost for p in self.points], np.float64)

    @property
    def objectives(self) -> np.ndarray:
        return np.array([p.objective for p in self.points], np.float64)


def _omega_table(sensitivity) -> dict[str, dict[int, float]]:
    """``{layer: {bits: Omega}}``, checked: widths in ``[1, 8]``, finite values."""
    if isinstance(sensitivity, SensitivityTable):
        sensitivity = sensitivity.as_dict()
    if not isinstance(sensitivity, Mapping) or not sensitivity:
        raise TypeError(f"sensitivity must be a SensitivityTable or a non-empty mapping "
                        f"{{layer: {{bits: Omega}}}}, got {type(sensitivity).__name__}")
    out = {}
    for layer, row in sensitivity.items():
        if not isinstance(row, Mapping) or not row:
            raise TypeError(f"sensitivity[{layer!r}] must be a non-empty mapping bits -> Omega")
        out[str(layer)] = {check_int(f"bit width of layer {layer!r}", b, 1, 8):
                           check_real(f"sensitivity[{layer!r}][{b}]", v)
                           for b, v in row.items()}
    return out


def _per_layer(name: str, values, layers: Sequence[str], lo: int = 1) -> dict[str, int]:
    """An int ``>= lo`` per layer from a mapping (or one int for all)."""
    if isinstance(values, Mapping):
        missing = [p for p in layers if p not in values]
        if missing:
            raise ValueError(f"{name} has no entry for layers {missing}")
        return {p: check_int(f"{name}[{p!r}]", values[p], lo) for p in layers}
    if values is None:
        raise ValueError(f"{name} is required")
    return dict.fromkeys(layers, check_int(name, values, lo))


def _groups(layers: Sequence[str], tied: Iterable[Iterable[str]]) -> list[list[str]]:
    """Layers merged by ``tied`` (transitively), each group in table order."""
    if isinstance(tied, str):
        raise TypeError("tied must be a sequence of groups of layer names, not a string")
    parent = {p: p for p in layers}

    def root(p):
        while parent[p] != p:
            p = parent[p]
        return p

    for group in tied:
        if isinstance(group, str):
            raise TypeError(f"each tied group must be a sequence of layer names, got {group!r}")
        group = list(group)
        unknown = [p for p in group if p not in parent]
        if unknown:
            raise ValueError(f"tied layers {unknown} are not in the sensitivity table")
        for p in group[1:]:
            parent[root(p)] = root(group[0])
    out: dict[str, list[str]] = {}
    for p in layers:
        out.setdefault(root(p), []).append(p)
    return list(out.values())


@dataclasses.dataclass(frozen=True)
class _Problem:
    order: list[str]  # the table's layer order
    groups: list[list[str]]
    options: list[list[tuple[int, int, float]]]  # per group: (bits, integer cost, Omega)
    unit: CostKind
    scale: float      # cost unit -> reported unit (1/8 for bytes, 1 for bitops)
    offset: float     # overhead added to the reported cost (bytes)


def _problem(sensitivity, sizes, kind: CostKind, macs, act_bits, tied, bits,
             overhead_bytes) -> _Problem:
    table = _omega_table(sensitivity)
    layers = list(table)
    if bits is not None:
        bits = sorted({check_int("bits", b, 1, 8) for b in bits})
        if not bits:
            raise ValueError("bits must be None or a non-empty sequence of bit widths")
        known = set().union(*table.values())
        unknown = [b for b in bits if b not in known]
        if unknown:
            raise ValueError(f"unknown bit widths {unknown}: the sensitivity table has "
                             f"{sorted(known)}")
        table = {p: {b: v for b, v in row.items() if b in bits} for p, row in table.items()}
    if kind == "bytes":
        if sizes is None and isinstance(sensitivity, SensitivityTable):
            sizes = sensitivity.size_map
        n = _per_layer("sizes", sizes, layers)
        unit_cost = {p: n[p] for p in layers}  # bits per bit of width
        scale = 1 / 8
        offset = 0.0
        if overhead_bytes is not None:
            if not isinstance(overhead_bytes, Mapping):
                raise TypeError("overhead_bytes must be a mapping layer -> bytes")
            unknown = [p for p in overhead_bytes if p not in table]
            if unknown:
                raise ValueError(f"overhead_bytes has unknown layers {unknown}")
            offset = sum(check_real(f"overhead_bytes[{p!r}]", v, 0.0)
                         for p, v in overhead_bytes.items())
    else:
        m = _per_layer("macs", macs, layers, lo=0)
        a = _per_layer("act_bits", act_bits, layers)
        unit_cost = {p: m[p] * a[p] for p in layers}
        scale, offset = 1.0, 0.0
    groups = _groups(layers, tied)
    options = []
    for g in groups:
        common = set.intersection(*(set(table[p]) for p in g))
        if not common:
            raise ValueError(f"layers {g} have no bit width in common (tied, or filtered by "
                             f"bits)")
        options.append([(b, sum(unit_cost[p] for p in g) * b, sum(table[p][b] for p in g))
                        for b in sorted(common)])
    return _Problem(layers, groups, options, kind, scale, offset)


@dataclasses.dataclass(frozen=True)
class _Table:
    best: np.ndarray    # (C+1,) float64, inf where no configuration has that excess cost
    choice: np.ndarray  # (items, C+1) int8 back-pointers
    steps: list[list[int]]
    base: int
    step: int


def _solve(prob: _Problem, cap_units: int | None, resolution: int | None) -> _Table:
    base = sum(min(c for _, c, _ in opts) for opts in prob.options)
    excess = [[c - min(c for _, c, _ in opts) for _, c, _ in opts] for opts in prob.options]
    step = resolution or math.gcd(*[e for row in excess for e in row]) or 1
    steps = [[-(-e // step) for e in row] for row in excess]
    top = sum(max(row) for row in steps)
    cap = top if cap_units is None else min(top, (cap_units - base) // step)
    if len(steps) * (cap + 1) > MAX_GRID_CELLS:
        raise ValueError(f"the DP grid has {len(steps)} x {cap + 1} cells (> {MAX_GRID_CELLS});"
                         f" pass a coarser resolution (grid step now {step} cost units)")
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(steps), cap + 1), np.int8)
    for i, (opts, row) in enumerate(zip(prob.options, steps, strict=True)):
        new = np.full(cap + 1, np.inf)
        for j, ((_, _, v), s) in enumerate(zip(opts, row, strict=True)):
            if s > cap:
                continue
            cand = best[:cap + 1 - s] + v
            better = cand < new[s:]
            new[s:][better] = cand[better]
            choice[i, s:][better] = j
        best = new
    return _Table(best, choice, steps, base, step)


def _allocation(prob: _Problem, tab: _Table, c: int, budget: float | None) -> Allocation:
    picks = [0] * len(tab.steps)
    for i in range(len(tab.steps) - 1, -1, -1):
        picks[i] = int(tab.choice[i, c])
        c -= tab.steps[i][picks[i]]
    bits, cost, obj = {}, 0, 0.0
    for g, opts, j in zip(prob.groups, prob.options, picks, strict=True):
        b, cg, v = opts[j]
        bits.update(dict.fromkeys(g, b))
        cost += cg
        obj += v
    return Allocation(types.MappingProxyType({p: bits[p] for p in prob.order}), float(obj),
                      cost * prob.scale + prob.offset, prob.unit, budget)


def _check_range(prob: _Problem, name: str, budget: float) -> None:
    lo = sum(min(c for _, c, _ in o) for o in prob.options) * prob.scale + prob.offset
    hi = sum(max(c for _, c, _ in o) for o in prob.options) * prob.scale + prob.offset
    if budget < lo:
        raise ValueError(f"{name}={budget:g} is below the smallest configuration (every layer "
                         f"at its fewest bits), which needs {lo:g}")
    if budget > hi:
        raise ValueError(f"{name}={budget:g} is above the largest configuration (every layer at "
                         f"its most bits), which needs {hi:g}: pass at most {hi:g}")


def _cap_units(prob: _Problem, budget: float) -> int:
    # The budget in integer cost units; the epsilon absorbs float noise in budget - overhead.
    return math.floor((budget - prob.offset) / prob.scale + 1e-9)


def _kind(budget_bytes, budget_bitops) -> tuple[CostKind, str, float]:
    if (budget_bytes is None) == (budget_bitops is None):
        raise ValueError("pass exactly one of budget_bytes and budget_bitops")
    if budget_bytes is not None:
        return "bytes", "budget_bytes", check_real("budget_bytes", budget_bytes, 0.0)
    return "bitops", "budget_bitops", check_real("budget_bitops", budget_bitops, 0.0)


def _resolution_units(resolution, kind: CostKind) -> int | None:
    if resolution is None:
        return None
    r = check_int("resolution", resolution, 1)
    return 8 * r if kind == "bytes" else r


def allocate(
    sensitivity: SensitivityTable | Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, int] | None = None,
    *,
    budget_bytes: float | None = None,
    budget_bitops: float | None = None,
    macs: Mapping[str, int] | None = None,
    act_bits: int | Mapping[str, int] = 8,
    tied: Sequence[Sequence[str]] = (),
    bits: Sequence[int] | None = None,
    overhead_bytes: Mapping[str, float] | None = None,
    resolution: int | None = None,
) -> Allocation:
    """The exact minimizer of ``sum_l Omega_l(b_l)`` under a size or bit-operations budget.

    Args:
      sensitivity: a :class:`~qjax.precision.SensitivityTable` or ``{layer: {bits: Omega}}``
        (a layer may offer only some widths, e.g. ``{8: 0.0}`` to pin it at 8 bits).
      sizes: ``{layer: n_l}`` parameter counts (ints); default the table's sizes. Needed for a
        bytes budget only.
      budget_bytes: model size budget, ``sum_l n_l b_l / 8 + sum(overhead_bytes)``.
      budget_bitops: bit-operations budget, ``sum_l macs_l * b_l * act_bits_l``.
      macs: ``{layer: multiply-accumulates per example}`` (ints), for ``budget_bitops``.
      act_bits: activation bits, one int or ``{layer: bits}`` (bitops only).
      tied: groups of layers that share one width (merged transitively).
      bits: restrict the candidate widths to these (each must be in the table).
      overhead_bytes: fixed bytes per layer (scales, zero points) counted in the size.
      resolution: grid step in the budget's unit (bytes or bitops); default exact (see the
        module docstring).

    Returns:
      :class:`Allocation`: the widths, the objective and the cost; among optimal allocations the
      cheapest.

    Raises:
      ValueError: no or two budgets; a budget below the smallest configuration (every layer at
        its fewest bits) or above the largest (every layer at its most bits); unknown bit widths;
        tied layers not in the table; missing sizes / macs; a grid too large.
    """
    kind, name, budget = _kind(budget_bytes, budget_bitops)
    prob = _problem(sensitivity, sizes, kind, macs, act_bits, tied, bits, overhead_bytes)
    _check_range(prob, name, budget)
    tab = _solve(prob, _cap_units(prob, budget), _resolution_units(resolution, kind))
    c = int(np.argmin(tab.best))
    return _allocation(prob, tab, c, budget)


def pareto_front(
    sensitivity: SensitivityTable | Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, int] | None = None,
    budgets: Sequence[float] | None = None,
    *,
    cost: CostKind = "bytes",
    macs: Mapping[str, int] | None = None,
    act_bits: int | Mapping[str, int] = 8,
    tied: Sequence[Sequence[str]] = (),
    bits: Sequence[int] | None = None,
    overhead_bytes: Mapping[str, float] | None = None,
    resolution: int | None = None,
) -> ParetoFront:
    """The (cost, ``sum_l Omega_l``) Pareto front, from one DP table.

    With ``budgets=None``: every non-dominated allocation, from the smallest configuration to
    the cheapest one of least objective (the largest configuration when ``Omega`` strictly
    falls with the bits). With ``budgets`` (in ``cost``'s unit, within the range
    :func:`allocate` accepts): the optimal allocation at each budget, in the given order (points
    of the front; repeated when budgets share one). Other arguments as :func:`allocate`.
    """
    if cost not in ("bytes", "bitops"):
        raise ValueError(f"cost must be 'bytes' or 'bitops', got {cost!r}")
    prob = _problem(sensitivity, sizes, cost, macs, act_bits, tied, bits, overhead_bytes)
    res = _resolution_units(resolution, cost)
    if budgets is None:
        tab = _solve(prob, None, res)
        points, run = [], np.inf
        for c in np.flatnonzero(np.isfinite(tab.best)):
            if tab.best[c] < run:
                run = tab.best[c]
                points.append(_allocation(prob, tab, int(c), None))
        return ParetoFront(tuple(points), cost)
    name = "budget_bytes" if cost == "bytes" else "budget_bitops"
    budgets = [check_real("budgets", b, 0.0) for b in budgets]
    if not budgets:
        raise ValueError("budgets must be non-empty (or None for the whole front)")
    for b in budgets:
        _check_range(prob, name, b)
    tab = _solve(prob, _cap_units(prob, max(budgets)), res)
    out = []
    for b in budgets:
        cap = (_cap_units(prob, b) - tab.base) // tab.step
        c = int(np.argmin(tab.best[:cap + 1]))
        out.append(_allocation(prob, tab, c, b))
    return ParetoFront(tuple(out), cost)


def layer_path(param_path: str) -> str:
    """The layer path :func:`qjax.nn.quantize_model` matches for a kernel's parameter path.

    A leading ``"params/"`` (the Linen collection) and a trailing ``"/kernel"`` are dropped:
    ``"params/blocks_0/attn/q/kernel"`` -> ``"blocks_0/attn/q"``. Other parameter paths are kept
    whole, which is how a module's raw parameter fed to ``jnp.einsum`` is named.
    """
    p = param_path.removeprefix("params/")
    return p.removesuffix("/kernel")


def rules_from_allocation(
    allocation: Allocation | Mapping[str, int],
    method: Literal["quest", "lsq", "pact", "ste"] | Method = "ste",
    *,
    act_bits: int | None = 8,
) -> dict[str, Method]:
    """Rules for :func:`qjax.nn.quantize_model`: ``{re.escape(layer path): Method}`` per layer.

    Args:
      allocation: an :class:`Allocation` or ``{parameter path: weight bits}``; paths go through
        :func:`layer_path`.
      method: a method name, built as ``Method(method, weight_bits=b, act_bits=act_bits)``, or
        a :class:`~qjax.nn.Method` template copied with ``weight_bits=b`` (its own ``act_bits``
        and other fields kept; ``act_bits`` is then ignored).
      act_bits: activation bits for a method name (None: weight-only).

    Returns:
      An ordered dict of exact-match patterns, one per layer.

    Raises:
      ValueError: an unknown method name, bits the method refuses, two parameters of one layer.
      TypeError: a bad ``allocation`` or ``method``.
    """
    bits = allocation.bits if isinstance(allocation, Allocation) else allocation
    if not isinstance(bits, Mapping):
        raise TypeError(f"allocation must be an Allocation or a mapping path -> bits, got "
                        f"{type(allocation).__name__}")
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; allowed: {METHODS}")
        template = Method(method, weight_bits=8, act_bits=act_bits)
    elif isinstance(method, Method):
        template = method
    else:
        raise TypeError(f"method must be a method name or a qjax.nn.Method, got "
                        f"{type(method).__name__}")
    rules: dict[str, Method] = {}
    for path, b in bits.items():
        pattern = re.escape(layer_path(str(path)))
        if pattern in rules:
            raise ValueError(f"two allocated parameters map to the layer {layer_path(path)!r}")
        rules[pattern] = dataclasses.replace(template, weight_bits=check_int(
            f"bits of {path!r}", b, 1, 8))
    return rules
