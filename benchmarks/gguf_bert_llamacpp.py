"""Does llama.cpp run qjax's GGUF export of all-MiniLM-L6-v2, and embed sentences as qjax does?

Exports all-MiniLM-L6-v2 (:func:`qjax.models.minilm.load_minilm`) with
:func:`qjax.convert.export_gguf_bert`: the float model (all F32), and Q8_0 / Q4_0 block weights
(``presets.gguf_q8_0`` / ``gguf_q4_0`` on every block linear, post-training: quantize_model then
convert, no training), runs each file in llama.cpp (``llama-cpp-python``, in the Python given by
``--llama-python``; it is not a qjax dependency) as an embedding model (``Llama(path,
embedding=True)``, mean pooling from the file, L2-normalized), and compares with qjax's serving
embeddings of the same model:

* **tokenization**: llama.cpp's ids against ``tokenizers``' for each sentence;
* **same ids**: qjax run on llama.cpp's ids (the models compared, whatever the tokenizers do):
  max |diff| of the unit embeddings and min cosine over the sentences;
* **end to end**: qjax on its own tokenization (what a user of each gets): min cosine.

llama.cpp multiplies Q8_0/Q4_0 weights by activations it quantizes to Q8_0 blocks itself; the
"weight-only" rows serve float activations in qjax, the "Q8_0 activations" rows quantize them in
qjax too (``presets.gguf_q8_0(axis=-1)``). llama.cpp's GELU is the tanh approximation read from
an fp16 table, BERT's (and qjax's) the exact erf one: the F32 row measures that plus float
rounding. "cos to float" is qjax's quantized model against qjax's float model (the quantization
error itself, for scale).

llama.cpp loads the files with ``use_extra_bufts=False`` (its plain CPU kernels) unless
``--extra-bufts``: with llama-cpp-python 0.3.36 on an AVX512/AMX machine, the AMX buffer that
repacks Q8_0/Q4_0 weights segfaults in the first forward, for llama.cpp's own Q8_0 quantization
of the F32 file as much as for qjax's.

Run: ``python -m benchmarks.gguf_bert_llamacpp --llama-python /path/to/python``; writes
``benchmarks/results/gguf_bert_llamacpp.{json,md}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import jax
import numpy as np
from flax import nnx

from benchmarks._timing import machine, write_results
from benchmarks.gguf_llamacpp import CASES, EXTRA_BUFTS, parse_args  # cases, patch, CLI
from qjax import convert as QC
from qjax.models import bert as B
from qjax.models import minilm as ML
from qjax.nn import quantize_model

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Quantization-aware training keeps 4-bit models close to their float32 teachers.",
    "llama.cpp runs GGUF files on CPUs, GPUs and phones!",
    "What's the capital of France? It's Paris (pop. ~2.1M).",
    "Email me at someone@example.com or visit https://example.org/path?q=1.",
    "Café crème brûlée in Zürich costs 12.50 €.",
    "東京は日本の首都です。",
    "ΟΔΥΣΣΕΥΣ sailed home; İstanbul and Straße.",
    "Emoji 🙂, ligature ﬁne, x² and ½ cup.",
    "tab\there\nnewline  double  space, control\u0007char and \u200bzero width",
    # A word of 120 characters: tokenizers' WordPiece makes any word longer than
    # max_input_chars_per_word (100) one [UNK]; llama.cpp has no such limit.
    "hash " + "ab" * 60 + " end",
    "The quick brown fox jumps over the lazy dog.",
]

_RUN = EXTRA_BUFTS + """
import json, sys
import numpy as np
from llama_cpp import Llama
path, sentences, out = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
_no_extra_bufts(sys.argv[4])
m = Llama(model_path=path, embedding=True, verbose=False, n_threads=1, n_ctx=512, n_batch=512,
          n_ubatch=512, flash_attn=False)
ids = [m.tokenize(s.encode("utf-8"), add_bos=True, special=False) for s in sentences]
emb = [m.embed(s, normalize=True) for s in sentences]
np.save(out, np.asarray(emb, np.float32))
json.dump(ids, open(out + ".ids.json", "w"))
"""



@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def _embed_ids(model, id_lists: list[list[int]]) -> np.ndarray:
    """qjax's unit embeddings of given token ids (right-padded to a multiple of 16, masked)."""
    length = -(-max(map(len, id_lists)) // 16) * 16
    ids = np.zeros((len(id_lists), length), np.int32)
    mask = np.zeros_like(ids)
    for i, row in enumerate(id_lists):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return np.asarray(_forward(model, ids, mask))


def _version(python: str) -> str:
    out = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def main(llama_python: str, extra_bufts: bool = False) -> None:
    model, tok = ML.load_minilm()
    ours_ids = [e.ids for e in tok.encode_batch(SENTENCES)]
    rows, mismatches = [], {}
    float_emb = None
    with tempfile.TemporaryDirectory() as d:
        sentences = os.path.join(d, "sentences.json")
        with open(sentences, "w") as f:
            json.dump(SENTENCES, f)
        for name, lq in CASES.items():
            served = model if lq is None else QC.convert(
                quantize_model(nnx.clone(model), B.quantization_rules(lq)))
            path = os.path.join(d, "model.gguf")
            QC.export_gguf_bert(served, path, tok, name="all-MiniLM-L6-v2", overwrite=True)
            out = os.path.join(d, "emb.npy")
            subprocess.run([llama_python, "-c", _RUN, path, sentences, out,
                            str(int(extra_bufts))], check=True)
            theirs = np.load(out)
            with open(out + ".ids.json") as f:
                their_ids = json.load(f)
            same = _embed_ids(served, their_ids)
            e2e = _embed_ids(served, ours_ids)
            if float_emb is None:
                float_emb = e2e
            agree = np.array([a == b for a, b in zip(their_ids, ours_ids, strict=True)])
            cos_e2e = np.sum(theirs * e2e, -1)
            for i in np.flatnonzero(~agree):
                entry = mismatches.setdefault(SENTENCES[i], {
                    "tokens_llama.cpp": len(their_ids[i]), "tokens_tokenizers": len(ours_ids[i]),
                    "cos_end_to_end": {}})
                entry["cos_end_to_end"][name] = float(cos_e2e[i])
            rows.append({
                "weights": name, "file_bytes": os.path.getsize(path),
                "tokenization_agreement": f"{sum(agree)}/{len(agree)}",
                "max_abs_diff_same_ids": float(np.abs(theirs - same).max()),
                "min_cos_same_ids": float(np.sum(theirs * same, -1).min()),
                "mean_cos_same_ids": float(np.sum(theirs * same, -1).mean()),
                "min_cos_end_to_end": float(cos_e2e.min()),
                "min_cos_end_to_end_same_tokens": float(cos_e2e[agree].min()),
                "min_cos_to_float_qjax": float(np.sum(e2e * float_emb, -1).min()),
            })
            print(rows[-1], flush=True)
    lines = ["# llama.cpp runs qjax's GGUF export of all-MiniLM-L6-v2", "",
             f"{len(SENTENCES)} sentences; llama.cpp's mean-pooled, L2-normalized embeddings "
             "against qjax's serving embeddings of the same weights (module docstring of "
             "benchmarks/gguf_bert_llamacpp.py).", "",
             "| weights | file bytes | same tokens | max abs diff (same ids) | min cos (same ids) "
             "| mean cos (same ids) | min cos end to end (same tokens / all) "
             "| qjax: min cos to float |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['weights']} | {r['file_bytes']:,} | {r['tokenization_agreement']} "
                     f"| {r['max_abs_diff_same_ids']:.2e} | {r['min_cos_same_ids']:.7f} "
                     f"| {r['mean_cos_same_ids']:.7f} "
                     f"| {r['min_cos_end_to_end_same_tokens']:.7f} / "
                     f"{r['min_cos_end_to_end']:.5f} | {r['min_cos_to_float_qjax']:.5f} |")
    lines += ["", "Sentences tokenized differently (tokens llama.cpp / tokenizers; end-to-end "
              "cosine per file):"]
    lines += [f"- `{s[:40]}...`: {n['tokens_llama.cpp']} / {n['tokens_tokenizers']} tokens; "
              + ", ".join(f"{k} {v:.3f}" for k, v in n["cos_end_to_end"].items())
              for s, n in mismatches.items()] or ["- none"]
    lines += ["", "llama.cpp's WPM tokenizer has no `max_input_chars_per_word`: `tokenizers` "
              "makes a word longer than 100 characters one `[UNK]`, llama.cpp splits it into "
              "pieces. The 'same ids' columns run qjax on llama.cpp's ids, so they compare the "
              "models alone. llama.cpp computes GELU with the tanh approximation from an fp16 "
              "table (BERT: exact erf) and quantizes the activations of Q8_0/Q4_0 matmuls to "
              "Q8_0 blocks; the 'Q8_0 activations' rows do that in qjax too.",
              "", f"llama-cpp-python {_version(llama_python)}, use_extra_bufts={extra_bufts}. "
              f"Machine: {machine()}"]
    print("\n".join(lines))
    write_results("gguf_bert_llamacpp", {"rows": rows, "sentences": SENTENCES,
                                         "use_extra_bufts": extra_bufts,
                                         "tokenization_mismatches": mismatches,
                                         "machine": machine()}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    args = parse_args(__doc__)
    jax.config.update("jax_default_matmul_precision", "highest")
    main(args.llama_python, args.extra_bufts)
