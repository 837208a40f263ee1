"""The training program across processes: 2 processes x 2 CPU devices on 127.0.0.1 (gloo
collectives, ``jax.distributed``) reach the loss of a single-process run."""

import json
import os
import socket
import subprocess
import sys

import pytest

CONFIG = """
from qjax.config import TrainConfig

def get_config():
    return TrainConfig(name="multihost", d_model=64, n_layers=1, n_heads=2, seq_len=32,
                       batch_size=8, steps=4, eval_every=4, eval_batches=2, log_every=1,
                       checkpoint_every=2, max_corpus_bytes=2**19, block_size=32,
                       baseline=False, method="quest")
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


def test_two_processes_match_one(tmp_path):
    config = tmp_path / "multihost.py"
    config.write_text(CONFIG)
    port = _free_port()
    multi = [_launch(config, tmp_path / "multi", 2,
                     ["mesh=data:2,fsdp:2", f"coordinator_address=127.0.0.1:{port}",
                      "num_processes=2", f"process_id={i}"]) for i in range(2)]
    single = _launch(config, tmp_path / "single", 1, [])
    for proc in [*multi, single]:
        try:
            out, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in [*multi, single]:
                p.kill()
            pytest.fail("a training process did not finish in 600 s")
        assert proc.returncode == 0, out[-3000:]
    got, want = _result(tmp_path / "multi"), _result(tmp_path / "single")
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert _losses(tmp_path / "multi") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)
    assert got["tokens"] == want["tokens"] == 4 * 8 * 32
