"""Run identity and checkpoint integrity (qjax.checkpoint), without training."""

import json
import os
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from qjax._src import checkpoint as C
from qjax._src.atomic_files import file_crc32


def _state(v: float = 1.0):
    return {"params": {"w": jnp.full((3, 4), v, jnp.float32)}, "step": 0}


def _save_steps(directory, steps):
    store = C.TrainingCheckpoints(str(directory), max_to_keep=None)
    for s in steps:
        store.save(s, _state(float(s)))
    store.close()


def _largest_file(step_dir):
    files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns
             if n != C.MANIFEST]
    return max(files, key=os.path.getsize)


def test_file_crc32_is_zlib_crc32(tmp_path):
    data = bytes(range(256)) * 40_000  # > one 4 MiB chunk
    (tmp_path / "f").write_bytes(data)
    assert file_crc32(str(tmp_path / "f")) == zlib.crc32(data)


def test_manifest_round_trip_and_each_kind_of_damage(tmp_path):
    step = tmp_path / "7"
    (step / "sub").mkdir(parents=True)
    (step / "a.bin").write_bytes(b"\x00" * 64)
    (step / "sub" / "b.bin").write_bytes(b"hello")
    manifest = C.write_manifest(str(step))
    assert manifest["files"] == {"a.bin": [64, zlib.crc32(b"\x00" * 64)],
                                 "sub/b.bin": [5, zlib.crc32(b"hello")]}
    assert C.verify_step(str(step)) is None
    (step / "a.bin").write_bytes(b"\x00" * 63 + b"\x01")  # one flipped bit, same size
    assert "a.bin fails its CRC-32" in C.verify_step(str(step))
    (step / "a.bin").write_bytes(b"\x00" * 10)  # truncated
    assert "a.bin has 10 bytes, expected 64" in C.verify_step(str(step))
    os.remove(step / "a.bin")
    assert "a.bin is missing" in C.verify_step(str(step))
    os.remove(step / C.MANIFEST)
    assert "no manifest" in C.verify_step(str(step))
    (step / C.MANIFEST).write_text("{not json")
    assert "unreadable manifest" in C.verify_step(str(step))
    with pytest.raises(FileNotFoundError, match="step_dir"):
        C.write_manifest(str(tmp_path / "absent"))


def test_latest_intact_step_falls_back_and_moves_damage_aside(tmp_path):
    ckpt = tmp_path / "run" / "ckpt"
    _save_steps(ckpt, [1, 2, 3])
    big = _largest_file(ckpt / "3")
    with open(big, "r+b") as f:  # flip one bit in the newest step
        f.seek(os.path.getsize(big) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    with open(_largest_file(ckpt / "2"), "r+b") as f:  # truncate the one before
        f.truncate(5)
    notes = []
    store = C.TrainingCheckpoints(str(ckpt), max_to_keep=None, log=notes.append)
    assert store.latest_intact_step() == 1
    assert [n.split(" is not intact")[0] for n in notes] == [
        f"checkpoint step 3 in {ckpt}", f"checkpoint step 2 in {ckpt}"]
    assert all("resuming from step 1" in n for n in notes)
    assert store.steps() == [1]
    assert sorted(os.listdir(tmp_path / "run" / "ckpt_corrupt")) == ["2-0", "3-0"]
    restored = store.restore(1, _state(0.0))
    np.testing.assert_array_equal(restored["params"]["w"], np.ones((3, 4)))
    store.save(2, _state(5.0))  # the moved-aside step can be written again
    assert store.latest_intact_step() == 2
    store.close()


def test_no_intact_step_and_mismatched_state(tmp_path):
    ckpt = tmp_path / "ckpt"
    _save_steps(ckpt, [4])
    notes = []
    os.remove(ckpt / "4" / C.MANIFEST)  # a kill between Orbax's rename and the manifest
    store = C.TrainingCheckpoints(str(ckpt), log=notes.append)
    assert store.latest_intact_step() is None
    assert "no manifest" in notes[0] and "starting from step 0" in notes[0]
    store.save(4, _state(2.0))
    with pytest.raises(C.RunDirError, match="checkpoint step 4 .* does not fit"):
        store.restore(4, {"params": {"w": jnp.zeros((5, 4))}, "step": 0})
    store.close()


def test_check_run_dir_records_then_refuses_another_identity(tmp_path):
    run = tmp_path / "qat"
    ident = {"config": {"weight_bits": 4, "corpus_paths": ("a",)}, "corpus": {"sha256": "x"}}
    C.check_run_dir(str(run), ident)
    assert json.loads((run / C.RUN_FILE).read_text())["config"]["corpus_paths"] == ["a"]
    C.check_run_dir(str(run), ident)  # the same identity (tuples read back as lists)
    other = {**ident, "config": {"weight_bits": 2, "corpus_paths": ("a",)}}
    with pytest.raises(C.RunDirError, match=r"config\.weight_bits: 4 -> 2"):
        C.check_run_dir(str(run), other)
    with pytest.raises(C.RunDirError, match=r"config\.rank: '<unset>' -> 8"):
        C.check_run_dir(str(run), {**ident, "config": {**ident["config"], "rank": 8}})


def test_check_run_dir_accepts_a_field_added_later_at_its_default(tmp_path):
    run = tmp_path / "qat"
    C.check_run_dir(str(run), {"config": {"weight_bits": 4}})  # recorded before "backward"
    defaults = {"config": {"weight_bits": 8, "backward": "float"}}
    C.check_run_dir(str(run), {"config": {"weight_bits": 4, "backward": "float"}},
                    defaults=defaults)
    with pytest.raises(C.RunDirError, match=r"config\.backward: '<unset>' -> 'int8'"):
        C.check_run_dir(str(run), {"config": {"weight_bits": 4, "backward": "int8"}},
                        defaults=defaults)
    with pytest.raises(C.RunDirError, match=r"config\.weight_bits: 4 -> 8"):  # recorded wins
        C.check_run_dir(str(run), {"config": {"weight_bits": 8}}, defaults=defaults)


def test_check_run_dir_refuses_results_without_a_record(tmp_path):
    (tmp_path / "old" / "ckpt").mkdir(parents=True)
    with pytest.raises(C.RunDirError, match="ckpt but no run.json"):
        C.check_run_dir(str(tmp_path / "old"), {"config": {}})
    C.check_run_dir(str(tmp_path / "probe"), {"config": {}}, write=False)
    assert not (tmp_path / "probe").exists()


def test_check_run_dir_reads_renamed_fields_under_their_new_names(tmp_path):
    run = tmp_path / "run"
    C.check_run_dir(str(run), {"config": {"clip": 1.3, "block_size": 64}})  # an older release
    renamed = {"config": {"clip": "clip_ratio", "block_size": "hadamard_block"}}
    C.check_run_dir(str(run), {"config": {"clip_ratio": 1.3, "hadamard_block": 64}},
                    renamed=renamed)
    with pytest.raises(C.RunDirError, match="hadamard_block: 64 -> 32"):
        C.check_run_dir(str(run), {"config": {"clip_ratio": 1.3, "hadamard_block": 32}},
                        renamed=renamed)


def test_save_writes_the_manifest_off_the_training_thread(tmp_path, monkeypatch):
    """``save`` returns while the manifest (CRCs of every file) is still being written; the next
    save / ``wait`` / ``close`` waits for it and re-raises its error."""
    import threading

    release, writing = threading.Event(), threading.Event()
    real = C.write_manifest

    def slow_manifest(step_dir):
        writing.set()
        assert release.wait(30)
        return real(step_dir)

    monkeypatch.setattr(C, "write_manifest", slow_manifest)
    store = C.TrainingCheckpoints(str(tmp_path / "ckpt"))
    store.save(1, _state(1.0))  # returns although the manifest writer is blocked
    assert writing.wait(30)
    assert not os.path.exists(tmp_path / "ckpt" / "1" / C.MANIFEST)
    release.set()
    store.wait()
    assert C.verify_step(str(tmp_path / "ckpt" / "1")) is None

    def failing_manifest(step_dir):
        raise OSError("disk full")

    monkeypatch.setattr(C, "write_manifest", failing_manifest)
    store.save(2, _state(2.0))
    with pytest.raises(OSError, match="disk full"):
        store.wait()
    assert store.latest_intact_step() == 1  # step 2 has no manifest
    store.close()
