"""Tests for qjax.precision: Hutchinson traces, HAWQ-V2 sensitivities, exact bit allocation."""

import dataclasses
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import qjax
from qjax import precision as P

# ---------------------------------------------------------------------------------------------
# Hutchinson traces


def test_shared_probe_block_expectation_is_exact():
    """E[<v_l, (A v)_l>] = Tr(A_ll) over all 2^n sign vectors; variance as in the docstring."""
    rng = np.random.default_rng(0)
    n, blocks = 8, [slice(0, 3), slice(3, 8)]
    a = rng.normal(size=(n, n))
    a = a + a.T
    vs = np.array(list(itertools.product([-1.0, 1.0], repeat=n)))
    av = vs @ a
    for blk in blocks:
        terms = np.sum(vs[:, blk] * av[:, blk], axis=1)
        assert terms.mean() == pytest.approx(np.trace(a[blk, blk]), abs=1e-12)
        inner = a[blk, blk] - np.diag(np.diag(a[blk, blk]))
        rest = np.delete(a[blk], np.arange(n)[blk], axis=1)
        var = 2 * np.sum(inner**2) + np.sum(rest**2)
        assert terms.var() == pytest.approx(var, rel=1e-12)


def _quadratic(a: np.ndarray, shapes: dict):
    """``0.5 x^T A x`` over the raveled params ``{name: shape}``, and the params (ones)."""
    params = {k: jnp.ones(s, jnp.float32) for k, s in shapes.items()}
    _, unravel = ravel_pytree(params)
    a = jnp.asarray(a, jnp.float32)

    def loss(p, batch):
        x = ravel_pytree(p)[0]
        return 0.5 * x @ (a @ x) * batch

    return loss, params, unravel


def test_diagonal_quadratic_is_exact_per_probe():
    d = np.arange(1.0, 11.0)
    loss, params, _ = _quadratic(np.diag(d), {"a": (2, 3), "b": (4,)})
    tr = P.hessian_traces(loss, params, 1.0, jax.random.key(0), layers=["a", "b"],
                          min_probes=3)
    assert tr["a"].trace == pytest.approx(d[:6].sum(), rel=1e-6)
    assert tr["b"].trace == pytest.approx(d[6:].sum(), rel=1e-6)
    assert tr["a"].stderr == 0 and tr["b"].stderr == 0
    assert tr.probes == 3 and tr.converged
    assert tr["a"].size == 6 and tr.total == pytest.approx(d.sum(), rel=1e-6)


def test_dense_quadratic_unbiased_with_predicted_stderr():
    rng = np.random.default_rng(1)
    n = 10
    a = rng.normal(size=(n, n))
    a = (a + a.T) / 2
    loss, params, _ = _quadratic(a, {"a": (6,), "b": (4,)})
    tr = P.hessian_traces(loss, params, [1.0, 1.0], jax.random.key(1), layers=lambda p: True,
                          tol=0.0, max_probes=300)
    assert tr.probes == 300 and not tr.converged
    for name, blk in (("a", slice(0, 6)), ("b", slice(6, 10))):
        t = tr[name]
        assert abs(t.trace - np.trace(a[blk, blk])) < 3 * t.stderr
        inner = a[blk, blk] - np.diag(np.diag(a[blk, blk]))
        var = 2 * np.sum(inner**2) + np.sum(np.delete(a[blk], np.arange(n)[blk], axis=1) ** 2)
        assert 0.8 < t.stderr / math.sqrt(var / 300) < 1.25
    assert abs(tr.total - np.trace(a)) < 3 * tr.total_stderr


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(8, name="fc1")(x))
        x = jnp.tanh(nn.Dense(6, name="fc2")(x))
        return nn.Dense(3, name="out")(x)


@functools.lru_cache(maxsize=1)
def _mlp_problem():
    """A ~115-parameter tanh MLP, two batches of 16, mean cross-entropy (built once)."""
    model = _MLP()
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = jax.jit(model.init)(k1, jnp.zeros((1, 4)))["params"]
    xs = jax.random.normal(k2, (2, 16, 4))
    ys = jax.random.randint(k3, (2, 16), 0, 3)
    batches = [(xs[i], ys[i]) for i in range(2)]

    def loss(p, batch):
        x, y = batch
        logits = model.apply({"params": p}, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    return model, params, batches, loss


def test_mlp_traces_match_exact_hessian():
    _, params, batches, loss = _mlp_problem()
    flat, unravel = ravel_pytree(params)
    assert 100 <= flat.size <= 130
    hess = jax.jit(lambda f, b: jax.hessian(lambda g: loss(unravel(g), b))(f))
    h = sum(hess(flat, b) for b in batches) / 2
    h = np.asarray(h, np.float64)
    # Exact block traces: ravel_pytree order is the flatten order of param_paths.
    paths = P.param_paths(params)
    sizes = [x.size for x in jax.tree_util.tree_leaves(params)]
    starts = np.cumsum([0] + sizes)
    exact = {p: np.trace(h[s:e, s:e]) for p, s, e in zip(paths, starts[:-1], starts[1:],
                                                           strict=True)}
    assert sum(exact.values()) == pytest.approx(np.trace(h), rel=1e-9)

    tr = P.hessian_traces(loss, params, batches, jax.random.key(3), layers=lambda p: True,
                          tol=0.0, max_probes=200)
    z = {t.path: (t.trace - exact[t.path]) / t.stderr for t in tr.layers}
    print("\nMLP traces, estimate / exact / stderr / z:")
    for t in tr.layers:
        print(f"  {t.path:12s} {t.trace:9.4f} {exact[t.path]:9.4f} {t.stderr:8.4f} "
              f"{z[t.path]:+.2f}")
    assert all(abs(v) < 3 for v in z.values()), z
    assert sum(t.trace for t in tr.layers) == pytest.approx(tr.total, rel=1e-9)
    assert abs(tr.total - np.trace(h)) < 3 * tr.total_stderr

    kernels = P.hessian_traces(loss, params, batches, jax.random.key(4),
                               layers=lambda p: p.endswith("kernel"), tol=0.0, max_probes=100)
    assert kernels.paths == ("fc1/kernel", "fc2/kernel", "out/kernel")
    for t in kernels.layers:
        assert abs(t.trace - exact[t.path]) < 3 * t.stderr


def test_stopping_rule_and_single_batch():
    _, params, batches, loss = _mlp_problem()
    loose = P.hessian_traces(loss, params, batches[0], jax.random.key(0),
                             layers=["out/kernel"], tol=10.0, min_probes=4)
    assert loose.converged and loose.probes == 4
    tight = P.hessian_traces(loss, params, batches[0], jax.random.key(0),
                             layers=["out/kernel"], tol=0.0, max_probes=6, min_probes=2)
    assert not tight.converged and tight.probes == 6


# ---------------------------------------------------------------------------------------------
# Sensitivity


def test_sensitivity_formula_and_quantizers():
    rng = np.random.default_rng(0)
    params = {"d": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
              "c": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)}}
    traces = {"d/kernel": 2.0, "c/kernel": 0.5}
    table = P.sensitivity(params, traces, bits=(8, 2, 4))
    assert table.bits == (2, 4, 8) and table.sizes == (128, 288)
    w = params["d"]["kernel"]
    spec = qjax.QuantSpec(qjax.IntFormat(4), qjax.PerRow(0))
    want = 2.0 / 128 * float(jnp.sum((qjax.fake_quant(w, spec) - w) ** 2))
    assert table.as_dict()["d/kernel"][4] == pytest.approx(want, rel=1e-6)
    assert np.all(np.diff(table.array, axis=1) < 0)  # more bits, less error
    # A conv kernel is quantized per output channel of its (K, N) view.
    wc = params["c"]["kernel"]
    wq = qjax.fake_quant(wc.reshape(-1, 8), spec).reshape(wc.shape)
    want_c = 0.5 / 288 * float(jnp.sum((wq - wc) ** 2))
    assert table.as_dict()["c/kernel"][4] == pytest.approx(want_c, rel=1e-6)
    # A callable bits -> (W -> Q(W)), and bits -> QuantSpec.
    per_tensor = P.sensitivity(params, traces, lambda b: qjax.QuantSpec(qjax.IntFormat(b)),
                               bits=(2, 4, 8))
    assert per_tensor.array.sum() > table.array.sum()
    zero = P.sensitivity(params, traces, lambda b: (lambda x: x), bits=(4,))
    assert np.all(zero.array == 0)


def test_sensitivity_from_traces_result_and_warning():
    _, params, batches, loss = _mlp_problem()
    tr = P.hessian_traces(loss, params, batches, jax.random.key(0),
                          layers=["fc1/kernel", "out/kernel"], max_probes=20)
    with pytest.warns(UserWarning, match="negative"):  # an untrained net: not a minimum
        table = P.sensitivity(params, tr)
    assert table.layers == ("fc1/kernel", "out/kernel") and table.bits == (2, 3, 4, 8)
    with pytest.warns(UserWarning, match="negative"):
        P.sensitivity(params, {"fc1/kernel": -1.0})


# ---------------------------------------------------------------------------------------------
# Allocation


def _random_problem(rng, n_layers=5, bits=(2, 3, 4, 8)):
    sizes = {f"l{i}": int(rng.integers(10, 200)) for i in range(n_layers)}
    sens = {}
    for p in sizes:
        vals = np.sort(rng.exponential(size=len(bits)))[::-1]  # decreasing with the bits
        sens[p] = dict(zip(bits, vals.tolist(), strict=True))
    return sens, sizes


def _brute(sens, unit_cost, budget, tied=()):
    layers = list(sens)
    best = (math.inf, None)
    for combo in itertools.product(*(sorted(sens[p]) for p in layers)):
        bits = dict(zip(layers, combo, strict=True))
        if any(len({bits[p] for p in g}) > 1 for g in tied):
            continue
        cost = sum(unit_cost[p] * bits[p] for p in layers)
        obj = sum(sens[p][bits[p]] for p in layers)
        if cost <= budget and obj < best[0]:
            best = (obj, bits)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_allocate_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    sens, sizes = _random_problem(rng)
    total = sum(sizes.values())
    for avg_bits in (2.0, 2.7, 3.5, 4.6, 6.0, 8.0):
        budget = total * avg_bits / 8
        a = P.allocate(sens, sizes, budget_bytes=budget)
        obj, _ = _brute(sens, {p: n / 8 for p, n in sizes.items()}, budget + 1e-9)
        assert a.objective == pytest.approx(obj, rel=1e-12)
        assert a.cost <= budget and a.unit == "bytes" and a.budget == budget
        assert a.cost == sum(sizes[p] * b for p, b in a.bits.items()) / 8
        assert a.objective == pytest.approx(sum(sens[p][b] for p, b in a.bits.items()))
        assert list(a.bits) == list(sens)
    # tied layers (transitively merged)
    tied = [("l0", "l3"), ("l3", "l4")]
    budget = total * 3.5 / 8
    a = P.allocate(sens, sizes, budget_bytes=budget, tied=tied)
    obj, _ = _brute(sens, {p: n / 8 for p, n in sizes.items()}, budget, tied=[("l0", "l3", "l4")])
    assert a.objective == pytest.approx(obj, rel=1e-12)
    assert a.bits["l0"] == a.bits["l3"] == a.bits["l4"]
    # bitops budget
    macs = {p: int(rng.integers(100, 5000)) for p in sens}
    act = {p: int(rng.choice([4, 8])) for p in sens}
    unit = {p: macs[p] * act[p] for p in sens}
    for frac in (0.3, 0.55, 0.8):
        budget = frac * sum(unit[p] * 8 for p in sens)
        lo = sum(unit[p] * 2 for p in sens)
        budget = max(budget, lo)
        a = P.allocate(sens, None, budget_bitops=budget, macs=macs, act_bits=act)
        obj, _ = _brute(sens, unit, budget)
        assert a.objective == pytest.approx(obj, rel=1e-12)
        assert a.unit == "bitops" and a.cost == sum(unit[p] * b for p, b in a.bits.items())
        assert a.cost <= budget


def test_bitops_resolution_is_feasible_and_grid_guard():
    rng = np.random.default_rng(11)
    sens, _ = _random_problem(rng, n_layers=5)
    macs = {p: int(rng.integers(10**5, 10**6)) * 3 for p in sens}
    unit = {p: m * 8 for p, m in macs.items()}
    budget = 0.5 * sum(u * 8 for u in unit.values())
    exact = P.allocate(sens, None, budget_bitops=budget, macs=macs)
    assert exact.objective == pytest.approx(_brute(sens, unit, budget)[0], rel=1e-12)
    coarse = P.allocate(sens, None, budget_bitops=budget, macs=macs, resolution=10**6)
    assert coarse.cost <= budget and coarse.objective >= exact.objective
    # a resolution dividing every cost changes nothing
    same = P.allocate(sens, None, budget_bitops=budget, macs=macs, resolution=24)
    assert same.objective == exact.objective
    big = {p: 10**9 + i for i, p in enumerate(sens)}  # gcd 1: a grid of ~10^10 points
    with pytest.raises(ValueError, match="coarser resolution"):
        P.allocate(sens, None, budget_bitops=3 * 8 * sum(big.values()), macs=big)


def test_allocate_overhead_bits_filter_and_pinned_layer():
    sens = {"a": {2: 5.0, 4: 1.0, 8: 0.0}, "b": {2: 3.0, 4: 2.0, 8: 0.5}, "c": {8: 0.0}}
    sizes = {"a": 80, "b": 80, "c": 16}
    over = {"a": 4, "b": 4, "c": 2}
    a = P.allocate(sens, sizes, budget_bytes=80 * 6 / 8 + 16 + 10, overhead_bytes=over)
    assert dict(a.bits) == {"a": 4, "b": 2, "c": 8}
    assert a.cost == (80 * 4 + 80 * 2) / 8 + 16 + 10
    a = P.allocate(sens, sizes, budget_bytes=80 * 12 / 8 + 16, bits=(2, 4, 8), tied=[("a", "b")])
    assert a.bits["a"] == a.bits["b"] == 4


def test_resnet20_sized_instance_against_milp():
    scipy_opt = pytest.importorskip("scipy.optimize")
    # The 19 convolutions of ResNet-20 (CIFAR-10): stem, then 3 stages of 6 convs.
    sizes = [3 * 9 * 16] + [16 * 9 * 16] * 6 + [16 * 9 * 32] + [32 * 9 * 32] * 5 \
        + [32 * 9 * 64] + [64 * 9 * 64] * 5
    bits = (2, 3, 4, 8)
    rng = np.random.default_rng(20)
    names = [f"conv{i}" for i in range(19)]
    traces = rng.lognormal(0.0, 1.5, size=19)
    err = np.array([4.0**-b for b in bits])  # ||Q_b(W) - W||^2 / n ~ 4^-b
    sens = {p: dict(zip(bits, (t * err * rng.uniform(0.8, 1.2, 4)).tolist(), strict=True))
            for p, t in zip(names, traces, strict=True)}
    size = dict(zip(names, sizes, strict=True))
    total = sum(sizes)
    nb = len(bits)
    c = np.array([sens[p][b] for p in names for b in bits])
    w = np.array([size[p] * b / 8 for p in names for b in bits])
    one = np.kron(np.eye(19), np.ones(nb))
    for avg in (2.5, 3.0, 4.0, 5.5):
        budget = total * avg / 8
        a = P.allocate(sens, size, budget_bytes=budget)
        cons = [scipy_opt.LinearConstraint(one, 1, 1), scipy_opt.LinearConstraint(w, 0, budget)]
        res = scipy_opt.milp(c, constraints=cons, integrality=np.ones_like(c),
                             bounds=scipy_opt.Bounds(0, 1), options={"mip_rel_gap": 0.0})
        assert res.success
        assert a.objective == pytest.approx(res.fun, rel=1e-7)
        assert a.cost <= budget
    front = P.pareto_front(sens, size)
    assert front.points[0].cost == total * 2 / 8 and front.points[-1].cost == total
    assert np.all(np.diff(front.costs) > 0) and np.all(np.diff(front.objectives) < 0)


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(7)
    sens, sizes = _random_problem(rng, n_layers=4)
    front = P.pareto_front(sens, sizes)
    layers = list(sens)
    pts = []
    for combo in itertools.product(*(sorted(sens[p]) for p in layers)):
        pts.append((sum(sizes[p] * b for p, b in zip(layers, combo, strict=True)) / 8,
                    sum(sens[p][b] for p, b in zip(layers, combo, strict=True))))
    want = [(c, o) for c, o in pts if not any(c2 <= c and o2 < o or c2 < c and o2 <= o
                                              for c2, o2 in pts)]
    want = sorted(set(want))
    got = [(p.cost, p.objective) for p in front.points]
    assert len(got) == len(want)
    for (c1, o1), (c2, o2) in zip(got, want, strict=True):
        assert c1 == c2 and o1 == pytest.approx(o2, rel=1e-12)
    # the smallest and largest configurations are on it
    assert dict(front.points[0].bits) == dict.fromkeys(layers, 2)
    assert dict(front.points[-1].bits) == dict.fromkeys(layers, 8)
    # budgets: the optimum per budget, from one table
    budgets = [front.points[0].cost, 0.5 * sum(sizes.values()), front.points[-1].cost]
    sweep = P.pareto_front(sens, sizes, budgets)
    for b, p in zip(budgets, sweep.points, strict=True):
        assert p.budget == b
        assert p.objective == P.allocate(sens, sizes, budget_bytes=b).objective


def test_allocate_errors():
    sens = {"a": {2: 1.0, 8: 0.0}, "b": {2: 1.0, 4: 0.5, 8: 0.0}}
    sizes = {"a": 8, "b": 8}
    with pytest.raises(ValueError, match="below the smallest configuration"):
        P.allocate(sens, sizes, budget_bytes=3.9)
    with pytest.raises(ValueError, match="above the largest configuration.*16"):
        P.allocate(sens, sizes, budget_bytes=17)
    with pytest.raises(ValueError, match="exactly one"):
        P.allocate(sens, sizes)
    with pytest.raises(ValueError, match="exactly one"):
        P.allocate(sens, sizes, budget_bytes=8, budget_bitops=8)
    with pytest.raises(ValueError, match=r"unknown bit widths \[3\]"):
        P.allocate(sens, sizes, budget_bytes=8, bits=(3, 8))
    with pytest.raises(ValueError, match="bit width"):
        P.allocate({"a": {9: 1.0}}, {"a": 8}, budget_bytes=8)
    with pytest.raises(ValueError, match=r"tied layers \['z'\]"):
        P.allocate(sens, sizes, budget_bytes=8, tied=[("a", "z")])
    with pytest.raises(ValueError, match="no bit width in common"):
        P.allocate({"a": {2: 1.0}, "b": {4: 1.0}}, sizes, budget_bytes=6, tied=[("a", "b")])
    with pytest.raises(ValueError, match=r"sizes has no entry for layers \['b'\]"):
        P.allocate(sens, {"a": 8}, budget_bytes=8)
    with pytest.raises(ValueError, match="macs"):
        P.allocate(sens, None, budget_bitops=100)
    with pytest.raises(TypeError, match="tied"):
        P.allocate(sens, sizes, budget_bytes=8, tied="ab")
    with pytest.raises(TypeError, match="sensitivity"):
        P.allocate([1, 2], sizes, budget_bytes=8)
    with pytest.raises(ValueError, match="cost"):
        P.pareto_front(sens, sizes, cost="flops")


def test_hessian_and_sensitivity_errors():
    params = {"w": jnp.ones((2, 2)), "n": jnp.ones((2,), jnp.int32)}
    loss = lambda p, b: jnp.sum(p["w"] ** 2)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"\['x'\] are not parameter paths"):
        P.hessian_traces(loss, params, 0, key, layers=["x"])
    with pytest.raises(ValueError, match="selects no parameter"):
        P.hessian_traces(loss, params, 0, key, layers=lambda p: False)
    with pytest.raises(TypeError, match="floating"):
        P.hessian_traces(loss, params, 0, key, layers=["n"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        P.hessian_traces(loss, params, 0, key, layers="w")
    with pytest.raises(ValueError, match="non-empty list"):
        P.hessian_traces(loss, params, [], key, layers=["w"])
    with pytest.raises(ValueError, match="min_probes"):
        P.hessian_traces(loss, params, 0, key, layers=["w"], min_probes=5, max_probes=4)
    with pytest.raises(TypeError, match="loss_fn"):
        P.hessian_traces(None, params, 0, key, layers=["w"])
    with pytest.raises(ValueError, match="bits"):
        P.sensitivity(params, {"w": 1.0}, bits=(2, 9))
    with pytest.raises(TypeError, match="quantizers"):
        P.sensitivity(params, {"w": 1.0}, quantizers=3)
    with pytest.raises(TypeError, match="must return a QuantSpec"):
        P.sensitivity(params, {"w": 1.0}, quantizers=lambda b: 3)


# ---------------------------------------------------------------------------------------------
# Rules


@pytest.mark.filterwarnings("ignore:negative Hessian traces")
def test_rules_drive_quantize_model_end_to_end():
    model, params, batches, loss = _mlp_problem()
    tr = P.hessian_traces(loss, params, batches, jax.random.key(0),
                          layers=lambda p: p.endswith("kernel"), max_probes=30)
    table = P.sensitivity(params, tr, bits=(4, 8))
    alloc = P.allocate(table, budget_bytes=sum(table.sizes) * 6 / 8)
    rules = P.rules_from_allocation(alloc, "ste", act_bits=8)
    assert list(rules) == ["fc1", "fc2", "out"]
    assert all(isinstance(m, qjax.nn.Method) for m in rules.values())
    qm = qjax.nn.quantize_model(model, rules)
    qm.init(jax.random.key(0), jnp.zeros((1, 4)))
    sites = qm.sites()
    for path, b in alloc.bits.items():
        spec = sites[P.layer_path(path)].recipe.weight
        assert spec.format.bits == b
    tmpl = qjax.nn.Method("lsq", weight_bits=8, act_bits=4)
    rules = P.rules_from_allocation({"params/blocks_0/q/kernel": 3}, tmpl)
    assert rules == {r"blocks_0/q": dataclasses.replace(tmpl, weight_bits=3)}
    with pytest.raises(ValueError, match="unknown method"):
        P.rules_from_allocation(alloc, "hawq")
    with pytest.raises(TypeError, match="method"):
        P.rules_from_allocation(alloc, 3)


def test_exported_from_qjax():
    assert qjax.precision.allocate is P.allocate
    assert "precision" in qjax.__all__
