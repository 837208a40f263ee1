"""Tests for qjax.kernels: interpret-mode Pallas kernels against the XLA reference and against
``fake_quant(x, act_spec) @ dequantize(w).T``; padding, gradients, races, validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import qjax
from qjax import kernels as K
from qjax._src.kernels import blocks as B
from qjax._src.kernels.activation import quantize_rows, row_block
from qjax.methods import quest

CASES = {
    "w8a8": (qjax.QuantSpec("int8", qjax.PerRow(-1)), qjax.QuantSpec("int8", qjax.PerRow(-1))),
    "w4a16": (qjax.QuantSpec("int4", qjax.PerGroup(-1, 32)), None),
    "w4a16_zero_point": (qjax.QuantSpec("int4", qjax.PerGroup(-1, 64),
                                        qjax.AbsMax(symmetric=False)), None),
    "w8a16": (qjax.QuantSpec("int8", qjax.PerRow(-1)), None),
    "w4a4_quest": (quest.spec(4, hadamard_mode=None), quest.spec(4, hadamard_mode=None)),
    "fp8": (qjax.QuantSpec("e4m3", qjax.PerRow(-1)), qjax.QuantSpec("e4m3", qjax.PerRow(-1))),
    "w1_sign": (quest.spec(1, hadamard_mode=None), None),
    "w1a1_quest": (quest.spec(1, hadamard_mode=None), quest.spec(1, hadamard_mode=None)),
    "ternary_a8": (qjax.QuantSpec("ternary", qjax.PerRow(-1), "rms_gaussian"),
                   qjax.QuantSpec("int8", qjax.PerRow(-1))),
    "w3a3_quest_unpacked": (quest.spec(3, hadamard_mode=None), quest.spec(3, hadamard_mode=None)),
    "fp8_weight_only": (qjax.QuantSpec("e4m3", qjax.PerRow(-1)), None),
}
# Integer kinds with order-independent statistics (absmax): bit-exact for every shape.
BIT_EXACT = ("w8a8", "ternary_a8")
SHAPES = [(1, 130, 192), (9, 72, 320)]  # (M, N, K): batch 1, odd N, K not a block multiple
# Compile time dominates: the main cases run both shapes, the others the odd-M one only.
MATRIX = [(name, shape) for name in sorted(CASES) for shape in SHAPES
          if name in ("w8a8", "w4a16", "w4a4_quest") or shape == SHAPES[1]]


def _data(m, n, k, dtype=jnp.float32, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (n, k), jnp.float32).astype(dtype)
    return x, w


@functools.partial(jax.jit, static_argnames=("act_spec", "backend", "block_sizes", "interpret"))
def _qmm(x, w, act_spec, backend, block_sizes=None, interpret=None):
    return K.quantized_matmul(x, w, act_spec=act_spec, backend=backend, block_sizes=block_sizes,
                              interpret=interpret)


def _fake_quant_reference(x, w, act_spec):
    xa = x if act_spec is None else qjax.fake_quant(x, act_spec)
    return jnp.matmul(xa.astype(jnp.float32), qjax.dequantize(w).astype(jnp.float32).T,
                      precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize(("name", "shape"), MATRIX, ids=str)
def test_interpret_matches_xla_and_fake_quant(name, shape):
    wspec, aspec = CASES[name]
    x, wf = _data(*shape)
    w = qjax.quantize(wf, wspec)
    y_xla = _qmm(x, w, aspec, "xla")
    y_pl = _qmm(x, w, aspec, "interpret")
    ref = _fake_quant_reference(x, w, aspec)
    assert y_pl.shape == y_xla.shape == (shape[0], shape[1]) and y_pl.dtype == jnp.float32
    tol = 2e-6 * float(jnp.abs(ref).max())
    np.testing.assert_allclose(y_xla, ref, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(y_pl, ref, rtol=1e-5, atol=tol)
    if name in BIT_EXACT:
        np.testing.assert_array_equal(y_pl, y_xla)
    else:
        np.testing.assert_allclose(y_pl, y_xla, rtol=1e-6, atol=tol)


def test_quest_rms_path_is_bit_exact_when_row_blocks_match():
    # XLA CPU's row-sum order depends on the number of rows of the array it reduces (a 32-row
    # block sums some rows differently from a 5-row array), so the RMS scale of a row can differ
    # by an ulp between a Pallas block and a differently shaped reference. With M equal to the
    # kernel's row block the shapes coincide and the whole integer path is bit-exact.
    wspec, aspec = CASES["w4a4_quest"]
    x, wf = _data(32, 72, 320, seed=3)
    w = qjax.quantize(wf, wspec)
    np.testing.assert_array_equal(_qmm(x, w, aspec, "interpret"), _qmm(x, w, aspec, "xla"))


@pytest.mark.parametrize("name", ["w8a8", "w4a16_zero_point", "w4a4_quest", "w1_sign"])
def test_gpu_kernels_in_interpreter(name):
    # The Triton-lowered kernel body (loop over K inside the program) run by the interpreter.
    wspec, aspec = CASES[name]
    x, wf = _data(*SHAPES[1], seed=10)
    w = qjax.quantize(wf, wspec)
    y = _qmm(x, w, aspec, "pallas_gpu", interpret=True)
    y_xla = _qmm(x, w, aspec, "xla")
    if name in BIT_EXACT:
        np.testing.assert_array_equal(y, y_xla)
    np.testing.assert_allclose(y, y_xla, rtol=1e-6, atol=2e-6 * float(jnp.abs(y_xla).max()))


@pytest.mark.parametrize("name", ["w8a8", "w4a4_quest", "fp8", "w1a1_quest"])
def test_activation_codes_equal_qjax_quantize(name):
    # Same shape and both under jit: XLA CPU sums rows in an order that depends on the array's
    # shape and on fusion (eager and jit differ by an ulp in some RMS scales), so bit-equality of
    # statistics-based scales is promised for equal shapes under jit.
    aspec = CASES[name][1]
    x, _ = _data(32, 1, 200, seed=1)
    qa = jax.jit(qjax.quantize, static_argnums=1)(x, aspec)
    q = qa.codes_float32()
    expected = 2 * q + 1 if isinstance(aspec.format, qjax.Midrise) else q
    scale = qa.scale * (0.5 if isinstance(aspec.format, qjax.Midrise) else 1.0)
    for codes, s in (jax.jit(K.activation_codes, static_argnums=1)(x, aspec),
                     quantize_rows(x, aspec, 32, interpret=True)):
        np.testing.assert_array_equal(codes.astype(jnp.float32), expected)
        np.testing.assert_array_equal(s, scale)
    if isinstance(aspec.format, qjax.Midrise):
        assert set(np.unique(np.asarray(K.activation_codes(x, aspec)[0])) % 2) == {1}


@pytest.mark.parametrize("name", ["w8a8", "w4a16"])
def test_bfloat16_inputs(name):
    wspec, aspec = CASES[name]
    x, wf = _data(3, 130, 256, jnp.bfloat16, seed=2)
    w = qjax.quantize(wf, wspec)
    y_pl, y_xla = _qmm(x, w, aspec, "interpret"), _qmm(x, w, aspec, "xla")
    assert y_pl.dtype == jnp.bfloat16
    if name in BIT_EXACT:
        np.testing.assert_array_equal(y_pl, y_xla)
    ref = _fake_quant_reference(x, w, aspec)
    np.testing.assert_allclose(y_pl.astype(jnp.float32), ref, rtol=2e-2,
                               atol=1e-2 * float(jnp.abs(ref).max()))


def test_padding_adds_exact_zeros():
    # K = 192 pads to one 256 block: the kernel on the padded problem, built explicitly (zero
    # columns of x and of the weight), gives the same bits on the true rows and columns.
    wspec = CASES["w4a16"][0]
    x, wf = _data(5, 130, 192, seed=4)
    w = qjax.quantize(wf, wspec)
    bs = K.BlockSizes(8, 128, 256)
    y = _qmm(x, w, None, "interpret", bs)
    xp = jnp.pad(x, ((0, 3), (0, 64)))
    wp = qjax.quantize(jnp.pad(wf, ((0, 126), (0, 64))), wspec)
    y_full = _qmm(xp, wp, None, "interpret", bs)
    np.testing.assert_array_equal(y, y_full[:5, :130])


def test_leading_batch_dims_and_out_dtype():
    wspec, aspec = CASES["w8a8"]
    x, wf = _data(6, 128, 128, seed=5)
    w = qjax.quantize(wf, wspec)
    y = K.quantized_matmul(x.reshape(2, 3, 128), w, act_spec=aspec, backend="auto",
                           out_dtype=jnp.bfloat16)  # auto is xla on CPU
    assert y.shape == (2, 3, 128) and y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y.reshape(6, 128),
                                  _qmm(x, w, aspec, "xla").astype(jnp.bfloat16))


def test_hadamard_half_specs_use_caller_rotated_x():
    # QuEST: w holds codes of W H; the caller passes x H; the product is Q(xH) Q(WH)^T.
    aspec = quest.spec(4)  # half Hadamard, block 128
    x, wf = _data(2, 128, 128, seed=6)
    w = jax.jit(qjax.quantize, static_argnums=1)(wf, aspec)
    xh = jax.jit(qjax.hadamard_transform, static_argnums=1)(x, 128)
    y = _qmm(xh, w, aspec, "xla")
    ref = jax.jit(functools.partial(quest.dense, bits_x=4, bits_w=4))(x, wf.T)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("name", ["w4a16", "w4a4_quest"])
def test_gradient_is_the_fake_quant_matmul_gradient(name):
    wspec, aspec = CASES[name]
    x, wf = _data(3, 128, 256, seed=7)
    w = qjax.quantize(wf, wspec)
    g = jax.random.normal(jax.random.key(8), (3, 128))
    loss = lambda f: lambda x: jnp.sum(f(x) * g)
    dx = jax.grad(loss(lambda x: K.quantized_matmul(x, w, act_spec=aspec,
                                                    backend="interpret")))(x)
    dx_ref = jax.grad(loss(lambda x: _fake_quant_reference(x, w, aspec)))(x)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    if aspec is not None:  # the trust mask zeroes some entries
        assert 0 < int(jnp.sum(dx_ref == 0)) < dx.size


def test_weight_cotangent_is_zero():
    wspec, aspec = CASES["w8a8"]
    x, wf = _data(2, 128, 128)
    w = qjax.quantize(wf, wspec)
    dw = jax.grad(lambda w: jnp.sum(K.quantized_matmul(x, w, act_spec=aspec, backend="xla")),
                  allow_int=True)(w)
    assert float(jnp.abs(dw.scale).max()) == 0.0


def test_no_races_on_two_simulated_cores():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

    wspec = CASES["w4a16"][0]
    x, wf = _data(16, 256, 512, seed=9)
    w = qjax.quantize(wf, wspec)
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    y = _qmm(x, w, None, "interpret", K.BlockSizes(8, 128, 256), params)  # grid (2, 2, 2)
    assert ipc.races is not None and not ipc.races.races_found
    np.testing.assert_allclose(y, _qmm(x, w, None, "xla"), rtol=1e-5, atol=1e-4)


def test_backend_resolution():
    x, wf = _data(2, 128, 256)
    w4 = qjax.quantize(wf, CASES["w4a16"][0])
    case = K.classify(x.shape, w4, None)
    assert K.resolve_backend("auto", case, "cpu") == "xla"
    assert K.resolve_backend("auto", case, "tpu") == "pallas_tpu"
    assert K.resolve_backend("auto", case, "gpu") == "pallas_gpu"
    odd_group = K.classify((2, 240), qjax.quantize(wf[:, :240], qjax.QuantSpec(
        "int4", qjax.PerGroup(-1, 48))), None)
    assert K.resolve_backend("auto", odd_group, "gpu") == "xla"  # Triton needs powers of two
    assert K.resolve_backend("auto", odd_group, "tpu") == "pallas_tpu"  # lcm(8*48, 256) blocks
    with pytest.raises(ValueError, match="power of two"):
        K.resolve_backend("pallas_gpu", odd_group)
    with pytest.raises(ValueError, match="backend must be one of"):
        K.resolve_backend("cuda", case)


def test_default_blocks_are_legal_for_any_group_size():
    for g in (8, 16, 32, 48, 64, 96, 128, 256):
        wf = jax.ShapeDtypeStruct((128, 4 * g * 8), jnp.float32)
        spec = qjax.QuantSpec("int4", qjax.PerGroup(-1, g))
        w = jax.eval_shape(functools.partial(qjax.quantize, spec=spec), wf)
        case = K.classify((1, wf.shape[1]), w, None)
        bs = K.default_hadamard_blocks(case, 1, jnp.float32, jnp.float32, "pallas_tpu")
        B.validate_block_sizes(bs, case, jnp.float32, jnp.float32, "pallas_tpu")
        assert (bs.block_k // g) % 8 == 0 and bs.block_k % 256 == 0


def test_invalid_arguments_raise():
    x, wf = _data(2, 128, 256)
    w8, a8 = CASES["w8a8"]
    w = qjax.quantize(wf, w8)
    w4 = qjax.quantize(wf, CASES["w4a16"][0])
    with pytest.raises(TypeError, match="w must be a qjax.QArray"):
        K.quantized_matmul(x, wf)
    with pytest.raises(TypeError, match="x must be a floating array"):
        K.quantized_matmul(x.astype(jnp.int32), w)
    with pytest.raises(ValueError, match="x must have shape"):
        K.quantized_matmul(x[:, :128], w)
    with pytest.raises(ValueError, match="backend must be one of"):
        K.quantized_matmul(x, w, backend="gpu")
    with pytest.raises(ValueError, match="per token"):
        K.quantized_matmul(x, w, act_spec=qjax.QuantSpec("int8", qjax.PerRow(0)))
    with pytest.raises(ValueError, match="format pair"):
        K.quantized_matmul(x, w, act_spec=CASES["fp8"][1])
    with pytest.raises(ValueError, match="one scale per output"):
        K.quantized_matmul(x, w4, act_spec=a8)
    with pytest.raises(ValueError, match="block_n must be a multiple of 128"):
        K.quantized_matmul(x, w4, backend="interpret", block_sizes=K.BlockSizes(8, 64, 256))
    with pytest.raises(ValueError, match="block_k must be a multiple of 256"):
        K.quantized_matmul(x, w4, backend="interpret", block_sizes=K.BlockSizes(8, 128, 128))
    with pytest.raises(ValueError, match="block_m must be a multiple of 32"):
        K.quantized_matmul(x, w, act_spec=a8, backend="interpret",
                           block_sizes=K.BlockSizes(8, 128, 128))
    with pytest.raises(ValueError, match="block_m must be positive"):
        K.BlockSizes(0, 128, 128)
    with pytest.raises(TypeError, match="block_n must be an int"):
        K.BlockSizes(8, 128.0, 128)
    with pytest.raises(ValueError, match="interpret applies to the Pallas backends"):
        K.quantized_matmul(x, w, backend="xla", interpret=True)
    with pytest.raises(ValueError, match="VMEM"):
        K.quantized_matmul(x, w4, backend="interpret", vmem_limit_bytes=2**16)
    with pytest.raises(TypeError, match="out_dtype"):
        K.quantized_matmul(x, w, out_dtype=jnp.int32)
    wg = jax.eval_shape(lambda v: qjax.quantize(v, qjax.QuantSpec("int4", qjax.PerGroup(-1, 128))),
                        jax.ShapeDtypeStruct((128, 4096), jnp.float32))
    with pytest.raises(ValueError, match="scale rows per block must be a multiple of 8"):
        K.quantized_matmul(jnp.zeros((1, 4096)), wg, backend="interpret",
                           block_sizes=K.BlockSizes(8, 128, 512))
    with pytest.raises(ValueError, match="multiple of the 2 codes per byte"):
        w_odd = qjax.quantize(jnp.zeros((8, 30)), qjax.QuantSpec("int4", qjax.PerGroup(-1, 3)))
        K.classify((1, 30), w_odd, None)


def test_activation_row_block_fits_vmem():
    # 4096-wide rows: 32 rows take ~1.3 MB; a 256-row block is cut down to fit 4 MiB.
    assert row_block(256, 4096, jnp.float32, 256, 2**30) == 256
    bm = row_block(256, 4096, jnp.float32, 256, 4 * 2**20)
    assert bm % 32 == 0 and 256 % bm == 0 and bm < 256
    with pytest.raises(ValueError, match="whole rows"):
        row_block(32, 2**20, jnp.float32, 32, 2**20)
    with pytest.raises(ValueError, match="block_m must be positive"):
        row_block(64, 256, jnp.float32, 0, 2**24)
    with pytest.raises(ValueError, match="block_m must be positive"):
        row_block(64, 256, jnp.float32, -32, 2**24)  # both reported a VMEM shortage
    with pytest.raises(ValueError, match="sublane must be positive"):
        row_block(64, 256, jnp.float32, 64, 2**24, sublane=0)  # range() arg 3 ...
    with pytest.raises(ValueError, match="vmem_limit_bytes must be positive"):
        row_block(64, 256, jnp.float32, 64, -1)
    with pytest.raises(ValueError, match="k must be positive"):
        row_block(64, -5, jnp.float32, 64, 2**24)
    with pytest.raises(ValueError, match="block_m=40 must be a multiple of sublane=32"):
        row_block(64, 256, jnp.float32, 40, 2**24)


A8 = qjax.QuantSpec("int8", qjax.PerRow(-1))


@pytest.mark.parametrize(("spec", "error", "match"), [
    ("int8", TypeError, "spec must be a qjax.QuantSpec, got str"),
    (qjax.QuantSpec("uint8", qjax.PerRow(-1)), ValueError, "spec format uint8"),  # gave 127s
    (qjax.QuantSpec("fp4", qjax.PerRow(-1)), ValueError, "spec format e2m1"),
    (qjax.QuantSpec("int8", qjax.PerRow(-1), qjax.AbsMax(symmetric=False)), ValueError,
     "spec scale must be symmetric"),  # dropped the zero point
    (qjax.QuantSpec("int8", qjax.PerRow(-1), qjax.GgmlMax()), ValueError, "spec scale"),
    (qjax.QuantSpec("int8", qjax.PerGroup(-1, 32)), ValueError,
     r"spec granularity must be one scale per token \(PerRow\(-1\)\) or per tensor"),
    (qjax.QuantSpec("int8", qjax.PerRow(-1), estimator="lsq"), ValueError,
     "spec must not use a learned-scale estimator"),
    (qjax.QuantSpec("int8", qjax.PerRow(-1), scale_dtype="float16"), ValueError,
     "spec scale_dtype must be None"),
    (qjax.QuantSpec("int8", qjax.PerRow(-1), hadamard_block=64), ValueError,
     "spec with a Hadamard rotation must use hadamard_mode='half'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_activation_quantization_refuses_specs_it_cannot_honour(spec, error, match):
    x, _ = _data(32, 8, 64)
    with pytest.raises(error, match=match):
        K.activation_codes(x, spec)
    with pytest.raises(error, match=match):
        quantize_rows(x, spec, 32, interpret=True)


def test_row_kernel_serves_per_token_row_statistics_only():
    # Per-tensor codes are accepted (XLA ops over the whole x), but a block of rows cannot see
    # the whole tensor; an MSE-searched scale is not a Pallas row statistic either.
    x, _ = _data(32, 8, 64)
    per_tensor = qjax.QuantSpec("int8", qjax.PerTensor())
    codes, scale = K.activation_codes(x, per_tensor)
    np.testing.assert_array_equal(codes, qjax.quantize(x, per_tensor).codes)
    np.testing.assert_array_equal(scale, jnp.broadcast_to(qjax.quantize(x, per_tensor).scale,
                                                          (32, 1)))
    with pytest.raises(ValueError, match=r"spec granularity must be PerRow\(-1\) .* row kernel"):
        quantize_rows(x, per_tensor, 32, interpret=True)
    with pytest.raises(ValueError, match="spec scale must be AbsMax or RmsGaussian for the row"):
        quantize_rows(x, qjax.QuantSpec("int8", qjax.PerRow(-1), "mse"), 32, interpret=True)


def test_activation_quantization_arguments():
    x, _ = _data(32, 8, 64)
    codes, scale = K.activation_codes(x, A8)  # the accepted case: quantize's codes, bit for bit
    np.testing.assert_array_equal(codes, qjax.quantize(x, A8).codes)
    np.testing.assert_array_equal(scale, qjax.quantize(x, A8).scale)
    with pytest.raises(TypeError, match="x32 must be a floating array .* int32"):
        K.activation_codes(x.astype(jnp.int32), A8)
    with pytest.raises(ValueError, match="block_m must be positive"):
        quantize_rows(x, A8, 0, interpret=True)  # was a ZeroDivisionError
    with pytest.raises(ValueError, match="x must be 2-D"):
        quantize_rows(x[0], A8, 32, interpret=True)
    with pytest.raises(ValueError, match="block_m=24 must divide the number of rows 32"):
        quantize_rows(x, A8, 24, interpret=True)


def test_int_kind_refuses_a_k_that_overflows_int32():
    wf = jax.ShapeDtypeStruct((2, 140_000), jnp.float32)
    w8 = jax.eval_shape(functools.partial(qjax.quantize, spec=CASES["w8a8"][0]), wf)
    with pytest.raises(ValueError, match=r"K = 140000 .* K <= 131071"):
        K.classify((1, 140_000), w8, A8)
    with pytest.raises(ValueError, match="K = 140000"):  # the xla backend gave -126288.5
        jax.eval_shape(lambda x: K.quantized_matmul(x, w8, act_spec=A8, backend="xla"),
                       jax.ShapeDtypeStruct((1, 140_000), jnp.float32))
    assert K.classify((1, 140_000), w8, None).kind == "float"  # float accumulation: no limit
    w4, a4 = CASES["w4a4_quest"]  # odd 4-bit codes: |u| <= 15, K up to 9.5M
    w4 = jax.eval_shape(functools.partial(qjax.quantize, spec=w4), wf)
    assert K.classify((1, 140_000), w4, a4).kind == "int"


def test_block_size_helpers_validate_their_arguments():
    x, wf = _data(2, 128, 256)
    case = K.classify(x.shape, qjax.quantize(wf, CASES["w4a16"][0]), None)
    with pytest.raises(ValueError, match="m must be positive"):
        K.default_hadamard_blocks(case, 0, jnp.float32, jnp.float32, "pallas_tpu")
    with pytest.raises(ValueError, match="x_dtype=float64 has no TPU tile"):
        K.default_hadamard_blocks(case, 8, np.float64, jnp.float32, "pallas_tpu")  # KeyError 8
    with pytest.raises(ValueError, match="out_dtype=float64 has no TPU tile"):
        B.validate_block_sizes(K.BlockSizes(8, 128, 256), case, jnp.float32, np.float64,
                               "pallas_tpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        K.default_hadamard_blocks(case, 8, jnp.float32, jnp.float32, "bogus")  # gave TPU blocks
    with pytest.raises(TypeError, match="case must be a qjax.kernels.Case"):
        K.default_hadamard_blocks(None, 8, jnp.float32, jnp.float32, "pallas_tpu")
    with pytest.raises(TypeError, match="case must be a qjax.kernels.Case"):
        K.resolve_backend("pallas_gpu", None)
    with pytest.raises(TypeError, match="x_shape must be a tuple"):
        K.classify(256, qjax.quantize(wf, CASES["w4a16"][0]), None)
    with pytest.raises(TypeError, match="act_spec must be a qjax.QuantSpec or None, got str"):
        K.quantized_matmul(x, qjax.quantize(wf, CASES["w8a8"][0]), act_spec="int8")
    assert K.BlockSizes(np.int64(8), 128, 256) == K.BlockSizes(8, 128, 256)


@pytest.mark.parametrize("name", ["w8a8", "w4a16_zero_point", "w4a4_quest", "fp8"])
def test_empty_rows_give_empty_output_on_every_backend(name):
    # (0, K) activations gave slice/gather errors in the Pallas backends (a grid of 0 blocks).
    wspec, aspec = CASES[name]
    w = qjax.quantize(_data(1, 72, 320)[1], wspec)
    for backend, interpret in (("xla", None), ("interpret", None), ("pallas_gpu", True)):
        for shape in ((0, 320), (2, 0, 320)):
            x = jnp.zeros(shape, jnp.bfloat16)
            y = K.quantized_matmul(x, w, act_spec=aspec, backend=backend, interpret=interpret)
            assert y.shape == shape[:-1] + (72,) and y.dtype == jnp.bfloat16, (backend, shape)
    g = jax.grad(lambda x: K.quantized_matmul(x, w, act_spec=aspec, backend="interpret").sum())(
        jnp.zeros((0, 320)))
    assert g.shape == (0, 320)


def test_empty_weight_rows_served_and_empty_contraction_refused():
    w0 = qjax.quantize(jnp.zeros((0, 64)), CASES["w8a8"][0])
    for backend in ("xla", "interpret"):
        assert K.quantized_matmul(jnp.ones((3, 64)), w0, backend=backend).shape == (3, 0)
    wk0 = qjax.quantize(jnp.zeros((8, 0)), CASES["w8a8"][0])
    with pytest.raises(ValueError, match=r"w must have K >= 1"):
        K.quantized_matmul(jnp.ones((3, 0)), wk0, backend="interpret")


@pytest.mark.parametrize("name", ["w4a16_zero_point", "w4a4_quest", "w1_sign", "fp8"])
def test_every_code_layout_gives_the_same_results(name):
    # One code per byte (packed=False) is read with one phase; K-major codes (the kernels'
    # operand layout) without the per-call transpose. The sums are the same.
    wspec, aspec = CASES[name]
    x, wf = _data(9, 72, 320)
    w = qjax.quantize(wf, wspec)
    y_xla, y_pl = _qmm(x, w, aspec, "xla"), _qmm(x, w, aspec, "interpret")
    tol = 2e-6 * float(jnp.abs(y_pl).max())
    for packed, k_major in [(False, False), (True, True), (False, True)]:
        v = qjax.relayout(w, packed=packed, k_major=k_major)
        assert v.k_major == k_major and (v.packed == packed or name == "fp8")
        if not packed and name != "fp8":
            assert K.classify(x.shape, v, aspec).per == 1
        got_xla, got = _qmm(x, v, aspec, "xla"), _qmm(x, v, aspec, "interpret")
        if K.classify(x.shape, w, aspec).kind == "int":  # exact int32 sums, same epilogue
            np.testing.assert_array_equal(got_xla, y_xla)
            np.testing.assert_array_equal(got, y_pl)
        else:  # XLA may fold the layout into the float dot, one phase sums in another order
            np.testing.assert_allclose(got_xla, y_xla, rtol=1e-6, atol=tol)
            np.testing.assert_allclose(got, y_pl, rtol=1e-6, atol=tol)


def test_k_major_codes_skip_the_per_call_transpose():
    wspec, aspec = CASES["w4a16"]
    x, wf = _data(8, 256, 512)
    w = qjax.quantize(wf, wspec)
    km = qjax.relayout(w, k_major=True)
    assert km.codes.shape == (256, 256)  # (K/2, N) bytes
    for v, transposes in ((w, 1), (km, 0)):
        text = jax.jit(lambda x, v: K.quantized_matmul(x, v, backend="interpret")).lower(
            x, v).as_text()
        # The only transpose of a uint8 array is the weights' relayout.
        assert sum("transpose" in ln and "ui8" in ln for ln in text.splitlines()) == transposes
