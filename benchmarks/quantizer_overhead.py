"""Cost of fake quantization, forward + backward, relative to the matmul it feeds.

For ``y = x @ W`` with ``x (M, K)`` and ``W (K, N)``, each case times one jitted
``grad(sum(f(x, W)))`` w.r.t. both operands and reports the ratio to the plain float32 matmul's
forward + backward, median over interleaved runs after warm-up:

* ``int8 per-channel``: W fake-quantized to int8 with one absmax scale per output channel.
* ``int4 group 32``: W fake-quantized to int4 with absmax scales per 32 input features.
* ``QuEST W4A4 half Hadamard``: both operands rotated (block 128), RMS-Gaussian scales,
  midrise 4-bit grid, trust estimator.

Run: ``python benchmarks/quantizer_overhead.py [--repeats 30]``. CPU timings are noisy: compare
ratios from one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import qjax
from qjax.methods import quest

try:
    from benchmarks._timing import interleaved_medians, machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _timing import interleaved_medians, machine, write_results

INT8_CHANNEL = qjax.QuantSpec("int8", qjax.PerAxis(-1), "absmax")
INT4_GROUP32 = qjax.QuantSpec("int4", qjax.PerGroup(0, 32), "absmax")


def cases():
    return {
        "float32 matmul": lambda x, w: x @ w,
        "int8 per-channel (W)": lambda x, w: x @ qjax.fake_quant(w, INT8_CHANNEL),
        "int4 group 32 (W)": lambda x, w: x @ qjax.fake_quant(w, INT4_GROUP32),
        "QuEST W4A4 half Hadamard": lambda x, w: quest.dense(x, w, bits_x=4, bits_w=4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--shapes", default="256x1024x1024,2048x512x512",
                        help="comma-separated MxKxN")
    args = parser.parse_args()

    rows = []
    for shape in args.shapes.split(","):
        m, k, n = (int(v) for v in shape.split("x"))
        kx, kw = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (m, k), jnp.float32)
        w = jax.random.normal(kw, (k, n), jnp.float32) / k**0.5
        fns = {}
        for name, f in cases().items():
            step = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w)), argnums=(0, 1)))
            fns[name] = lambda step=step, x=x, w=w: step(x, w)
        med = interleaved_medians(fns, repeats=args.repeats)
        base = med["float32 matmul"]
        for name, t in med.items():
            rows.append({"shape": shape, "case": name, "median_ms": t * 1e3, "ratio": t / base})
            print(f"{shape:>16}  {name:<28} {t * 1e3:8.2f} ms  {t / base:5.2f}x")

    md = ["# Quantizer overhead (forward + backward, ratio to the float32 matmul)", "",
          f"Machine: {machine()['processor']}, {machine()['cpus']} CPUs, JAX {jax.__version__}, "
          f"median of {args.repeats} interleaved runs.", "",
          "| M x K x N | case | median ms | ratio |", "|---|---|---|---|"]
    md += [f"| {r['shape']} | {r['case']} | {r['median_ms']:.2f} | {r['ratio']:.2f}x |"
           for r in rows]
    paths = write_results("quantizer_overhead", {"machine": machine(), "repeats": args.repeats,
                                                 "rows": rows}, "\n".join(md) + "\n")
    print("wrote", *paths)


if __name__ == "__main__":
    main()
