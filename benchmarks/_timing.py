"""Shared timing helpers for the benchmark scripts: interleaved medians and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def interleaved_medians(
    fns: dict[str, Callable[[], object]], *, warmup: int = 3, repeats: int = 30
) -> dict[str, float]:
    """Median wall time (seconds) of each thunk, calling them round-robin so drift hits all."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def machine() -> dict[str, str]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": str(os.cpu_count()),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
    }


def write_results(name: str, payload: dict, markdown: str) -> tuple[str, str]:
    """Writes ``results/<name>.json`` and ``results/<name>.md``; returns their paths."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    jpath = os.path.join(RESULTS_DIR, f"{name}.json")
    mpath = os.path.join(RESULTS_DIR, f"{name}.md")
    with open(jpath, "w") as f:
        json.dump(payload, f, indent=2)
    with open(mpath, "w") as f:
        f.write(markdown)
    return jpath, mpath


def report(name: str, quick: bool, payload: dict, lines: list[str]) -> tuple[str, str]:
    """Prints the Markdown ``lines`` followed by the machine, and writes them with ``payload``
    (plus ``payload["machine"]``) to ``results/<name>[_quick].{json,md}``; returns the paths."""
    payload["machine"] = machine()
    text = "\n".join([*lines, "", f"Machine: {payload['machine']}"])
    print(text)
    return write_results(name + ("_quick" if quick else ""), payload, text + "\n")


def seeds_cli(main: Callable[[list[int], bool], None], doc: str, seeds: str = "0,1") -> None:
    """``main(seeds, quick)`` from the command line: ``[--quick] [--seeds 0,1]``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default=seeds)
    a = parser.parse_args()
    main([int(s) for s in a.seeds.split(",")], a.quick)
