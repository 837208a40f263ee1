"""End-to-end tests of the training program: a tiny run, exact resume, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from train_configs import train_config

from qjax import train
from qjax._src import train_setup
from qjax._src.checkpoint import MANIFEST, RunDirError

TINY = dict(d_model=64, n_layers=1, n_heads=2, seq_len=32, batch_size=4, steps=6, lr=3e-3,
            hadamard_block=64, max_corpus_bytes=2_000_000, eval_every=3, eval_batches=2,
            log_every=1, checkpoint_every=3)


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    config = train_config(name="tiny", out_dir=str(out), **TINY)
    return out, train.run(config)


def test_tiny_run_writes_metrics_checkpoints_and_table(uninterrupted, capsys):
    out, results = uninterrupted
    assert [r["label"] for r in results] == ["float32", "quest W4A4"]
    for sub in ("float", "qat"):
        rows = _rows(out / sub / "metrics.jsonl")
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
        assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
        assert all(r["qat"] == (sub == "qat") for r in rows if "loss" in r)
        assert sorted(os.listdir(out / sub / "ckpt")) == ["3", "6"]
        assert json.loads((out / sub / "done.json").read_text())["steps"] == 6
    assert "quest W4A4" in (out / "results.md").read_text()
    for r in results:
        assert 0 < r["val_loss"] < 6


def test_killed_run_resumes_with_identical_losses(uninterrupted, tmp_path):
    full_out, _ = uninterrupted
    config = train_config(name="tiny", out_dir=str(tmp_path), stop_after=3, baseline=False,
                          **TINY)
    assert train.run(config) == []  # stopped after the step-3 checkpoint
    # a half-written step-4 metrics line, as a kill right after logging would leave
    with open(tmp_path / "qat" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    # resuming under another config is refused, naming the field, before anything is trained
    for change, field in ((dict(act_bits=2), "act_bits: 4 -> 2"),
                          (dict(d_model=128, hadamard_block=None), "d_model: 64 -> 128")):
        with pytest.raises(RunDirError, match=field):
            train.run(train_config(name="tiny", out_dir=str(tmp_path), baseline=False,
                                   **{**TINY, **change}))
    resumed = train.run(train_config(name="tiny", out_dir=str(tmp_path), baseline=False, **TINY))
    def strip(rows):  # wall-clock throughput differs between runs; everything else must not
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    assert strip(_rows(tmp_path / "qat" / "metrics.jsonl")) == strip(
        _rows(full_out / "qat" / "metrics.jsonl"))
    assert resumed[0]["val_loss"] == json.loads((full_out / "qat" / "done.json").read_text())[
        "val_loss"]


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--override", "stepz=3"])
    assert e.value.code == 2 and "unknown config key 'stepz'" in capsys.readouterr().err
    config = train_config(name="x", out_dir=str(tmp_path), corpus_paths=(str(tmp_path / "no"),),
                          **{k: v for k, v in TINY.items() if k != "max_corpus_bytes"})
    with pytest.raises(FileNotFoundError, match="no"):
        train.run(config)


@pytest.mark.slow  # 35 s; .ci/run runs it; test_killed_run_resumes_... covers resume by default
def test_sigkill_mid_run_then_resume_matches(uninterrupted, tmp_path):
    """A real kill (SIGKILL, possibly mid-checkpoint) loses nothing: the resumed run's losses
    equal the uninterrupted run's."""
    import signal
    import subprocess
    import sys
    import time

    full_out, _ = uninterrupted
    overrides = [f"{k}={v}" for k, v in TINY.items()] + [
        "name=tiny", f"out_dir={tmp_path}", "baseline=false", "checkpoint_every=1", "steps=6"]
    cmd = [sys.executable, "-m", "qjax.train", "--override", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "qat" / "ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and any(p.name.isdigit() and int(p.name) >= 2 for p in ckpt.iterdir()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "qat" / "done.json").exists(), "the run finished before the kill"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=300)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    assert strip(_rows(tmp_path / "qat" / "metrics.jsonl")) == strip(
        _rows(full_out / "qat" / "metrics.jsonl"))


def test_float_phase_then_qat(tmp_path):
    config = train_config(name="phase", out_dir=str(tmp_path), baseline=False, qat_start=0.5,
                          **{**TINY, "steps": 4, "checkpoint_every": 4, "eval_every": 4})
    train.run(config)
    rows = [r for r in _rows(tmp_path / "qat" / "metrics.jsonl") if "loss" in r]
    assert [r["qat"] for r in rows] == [False, False, True, True]


@pytest.mark.slow  # 18 s; .ci/run runs it
def test_int8_backward_run_is_deterministic_and_resumes_exactly(tmp_path):
    """backward=int8 trains (the loss keyed per step from the seed): two runs of the config, one
    of them stopped and resumed, log the same losses."""
    small = {**TINY, "steps": 4, "checkpoint_every": 2, "eval_every": 4}

    def config(out, **changes):
        return train_config(name="bwd", out_dir=str(tmp_path / out), baseline=False, method="ste",
                            integer_forward=True, backward="int8", **{**small, **changes})

    (result,) = train.run(config("full"))
    assert result["label"] == "ste W4A4" and 0 < result["val_loss"] < 6
    full = [r for r in _rows(tmp_path / "full" / "qat" / "metrics.jsonl") if "loss" in r]
    losses = [r["loss"] for r in full]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert train.run(config("resumed", stop_after=2)) == []
    train.run(config("resumed"))
    resumed = [r for r in _rows(tmp_path / "resumed" / "qat" / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in resumed] == losses


@pytest.mark.slow  # 14 s; .ci/run runs it
def test_quantized_attention_run_learns_and_its_params_decode(tmp_path):
    """attn_bits / attn_prob_bits / kv_bits quantize the Llama's attention in QAT; the trained
    params decode with the int4 KV cache the config names."""
    from qjax.models.llama import init_caches

    small = {**TINY, "steps": 3, "checkpoint_every": 3, "eval_every": 3}
    config = train_config(name="attn", out_dir=str(tmp_path), baseline=False, method="quest",
                          attn_bits=8, attn_prob_bits=8, kv_bits=4, kv_group=8, **small)
    (result,) = train.run(config)
    rows = [r for r in _rows(tmp_path / "qat" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] and 0 < result["val_loss"] < 6
    attention = train_setup.attention_from_config(config)
    assert attention.k.format.bits == 4 and attention.p.format.name == "uint8"
    model, _ = train_setup.build_model(config)
    params = train.load_params(config, str(tmp_path / "qat"))
    ids = jnp.zeros((1, 5), jnp.int32)
    caches = init_caches(config.model, 1, 8, attention=attention)
    logits, caches = jax.jit(lambda p, i, c: model.apply({"params": p}, i, c, method="extend"))(
        params, ids, caches)
    full = jax.jit(model.apply)({"params": params}, ids)
    np.testing.assert_allclose(logits, full, rtol=0, atol=1e-6 * float(np.abs(full).max()))
    assert int(caches[0].length) == 5
    with pytest.raises(ValueError, match="kv_group is the group"):
        train_config(kv_group=8)
    with pytest.raises(ValueError, match="must divide the head size"):
        train_config(kv_bits=4, kv_group=24)
    with pytest.raises(ValueError, match="bits must be"):
        train_config(kv_bits=3)


@pytest.mark.slow  # 14 s; .ci/run runs it
def test_low_rank_qat_from_a_float_run(tmp_path):
    small = {**TINY, "steps": 2, "checkpoint_every": 2, "eval_every": 2}
    train.run(train_config(name="base", out_dir=str(tmp_path / "base"), method=None, **small))
    config = train_config(name="lr", out_dir=str(tmp_path / "lr"), baseline=False,
                          method="lr_qat", act_bits=None, rank=4,
                          init_from=str(tmp_path / "base" / "float"), **small)
    (result,) = train.run(config)
    assert result["label"] == "lr_qat r4 W4" and 0 < result["val_loss"] < 6
    params = train.load_params(config, str(tmp_path / "lr" / "qat"))
    assert {k[-1] for k in traverse_util.flatten_dict(params)} == {
        "lora_down", "lora_up", "kernel_scale"}
    with pytest.raises(ValueError, match="needs init_from|set init_from"):
        train_config(method="qalora")


def test_rerun_with_other_overrides_never_returns_the_old_results(uninterrupted, capsys):
    out, results = uninterrupted
    before = (out / "qat" / "done.json").read_text()
    with pytest.raises(RunDirError, match=r"qat holds a run of another config \(config\."
                                          r"weight_bits: 4 -> 2\)"):
        train.run(train_config(name="tiny", out_dir=str(out), **{**TINY, "weight_bits": 2}))
    assert (out / "qat" / "done.json").read_text() == before
    # the same config again returns the recorded results without training
    assert train.run(train_config(name="tiny", out_dir=str(out), **TINY)) == results
    assert "resumed" not in capsys.readouterr().err


@pytest.mark.slow  # 13 s; .ci/run runs it
def test_flipped_bit_in_the_latest_checkpoint_resumes_from_the_intact_one(
        uninterrupted, tmp_path, capsys):
    full_out, _ = uninterrupted
    tiny = {**TINY, "checkpoint_every": 2}
    train.run(train_config(name="tiny", out_dir=str(tmp_path), baseline=False, stop_after=4,
                           **tiny))
    step4 = tmp_path / "qat" / "ckpt" / "4"
    files = [os.path.join(r, n) for r, _, ns in os.walk(step4) for n in ns if n != MANIFEST]
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as f:
        f.seek(os.path.getsize(big) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    capsys.readouterr()
    result = train.run(train_config(name="tiny", out_dir=str(tmp_path), baseline=False, **tiny))
    err = capsys.readouterr().err
    assert "checkpoint step 4" in err and "fails its CRC-32 check" in err
    assert "resuming from step 2" in err and "resumed from step 2" in err
    assert os.listdir(tmp_path / "qat" / "ckpt_corrupt") == ["4-0"]

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]

    assert strip(_rows(tmp_path / "qat" / "metrics.jsonl")) == strip(
        _rows(full_out / "qat" / "metrics.jsonl"))
    assert result[0]["val_loss"] == json.loads((full_out / "qat" / "done.json").read_text())[
        "val_loss"]


@pytest.mark.parametrize("override, message", [
    ("method=foo", "method must be None or one of"),
    ("weight_bits=9", "weight_bits must be in [1, 8], got 9"),
    ("lr=nan", "lr must be a finite number"),
    ("d_model=96", "Hadamard block hadamard_block=128 does not divide the K (contracted size) 96"),
    ("grad_clip=0", "grad_clip must be a finite number"),
    ("backward=int8", "set integer_forward=true too"),
], ids=["method", "bits", "lr", "hadamard_block", "grad_clip", "backward"])
def test_config_mistakes_fail_in_one_line_before_any_data_is_read(override, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--override", override, "corpus_paths=/nonexistent"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


@pytest.fixture(scope="module")
def float_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    small = {**TINY, "steps": 2, "checkpoint_every": 2, "eval_every": 2}
    train.run(train_config(name="base", out_dir=str(out), method=None, **small))
    return small, str(out / "float")


@pytest.mark.slow  # 22 s; .ci/run runs it; distillation_loss is unit-tested in test_distill.py
def test_distill_loss_is_the_mix_of_cross_entropy_and_teacher_kl(float_base, tmp_path):
    import jax
    import optax

    from qjax import data as D
    from qjax._src import train_setup

    small, base = float_base
    config = train_config(name="kd", out_dir=str(tmp_path), baseline=False, method="lsq",
                          init_from=base, distill=0.25, distill_temperature=2.0,
                          **{**small, "log_every": 1})
    (result,) = train.run(config)
    assert result["label"] == "lsq+kd0.25 W4A4"
    first = _rows(tmp_path / "qat" / "metrics.jsonl")[0]
    # independently: the initial student and the teacher on batch 0
    model, params, _ = train_setup.initial_params(config)
    t_model, t_params = train_setup.teacher(config)
    corpus = D.load_corpus(config.data)
    x, y = D.get_batch(corpus.train, 0, config.optim.batch_size, config.model.max_seq_len,
                       config.optim.seed)
    s = model.apply({"params": params}, x, qat=True)
    t = t_model.apply({"params": t_params}, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(s, y).mean()
    pt = jax.nn.softmax(t / 2.0)
    kl = (pt * (jax.nn.log_softmax(t / 2.0) - jax.nn.log_softmax(s / 2.0))).sum(-1).mean()
    expected = 0.75 * float(ce) + 0.25 * float(kl) * 2.0 ** 2
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow  # 33 s; zeroqat and Double Rounding are unit-tested in their own files
def test_zeroqat_and_double_rounding_from_the_program(float_base, tmp_path):
    small, base = float_base
    zo = train_config(name="zo", out_dir=str(tmp_path / "zo"), baseline=False, method="zeroqat",
                      init_from=base, act_bits=8, zo_probes=2, **{**small, "lr": 1e-5})
    (r,) = train.run(zo)
    assert r["label"] == "zeroqat W4A8" and 0 < r["val_loss"] < 6
    trained = train.load_params(zo, str(tmp_path / "zo" / "qat"))
    from qjax._src import train_setup

    _, start, _ = train_setup.initial_params(zo)
    moved = jax_tree_max_abs_diff(trained, start)
    assert moved > 0  # the zeroth-order steps changed the weights and learned steps
    dr = train_config(name="dr", out_dir=str(tmp_path / "dr"), baseline=False,
                      method="double_rounding", weight_bits=8, double_rounding_bits=(8, 4),
                      double_rounding_weights=(1.0, 0.5), act_bits=None, **small)
    (r,) = train.run(dr)
    assert list(r["val_loss_at_bits"]) == ["8", "4"]
    assert r["val_loss_at_bits"]["8"] == r["val_loss"]
    table = (tmp_path / "dr" / "results.md").read_text()
    assert "double_rounding w1/0.5 W8 (of W8)" in table
    assert "double_rounding w1/0.5 W4 (of W8)" in table


def jax_tree_max_abs_diff(a, b) -> float:
    import jax
    import numpy as np

    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("fields, message", [
    (dict(method="zeroqat"), "set init_from"),
    (dict(method="lsq", distill=0.5), "distill > 0 .* set init_from"),
    (dict(method="lsq", distill=1.5, init_from="x"), "distill must be a weight in"),
    (dict(method="double_rounding", weight_bits=4, double_rounding_bits=(8, 4)),
     "stores weight_bits = the highest"),
    (dict(method="gptq"), "method must be None or one of"),
    (dict(method="lsq", cga_boundary_range=0.01), "it needs method='ofq'"),
    (dict(method="ofq", cga_boundary_range=0.5), "cga_boundary_range must be None or a"),
    (dict(method="ofq", cga_start=1.5), "cga_start must be a fraction"),
    (dict(method="ofq", mixed_precision_budget=3.0), "mixed_precision_budget must be None"),
], ids=["zeroqat_needs_base", "distill_needs_base", "distill_range", "dr_bits", "unknown",
        "cga_needs_ofq", "cga_range", "cga_start", "ofq_one_width"])
def test_method_options_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        train_config(**fields)


@pytest.mark.slow  # 14 s; .ci/run runs it
def test_mixed_precision_budget_allocates_records_and_trains(float_base, tmp_path):
    small, base = float_base
    config = train_config(name="mp", out_dir=str(tmp_path), baseline=False, method="lsq",
                          act_bits=None, init_from=base, mixed_precision_budget=3.0,
                          mixed_precision_bits=(2, 4, 8), **small)
    (r,) = train.run(config)
    assert r["label"] == "lsq+hawq W3"
    alloc = json.loads((tmp_path / "qat" / "allocation.json").read_text())
    widths = alloc["widths"]
    assert len(widths) == 7 and set(widths.values()) <= {2, 4, 8}
    assert alloc["average_bits"] <= 3.0 and alloc["probes"] >= 10
    # the trained model has those widths: its kernels' learned steps were made for them, and
    # the recorded allocation is what a reload uses
    from qjax._src import train_setup

    assert train_setup.recorded_widths(config, str(tmp_path / "qat")) == widths
    import jax.numpy as jnp

    model, _, _ = train_setup.initial_params(config, widths)
    sites = model.sites(jnp.zeros((1, small["seq_len"]), jnp.int32))
    assert {f"{p}/kernel": s.recipe.weight.format.bits for p, s in sites.items()} == widths
    params = train.load_params(config, str(tmp_path / "qat"))
    assert "kernel_scale" in params["blocks_0"]["attn"]["q"]
    with pytest.raises(ValueError, match=r"average width in \[2, 8\]"):
        train_config(method="lsq", mixed_precision_budget=1.5, mixed_precision_bits=(2, 8))


@pytest.mark.slow  # 20 s; .ci/run runs it; StatsQ, CGA and the tracker are unit-tested
def test_ofq_run_logs_oscillations_anneals_and_resumes_exactly(tmp_path):
    """method=ofq: osc_ratio logged every step; CGA from step 3 freezes the confident weights
    (most block kernel entries stay bit for bit from step 3 on, none before); a run stopped
    after step 3 resumes to the uninterrupted run's metrics (tracker and CGA state included)."""
    ofq_run = {**TINY, "method": "ofq", "weight_bits": 2, "act_bits": 4, "baseline": False,
               "cga_boundary_range": 0.02, "cga_start": 0.5}
    full = train_config(name="ofq", out_dir=str(tmp_path / "full"), **ofq_run)
    (result,) = train.run(full)
    rows = _rows(tmp_path / "full" / "qat" / "metrics.jsonl")
    ratios = [r["osc_ratio"] for r in rows if "loss" in r]
    assert len(ratios) == 6 and all(0.0 <= r <= 1.0 for r in ratios) and ratios[-1] > 0
    assert result["osc_ratio"] == ratios[-1] and result["label"] == "ofq+cga0.02 W2A4"

    part = train_config(name="ofq", out_dir=str(tmp_path / "part"), stop_after=3, **ofq_run)
    assert train.run(part) == []
    p3 = train_setup.load_params(part, str(tmp_path / "part" / "qat"))
    assert train.run(train_config(name="ofq", out_dir=str(tmp_path / "part"), **ofq_run))
    p6 = train_setup.load_params(part, str(tmp_path / "part" / "qat"))
    p0 = train_setup.initial_params(full)[1]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    assert strip(_rows(tmp_path / "part" / "qat" / "metrics.jsonl")) == strip(rows)

    kernels = traverse_util.flatten_dict(train_setup.block_kernel_mask(p0), sep="/")
    assert len([k for k, v in kernels.items() if v]) == 7  # q, k, v, o, gate, up, down

    def unchanged(a, b):
        fa, fb = (traverse_util.flatten_dict(t, sep="/") for t in (a, b))
        same = sum(int(np.sum(np.asarray(fa[k]) == np.asarray(fb[k]))) for k in kernels
                   if kernels[k])
        return same / sum(fa[k].size for k in kernels if kernels[k])

    assert unchanged(p0, p3) < 0.01  # Adam moves every weight before CGA starts
    assert unchanged(p3, p6) > 0.5  # then the confident ones (d > 0.02 steps) are frozen


@pytest.mark.slow  # ~10 s; .ci/run runs it
def test_token_adaptive_attention_run_learns(tmp_path):
    """attn_low_bits: EdgeQAT's token-adaptive Q/K/V widths in the training program."""
    small = {**TINY, "steps": 3, "checkpoint_every": 3, "eval_every": 3}
    config = train_config(name="adaptive", out_dir=str(tmp_path), baseline=False, method="quest",
                          attn_bits=8, attn_prob_bits=8, attn_low_bits=4, **small)
    (result,) = train.run(config)
    rows = [r for r in _rows(tmp_path / "qat" / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] and 0 < result["val_loss"] < 6
