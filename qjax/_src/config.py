"""Implementation of :mod:`qjax.config` (documented there): the sections of a training run.

A :class:`TrainConfig` nests the model (:class:`qjax.models.LlamaConfig`), the corpus
(:class:`qjax.data.CorpusConfig`), the optimisation (:class:`OptimConfig`), the quantization
recipe (:class:`QuantConfig`), quantized attention (:class:`AttentionConfig`), the literature
methods' hyper-parameters (:class:`MethodOptions`) and where the run executes
(:class:`ParallelConfig`). Each section checks its own fields; :class:`TrainConfig` checks the
facts that join sections (e.g. ``kv_group`` dividing the model's head size).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing

from qjax._src import quantized_backward as QB
from qjax._src.data import VOCAB_SIZE, CorpusConfig
from qjax._src.models.llama import LlamaConfig
from qjax._src.nn import double_rounding as DR
from qjax._src.nn.recipe import METHODS as RECIPE_METHODS
from qjax._src.scales import as_scale_rule
from qjax._src.sharding import MESH_AXES

__all__ = ["TrainConfig", "OptimConfig", "QuantConfig", "AttentionConfig", "MethodOptions",
           "ParallelConfig", "SECTIONS", "SCHEDULES", "LOW_RANK_METHODS", "METHOD_NAMES"]

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


def _positive_ints(section: object, names: tuple[str, ...]) -> None:
    for f in names:
        v = getattr(section, f)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{f} must be a positive int, got {v!r}")


def _weight(name: str, v: object, low: float = 0.0, high: float = math.inf, *,
            nonzero: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not low <= v <= high or (nonzero and v == 0):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}]"
                         f"{' (not 0)' if nonzero else ''}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimisation of a run: the QuEST recipe by default (AdamW 0.9/0.95, decay 0.1 on
    matrices, clip 1.0, warm-up 10 %), and when QAT switches on.

    ``schedule`` (see :data:`SCHEDULES`): ``"cosine"`` warms up and decays by cosine, QAT from
    ``qat_start`` (a fraction of the steps in [0, 1], or a step); ``"wsd_fused"`` /
    ``"wsd_classical"`` put QAT on the last ``qat_fraction`` of the steps: a fraction, or
    ``"optimal"`` for ``exp(-6.7297 / ln S)`` with ``S = tokens / (N * weight_bits / 8)``, N the
    model's non-embedding parameters (:mod:`qjax.methods.compute_optimal`).
    ``quantizer_lr_multiplier`` scales the learning rate of learned quantizer parameters.
    """

    batch_size: int = 16
    steps: int = 500
    lr: float = 3e-3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_fraction: float = 0.1
    seed: int = 0
    schedule: Schedule = "cosine"
    qat_start: float = 0.0
    qat_fraction: float | typing.Literal["optimal"] | None = None
    quantizer_lr_multiplier: float = 1.0

    def __post_init__(self):
        _positive_ints(self, ("batch_size", "steps"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        _weight("lr", self.lr, nonzero=True)
        _weight("weight_decay", self.weight_decay)
        _weight("grad_clip", self.grad_clip, nonzero=True)
        _weight("warmup_fraction", self.warmup_fraction, 0.0, 1.0)
        _weight("quantizer_lr_multiplier", self.quantizer_lr_multiplier)
        if isinstance(self.qat_start, bool) or not isinstance(self.qat_start, (int, float)) \
                or not 0.0 <= self.qat_start <= self.steps:
            raise ValueError(
                f"qat_start must be a fraction in [0, 1] or a step, got {self.qat_start!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        f = self.qat_fraction
        if f is not None and f != "optimal" and (
                isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0):
            raise ValueError(f"qat_fraction must be a fraction in [0, 1], 'optimal' or None, "
                             f"got {f!r}")
        if self.schedule == "cosine" and f is not None:
            raise ValueError("qat_fraction is for schedule='wsd_fused' or 'wsd_classical'; "
                             "schedule='cosine' starts QAT at qat_start")
        if self.schedule != "cosine" and f is None:
            raise ValueError(f"schedule={self.schedule!r} needs qat_fraction: a fraction in "
                             f"[0, 1] or 'optimal'")
        if self.schedule != "cosine" and self.qat_start != 0.0:
            raise ValueError(f"qat_start is for schedule='cosine'; schedule={self.schedule!r} "
                             f"starts QAT at round(steps * (1 - qat_fraction))")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """The quantization recipe of a run's linear layers: ``method`` (one of
    :data:`METHOD_NAMES`; None trains in float) at ``weight_bits`` / ``act_bits``
    (``act_bits=None``: weight-only).

    For ``quest``, ``lsq``, ``pact``, ``ste`` and ``ofq`` the fields are those of
    :class:`qjax.nn.Method` (which checks them): ``hadamard_block=None`` is the largest power of
    2 <= 128 dividing K; ``grid`` ``"midrise"``, ``"int"`` or ``"post"`` (ASQ's POST weights);
    ``scale_rule`` a rule name such as ``"mse:8:0.6"``. ``backward="int8"`` gives the
    integer-forward layers int8 gradient matmuls (:mod:`qjax._src.quantized_backward`: on the
    forward's codes, the output gradient stochastically rounded with a key folded from seed and
    step); it needs ``integer_forward``. The other methods (``lr_qat``, ``qalora``, ``zeroqat``,
    ``double_rounding``) build their own layers from ``weight_bits`` and ``act_bits`` and the
    options in :class:`MethodOptions`.
    """

    method: str | None = "quest"
    weight_bits: int | None = 4
    act_bits: int | None = 4
    trust: float = 1.0
    clip_ratio: float | None = None
    hadamard_mode: str | None = "auto"
    grid: str = "auto"
    estimator: str = "auto"
    scale_rule: str = "auto"
    hadamard_block: int | None = 128
    integer_forward: bool = False
    backward: QB.Backward = "float"

    def __post_init__(self):
        if self.method is not None and self.method not in METHOD_NAMES:
            raise ValueError(f"method must be None or one of {METHOD_NAMES}, got {self.method!r}")
        _weight("trust", self.trust, nonzero=True)
        if self.scale_rule != "auto":
            as_scale_rule(self.scale_rule)  # a bad name fails here, naming the allowed ones
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
        if self.backward != "float" and not self.integer_forward:
            raise ValueError(f"backward={self.backward!r} reuses the int8 codes of the integer "
                             "forward: set integer_forward=true too")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Quantized attention of the reference Llama (:func:`qjax.attention.attention_quant`; all
    None: float attention). Q, K, V ``int<attn_bits>`` per token and head, probabilities
    ``uint<attn_prob_bits>`` per row, and K, V stored as the served KV cache stores them,
    ``int<kv_bits>`` (2, 4 or 8) per token, head and group of ``kv_group`` channels (None: the
    whole head). Follows the QAT switch.

    EdgeQAT's token-adaptive widths: the ``attn_low_fraction`` least important tokens of each
    sequence take ``int<attn_low_bits>`` Q, K, V (V by the layer's own logits, Q and K by the
    previous layer's choice). No KV cache.
    """

    attn_bits: int | None = None
    attn_prob_bits: int | None = None
    kv_bits: int | None = None
    kv_group: int | None = None
    attn_low_bits: int | None = None
    attn_low_fraction: float = 0.5

    def __post_init__(self):
        from qjax._src.attention import attention_quant

        if self.kv_group is not None and self.kv_bits is None:
            raise ValueError("kv_group is the group of a quantized KV cache: set kv_bits too")
        if self.attn_low_bits is not None and self.attn_bits is None and self.kv_bits is None:
            raise ValueError("attn_low_bits lowers some tokens' Q, K, V widths: set attn_bits "
                             "(or kv_bits) too")
        attention_quant(self.attn_bits, self.attn_prob_bits, self.kv_bits, self.kv_group,
                        low_bits=self.attn_low_bits, low_fraction=self.attn_low_fraction)

    @property
    def enabled(self) -> bool:
        return any(b is not None for b in (self.attn_bits, self.attn_prob_bits, self.kv_bits))


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Hyper-parameters of the methods from the literature (each read only by its method).

    * ``rank``, ``phi_dtype``: ``method="lr_qat"`` / ``"qalora"`` (:mod:`qjax.nn.lowrank`)
      train rank-``rank`` adapters and the scales of the ``init_from`` model (weights
      ``int<weight_bits>`` per output channel, activations ``int<act_bits>`` per token; Phi0
      stored in ``phi_dtype`` for lr_qat).
    * ``distill``, ``distill_temperature`` (:mod:`qjax.methods.distill`): the loss is
      ``(1 - distill) * cross-entropy + distill * KL(teacher || student)`` at the temperature,
      the teacher the ``init_from`` float model.
    * ``edgeqat_entropy``, ``edgeqat_attention`` (:mod:`qjax.methods.edgeqat`), added to the
      loss while QAT is on: the entropy loss of the quantized Q and K (needs ``attn_bits``), and
      1 - the cosine of the attention logits to the float model's (``init_from``'s, else the
      float forward of the current weights). The authors' coefficients: 1 and 1.
    * ``cga_boundary_range``, ``cga_start``: ``method="ofq"`` (:mod:`qjax.methods.ofq`) with
      confidence-guided annealing from step ``round(cga_start * steps)``: updates of weights
      further than ``cga_boundary_range`` (in steps, in (0, 0.5)) from a rounding boundary are
      zeroed (None: no CGA). The program logs ``osc_ratio`` of every ofq run.
    * ``zo_eps``, ``zo_probes``: ``method="zeroqat"``, MeZO-style SGD (two forwards per probe).
    * ``double_rounding_bits``: ``method="double_rounding"``, the weight widths trained jointly
      and served from one ``weight_bits`` (= the highest) checkpoint; ``double_rounding_weights``
      (one ``>= 0`` per width, in the order of ``double_rounding_bits``; None: equal) weight
      their losses in the joint objective, normalized to sum 1. The lowest width's loss is the
      largest and pulls the shared weights off the others' optimum (docs/design.md Section 8):
      a small weight on it trades some of its accuracy for theirs (e.g. ``1,1,2,0.2`` for
      ``8,6,4,2``).
    * ``mixed_precision_budget``, ``mixed_precision_bits``: HAWQ-V2 (:mod:`qjax.precision`)
      per-layer weight widths from ``mixed_precision_bits`` chosen on the float model (the
      baseline run, or ``init_from``) for an average of ``mixed_precision_budget`` bits per
      block-linear weight; recorded in the QAT run's ``allocation.json``.
    """

    rank: int = 8
    phi_dtype: str = "float32"
    distill: float = 0.0
    distill_temperature: float = 1.0
    edgeqat_entropy: float = 0.0
    edgeqat_attention: float = 0.0
    cga_boundary_range: float | None = None
    cga_start: float = 0.0
    zo_eps: float = 1e-3
    zo_probes: int = 1
    double_rounding_bits: tuple[int, ...] = (8, 4)
    double_rounding_weights: tuple[float, ...] | None = None
    mixed_precision_budget: float | None = None
    mixed_precision_bits: tuple[int, ...] = (2, 3, 4, 8)

    def __post_init__(self):
        _positive_ints(self, ("rank", "zo_probes"))
        if self.phi_dtype not in LOW_RANK_PHI_DTYPES:
            raise ValueError(f"phi_dtype must be one of {LOW_RANK_PHI_DTYPES}, "
                             f"got {self.phi_dtype!r}")
        d = self.distill
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ValueError(f"distill must be a weight in [0, 1], got {d!r}")
        _weight("distill_temperature", self.distill_temperature, nonzero=True)
        _weight("edgeqat_entropy", self.edgeqat_entropy)
        _weight("edgeqat_attention", self.edgeqat_attention)
        _weight("zo_eps", self.zo_eps, nonzero=True)
        br = self.cga_boundary_range
        if br is not None and (isinstance(br, bool) or not isinstance(br, (int, float))
                               or not 0.0 < br < 0.5):
            raise ValueError(f"cga_boundary_range must be None or a distance in steps in "
                             f"(0, 0.5), got {br!r}")
        start = self.cga_start
        if isinstance(start, bool) or not isinstance(start, (int, float)) \
                or not 0.0 <= start <= 1.0:
            raise ValueError(f"cga_start must be a fraction of the steps in [0, 1], "
                             f"got {start!r}")
        for name in ("double_rounding_bits", "mixed_precision_bits"):
            bits = getattr(self, name)
            if isinstance(bits, (str, int)) or not bits or any(
                    isinstance(b, bool) or not isinstance(b, int) for b in bits):
                raise ValueError(f"{name} must be a tuple of ints, got {bits!r}")
            object.__setattr__(self, name, tuple(bits))
        if self.double_rounding_weights is not None:
            object.__setattr__(self, "double_rounding_weights", DR.check_loss_weights(
                self.double_rounding_weights, self.double_rounding_bits,
                "double_rounding_weights"))
        if any(not 2 <= b <= 8 for b in self.mixed_precision_bits):
            raise ValueError(f"mixed_precision_bits must be ints in [2, 8], "
                             f"got {self.mixed_precision_bits!r}")
        budget, widths = self.mixed_precision_budget, self.mixed_precision_bits
        if budget is not None and (isinstance(budget, bool)
                                   or not isinstance(budget, (int, float))
                                   or not min(widths) <= budget <= max(widths)):
            raise ValueError(f"mixed_precision_budget must be an average width in "
                             f"[{min(widths)}, {max(widths)}] bits, got {budget!r}")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Where a run executes (:mod:`qjax.sharding`): ``mesh`` axis sizes, e.g.
    ``{"data": 2, "fsdp": 2, "tensor": 2}`` (None: one device), their axis types, and the
    :func:`jax.distributed.initialize` arguments of a multi-host run (one process per host)."""

    mesh: dict[str, int] | None = None
    mesh_axis_types: str = "explicit"
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self):
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


# The nested sections of a TrainConfig, by field name.
SECTIONS: dict[str, type] = {"model": LlamaConfig, "data": CorpusConfig, "optim": OptimConfig,
                             "quant": QuantConfig, "attention": AttentionConfig,
                             "method_options": MethodOptions, "parallel": ParallelConfig}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training program run needs, in sections (see :data:`SECTIONS`).

    ``model.max_seq_len`` is the training sequence length; ``data`` is the corpus
    (``CorpusConfig()``: the Python standard library's own sources). ``quant.method=None`` trains
    in float. With ``baseline=True`` the program first trains the same model in float on the same
    data, then the quantized one, and prints both in one table. ``init_from`` is the run directory
    of a float run of the same model sizes (or its ``ckpt/`` folder) that low-rank QAT, ZeroQAT,
    distillation and HAWQ-V2 start from. The rest says how the run is observed: evaluation
    every ``eval_every`` steps on ``eval_batches`` batches, checkpoints every
    ``checkpoint_every``, output in ``out_dir`` (default ``runs/<name>``), and ``stop_after``
    steps ends a run early (it resumes later).

    :func:`qjax.config.replace` changes fields by their short names (``replace(config, lr=1e-3,
    weight_bits=2, d_model=256)``); the training program's overrides take the same names or
    dotted paths (``optim.lr=1e-3``).
    """

    name: str = "quest_w4a4_tiny"
    model: LlamaConfig = LlamaConfig()
    data: CorpusConfig = CorpusConfig()
    optim: OptimConfig = OptimConfig()
    quant: QuantConfig = QuantConfig()
    attention: AttentionConfig = AttentionConfig()
    method_options: MethodOptions = MethodOptions()
    parallel: ParallelConfig = ParallelConfig()
    init_from: str | None = None
    baseline: bool = True
    eval_every: int = 100
    eval_batches: int = 16
    log_every: int = 10
    checkpoint_every: int = 100
    out_dir: str = ""
    stop_after: int | None = None

    def __post_init__(self):
        for name, kind in SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__}, "
                                f"got {type(getattr(self, name)).__name__}")
        _positive_ints(self, ("eval_every", "eval_batches", "log_every", "checkpoint_every"))
        if self.stop_after is not None and self.stop_after <= 0:
            raise ValueError(f"stop_after must be positive or None, got {self.stop_after}")
        if self.model.vocab_size != VOCAB_SIZE:
            raise ValueError(f"vocab_size must be {VOCAB_SIZE} (the corpus is bytes), "
                             f"got {self.model.vocab_size}")
        head = self.model.d_model // self.model.n_heads
        if self.attention.kv_group is not None and head % self.attention.kv_group:
            raise ValueError(f"kv_group ({self.attention.kv_group}) must divide the head size "
                             f"d_model / n_heads = {head}")
        self._check_method()

    def _check_method(self) -> None:
        q, m = self.quant, self.method_options
        # Also a float run's: its wsd schedule's decay starts where QAT would.
        if self.optim.qat_fraction == "optimal" and q.weight_bits is None:
            raise ValueError("qat_fraction='optimal' needs weight_bits: f* is a function of "
                             "S = tokens / (params * weight_bits / 8)")
        if q.method is None:  # a float run (also the baseline of a QAT run) reads no option
            return
        if m.distill > 0 and self.init_from is None:
            raise ValueError("distill > 0 distills the init_from float model into a quantized "
                             "one: set init_from")
        if m.edgeqat_entropy and self.attention.attn_bits is None:
            raise ValueError("edgeqat_entropy > 0 maximizes the entropy of the quantized queries "
                             "and keys: set attn_bits")
        pretrained = (*LOW_RANK_METHODS, "zeroqat")
        if q.method in pretrained and self.init_from is None:
            raise ValueError(f"method={q.method!r} fine-tunes a pretrained model: set init_from "
                             f"(a float run directory)")
        if q.method in pretrained and q.weight_bits is None:
            raise ValueError(f"method={q.method!r} needs weight_bits")
        if q.method in pretrained and self.parallel.mesh is not None:
            raise ValueError(f"method={q.method!r} runs on one device: mesh must be None")
        if q.method == "zeroqat" and m.distill > 0:
            raise ValueError("method='zeroqat' runs without distill")
        if q.method == "qalora" and m.phi_dtype != "float32":
            raise ValueError("phi_dtype is for method='lr_qat'")
        if m.mixed_precision_budget is not None:
            if q.method == "ofq":
                raise ValueError("method='ofq' tracks and anneals one weight width: "
                                 "mixed_precision_budget must be None")
            if q.method not in RECIPE_METHODS:
                raise ValueError(f"mixed_precision_budget allocates widths for method quest, "
                                 f"lsq, pact or ste, got method={q.method!r}")
            if not self.baseline and self.init_from is None:
                raise ValueError("mixed_precision_budget allocates on a float model: keep "
                                 "baseline=true or set init_from")
        if m.cga_boundary_range is not None and q.method != "ofq":
            raise ValueError(f"cga_boundary_range anneals StatsQ weights: it needs method='ofq', "
                             f"got method={q.method!r}")
        if q.method == "double_rounding":
            bits = m.double_rounding_bits
            if q.weight_bits != max(bits):
                raise ValueError(f"method='double_rounding' stores weight_bits = the highest of "
                                 f"double_rounding_bits {bits}, got weight_bits={q.weight_bits}")

    @property
    def run_dir(self) -> str:
        return self.out_dir or os.path.join("runs", self.name)
