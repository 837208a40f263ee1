"""Does llama.cpp run qjax's GGUF export of the reference Llama, and compute the same logits?

Exports the reference Llama (random weights, std 0.1 so that logits vary) with
:func:`qjax.convert.export_gguf`: all F32 (the float model), and Q8_0 / Q4_0 block weights
(trained with ``presets.gguf_q8_0`` / ``gguf_q4_0``), runs each file in llama.cpp
(``llama-cpp-python``, in the Python given by ``--llama-python``; it is not a qjax dependency),
and compares llama.cpp's logits for a byte sequence with qjax's serving forward on the same params.

llama.cpp multiplies Q8_0/Q4_0 weights by activations it quantizes to Q8_0 blocks itself. The
"weight-only" rows serve float activations in qjax, so they differ by that quantization; the
"Q8_0 activations" rows quantize the activations in qjax too (``presets.gguf_q8_0(axis=-1)``), as
a model trained for llama.cpp would. The F32 row checks names, layouts, norms, RoPE permutation and
hyper-parameters up to float rounding (KV cache in float32).

Run: ``python -m benchmarks.gguf_llamacpp --llama-python /path/to/python``; writes
``benchmarks/results/gguf_llamacpp.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import machine, write_results
from qjax import convert as QC
from qjax import presets
from qjax.models.llama import Llama, LlamaConfig
from qjax.nn import LayerQuant, quantize_model

# Run first in the llama.cpp subprocess (argument: "1" keeps llama.cpp's extra buffer types). With
# llama-cpp-python 0.3.36 on an AVX512/AMX CPU, the AMX buffer that repacks Q8_0/Q4_0 weights
# segfaults in the first forward (for llama.cpp's own quantization too); Llama() has no argument
# for llama_model_params.use_extra_bufts, so its default params are patched to turn it off.
EXTRA_BUFTS = """
import llama_cpp.llama
def _no_extra_bufts(extra):
    if extra == "1":
        return
    low = llama_cpp.llama.llama_cpp
    default = low.llama_model_default_params
    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    low.llama_model_default_params = params
"""

_RUN = EXTRA_BUFTS + """
import json, sys
import numpy as np
from llama_cpp import Llama
path, tokens, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
_no_extra_bufts(sys.argv[4])
# type_k/type_v 0 = GGML_TYPE_F32: keep the KV cache in float32 (llama.cpp's default is F16).
m = Llama(model_path=path, n_ctx=len(tokens), logits_all=True, verbose=False, n_threads=1,
          n_batch=len(tokens), type_k=0, type_v=0)
m.eval(tokens)
np.save(out, np.asarray(m.scores[: len(tokens)], np.float32))
"""

_Q8 = presets.gguf_q8_0(axis=0)
_Q4 = presets.gguf_q4_0(axis=0)
_A8 = presets.gguf_q8_0(axis=-1)  # llama.cpp's Q8_0 activation blocks (its vec_dot_type)
CASES = {
    "F32": None,
    "Q8_0 weight-only": LayerQuant(weight=_Q8),
    "Q4_0 weight-only": LayerQuant(weight=_Q4),
    "Q8_0, Q8_0 activations": LayerQuant(weight=_Q8, activation=_A8),
    "Q4_0, Q8_0 activations": LayerQuant(weight=_Q4, activation=_A8),
}


def _version(python: str) -> str:
    out = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def main(llama_python: str, extra_bufts: bool = False) -> None:
    cfg = LlamaConfig(d_model=128, n_layers=2, n_heads=4, max_seq_len=64)
    text = b"def hello(name):\n    return f'hello {name}'\n"
    tokens = list(text)[: cfg.max_seq_len]
    ids = jnp.asarray([tokens], jnp.int32)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, spec in CASES.items():
            rules = {} if spec is None else {r"blocks_\d+/.*": spec}
            qm = quantize_model(Llama(cfg), rules)
            params = qm.init(jax.random.key(0), ids)["params"]
            params = jax.tree_util.tree_map(lambda a: a * 5.0 if a.ndim == 2 else a, params)
            sp = QC.convert(params, qm)
            ours = np.asarray(jax.jit(lambda p, i, qm=qm: QC.serve(qm, p, i))(sp, ids))[0]
            path = os.path.join(d, "model.gguf")
            QC.export_gguf(sp, path, cfg, overwrite=True)
            out = os.path.join(d, "logits.npy")
            subprocess.run([llama_python, "-c", _RUN, path, json.dumps(tokens), out,
                            str(int(extra_bufts))], check=True)
            theirs = np.load(out)
            diff = np.abs(theirs - ours)
            rows.append({
                "weights": name, "file_bytes": os.path.getsize(path),
                "max_abs_logit": float(np.abs(ours).max()),
                "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                "argmax_agreement": float(np.mean(theirs.argmax(-1) == ours.argmax(-1))),
            })
    lines = ["# llama.cpp runs qjax's GGUF export", "",
             f"Reference Llama d_model={cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
             f"{len(tokens)} byte tokens; llama.cpp logits against qjax's serving forward.", "",
             "| weights | file bytes | max \\|logit\\| | max abs diff | mean abs diff "
             "| argmax agreement |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['weights']} | {r['file_bytes']:,} | {r['max_abs_logit']:.3f} "
                     f"| {r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} "
                     f"| {r['argmax_agreement']:.3f} |")
    lines += ["", "llama.cpp quantizes the activations of Q8_0/Q4_0 matmuls to Q8_0 blocks; "
              "qjax's weight-only rows do not, the 'Q8_0 activations' rows do, with the rounding "
              "of llama.cpp's reference `quantize_row_q8_0_ref`. With llama.cpp's plain CPU "
              "kernels (use_extra_bufts=False) those rows agree to float rounding; its "
              "repacked kernels (extra buffer types, e.g. on an earlier AVX2 machine) need not "
              "round exactly so and sum blocks in another order, so rare activation codes "
              "differ and move the logits of later tokens (up to 3.7e-2 there).",
              "", f"llama-cpp-python {_version(llama_python)}, use_extra_bufts={extra_bufts}. "
              f"Machine: {machine()}"]
    print("\n".join(lines))
    write_results("gguf_llamacpp", {"rows": rows, "tokens": len(tokens), "machine": machine()},
                  "\n".join(lines) + "\n")


def parse_args(description: str) -> argparse.Namespace:
    """``--llama-python PY`` and ``--extra-bufts`` (the llama.cpp benchmarks' command line)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--llama-python", required=True,
                        help="a Python interpreter with llama-cpp-python installed")
    parser.add_argument("--extra-bufts", action="store_true",
                        help="let llama.cpp repack weights into its CPU extra buffer types "
                             "(crashes on AMX CPUs with llama-cpp-python 0.3.36)")
    return parser.parse_args()


if __name__ == "__main__":
    args = parse_args(__doc__)
    main(args.llama_python, args.extra_bufts)
