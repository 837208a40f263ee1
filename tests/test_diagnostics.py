"""Tests for qjax.diagnostics: gradient_cosine, dense_inputs, clip_error."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from qjax._src import scales as S
from qjax.diagnostics import clip_error, dense_inputs, gradient_cosine
from qjax.methods import quest
from qjax.models import Llama, LlamaConfig, quantization_rules
from qjax.nn import Method

CFG = LlamaConfig(d_model=128, n_layers=1, n_heads=2, max_seq_len=32)
IDS = jax.random.randint(jax.random.key(0), (4, 33), 0, 256)


def _loss(model):
    def loss(p, ids, qat):
        logits = model.apply({"params": p}, ids[:, :-1], qat=qat)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    return loss


@pytest.mark.slow  # 17 s: two QuEST Llamas; gradient_cosine's arithmetic is tested below
def test_cosine_is_one_at_high_precision_and_lower_at_low():
    out = {}
    for bits in (8, 2):
        model = qjax.nn.quantize_model(Llama(CFG), quantization_rules(Method("quest", bits, bits)))
        params = model.init(jax.random.key(1), IDS[:, :-1])["params"]
        out[bits] = gradient_cosine(_loss(model), params, IDS)
    assert set(out[8]) == {f"blocks_0/{n}" for n in ("attn/q", "attn/k", "attn/v", "attn/o",
                                                      "mlp/gate", "mlp/up", "mlp/down")} | {
        "all", "lm_head"}
    assert out[8]["all"] > 0.97
    assert out[2]["all"] < out[8]["all"]
    assert out[2]["lm_head"] > 0.5  # float layers see quantized inputs but are not masked


def test_identical_gradients_give_one():
    p = {"d": {"kernel": jnp.arange(6.0).reshape(2, 3)}}
    out = gradient_cosine(lambda p, qat: jnp.sum(p["d"]["kernel"] ** 2), p)
    assert out == {"d": pytest.approx(1.0), "all": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="no parameter leaf"):
        gradient_cosine(lambda p, qat: jnp.sum(p["d"]["kernel"]), p, leaf_name="weight")


class _TwoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8, name="first")(x)
        return nn.Dense(2, name="second")(jnp.tanh(h))


def test_dense_inputs_are_what_each_layer_sees():
    model = _TwoLayers()
    x = jax.random.normal(jax.random.key(0), (3, 4))
    variables = model.init(jax.random.key(1), x)
    seen = dense_inputs(model, variables, x)
    assert set(seen) == {"first", "second"}
    np.testing.assert_array_equal(seen["first"], x)
    k, b = variables["params"]["first"]["kernel"], variables["params"]["first"]["bias"]
    np.testing.assert_allclose(seen["second"], np.tanh(np.asarray(x) @ k + b), rtol=1e-6)
    with pytest.raises(TypeError, match="module"):
        dense_inputs(lambda x: x, variables, x)


def _midrise_error(x, a, bits):
    """Independent numpy reference: QuEST's midrise grid with clip a * RMS per row."""
    x = np.asarray(x, np.float64)
    c = a * np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True)) + 1e-8
    step = 2 * c / (2 ** bits - 1)
    q = np.clip((np.floor(x / step) + 0.5) * step, -c, c)  # outermost levels at +-c
    return float(np.mean((q - x) ** 2) / np.mean(x ** 2))


def test_clip_error_matches_a_reference_and_the_gaussian_clip_is_best_on_gaussian_data():
    x = jax.random.normal(jax.random.key(2), (512, 128))
    clips = (2.0, 2.513, 3.0)
    plain = clip_error(x, quest.spec(4, hadamard_mode=None), clips)
    for a in clips:
        assert plain[a] == pytest.approx(_midrise_error(x, a, 4), rel=1e-4)
    assert min(plain, key=plain.get) == 2.513
    # Long rows (the RMS is then the true sigma): Max (1960)'s optimal 16-level uniform quantizer
    # of a unit Gaussian has step 0.3352 (= 2 * 2.513 / 15) and mean squared error 0.01154.
    long_rows = clip_error(jax.random.normal(jax.random.key(3), (4, 65536)),
                           quest.spec(4, hadamard_mode=None), (2.513,))
    assert long_rows[2.513] == pytest.approx(0.01154, rel=0.01)
    # The rotation is orthogonal: the error is the rotated input's error under the plain quantizer.
    rotated = clip_error(x, quest.spec(4, hadamard_mode="half"), clips)
    xh = qjax.hadamard_transform(x, 128)
    for a in clips:
        assert rotated[a] == pytest.approx(_midrise_error(xh, a, 4), rel=1e-3)


def test_clip_error_rejects_bad_input():
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match="RmsGaussian"):
        clip_error(x, qjax.QuantSpec(qjax.IntFormat(4)), (2.0,))
    with pytest.raises(ValueError, match="clips"):
        clip_error(x, quest.spec(4, hadamard_mode=None), ())
    with pytest.raises(ValueError, match="RmsGaussian clip must be"):
        S.RmsGaussian(clip=0.0)


def test_clip_error_checks_spec_and_clips():
    x = jnp.ones((2, 8))
    spec = quest.spec(4, hadamard_mode=None)
    with pytest.raises(TypeError, match="spec must be a"):
        clip_error(x, None, (2.0,))
    with pytest.raises(TypeError, match="clips"):
        clip_error(x, spec, 2.0)
    with pytest.raises(TypeError, match="clips"):
        clip_error(x, spec, "2")
    for bad in (float("inf"), float("nan"), -1.0, 0.0):
        with pytest.raises(ValueError, match=r"clips\[1\]"):
            clip_error(x, spec, (2.0, bad))
    assert clip_error(x, spec, np.array([2.0, 3.0])).keys() == {2.0, 3.0}


def test_clip_error_of_an_all_zero_input_is_zero():
    # Midrise quantizes zeros to +-half a step at the scale floor, not to 0: the relative error
    # would divide that by a zero norm.
    assert clip_error(jnp.zeros((8, 128)), quest.spec(4), (2.0, 3.0)) == {2.0: 0.0, 3.0: 0.0}


def test_dense_inputs_keep_the_forward_value_over_an_earlier_trace():
    """A model whose apply traces itself first (as a quantized model may, to find its layers)
    must report the forward's concrete inputs, not the trace's tracers."""
    model = nn.Dense(4)
    x = jnp.ones((2, 3))
    variables = model.init(jax.random.key(0), x)

    class TracesFirst:
        def apply(self, v, inputs):
            jax.eval_shape(model.apply, v, inputs)
            return model.apply(v, inputs)

    acts = dense_inputs(TracesFirst(), variables, x)
    assert not isinstance(acts[""], jax.core.Tracer)
    np.testing.assert_array_equal(acts[""], x)
    # under jit every call is traced: the traced input is kept (valid inside that trace)
    assert jax.jit(lambda v, a: dense_inputs(model, v, a)[""] * 2)(variables, x).shape == (2, 3)
