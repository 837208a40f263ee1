"""Quantized attention and the quantized KV cache (qjax.attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import attention as A

KEYS = jax.random.split(jax.random.key(0), 3)
Q = jax.random.normal(KEYS[0], (2, 6, 4, 16))
K = jax.random.normal(KEYS[1], (2, 6, 2, 16))
V = jax.random.normal(KEYS[2], (2, 6, 2, 16))
TOKEN = qjax.QuantSpec("int8", qjax.PerAxis((0, 1, 2)))  # per token and head


def test_float_attention_equals_jax_reference():
    ref = jax.nn.dot_product_attention(Q, jnp.repeat(K, 2, 2), jnp.repeat(V, 2, 2),
                                       is_causal=True)
    out = A.quantized_attention(Q, K, V, causal=True)
    np.testing.assert_allclose(out, ref, atol=2e-6)


def test_quantized_operands_are_fake_quant_and_gradients_are_ste():
    spec_p = qjax.QuantSpec("uint8", "row")
    out = A.quantized_attention(Q, K, V, spec_q=TOKEN, spec_k=TOKEN, spec_v=TOKEN,
                                spec_p=spec_p, causal=True)
    fq = lambda x: qjax.fake_quant(x, TOKEN)  # noqa: E731

    def by_hand(q, k, v):  # the definition, written out
        k, v = jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2)
        s = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") / 4.0
        s = jnp.where(jnp.tril(jnp.ones((6, 6), bool)), s, -jnp.inf)
        p = qjax.fake_quant(jax.nn.softmax(s, axis=-1), spec_p)
        return jnp.einsum("bhts,bshd->bthd", p, v, precision="highest")

    np.testing.assert_allclose(out, by_hand(fq(Q), fq(K), fq(V)), atol=1e-6)
    # identity STE on q, k, v: the gradient is the float attention's at the quantized point
    # (with the probabilities' STE inside both)
    g = jax.random.normal(jax.random.key(5), out.shape)
    _, vjp = jax.vjp(lambda q, k, v: A.quantized_attention(
        q, k, v, spec_q=TOKEN, spec_k=TOKEN, spec_v=TOKEN, spec_p=spec_p, causal=True),
        Q, K, V)
    _, vjp_ref = jax.vjp(by_hand, fq(Q), fq(K), fq(V))
    for a, b in zip(vjp(g), vjp_ref(g), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_return_logits_are_the_fake_quantized_scores_before_masking():
    out, logits = A.quantized_attention(Q, K, V, spec_q=TOKEN, spec_k=TOKEN, causal=True,
                                        return_logits=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(
        A.quantized_attention(Q, K, V, spec_q=TOKEN, spec_k=TOKEN, causal=True)))
    qf, kf = qjax.fake_quant(Q, TOKEN), jnp.repeat(qjax.fake_quant(K, TOKEN), 2, axis=2)
    want = np.einsum("bthd,bshd->bhts", np.float64(qf), np.float64(kf)) / 4.0
    assert logits.shape == (2, 4, 6, 6) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-5, atol=1e-5)  # future ones too
    with pytest.raises(TypeError, match="return_logits"):
        A.quantized_attention(Q, K, V, return_logits="yes")


def test_fully_masked_rows_give_zeros_not_nan():
    mask = jnp.zeros((1, 1, 6, 6), bool).at[..., 0, :].set(True)
    out = A.quantized_attention(Q, K, V, mask=mask, spec_p=qjax.QuantSpec("uint8", "row"))
    assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(out[:, 1:] == 0))


@pytest.mark.parametrize("spec", [None, A.kv_cache_spec(8), A.kv_cache_spec(4, 8)],
                         ids=["float", "int8", "int4_g8"])
def test_decode_with_the_cache_equals_the_full_forward(spec):
    cache = A.init_kv_cache(2, 8, 2, 16, spec=spec)
    cache = A.append_kv(cache, K[:, :3], V[:, :3])  # prefill
    outs = [A.cached_attention(Q[:, :3], cache)]
    step = jax.jit(lambda c, q, k, v: (lambda c2: (c2, A.cached_attention(q, c2)))(
        A.append_kv(c, k, v)))
    for t in range(3, 6):  # greedy-decode shapes: one token at a time, jitted
        cache, o = step(cache, Q[:, t:t + 1], K[:, t:t + 1], V[:, t:t + 1])
        outs.append(o)
    full = A.quantized_attention(Q, K, V, spec_k=spec, spec_v=spec, causal=True)
    # same codes (the cache's dequantize == fake_quant bit for bit); the sums differ only in
    # length (8 cached positions, the masked ones adding exact zeros)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-6)
    assert int(cache.length) == 6
    if spec is not None:
        np.testing.assert_array_equal(qjax.dequantize(cache.k)[:, :6], qjax.fake_quant(K, spec))


def test_cache_bytes_are_really_smaller():
    b, s, h, d = 2, 8, 2, 16
    f32 = A.kv_cache_bytes(A.init_kv_cache(b, s, h, d))
    i8 = A.kv_cache_bytes(A.init_kv_cache(b, s, h, d, spec=A.kv_cache_spec(8)))
    i4 = A.kv_cache_bytes(A.init_kv_cache(b, s, h, d, spec=A.kv_cache_spec(4, 16)))
    tokens = 2 * b * s * h  # keys and values, per head
    assert f32 == tokens * d * 4
    assert i8 == tokens * (d + 4)  # int8 codes + one float32 scale per token and head
    assert i4 == tokens * (d // 2 + 4)  # two codes per byte
    assert f32 / i4 == pytest.approx(64 / 12)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="must divide the heads of q"):
        A.quantized_attention(Q, K[:, :, :1].repeat(3, 2), V[:, :, :1].repeat(3, 2))
    with pytest.raises(ValueError, match="agree on batch and head_dim"):
        A.quantized_attention(Q, K[..., :8], V[..., :8])
    with pytest.raises(TypeError, match="real floating"):
        A.quantized_attention(Q.astype(jnp.complex64), K, V)
    with pytest.raises(TypeError, match="spec_k must be"):
        A.quantized_attention(Q, K, V, spec_k="int8")
    with pytest.raises(ValueError, match="bits must be 2, 4 or 8"):
        A.kv_cache_spec(3)
    with pytest.raises(ValueError, match="group|divide"):
        A.init_kv_cache(1, 4, 2, 16, spec=A.kv_cache_spec(4, 5))
    cache = A.append_kv(A.init_kv_cache(2, 4, 2, 16), K[:, :3], V[:, :3])
    with pytest.raises(ValueError, match="holds 3 of 4 tokens: 2 more do not fit"):
        A.append_kv(cache, K[:, :2], V[:, :2])
    with pytest.raises(ValueError, match="matching the cache"):
        A.append_kv(cache, K[:, :1, :1], V[:, :1, :1])


def test_logits_then_attend_is_quantized_attention():
    # The two halves a model composes when V's quantization depends on the logits (EdgeQAT's
    # token-adaptive widths): bit for bit the one-call form.
    spec_p = qjax.QuantSpec("uint8", "row")
    qf, kf, vf = (qjax.fake_quant(a, TOKEN) for a in (Q, K, V))
    logits = A.attention_logits(qf, kf)
    out = A.attend(logits, vf, spec_p=spec_p, causal=True)
    want = A.quantized_attention(Q, K, V, spec_q=TOKEN, spec_k=TOKEN, spec_v=TOKEN,
                                 spec_p=spec_p, causal=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    assert logits.shape == (2, 4, 6, 6) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="logits must be"):
        A.attend(logits[0], vf)
    with pytest.raises(ValueError, match="v must be"):
        A.attend(logits, vf[:, :5])
    with pytest.raises(ValueError, match="must divide the heads"):
        A.attention_logits(Q, jnp.ones((2, 6, 3, 16)))
