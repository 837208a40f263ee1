"""The training program: ``python -m qjax.train --config configs/<name>.py [--override k=v ...]``.

Trains the reference Llama-style LM (:mod:`qjax.models.llama`) on byte-level batches of a real
corpus (:mod:`qjax.data`; default: the Python standard library's own sources), with the method of
the config quantizing every linear layer in the blocks. With ``baseline=True`` it first trains the
float model on the same data, then the quantized one, and ends with a table of both.
Overrides name a field of the nested :class:`qjax.config.TrainConfig` by its short name or its
dotted path (``lr=1e-3`` or ``optim.lr=1e-3``, ``seq_len=128`` or ``model.max_seq_len=128``).

Per run (``<out_dir>/<float|qat>/``): ``metrics.jsonl`` (train loss, learning rate, tokens/s; and
validation loss and perplexity every ``eval_every`` steps), Orbax checkpoints in ``ckpt/`` every
``checkpoint_every`` steps (params, optimizer state, step and RNG; the data position is the step,
since batch ``k`` is a pure function of ``(seed, k)``), ``run.json`` (what the directory is a run
of: :func:`run_dir_identity`) and ``done.json`` at the end. A run that is killed resumes from its
newest intact checkpoint and reproduces the uninterrupted run's losses exactly; metrics logged
after that checkpoint are dropped and recomputed. Each checkpoint carries a manifest of file sizes
and CRC-32s (:mod:`qjax.checkpoint`): a damaged or truncated newest step is moved aside with a
one-line notice and the run resumes from the step before. A directory holding a run of another
config or corpus is refused in one line naming the differing fields, before anything trains.

``init_from=<run dir of a float run>`` starts from that checkpoint's params (same model sizes):
the float model continues from them, a quantized one gets them through
:func:`qjax.nn.init_from_float` (learned steps recomputed from the pretrained kernels), and
``method=lr_qat`` / ``qalora`` (``rank=``, ``phi_dtype=``; :mod:`qjax.nn.lowrank`, int
``weight_bits`` per output channel, int ``act_bits`` per token) trains the adapters and scales
only: the embedding, norms, LM head and frozen tensors are a fixed step argument, rebuilt from
the checkpoint on resume, and the checkpoints hold the trained params only. ``distill=<w>``
(with ``init_from``) trains on ``(1 - w) CE + w KL(teacher || student)`` at
``distill_temperature`` (:mod:`qjax.methods.distill`), the teacher being the float checkpoint;
``method=zeroqat`` fine-tunes an lsq model from ``init_from`` with zeroth-order steps
(:mod:`qjax.methods.zeroqat`; ``zo_eps``, ``zo_probes``, no backward pass, no weight decay);
``method=double_rounding`` (``double_rounding_bits=8,4``, ``weight_bits`` the highest) trains
one model at every width (the losses' mean, weighted by ``double_rounding_weights``) and reports
each width from the one checkpoint.
``backward=int8`` (with ``integer_forward=true``) runs the gradient matmuls of the integer-forward
layers in int8 (:mod:`qjax._src.quantized_backward`), the stochastic rounding keyed by the seed and
the step (the same losses on every run and resume of the config). ``method=ofq`` trains StatsQ
weights with LSQ activations (:mod:`qjax.methods.ofq`), logs ``osc_ratio`` (the fraction of block
kernel weights whose EMA code-flip frequency exceeds 0.005) and, with ``cga_boundary_range=``,
anneals from ``cga_start`` (a fraction of the steps) on; ``grid=post`` (methods ``lsq``, ``ste``)
puts the weights on ASQ's power-of-sqrt(2) grid (:class:`qjax.POST`).
"""

from qjax._src.train import (
    initialize_distributed,
    load_corpus,
    main,
    run,
    train_one,
)
from qjax._src.train_setup import build_model, load_params

__all__ = [
    "build_model",
    "load_params",
    "initialize_distributed",
    "load_corpus",
    "main",
    "run",
    "train_one",
]

if __name__ == "__main__":
    import sys

    sys.exit(main())
