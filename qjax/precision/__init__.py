"""HAWQ-V2 mixed-precision bit allocation (Dong et al. 2020).

1. :func:`hessian_traces`: ``Tr(H_l)`` per layer by Hutchinson's estimator,
   ``Tr(H_ll) = E[<v_l, (H v)_l>]`` with Rademacher ``v`` shared by all layers (one
   forward-over-reverse HVP per probe and batch), stopped when every running mean moves by less
   than ``tol`` (relative).
2. :func:`sensitivity`: ``Omega_l(b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2`` (layer x bits).
3. :func:`allocate`: one width per layer minimizing ``sum_l Omega_l(b_l)`` under
   ``sum_l n_l b_l / 8 <= budget_bytes`` or ``sum_l macs_l b_l a_l <= budget_bitops``, solved
   exactly as a multiple-choice knapsack by DP over an integer cost grid; ``tied`` layers share a
   width. :func:`pareto_front`: the size-vs-``Omega`` front from the same table.
4. :func:`rules_from_allocation`: the widths as rules for :func:`qjax.nn.quantize_model`.

Example::

    tr = hessian_traces(loss_fn, params, batches, key, layers=lambda p: p.endswith("kernel"))
    table = sensitivity(params, tr, bits=(2, 4, 8))
    alloc = allocate(table, budget_bytes=0.5 * sum(table.sizes))   # 4 bits on average
    model_q = qjax.nn.quantize_model(model, rules_from_allocation(alloc, "lsq", act_bits=8))

References:
  Dong, Yao, Arfeen, Gholami, Mahoney, Keutzer. HAWQ-V2: Hessian Aware trace-Weighted
  Quantization of Neural Networks. NeurIPS 2020.
  Hutchinson. A stochastic estimator of the trace of the influence matrix for Laplacian
  smoothing splines. Communications in Statistics - Simulation and Computation, 1989.
  Avron, Toledo. Randomized algorithms for estimating the trace of an implicit symmetric
  positive semi-definite matrix. Journal of the ACM, 2011.
"""

from qjax._src.precision.allocate import (
    Allocation,
    ParetoFront,
    allocate,
    layer_path,
    pareto_front,
    rules_from_allocation,
)
from qjax._src.precision.hessian import (
    HessianTraces,
    LayerTrace,
    SensitivityTable,
    default_quantizer,
    hessian_traces,
    param_paths,
    sensitivity,
)

__all__ = [
    "Allocation",
    "HessianTraces",
    "LayerTrace",
    "ParetoFront",
    "SensitivityTable",
    "allocate",
    "default_quantizer",
    "hessian_traces",
    "layer_path",
    "pareto_front",
    "param_paths",
    "rules_from_allocation",
    "sensitivity",
]
