"""Checks the test model zoo (tests/zoo.py) in float, without qjax: every model inits and runs
under jit, its listed layers and rules are right, one gradient works, and the scanned models equal
their unrolled twins bit for bit."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from zoo import SCANNED, ZOO, ZooModel, unrolled_twin

LINEN_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)
NNX_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)

TWINS = {name: unrolled_twin(name) for name in SCANNED}
ALL = {**ZOO, **{twin.name: twin for twin, _ in TWINS.values()}}


def _init(zm: ZooModel):
    """(model, params or NNX state, forward(params, *inputs), {layer path: contracted size}).

    Linen layer paths are recorded with ``nn.intercept_methods`` during init (as
    ``qjax.nn.quantize_model`` does); the contracted size is the layer input's last axis. NNX
    paths come from ``nnx.iter_modules``."""
    model = zm.make()
    inputs = zm.inputs()
    if zm.api == "linen":
        assert isinstance(model, nn.Module)
        found = {}

        def record(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and isinstance(context.module, LINEN_TYPES):
                found["/".join(context.module.path)] = args[0].shape[-1]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            params = jax.jit(model.init)(jax.random.key(0), *inputs)["params"]

        def forward(p, *a):
            return model.apply({"params": p}, *a)

        return model, params, forward, found
    assert isinstance(model, nnx.Module)
    found = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, NNX_TYPES):
            ins = module.in_features
            found["/".join(str(p) for p in path)] = ins if isinstance(ins, int) else ins[-1]
    graphdef, state = nnx.split(model)

    def forward(s, *a):
        return nnx.merge(graphdef, s)(*a)

    return model, state, forward, found


def _flat(tree) -> dict:
    """{"a/b/kernel": array} for a Linen params dict or an NNX State (pure-dict paths)."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    return {"/".join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _init(ALL[name])
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(ZOO))
def test_runs_jitted_and_finite(name, built):
    zm = ZOO[name]
    assert zm.name == name
    _, params, forward, _ = built(name)
    inputs = zm.inputs()
    out = jax.jit(forward)(params, *inputs)
    assert out.dtype == jnp.float32
    assert out.shape[0] == inputs[0].shape[0]
    assert np.all(np.isfinite(out))
    loss = jax.jit(zm.loss)(out, inputs)
    assert loss.shape == () and loss.dtype == jnp.float32
    assert np.isfinite(loss) and loss > 0


@pytest.mark.parametrize("name", list(ZOO))
def test_deterministic(name, built):
    zm = ZOO[name]
    for a, b in zip(zm.inputs(), zm.inputs(), strict=True):
        np.testing.assert_array_equal(a, b)
    model, p1, _, _ = built(name)
    again = zm.make()
    if zm.api == "linen":
        p2 = jax.jit(again.init)(jax.random.key(0), *zm.inputs())["params"]
    else:
        assert again is not model  # a fresh module each call
        p2 = nnx.state(again)
    assert jax.tree.structure(p1) == jax.tree.structure(p2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", list(ALL))
def test_layers_and_rules(name, built):
    zm = ALL[name]
    _, _, _, found = built(name)
    layers, floats = set(zm.layers), set(zm.float_layers)
    assert len(layers) == len(zm.layers) and not layers & floats
    # Every quantizable layer is either listed or deliberately kept in float.
    assert layers | floats == set(found), (sorted(found), sorted(layers | floats))
    for path in zm.layers:
        assert found[path] % 16 == 0, (path, found[path])
    matched = set()
    for pattern in zm.rules:
        hits = {p for p in found if re.fullmatch(pattern, p)}
        assert hits, f"rule {pattern!r} matches no layer"
        matched |= hits
    assert all(v is None for v in zm.rules.values())
    assert matched == layers, (sorted(matched), sorted(layers))


@pytest.mark.parametrize("name", [n for n, zm in ZOO.items() if zm.raw_params])
def test_raw_params(name, built):
    zm = ZOO[name]
    _, params, _, found = built(name)
    flat = _flat(params)
    for raw in zm.raw_params:
        assert raw in flat and flat[raw].ndim == 2
        # Not owned by a Flax layer, so rules on layer paths cannot reach it.
        assert not any(raw.startswith(layer + "/") for layer in found)


@pytest.mark.parametrize("name", list(ZOO))
def test_grad(name, built):
    zm = ZOO[name]
    _, params, forward, _ = built(name)
    inputs = zm.inputs()
    grads = jax.jit(jax.grad(lambda p: zm.loss(forward(p, *inputs), inputs)))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g))
    flat = _flat(grads)
    for layer in zm.layers:  # every quantized kernel gets a gradient
        assert np.any(flat[layer + "/kernel"] != 0), layer


@pytest.mark.parametrize("name", SCANNED)
def test_scanned_equals_unrolled_twin(name, built):
    zm = ZOO[name]
    twin, map_params = TWINS[name]
    assert twin.api == zm.api and twin.inputs is zm.inputs
    inputs = zm.inputs()
    _, params, forward, _ = built(name)
    _, twin_params, twin_forward, _ = built(twin.name)
    mapped = map_params(params)
    assert jax.tree.structure(mapped) == jax.tree.structure(twin_params)
    for a, b in zip(jax.tree.leaves(mapped), jax.tree.leaves(twin_params), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    # Bit for bit when both sides are jitted (the scan body compiles to the same ops as each
    # unrolled block). Op-by-op (eager) execution of the unrolled twin is NOT bit-identical to the
    # compiled scan (XLA fuses differently, ~1 ulp), so every comparison here is under jit.
    want = jax.jit(forward)(params, *inputs)
    np.testing.assert_array_equal(jax.jit(twin_forward)(mapped, *inputs), want)
    if zm.api == "linen":
        # Also accepts a full variables dict.
        mapped_vars = map_params({"params": params})
        assert set(mapped_vars) == {"params"}
        got = jax.jit(twin.make().apply)(mapped_vars, *inputs)
        np.testing.assert_array_equal(got, want)
    else:
        # A pure dict maps to a pure dict (for nnx.replace_by_pure_dict); a State maps to a State
        # (for nnx.update); both on the eager-built modules.
        model, other = zm.make(), twin.make()
        pure = map_params(nnx.to_pure_dict(nnx.state(model)))
        assert not isinstance(pure, nnx.State)
        state = nnx.state(other)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(other, state)
        np.testing.assert_array_equal(nnx.jit(lambda m, *a: m(*a))(other, *inputs), want)
        other = twin.make()
        nnx.update(other, map_params(nnx.state(model)))
        np.testing.assert_array_equal(nnx.jit(lambda m, *a: m(*a))(other, *inputs), want)
