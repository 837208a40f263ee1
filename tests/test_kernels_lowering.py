"""Lowering of every qjax.kernels case for TPU (Mosaic) and CUDA (Triton) without a device.

``jax.jit(f).trace(...).lower(lowering_platforms=...)`` runs the Pallas lowering to the device
dialect, which enforces rules interpret mode does not (TPU block shapes, unimplemented
primitives); ``jax.export`` then serializes the module. Neither compiles for a device, so VMEM
overflow inside Mosaic, Triton's own compile and speed stay unchecked (see README "Kernels").
"""

import functools

import jax
import jax.numpy as jnp
import pytest

import qjax
from qjax import kernels as K
from qjax._src.kernels import api as A
from qjax._src.kernels import pallas_gpu
from qjax._src.kernels.activation import row_kernel_reason
from qjax.methods import quest

CASES = {
    "w8a8": (qjax.QuantSpec("int8", qjax.PerRow(-1)), qjax.QuantSpec("int8", qjax.PerRow(-1))),
    # Per-tensor activations: codes and scale from XLA ops over the whole x, then the kernel.
    "w8a8_per_tensor_act": (qjax.QuantSpec("int8", qjax.PerRow(-1)), qjax.QuantSpec("int8")),
    "w4a16_g128": (qjax.QuantSpec("int4", qjax.PerGroup(-1, 128)), None),
    "w4a16_g32_zero_point": (qjax.QuantSpec("int4", qjax.PerGroup(-1, 32),
                                            qjax.AbsMax(symmetric=False)), None),
    "w4a4_quest": (quest.spec(4, hadamard_mode=None), quest.spec(4, hadamard_mode=None)),
    "fp8": (qjax.QuantSpec("e4m3", qjax.PerRow(-1)), qjax.QuantSpec("e4m3", qjax.PerRow(-1))),
    "w1_sign": (quest.spec(1, hadamard_mode=None), None),
    "w1a1_quest": (quest.spec(1, hadamard_mode=None), quest.spec(1, hadamard_mode=None)),
}
N, KDIM = 256, 1024
TRITON_OK = [jax.export.DisabledSafetyCheck.custom_call(pallas_gpu.TRITON_CUSTOM_CALL)]


def _abstract(wspec, m=8, x_dtype=jnp.bfloat16):
    w = jax.eval_shape(functools.partial(qjax.quantize, spec=wspec),
                       jax.ShapeDtypeStruct((N, KDIM), jnp.float32))
    return jax.ShapeDtypeStruct((m, KDIM), x_dtype), w


def _fn(aspec, backend, w):
    """jit of ``(x, *leaves of w)``: export serializes arrays, not the QArray pytree type."""
    leaves, treedef = jax.tree.flatten(w)

    def f(x, *leaves):
        return K.quantized_matmul(x, jax.tree.unflatten(treedef, leaves), act_spec=aspec,
                                  backend=backend)

    return jax.jit(f), leaves


@pytest.mark.parametrize("name", sorted(CASES))
def test_tpu_lowers_and_exports(name):
    wspec, aspec = CASES[name]
    x, w = _abstract(wspec)
    f, leaves = _fn(aspec, "pallas_tpu", w)
    text = f.trace(x, *leaves).lower(lowering_platforms=("tpu",)).as_text()
    kernels = text.count("tpu_custom_call")
    row_kernel = aspec is not None and row_kernel_reason(aspec) is None
    assert kernels == (2 if row_kernel else 1)  # matmul (+ per-token activation quantization)
    assert len(jax.export.export(f, platforms=["tpu"])(x, *leaves).serialize()) > 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_lowers_and_exports_with_triton_check_disabled(name):
    wspec, aspec = CASES[name]
    x, w = _abstract(wspec, m=3, x_dtype=jnp.float32)
    f, leaves = _fn(aspec, "pallas_gpu", w)
    text = f.trace(x, *leaves).lower(lowering_platforms=("cuda",)).as_text()
    assert pallas_gpu.TRITON_CUSTOM_CALL in text
    exported = jax.export.export(f, platforms=["cuda"], disabled_checks=TRITON_OK)(x, *leaves)
    assert len(exported.serialize()) > 0


def test_triton_export_needs_the_disabled_check():
    x, w = _abstract(CASES["w4a16_g128"][0])
    f, leaves = _fn(None, "pallas_gpu", w)
    with pytest.raises(ValueError, match="no compatibility guarantees"):
        jax.export.export(f, platforms=["cuda"])(x, *leaves)


def test_mosaic_gpu_has_no_dot_general():
    # Why pallas_gpu uses Triton (pallas_gpu.py): this fails in jax 0.10; if it starts to pass,
    # a Mosaic GPU kernel (export-stable custom call) becomes the better GPU backend.
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def kernel(a_ref, b_ref, o_ref):
        o_ref[...] = jnp.dot(a_ref[...], b_ref[...], preferred_element_type=jnp.float32)

    a = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)
    f = jax.jit(lambda a, b: pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((64, 64), jnp.float32),
        compiler_params=plgpu.CompilerParams())(a, b))
    with pytest.raises(NotImplementedError, match="dot_general"):
        f.trace(a, a).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("blocks", [(8, 64, 256), (8, 128, 128), (8, 128, 256)], ids=str)
def test_validator_rejects_what_mosaic_lowering_rejects(blocks):
    # (8, 64, 256): 64 lanes; (8, 128, 128): 64-lane activation phases; (8, 128, 256) with group
    # 128: 2 scale rows per block (not a multiple of 8). Bypassing the validator, the Mosaic
    # lowering itself fails on each, which interpret mode does not.
    x, w = _abstract(CASES["w4a16_g128"][0], x_dtype=jnp.float32)
    bs = K.BlockSizes(*blocks)
    with pytest.raises(ValueError, match="block_sizes"):
        K.quantized_matmul(x, w, backend="pallas_tpu", block_sizes=bs)
    case = K.classify(x.shape, w, None)
    for backend, interpret, ok in (("pallas_tpu", False, False), ("interpret", True, True)):
        cfg = A._Config(case, backend, bs, "float32", 2**24, interpret)
        lower = jax.jit(lambda x, w, cfg=cfg: A._forward(x, w, cfg)).trace(x, w).lower
        if ok:
            lower()
        else:
            with pytest.raises(ValueError, match="divisible by 8 and 128"):
                lower(lowering_platforms=("tpu",))


@pytest.mark.parametrize("name", ["w4a16_g32_zero_point", "w4a4_quest"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_unpacked_and_k_major_weights_lower(name, platform):
    wspec, aspec = CASES[name]
    x, w = _abstract(wspec, x_dtype=jnp.float32)
    for layout in ({"packed": False}, {"k_major": True}, {"packed": False, "k_major": True}):
        v = jax.eval_shape(functools.partial(qjax.relayout, **layout), w)
        f, leaves = _fn(aspec, "pallas_tpu" if platform == "tpu" else "pallas_gpu", v)
        text = f.trace(x, *leaves).lower(lowering_platforms=(platform,)).as_text()
        assert ("tpu_custom_call" if platform == "tpu" else pallas_gpu.TRITON_CUSTOM_CALL) in text
        kernel_layout = f"-> tensor<{KDIM // (1 if v.packed is False else 2)}x{N}x"
        transposed = [ln for ln in text.splitlines() if "transpose" in ln and kernel_layout in ln]
        # Row-major bytes are transposed to (K/per, N) per call; K-major ones enter as they are.
        assert len(transposed) == (0 if layout.get("k_major") else 1)
