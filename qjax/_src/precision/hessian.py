"""Per-layer Hessian traces (Hutchinson's estimator) and HAWQ-V2 sensitivities.

For a loss ``L(w)`` with Hessian ``H`` and a Rademacher probe ``v`` (entries ``+-1`` with equal
probability, independent), Hutchinson's estimator is ``Tr(H) = E[v^T H v]``. For one layer
``l`` (a block of the parameters):

    E[ <v_l, (H v)_l> ] = Tr(H_ll) + sum_{m != l} E[ v_l^T H_lm v_m ] = Tr(H_ll),

since ``v_l`` and ``v_m`` are independent with zero mean. So one Hessian-vector product with a
probe over *all* selected layers gives an unbiased term for every layer's block trace at once,
and the per-layer terms sum to ``v^T H v``, the estimate of the trace of the selected block
``H_SS``. The price of sharing the probe is variance: per layer,

    Var <v_l, (H v)_l> = 2 sum_{i != j in l} H_ij^2 + sum_{i in l, j in S \\ l} H_ij^2,

(``S`` the selected parameters), the second sum being the cross terms a layer-only probe would
avoid. Parameters outside the selected layers get ``v = 0``: they add no variance.
``H v`` is forward-over-reverse (``jax.jvp`` of ``jax.grad``), jitted once.

The HAWQ-V2 sensitivity of layer ``l`` at ``b`` bits (Dong et al. 2020, eq. 3) is

    Omega_l(b) = Tr(H_l) / n_l * || Q_b(W_l) - W_l ||_2^2,

with ``n_l`` the layer's parameter count and ``Q_b`` a ``b``-bit fake quantizer.

References:
  Dong, Yao, Arfeen, Gholami, Mahoney, Keutzer. HAWQ-V2: Hessian Aware trace-Weighted
  Quantization of Neural Networks. NeurIPS 2020.
  Hutchinson. A stochastic estimator of the trace of the influence matrix for Laplacian
  smoothing splines. Communications in Statistics - Simulation and Computation, 1989.
  Avron, Toledo. Randomized algorithms for estimating the trace of an implicit symmetric
  positive semi-definite matrix. Journal of the ACM, 2011.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax._src import formats as F
from qjax._src import granularity as G
from qjax._src import spec as SP
from qjax._src._checks import check_floating, check_int, check_real
from qjax._src.quantize import fake_quant

__all__ = ["LayerTrace", "HessianTraces", "SensitivityTable", "hessian_traces", "sensitivity",
           "default_quantizer",
           "param_paths"]

Quantizer = Callable[[int], "SP.QuantSpec | Callable[[jax.Array], jax.Array]"]


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_paths(params: Any) -> list[str]:
    """The ``"/"``-joined path of every leaf of ``params`` (flatten order).

    Dict keys, sequence indices and attribute names are joined by ``"/"``; a trailing ``value``
    attribute (NNX variables) is dropped, so ``nnx.split`` state gives ``"layers/0/q/kernel"``.
    """
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [_key_name(k) for k in path]
        if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
            names = names[:-1]
        out.append("/".join(names))
    return out


def _select(params: Any, layers: Sequence[str] | Callable[[str], bool]):
    """``(leaves, treedef, paths, indices of the selected leaves)``; errors name ``layers``."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = param_paths(params)
    if isinstance(layers, str):
        raise TypeError(f"layers must be a sequence of parameter paths or a predicate, got the "
                        f"string {layers!r} (wrap it in a list)")
    if callable(layers):
        idx = [i for i, p in enumerate(paths) if layers(p)]
        if not idx:
            raise ValueError(f"the layers predicate selects no parameter; paths: {paths}")
    elif isinstance(layers, Sequence):
        where = {p: i for i, p in enumerate(paths)}
        unknown = [p for p in layers if p not in where]
        if unknown:
            raise ValueError(f"layers {unknown} are not parameter paths; paths: {paths}")
        if len(set(layers)) != len(layers) or not layers:
            raise ValueError(f"layers must be non-empty without repeats, got {list(layers)}")
        idx = [where[p] for p in layers]
    else:
        raise TypeError(f"layers must be a sequence of parameter paths or a predicate, got "
                        f"{type(layers).__name__}")
    for i in idx:
        check_floating(leaves[i], f"parameter {paths[i]!r}")
    return leaves, treedef, paths, idx


@functools.lru_cache(maxsize=16)
def _probe_terms(loss_fn: Callable, treedef: Any, idx: tuple[int, ...]) -> Callable:
    """Jitted ``(selected leaves, all leaves, batch, probe key) -> <v_l, (H v)_l>`` per layer.

    Cached, so that repeated calls (other keys, batches, tolerances) compile once.
    """

    def terms(sel, all_leaves, batch, probe_key):
        keys = jax.random.split(probe_key, len(sel))
        vs = [jax.random.rademacher(k, x.shape, dtype=x.dtype)
              for k, x in zip(keys, sel, strict=True)]

        def loss_of(s):
            full = list(all_leaves)
            for i, x in zip(idx, s, strict=True):
                full[i] = x
            return loss_fn(jax.tree_util.tree_unflatten(treedef, full), batch)

        # Forward-over-reverse: the JVP of the gradient along v is H v.
        _, hv = jax.jvp(jax.grad(loss_of), (list(sel),), (vs,))
        f32 = jnp.float32
        return jnp.stack([jnp.sum(v.astype(f32) * h.astype(f32))
                          for v, h in zip(vs, hv, strict=True)])

    return jax.jit(terms)


@dataclasses.dataclass(frozen=True)
class LayerTrace:
    """Hutchinson estimate of one layer's Hessian block trace ``Tr(H_ll)``.

    Attributes:
      path: the parameter's path (``"blocks_0/attn/q/kernel"``).
      trace: the mean of the per-probe terms ``<v_l, (H v)_l>``.
      stderr: its standard error (sample standard deviation / sqrt(probes)).
      probes: number of probes averaged.
      size: ``n_l``, the parameter's element count.
    """

    path: str
    trace: float
    stderr: float
    probes: int
    size: int


@dataclasses.dataclass(frozen=True)
class HessianTraces:
    """Result of :func:`hessian_traces`.

    Attributes:
      layers: one :class:`LayerTrace` per selected parameter, in selection order.
      total: estimate of the trace of the selected block, the sum of the layers' traces.
      total_stderr: standard error of ``total`` (from the per-probe sums, not a sum of stderrs).
      probes: probes used (the same for all layers: one HVP serves all).
      converged: whether every running mean met ``tol`` before ``max_probes``.
    """

    layers: tuple[LayerTrace, ...]
    total: float
    total_stderr: float
    probes: int
    converged: bool

    def __getitem__(self, path: str) -> LayerTrace:
        for t in self.layers:
            if t.path == path:
                return t
        raise KeyError(f"no layer {path!r}; layers: {[t.path for t in self.layers]}")

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(t.path for t in self.layers)

    def as_dict(self) -> dict[str, float]:
        """``{path: trace}``."""
        return {t.path: t.trace for t in self.layers}


def hessian_traces(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batches: Any,
    key: jax.Array,
    *,
    layers: Sequence[str] | Callable[[str], bool],
    tol: float = 1e-2,
    max_probes: int = 200,
    min_probes: int = 10,
) -> HessianTraces:
    """Per-layer Hessian traces by Hutchinson's estimator with shared Rademacher probes.

    Probe ``i`` draws ``v`` (Rademacher, the parameter's dtype) on the selected parameters
    (zero elsewhere), computes ``H v`` of the loss averaged over ``batches`` (one jitted HVP per
    batch, equal weights) and records ``<v_l, (H v)_l>`` per layer, accumulated in float64. It
    stops once ``min_probes`` are done and every layer's running mean moved by at most ``tol``
    relative to its previous value (the HAWQ-V2 / PyHessian rule), or after ``max_probes``.
    The relative-change rule is weak (a mean of ``i`` terms moves by ``O(1/i)``): read
    ``stderr`` for the actual accuracy, or pass ``tol=0`` to always use ``max_probes``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, twice differentiable (a mean over the batch).
      params: pytree of arrays (Flax ``params``; NNX state, see :func:`param_paths`).
      batches: a ``list`` of batches (the Hessian is of the mean loss), or one batch (anything
        that is not a list, e.g. an ``(x, y)`` tuple).
      key: PRNG key; probe ``i`` uses ``jax.random.fold_in(key, i)``.
      layers: parameter paths (``"blocks_0/attn/q/kernel"``) or a predicate on the path.
      tol: relative tolerance of the stopping rule, ``>= 0``.
      max_probes: at most this many probes, ``>= 2``.
      min_probes: at least this many, in ``[2, max_probes]``.

    Returns:
      :class:`HessianTraces` (float traces and standard errors per layer).

    Raises:
      TypeError: ``loss_fn`` not callable, a selected parameter not floating, bad ``layers``.
      ValueError: unknown layer paths, an empty selection or ``batches`` list, bad counts.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    batch_list = batches if isinstance(batches, list) else [batches]
    if not batch_list:
        raise ValueError("batches must be a non-empty list of batches (or one batch)")
    tol = check_real("tol", tol, 0.0)
    max_probes = check_int("max_probes", max_probes, 2)
    min_probes = check_int("min_probes", min_probes, 2, max_probes)
    if not isinstance(key, jax.Array):
        raise TypeError(f"key must be a JAX PRNG key, got {type(key).__name__}")
    leaves, treedef, paths, idx = _select(params, layers)

    terms_jit = _probe_terms(loss_fn, treedef, tuple(idx))
    sel = [leaves[i] for i in idx]
    samples: list[np.ndarray] = []
    prev, converged = None, False
    for i in range(max_probes):
        pk = jax.random.fold_in(key, i)
        acc = sum(terms_jit(sel, leaves, b, pk) for b in batch_list)
        samples.append(np.asarray(acc, np.float64) / len(batch_list))
        mean = np.mean(samples, axis=0)
        if (i + 1 >= min_probes and prev is not None
                and np.all(np.abs(mean - prev) <= tol * np.abs(prev))):
            converged = True
            break
        prev = mean
    s = np.stack(samples)
    n = s.shape[0]
    se = np.std(s, axis=0, ddof=1) / math.sqrt(n)
    tot = s.sum(axis=1)
    out = tuple(LayerTrace(paths[j], float(m), float(e), n, int(np.size(leaves[j])))
                for j, m, e in zip(idx, s.mean(axis=0), se, strict=True))
    return HessianTraces(out, float(tot.mean()), float(np.std(tot, ddof=1) / math.sqrt(n)), n,
                         converged)


@dataclasses.dataclass(frozen=True)
class SensitivityTable:
    """HAWQ-V2 sensitivities ``Omega_l(b)``: a layer x bits table.

    Attributes:
      layers: parameter paths, the table's rows.
      bits: bit widths, ascending, the columns.
      omega: ``omega[i][j] = Omega_{layers[i]}(bits[j])`` (float).
      sizes: ``n_l`` per layer (parameter count).
      traces: ``Tr(H_l)`` per layer, as given.
    """

    layers: tuple[str, ...]
    bits: tuple[int, ...]
    omega: tuple[tuple[float, ...], ...]
    sizes: tuple[int, ...]
    traces: tuple[float, ...]

    def __post_init__(self):
        n = len(self.layers)
        if len(self.omega) != n or len(self.sizes) != n or len(self.traces) != n:
            raise ValueError("omega, sizes and traces must have one entry per layer")
        if any(len(row) != len(self.bits) for row in self.omega):
            raise ValueError("each row of omega must have one value per bit width")

    @property
    def array(self) -> np.ndarray:
        """``omega`` as a float64 array of shape ``(len(layers), len(bits))``."""
        return np.asarray(self.omega, np.float64).reshape(len(self.layers), len(self.bits))

    def as_dict(self) -> dict[str, dict[int, float]]:
        """``{layer: {bits: Omega}}`` (what :func:`~qjax.precision.allocate` also accepts)."""
        return {p: dict(zip(self.bits, row, strict=True))
                for p, row in zip(self.layers, self.omega, strict=True)}

    @property
    def size_map(self) -> dict[str, int]:
        return dict(zip(self.layers, self.sizes, strict=True))


def default_quantizer(bits: int) -> SP.QuantSpec:
    """Symmetric absmax integer grid, one scale per output channel of the ``(K, N)`` view."""
    return SP.QuantSpec(F.IntFormat(bits), G.PerRow(0))


def _quant_error(w: jax.Array, q: SP.QuantSpec | Callable[[jax.Array], jax.Array]) -> float:
    if isinstance(q, SP.QuantSpec):
        # The (K, N) matrix view: all axes but the last are contracted (Dense, Conv kernels).
        view = w.reshape(-1, w.shape[-1]) if w.ndim >= 2 else w.reshape(-1, 1)
        wq = fake_quant(view, q).reshape(w.shape)
    elif callable(q):
        wq = q(w)
        if getattr(wq, "shape", None) != w.shape:
            raise ValueError(f"a quantizer callable must return an array of shape {w.shape}, "
                             f"got {getattr(wq, 'shape', type(wq).__name__)}")
    else:
        raise TypeError(f"quantizers(bits) must return a QuantSpec or a callable W -> Q(W), got "
                        f"{type(q).__name__}")
    d = jnp.asarray(wq, jnp.float32) - jnp.asarray(w, jnp.float32)
    return float(jnp.sum(d * d))


def sensitivity(
    params: Any,
    traces: HessianTraces | Mapping[str, float],
    quantizers: Quantizer | None = None,
    bits: Sequence[int] = (2, 3, 4, 8),
) -> SensitivityTable:
    """HAWQ-V2 ``Omega_l(b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2`` for every layer and width.

    Args:
      params: the pytree the traces were computed on (the layers are found by path).
      traces: a :class:`HessianTraces` or ``{path: trace}``.
      quantizers: ``bits -> QuantSpec`` (applied to the kernel's ``(K, N)`` matrix view, all
        axes but the last flattened into K, as in :mod:`qjax._src.nn.recipe`; a 1-D parameter is one
        column) or ``bits -> (W -> Q_b(W))`` (a callable on the parameter as stored, returning
        the same shape). Default :func:`default_quantizer`: ``QuantSpec(IntFormat(b),
        PerRow(0))``, absmax per output channel.
      bits: distinct bit widths in ``[1, 8]`` (the default quantizer needs ``>= 2``).

    Returns:
      :class:`SensitivityTable` with float64 values and the columns sorted by bits.

    A negative trace (the loss is not at a minimum along that layer) gives negative ``Omega``,
    which rewards fewer bits; it is kept, with a warning.
    """
    if isinstance(traces, HessianTraces):
        tr = traces.as_dict()
    elif isinstance(traces, Mapping):
        tr = {str(k): check_real(f"traces[{k!r}]", v) for k, v in traces.items()}
    else:
        raise TypeError(f"traces must be a HessianTraces or a mapping path -> trace, got "
                        f"{type(traces).__name__}")
    if not tr:
        raise ValueError("traces is empty")
    if isinstance(bits, (str, bytes)) or not isinstance(bits, Sequence) or not bits:
        raise TypeError(f"bits must be a non-empty sequence of ints, got {bits!r}")
    bits_t = tuple(sorted(check_int("bits", b, 1, 8) for b in bits))
    if len(set(bits_t)) != len(bits_t):
        raise ValueError(f"bits must be distinct, got {tuple(bits)}")
    if quantizers is None:
        quantizers = default_quantizer
    if not callable(quantizers):
        raise TypeError(f"quantizers must be a callable bits -> QuantSpec (or W -> Q(W)) or "
                        f"None, got {type(quantizers).__name__}")
    leaves, _, _, idx = _select(params, list(tr))
    qs = {b: quantizers(b) for b in bits_t}
    negative = [p for p, t in tr.items() if t < 0]
    if negative:
        warnings.warn(f"negative Hessian traces for {negative}: their Omega favours fewer bits",
                      stacklevel=2)
    rows, sizes = [], []
    for p, i in zip(tr, idx, strict=True):
        w = leaves[i]
        n = int(np.size(w))
        rows.append(tuple(tr[p] / n * _quant_error(w, qs[b]) for b in bits_t))
        sizes.append(n)
    return SensitivityTable(tuple(tr), bits_t, tuple(rows), tuple(sizes),
                            tuple(float(tr[p]) for p in tr))
