"""The reference Llama's quantized attention, KV-cache decoding and greedy generation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import attention as A
from qjax import convert as QC
from qjax.models.llama import (
    Llama,
    LlamaConfig,
    greedy_generate,
    init_caches,
    quantization_rules,
)
from qjax.nn import Method, quantize_model

CFG = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, hidden=64, max_seq_len=16)
IDS = jax.random.randint(jax.random.key(3), (2, 12), 0, 64)
ATTN = A.attention_quant(8, 8, kv_bits=4, kv_group=8)


@functools.cache
def _models():
    """(float model, float params, W4A4 + quantized-attention QAT model, its params)."""
    fm = Llama(CFG)
    fp = fm.init(jax.random.key(0), IDS)["params"]
    qm = quantize_model(Llama(CFG, attention=ATTN), quantization_rules(Method("quest", 4, 4)))
    qp = qm.init(jax.random.key(0), IDS)["params"]
    return fm, fp, qm, qp


def _decode_logits(extend, params, caches, prompt_len):
    """Logits of IDS from a prefill of ``prompt_len`` tokens, then one token per call."""
    step = jax.jit(extend)
    logits, caches = step(params, IDS[:, :prompt_len], caches)
    out = [logits]
    for t in range(prompt_len, IDS.shape[1]):
        logits, caches = step(params, IDS[:, t:t + 1], caches)
        out.append(logits)
    return jnp.concatenate(out, axis=1), caches


# Through the cache path every position attends to the cache's slots under a mask, so XLA sums
# over the capacity instead of the sequence length, and one token per call multiplies 2-row
# matrices where the full forward multiplies 24-row ones; XLA:CPU may order those float sums
# differently (1 ulp; with quantized activations such an ulp can move a code). The logits are
# therefore compared to float tolerance, and the decoded tokens must be the same.
PREFILL_ALL, PROMPT = IDS.shape[1], 5


def _close(got, full):
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(full))))


@pytest.mark.slow  # 18 s; .ci/run runs it (the quantized cache's decode test stays)
def test_float_cache_decoding_gives_the_full_forward_logits():
    fm, fp, _, _ = _models()
    full = jax.jit(fm.apply)({"params": fp}, IDS)
    extend = lambda p, i, c: fm.apply({"params": p}, i, c, method="extend")  # noqa: E731
    got, caches = _decode_logits(extend, fp, init_caches(CFG, 2), PREFILL_ALL)
    _close(got, full)
    assert int(caches[0].length) == IDS.shape[1]
    got, _ = _decode_logits(extend, fp, init_caches(CFG, 2), PROMPT)
    _close(got, full)


@pytest.mark.slow  # ~30 s; the served model's quantized cache (next test) runs by default
def test_quantized_cache_decoding_gives_the_qat_logits():
    _, _, qm, qp = _models()
    full = jax.jit(qm.apply)({"params": qp}, IDS)
    extend = lambda p, i, c: qm.apply({"params": p}, i, c, method="extend")  # noqa: E731
    caches = init_caches(CFG, 2, attention=ATTN)
    assert all(isinstance(c.k, qjax.QArray) for c in caches)  # int4 codes and scales
    got, _ = _decode_logits(extend, qp, caches, PREFILL_ALL)
    _close(got, full)
    got, _ = _decode_logits(extend, qp, caches, PROMPT)
    np.testing.assert_array_equal(jnp.argmax(got, -1), jnp.argmax(full, -1))
    assert float(jnp.mean(jnp.abs(got - full))) < 1e-3 * float(jnp.mean(jnp.abs(full)))
    # The attention quantization matters, and qat=False turns it off with the linears'.
    plain = quantize_model(Llama(CFG), quantization_rules(Method("quest", 4, 4)))
    assert float(jnp.max(jnp.abs(jax.jit(plain.apply)({"params": qp}, IDS) - full))) > 1e-3
    fm, _, _, _ = _models()
    np.testing.assert_array_equal(jax.jit(functools.partial(qm.apply, qat=False))(
        {"params": qp}, IDS), jax.jit(fm.apply)({"params": qp}, IDS))


def test_served_model_decodes_with_its_quantized_cache():
    _, _, qm, qp = _models()
    sp = QC.convert(qp, qm, packed=False)
    full = jax.jit(lambda p, i: QC.serve(qm, p, i))(sp, IDS)
    extend = lambda p, i, c: QC.serve(qm, p, i, c, method="extend")  # noqa: E731
    got, _ = _decode_logits(extend, sp, init_caches(CFG, 2, attention=ATTN), PREFILL_ALL)
    _close(got, full)


def test_greedy_generate_matches_recomputing_the_full_forward():
    fm, fp, _, _ = _models()
    extend = lambda p, i, c: fm.apply({"params": p}, i, c, method="extend")  # noqa: E731
    prompt, steps = IDS[:, :4], 6
    gen = jax.jit(functools.partial(greedy_generate, extend, steps=steps))
    out = gen(fp, prompt, caches=init_caches(CFG, 2, 10))
    # Independent reference: the full forward of the whole sequence every step (causal, so the
    # zero padding after position t does not change the logits at t; one compiled shape).
    full = jax.jit(fm.apply)
    ref = jnp.zeros((2, 4 + steps), prompt.dtype).at[:, :4].set(prompt)
    for t in range(4, 4 + steps):
        nxt = jnp.argmax(full({"params": fp}, ref)[:, t - 1], axis=-1).astype(ref.dtype)
        ref = ref.at[:, t].set(nxt)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(greedy_generate(extend, fp, prompt, 0, init_caches(CFG, 2)),
                                  prompt)


def test_kv_cache_bytes_shrink_with_the_bits():
    f32 = A.kv_cache_bytes(init_caches(CFG, 1)[0])
    int8 = A.kv_cache_bytes(init_caches(CFG, 1, attention=A.attention_quant(kv_bits=8))[0])
    int4 = A.kv_cache_bytes(init_caches(CFG, 1, attention=ATTN)[0])
    assert f32 == 2 * 16 * 32 * 4
    assert int8 == 2 * (16 * 32 + 16 * 2 * 4)  # codes + one float32 scale per token and head
    assert int4 == 2 * (16 * 16 + 16 * 2 * 2 * 4)  # packed codes + a scale per group of 8


def test_decoding_errors_name_the_problem():
    fm, fp, _, _ = _models()
    extend = lambda p, i, c: fm.apply({"params": p}, i, c, method="extend")  # noqa: E731
    with pytest.raises(ValueError, match="caches hold 6 tokens"):
        greedy_generate(extend, fp, IDS[:, :4], 3, init_caches(CFG, 2, 6))
    with pytest.raises(ValueError, match="tuple of 2 KVCaches"):
        fm.apply({"params": fp}, IDS, init_caches(CFG, 2)[:1], method="extend")
    with pytest.raises(ValueError, match="exceed the cache capacity 8"):
        fm.apply({"params": fp}, IDS, init_caches(CFG, 2, 8), method="extend")
    _, held = fm.apply({"params": fp}, IDS[:, :8], init_caches(CFG, 2, 12), method="extend")
    with pytest.raises(ValueError, match="holds 8 of 12 tokens: 5 more do not fit"):
        fm.apply({"params": fp}, IDS[:, :5], held, method="extend")
    with pytest.raises(ValueError, match="capacity must be"):
        init_caches(CFG, 1, 32)
    with pytest.raises(ValueError, match="one spec"):
        init_caches(CFG, 1, attention=A.AttentionQuant(k=ATTN.k, v=None))
    with pytest.raises(ValueError, match="bits must be"):
        A.attention_quant(bits=9)
    with pytest.raises(ValueError, match="prompt must be"):
        greedy_generate(extend, fp, IDS[0], 2, init_caches(CFG, 2))


# ------------------------------------------------ EdgeQAT's token-adaptive attention widths
ADAPTIVE = A.attention_quant(8, 8, low_bits=4, low_fraction=0.5)
UNIFORM8, UNIFORM4 = A.attention_quant(8, 8), A.attention_quant(4, 8)


def _attention_out(quant, low=None, fraction=None):
    """A QAT attention layer's output ((B, T, d), low) for IDS-shaped random inputs."""
    from qjax.models.llama import Attention

    if fraction is not None:
        quant = dataclasses.replace(quant, low_fraction=fraction)
    x = jax.random.normal(jax.random.key(5), (2, 12, CFG.d_model))
    layer = quantize_model(Attention(CFG, quant), {})
    params = layer.init(jax.random.key(0), x)["params"]
    out = layer.apply({"params": params}, x, low=low, qat=True) if quant.token_adaptive \
        else (layer.apply({"params": params}, x, qat=True), None)
    return out


def test_token_adaptive_widths_reduce_to_the_uniform_ones():
    all_low = jnp.ones((2, 12), bool)
    # Every token low (V: fraction 1; Q, K: the previous layer's choice all True) = uniform int4
    # for Q, K, V with the same uint8 probabilities.
    out, low = _attention_out(ADAPTIVE, all_low, fraction=1.0)
    np.testing.assert_array_equal(low, all_low)
    np.testing.assert_array_equal(out, _attention_out(UNIFORM4)[0])
    # No previous choice (the first layer) and a fraction below one token: uniform int8.
    out, low = _attention_out(ADAPTIVE, None, fraction=0.05)
    assert not np.any(low)
    np.testing.assert_array_equal(out, _attention_out(UNIFORM8)[0])


def test_token_adaptive_v_widths_follow_the_layers_own_importance():
    # Half the tokens of each sequence, the least important by this layer's own logits (the
    # sown scores), take the low width; the output differs from both uniform widths.
    from qjax.methods import edgeqat
    from qjax.models.llama import Attention

    x = jax.random.normal(jax.random.key(5), (2, 12, CFG.d_model))
    layer = quantize_model(Attention(CFG, ADAPTIVE), {})
    params = layer.init(jax.random.key(0), x)["params"]
    (out, low), stats = layer.apply({"params": params}, x, qat=True,
                                    mutable=[edgeqat.COLLECTION])
    scores = stats[edgeqat.COLLECTION]["scores"][0]
    np.testing.assert_array_equal(
        low, edgeqat.low_bit_tokens(edgeqat.token_importance(scores), 0.5))
    assert int(low.sum()) == 2 * 6
    for uniform in (UNIFORM8, UNIFORM4):
        assert not np.array_equal(out, _attention_out(uniform)[0])


def test_the_llama_passes_each_layers_low_tokens_to_the_next():
    import flax.linen as nn

    from qjax.models.llama import Attention

    seen = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, Attention) and context.method_name == "__call__":
            seen.append((kwargs.get("low"), out[1]))
        return out

    qm = quantize_model(Llama(CFG, attention=ADAPTIVE), quantization_rules(Method("quest", 4, 4)))
    params = qm.init(jax.random.key(0), IDS)["params"]
    with nn.intercept_methods(record):
        logits = qm.apply({"params": params}, IDS, qat=True)
    assert np.all(np.isfinite(logits)) and len(seen) == CFG.n_layers
    (first_in, first_out), (second_in, second_out) = seen
    assert first_in is None and second_out is not None
    np.testing.assert_array_equal(second_in, first_out)
    # Gradients flow (token-adaptive fake quant is STE on every token) and are finite.
    grads = jax.grad(lambda p: jnp.mean(qm.apply({"params": p}, IDS, qat=True)))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # Without QAT the attention is float and no tokens are chosen.
    with nn.intercept_methods(record):
        qm.apply({"params": params}, IDS, qat=False)
    assert all(low is None for _, low in seen[2:])


def test_token_adaptive_attention_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="cannot be cached"):
        init_caches(CFG, 1, attention=ADAPTIVE)
    with pytest.raises(ValueError, match="below the widths"):
        A.attention_quant(4, 8, low_bits=4)
    with pytest.raises(ValueError, match="low_fraction"):
        A.attention_quant(8, 8, low_bits=4, low_fraction=0.0)
    with pytest.raises(ValueError, match="q_low goes with q"):
        A.AttentionQuant(q_low=UNIFORM4.q)
    with pytest.raises(ValueError, match="needs the low-width specs"):
        A.AttentionQuant(p=UNIFORM8.p, low_fraction=0.5)
    with pytest.raises(ValueError, match="q_low goes with q"):
        A.AttentionQuant(q=UNIFORM8.q, low_fraction=0.5)
    kv = A.attention_quant(8, 8, kv_bits=8, kv_group=8, low_bits=4)
    assert kv.k_low == qjax.QuantSpec("int4", kv.k.granularity) and kv.q_low == UNIFORM4.q
