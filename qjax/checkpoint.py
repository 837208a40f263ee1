"""Training checkpoints you can trust: run identity and per-file integrity on top of Orbax.

A run directory records what it is a run *of* (``run.json``: the config fields and corpus
fingerprint that determine its results, the run identity); resuming it
under
anything else is refused with one line naming the differing fields (:func:`check_run_dir`), so a
rerun under new overrides never prints or continues the old run.

Each checkpoint step written through :class:`TrainingCheckpoints` carries a manifest
(``<step>/qjax_manifest.json``: size and CRC-32 of every file Orbax wrote), written after Orbax
has finalized the step. On resume the newest step whose files all match is used; newer steps
that do not match (a flipped bit, a truncated file, a kill between Orbax's rename and the
manifest) are moved aside to ``<run>/ckpt_corrupt/`` with one line saying so, and the run
continues from the intact step, recomputing the rest (batches are a pure function of the step).
"""

from qjax._src.checkpoint import (
    RunDirError,
    TrainingCheckpoints,
    check_run_dir,
    verify_step,
)

__all__ = [
    "check_run_dir",
    "RunDirError",
    "TrainingCheckpoints",
    "verify_step",
]
