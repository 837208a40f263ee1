"""The README's Python examples run top to bottom (in one namespace, in a temporary folder)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks()
    assert len(blocks) >= 8
    namespace: dict = {}
    for i, source in enumerate(blocks):
        exec(compile(source, f"README.md[python block {i}]", "exec"), namespace)  # noqa: S102
