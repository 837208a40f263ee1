"""Quantized matmul kernels: CPU measurements and a GPU/TPU roofline (estimates, not timings).

Part 1, measured on this machine's CPU (ratios to the float32 matmul ``x @ W.T``, interleaved
medians after warm-up; see ``_timing.py``):

* ``int8 dot``: ``lax.dot_general`` on int8 codes with int32 accumulation (the XLA W8A8 core),
  with a single row padded to two; ``int8 dot, M=1 unpadded`` shows why the pad exists.
* ``W8A8 xla``: ``quantized_matmul(backend="xla")`` end to end (per-token activation
  quantization, int8 dot, scale epilogue).
* ``W4A16 xla``: unpack + dequantize + float32 matmul (group 128).

Part 2, interpret-mode timings of each Pallas kernel on a small shape: **correctness only** (the
interpreter runs the kernel body block by block; its speed says nothing about a device).

Part 3, roofline per case for K = N = 4096: bytes moved, FLOPs and the ideal speedup over bf16,
``max(FLOPs/peak, bytes/bandwidth)`` with vendor peak figures, next to published measurements.
These are **estimates and published figures, not measurements** (there is no GPU or TPU here).

Run: ``python benchmarks/kernels.py [--repeats 15] [--kn 1024,4096] [--batches 1,2,16,128]``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import qjax
from qjax import kernels as K
from qjax.methods import quest

try:
    from benchmarks._timing import interleaved_medians, machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _timing import interleaved_medians, machine, write_results

W8 = qjax.QuantSpec("int8", qjax.PerRow(-1))
A8 = qjax.QuantSpec("int8", qjax.PerRow(-1))
W4G128 = qjax.QuantSpec("int4", qjax.PerGroup(-1, 128))
NT = (((1,), (1,)), ((), ()))

# name -> (weight spec, activation spec)
CASES = {
    "W8A8": (W8, A8),
    "W4A16 g128": (W4G128, None),
    "W4A4 QuEST": (quest.spec(4, hadamard_mode=None), quest.spec(4, hadamard_mode=None)),
    "fp8 e4m3": (qjax.QuantSpec("e4m3", qjax.PerRow(-1)), qjax.QuantSpec("e4m3", qjax.PerRow(-1))),
    "W1 sign (weight-only)": (quest.spec(1, hadamard_mode=None), None),
}

ROOF_CASES = list(CASES) + ["W4A4 QuEST, int4 units"]

# Vendor peak dense throughput (TFLOP/s or TOP/s) and memory bandwidth (TB/s), spec sheets.
DEVICES = {
    "H100 SXM": {"bf16": 989.0, "int8": 1979.0, "fp8": 1979.0, "int4": None, "bw": 3.35},
    # GeForce Ada: bf16 and fp8 at half rate with float32 accumulation (the rates used here).
    "RTX 4090": {"bf16": 165.2, "int8": 660.6, "fp8": 330.3, "int4": 1321.2, "bw": 1.008},
    "A10": {"bf16": 125.0, "int8": 250.0, "fp8": None, "int4": 500.0, "bw": 0.6},
    "TPU v5e": {"bf16": 197.0, "int8": 394.0, "fp8": None, "int4": None, "bw": 0.819},
}
PUBLISHED = {
    "W4A16 g128": "Marlin: ~3.9x over FP16 on A10 up to batch 16-32 (Frantar et al., 2024)",
    "W4A4 QuEST": "QuEST int4 kernels: 2-3.9x per layer over BF16 on RTX 4090 (Panferov et al.)",
    "fp8 e4m3": "FP8: 1.4-1.8x over BF16 on H100 (published end-to-end/GEMM figures)",
}


def roofline_case(name: str, m: int, k: int, n: int, group: int = 128, scale_bytes: int = 2):
    """Bytes, FLOPs and the compute dtype of one case (weights + activations in + out)."""
    flops = 2.0 * m * n * k
    out = 2.0 * m * n
    if name == "bf16":
        return 2.0 * m * k + 2.0 * n * k + out, flops, "bf16"
    if name == "W8A8":
        return 2.0 * m * k + n * k + 4.0 * n + out, flops, "int8"
    if name == "W4A16 g128":
        return 2.0 * m * k + 0.5 * n * k + scale_bytes * n * k / group + out, flops, "bf16"
    if name.startswith("W4A4 QuEST"):
        # qjax's kernel multiplies odd int8 codes (int8 units); the authors' uses int4 units.
        unit = "int4" if name.endswith("int4 units") else "int8"
        return 2.0 * m * k + 0.5 * n * k + 4.0 * n + out, flops, unit
    if name == "fp8 e4m3":
        return 2.0 * m * k + n * k + 4.0 * n + out, flops, "fp8"
    if name == "W1 sign (weight-only)":
        return 2.0 * m * k + n * k / 8 + 4.0 * n + out, flops, "bf16"
    raise ValueError(name)


def roofline(kn: int = 4096, batches=(1, 16, 4096)) -> list[dict]:
    rows = []
    for dev, peak in DEVICES.items():
        for m in batches:
            b0, f0, _ = roofline_case("bf16", m, kn, kn)
            t0 = max(f0 / (peak["bf16"] * 1e12), b0 / (peak["bw"] * 1e12))
            for name in ROOF_CASES:
                b, f, dt = roofline_case(name, m, kn, kn)
                if peak.get(dt) is None:
                    continue  # no such matrix-unit path on this device
                t = max(f / (peak[dt] * 1e12), b / (peak["bw"] * 1e12))
                rows.append({"device": dev, "M": m, "K=N": kn, "case": name, "bytes": b,
                             "flops": f, "compute": dt, "ideal_speedup_vs_bf16": t0 / t,
                             "bound": "memory" if b / (peak["bw"] * 1e12) >= f / (
                                 peak[dt] * 1e12) else "compute"})
    return rows


# Same (N, K) layout and contraction as the int8 dot, so neither side pays a transpose.
F32 = jax.jit(lambda x, w: jax.lax.dot_general(x, w, NT))
DOT8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, NT, preferred_element_type=jnp.int32))
W8A8_XLA = jax.jit(lambda x, w: K.quantized_matmul(x, w, act_spec=A8, backend="xla"))
W4A16_XLA = jax.jit(lambda x, w: K.quantized_matmul(x, w, backend="xla"))


def cpu_ratios(kns, batches, repeats: int) -> list[dict]:
    rows = []
    for kn in kns:
        kx, kw = jax.random.split(jax.random.key(0))
        wf = jax.random.normal(kw, (kn, kn), jnp.float32)
        w8 = qjax.quantize(wf, W8)
        w4 = qjax.quantize(wf, W4G128)
        wd = qjax.dequantize(w8)
        wc = w8.codes
        for m in batches:
            x = jax.random.normal(kx, (m, kn), jnp.float32)
            xc = jnp.clip(jnp.round(x * 20), -127, 127).astype(jnp.int8)
            xc2 = jnp.pad(xc, ((0, 1), (0, 0))) if m == 1 else xc
            calls = {
                "float32 matmul": (F32, x, wd),
                "int8 dot": (DOT8, xc2, wc),
                "W8A8 xla": (W8A8_XLA, x, w8),
                "W4A16 xla": (W4A16_XLA, x, w4),
            }
            if m == 1:
                calls["int8 dot, M=1 unpadded"] = (DOT8, xc, wc)
            fns = {name: (lambda f=f, a=a, b=b: f(a, b)) for name, (f, a, b) in calls.items()}
            med = interleaved_medians(fns, repeats=repeats)
            base = med["float32 matmul"]
            for name, t in med.items():
                rows.append({"K=N": kn, "M": m, "case": name, "median_s": t,
                             "ratio_to_float32": t / base})
    return rows


def interpret_timings() -> list[dict]:
    rows = []
    m, n, k = 8, 256, 1024
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (m, k), jnp.float32)
    wf = jax.random.normal(kw, (n, k), jnp.float32)
    for name, (ws, a) in CASES.items():
        w = qjax.quantize(wf, ws)
        f = jax.jit(lambda x, w, a=a: K.quantized_matmul(x, w, act_spec=a, backend="interpret"))
        ref = K.quantized_matmul(x, w, act_spec=a, backend="xla")
        jax.block_until_ready(f(x, w))
        t0 = time.perf_counter()
        y = jax.block_until_ready(f(x, w))
        dt = time.perf_counter() - t0
        err = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
        rows.append({"case": name, "shape": f"{m}x{n}x{k}", "seconds": dt,
                     "max_rel_diff_vs_xla": err, "note": "correctness only"})
    return rows


def markdown(cpu, interp, roof) -> str:
    lines = ["# Quantized matmul kernels", "",
             "## CPU (measured): time / float32 matmul time (lower is faster)", "",
             "| K=N | M | case | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['K=N']} | {r['M']} | {r['case']} | {r['ratio_to_float32']:.2f} |"
              for r in cpu]
    lines += ["", "## Pallas interpret mode on CPU: correctness only, not a speed measure", "",
              "| case | shape MxNxK | seconds | max rel. diff vs xla |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['shape']} | {r['seconds']:.3f} | "
              f"{r['max_rel_diff_vs_xla']:.1e} |" for r in interp]
    lines += ["", "## GPU / TPU roofline: ESTIMATES from vendor peak figures, not measurements",
              "", "Ideal speedup over bf16 = roofline time of bf16 / of the case, "
              "`max(FLOPs/peak, bytes/bandwidth)`. W4A16 assumes 2-byte group-128 scales (weight "
              "bytes alone: 2 / (0.5 + 2/128) = 3.88x; qjax's float32 scales give 3.76x). CPU "
              "ratios are from a shared, busy 2-core machine: read them as rough.", "",
              "| device | M | case | MB moved | GFLOP | compute | bound | ideal speedup |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['device']} | {r['M']} | {r['case']} | {r['bytes'] / 1e6:.1f} | "
              f"{r['flops'] / 1e9:.2f} | {r['compute']} | {r['bound']} | "
              f"{r['ideal_speedup_vs_bf16']:.2f}x |" for r in roof]
    lines += ["", "Published figures (not measured here):", ""]
    lines += [f"- {name}: {text}" for name, text in PUBLISHED.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--kn", default="1024,4096")
    parser.add_argument("--batches", default="1,2,16,128")
    args = parser.parse_args()
    kns = [int(v) for v in args.kn.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    cpu = cpu_ratios(kns, batches, args.repeats)
    interp = interpret_timings()
    roof = roofline()
    payload = {"machine": machine(), "cpu": cpu, "interpret_correctness_only": interp,
               "roofline_estimates": roof, "published": PUBLISHED}
    paths = write_results("kernels", payload, markdown(cpu, interp, roof))
    print(markdown(cpu, interp, roof))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
