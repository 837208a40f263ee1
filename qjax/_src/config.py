"""Implementation of :mod:`qjax.config` (documented there)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
import types
import typing
from collections.abc import Sequence

from qjax._src import quantized_backward as QB
from qjax._src.nn.recipe import METHODS as RECIPE_METHODS
from qjax._src.scales import as_scale_rule
from qjax._src.sharding import MESH_AXES

__all__ = ["TrainConfig", "load_config", "apply_overrides", "run_identity", "SCHEDULES",
           "LOW_RANK_METHODS", "METHOD_NAMES", "PLACEMENT_FIELDS", "QUANT_FIELDS"]

# LR schedule and QAT switch of a run: "cosine" is qjax.optim.warmup_cosine with QAT from
# qat_start; the others are qjax.methods.compute_optimal.fused_cooldown / classical_qat.
Schedule = typing.Literal["cosine", "wsd_fused", "wsd_classical"]
SCHEDULES: tuple[str, ...] = typing.get_args(Schedule)
# Low-rank QAT of a pretrained model (qjax.nn.lowrank): these methods need init_from.
LOW_RANK_METHODS = ("lr_qat", "qalora")
# Every method= the program runs: qjax.nn.Method's, the low-rank ones, zeroth-order QAT of an
# lsq model (qjax.methods.zeroqat, needs init_from) and Double Rounding (qjax.nn.double_rounding).
METHOD_NAMES = (*RECIPE_METHODS, *LOW_RANK_METHODS, "zeroqat", "double_rounding")
LOW_RANK_PHI_DTYPES = ("float32", "bfloat16", "int8")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training program run needs.

    ``method=None`` trains in float. With ``baseline=True`` the program first trains the same
    model in float on the same data, then the quantized one, and prints both in one table.
    """

    name: str = "quest_w4a4_tiny"
    # model (qjax.models.LlamaConfig)
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 256
    # data (qjax.data.CorpusConfig); () is the Python standard library's own sources
    corpus_paths: tuple[str, ...] = ()
    corpus_suffixes: tuple[str, ...] = (".py", ".txt", ".md")  # files taken from directories
    max_corpus_bytes: int = 64 * 2**20
    val_fraction: float = 0.05
    # optimisation (QuEST recipe: AdamW 0.9/0.95, decay 0.1 on matrices, clip 1.0, warm-up 10%)
    batch_size: int = 16
    steps: int = 500
    lr: float = 3e-3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_fraction: float = 0.1
    seed: int = 0
    # quantization (qjax.nn.Method)
    method: str | None = "quest"
    weight_bits: int | None = 4
    act_bits: int | None = 4
    trust: float = 1.0
    clip_ratio: float | None = None
    hadamard_mode: str | None = "auto"
    grid: str = "auto"  # qjax.nn.Method.grid: "midrise", "int", or "post" (ASQ's POST weights)
    estimator: str = "auto"
    scale_rule: str = "auto"  # scale rule name, e.g. "mse:8:0.6"
    hadamard_block: int | None = 128  # None: largest power of 2 <= 128 dividing K
    qat_start: float = 0.0
    # schedule: see SCHEDULES. The wsd ones put QAT on the last qat_fraction of the steps: a
    # float in [0, 1], or "optimal" for exp(-6.7297 / ln S) with S = tokens / (N * weight_bits
    # / 8), N the model's non-embedding parameters (qjax.methods.compute_optimal).
    schedule: Schedule = "cosine"
    qat_fraction: float | typing.Literal["optimal"] | None = None
    quantizer_lr_multiplier: float = 1.0
    integer_forward: bool = False
    # Gradient matmuls of the integer-forward layers (qjax._src.quantized_backward): "float", or
    # "int8" (int8 x int8 -> int32 on the forward's codes, the output gradient stochastically
    # rounded with a key folded from seed and step; needs integer_forward and method quest, lsq,
    # pact or ste; layers without an integer forward keep the float backward).
    backward: QB.Backward = "float"
    # Quantized attention of the reference Llama (qjax.attention.attention_quant; None: float):
    # Q, K, V int<attn_bits> per token and head, probabilities uint<attn_prob_bits> per row, and
    # K, V stored as the served KV cache stores them, int<kv_bits> (2, 4 or 8) per token, head
    # and group of kv_group channels (None: the whole head). Follows the QAT switch (qat_start).
    attn_bits: int | None = None
    attn_prob_bits: int | None = None
    kv_bits: int | None = None
    kv_group: int | None = None
    # EdgeQAT's token-adaptive widths (qjax.attention.attention_quant low_bits/low_fraction): the
    # attn_low_fraction least important tokens of each sequence take int<attn_low_bits> Q, K, V
    # (V by the layer's own logits, Q and K by the previous layer's choice). No KV cache.
    attn_low_bits: int | None = None
    attn_low_fraction: float = 0.5
    # Start from a float checkpoint: the run directory of a float run of the same model sizes
    # (e.g. runs/<name>/float, or its ckpt/ folder). method="lr_qat" / "qalora" (qjax.nn.lowrank,
    # weights int<weight_bits> per output channel, activations int<act_bits> per token) need it
    # and train rank-`rank` adapters and the scales only (Phi0 stored in phi_dtype for lr_qat).
    init_from: str | None = None
    rank: int = 8
    phi_dtype: str = "float32"
    # Distillation from the init_from float model (qjax.methods.distill): the loss is
    # (1 - distill) * cross-entropy + distill * KL(teacher || student) at distill_temperature.
    distill: float = 0.0
    distill_temperature: float = 1.0
    # EdgeQAT (qjax.methods.edgeqat), added to the loss while QAT is on: edgeqat_entropy times
    # the entropy loss of the quantized Q and K (needs attn_bits), edgeqat_attention times
    # 1 - the cosine of the attention logits to the float model's (init_from's, else the float
    # forward of the current weights). The authors' coefficients: 1 and 1 (their -0.5 log of the
    # summed entropies is edgeqat.entropy_loss at weight 1).
    edgeqat_entropy: float = 0.0
    edgeqat_attention: float = 0.0
    # method="ofq" (qjax.methods.ofq): StatsQ weights and LSQ activations; the training program
    # tracks the weights' StatsQ codes (Nagel et al.'s EMA of code flips) and logs osc_ratio, the
    # fraction of weights whose flip frequency exceeds 0.005. cga_boundary_range (in steps, in
    # (0, 0.5)) turns on confidence-guided annealing from step round(cga_start * steps): updates
    # of weights further than that from a rounding boundary are zeroed (None: no CGA).
    cga_boundary_range: float | None = None
    cga_start: float = 0.0
    # method="zeroqat": MeZO-style SGD (two forward passes per probe, no backward) of an lsq model
    # started from init_from, perturbation zo_eps, zo_probes directions per step.
    zo_eps: float = 1e-3
    zo_probes: int = 1
    # method="double_rounding": the weight bit widths trained jointly (one forward each, losses
    # summed) and served from one weight_bits (= the highest) checkpoint.
    double_rounding_bits: tuple[int, ...] = (8, 4)
    # HAWQ-V2 (qjax.precision): per-layer weight widths from mixed_precision_bits chosen on the
    # float model (the baseline run, or init_from) for an average of mixed_precision_budget bits
    # per block-linear weight; the widths are recorded in the QAT run's allocation.json.
    mixed_precision_budget: float | None = None
    mixed_precision_bits: tuple[int, ...] = (2, 3, 4, 8)
    baseline: bool = True
    # evaluation and output
    eval_every: int = 100
    eval_batches: int = 16
    log_every: int = 10
    checkpoint_every: int = 100
    out_dir: str = ""
    stop_after: int | None = None
    # sharding (qjax.sharding): e.g. mesh = {"data": 2, "fsdp": 2, "tensor": 2}; None: one device
    mesh: dict[str, int] | None = None
    mesh_axis_types: str = "explicit"
    # multi-host: jax.distributed.initialize arguments (one process per host)
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self):
        for f in ("d_model", "n_layers", "n_heads", "seq_len", "batch_size", "steps",
                  "eval_every", "eval_batches", "log_every", "checkpoint_every"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        for f, low, high in (("lr", 0.0, math.inf), ("weight_decay", 0.0, math.inf),
                             ("grad_clip", 0.0, math.inf), ("warmup_fraction", 0.0, 1.0),
                             ("val_fraction", 0.0, 1.0), ("trust", 0.0, math.inf),
                             ("quantizer_lr_multiplier", 0.0, math.inf)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not low <= v <= high or (f in ("lr", "grad_clip", "trust") and v == 0):
                raise ValueError(f"{f} must be a finite number in [{low}, {high}]"
                                 f"{' (not 0)' if f in ('lr', 'grad_clip', 'trust') else ''}, "
                                 f"got {v!r}")
        if not 0.0 <= self.qat_start <= self.steps:
            raise ValueError(
                f"qat_start must be a fraction in [0, 1] or a step, got {self.qat_start}"
            )
        self._check_schedule()
        self._check_method()
        self._check_backward()
        self._check_attention()
        self._check_low_rank()
        if self.scale_rule != "auto":
            as_scale_rule(self.scale_rule)  # a bad name fails here, naming the allowed ones
        if self.stop_after is not None and self.stop_after <= 0:
            raise ValueError(f"stop_after must be positive or None, got {self.stop_after}")
        if self.mesh is not None:
            if not isinstance(self.mesh, dict) or not self.mesh:
                raise ValueError(f"mesh must be a dict of axis sizes or None, got {self.mesh!r}")
            unknown = sorted(set(self.mesh) - set(MESH_AXES))
            if unknown:
                raise ValueError(f"unknown mesh axis {unknown}; allowed axes are {MESH_AXES}")
            bad = {k: v for k, v in self.mesh.items()
                   if isinstance(v, bool) or not isinstance(v, int) or v < 1}
            if bad:
                raise ValueError(f"mesh axis sizes must be positive ints, got {bad}")
        if self.mesh_axis_types not in ("explicit", "auto"):
            raise ValueError(f"mesh_axis_types must be 'explicit' or 'auto', "
                             f"got {self.mesh_axis_types!r}")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"need num_processes >= 1 and 0 <= process_id < num_processes, got "
                             f"{self.num_processes} and {self.process_id}")
        if self.num_processes > 1 and not self.coordinator_address:
            raise ValueError("num_processes > 1 needs coordinator_address (host:port)")

    def _check_method(self) -> None:
        if self.method is not None and self.method not in METHOD_NAMES:
            raise ValueError(f"method must be None or one of {METHOD_NAMES}, got {self.method!r}")
        d, t = self.distill, self.distill_temperature
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ValueError(f"distill must be a weight in [0, 1], got {d!r}")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) \
                or t <= 0:
            raise ValueError(f"distill_temperature must be a finite number > 0, got {t!r}")
        if d > 0 and (self.method is None or self.init_from is None):
            raise ValueError("distill > 0 distills the init_from float model into a quantized "
                             "one: set method and init_from")
        for name in ("edgeqat_entropy", "edgeqat_attention"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) \
                    or w < 0:
                raise ValueError(f"{name} must be a finite weight >= 0, got {w!r}")
        # A float run (method=None: also the baseline of a QAT run) reads neither weight.
        if self.edgeqat_entropy and self.method is not None and self.attn_bits is None:
            raise ValueError("edgeqat_entropy > 0 maximizes the entropy of the quantized queries "
                             "and keys: set attn_bits")
        if isinstance(self.zo_probes, bool) or not isinstance(self.zo_probes, int) \
                or self.zo_probes < 1:
            raise ValueError(f"zo_probes must be a positive int, got {self.zo_probes!r}")
        if not isinstance(self.zo_eps, (int, float)) or not math.isfinite(self.zo_eps) \
                or self.zo_eps <= 0:
            raise ValueError(f"zo_eps must be a finite number > 0, got {self.zo_eps!r}")
        if self.method == "zeroqat":
            if self.init_from is None or self.weight_bits is None:
                raise ValueError("method='zeroqat' fine-tunes a pretrained model: set init_from "
                                 "and weight_bits")
            if self.mesh is not None or d > 0:
                raise ValueError("method='zeroqat' runs on one device (mesh=None), without "
                                 "distill")
        budget, widths = self.mixed_precision_budget, self.mixed_precision_bits
        if budget is not None and self.method is not None:  # a float run ignores it
            if self.method not in RECIPE_METHODS:
                raise ValueError(f"mixed_precision_budget allocates widths for method quest, "
                                 f"lsq, pact or ste, got method={self.method!r}")
            if not self.baseline and self.init_from is None:
                raise ValueError("mixed_precision_budget allocates on a float model: keep "
                                 "baseline=true or set init_from")
            if not widths or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8
                                 for b in widths):
                raise ValueError(f"mixed_precision_bits must be ints in [2, 8], got {widths!r}")
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) \
                    or not min(widths) <= budget <= max(widths):
                raise ValueError(f"mixed_precision_budget must be an average width in "
                                 f"[{min(widths)}, {max(widths)}] bits, got {budget!r}")
        self._check_ofq()
        bits = self.double_rounding_bits
        if self.method == "double_rounding":
            if not bits or any(isinstance(b, bool) or not isinstance(b, int) for b in bits):
                raise ValueError(f"double_rounding_bits must be a tuple of ints, got {bits!r}")
            if self.weight_bits != max(bits):
                raise ValueError(f"method='double_rounding' stores weight_bits = the highest of "
                                 f"double_rounding_bits {tuple(bits)}, got weight_bits="
                                 f"{self.weight_bits}")

    def _check_ofq(self) -> None:
        br, start = self.cga_boundary_range, self.cga_start
        if br is not None and (isinstance(br, bool) or not isinstance(br, (int, float))
                               or not 0.0 < br < 0.5):
            raise ValueError(f"cga_boundary_range must be None or a distance in steps in "
                             f"(0, 0.5), got {br!r}")
        if isinstance(start, bool) or not isinstance(start, (int, float)) \
                or not 0.0 <= start <= 1.0:
            raise ValueError(f"cga_start must be a fraction of the steps in [0, 1], got {start!r}")
        if self.method is None or self.method == "ofq":
            if self.method == "ofq" and self.mixed_precision_budget is not None:
                raise ValueError("method='ofq' tracks and anneals one weight width: "
                                 "mixed_precision_budget must be None")
            return
        if br is not None:
            raise ValueError(f"cga_boundary_range anneals StatsQ weights: it needs method='ofq', "
                             f"got method={self.method!r}")

    def _check_backward(self) -> None:
        """``integer_forward`` only with a method whose layers are :class:`qjax.nn.Method` recipes;
        ``backward`` one of :data:`qjax._src.quantized_backward.BACKWARDS`; a quantized one needs
        ``integer_forward`` (it reuses the forward's int8 codes) and a method whose layers are
        :class:`qjax.nn.Method` recipes. A float run (``method=None``, e.g. the baseline of such
        a run) ignores it."""
        QB.check_backward(self.backward, "backward")
        if not isinstance(self.integer_forward, bool):
            raise ValueError(f"integer_forward must be true or false, got "
                             f"{self.integer_forward!r}")
        if (self.integer_forward and self.method is not None
                and self.method not in RECIPE_METHODS):
            # These methods build their own layers (low-rank, zeroth-order, multi-precision):
            # an integer forward would be silently ignored.
            names = f"{', '.join(RECIPE_METHODS[:-1])} or {RECIPE_METHODS[-1]}"
            raise ValueError(f"integer_forward is for method {names} (qjax.nn.Method layers), "
                             f"got method={self.method!r}")
        if self.backward == "float":
            return
        if not self.integer_forward:
            raise ValueError(f"backward={self.backward!r} reuses the int8 codes of the integer "
                             "forward: set integer_forward=true too")

    def _check_attention(self) -> None:
        """Bit widths in 2..8 (``kv_bits``: 2, 4 or 8) or None; ``kv_group`` only with
        ``kv_bits``, dividing the head size ``d_model / n_heads``; ``attn_low_bits`` below the
        attention's widths, ``attn_low_fraction`` in (0, 1]."""
        from qjax._src.attention import attention_quant

        if self.kv_group is not None and self.kv_bits is None:
            raise ValueError("kv_group is the group of a quantized KV cache: set kv_bits too")
        if self.attn_low_bits is not None and self.attn_bits is None and self.kv_bits is None:
            raise ValueError("attn_low_bits lowers some tokens' Q, K, V widths: set attn_bits "
                             "(or kv_bits) too")
        attention_quant(self.attn_bits, self.attn_prob_bits, self.kv_bits, self.kv_group,
                        low_bits=self.attn_low_bits, low_fraction=self.attn_low_fraction)
        head = self.d_model // self.n_heads if self.n_heads else 0
        if self.kv_group is not None and head % self.kv_group:
            raise ValueError(f"kv_group ({self.kv_group}) must divide the head size d_model / "
                             f"n_heads = {head}")

    def _check_low_rank(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        if self.phi_dtype not in LOW_RANK_PHI_DTYPES:
            raise ValueError(f"phi_dtype must be one of {LOW_RANK_PHI_DTYPES}, "
                             f"got {self.phi_dtype!r}")
        if self.method not in LOW_RANK_METHODS:
            return
        if self.init_from is None:
            raise ValueError(f"method={self.method!r} trains adapters on a pretrained model: "
                             "set init_from to a float run directory")
        if self.weight_bits is None:
            raise ValueError(f"method={self.method!r} needs weight_bits")
        if self.mesh is not None:
            raise ValueError(f"method={self.method!r} runs on one device: mesh must be None")
        if self.method == "qalora" and self.phi_dtype != "float32":
            raise ValueError("phi_dtype is for method='lr_qat'")

    def _check_schedule(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        f = self.qat_fraction
        if f is not None and f != "optimal" and (
                isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0):
            raise ValueError(f"qat_fraction must be a fraction in [0, 1], 'optimal' or None, "
                             f"got {f!r}")
        if self.schedule == "cosine":
            if f is not None:
                raise ValueError("qat_fraction is for schedule='wsd_fused' or 'wsd_classical'; "
                                 "schedule='cosine' starts QAT at qat_start")
            return
        if f is None:
            raise ValueError(f"schedule={self.schedule!r} needs qat_fraction: a fraction in "
                             f"[0, 1] or 'optimal'")
        if self.qat_start != 0.0:
            raise ValueError(f"qat_start is for schedule='cosine'; schedule={self.schedule!r} "
                             f"starts QAT at round(steps * (1 - qat_fraction))")
        if f == "optimal" and self.weight_bits is None:
            raise ValueError("qat_fraction='optimal' needs weight_bits: f* is a function of "
                             "S = tokens / (params * weight_bits / 8)")

    @property
    def run_dir(self) -> str:
        return self.out_dir or os.path.join("runs", self.name)


# Fields that say where and how a run is observed, not what it computes: resuming a run
# directory under other values of these is allowed (e.g. on another mesh, or logging more often).
# Fields renamed since 0.1.0 (old name -> new name): an override or a recorded run identity
# under the old name means the new one.
RENAMED_FIELDS = {"clip": "clip_ratio", "hadamard": "hadamard_mode", "scale": "scale_rule",
                  "block_size": "hadamard_block"}
PLACEMENT_FIELDS = ("name", "out_dir", "stop_after", "baseline", "eval_every", "log_every",
                    "checkpoint_every", "mesh", "mesh_axis_types", "coordinator_address",
                    "num_processes", "process_id")
# Fields a float run (method=None) does not read.
QUANT_FIELDS = ("weight_bits", "act_bits", "trust", "clip_ratio", "hadamard_mode", "grid",
                "estimator", "scale_rule", "hadamard_block", "qat_start",
                "quantizer_lr_multiplier", "integer_forward",
                "backward", "attn_bits", "attn_prob_bits", "kv_bits", "kv_group",
                "attn_low_bits", "attn_low_fraction", "rank",
                "phi_dtype", "distill", "distill_temperature", "edgeqat_entropy",
                "edgeqat_attention", "cga_boundary_range", "cga_start", "zo_eps",
                "zo_probes", "double_rounding_bits", "mixed_precision_budget",
                "mixed_precision_bits")


def run_identity(config: TrainConfig) -> dict:
    """The config fields that determine a run's results, as a JSON-able dict.

    Everything except :data:`PLACEMENT_FIELDS`; for a float run also without
    :data:`QUANT_FIELDS` (so a float baseline is shared by runs that differ only in their
    quantization), except ``weight_bits`` when ``qat_fraction="optimal"`` sets the float
    schedule's decay start. Two runs with equal identities on the same corpus train the same
    model on the same batches.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in PLACEMENT_FIELDS:
            continue
        if config.method is None and f.name in QUANT_FIELDS and not (
                f.name == "weight_bits" and config.qat_fraction == "optimal"):
            continue
        out[f.name] = getattr(config, f.name)
    return json.loads(json.dumps(out))


def _convert(name: str, text: str, annotation) -> object:
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Literal:
        return text  # TrainConfig checks it, naming the allowed values
    optional = type(None) in args
    if optional and text.strip().lower() in ("none", "null", ""):
        return None
    literals = [v for a in args if typing.get_origin(a) is typing.Literal
                for v in typing.get_args(a)]
    if text in literals:
        return text
    base = [a for a in args if a is not type(None) and typing.get_origin(a) is not typing.Literal
            ][0] if args and (typing.get_origin(hint) in (typing.Union, types.UnionType)) else hint
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0] if typing.get_args(base) else str
        try:
            return tuple(item(p.strip()) for p in text.split(",") if p.strip())
        except ValueError:
            raise ValueError(f"{name} must be a comma list of {item.__name__}, got {text!r}"
                             ) from None
    if typing.get_origin(base) is dict:  # "data:2,fsdp:2" or JSON
        text = text.strip()
        if text.startswith("{"):
            return json.loads(text)
        try:
            return {k.strip(): int(v) for k, v in (p.split(":") for p in text.split(",") if p)}
        except ValueError:
            raise ValueError(f"{name} must look like data:2,fsdp:2, got {text!r}") from None
    if base is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {text!r}")
    try:
        return base(text)
    except ValueError:
        alternatives = "".join(f" or {v!r}" for v in literals)
        raise ValueError(f"{name} must be {base.__name__}{alternatives}, got {text!r}") from None


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Applies ``key=value`` strings; raises ValueError naming an unknown key or bad value."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if key in RENAMED_FIELDS:
            raise ValueError(f"config key {key!r} is now {RENAMED_FIELDS[key]!r}; use "
                             f"{RENAMED_FIELDS[key]}={value}")
        if key not in fields:
            raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(sorted(fields))}")
        changes[key] = _convert(key, value, fields[key].type)
    return dataclasses.replace(config, **changes)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Loads ``get_config()`` from a Python file (None: the defaults) and applies overrides."""
    if path is None:
        config = TrainConfig()
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        spec = importlib.util.spec_from_file_location("qjax_user_config", path)
        module = importlib.util.module_from_spec(spec)
        # A config file may import its siblings (e.g. configs/_study.py), as a script could.
        folder = os.path.dirname(os.path.abspath(path))
        sys.path.insert(0, folder)
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(folder)
        if not hasattr(module, "get_config"):
            raise ValueError(f"config file {path!r} must define get_config()")
        config = module.get_config()
        if not isinstance(config, TrainConfig):
            raise TypeError(f"get_config() in {path!r} must return a TrainConfig")
    return apply_overrides(config, overrides)
