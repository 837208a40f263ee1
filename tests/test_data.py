"""Tests for qjax.data: corpus loading, file-level split, resumable batching, entropy baseline."""

from __future__ import annotations

import hashlib
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from qjax._src.data import (
    SEPARATOR,
    VOCAB_SIZE,
    CorpusConfig,
    get_batch,
    load_corpus,
    num_val_batches,
    train_batches,
    unigram_entropy,
    val_batches,
)

MAX_BYTES = 2 * 2**20
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(CorpusConfig(max_bytes=MAX_BYTES))


def _windows_are_consecutive(rows: np.ndarray, n: int, seq_len: int) -> np.ndarray:
    """For tokens = arange(n): every row must be s, s+1, ...; returns the starts s."""
    starts = rows[:, 0]
    np.testing.assert_array_equal(rows, starts[:, None] + np.arange(rows.shape[1]))
    assert starts.min() >= 0 and starts.max() <= n - seq_len - 1
    return starts


# ----------------------------------------------------------------------------- corpus


def test_stdlib_corpus_deterministic(corpus):
    again = load_corpus(CorpusConfig(max_bytes=MAX_BYTES))
    assert again.info == corpus.info
    assert again.info.sha256 == corpus.info.sha256 and len(corpus.info.sha256) == 16
    np.testing.assert_array_equal(again.train, corpus.train)
    np.testing.assert_array_equal(again.val, corpus.val)
    assert corpus.train.dtype == np.uint8 and corpus.val.dtype == np.uint8
    assert corpus.train.ndim == corpus.val.ndim == 1
    assert VOCAB_SIZE == 256


def test_stdlib_corpus_contents_and_cap(corpus):
    info = corpus.info
    files = info.train_files + info.val_files
    assert info.source.startswith("stdlib")
    assert info.num_files == len(files) >= 20
    assert sum(Path(f).stat().st_size for f in files) <= MAX_BYTES
    for f in files:
        rel = Path(f).relative_to(STDLIB)
        assert rel.suffix == ".py"
        assert not {"site-packages", "test", "tests", "idlelib", "__pycache__"} & set(rel.parts)
    # A larger cap includes more files; a cap smaller than the first file takes that file's
    # first max_bytes bytes (here 1: too short to split).
    bigger = load_corpus(CorpusConfig(max_bytes=2 * MAX_BYTES)).info
    assert bigger.num_files > info.num_files
    with pytest.raises(ValueError, match="one file of 1 bytes .* too short to split"):
        load_corpus(CorpusConfig(max_bytes=1))


def test_split_is_by_whole_files_and_matches_info(corpus):
    info = corpus.info
    assert not set(info.train_files) & set(info.val_files)
    assert info.num_train_files == len(info.train_files)
    assert info.num_val_files == len(info.val_files) == round(info.num_files * 0.05)
    assert info.train_bytes == corpus.train.size and info.val_bytes == corpus.val.size
    read = {f: Path(f).read_bytes() for f in info.train_files + info.val_files}
    assert corpus.train.tobytes() == SEPARATOR.join(read[f] for f in info.train_files)
    assert corpus.val.tobytes() == SEPARATOR.join(read[f] for f in info.val_files)
    ordered = sorted(read, key=lambda f: Path(f).relative_to(STDLIB).as_posix())
    digest = hashlib.sha256(SEPARATOR.join(read[f] for f in ordered)).hexdigest()[:16]
    assert info.sha256 == digest
    # Validation files are spread over the sorted list, not a contiguous block.
    pos = [ordered.index(f) for f in info.val_files]
    assert pos[0] < len(ordered) // 4 and pos[-1] > 3 * len(ordered) // 4


def test_val_fraction_controls_split(corpus):
    big = load_corpus(CorpusConfig(max_bytes=MAX_BYTES, val_fraction=0.5)).info
    assert big.num_files == corpus.info.num_files
    assert big.num_val_files == round(big.num_files * 0.5)
    assert big.sha256 == corpus.info.sha256  # hash covers the whole corpus, not one split


def test_describe_is_one_line(corpus):
    text = corpus.info.describe()
    assert "\n" not in text and corpus.info.sha256 in text and str(corpus.info.num_files) in text


def test_user_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_bytes(b"bbbb")
    (tmp_path / "a.md").write_bytes(b"aaa\xff")
    (tmp_path / "sub" / "c.py").write_bytes(b"ccc")
    (tmp_path / "z.py").write_bytes(b"zz")
    (tmp_path / "empty.txt").write_bytes(b"")  # skipped
    (tmp_path / "skip.bin").write_bytes(b"no")  # wrong suffix
    (tmp_path / ".hidden" / "h.py").write_bytes(b"no")  # hidden directory
    extra = tmp_path / "extra.dat"  # explicitly named files are taken whatever their suffix
    extra.write_bytes(b"eeeee")
    again = tmp_path / "sub" / ".." / "z.py"  # same file via another spelling: deduplicated
    cfg = CorpusConfig(paths=(str(tmp_path), str(extra), str(again)), val_fraction=0.5)
    c = load_corpus(cfg)
    order = ["a.md", "b.txt", "sub/c.py", "z.py", "extra.dat"]  # sorted walk, then extra; dedup
    names = c.info.train_files + c.info.val_files
    files = [Path(f).relative_to(tmp_path).as_posix() for f in names]
    assert sorted(files, key=order.index) == order
    assert c.info.num_files == 5 and c.info.num_val_files == 2
    assert [Path(f).name for f in c.info.val_files] == ["b.txt", "z.py"]  # indices 1 and 3
    assert c.train.tobytes() == b"aaa\xff\n\nccc\n\neeeee"
    assert c.val.tobytes() == b"bbbb\n\nzz"
    allb = b"\n\n".join([b"aaa\xff", b"bbbb", b"ccc", b"zz", b"eeeee"])
    assert c.info.sha256 == hashlib.sha256(allb).hexdigest()[:16]
    only_py = load_corpus(CorpusConfig(paths=(str(tmp_path),), suffixes=(".py",)))
    assert only_py.info.num_files == 2


def test_bad_corpus_inputs(tmp_path):
    missing = tmp_path / "does_not_exist.txt"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_corpus(CorpusConfig(paths=(str(missing),)))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"123")
    with pytest.raises(ValueError, match=r"empty corpus: no non-empty files ending in "
                                         r"\.py/\.txt/\.md .*corpus_suffixes"):
        load_corpus(CorpusConfig(paths=(str(tmp_path / "d"),)))
    (tmp_path / "one.txt").write_bytes(b"hello")
    with pytest.raises(ValueError, match="one file of 5 bytes .* too short to split"):
        load_corpus(CorpusConfig(paths=(str(tmp_path / "one.txt"),)))
    for bad in (0.0, 0.51, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            CorpusConfig(val_fraction=bad)
    with pytest.raises(ValueError, match="max_bytes"):
        CorpusConfig(max_bytes=0)
    with pytest.raises(TypeError, match="max_bytes"):
        CorpusConfig(max_bytes=1.5)
    with pytest.raises(TypeError, match="paths"):
        CorpusConfig(paths=str(tmp_path))


def test_one_large_text_file_is_split_inside_at_a_line_break(tmp_path):
    lines = [f"line {i:04d}\n".encode() for i in range(100)]  # 10 bytes each
    data = b"".join(lines)
    (tmp_path / "big.txt").write_bytes(data)
    c = load_corpus(CorpusConfig(paths=(str(tmp_path / "big.txt"),), val_fraction=0.1))
    # cut at round(1000 * 0.9) = 900, the first line break at or after it ends line 90
    assert c.train.tobytes() == data[:910] and c.val.tobytes() == data[910:]
    assert (c.info.num_files, c.info.train_bytes, c.info.val_bytes) == (1, 910, 90)
    assert c.info.sha256 == hashlib.sha256(data).hexdigest()[:16]
    # a file larger than max_bytes is its first max_bytes bytes
    capped = load_corpus(CorpusConfig(paths=(str(tmp_path / "big.txt"),), max_bytes=500,
                                      val_fraction=0.1))
    assert capped.train.tobytes() + capped.val.tobytes() == data[:500]
    assert capped.train.tobytes() == data[:460]  # 450 -> the line break ending line 45


def test_check_fits_names_the_short_split(tmp_path):
    from qjax._src.data import check_fits

    (tmp_path / "a.txt").write_bytes(b"x" * 1000)
    (tmp_path / "b.txt").write_bytes(b"y" * 100)
    c = load_corpus(CorpusConfig(paths=(str(tmp_path),), val_fraction=0.5))
    check_fits(c, batch_size=2, seq_len=32)
    with pytest.raises(ValueError, match=r"validation split has 100 bytes, too few for one "
                                         r"batch of batch_size=4 x seq_len=32 \(129 bytes\)"):
        check_fits(c, batch_size=4, seq_len=32)
    with pytest.raises(ValueError, match="training split has 1000 bytes, fewer than seq_len"):
        check_fits(c, batch_size=1, seq_len=1000)


# ----------------------------------------------------------------------------- batching


def test_get_batch_reproducible_and_shifted(corpus):
    x, y = get_batch(corpus.train, 7, 4, 64, seed=3)
    x2, y2 = get_batch(corpus.train, 7, 4, 64, seed=3)
    assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert not np.array_equal(x, get_batch(corpus.train, 8, 4, 64, seed=3)[0])
    assert not np.array_equal(x, get_batch(corpus.train, 7, 4, 64, seed=4)[0])
    data = corpus.train.tobytes()
    for xi, yi in zip(x, y, strict=True):
        assert bytes(np.append(xi, yi[-1]).astype(np.uint8)) in data


def test_get_batch_windows_cover_valid_range():
    n, seq_len = 12, 9  # valid starts: 0, 1, 2
    tokens = np.arange(n, dtype=np.int64)
    seen = set()
    for step in range(30):
        x, y = get_batch(tokens, step, 8, seq_len, seed=0)
        seen |= set(_windows_are_consecutive(x, n, seq_len).tolist())
        np.testing.assert_array_equal(y, x + 1)
    assert seen == {0, 1, 2}
    x, _ = get_batch(tokens[:10], 0, 3, 9, seed=0)  # seq_len + 1 == len: single window
    assert (x[:, 0] == 0).all()


def test_train_batches_resume(corpus):
    it = train_batches(corpus.train, 2, 16, seed=11)
    first = [next(it) for _ in range(5)]
    resumed = train_batches(corpus.train, 2, 16, seed=11, start_step=3)
    for k in (3, 4):
        xr, yr = next(resumed)
        np.testing.assert_array_equal(xr, first[k][0])
        np.testing.assert_array_equal(yr, first[k][1])
        np.testing.assert_array_equal(xr, get_batch(corpus.train, k, 2, 16, seed=11)[0])


def test_val_batches_contiguous_and_counted():
    n, bs, seq_len = 1000, 3, 16
    tokens = np.arange(n, dtype=np.int32)
    batches = list(val_batches(tokens, bs, seq_len))
    windows = (n - 1) // seq_len  # 62 windows -> 20 full batches, 2 windows dropped
    assert len(batches) == windows // bs == num_val_batches(n, bs, seq_len) == 20
    xs = np.concatenate([x for x, _ in batches])
    ys = np.concatenate([y for _, y in batches])
    assert xs.dtype == np.int32 and xs.shape == (20 * bs, seq_len)
    np.testing.assert_array_equal(xs.reshape(-1), np.arange(xs.size))  # in order, no overlap
    np.testing.assert_array_equal(ys.reshape(-1), np.arange(1, xs.size + 1))
    assert len(list(val_batches(tokens, bs, seq_len, max_batches=4))) == 4
    assert num_val_batches(n, bs, seq_len, max_batches=100) == 20
    again = list(val_batches(tokens, bs, seq_len))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    with pytest.raises(ValueError, match="too short"):
        val_batches(tokens[:40], bs, seq_len)  # 2 windows < batch_size


def test_val_batches_real_corpus(corpus):
    n = num_val_batches(corpus.val.size, 4, 128, max_batches=5)
    assert n == 5
    x, y = next(val_batches(corpus.val, 4, 128, max_batches=5))
    np.testing.assert_array_equal(x[0], corpus.val[:128])
    np.testing.assert_array_equal(y[0], corpus.val[1:129])
    np.testing.assert_array_equal(x[1], corpus.val[128:256])


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": -2}, ValueError, "batch_size"),
        ({"batch_size": 2.0}, TypeError, "batch_size"),
        ({"batch_size": True}, TypeError, "batch_size"),
        ({"seq_len": 0}, ValueError, "seq_len"),
        ({"seq_len": "8"}, TypeError, "seq_len"),
        ({"seq_len": 100}, ValueError, "seq_len"),  # seq_len + 1 > corpus length
        ({"step": -1}, ValueError, "step"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_batch_args(kwargs, exc, name):
    tokens = np.arange(100, dtype=np.uint8)
    args = {"step": 0, "batch_size": 2, "seq_len": 8, "seed": 0} | kwargs
    with pytest.raises(exc, match=name):
        get_batch(tokens, **args)
    if "step" not in kwargs and "seed" not in kwargs:
        bs, sl = args["batch_size"], args["seq_len"]
        with pytest.raises(exc, match=name):
            val_batches(tokens, bs, sl)
        with pytest.raises(exc, match=name):
            train_batches(tokens, bs, sl, seed=0)
    with pytest.raises(TypeError, match="1-D"):
        get_batch(tokens.reshape(10, 10), 0, 2, 8, 0)


# ----------------------------------------------------------------------------- entropy


def test_unigram_entropy():
    assert unigram_entropy(np.arange(256, dtype=np.uint8)) == pytest.approx(math.log(256))
    assert unigram_entropy(np.tile(np.arange(256), 7)) == pytest.approx(math.log(256))
    assert unigram_entropy(np.full(1000, 65, dtype=np.uint8)) == 0.0
    assert unigram_entropy([0, 1, 0, 1]) == pytest.approx(math.log(2))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert unigram_entropy([0, 0, 0, 1]) == pytest.approx(h)
    with pytest.raises(ValueError):
        unigram_entropy([0, 256])
    with pytest.raises(ValueError):
        unigram_entropy(np.array([], dtype=np.uint8))


def test_unigram_entropy_real_text(corpus):
    h = unigram_entropy(corpus.train)
    assert 2.0 < h < math.log(128)  # source code: far from uniform, mostly ASCII
