"""Tests for qjax.convert.io: Orbax save/restore of serving params and jax.export artifacts."""

import functools
import os

import jax
import numpy as np
import pytest
from test_convert import IDS
from test_convert import setup as _setup

from qjax import convert as QC
from qjax._src.convert.io import directory_bytes
from qjax.nn import Method


@functools.cache
def setup(method):
    """(QAT model, serving params, jitted serving forward), shared with test_convert."""
    qm, _, sp = _setup(method)
    return qm, sp, jax.jit(lambda p, i: QC.serve(qm, p, i))


W4 = Method("ste", 4, None)
W4A4 = Method("quest", 4, 4, hadamard_block=64)


def tree_equal(a, b):
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_save_restore_roundtrip_serves_the_same(tmp_path):
    qm, sp, fwd = setup(W4A4)
    size = QC.save(str(tmp_path / "ckpt"), sp)
    assert size == directory_bytes(str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind
    restored = QC.restore(str(tmp_path / "ckpt"), sp)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(sp)
    assert tree_equal(restored, sp)
    np.testing.assert_array_equal(fwd(restored, IDS), fwd(sp, IDS))
    plain = QC.restore(str(tmp_path / "ckpt"))
    q = plain["blocks_0"]["attn"]["q"]["kernel"]
    assert set(q) == {"codes", "scale"} and q["codes"].dtype == np.uint8  # int4, packed
    assert q["codes"].shape == (64, 32)


def test_unpacked_serving_params_save_restore_and_serve_the_same(tmp_path):
    qm, sp, fwd = setup(W4A4)
    un = QC.relayout_params(sp, packed=False, k_major=True)
    q = un["blocks_0"]["attn"]["q"]["kernel"]
    assert not q.packed and q.k_major and q.codes.shape == (64, 64) and q.codes.dtype == np.int8
    np.testing.assert_array_equal(fwd(un, IDS), fwd(sp, IDS))  # the same codes, read unpacked
    QC.save(str(tmp_path / "ckpt"), un)
    restored = QC.restore(str(tmp_path / "ckpt"), un)
    kernel = restored["blocks_0"]["attn"]["q"]["kernel"]
    assert not kernel.packed and kernel.k_major and tree_equal(restored, un)
    with pytest.raises(ValueError, match="specs differ"):  # the manifest records packed
        QC.restore(str(tmp_path / "ckpt"), sp)


def test_save_refuses_to_overwrite_and_overwrites_atomically(tmp_path):
    _, sp4, _ = setup(W4)
    path = str(tmp_path / "ckpt")
    QC.save(path, sp4)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        QC.save(path, sp4)
    _, sp44, _ = setup(W4A4)
    QC.save(path, sp44, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert tree_equal(QC.restore(path, sp44), sp44)
    with pytest.raises(ValueError, match="specs differ"):
        QC.restore(path, sp4)


def _array_files(path):
    return [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(path, "arrays")) for f in fs
            if os.path.getsize(os.path.join(d, f)) > 64]


def test_corrupt_and_truncated_checkpoints_raise(tmp_path):
    _, sp, _ = setup(W4)
    path = str(tmp_path / "ckpt")
    QC.save(path, sp)
    with pytest.raises(FileNotFoundError):
        QC.restore(str(tmp_path / "nothing"))
    # Flip one byte in every array data file: restore must notice.
    files = _array_files(path)
    assert files
    backup = {f: open(f, "rb").read() for f in files}
    for f, data in backup.items():
        with open(f, "wb") as fh:
            fh.write(data[:-20] + bytes([data[-20] ^ 0xFF]) + data[-19:])
    with pytest.raises(ValueError, match="corrupt"):
        QC.restore(path, sp)
    for f, data in backup.items():  # truncated
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        QC.restore(path, sp)
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(ValueError, match="not a complete qjax serving checkpoint"):
        QC.restore(path, sp)


def test_export_roundtrip_runs_without_the_model(tmp_path):
    qm, sp, fwd = setup(W4A4)
    path = str(tmp_path / "serve.jaxexport")
    data = QC.export_serving(qm, sp, IDS, path=path)
    assert open(path, "rb").read() == data
    call = QC.load_exported(path)
    QC.save(str(tmp_path / "ckpt"), sp)
    arrays = QC.restore(str(tmp_path / "ckpt"))  # plain arrays: no qjax model needed
    np.testing.assert_array_equal(call(arrays, IDS), fwd(sp, IDS))
    with pytest.raises(ValueError, match="not a valid jax.export artifact"):
        QC.load_exported(data[: len(data) // 3])
    with pytest.raises(TypeError, match="model must be"):
        QC.export_serving(qm.model, sp, IDS)


def test_from_arrays_rejects_mismatched_structure():
    _, sp, _ = setup(W4)
    arrays = QC.to_arrays(sp)
    arrays["blocks_0"]["attn"]["q"]["kernel"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match="expected a packed QArray"):
        QC.from_arrays(arrays, sp)
    arrays = QC.to_arrays(sp)
    del arrays["lm_head"]
    with pytest.raises(ValueError, match="do not match"):
        QC.from_arrays(arrays, sp)


def test_save_restore_argument_validation(tmp_path):
    _, sp, _ = setup(W4)
    path = str(tmp_path / "ckpt")
    QC.save(path, sp)
    before = sorted(os.listdir(path))
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        QC.save(path, sp, overwrite="no")  # a truthy string replaced the checkpoint
    assert sorted(os.listdir(path)) == before and sorted(os.listdir(tmp_path)) == ["ckpt"]
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got NoneType"):
        QC.save(None, sp)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got NoneType"):
        QC.restore(None)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        directory_bytes(None)
    with pytest.raises(TypeError, match="like must be a mapping"):
        QC.restore(path, [1])


def test_from_arrays_rejects_codes_of_another_dtype():
    _, sp, _ = setup(W4)
    arrays = QC.to_arrays(sp)
    q = arrays["blocks_0"]["attn"]["q"]["kernel"]
    q["codes"] = np.asarray(q["codes"]).astype(np.float32)  # dequantize cannot unpack these
    with pytest.raises(ValueError, match="q/kernel/codes: dtype float32 does not match the "
                                         "model's uint8"):
        QC.from_arrays(arrays, sp)
    q["codes"] = q["codes"].astype(np.uint8)
    assert tree_equal(QC.from_arrays(arrays, sp), sp)


def _occupy(path: str, kind: str) -> str:
    """Puts a regular file or a non-empty directory at ``path``."""
    if kind == "file":
        open(path, "w").write("x")
    else:
        os.makedirs(os.path.join(path, "sub"))
    return path


def test_one_overwrite_policy_for_save_and_export_serving(tmp_path):
    # save(overwrite=True) onto a regular file raised NotADirectoryError after writing and left
    # path.old-<hex> behind; export_serving overwrote silently.
    qm, sp, _ = setup(W4)
    for existing in ("file", "dir"):
        path = _occupy(str(tmp_path / f"ckpt_{existing}"), existing)
        with pytest.raises(FileExistsError, match="overwrite=True"):
            QC.save(path, sp)
        QC.save(path, sp, overwrite=True)
        assert tree_equal(QC.restore(path, sp), sp)
        art = _occupy(str(tmp_path / f"art_{existing}"), existing)
        with pytest.raises(FileExistsError, match="overwrite=True"):
            QC.export_serving(qm, sp, IDS, path=art)
        data = QC.export_serving(qm, sp, IDS, path=art, overwrite=True)
        assert os.path.isfile(art) and open(art, "rb").read() == data
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        QC.export_serving(qm, sp, IDS, path=str(tmp_path / "new"), overwrite="no")
    # A checkpoint directory replaced by an export artifact (and back) leaves nothing else.
    QC.export_serving(qm, sp, IDS, path=str(tmp_path / "ckpt_dir"), overwrite=True)
    QC.save(str(tmp_path / "art_file"), sp, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["art_dir", "art_file", "ckpt_dir", "ckpt_file"]
    assert os.path.isfile(tmp_path / "ckpt_dir") and os.path.isdir(tmp_path / "art_file")


def test_write_atomically_cleans_up_on_failure(tmp_path):
    from qjax._src.atomic_files import write_atomically
    path = str(tmp_path / "p")
    open(path, "w").write("old")

    def bad(tmp):
        os.makedirs(os.path.join(tmp, "half"))
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(path, bad, overwrite=True)
    assert os.listdir(tmp_path) == ["p"] and open(path).read() == "old"
    with pytest.raises(FileExistsError):  # path appeared while writing: not replaced
        write_atomically(path, lambda tmp: open(tmp, "w").write("new"), overwrite=False)
    assert os.listdir(tmp_path) == ["p"] and open(path).read() == "old"


def test_a_checkpoint_written_under_the_old_spec_field_names_restores(tmp_path):
    """``tests/data/serving_v1_names`` was saved by qjax before QuantSpec's ``scale`` /
    ``hadamard`` / ``Trust.clip`` became ``scale_rule`` / ``hadamard_block`` / ``clip_ratio``
    (and the Hadamard method's default became ``"matmul"``, then ``"kronecker"``): a QuEST W4A4
    layer with a 16-block half rotation and an LSQ layer. Its manifest's specs still match
    today's model (the Hadamard method is not part of a spec's identity: the methods compute the
    same rotation)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from qjax.nn import quantize_model

    class TwoLayers(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="out")(nn.Dense(32, name="hidden")(x))

    qm = quantize_model(TwoLayers(), {"hidden": Method("quest", 4, 4, hadamard_block=16),
                                      "out": "lsq"})
    like = QC.convert(qm.init(jax.random.key(0), jnp.ones((2, 16)))["params"], qm)
    data = os.path.join(os.path.dirname(__file__), "data", "serving_v1_names")
    restored = QC.restore(data, like)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(like), strict=True):
        np.testing.assert_array_equal(a, b)  # the same init key: the same codes and scales
    other = quantize_model(TwoLayers(), {"hidden": Method("quest", 4, 4, hadamard_block=8),
                                         "out": "lsq"})
    with pytest.raises(ValueError, match="specs differ"):
        QC.restore(data, QC.convert(other.init(jax.random.key(0), jnp.ones((2, 16)))["params"],
                                    other))


def test_a_checkpoint_of_another_hadamard_method_restores(tmp_path):
    # Written while "matmul" was the default: the rotation method differs, the transform is the
    # same, so the checkpoint loads into today's ("kronecker") model; any other change is refused.
    import json

    _, sp, fwd = setup(W4A4)
    path = str(tmp_path / "ckpt")
    QC.save(path, sp)
    manifest = os.path.join(path, "manifest.json")
    with open(manifest) as f:
        text = f.read()
    assert "hadamard_method='kronecker'" in text
    with open(manifest, "w") as f:
        f.write(text.replace("hadamard_method='kronecker'", "hadamard_method='matmul'"))
    np.testing.assert_array_equal(fwd(QC.restore(path, sp), IDS), fwd(sp, IDS))
    with open(manifest, "w") as f:
        f.write(text.replace("hadamard_block=64", "hadamard_block=32"))
    json.loads(open(manifest).read())  # still a valid manifest, only the block differs
    with pytest.raises(ValueError, match="specs differ"):
        QC.restore(path, sp)
