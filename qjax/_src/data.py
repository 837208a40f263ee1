"""Implementation of :mod:`qjax.data` (documented there)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from qjax._src._checks import check_pos_int

VOCAB_SIZE = 256
SEPARATOR = b"\n\n"  # joins consecutive files in every concatenation
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib"})


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Corpus settings. ``paths=()`` selects the stdlib ``.py`` corpus; otherwise files are taken
    as given and directories are walked recursively for files ending in one of ``suffixes``."""

    paths: tuple[str, ...] = ()
    max_bytes: int = 64 * 2**20
    val_fraction: float = 0.05
    suffixes: tuple[str, ...] = (".py", ".txt", ".md")

    def __post_init__(self) -> None:
        if isinstance(self.paths, str | os.PathLike):
            raise TypeError("paths must be a sequence of paths, not a single path")
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in self.paths))
        object.__setattr__(self, "suffixes", tuple(self.suffixes))
        check_pos_int("max_bytes", self.max_bytes)
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, int | float):
            raise TypeError(f"val_fraction must be a float, got {type(self.val_fraction).__name__}")
        if not 0.0 < self.val_fraction <= 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5], got {self.val_fraction}")
        if not self.suffixes:
            raise ValueError("suffixes must be non-empty")


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
    """Summary of a loaded corpus. Byte counts include separators."""

    source: str
    num_files: int
    num_train_files: int
    num_val_files: int
    train_bytes: int
    val_bytes: int
    sha256: str  # first 16 hex chars of SHA-256(SEPARATOR.join(all files))
    train_files: tuple[str, ...] = dataclasses.field(repr=False, default=())
    val_files: tuple[str, ...] = dataclasses.field(repr=False, default=())

    def describe(self) -> str:
        """One-line human-readable summary."""
        return (f"corpus={self.source} files={self.num_files} (train {self.num_train_files} / val "
                f"{self.num_val_files}) bytes train={self.train_bytes:,} val={self.val_bytes:,} "
                f"sha256={self.sha256}")


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """``train``/``val``: read-only 1-D ``uint8`` arrays of byte tokens; ``info``: summary."""

    train: np.ndarray
    val: np.ndarray
    info: CorpusInfo


def _check_tokens(tokens: np.ndarray, min_len: int = 1) -> None:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
        raise TypeError("tokens must be a 1-D numpy array")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must have an integer dtype, got {tokens.dtype}")
    if tokens.shape[0] < min_len:
        raise ValueError(f"tokens has length {tokens.shape[0]}, need at least {min_len} "
                         f"(seq_len + 1 must not exceed the corpus length)")


def _walk(root: Path, suffixes: tuple[str, ...], skip: frozenset[str]) -> list[Path]:
    """Files under ``root`` ending in a suffix, sorted by relative POSIX path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and d != "__pycache__"
                       and not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if f.endswith(suffixes)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _list_files(config: CorpusConfig) -> tuple[str, list[Path]]:
    if not config.paths:
        root = Path(sysconfig.get_paths()["stdlib"])
        return f"stdlib(python{sys.version.split()[0]})", _walk(root, (".py",), STDLIB_SKIP_DIRS)
    files: list[Path] = []
    for p in map(Path, config.paths):
        if not p.exists():
            raise FileNotFoundError(f"corpus path does not exist: {str(p)!r}")
        files += _walk(p, config.suffixes, frozenset()) if p.is_dir() else [p]
    unique: dict[Path, Path] = {}  # resolved -> as given; first occurrence wins, order kept
    for f in files:
        unique.setdefault(f.resolve(), f)
    return f"paths({len(config.paths)})", list(unique.values())


def _val_indices(n: int, val_fraction: float) -> set[int]:
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return {((2 * j + 1) * n) // (2 * n_val) for j in range(n_val)}


def load_corpus(config: CorpusConfig | None = None) -> Corpus:
    """Read, cap, concatenate and split the corpus described by ``config`` (see module doc).

    Raises ``FileNotFoundError`` for a missing user path and ``ValueError`` for an empty corpus
    (naming the suffix filter) or a one-file corpus too short to split.
    """
    config = CorpusConfig() if config is None else config
    source, files = _list_files(config)
    names: list[str] = []
    blobs: list[bytes] = []
    total = 0
    for f in files:
        data = f.read_bytes()
        if not data:
            continue
        if total + len(data) > config.max_bytes:
            if not blobs:  # one large file: its first max_bytes bytes, split inside
                names, blobs = [str(f)], [data[:config.max_bytes]]
            break
        total += len(data)
        names.append(str(f))
        blobs.append(data)
    if not blobs:
        kinds = "" if not config.paths else f" ending in {'/'.join(config.suffixes)}"
        raise ValueError(f"empty corpus: no non-empty files{kinds} (source={source}, "
                         f"{len(files)} candidate files; the suffixes are CorpusConfig.suffixes, "
                         f"corpus_suffixes in TrainConfig)")
    if len(blobs) == 1:
        return _split_one_file(source, names[0], blobs[0], config.val_fraction)
    val_idx = _val_indices(len(blobs), config.val_fraction)
    train_ids = [i for i in range(len(blobs)) if i not in val_idx]
    val_ids = sorted(val_idx)
    train_b = SEPARATOR.join(blobs[i] for i in train_ids)
    val_b = SEPARATOR.join(blobs[i] for i in val_ids)
    info = CorpusInfo(
        source=source, num_files=len(blobs), num_train_files=len(train_ids),
        num_val_files=len(val_ids), train_bytes=len(train_b), val_bytes=len(val_b),
        sha256=hashlib.sha256(SEPARATOR.join(blobs)).hexdigest()[:16],
        train_files=tuple(names[i] for i in train_ids), val_files=tuple(names[i] for i in val_ids))
    # np.frombuffer over bytes gives read-only arrays that share memory with the bytes objects.
    return Corpus(np.frombuffer(train_b, np.uint8), np.frombuffer(val_b, np.uint8), info)


def _split_one_file(source: str, name: str, data: bytes, val_fraction: float) -> Corpus:
    """A one-file corpus split inside the file at a line break (see module doc)."""
    cut = round(len(data) * (1.0 - val_fraction))
    line = data.find(b"\n", cut)
    cut = line + 1 if 0 <= line < len(data) - 1 else cut
    if not 0 < cut < len(data):
        raise ValueError(f"corpus is one file of {len(data)} bytes ({name!r}): too short to "
                         f"split into training and validation bytes")
    info = CorpusInfo(
        source=source, num_files=1, num_train_files=1, num_val_files=1, train_bytes=cut,
        val_bytes=len(data) - cut, sha256=hashlib.sha256(data).hexdigest()[:16],
        train_files=(name,), val_files=(name,))
    return Corpus(np.frombuffer(data[:cut], np.uint8), np.frombuffer(data[cut:], np.uint8), info)


def check_fits(corpus: Corpus, batch_size: int, seq_len: int) -> None:
    """Raises ValueError naming the split if training windows (``seq_len + 1`` bytes) or one
    validation batch (``batch_size * seq_len + 1`` bytes) do not fit in it."""
    check_pos_int("batch_size", batch_size)
    check_pos_int("seq_len", seq_len)
    advice = "raise max_corpus_bytes or val_fraction, or lower seq_len or batch_size"
    if corpus.train.shape[0] < seq_len + 1:
        raise ValueError(f"the training split has {corpus.train.shape[0]} bytes, fewer than "
                         f"seq_len + 1 = {seq_len + 1}: {advice}")
    if num_val_batches(corpus.val.shape[0], batch_size, seq_len) == 0:
        raise ValueError(f"the validation split has {corpus.val.shape[0]} bytes, too few for "
                         f"one batch of batch_size={batch_size} x seq_len={seq_len} "
                         f"({batch_size * seq_len + 1} bytes): {advice}")


def get_batch(tokens: np.ndarray, step: int, batch_size: int, seq_len: int,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training batch for ``step``: a pure function of ``(tokens, seed, step)``.

    Each of the ``batch_size`` rows is a window ``tokens[s : s + seq_len + 1]`` with ``s`` drawn
    uniformly from ``[0, len(tokens) - seq_len - 1]`` by ``np.random.default_rng([seed, step])``,
    so a run restarted at step ``k`` sees exactly the same batches (for a fixed numpy version).

    Returns ``(inputs, targets)``, both ``int32`` of shape ``(batch_size, seq_len)``, with
    ``targets[:, :-1] == inputs[:, 1:]`` (targets are the inputs shifted left by one byte).
    """
    check_pos_int("step", step, allow_zero=True)
    check_pos_int("seed", seed, allow_zero=True)
    check_pos_int("batch_size", batch_size)
    check_pos_int("seq_len", seq_len)
    _check_tokens(tokens, seq_len + 1)
    rng = np.random.default_rng([int(seed), int(step)])
    starts = rng.integers(0, tokens.shape[0] - seq_len, size=batch_size)
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def train_batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                  start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless iterator of ``get_batch(tokens, step, ...)`` for ``step = start_step, ...``."""
    check_pos_int("start_step", start_step, allow_zero=True)
    get_batch(tokens, start_step, batch_size, seq_len, seed)  # validate eagerly

    def gen() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        step = start_step
        while True:
            yield get_batch(tokens, step, batch_size, seq_len, seed)
            step += 1

    return gen()


def num_val_batches(num_tokens: int, batch_size: int, seq_len: int,
                    max_batches: int | None = None) -> int:
    """Number of batches :func:`val_batches` yields for a sequence of ``num_tokens`` bytes.

    There are ``(num_tokens - 1) // seq_len`` windows; batches = windows // batch_size (partial
    batch dropped), capped at ``max_batches``. Evaluated tokens = batches * batch_size * seq_len.
    """
    check_pos_int("batch_size", batch_size)
    check_pos_int("seq_len", seq_len)
    if max_batches is not None:
        check_pos_int("max_batches", max_batches)
    n = max(num_tokens - 1, 0) // seq_len // batch_size
    return n if max_batches is None else min(n, max_batches)


def val_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Deterministic evaluation batches over ``tokens`` in order.

    Window ``w`` is ``tokens[w * seq_len : w * seq_len + seq_len + 1]`` (inputs/targets as in
    :func:`get_batch`), so consecutive windows' targets tile ``tokens[1:]`` without overlap and
    every evaluated byte is predicted exactly once. Windows are grouped into ``int32`` batches of
    shape ``(batch_size, seq_len)``; the trailing partial batch is dropped. The number of evaluated
    tokens is ``num_val_batches(len(tokens), batch_size, seq_len, max_batches) * batch_size *
    seq_len``. Raises ``ValueError`` if not even one full batch fits.
    """
    check_pos_int("batch_size", batch_size)
    check_pos_int("seq_len", seq_len)
    _check_tokens(tokens, seq_len + 1)
    n_batches = num_val_batches(tokens.shape[0], batch_size, seq_len, max_batches)
    if n_batches == 0:
        raise ValueError(f"validation tokens ({tokens.shape[0]}) too short for one batch of "
                         f"batch_size={batch_size} x seq_len={seq_len}")

    def gen() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        offsets = np.arange(batch_size)[:, None] * seq_len + np.arange(seq_len + 1)
        for b in range(n_batches):
            windows = tokens[b * batch_size * seq_len + offsets].astype(np.int32)
            yield windows[:, :-1], windows[:, 1:]

    return gen()


def unigram_entropy(tokens: np.ndarray | Sequence[int]) -> float:
    """Empirical unigram entropy of byte ``tokens`` (values in ``[0, 256)``) in nats per byte.

    This is the loss of the best context-free predictor, a baseline for model cross-entropy.
    """
    tokens = np.asarray(tokens)
    _check_tokens(tokens.reshape(-1), 1)
    if tokens.min() < 0 or tokens.max() >= VOCAB_SIZE:
        raise ValueError(f"tokens must be in [0, {VOCAB_SIZE})")
    p = np.bincount(tokens.reshape(-1), minlength=VOCAB_SIZE) / tokens.size
    p = p[p > 0]
    return float(max(0.0, -np.sum(p * np.log(p))))


__all__ = [
    "SEPARATOR", "VOCAB_SIZE", "Corpus", "CorpusConfig", "CorpusInfo", "check_fits", "get_batch",
    "load_corpus", "num_val_batches", "train_batches", "unigram_entropy", "val_batches",
]
