"""The training program across processes and meshes: 2 processes x 2 CPU devices on 127.0.0.1
(gloo collectives, ``jax.distributed``) reach the loss of a single-process run, and a run stopped
on one mesh resumes on another."""

import json
import os
import socket
import subprocess
import sys

import pytest

CONFIG = """
from qjax.config import OptimConfig, QuantConfig, TrainConfig
from qjax.data import CorpusConfig
from qjax.models import LlamaConfig

def get_config():
    return TrainConfig(name="multihost",
                       model=LlamaConfig(d_model=64, n_layers=1, n_heads=2, max_seq_len=32),
                       data=CorpusConfig(max_bytes=2**19),
                       optim=OptimConfig(batch_size=8, steps=4),
                       quant=QuantConfig("quest", hadamard_block=32),
                       eval_every=4, eval_batches=2, log_every=1, checkpoint_every=2,
                       baseline=False)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config_path, out_dir, devices, overrides):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "qjax.train", "--config", str(config_path), "--override",
           f"out_dir={out_dir}", *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _result(out_dir):
    with open(os.path.join(out_dir, "qat", "done.json")) as f:
        return json.load(f)


def _losses(out_dir):
    with open(os.path.join(out_dir, "qat", "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def _wait(procs):
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a training process did not finish in 600 s")
        assert proc.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The reference: one process, one device."""
    root = tmp_path_factory.mktemp("single")
    config = root / "multihost.py"
    config.write_text(CONFIG)
    _wait([_launch(config, root / "run", 1, [])])
    return config, root / "run"


@pytest.mark.slow  # 34 s + 19 s setup; .ci/run runs it
def test_two_processes_match_one(tmp_path, single_run):
    config, single_dir = single_run
    port = _free_port()
    _wait([_launch(config, tmp_path / "multi", 2,
                   ["mesh=data:2,fsdp:2", f"coordinator_address=127.0.0.1:{port}",
                    "num_processes=2", f"process_id={i}"]) for i in range(2)])
    got, want = _result(tmp_path / "multi"), _result(single_dir)
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert _losses(tmp_path / "multi") == pytest.approx(_losses(single_dir), rel=1e-5)
    assert got["tokens"] == want["tokens"] == 4 * 8 * 32


@pytest.mark.slow  # 39 s; resume is also tested single-process (test_train.py, SIGKILL)
def test_a_stopped_run_resumes_on_another_mesh(tmp_path, single_run):
    config, single_dir = single_run
    _wait([_launch(config, tmp_path / "run", 8, ["mesh=data:2,fsdp:2,tensor:2",
                                                 "stop_after=2"])])
    assert not os.path.exists(tmp_path / "run" / "qat" / "done.json")
    _wait([_launch(config, tmp_path / "run", 8, ["mesh=data:4,fsdp:2",
                                                 "mesh_axis_types=auto"])])
    assert _result(tmp_path / "run")["val_loss"] == pytest.approx(
        _result(single_dir)["val_loss"], rel=1e-5)
    assert _losses(tmp_path / "run") == pytest.approx(_losses(single_dir), rel=1e-5)
