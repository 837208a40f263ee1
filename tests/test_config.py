"""Tests for qjax._src.config: the sections of a TrainConfig and the checks that join them."""

import dataclasses

import pytest
from train_configs import train_config

from qjax.config import TrainConfig, apply_overrides, load_config


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
        train_config(steps=0)
    with pytest.raises(ValueError, match="unknown scale rule 'gauss'"):
        apply_overrides(TrainConfig(), ["scale_rule=gauss"])
    assert apply_overrides(TrainConfig(), ["scale_rule=mse:8:0.6"]).quant.scale_rule == "mse:8:0.6"


def test_repo_configs_load():
    import glob

    paths = sorted(p for p in glob.glob("configs/*.py") if not p.startswith("configs/_"))
    assert paths
    for p in paths:
        assert isinstance(load_config(p), TrainConfig)


def test_schedule_and_qat_fraction():
    c = TrainConfig()
    assert (c.optim.schedule, c.optim.qat_fraction) == ("cosine", None)
    c = apply_overrides(c, ["schedule=wsd_fused", "qat_fraction=0.25"])
    assert (c.optim.schedule, c.optim.qat_fraction) == ("wsd_fused", 0.25)
    c = apply_overrides(c, ["schedule=wsd_classical", "qat_fraction=optimal"])
    assert (c.optim.schedule, c.optim.qat_fraction) == ("wsd_classical", "optimal")
    bad = {
        "schedule must be one of": ["schedule=linear"],
        "qat_fraction must be a fraction in \\[0, 1\\]": ["schedule=wsd_fused", "qat_fraction=1.5"],
        "qat_fraction must be float or 'optimal'": ["qat_fraction=most"],
        "needs qat_fraction": ["schedule=wsd_fused"],
        "needs weight_bits": ["schedule=wsd_fused", "qat_fraction=optimal", "weight_bits=none"],
        # a float run's schedule reads weight_bits too
        "qat_fraction='optimal' needs weight_bits": [
            "method=none", "schedule=wsd_fused", "qat_fraction=optimal", "weight_bits=none"],
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
    assert (c.quant.method, c.init_from, c.method_options.rank, c.method_options.phi_dtype) == (
        "lr_qat", "runs/x/float", 16, "int8")
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
    assert (c.quant.method, c.quant.integer_forward, c.quant.backward) == ("ste", True, "int8")
    assert TrainConfig().quant.backward == "float"
    # A float run (e.g. the baseline of an int8-backward run) ignores it.
    assert train_config(method=None, integer_forward=True, backward="int8").quant.backward == "int8"
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
        train_config(backward=None)


@pytest.mark.parametrize("method", ["lr_qat", "qalora", "zeroqat", "double_rounding"])


def test_integer_forward_is_refused_where_it_would_be_ignored(method):
    # Everything else valid for the method (zeroqat fine-tunes from init_from; Double Rounding
    # stores its highest width), so the message is integer_forward's.
    extra = {"zeroqat": ["init_from=runs/x"], "double_rounding": ["weight_bits=8"]}.get(method, [])
    with pytest.raises(ValueError, match=f"integer_forward is for method .* got method='{method}'"):
        apply_overrides(TrainConfig(), [f"method={method}", *extra, "integer_forward=true"])
    c = apply_overrides(TrainConfig(), ["method=ste", "integer_forward=true"])
    assert c.quant.integer_forward


def test_sections_nest_the_model_corpus_and_recipe():
    from qjax.config import QuantConfig
    from qjax.data import CorpusConfig
    from qjax.models import LlamaConfig
    from qjax.nn import Method

    c = TrainConfig()
    assert isinstance(c.model, LlamaConfig) and isinstance(c.data, CorpusConfig)
    # the defaults are the main job's: d=128, 2 layers, 4 heads, seq 256, QuEST W4A4
    assert (c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.max_seq_len) == (
        128, 2, 4, 256)
    assert (c.quant.method, c.quant.weight_bits, c.quant.act_bits) == ("quest", 4, 4)
    # QuantConfig's fields are Method's, under the same names (so a recipe maps one to one)
    method_fields = {f.name for f in dataclasses.fields(Method)}
    assert {f.name for f in dataclasses.fields(QuantConfig)} - {"method"} <= method_fields
    with pytest.raises(TypeError, match="model must be a LlamaConfig"):
        TrainConfig(model={"d_model": 64})
    with pytest.raises(ValueError, match="vocab_size must be 256"):
        train_config(vocab_size=512)


@pytest.mark.parametrize("fields, match", [
    (dict(seq_len=True), "max_seq_len must be a positive int"),
    (dict(hidden_multiple=0), "hidden_multiple must be a positive int"),
    (dict(hidden=-5), "hidden must be a positive int"),
    (dict(rope_theta=float("nan")), "rope_theta must be positive and finite"),
    (dict(init_std=float("inf")), "init_std must be positive and finite"),
    (dict(norm_eps=-1.0), "norm_eps must be positive and finite"),
], ids=["bool_seq", "hidden_multiple", "hidden", "rope_nan", "init_inf", "eps_negative"])
def test_the_model_section_checks_its_fields(fields, match):
    with pytest.raises(ValueError, match=match):
        train_config(**fields)
