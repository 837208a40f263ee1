"""EdgeQAT (qjax.methods.edgeqat): the loss terms against their definitions, token-adaptive
bits, the reference Llama's sown statistics and the training program's loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.methods import edgeqat as E

RNG = np.random.default_rng(0)


def _np_entropy(x):
    return np.mean(np.log1p(np.var(np.asarray(x, np.float64), axis=-1, ddof=1)))


def test_qk_entropy_is_the_mean_log_variance_of_rows():
    x = RNG.normal(size=(2, 5, 3, 8)).astype(np.float32) * np.arange(1, 9, dtype=np.float32)
    np.testing.assert_allclose(E.qk_entropy(jnp.asarray(x)), _np_entropy(x), rtol=1e-6)
    mask = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 1, 1]], bool)
    rows = np.log1p(np.var(x.astype(np.float64), axis=-1, ddof=1))  # (B, T, H)
    np.testing.assert_allclose(E.qk_entropy(jnp.asarray(x), mask), rows[mask].mean(), rtol=1e-6)
    assert float(E.qk_entropy(jnp.zeros((1, 2, 1, 4)))) == 0.0  # constant rows: log(1 + 0)


def test_entropy_loss_equals_the_released_sum_form_up_to_a_constant():
    """The released code: -1/2 log(sum over layers, rows, Q and K of log(1 + var)); with equal
    row counts it is entropy_loss + (-1/2 log N)."""
    rng = np.random.default_rng(3)  # its own draws: the result must not depend on test order
    qs = [rng.normal(size=(2, 4, 3, 8)).astype(np.float32) * s for s in (0.5, 1.0, 3.0)]
    ks = [rng.normal(size=(2, 4, 3, 8)).astype(np.float32) * s for s in (2.0, 0.3, 1.0)]
    terms = [E.qk_entropy(jnp.asarray(a)) for a in qs + ks]
    total = sum(np.log1p(np.var(a.astype(np.float64), -1, ddof=1)).sum() for a in qs + ks)
    n_rows = 6 * 2 * 4 * 3
    released = -0.5 * np.log(total)
    # float32 variances and logs against a float64 reference: a few ulps of the sum
    assert float(E.entropy_loss(terms)) == pytest.approx(released + 0.5 * np.log(n_rows),
                                                         rel=1e-5)


def test_entropy_loss_falls_as_the_quantized_rows_spread():
    x = jnp.asarray(RNG.normal(size=(1, 4, 2, 8)), jnp.float32)
    loss = lambda s: E.entropy_loss([E.qk_entropy(s * x)])
    assert float(loss(2.0)) < float(loss(1.0)) < float(loss(0.5))
    assert float(jax.grad(loss)(1.0)) < 0  # gradient descent widens the rows
    assert np.isfinite(float(E.entropy_loss([jnp.zeros(())])))  # all-constant rows: no -inf


def _np_cos_loss(s, t, mask):
    cos = []
    for b in range(s.shape[0]):
        for h in range(s.shape[1]):
            a, c = s[b, h][mask], t[b, h][mask]
            cos.append(a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))
    return 1 - np.mean(cos)


def test_attention_map_loss_against_its_definition():
    s = RNG.normal(size=(2, 3, 5, 5)).astype(np.float32)
    t = RNG.normal(size=(2, 3, 5, 5)).astype(np.float32)
    mask = np.tril(np.ones((5, 5), bool))
    got = E.attention_map_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask))
    assert float(got) == pytest.approx(_np_cos_loss(s, t, mask), rel=1e-5)
    # two layers = the mean over layers, heads and batch
    two = E.attention_map_loss([jnp.asarray(s), jnp.asarray(t)], [jnp.asarray(t), jnp.asarray(s)],
                               jnp.asarray(mask))
    assert float(two) == pytest.approx(float(got), rel=1e-6)
    assert float(E.attention_map_loss(jnp.asarray(s), 3 * jnp.asarray(s))) == pytest.approx(
        0.0, abs=1e-6)
    assert float(E.attention_map_loss(jnp.asarray(s), -jnp.asarray(s))) == pytest.approx(2.0)
    # masked entries do not count; the teacher gets no gradient
    t2 = np.where(mask, t, 100.0).astype(np.float32)
    assert float(E.attention_map_loss(jnp.asarray(s), jnp.asarray(t2), jnp.asarray(mask))) == \
        pytest.approx(float(got), rel=1e-6)
    g = jax.grad(lambda tt: E.attention_map_loss(jnp.asarray(s), tt))(jnp.asarray(t))
    assert not np.any(np.asarray(g))
    zeros = jnp.zeros((1, 1, 2, 2))
    assert np.isfinite(float(E.attention_map_loss(zeros, zeros)))


def test_token_importance_and_low_bit_tokens():
    scores = RNG.normal(size=(2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(E.token_importance(jnp.asarray(scores)),
                               scores[..., 0].sum(axis=1), rtol=1e-6)
    imp = jnp.asarray([[3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_array_equal(E.low_bit_tokens(imp, 0.5),
                                  [[False, True, False, True], [True, True, False, False]])
    assert not np.any(E.low_bit_tokens(imp, 0.0)) and np.all(E.low_bit_tokens(imp, 1.0))
    assert int(E.low_bit_tokens(jnp.arange(100.0)[None], 0.29).sum()) == 29  # not 28.999...


def test_token_adaptive_fake_quant_quantizes_each_token_at_its_width():
    hi, lo = qjax.QuantSpec("int8", qjax.PerRow(-1)), qjax.QuantSpec("int4", qjax.PerRow(-1))
    x = jnp.asarray(RNG.normal(size=(2, 4, 2, 8)), jnp.float32)
    low = jnp.asarray([[True, False, False, True], [False, False, True, False]])
    y = E.token_adaptive_fake_quant(x, low, hi, lo)
    for b in range(2):
        for t in range(4):
            spec = lo if low[b, t] else hi
            np.testing.assert_array_equal(y[b, t], qjax.fake_quant(x[b, t], spec))


@pytest.mark.parametrize("case, error, match", [
    ("per_tensor", ValueError, "each token on its own"),
    ("token_axis", ValueError, "each token on its own"),
    ("low_shape", ValueError, "low must be a bool"),
    ("low_dtype", ValueError, "low must be a bool"),
    ("rotated_tokens", ValueError, "mixes the batch or token axis"),
])
def test_token_adaptive_fake_quant_rejects(case, error, match):
    x = jnp.ones((2, 4, 2, 8))
    hi, lo = qjax.QuantSpec("int8", qjax.PerRow(-1)), qjax.QuantSpec("int4", qjax.PerRow(-1))
    low = jnp.zeros((2, 4), bool)
    args = {"per_tensor": (x, low, qjax.QuantSpec("int8", "tensor"), lo),
            "token_axis": (x, low, hi, qjax.QuantSpec("int4", qjax.PerRow(1))),
            "low_shape": (x, jnp.zeros((2, 3), bool), hi, lo),
            "low_dtype": (x, jnp.zeros((2, 4)), hi, lo),
            "rotated_tokens": (x, low, hi, qjax.QuantSpec("int4", qjax.PerRow(-1),
                                                          hadamard_block=4, hadamard_axis=1))}[case]
    with pytest.raises(error, match=match):
        E.token_adaptive_fake_quant(*args)


@pytest.mark.parametrize("fn, args, match", [
    (E.qk_entropy, (jnp.ones((2, 3, 4)),), "batch, tokens, heads"),
    (E.qk_entropy, (jnp.ones((1, 2, 1, 4)), jnp.ones((1, 3), bool)), "token_mask"),
    (E.entropy_loss, ([],), "entropies must hold at least one"),
    (E.entropy_loss, (jnp.zeros((0,)),), "entropies must hold at least one"),
    (E.qk_entropy, (jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2))), "token_mask must be a bool"),
    (E.attention_map_loss, (jnp.ones((1, 1, 2, 2)), jnp.ones((1, 1, 2, 2)), jnp.ones((2, 2))),
     "mask must be a bool"),
    (E.attention_map_loss, (jnp.ones((1, 1, 2, 2)), jnp.ones((1, 1, 2, 2)),
                            jnp.ones((3, 3), bool)), "must broadcast"),
    (E.attention_map_loss, ([jnp.ones((1, 1, 2, 2))], [jnp.ones((1, 1, 2, 2))] * 2),
     "same length"),
    (E.attention_map_loss, (jnp.ones((1, 1, 2, 2)), jnp.ones((1, 1, 2, 3))), "one shape"),
    (E.low_bit_tokens, (jnp.ones((2, 3)), 1.5), "fraction"),
    (E.token_importance, (jnp.ones((2, 3)),), "scores"),
])
def test_bad_input(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_llama_sows_edgeqat_statistics_only_when_asked():
    from qjax import attention as A
    from qjax.models.llama import Llama, LlamaConfig, quantization_rules
    from qjax.nn import quantize_model

    cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8)
    att = A.attention_quant(8, 8)
    qm = quantize_model(Llama(cfg, attention=att), quantization_rules("lsq"))
    ids = jnp.asarray(RNG.integers(0, 32, size=(2, 6)), jnp.int32)
    variables = qm.init(jax.random.key(0), ids)
    assert set(variables) == {"params"}  # nothing sown at init (it would go stale in a run)
    params = variables["params"]
    plain = qm.apply({"params": params}, ids)
    logits, state = qm.apply({"params": params}, ids, mutable=[E.COLLECTION])
    np.testing.assert_array_equal(logits, plain)
    sown = state[E.COLLECTION]
    assert sorted(sown) == ["blocks_0", "blocks_1"]
    layer = sown["blocks_0"]["attn"]
    assert len(layer["entropy"]) == 2 and layer["scores"][0].shape == (2, 2, 6, 6)
    assert all(float(e) > 0 for e in layer["entropy"])
    _, fstate = qm.apply({"params": params}, ids, qat=False, mutable=[E.COLLECTION])
    assert sorted(fstate[E.COLLECTION]["blocks_1"]["attn"]) == ["scores"]  # float: no entropy


@pytest.mark.slow  # 19 s; .ci/run runs it (the Llama's sown statistics are tested above)
def test_training_program_adds_the_edgeqat_terms(tmp_path):
    import optax
    from train_configs import train_config

    from qjax import data as D
    from qjax import train
    from qjax._src import train_setup

    small = dict(d_model=32, n_layers=1, n_heads=2, seq_len=16, batch_size=2, steps=2, lr=1e-3,
                 hadamard_block=32, max_corpus_bytes=1_000_000, eval_every=2, eval_batches=1,
                 log_every=1, checkpoint_every=2)
    config = train_config(name="eq", out_dir=str(tmp_path), baseline=False, method="lsq",
                          attn_bits=8, attn_prob_bits=8, edgeqat_entropy=0.5,
                          edgeqat_attention=1.0, **small)
    (result,) = train.run(config)
    assert result["label"] == "lsq+edgeqat0.5/1 W4A4 QKV8 P8" and 0 < result["val_loss"] < 6
    first = _first_loss(tmp_path / "qat" / "metrics.jsonl")
    # independently: CE + 0.5 L_ent + 1 L_attn at the initial params on batch 0, the teacher
    # the float forward of the same weights
    model, params, _ = train_setup.initial_params(config)
    corpus = D.load_corpus(config.data)
    x, y = D.get_batch(corpus.train, 0, config.optim.batch_size, config.model.max_seq_len,
                       config.optim.seed)
    s, st = model.apply({"params": params}, x, qat=True, mutable=[E.COLLECTION])
    _, ft = model.apply({"params": params}, x, qat=False, mutable=[E.COLLECTION])
    a, f = st[E.COLLECTION]["blocks_0"]["attn"], ft[E.COLLECTION]["blocks_0"]["attn"]
    mask = jnp.tril(jnp.ones((16, 16), bool))
    expected = (float(optax.softmax_cross_entropy_with_integer_labels(s, y).mean())
                + 0.5 * float(E.entropy_loss(list(a["entropy"])))
                + float(E.attention_map_loss(a["scores"][0], f["scores"][0], mask)))
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected, rel=1e-5)


def _first_loss(path):
    import json

    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r][0]


@pytest.mark.slow  # 25 s: a float base, then QAT with its teacher; .ci/run runs it
def test_training_program_edgeqat_with_a_float_teacher_and_distillation(tmp_path):
    """With init_from, the attention term's teacher is the float checkpoint (the same one the
    distillation term reads)."""
    import optax
    from train_configs import train_config

    from qjax import data as D
    from qjax import train
    from qjax._src import train_setup

    small = dict(d_model=32, n_layers=1, n_heads=2, seq_len=16, batch_size=2, steps=2, lr=1e-3,
                 hadamard_block=32, max_corpus_bytes=1_000_000, eval_every=2, eval_batches=1,
                 log_every=1, checkpoint_every=2)
    train.run(train_config(name="base", out_dir=str(tmp_path / "base"), method=None, **small))
    config = train_config(name="eq", out_dir=str(tmp_path / "eq"), baseline=False, method="lsq",
                          init_from=str(tmp_path / "base" / "float"), distill=0.5,
                          attn_bits=8, edgeqat_attention=2.0, **small)
    train.run(config)
    first = _first_loss(tmp_path / "eq" / "qat" / "metrics.jsonl")
    model, params, _ = train_setup.initial_params(config)
    t_model, t_params = train_setup.teacher(config)
    corpus = D.load_corpus(config.data)
    x, y = D.get_batch(corpus.train, 0, config.optim.batch_size, config.model.max_seq_len,
                       config.optim.seed)
    s, st = model.apply({"params": params}, x, qat=True, mutable=[E.COLLECTION])
    t, tt = t_model.apply({"params": t_params}, x, mutable=[E.COLLECTION])
    ce = optax.softmax_cross_entropy_with_integer_labels(s, y).mean()
    kl = (jax.nn.softmax(t) * (jax.nn.log_softmax(t) - jax.nn.log_softmax(s))).sum(-1).mean()
    mask = jnp.tril(jnp.ones((16, 16), bool))
    attn = E.attention_map_loss(st[E.COLLECTION]["blocks_0"]["attn"]["scores"][0],
                                tt[E.COLLECTION]["blocks_0"]["attn"]["scores"][0], mask)
    expected = 0.5 * float(ce) + 0.5 * float(kl) + 2.0 * float(attn)
    assert first["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("fields, match", [
    (dict(method="lsq", edgeqat_entropy=0.5), "set attn_bits"),
    (dict(method="lsq", attn_bits=8, edgeqat_entropy=-1.0),
     "edgeqat_entropy must be a finite number in \\[0"),
])
def test_config_checks(fields, match):
    from train_configs import train_config

    with pytest.raises(ValueError, match=match):
        train_config(**fields)
