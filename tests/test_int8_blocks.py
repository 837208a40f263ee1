"""Tests for qjax.int8_blocks (blockwise int8 products) and W4A8 serving (qjax.convert.serve)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax import PerGroup, PerRow
from qjax import convert as QC
from qjax import presets as P
from qjax._src import int8_blocks as IB
from qjax.models.llama import BLOCK_LINEARS, Llama, LlamaConfig
from qjax.nn import LayerQuant, quantize_model

X = jax.random.normal(jax.random.key(0), (3, 5, 64))
KERNEL = jax.random.normal(jax.random.key(1), (64, 48))
A8 = qjax.QuantSpec("int8", PerRow(-1))
W4 = qjax.QuantSpec("int4", PerRow(0))

PAIRS = {
    "q4_0 x q8_0": (P.gguf_q4_0(axis=0), P.gguf_q8_0(-1)),
    "torchao 8da4w": (P.torchao_int4_weight(32, axis=0), P.torchao_int8_per_token_activation()),
    "int4 group 16 x int8 tensor": (qjax.QuantSpec("int4", PerGroup(0, 16)),
                                    qjax.QuantSpec("int8", "tensor")),
    "uint4 zero point x int8 group 32": (
        qjax.QuantSpec("uint4", PerGroup(0, 16), qjax.AbsMax(symmetric=False)),
        qjax.QuantSpec("int8", PerGroup(-1, 32))),
    "midrise3 x int8 row": (qjax.QuantSpec("midrise3", PerRow(0)), A8),
}


def _int64_reference(x, kernel, wspec, aspec):
    """The module's formula from the codes of qjax.quantize, in numpy int64 / float64."""
    qx, qw = qjax.quantize(x, aspec), qjax.quantize(kernel.T, qjax.convert.serving_spec(wspec))
    k = x.shape[-1]
    ga = aspec.granularity.size if isinstance(aspec.granularity, PerGroup) else k
    gw = wspec.granularity.size if isinstance(wspec.granularity, PerGroup) else k
    b = min(ga, gw)

    def per_element(a, rows, g):
        a = np.broadcast_to(np.asarray(a, np.float64).reshape(-1, k // g) if np.size(a) > 1
                            else np.asarray(a, np.float64).reshape(1, 1), (rows, k // g))
        return np.repeat(a, g, axis=1)

    cx = np.asarray(qx.codes_float32(), np.int64).reshape(-1, k)
    cw = np.asarray(qw.codes_float32(), np.int64)
    m, n = cx.shape[0], cw.shape[0]
    sx, sw = per_element(qx.scale, m, ga), per_element(qw.scale, n, gw)
    if qx.zero_point is not None:
        cx = cx - per_element(qx.zero_point, m, ga).astype(np.int64)
    if qw.zero_point is not None:
        cw = cw - per_element(qw.zero_point, n, gw).astype(np.int64)
    if isinstance(wspec.format, qjax.Midrise):  # level s (q + 1/2) = (s / 2) (2q + 1)
        cw, sw = 2 * cw + 1, sw / 2
    y = np.zeros((m, n))
    for j in range(k // b):
        s = slice(j * b, (j + 1) * b)
        acc = cx[:, s] @ cw[:, s].T  # exact int64
        y += acc * (sx[:, j * b][:, None] * sw[:, j * b][None, :])
    return y.reshape(x.shape[:-1] + (n,))


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_matmul_is_the_blockwise_integer_formula_and_the_fake_quant_product(pair):
    wspec, aspec = PAIRS[pair]
    assert IB.block_reason(wspec, aspec) is None
    w = QC.kernel_to_qarray(KERNEL, wspec)
    y = IB.matmul(X, w, aspec)
    assert y.shape == (3, 5, 48) and y.dtype == jnp.float32
    ref = _int64_reference(X, KERNEL, wspec, aspec)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-6, atol=2e-6)
    # The same codes as fake quant: only the float accumulation order differs.
    fq = qjax.fake_quant(X, aspec) @ qjax.fake_quant(KERNEL, wspec)
    np.testing.assert_allclose(y, fq, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(fq))))
    np.testing.assert_array_equal(jax.jit(IB.matmul, static_argnums=2)(X, w, aspec), y)
    np.testing.assert_array_equal(IB.matmul(X, qjax.relayout(w, packed=False), aspec), y)


def test_block_sums_are_exact_int32():
    # Unit scales: the float32 result is the integer sum itself (|sum| < 2^24).
    xq = jax.random.randint(jax.random.key(3), (4, 64), -128, 128).astype(jnp.int8)
    wq = jax.random.randint(jax.random.key(4), (6, 64), -15, 16).astype(jnp.int8)
    xz = jax.random.randint(jax.random.key(5), (4, 2), -128, 128)
    ones = jnp.ones
    y = IB.block_matmul(xq, ones((4, 2)), xz, wq, ones((6, 2)))
    xi, wi = np.asarray(xq, np.int64), np.asarray(wq, np.int64)
    ref = sum((xi[:, s] - np.asarray(xz)[:, [j]]) @ wi[:, s].T
              for j, s in enumerate((slice(0, 32), slice(32, 64))))
    np.testing.assert_array_equal(np.asarray(y), ref.astype(np.float32))


@pytest.mark.parametrize("wspec,aspec,match", [
    (qjax.QuantSpec("int8", PerRow(0), qjax.AbsMax(symmetric=False)), A8, "8-bit weight"),
    (W4, qjax.QuantSpec("int8", PerRow(-1), rounding="stochastic"), "rounding"),
    (qjax.QuantSpec("int4", PerGroup(0, 24)), qjax.QuantSpec("int8", PerGroup(-1, 32)),
     "divide one another"),
    (W4, qjax.QuantSpec("int8", PerRow(-1), "absmax", "lsq"), "learned-scale"),
    (W4, qjax.QuantSpec("e4m3", PerRow(-1)), "no int8 code"),
    (W4, qjax.QuantSpec("int8", PerRow(0)), "granularity"),
    (None, A8, "both"),
])
def test_block_reason_names_what_is_missing(wspec, aspec, match):
    reason = IB.block_reason(wspec, aspec)
    assert reason is not None and match in reason


def test_matmul_argument_errors():
    w = QC.kernel_to_qarray(KERNEL, W4)
    with pytest.raises(ValueError, match="no blockwise int8 product.*rounding"):
        IB.matmul(X, w, A8.replace(rounding="stochastic"))
    with pytest.raises(ValueError, match=r"need x \(..., K\)"):
        IB.matmul(X[..., :32], w, A8)
    with pytest.raises(TypeError, match="w must be a 2-D qjax.QArray"):
        IB.matmul(X, KERNEL, A8)
    with pytest.raises(TypeError, match="x must be"):
        IB.matmul(X.astype(jnp.int32), w, A8)
    with pytest.raises(ValueError, match="must divide K"):
        IB.block_length(qjax.QuantSpec("int4", PerGroup(0, 48)), A8, 64)


# --- W4A8 serving ----------------------------------------------------------------------------

CFG = LlamaConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=2, hidden=128, max_seq_len=8)
IDS = jax.random.randint(jax.random.key(1), (2, 8), 0, 256)


def _llama(lq):
    qm = quantize_model(Llama(CFG), {BLOCK_LINEARS: lq})
    params = qm.init(jax.random.key(0), IDS)["params"]
    return qm, params


@pytest.mark.parametrize("wspec,aspec", [(W4, A8), (P.gguf_q4_0(axis=0), P.gguf_q8_0(-1))],
                         ids=["w4a8", "q4_0xq8_0"])
def test_opt_in_act_spec_serves_a_weight_only_model_as_if_trained_with_it(wspec, aspec):
    qm_w, params = _llama(LayerQuant(weight=wspec))
    qm_wa, _ = _llama(LayerQuant(weight=wspec, activation=aspec))
    sp = QC.convert(params, qm_w, packed=False)
    assert not sp["blocks_0"]["attn"]["q"]["kernel"].packed
    lq = qm_w.layers["blocks_0/attn/q"]
    want = "int8" if wspec is W4 else "int8_blocks"
    assert QC.integer_product(lq, act_spec=aspec) == want and QC.integer_product(lq) is None
    serve = jax.jit(lambda p, i, a: QC.serve(qm_w, p, i, act_spec=a), static_argnums=2)
    y = serve(sp, IDS, aspec)
    qat = qm_wa.apply({"params": params}, IDS)  # the same params trained with activations
    np.testing.assert_allclose(y, qat, rtol=0, atol=5e-5)
    weight_only = serve(sp, IDS, None)
    np.testing.assert_array_equal(weight_only, jax.jit(qm_w.apply)({"params": params}, IDS))
    assert float(jnp.max(jnp.abs(weight_only - y))) > 1e-4  # act_spec changes the numerics


def test_a_model_trained_with_the_torchao_8da4w_presets_serves_with_block_products():
    lq = LayerQuant(weight=P.torchao_int4_weight(32, axis=0),
                    activation=P.torchao_int8_per_token_activation())
    qm, params = _llama(lq)
    assert QC.integer_product(qm.layers["blocks_0/attn/q"]) == "int8_blocks"
    sp = QC.convert(params, qm)
    y = jax.jit(lambda p, i: QC.serve(qm, p, i))(sp, IDS)
    np.testing.assert_allclose(y, qm.apply({"params": params}, IDS), rtol=0, atol=5e-5)


class _Mlp(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(64, 96, rngs=rngs)
        self.down = nnx.Linear(96, 32, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def test_nnx_serving_model_takes_the_act_spec_and_unpacked_kernels():
    x = jax.random.normal(jax.random.key(7), (4, 64))
    model = quantize_model(_Mlp(nnx.Rngs(0)), {r".*": LayerQuant(weight=W4)})
    trained = quantize_model(_Mlp(nnx.Rngs(0)), {r".*": LayerQuant(weight=W4, activation=A8)})
    served = QC.convert(model, packed=False)
    kernels = [m.kernel.get_value() for _, m in nnx.iter_modules(served)
               if isinstance(m, QC.ServingLayer)]
    assert len(kernels) == 2 and not any(k.packed for k in kernels)
    np.testing.assert_allclose(QC.serve(served, x, act_spec=A8), trained(x), rtol=0, atol=2e-5)
    np.testing.assert_array_equal(QC.serve(served, x), model(x))
    with pytest.raises(TypeError, match="act_spec"):
        QC.serve(served, x, act_spec="int8")
