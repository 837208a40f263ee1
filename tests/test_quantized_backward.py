"""Tests for the quantized backward of integer-forward dense layers (qjax.quantized_backward,
``qat_dense(..., backward="int8")``, ``LayerQuant/Method(backward="int8")``)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qjax
from qjax._src import int8
from qjax._src import quantized_backward as QB
from qjax._src.estimators import decode, estimator_mask
from qjax._src.nn.ops import key_source
from qjax._src.qdot import qat_dense
from qjax.methods import quest
from qjax.nn import LayerQuant, Method, conv_layout, dense_layout, quantize_model
from qjax.nn.nnx import set_quant_rngs

W8 = qjax.QuantSpec("int8", qjax.PerRow(0), "absmax", "ste")
A8 = qjax.QuantSpec("int8", qjax.PerRow(-1), "absmax", "ste")
PAIRS = {
    "int8 ste": (W8, A8),
    "quest midrise 4 (trust)": (quest.spec(4, axis=0, hadamard_mode=None),
                                quest.spec(4, hadamard_mode=None)),
}
X = jax.random.normal(jax.random.key(0), (2, 6, 32))
KERNEL = jax.random.normal(jax.random.key(1), (32, 24)) * 0.2
G = jax.random.normal(jax.random.key(2), (2, 6, 24))
STEP8 = Method("ste", 8, 8, integer_forward=True, backward="int8")


def grads(w, a, backward, key, x=X, kernel=KERNEL, g=G):
    """(dx, dW) of ``sum(qat_dense(x, kernel) * g)``: the VJP of ``g``."""
    f = lambda x, k: jnp.sum(qat_dense(x, k, w, a, backward=backward, key=key) * g)
    return jax.grad(f, (0, 1))(x, kernel)


grads_jit = jax.jit(grads, static_argnums=(0, 1, 2))
stochastic_int8 = jax.jit(QB.stochastic_int8, static_argnums=1)


# ------------------------------------------------------------------ building blocks
def test_pairwise_dither_is_uniform_on_the_grid_and_pairwise_uncorrelated():
    keys = jax.random.split(jax.random.key(3), 3000)
    u = np.asarray(jax.jit(jax.vmap(lambda k: QB.pairwise_dither(k, (3, 4))))(keys))
    u = u.reshape(3000, 12)
    assert u.min() >= 0.0 and u.max() < 1.0
    np.testing.assert_array_equal(u * 2**24, np.round(u * 2**24))  # on the 2^-24 grid
    # Uniform: mean 1/2, variance 1/12; pairwise independent: every correlation ~ 0 (entries
    # sharing a row word or a column word included). 3000 draws: standard error 0.018.
    np.testing.assert_allclose(u.mean(0), 0.5, atol=0.03)
    np.testing.assert_allclose(u.var(0), 1 / 12, rtol=0.08)
    corr = np.corrcoef(u.T)
    assert np.abs(corr - np.eye(12)).max() < 0.08
    assert QB.pairwise_dither(keys[0], ()).shape == ()
    assert QB.pairwise_dither(keys[0], (5,)).shape == (5,)


def test_stochastic_int8_is_exact_on_the_grid_and_unbiased_off_it():
    rows = jnp.array([[127.0, -3.0, 0.0, 64.0], [-127.0, 1.0, 5.0, 2.0]]) * jnp.array([[2.0**-3],
                                                                                     [2.0**4]])
    for i in range(3):
        codes, scale = stochastic_int8(rows, (-1,), jax.random.key(i))
        np.testing.assert_array_equal(codes.astype(np.float32) * scale, rows)
        assert codes.dtype == jnp.int8
    a = jax.random.normal(jax.random.key(4), (3, 8)) * jnp.array([[1e-3], [1.0], [1e4]])
    keys = jax.random.split(jax.random.key(5), 1000)
    codes, scales = jax.jit(jax.vmap(lambda k: stochastic_int8(a, (-1,), k)))(keys)
    deq = np.asarray(codes, np.float64) * np.asarray(scales, np.float64)
    a64 = np.asarray(a, np.float64)
    scale = np.abs(a64).max(-1, keepdims=True) / 127
    frac = a64 / scale - np.floor(a64 / scale)
    std = scale * np.sqrt(frac * (1 - frac))  # one draw; the mean of n has std / sqrt(n)
    tol = 5.0 * std / np.sqrt(1000) + 1e-6 * np.abs(a64)  # float32 rounding of a / r
    assert (np.abs(deq.mean(0) - a64) <= tol).all()
    # The variance is that of the rounding, per row in units of the scale: sum f(1 - f).
    np.testing.assert_allclose((deq.var(0) / scale**2).sum(-1), (frac * (1 - frac)).sum(-1),
                               rtol=0.1)
    assert int(jnp.max(jnp.abs(codes.astype(jnp.int32)))) <= 127


def test_stochastic_int8_all_zero_rows_and_tiny_values_stay_finite():
    a = jnp.array([[0.0, 0.0, 0.0, 0.0], [1e-38, -1e-39, 0.0, 0.0]])
    codes, scale = stochastic_int8(a, (-1,), jax.random.key(0))
    assert bool(jnp.all(jnp.isfinite(scale))) and float(scale.min()) == 2.0**-126
    np.testing.assert_array_equal(codes[0], 0)


@pytest.mark.parametrize("bound", [1, 2**29, 2**30], ids=["one dot", "tiles of 3", "tiles of 1"])
@pytest.mark.parametrize("layout", ["dx (last with 1)", "dW (leading axes)"])
def test_exact_int8_dot_equals_the_integer_product(bound, layout):
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (3, 5, 7), dtype=np.int8)
    if layout.startswith("dx"):
        b = rng.integers(-128, 128, (4, 7), dtype=np.int8)
        contract, ref = ((2,), (1,)), np.einsum("mtn,kn->mtk", a.astype(np.int64), b)
    else:
        b = rng.integers(-128, 128, (3, 5, 6), dtype=np.int8)
        contract = ((0, 1), (0, 1))
        ref = np.einsum("mtk,mtn->kn", a.astype(np.int64), b.astype(np.int64))
    out = QB.exact_int8_dot(jnp.asarray(a), jnp.asarray(b), contract, bound)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, ref.astype(np.float32))


@pytest.mark.parametrize("bound,error", [(0, ValueError), (True, ValueError), (2.0, ValueError)])
def test_exact_int8_dot_refuses_bad_bounds(bound, error):
    a = jnp.ones((2, 3), jnp.int8)
    with pytest.raises(error, match="bound"):
        QB.exact_int8_dot(a, a, ((1,), (1,)), bound)


def test_exact_int8_dot_refuses_mismatched_contractions():
    with pytest.raises(ValueError, match="contracted axes differ"):
        QB.exact_int8_dot(jnp.ones((2, 3), jnp.int8), jnp.ones((2, 4), jnp.int8),
                          ((1,), (1,)), 1)


# ----------------------------------------------------------------------- qat_dense(int8 bwd)
def exact_operands():
    """x, kernel, g shaped like X, KERNEL, G, on the int8 grids with power-of-two scales: every
    token row of x, every kernel column and every row and column of g reach +-127 (so each
    absmax scale is a power of two and every quantization is exact)."""
    rng = np.random.default_rng(1)

    def grid(rows, cols, exponent):
        c = rng.integers(-20, 21, (rows, cols)).astype(np.float32)
        for i in range(max(rows, cols)):
            c[i % rows, i % cols] = 127.0 * (1 if i % 2 else -1)
        return c * 2.0**exponent

    m, (k, n) = X.shape[0] * X.shape[1], KERNEL.shape
    x, kernel, g = grid(m, k, -3), grid(k, n, -5), grid(m, n, -7)
    assert (np.abs(g).max(0) == np.abs(g).max()).all() and (np.abs(g).max(1) == 2.0**-7 * 127).all()
    return (jnp.asarray(x).reshape(X.shape), jnp.asarray(kernel),
            jnp.asarray(g).reshape(G.shape))


def test_equals_the_float_backward_when_everything_is_on_the_grid():
    x, kernel, g = exact_operands()
    for seed in range(3):
        dx, dw = grads_jit(W8, A8, "int8", jax.random.key(seed), x, kernel, g)
        fx, fw = grads_jit(W8, A8, "float", None, x, kernel, g)
        np.testing.assert_array_equal(dx, fx)
        np.testing.assert_array_equal(dw, fw)
    x64, k64, g64 = (np.asarray(a, np.float64) for a in (x, kernel, g))
    np.testing.assert_array_equal(dx, np.einsum("btn,kn->btk", g64, k64).astype(np.float32))
    np.testing.assert_array_equal(dw, np.einsum("btk,btn->kn", x64, g64).astype(np.float32))


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_gradients_are_the_masked_int8_products_of_the_definition(name):
    w, a = PAIRS[name]
    key = jax.random.key(7)
    dx, dw = grads_jit(w, a, "int8", key)
    # Definition: the forward's codes (qjax.int8), the estimator masks of fake quantization,
    # dense_grads on the output gradient.

    @jax.jit
    def definition(x, kernel, g):
        xi, xs = int8.quantize_operand(x, a, -1)
        wi, ws = int8.quantize_operand(kernel, w, 0)
        grads = QB.dense_grads(g, xi, xs, wi, ws, key, x_format=a.format, w_format=w.format)
        out = []
        for arr, spec, axis, ref in ((x, a, -1, grads[0]), (kernel, w, 0, grads[1])):
            q, s = int8.operand_codes(arr, spec, axis)
            values = decode(q, s, None, spec.format)
            mask = estimator_mask(arr, values, s, None, spec.format, spec.estimator)
            out.append(ref if mask is None else jnp.where(mask, ref, 0.0))
        return out

    for got, want in zip((dx, dw), definition(X, KERNEL, G), strict=True):
        np.testing.assert_array_equal(got, want)
    if name.startswith("quest"):
        assert float(jnp.mean(dx == 0)) > 0  # the trust mask did zero some entries


DRAWS = 256


@functools.cache
def draws(name):
    """``DRAWS`` int8-backward gradients (dx, dW) of pair ``name``, one key each."""
    w, a = PAIRS[name]
    keys = jax.random.split(jax.random.key(11), DRAWS)
    return jax.jit(jax.vmap(lambda k: grads(w, a, "int8", k)))(keys)


@pytest.mark.parametrize("name", [
    "int8 ste", pytest.param("quest midrise 4 (trust)", marks=pytest.mark.slow)])
def test_unbiased_mean_over_keys_is_the_float_backward(name):
    w, a = PAIRS[name]
    n = DRAWS
    dx, dw = draws(name)
    fx, fw = grads_jit(w, a, "float", None)
    for samples, ref in ((dx, fx), (dw, fw)):
        sem = samples.std(0) / np.sqrt(n)  # standard error of the mean, per entry
        z = jnp.abs(samples.mean(0) - ref) / (sem + 1e-6 * jnp.abs(ref).max())
        assert float(z.max()) < 5.5, name
        assert float(jnp.abs(samples.mean(0) - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_variance_is_that_of_independent_stochastic_rounding():
    # dx = r * (G' . C^T): with pairwise independent dither, Var dx[m, k] =
    # r_m^2 sum_n C[k, n]^2 f(1 - f), f = frac((g s_w)[m, n] / r_m), as if every entry had its own
    # independent uniform.
    dx, _ = draws("int8 ste")
    wi, ws = int8.quantize_operand(KERNEL, W8, 0)
    a = G * ws.reshape(-1)
    r = jnp.max(jnp.abs(a), -1, keepdims=True) / 127
    v = a / r
    frac = v - jnp.floor(v)
    var = r**2 * jnp.einsum("btn,kn->btk", frac * (1 - frac), wi.astype(jnp.float32) ** 2)
    ratio = float(dx.var(0).sum() / var.sum())
    assert 0.9 < ratio < 1.1, ratio


def test_deterministic_for_a_key_under_jit_and_checkpoint():
    key = jax.random.key(3)
    first = grads_jit(W8, A8, "int8", key)
    again = grads_jit(W8, A8, "int8", key)
    other = grads_jit(W8, A8, "int8", jax.random.key(4))
    raw = jax.eval_shape(lambda k: grads(W8, A8, "int8", k), jax.random.PRNGKey(3))  # raw keys
    f = lambda x, k: jnp.sum(jax.checkpoint(
        lambda x, k: qat_dense(x, k, W8, A8, backward="int8", key=key))(x, k) * G)
    remat = jax.jit(jax.grad(f, (0, 1)))(X, KERNEL)
    for a, b, c in zip(first, again, remat, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert all(bool(jnp.any(a != b)) for a, b in zip(first, other, strict=True))
    assert all(r.shape == a.shape for r, a in zip(raw, first, strict=True))


def test_primal_needs_no_key_and_equals_the_float_backward_op():
    both = jax.jit(lambda x, k: (qat_dense(x, k, W8, A8, backward="int8"),
                                 qat_dense(x, k, W8, A8)))
    np.testing.assert_array_equal(*both(X, KERNEL))


def test_backward_matmuls_are_int8_dots():
    f = lambda x, k: grads(W8, A8, "int8", jax.random.key(0), x, k)
    jaxpr = str(jax.make_jaxpr(f)(X, KERNEL))
    assert jaxpr.count("preferred_element_type=int32") == 3  # forward, dx, dW


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_sharded_equals_unsharded():
    mesh = jax.make_mesh((4, 2), ("data", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    x = jax.random.normal(jax.random.key(5), (8, 6, 32))
    g = jax.random.normal(jax.random.key(6), (8, 6, 24))
    key = jax.random.key(9)
    f = lambda x, k: grads(W8, A8, "int8", key, x, k, g)
    plain = jax.jit(f)(x, KERNEL)
    x_spec, k_spec = NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "tensor"))
    sharded = jax.jit(f, in_shardings=(x_spec, k_spec), out_shardings=(x_spec, k_spec))(
        jax.device_put(x, x_spec), jax.device_put(KERNEL, k_spec))
    assert sharded[0].sharding == x_spec and sharded[1].sharding == k_spec
    for a, b in zip(plain, sharded, strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("backward", ["fp8", "INT8", None, 8])
def test_bad_backward_is_refused(backward):
    with pytest.raises(ValueError, match="backward must be one of"):
        qat_dense(X, KERNEL, W8, A8, backward=backward)
    with pytest.raises(ValueError, match="backward must be one of"):
        LayerQuant(W8, A8, integer_forward=True, backward=backward)
    with pytest.raises(ValueError, match="backward must be one of"):
        Method("ste", 8, 8, integer_forward=True, backward=backward)


@pytest.mark.parametrize("key", [42, jnp.zeros(3, jnp.uint32), jnp.zeros(2, jnp.float32),
                                 jax.random.split(jax.random.key(0), 2)],
                         ids=["int", "uint32[3]", "float32[2]", "two keys"])
def test_bad_keys_are_refused(key):
    with pytest.raises(TypeError, match="key must be a single PRNG key"):
        qat_dense(X, KERNEL, W8, A8, backward="int8", key=key)


def test_a_key_without_the_int8_backward_is_refused():
    with pytest.raises(ValueError, match="key= is for backward='int8'"):
        qat_dense(X, KERNEL, W8, A8, key=jax.random.key(0))


def test_differentiating_without_a_key_names_the_fix():
    with pytest.raises(ValueError, match="needs a PRNG key to differentiate"):
        grads(W8, A8, "int8", None)


def test_int8_backward_needs_the_integer_forward():
    with pytest.raises(ValueError, match="set integer_forward=True"):
        LayerQuant(W8, A8, backward="int8")
    with pytest.raises(ValueError, match="set integer_forward=True"):
        Method("ste", 8, 8, backward="int8")


def test_dense_grads_refuses_formats_without_int8_codes():
    xi, xs = int8.quantize_operand(X, A8, -1)
    wi, ws = int8.quantize_operand(KERNEL, W8, 0)
    with pytest.raises(ValueError, match="no int8 code"):
        QB.dense_grads(G, xi, xs, wi, ws, jax.random.key(0), x_format=qjax.FloatFormat("e4m3"),
                       w_format=W8.format)


def test_method_keeps_the_float_backward_where_there_is_no_integer_forward():
    assert STEP8.layer_quant(dense_layout((32, 24))).backward == "int8"
    assert STEP8.layer_quant(conv_layout((3, 3, 8, 16))).backward == "float"
    assert Method("ste", 8, 8, integer_forward=True).layer_quant(
        dense_layout((32, 24))).backward == "float"


def test_key_source_and_set_quant_rngs_check_their_arguments():
    with pytest.raises(TypeError, match="source must be a callable"):
        with key_source(jax.random.key(0)):
            pass
    with pytest.raises(TypeError, match="rngs must be an nnx.Rngs"):
        set_quant_rngs(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), jax.random.key(0))


# ------------------------------------------------------------------------------ Flax layers
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.gelu(nn.Dense(32)(x)))


def linen_loss(qm, params, x, y, key=None):
    rngs = {} if key is None else {"rngs": {"quant": key}}
    return jnp.mean((qm.apply({"params": params}, x, **rngs) - y) ** 2)


def test_linen_keys_come_from_the_quant_stream():
    qm = quantize_model(MLP(), {"Dense_.*": STEP8})
    x = jax.random.normal(jax.random.key(0), (16, 8))
    y = jnp.sin(x.sum(-1, keepdims=True))
    # init and forward-only applies need no key
    params, y0 = jax.jit(lambda k: (lambda v: (v["params"], qm.apply(v, x)))(qm.init(k, x)))(
        jax.random.key(1))
    assert y0.shape == (16, 1) and bool(jnp.all(jnp.isfinite(y0)))
    grad = jax.jit(jax.grad(lambda p, k: linen_loss(qm, p, x, y, k)))
    g1, g2 = grad(params, jax.random.key(5)), grad(params, jax.random.key(5))
    g3 = grad(params, jax.random.key(6))
    jax.tree.map(np.testing.assert_array_equal, g1, g2)
    assert bool(jnp.any(g1["Dense_0"]["kernel"] != g3["Dense_0"]["kernel"]))
    with pytest.raises(ValueError, match="rngs=\\{'quant': key\\}"):
        jax.grad(lambda p: linen_loss(qm, p, x, y))(params)


class TwoLayers(nn.Module):
    """An einsum projection and a dense head, as explicit qjax layers (``explicit=True``) or as
    Flax layers for :func:`quantize_model` (same module paths, same parameters)."""

    method: Method | None = None
    explicit: bool = True

    @nn.compact
    def __call__(self, x, qat: bool = True):  # (b, t, 8) -> (b, t, 1); qat: explicit layers only
        shape, eq = (8, 2, 16), "btd,dnh->btnh"
        if self.explicit:
            proj = functools.partial(qjax.nn.linen.QEinsum(shape, eq, method=self.method,
                                                           name="proj"), qat=qat)
            head = functools.partial(qjax.nn.linen.QDense(1, method=self.method, name="head"),
                                     qat=qat)
        else:
            proj, head = nn.Einsum(shape, eq, use_bias=False, name="proj"), nn.Dense(1, name="head")
        h = proj(x)
        return head(nn.gelu(h.reshape(h.shape[:-2] + (32,))))


LAYERS_X = jax.random.normal(jax.random.key(0), (4, 4, 8))
LAYERS_Y = jnp.sin(LAYERS_X.sum(-1, keepdims=True))


def layers_grad(model, params, key=None):
    """Gradient of the mean squared error of ``model`` (``rngs={"quant": key}`` if given)."""
    rngs = {} if key is None else {"rngs": {"quant": key}}
    return jax.grad(lambda p: jnp.mean(
        (model.apply({"params": p}, LAYERS_X, **rngs) - LAYERS_Y) ** 2))(params)


def test_explicit_linen_layers_draw_the_keys_of_the_rewrite():
    explicit = TwoLayers(STEP8)
    params = explicit.init(jax.random.key(1), LAYERS_X)["params"]
    rewritten = quantize_model(TwoLayers(explicit=False), {"proj|head": STEP8})
    grad = jax.jit(layers_grad, static_argnums=0)
    g1, g1b = grad(explicit, params, jax.random.key(5)), grad(explicit, params, jax.random.key(5))
    jax.tree.map(np.testing.assert_array_equal, g1, g1b)
    # Same module paths and rng stream: the same keys, so the same gradients as the rewrite's.
    jax.tree.map(np.testing.assert_array_equal, g1,
                 grad(rewritten, params, jax.random.key(5)))
    g2 = grad(explicit, params, jax.random.key(6))
    for layer in ("proj", "head"):
        assert bool(jnp.any(g1[layer]["kernel"] != g2[layer]["kernel"])), layer
    # The int8 backward ran in both layers: forward, dx and dW int8 dots each.
    jaxpr = str(jax.make_jaxpr(lambda p: layers_grad(explicit, p, jax.random.key(5)))(params))
    assert jaxpr.count("preferred_element_type=int32") == 6


def test_explicit_linen_layers_without_the_quant_stream():
    explicit = TwoLayers(STEP8)
    params = explicit.init(jax.random.key(1), LAYERS_X)["params"]  # init draws no key
    y = explicit.apply({"params": params}, LAYERS_X)  # nor does a forward-only apply
    assert y.shape == (4, 4, 1)
    with pytest.raises(ValueError, match="rngs=\\{'quant': key\\}"):
        layers_grad(explicit, params)
    # The float backward and qat=False need no key: no stream, no draw.
    float_bwd = TwoLayers(Method("ste", 8, 8, integer_forward=True))
    assert layers_grad(float_bwd, params)["head"]["kernel"].shape == (32, 1)
    no_qat = jax.grad(lambda p: jnp.sum(explicit.apply({"params": p}, LAYERS_X, qat=False)))
    assert no_qat(params)["proj"]["kernel"].shape == (8, 2, 16)


def test_explicit_linen_layers_are_unbiased():
    explicit = TwoLayers(STEP8)
    params = explicit.init(jax.random.key(1), LAYERS_X)["params"]
    n = 64
    keys = jax.random.split(jax.random.key(12), n)
    samples = jax.jit(jax.vmap(lambda k: layers_grad(explicit, params, k)))(keys)
    ref = jax.jit(layers_grad, static_argnums=0)(
        TwoLayers(Method("ste", 8, 8, integer_forward=True)), params)
    for layer in ("proj", "head"):
        s, r = samples[layer]["kernel"], ref[layer]["kernel"]
        sem = s.std(0) / np.sqrt(n)  # standard error of the mean, per entry
        z = jnp.abs(s.mean(0) - r) / (sem + 1e-6 * jnp.abs(r).max())
        assert float(z.max()) < 5.5, layer
        assert float(jnp.abs(s.mean(0) - r).max()) < 0.05 * float(jnp.abs(r).max()), layer


class RawKernel(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.lecun_normal(), (8, 4))
        return jnp.einsum("bk,kn->bn", x, w)


def test_raw_kernels_take_their_key_from_the_owning_module():
    qm = quantize_model(RawKernel(), {"w": STEP8})
    x = jax.random.normal(jax.random.key(0), (16, 8))
    params = jax.eval_shape(lambda k: qm.init(k, x), jax.random.key(1))["params"]
    loss = lambda p, **rngs: jnp.sum(qm.apply({"params": p}, x, **rngs) ** 2)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p, k: loss(p, rngs={"quant": k})))(
        params, jax.random.key(2)))
    assert jaxpr.count("preferred_element_type=int32") == 3  # forward, dx, dW
    with pytest.raises(ValueError, match="needs a PRNG key"):
        jax.make_jaxpr(jax.grad(loss))(params)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(8, 32, rngs=rngs)
        self.b = qjax.nn.nnx.QDense(32, 4, method=STEP8, rngs=rngs)

    def __call__(self, x):
        return self.b(nnx.gelu(self.a(x)))


def test_nnx_layers_draw_successive_keys_from_their_rngs():
    x = jax.random.normal(jax.random.key(0), (16, 8))

    def fresh():
        model = quantize_model(NnxMLP(nnx.Rngs(0)), {"a": STEP8})
        assert set_quant_rngs(model, nnx.Rngs(quant=3)) == 2
        return model

    @nnx.jit
    def grad(model):
        return nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)

    m1, m2 = fresh(), fresh()
    s1, s1b, s2 = nnx.state(grad(m1)), nnx.state(grad(m1)), nnx.state(grad(m2))
    jax.tree.map(np.testing.assert_array_equal, s1, s2)  # same seed, same gradients
    assert bool(jnp.any(s1["a"]["inner"]["kernel"][...] != s1b["a"]["inner"]["kernel"][...]))
    assert bool(jnp.any(s1["b"]["kernel"][...] != s1b["b"]["kernel"][...]))
    set_quant_rngs(m1, None)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        grad(m1)


def test_tiny_training_run_matches_the_float_backward():
    # Toy regression with a two-layer integer-forward MLP, Adam, 40 steps; the int8 backward's
    # key folds in the step.
    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = jnp.sin(x @ jax.random.normal(jax.random.key(1), (8, 1)))
    params = {"w1": jax.random.normal(jax.random.key(2), (8, 32)) / np.sqrt(8),
              "w2": jax.random.normal(jax.random.key(3), (32, 1)) / np.sqrt(32)}
    tx = optax.adam(1e-2)

    def loss(p, key, backward):
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        h = jax.nn.gelu(qat_dense(x, p["w1"], W8, A8, backward=backward, key=k1))
        return jnp.mean((qat_dense(h, p["w2"], W8, A8, backward=backward, key=k2) - y) ** 2)

    @functools.partial(jax.jit, static_argnums=0)
    def train(backward, params):
        def step(carry, i):
            p, state = carry
            key = None if backward == "float" else jax.random.fold_in(jax.random.key(4), i)
            value, g = jax.value_and_grad(loss)(p, key, backward)
            updates, state = tx.update(g, state, p)
            return (optax.apply_updates(p, updates), state), value
        return jax.lax.scan(step, (params, tx.init(params)), jnp.arange(40))[1]

    f_losses, i_losses = train("float", params), train("int8", params)
    first, f_end, i_end = float(f_losses[0]), float(f_losses[-1]), float(i_losses[-1])
    assert f_end < 0.3 * first and i_end < 0.3 * first
    # Same data, init and schedule: the int8 backward's noise moves the end loss by < 1% here.
    assert abs(i_end - f_end) < 0.05 * f_end, (f_end, i_end)
