"""The notebooks in colabs/ run top to bottom (code cells executed in order, in one namespace)."""

import glob
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "colabs" / "*.ipynb"))))
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(ROOT / path) as f:
        nb = json.load(f)
    namespace: dict = {}
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            exec(compile(source, f"{path}[cell {i}]", "exec"), namespace)  # noqa: S102
