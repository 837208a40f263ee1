"""Byte-level language-model data from a real text corpus (numpy only, nothing cached on disk).

Corpus: by default the ``.py`` sources of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, skipping ``site-packages``/``dist-packages``, ``test``/
``tests``, ``idlelib`` and ``__pycache__``), or user-given files/directories. Files are ordered
deterministically (sorted relative POSIX paths; hidden and ``__pycache__`` directories skipped; a
file named twice is read once), empty files are skipped, and whole files are read in order until
the next one would push the raw file bytes (separators not counted) past ``max_bytes``. Tokens are
bytes (vocab 256).

A single file (or a first file that alone exceeds ``max_bytes``) is taken as its first
``max_bytes`` bytes and split inside: validation is the tail from the first line break at or after
byte ``round(len * (1 - val_fraction))``.

Split: whole files, no seed. With ``n`` files and ``n_val = clamp(round(n * val_fraction), 1,
n - 1)``, file ``i`` is validation iff ``i == ((2 j + 1) n) // (2 n_val)`` for some ``j < n_val``
(evenly spaced through the sorted list, so no single package dominates validation). Train and val
are each their files joined by :data:`SEPARATOR`; ``info.sha256`` hashes all files (original order)
joined by :data:`SEPARATOR`. The stdlib corpus depends on the Python version; the hash pins it.
"""

from qjax._src.data import (
    VOCAB_SIZE,
    Corpus,
    CorpusConfig,
    CorpusInfo,
    get_batch,
    load_corpus,
    train_batches,
    unigram_entropy,
    val_batches,
)

__all__ = [
    "Corpus",
    "CorpusConfig",
    "CorpusInfo",
    "get_batch",
    "load_corpus",
    "train_batches",
    "unigram_entropy",
    "val_batches",
    "VOCAB_SIZE",
]
