"""Sharded QAT step: steps per second and per-device memory on 1, 2, 4 and 8 simulated devices.

    python benchmarks/sharding.py [--steps 20] [--d-model 256]

QuEST W4A4 train step of the reference Llama (AdamW, :data:`qjax.models.llama.PARTITION_RULES`)
under data parallelism (``{"data": n}``: params replicated) and FSDP (``{"fsdp": n}``: params and
optimizer state split). The devices are simulated on this machine's CPU cores
(``--xla_force_host_platform_device_count=8``), so every "device" shares the same two cores: the
step-time ratios measure the overhead of partitioning and collectives, not a speedup. The
per-device bytes of params and optimizer state are exact (they are what a TPU would hold).
Writes ``benchmarks/results/sharding.{json,md}``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from qjax import sharding as S  # noqa: E402
from qjax.models.llama import PARTITION_RULES, Llama, LlamaConfig, quantization_rules  # noqa: E402
from qjax.nn import (
    Method,  # noqa: E402
    quantize_model,  # noqa: E402
)

try:
    from benchmarks._timing import interleaved_medians, machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _timing import interleaved_medians, machine, write_results

DEVICES = (1, 2, 4, 8)


def _bytes_on_device0(tree) -> int:
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def _setup(args):
    cfg = LlamaConfig(d_model=args.d_model, n_layers=2, n_heads=4, max_seq_len=args.seq_len)
    method = Method("quest", weight_bits=4, act_bits=4, hadamard_block=args.block_size)
    model = quantize_model(Llama(cfg), quantization_rules(method))
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len + 1), 0, 256)
    params = model.init(jax.random.key(0), ids[:1, :-1])["params"]
    tx = optax.adamw(1e-3)

    def step(p, o, ids):
        def loss_fn(p):
            logits = model.apply({"params": p}, ids[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    return params, tx, ids, step


def _case(params, tx, ids, step, axis: str, n: int):
    mesh = S.make_mesh({axis: n}, devices=jax.devices()[:n])
    specs = S.param_specs(params, mesh, PARTITION_RULES)
    ospecs = S.opt_state_specs(tx, params, specs)
    sh = S.named_shardings((specs, ospecs), mesh)
    p, o = S.put((params, tx.init(params)), sh)
    x = S.put(ids, NamedSharding(mesh, S.batch_spec(mesh)))
    fn = jax.jit(step, out_shardings=(*sh, None))
    state = {"p": p, "o": o}

    def run():
        with jax.set_mesh(mesh):
            state["p"], state["o"], loss = fn(state["p"], state["o"], x)
        return loss

    return run, _bytes_on_device0(p), _bytes_on_device0(o)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case (median)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=32,
                        help="QuEST Hadamard block; must divide d_model / 8 for FSDP over 8")
    args = parser.parse_args()
    if jax.device_count() < max(DEVICES):
        raise SystemExit(f"needs {max(DEVICES)} devices, found {jax.device_count()}")
    params, tx, ids, step = _setup(args)
    cases, mem = {}, {}
    for axis in ("data", "fsdp"):
        for n in DEVICES:
            if axis == "fsdp" and n == 1:
                continue  # the same as data with 1 device
            run, pbytes, obytes = _case(params, tx, ids, step, axis, n)
            cases[(axis, n)] = run
            mem[(axis, n)] = (pbytes, obytes)
    fns = {f"{a}{n}": f for (a, n), f in cases.items()}
    times = interleaved_medians(fns, warmup=3, repeats=args.steps)
    base_t, (base_p, base_o) = times["data1"], mem[("data", 1)]
    rows = []
    for (axis, n), (pbytes, obytes) in mem.items():
        t = times[f"{axis}{n}"]
        rows.append({"sharding": axis if n > 1 else "none", "devices": n,
                     "step_ms": 1e3 * t, "steps_per_s": 1.0 / t, "time_ratio": t / base_t,
                     "param_bytes_per_device": pbytes, "param_ratio": pbytes / base_p,
                     "opt_state_bytes_per_device": obytes, "opt_state_ratio": obytes / base_o})
    n_params = sum(math.prod(v.shape) for v in jax.tree.leaves(params))
    note = ("CPU simulation: all devices share this machine's cores, so step-time ratios measure "
            "partitioning and collective overhead, not speedup; memory per device is exact.")
    payload = {"machine": machine(), "note": note, "params": n_params,
               "config": vars(args) | {"method": "quest W4A4", "optimizer": "adamw",
                                       "mesh_axis_types": "explicit"},
               "rows": rows}
    lines = [f"# Sharded QAT step (QuEST W4A4, {n_params:,} params, batch {args.batch} x "
             f"{args.seq_len})", "", note, "",
             "| sharding | devices | step (ms) | steps/s | time / 1 device | params per device "
             "(KiB) | / 1 device | opt state per device (KiB) | / 1 device |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sharding']} | {r['devices']} | {r['step_ms']:.1f} | "
                     f"{r['steps_per_s']:.1f} | {r['time_ratio']:.2f} | "
                     f"{r['param_bytes_per_device'] / 1024:.0f} | {r['param_ratio']:.3f} | "
                     f"{r['opt_state_bytes_per_device'] / 1024:.0f} | "
                     f"{r['opt_state_ratio']:.3f} |")
    md = "\n".join(lines) + "\n"
    write_results("sharding", payload, md)
    print(md)


if __name__ == "__main__":
    main()
