"""Where the time of a QuEST W4A4 fake-quant QAT step goes, against the float step.

Runs the training step of ``benchmarks/qat_step.py``'s reference Llama (jitted forward + backward +
AdamW) under ``jax.profiler.trace`` and attributes the time of every compiled op (XLA fusion,
dot) to the source code it came from, read from the compiled HLO's stack frames:

- ``hadamard rotation``: ops from ``qjax/_src/hadamard.py`` (the block Walsh-Hadamard transform,
  forward and its transpose in the backward: its small matmuls and its signed sums),
- ``matmuls``: every other op holding a dot (the model's matmuls, forward and backward),
- ``quantizer arithmetic``: elementwise and reduction ops from ``quantize.py``,
  ``estimators.py``, ``scales.py``, ``formats.py``, ``granularity.py`` (scales, rounding,
  clipping, trust masks and their backward),
- ``quantized-layer glue``: elementwise ops from ``qjax/_src/nn`` and ``qdot.py`` (the layer's
  casts and reshapes),
- ``other``: the rest (norms, attention's softmax, the loss, AdamW, copies),

and sums each part's op time over the steps traced. Op times are summed across the CPU's
threads, so the sum exceeds the wall time; what to read is each part's share and the QuEST-minus-
float difference per part (``python -m benchmarks.qat_step`` measures the wall-time ratio).

Usage: ``python -m benchmarks.qat_step_profile [--quick] [--steps 10]``; writes
``benchmarks/results/qat_step_profile.{json,md}``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

from qjax.models import Llama, LlamaConfig
from qjax.nn import Method

try:
    from benchmarks._timing import report
    from benchmarks.qat_step import jitted_step, qjax_case
except ImportError:  # run as a script from the benchmarks folder
    from _timing import report
    from qat_step import jitted_step, qjax_case

PARTS = ("hadamard rotation", "matmuls", "quantizer arithmetic", "quantized-layer glue", "other")
_QUANTIZER_FILES = ("quantize.py", "estimators.py", "scales.py", "formats.py", "granularity.py")


def _part(files: list[str], dot: bool) -> str:
    """The part of an instruction whose stack (innermost frame first) passes through ``files``;
    ``dot``: the instruction is a dot."""
    for f in files:
        if "/qjax/_src/" not in f or f.endswith("typed_sharding.py"):
            continue  # typed_sharding: reshape helpers every model uses
        name = f.rsplit("/", 1)[-1]
        if name == "hadamard.py":
            return PARTS[0]
        if dot:
            return PARTS[1]
        if name in _QUANTIZER_FILES:
            return PARTS[2]
        if "/qjax/_src/nn/" in f or name == "qdot.py":
            return PARTS[3]
        break
    return PARTS[1] if dot else PARTS[4]


def _tables(text: str, title: str) -> dict[int, list[int]]:
    """A numbered table of the HLO text's trailer (``FileNames``, ``FileLocations``, ...)."""
    m = re.search(rf"^{title}\n((?:\d+ .*\n)+)", text, re.M)
    rows = {}
    for line in (m.group(1).splitlines() if m else []):
        k, rest = line.split(" ", 1)
        rows[int(k)] = rest
    return rows


def op_parts(hlo: str) -> dict[str, str]:
    """Part (see the module docstring) of every top-level op of a compiled module's text."""
    files = {k: v.strip('"') for k, v in _tables(hlo, "FileNames").items()}
    locations = {k: int(re.search(r"file_name_id=(\d+)", v).group(1))
                 for k, v in _tables(hlo, "FileLocations").items()}
    frames = {k: tuple(int(x) for x in re.findall(r"=(\d+)", v))
              for k, v in _tables(hlo, "StackFrames").items()}

    def stack(frame: int) -> list[str]:
        out, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            loc, parent = frames[frame]
            out.append(files.get(locations.get(loc, -1), ""))
            frame = parent
        return out

    def is_dot(line: str) -> bool:
        return re.search(r"\s(dot|convolution)\(", line) is not None

    # Each computation's (frame, is-a-dot) pairs, then every top-level op's part: an op with a
    # dot takes its dots' part; otherwise the part most of its fused instructions have.
    comp: dict[str, list[tuple[int, bool]]] = collections.defaultdict(list)
    current = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if head:
            current = head.group(1)
            continue
        f = re.search(r"stack_frame_id=(\d+)", line)
        if current and f:
            comp[current].append((int(f.group(1)), is_dot(line)))
    parts = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = .*?\b(fusion|dot|custom-call)\(", line)
        if not m:
            continue
        called = re.search(r"calls=%(\S+?)[,\s]", line)
        ids = comp.get(called.group(1), []) if called else []
        own = re.search(r"stack_frame_id=(\d+)", line)
        ids = ids or ([(int(own.group(1)), m.group(2) == "dot")] if own else [])
        if any(d for _, d in ids):
            ids = [(i, d) for i, d in ids if d]
        votes = collections.Counter(_part(stack(i), d) for i, d in ids)
        parts[m.group(1)] = votes.most_common(1)[0][0] if votes else PARTS[4]
    return parts


def profile(method: Method | None, cfg: LlamaConfig, batch: int, seq: int,
            steps: int) -> dict[str, float]:
    """Milliseconds per step of each part (op time summed over threads)."""
    tokens = jax.random.randint(jax.random.key(42), (batch, seq + 1), 0, 256, jnp.int32)
    plain = Llama(cfg)
    init, apply = (plain.init, plain.apply) if method is None else qjax_case(cfg, method)
    step, params, state = jitted_step(init, apply, tokens[:, :-1], tokens[:, 1:])
    parts = op_parts(step.lower(params, state).compile().as_text())
    for _ in range(3):
        jax.block_until_ready(step(params, state))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                jax.block_until_ready(step(params, state))
        (path,) = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    ms = dict.fromkeys(PARTS, 0.0)
    for e in events:
        if e.get("ph") == "X" and e.get("name") in parts:
            ms[parts[e["name"]]] += e["dur"] / 1e3 / steps
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model, for a smoke run")
    parser.add_argument("--steps", type=int, default=10, help="steps traced per case")
    args = parser.parse_args()
    d, layers = (128, 2) if args.quick else (256, 4)
    shapes = [(8, 256), (8, 32)]
    quest = Method("quest", 4, 4)
    lines = ["# Where the QuEST W4A4 QAT step's time goes (reference Llama)", "",
             f"d_model={d}, {layers} layers, 4 heads; op time per step (ms, summed over the CPU's "
             f"threads) by part, from `jax.profiler` traces of {args.steps} steps and the "
             "compiled HLO's stack frames (module docstring). CPU only.", ""]
    payload: dict[str, Any] = {"quick": args.quick, "steps": args.steps, "shapes": {}}
    for batch, seq in shapes:
        cfg = LlamaConfig(d_model=d, n_layers=layers, n_heads=4, max_seq_len=seq)
        base = profile(None, cfg, batch, seq, args.steps)
        q = profile(quest, cfg, batch, seq, args.steps)
        tb, tq = sum(base.values()), sum(q.values())
        payload["shapes"][f"{batch}x{seq}"] = {"float32": base, "quest_w4a4": q}
        lines += [f"## batch {batch} x seq {seq}", "",
                  "| part | float32 ms | QuEST W4A4 ms | difference ms | share of the difference |",
                  "|---|---|---|---|---|"]
        for p in PARTS:
            diff = q[p] - base[p]
            lines.append(f"| {p} | {base[p]:.1f} | {q[p]:.1f} | {diff:+.1f} | "
                         f"{diff / (tq - tb):.0%} |")
        lines += [f"| total | {tb:.1f} | {tq:.1f} | {tq - tb:+.1f} | op-time ratio "
                  f"{tq / tb:.2f}x |", ""]
    print("wrote", *report("qat_step_profile", args.quick, payload, lines))


if __name__ == "__main__":
    main()
