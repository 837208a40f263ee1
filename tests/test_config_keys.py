"""Tests for qjax._src.config_keys: short names and dotted paths, overrides, config files,
run identity."""


import pytest
from train_configs import train_config

from qjax.config import TrainConfig, apply_overrides, load_config, replace


def test_overrides_convert_types():
    c = apply_overrides(TrainConfig(), ["steps=7", "lr=0.5", "method=none", "baseline=false",
                                        "corpus_paths=a.txt,b.txt", "clip_ratio=1.3",
                                        "act_bits=None"])
    assert (c.optim.steps, c.optim.lr, c.quant.method, c.baseline) == (7, 0.5, None, False)
    assert c.data.paths == ("a.txt", "b.txt")
    assert c.quant.clip_ratio == 1.3 and c.quant.act_bits is None


def test_load_config_file(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("from qjax.config import OptimConfig, QuantConfig, TrainConfig\n"
                    "from qjax.models import LlamaConfig\n"
                    "def get_config():\n"
                    "    return TrainConfig(name='x', model=LlamaConfig(d_model=64),\n"
                    "                       optim=OptimConfig(steps=3),\n"
                    "                       quant=QuantConfig('lsq'))\n")
    c = load_config(str(path), ["steps=4", "model.n_layers=3"])
    assert c.name == "x" and c.optim.steps == 4 and c.quant.method == "lsq"
    assert (c.model.d_model, c.model.n_layers) == (64, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(tmp_path / "missing.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("X = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        load_config(str(bad))


def test_run_identity_keeps_what_changes_results_only():
    from qjax._src.config_keys import PLACEMENT_FIELDS, QUANT_FIELDS, run_identity

    base = TrainConfig()
    ident = run_identity(base)
    assert not set(PLACEMENT_FIELDS) & set(ident)
    assert ident["weight_bits"] == 4 and ident["corpus_paths"] == []
    # placement never changes the identity; results-bearing fields do
    moved = train_config(out_dir="/elsewhere", log_every=1, mesh={"data": 2}, stop_after=3)
    assert run_identity(moved) == ident
    assert run_identity(train_config(lr=1e-3)) != ident
    # a float run ignores the quantization fields, unless they set its schedule
    float_a = run_identity(train_config(method=None, weight_bits=4))
    assert float_a == run_identity(train_config(method=None, weight_bits=2, trust=2.0))
    assert not set(QUANT_FIELDS) & set(float_a)
    opt = dict(method=None, schedule="wsd_fused", qat_fraction="optimal")
    assert run_identity(train_config(**opt, weight_bits=4)) != run_identity(
        train_config(**opt, weight_bits=2))
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        run_identity({"lr": 1})


@pytest.mark.parametrize("old, new", [("clip", "clip_ratio"), ("hadamard", "hadamard_mode"),
                                      ("scale", "scale_rule"), ("block_size", "hadamard_block")])
def test_a_renamed_override_names_its_new_name(old, new):
    with pytest.raises(ValueError, match=f"config key '{old}' is now '{new}'"):
        apply_overrides(TrainConfig(), [f"{old}=1"])


def test_short_names_and_dotted_paths_name_the_same_field():
    from qjax._src.config_keys import field_paths

    paths = field_paths()
    assert paths["lr"] == ("optim", "lr") and paths["seq_len"] == ("model", "max_seq_len")
    assert paths["corpus_paths"] == ("data", "paths") and paths["name"] == ("name",)
    assert len(set(paths.values())) == len(paths)  # one short name per field
    a = apply_overrides(TrainConfig(), ["optim.lr=0.01", "model.max_seq_len=64",
                                        "quant.weight_bits=2", "data.paths=a.txt"])
    b = apply_overrides(TrainConfig(), ["lr=0.01", "seq_len=64", "weight_bits=2",
                                        "corpus_paths=a.txt"])
    assert a == b == replace(TrainConfig(), lr=0.01, seq_len=64, weight_bits=2,
                             corpus_paths=("a.txt",))
    assert a.optim.lr == 0.01 and a.model.max_seq_len == 64 and a.data.paths == ("a.txt",)
    # a whole section, and a field of it in the same call: the field wins
    from qjax.models import LlamaConfig
    c = replace(TrainConfig(), model=LlamaConfig(d_model=64, n_heads=2), n_layers=3)
    assert (c.model.d_model, c.model.n_heads, c.model.n_layers) == (64, 2, 3)
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        apply_overrides(TrainConfig(), ["optim.lrr=1"])
    with pytest.raises(ValueError, match="unknown config key 'max_bytes'"):
        replace(TrainConfig(), max_bytes=10)  # the corpus's is max_corpus_bytes at the top
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        replace({"lr": 1}, lr=2)


def test_a_run_recorded_before_the_nesting_resumes(tmp_path):
    """A run.json written by the flat TrainConfig (no model fields but the four it had) is the
    same run: its identity's keys are the short names, the model's new fields take defaults."""
    import json

    from qjax._src import train
    from qjax._src.checkpoint import RunDirError, check_run_dir
    from qjax._src.config_keys import RENAMED_FIELDS, run_identity

    config = train_config(d_model=64, n_heads=2, steps=4)
    flat = run_identity(config)
    old = {k: v for k, v in flat.items()
           if k not in ("vocab_size", "hidden", "hidden_multiple", "rope_theta", "norm_eps",
                        "init_std")}
    corpus = {"sha256": "0" * 16, "train_bytes": 1, "val_bytes": 1}
    (tmp_path / "run.json").write_text(json.dumps({"config": old, "corpus": corpus}))
    kw = dict(defaults=train.IDENTITY_DEFAULTS, renamed={"config": RENAMED_FIELDS})
    check_run_dir(str(tmp_path), {"config": flat, "corpus": corpus}, write=False, **kw)
    changed = run_identity(replace(config, rope_theta=500.0))
    with pytest.raises(RunDirError, match="rope_theta: '<unset>' -> 500.0"):
        check_run_dir(str(tmp_path), {"config": changed, "corpus": corpus}, write=False, **kw)


def test_errors_name_the_key_the_user_gave():
    with pytest.raises(ValueError, match=r"did you mean 'max_corpus_bytes' \(data.max_bytes\)"):
        apply_overrides(TrainConfig(), ["max_bytes=10"])
    with pytest.raises(ValueError, match=r"did you mean 'seq_len' \(model.max_seq_len\)"):
        apply_overrides(TrainConfig(), ["max_seq_len=10"])
    with pytest.raises(ValueError, match=r"max_seq_len must be a positive int, got 0 "
                                         r"\(setting seq_len\)"):
        apply_overrides(TrainConfig(), ["seq_len=0"])


def test_a_flat_config_file_is_told_about_the_sections(tmp_path):
    path = tmp_path / "flat.py"
    path.write_text("from qjax.config import TrainConfig\n"
                    "def get_config():\n    return TrainConfig(steps=3)\n")
    with pytest.raises(TypeError, match=r"nests its fields in sections .* qjax.config.replace"):
        load_config(str(path))
