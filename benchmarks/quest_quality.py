"""QuEST end to end: validation loss of 1- to 8-bit QAT against LSQ, PACT and plain STE.

Runs the study configs of ``configs/_study.py`` (one tiny Llama-style LM, one token budget, the
same midrise grid for every method; ``configs/study_*.py`` hold the same rows) one at a time with
the training program, so an interrupted benchmark resumes from its checkpoints
(``runs/quest_quality/<row>/lr<lr>/seed<k>``) and never redoes a finished run. Then it writes
``benchmarks/results/quest_quality.{json,md,png}``: validation loss and perplexity per method and
bit width, tokens, model size, the gap to float, the goals of the study, and two diagnostics: the
gradient cosine between the QAT and the float gradient at the trained float model (STE, clipped
STE and trust at 4 and 2 bits, QuEST's forward in all three), and the error of QuEST's 4-bit
activation quantizer on the real inputs of each layer as its clip varies.

``--sweep lr=0.0015,0.003,0.005`` trains seed 0 of ``--configs`` at each learning rate instead
and writes ``quest_quality_lr_sweep.{json,md}`` (where each row's ``lr`` in
``configs/_study.py`` comes from);
``--sweep steps=1200,2400`` does the same for the token budget (``quest_quality_steps_sweep``),
``--sweep weight_decay=0,0.1`` for the weight decay; ``--seeds`` averages a sweep over seeds.

Run: ``python benchmarks/quest_quality.py [--configs quest_w4a4,float] [--quick]
[--seeds 0,1] [--sweep FIELD=V,...]``. ``--quick`` trains 60 steps on a 4 MB corpus (a
smoke run, written to ``quest_quality_quick.*``). Expect about 6-8 minutes per full run on an idle
2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys

import jax
import optax

from qjax import data as D
from qjax import train
from qjax.config import replace
from qjax.diagnostics import clip_error, dense_inputs, gradient_cosine
from qjax.methods import quest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
from _study import STUDY, study_config  # noqa: E402  (configs/ is not a package)

try:
    from benchmarks._timing import machine, write_results
except ImportError:  # run as a script from the benchmarks folder
    from _timing import machine, write_results

# Seeds per row (others: seed 0). The W4A4 rows differ by less than the seed noise: see the
# paired per-seed differences in the results.
SEEDS = {"float": (0, 1, 2, 3), "quest_w4a4": (0, 1, 2, 3), "lsq_w4a4": (0, 1, 2, 3),
         "quest_mse_w4a4": (0, 1, 2, 3), "quest_ste_w4a4": (0, 1, 2, 3), "quest_w2a2": (0, 1),
         "quest_mse_w2a2": (0, 1), "lsq_w2a2": (0, 1)}
QUICK = dict(steps=60, eval_every=30, checkpoint_every=30, eval_batches=4,
             max_corpus_bytes=4_000_000)


SWEEPS = {"lr": float, "steps": int, "weight_decay": float}  # fields --sweep may vary
# Rows compared seed by seed in the table (row, against row).
PAIRS = [("quest_w4a4", "float"), ("quest_mse_w4a4", "float"), ("lsq_w4a4", "float"),
         ("quest_w4a4", "lsq_w4a4"), ("quest_mse_w4a4", "lsq_w4a4"),
         ("quest_mse_w4a4", "quest_w4a4"), ("quest_ste_w4a4", "quest_w4a4"),
         ("quest_w2a2", "lsq_w2a2"), ("quest_mse_w2a2", "quest_w2a2")]


def _config(name: str, seed: int, quick: bool, runs_dir: str, **overrides):
    """Study row ``name`` at ``seed`` (``overrides``: fields of ``SWEEPS``), run in
    ``runs_dir/<name>/lr<lr>/seed<seed>`` (``.../lr<lr>/steps<steps>/wd<decay>/...`` for a
    non-default token budget or weight decay)."""
    default = study_config(name, **(QUICK if quick else {}))
    cfg = study_config(name, seed=seed, **{**(QUICK if quick else {}), **overrides})
    parts = [runs_dir, name, f"lr{cfg.optim.lr:g}"]
    if cfg.optim.steps != default.optim.steps:
        parts.append(f"steps{cfg.optim.steps}")
    if cfg.optim.weight_decay != default.optim.weight_decay:
        parts.append(f"wd{cfg.optim.weight_decay:g}")
    return replace(cfg, out_dir=os.path.join(*parts, f"seed{seed}"))


def _weight_mb(result: dict, cfg) -> float:
    """Block linears at their weight bits (float32 when not quantized) plus float32 embeddings."""
    bits = cfg.quant.weight_bits if cfg.quant.method is not None and cfg.quant.weight_bits else 32
    embed = 2 * 256 * cfg.model.d_model
    return (result["non_embedding_params"] * bits + embed * 32) / 8 / 2**20


def _gradient_quality(corpus: D.Corpus, weights: dict[int, tuple[str, object]]) -> dict:
    """Cosine between QuEST's QAT gradient (each estimator) and the float gradient, all block
    linears, one training batch, at ``W{bits}A{bits}`` for each ``bits -> (row, config)`` in
    ``weights`` (the trained model of that study row supplies the parameters)."""
    out = {}
    for bits, (row, src) in weights.items():
        params = train.load_params(src, src.run_dir)
        inputs, targets = D.get_batch(corpus.train, 10**6, src.optim.batch_size,
                                      src.model.max_seq_len, src.optim.seed)
        for est in ("ste", "clipped_ste", "trust"):
            cfg = replace(src, method="quest", weight_bits=bits, act_bits=bits,
                          estimator=est)
            model, _ = train.build_model(cfg)

            def loss(p, i, t, qat, model=model):
                logits = model.apply({"params": p}, i, qat=qat)
                return optax.softmax_cross_entropy_with_integer_labels(logits, t).mean()

            cos = gradient_cosine(loss, params, jax.numpy.asarray(inputs),
                                  jax.numpy.asarray(targets))
            out[f"W{bits}A{bits} {est}"] = cos["all"]
            print(f"gradient cosine W{bits}A{bits} {est} at {row} weights: "
                  f"{cos['all']:.4f}", flush=True)
    return out


CLIPS = (2.0, 2.25, 2.513, 2.75, 3.0, 3.5)


def _clip_quality(corpus: D.Corpus, cfg, run_dir: str) -> dict:
    """Per block linear of the trained model of ``cfg``: the relative error of QuEST's 4-bit
    activation quantizer on its real inputs (one validation batch, float forward) for each clip
    in ``CLIPS`` (RMS units; 2.513 is the Gaussian optimum)."""
    model, _ = train.build_model(cfg)
    params = train.load_params(cfg, run_dir)
    inputs, _ = next(iter(D.val_batches(corpus.val, cfg.optim.batch_size, cfg.model.max_seq_len)))
    acts = dense_inputs(model, {"params": params}, jax.numpy.asarray(inputs), qat=False)
    spec = quest.spec(4, hadamard_block=cfg.quant.hadamard_block)
    return {layer: clip_error(x, spec, CLIPS) for layer, x in acts.items() if layer != "lm_head"}


def _plot(rows: list[dict], float_loss: float | None, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["method"] is not None and r["act_bits"] is not None:
            by_method.setdefault(r["label"].split()[0], []).append((r["weight_bits"], r["mean"]))
    for method, pts in sorted(by_method.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
    if float_loss is not None:
        ax.axhline(float_loss, color="k", ls="--", label="float32")
    ax.set_xlabel("bits (weights = activations)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("QAT of a tiny Llama on the Python stdlib, equal tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _row(name: str, seeds: list[int], quick: bool, runs_dir: str, corpus: D.Corpus,
         **overrides) -> dict:
    """Trains (or reloads) row ``name`` at each seed and summarises its validation losses."""
    results, cfg = [], None
    for seed in seeds:
        cfg = _config(name, seed, quick, runs_dir, **overrides)
        print(f"== {name} lr {cfg.optim.lr:g} steps {cfg.optim.steps} seed {seed}", flush=True)
        results.append(train.train_one(cfg, corpus, cfg.run_dir))
    losses = [r["val_loss"] for r in results]
    q = cfg.quant
    return {
        "config": name, "label": results[0]["label"], "method": q.method, "lr": cfg.optim.lr,
        "weight_bits": q.weight_bits if q.method else None,
        "act_bits": q.act_bits if q.method else None, "seeds": seeds, "val_loss": losses,
        "mean": statistics.fmean(losses),
        "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "tokens": results[0]["tokens"], "non_embedding_params":
            results[0]["non_embedding_params"], "weights_mb": _weight_mb(results[0], cfg),
    }


def _paired(a: dict, b: dict) -> dict | None:
    """Per-seed relative difference of row ``a`` against row ``b`` on their shared seeds (%):
    mean and standard error, so that a gap can be told from seed noise."""
    la, lb = dict(zip(a["seeds"], a["val_loss"], strict=True)), dict(
        zip(b["seeds"], b["val_loss"], strict=True))
    diffs = [100 * (la[k] / lb[k] - 1) for k in sorted(set(la) & set(lb))]
    if len(diffs) < 2:
        return None
    return {"seeds": len(diffs), "mean_pct": statistics.fmean(diffs),
            "se_pct": statistics.stdev(diffs) / math.sqrt(len(diffs)), "per_seed_pct": diffs}


def _sweep(names: list[str], field: str, values: list, seeds: list[int], quick: bool,
           runs_dir: str, corpus: D.Corpus) -> None:
    """Validation loss (mean over ``seeds``) of each row at each value of ``field`` (``lr``: where
    the rows' tuned ``lr`` in ``configs/_study.py`` comes from; ``steps``: how gaps move with
    tokens; ``weight_decay``: QuEST's quantized weights are scale invariant per row)."""
    table = {n: {v: _row(n, seeds, quick, runs_dir, corpus, **{field: v})["mean"] for v in values}
             for n in names}
    base = table.get("float")
    cfg = study_config(names[0])
    per_step = cfg.optim.batch_size * cfg.model.max_seq_len
    label = {v: f"{field} {v:g}" + (f" ({v * per_step / 1e6:.1f}M tokens)"
                                    if field == "steps" else "") for v in values}
    md = [f"# QuEST study: {field} sweep (seeds {', '.join(map(str, seeds))})", "",
          "| config | " + " | ".join(label.values()) + " | best |",
          "|---|" + "---|" * (len(values) + 1)]
    for n, by_v in table.items():
        cells = [f"{loss:.4f}" + ("" if base is None or n == "float"
                                  else f" ({100 * (loss / base[v] - 1):+.1f}%)")
                 for v, loss in by_v.items()]
        md.append(f"| {n} | " + " | ".join(cells) + f" | {min(by_v, key=by_v.get):g} |")
    if base is not None:
        md += ["", "In brackets: the gap to the float run at the same value."]
    markdown = "\n".join(md) + "\n"
    print(markdown)
    suffix = "_quick" if quick else ""
    payload = {"machine": machine(), "quick": quick, "field": field, "seeds": seeds,
               "val_loss": {n: {f"{v:g}": loss for v, loss in by_v.items()}
                            for n, by_v in table.items()}}
    print("wrote", *write_results(f"quest_quality_{field}_sweep{suffix}", payload, markdown))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(STUDY), help="comma-separated study rows")
    parser.add_argument("--quick", action="store_true", help="60-step smoke run")
    parser.add_argument("--seeds", default="", metavar="S,S,...",
                        help="seeds for every row (default: SEEDS, seed 0 for the others)")
    parser.add_argument("--runs-dir", default=os.path.join("runs", "quest_quality"))
    parser.add_argument("--no-diagnostic", action="store_true")
    parser.add_argument("--sweep", default="", metavar="FIELD=V,V,...",
                        help="instead of the study table: loss of --configs at each value "
                             f"of FIELD (one of {', '.join(SWEEPS)}; seed 0 unless --seeds)")
    args = parser.parse_args()
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in STUDY]
    if unknown:
        parser.error(f"unknown study rows {unknown}; known: {', '.join(STUDY)}")
    runs_dir = args.runs_dir + ("_quick" if args.quick else "")
    seeds = [int(v) for v in args.seeds.split(",") if v]
    sweep_field, _, sweep_values = args.sweep.partition("=")
    if args.sweep and (sweep_field not in SWEEPS or not sweep_values):
        parser.error(f"--sweep must be FIELD=V,V,... with FIELD in {list(SWEEPS)}, got "
                     f"{args.sweep!r}")

    first = _config(names[0], 0, args.quick, runs_dir)
    corpus = D.load_corpus(first.data)
    print(corpus.info.describe(), flush=True)
    entropy = D.unigram_entropy(corpus.val)
    if args.sweep:
        values = [SWEEPS[sweep_field](v) for v in sweep_values.split(",") if v]
        _sweep(names, sweep_field, values, seeds or [0], args.quick, runs_dir, corpus)
        return
    # The smoke run (--quick) trains seed 0 only unless --seeds says otherwise.
    rows = [_row(n, seeds or ([0] if args.quick else list(SEEDS.get(n, (0,)))), args.quick,
                 runs_dir, corpus) for n in names]
    by = {r["config"]: r for r in rows}
    base = by.get("float", {}).get("mean")
    float_by_seed = dict(zip(by["float"]["seeds"], by["float"]["val_loss"], strict=True)) \
        if "float" in by else {}
    for r in rows:
        # Against the float runs of the same seeds: seed noise is as large as small gaps.
        same = [float_by_seed[s] for s in r["seeds"] if s in float_by_seed]
        r["gap_pct"] = None if not same else 100 * (r["mean"] / statistics.fmean(same) - 1)
        r["ppl"] = math.exp(r["mean"])

    def less(a: str, b: str) -> bool | None:
        return None if a not in by or b not in by else bool(by[a]["mean"] < by[b]["mean"])

    goals = {
        "QuEST W4A4 within 2% of float": None if base is None or "quest_w4a4" not in by
        else bool(by["quest_w4a4"]["gap_pct"] <= 2.0),
        "QuEST < LSQ at W4A4": less("quest_w4a4", "lsq_w4a4"),
        "QuEST with searched clips (quest_mse) W4A4 within 2% of float":
            None if base is None or "quest_mse_w4a4" not in by
            else bool(by["quest_mse_w4a4"]["gap_pct"] <= 2.0),
        "QuEST with searched clips < LSQ at W4A4": less("quest_mse_w4a4", "lsq_w4a4"),
        "QuEST with searched clips < LSQ at W2A2": less("quest_mse_w2a2", "lsq_w2a2"),
        "LSQ < STE at W4A4": less("lsq_w4a4", "ste_w4a4"),
        "QuEST < LSQ at W2A2": less("quest_w2a2", "lsq_w2a2"),
        "LSQ < STE at W2A2": less("lsq_w2a2", "ste_w2a2"),
        "W1A1 finite and well below the unigram entropy": None if "quest_w1a1" not in by
        else bool(math.isfinite(by["quest_w1a1"]["mean"])
                  and by["quest_w1a1"]["mean"] < 0.8 * entropy),
    }
    paired = {f"{a} vs {b}": p for a, b in PAIRS if a in by and b in by
              for p in [_paired(by[a], by[b])] if p is not None}
    diag = {}
    if not args.no_diagnostic:
        # At the float model's weights and at the QuEST models' own (where QAT actually runs).
        for label, sources in (("float weights", {4: "float", 2: "float"}),
                               ("QuEST weights", {4: "quest_w4a4", 2: "quest_w2a2"})):
            if all(n in by for n in sources.values()):
                diag[label] = _gradient_quality(
                    corpus, {b: (n, _config(n, 0, args.quick, runs_dir))
                             for b, n in sources.items()})
    clip_diag = {}
    if not args.no_diagnostic:
        for name in ("float", "quest_w4a4", "quest_ste_w4a4", "quest_mse_w4a4"):
            if name in by:
                cfg = _config(name, 0, args.quick, runs_dir)
                clip_diag[name] = _clip_quality(corpus, cfg, cfg.run_dir)

    suffix = "_quick" if args.quick else ""
    cfg0 = _config(names[0], 0, args.quick, runs_dir)
    mach = machine()
    m, o = cfg0.model, cfg0.optim
    md = [f"# QuEST study{' (quick smoke run)' if args.quick else ''}", "",
          f"Byte-level Llama d={m.d_model}, {m.n_layers} layers, seq {m.max_seq_len}, batch "
          f"{o.batch_size}, {o.steps} steps ({o.steps * o.batch_size * m.max_seq_len:,}"
          f" tokens) of {corpus.info.describe().split(' files')[0]}; AdamW, lr per row (the "
          f"lr column; see quest_quality_lr_sweep.md); {mach['processor']}, {mach['cpus']} CPUs, "
          f"JAX {mach['jax']}.", "",
          "| config | method | lr | val loss | ppl | vs float | seeds | weights MB |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = f"{r['mean']:.4f}" + (f" +- {r['std']:.4f}" if len(r["seeds"]) > 1 else "")
        gap = "" if r["gap_pct"] is None or r["method"] is None else f"{r['gap_pct']:+.1f}%"
        md.append(f"| {r['config']} | {r['label']} | {r['lr']:g} | {loss} | {r['ppl']:.3f} | "
                  f"{gap} | {len(r['seeds'])} | {r['weights_mb']:.2f} |")
    md += ["", "\"vs float\" compares with the float runs of the same seeds (the float loss alone "
           "moves by a few percent between seeds).", "",
           f"Unigram entropy of the validation bytes: {entropy:.4f} nats/byte.", "",
           "Goals:", ""] + [f"- {g}: {'n/a' if ok is None else ok}" for g, ok in goals.items()]
    if paired:
        md += ["", "Paired per-seed differences (same seed = same init and data order):", "",
               "| comparison | seeds | mean | std. error | per seed |", "|---|---|---|---|---|"]
        md += [f"| {k} | {p['seeds']} | {p['mean_pct']:+.2f}% | {p['se_pct']:.2f} | "
               + " / ".join(f"{d:+.1f}" for d in p["per_seed_pct"]) + " |"
               for k, p in paired.items()]
    if diag:
        md += ["", "Gradient cosine (QAT vs float gradient, all block linears, one training "
               "batch) at the seed-0 weights of the trained float model and of the QuEST model "
               "of the same bits:", "",
               "| estimator | " + " | ".join(f"at {k}" for k in diag) + " |",
               "|---|" + "---|" * len(diag)]
        md += [f"| {k} | " + " | ".join(f"{d[k]:.4f}" for d in diag.values()) + " |"
               for k in next(iter(diag.values()))]
    if clip_diag:
        md += ["", "Relative error of QuEST's 4-bit activation quantizer (Hadamard 128, clip "
               "a * RMS) on the real inputs of each block linear (seed-0 models, one validation "
               "batch): at the Gaussian-optimal a = 2.513 (0.0115 for Gaussian data) and at the "
               f"best a of {CLIPS}:", "",
               "| layer | " + " | ".join(f"{n} at 2.513 | {n} best a" for n in clip_diag) + " |",
               "|---|" + "---|---|" * len(clip_diag)]
        for layer in next(iter(clip_diag.values())):
            cells = []
            for errs in clip_diag.values():
                best = min(errs[layer], key=errs[layer].get)
                cells += [f"{errs[layer][2.513]:.4f}", f"{best} ({errs[layer][best]:.4f})"]
            md.append(f"| {layer} | " + " | ".join(cells) + " |")
    markdown = "\n".join(md) + "\n"
    print(markdown)
    info = {k: v for k, v in dataclasses.asdict(corpus.info).items() if not k.endswith("files")}
    payload = {"machine": mach, "quick": args.quick, "corpus": info,
               "unigram_entropy": entropy, "rows": rows, "goals": goals, "paired": paired,
               "gradient_cosine": diag, "activation_clip_error": clip_diag}
    paths = write_results(f"quest_quality{suffix}", payload, markdown)
    png = os.path.join(os.path.dirname(paths[0]), f"quest_quality{suffix}.png")
    if _plot(rows, base, png):
        paths += (png,)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
