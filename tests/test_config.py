"""Tests for qjax.config: loading config files and key=value overrides."""

import pytest

from qjax.config import TrainConfig, apply_overrides, load_config


def test_overrides_convert_types():
    c = apply_overrides(TrainConfig(), ["steps=7", "lr=0.5", "method=none", "baseline=false",
                                        "corpus_paths=a.txt,b.txt", "clip_ratio=1.3",
                                        "act_bits=None"])
    assert (c.steps, c.lr, c.method, c.baseline) == (7, 0.5, None, False)
    assert c.corpus_paths == ("a.txt", "b.txt") and c.clip_ratio == 1.3 and c.act_bits is None


def test_unknown_key_and_bad_values():
    with pytest.raises(ValueError, match="unknown config key 'stepz'"):
        apply_overrides(TrainConfig(), ["stepz=3"])
    with pytest.raises(ValueError, match="steps must be int"):
        apply_overrides(TrainConfig(), ["steps=many"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(TrainConfig(), ["steps"])
    with pytest.raises(ValueError, match="baseline must be true or false"):
        apply_overrides(TrainConfig(), ["baseline=maybe"])
    with pytest.raises(ValueError, match="steps must be a positive int"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unknown scale rule 'gauss'"):
        apply_overrides(TrainConfig(), ["scale_rule=gauss"])
    assert apply_overrides(TrainConfig(), ["scale_rule=mse:8:0.6"]).scale_rule == "mse:8:0.6"


def test_load_config_file(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("from qjax.config import TrainConfig\n"
                    "def get_config():\n    return TrainConfig(name='x', steps=3)\n")
    c = load_config(str(path), ["steps=4"])
    assert c.name == "x" and c.steps == 4
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "missing.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("X = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        load_config(str(bad))


def test_repo_configs_load():
    import glob

    paths = sorted(p for p in glob.glob("configs/*.py") if not p.startswith("configs/_"))
    assert paths
    for p in paths:
        assert isinstance(load_config(p), TrainConfig)


def test_schedule_and_qat_fraction():
    c = TrainConfig()
    assert (c.schedule, c.qat_fraction) == ("cosine", None)
    c = apply_overrides(c, ["schedule=wsd_fused", "qat_fraction=0.25"])
    assert (c.schedule, c.qat_fraction) == ("wsd_fused", 0.25)
    c = apply_overrides(c, ["schedule=wsd_classical", "qat_fraction=optimal"])
    assert (c.schedule, c.qat_fraction) == ("wsd_classical", "optimal")
    bad = {
        "schedule must be one of": ["schedule=linear"],
        "qat_fraction must be a fraction in \\[0, 1\\]": ["schedule=wsd_fused", "qat_fraction=1.5"],
        "qat_fraction must be float or 'optimal'": ["qat_fraction=most"],
        "needs qat_fraction": ["schedule=wsd_fused"],
        "needs weight_bits": ["schedule=wsd_fused", "qat_fraction=optimal", "weight_bits=none"],
        "schedule='cosine' starts QAT at qat_start": ["qat_fraction=0.2"],
        "qat_start is for schedule='cosine'": ["schedule=wsd_fused", "qat_fraction=0.2",
                                              "qat_start=0.5"],
    }
    for message, overrides in bad.items():
        with pytest.raises(ValueError, match=message):
            apply_overrides(TrainConfig(), overrides)


def test_low_rank_fields():
    c = apply_overrides(TrainConfig(), ["method=lr_qat", "init_from=runs/x/float", "rank=16",
                                        "phi_dtype=int8", "act_bits=none"])
    assert (c.method, c.init_from, c.rank, c.phi_dtype) == ("lr_qat", "runs/x/float", 16, "int8")
    assert apply_overrides(TrainConfig(), ["init_from=none"]).init_from is None
    bad = {
        "set init_from": ["method=qalora"],
        "rank must be a positive int": ["rank=0"],
        "phi_dtype must be one of": ["phi_dtype=fp8"],
        "phi_dtype is for method='lr_qat'": ["method=qalora", "init_from=a", "phi_dtype=int8"],
        "runs on one device": ["method=lr_qat", "init_from=a", "mesh=data:2"],
    }
    for message, overrides in bad.items():
        with pytest.raises(ValueError, match=message):
            apply_overrides(TrainConfig(), overrides)


def test_backward_field():
    c = apply_overrides(TrainConfig(), ["method=ste", "integer_forward=true", "backward=int8"])
    assert (c.method, c.integer_forward, c.backward) == ("ste", True, "int8")
    assert TrainConfig().backward == "float"
    # A float run (e.g. the baseline of an int8-backward run) ignores it.
    assert TrainConfig(method=None, integer_forward=True, backward="int8").backward == "int8"
    bad = {
        r"backward must be one of \('float', 'int8'\), got 'fp8'": ["backward=fp8"],
        "backward='int8' reuses the int8 codes of the integer forward: set integer_forward=true":
            ["backward=int8"],
        "integer_forward is for method quest, lsq, pact, ste or ofq": [
            "method=double_rounding", "weight_bits=8", "integer_forward=true", "backward=int8"],
    }
    for message, overrides in bad.items():
        with pytest.raises(ValueError, match=message):
            apply_overrides(TrainConfig(), overrides)
    with pytest.raises(ValueError, match="backward must be one of"):
        TrainConfig(backward=None)


def test_run_identity_keeps_what_changes_results_only():
    from qjax._src.config import PLACEMENT_FIELDS, QUANT_FIELDS, run_identity

    base = TrainConfig()
    ident = run_identity(base)
    assert not set(PLACEMENT_FIELDS) & set(ident)
    assert ident["weight_bits"] == 4 and ident["corpus_paths"] == []
    # placement never changes the identity; results-bearing fields do
    moved = TrainConfig(out_dir="/elsewhere", log_every=1, mesh={"data": 2}, stop_after=3)
    assert run_identity(moved) == ident
    assert run_identity(TrainConfig(lr=1e-3)) != ident
    # a float run ignores the quantization fields, unless they set its schedule
    float_a = run_identity(TrainConfig(method=None, weight_bits=4))
    assert float_a == run_identity(TrainConfig(method=None, weight_bits=2, trust=2.0))
    assert not set(QUANT_FIELDS) & set(float_a)
    opt = dict(method=None, schedule="wsd_fused", qat_fraction="optimal")
    assert run_identity(TrainConfig(**opt, weight_bits=4)) != run_identity(
        TrainConfig(**opt, weight_bits=2))
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        run_identity({"lr": 1})


@pytest.mark.parametrize("old, new", [("clip", "clip_ratio"), ("hadamard", "hadamard_mode"),
                                      ("scale", "scale_rule"), ("block_size", "hadamard_block")])
def test_a_renamed_override_names_its_new_name(old, new):
    with pytest.raises(ValueError, match=f"config key '{old}' is now '{new}'"):
        apply_overrides(TrainConfig(), [f"{old}=1"])


@pytest.mark.parametrize("method", ["lr_qat", "qalora", "zeroqat", "double_rounding"])
def test_integer_forward_is_refused_where_it_would_be_ignored(method):
    # Everything else valid for the method (zeroqat fine-tunes from init_from; Double Rounding
    # stores its highest width), so the message is integer_forward's.
    extra = {"zeroqat": ["init_from=runs/x"], "double_rounding": ["weight_bits=8"]}.get(method, [])
    with pytest.raises(ValueError, match=f"integer_forward is for method .* got method='{method}'"):
        apply_overrides(TrainConfig(), [f"method={method}", *extra, "integer_forward=true"])
    assert apply_overrides(TrainConfig(), ["method=ste", "integer_forward=true"]).integer_forward
