"""The QuEST study's rows (benchmarks/quest_quality.py, configs/study_*.py): one tiny model and
token budget for every method, as :class:`qjax.config.TrainConfig` fields by short name
(:func:`qjax.config.replace`)."""

from qjax.config import TrainConfig, replace

__all__ = ["STUDY_BASE", "STUDY", "study_config"]

# The QuEST study (benchmarks/quest_quality.py, configs/study_*.py): one tiny model and token
# budget for every method. Every method uses QuEST's midrise grid (2^b levels) so that grids are
# equal; weights are quantized per output channel everywhere; what differs is stated per row.
# integer_forward (int8 forward matmuls, same values and gradients up to float rounding) is on
# wherever the specs allow it, to save CPU time.
STUDY_BASE = dict(d_model=128, n_layers=2, n_heads=4, seq_len=256, batch_size=16, steps=1200,
                  lr=3e-3, baseline=False, eval_every=200, checkpoint_every=200, eval_batches=32,
                  grid="midrise")
STUDY: dict[str, dict] = {
    "float": dict(method=None),
    # QuEST: Hadamard (half form), RMS-Gaussian scales per row/token, trust estimator.
    "quest_w8a8": dict(method="quest", weight_bits=8, act_bits=8),
    "quest_w4a4": dict(method="quest", weight_bits=4, act_bits=4, integer_forward=True),
    "quest_w3a3": dict(method="quest", weight_bits=3, act_bits=3, integer_forward=True),
    "quest_w2a2": dict(method="quest", weight_bits=2, act_bits=2, integer_forward=True),
    "quest_w1a1": dict(method="quest", weight_bits=1, act_bits=1, clip_ratio=1.3,  # clip mask 1.3
                       integer_forward=True),
    "quest_w4": dict(method="quest", weight_bits=4, act_bits=None),  # weight-only
    "quest_w2": dict(method="quest", weight_bits=2, act_bits=None),
    # Ablation: QuEST's forward (Hadamard, RMS scales) with identity STE instead of trust.
    "quest_ste_w4a4": dict(method="quest", weight_bits=4, act_bits=4, estimator="ste",
                           integer_forward=True),
    "quest_ste_w2a2": dict(method="quest", weight_bits=2, act_bits=2, estimator="ste",
                           integer_forward=True),
    # QuEST with the clip searched per row (least squared error over 8 fractions of the row's
    # absmax in [0.6, 1]) instead of the Gaussian-optimal a * RMS: the rows that reach the first
    # block's linears are heavy-tailed after training (see the study's clip diagnostic).
    "quest_mse_w4a4": dict(method="quest", weight_bits=4, act_bits=4, scale_rule="mse:8:0.6",
                           integer_forward=True),
    # At 2 bits the Gaussian-optimal clip is ~0.5 of a 128-row's absmax: search [0.2, 1].
    "quest_mse_w2a2": dict(method="quest", weight_bits=2, act_bits=2, scale_rule="mse:16:0.2",
                           integer_forward=True),
    # LSQ: learned steps, per output channel (weights) and per tensor (inputs: a step per token
    # cannot be learned); no Hadamard.
    "lsq_w4a4": dict(method="lsq", weight_bits=4, act_bits=4),
    "lsq_w2a2": dict(method="lsq", weight_bits=2, act_bits=2),
    # PACT: learned symmetric clip per tensor for inputs; absmax weights with clipped STE.
    "pact_w4a4": dict(method="pact", weight_bits=4, act_bits=4),
    "pact_w2a2": dict(method="pact", weight_bits=2, act_bits=2),
    # Plain STE: absmax per output channel and per token, identity STE, no Hadamard.
    "ste_w4a4": dict(method="ste", weight_bits=4, act_bits=4, integer_forward=True),
    "ste_w2a2": dict(method="ste", weight_bits=2, act_bits=2, integer_forward=True),
}


def study_config(name: str, **overrides) -> TrainConfig:
    """The :class:`TrainConfig` of study row ``name`` (see :data:`STUDY`)."""
    if name not in STUDY:
        raise ValueError(f"unknown study config {name!r}; known: {', '.join(STUDY)}")
    fields = {**STUDY_BASE, "name": f"study_{name}", **STUDY[name], **overrides}
    return replace(TrainConfig(), **fields)
