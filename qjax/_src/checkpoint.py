"""Implementation of :mod:`qjax.checkpoint` (documented there)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Mapping

import jax
import orbax.checkpoint as ocp

from qjax._src.atomic_files import file_crc32, write_json_atomically

__all__ = ["RunDirError", "TrainingCheckpoints", "check_run_dir", "write_manifest", "verify_step",
           "MANIFEST", "RUN_FILE"]

MANIFEST = "qjax_manifest.json"
RUN_FILE = "run.json"


class RunDirError(ValueError):
    """A run directory that cannot be resumed as asked (other config, no intact checkpoint)."""


def _step_files(step_dir: str) -> list[str]:
    files = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != MANIFEST:
                files.append(rel)
    return sorted(files)


def write_manifest(step_dir: str) -> dict:
    """Writes ``step_dir/qjax_manifest.json``: ``{relative path: [size, crc32]}`` of every file."""
    if not os.path.isdir(step_dir):
        raise FileNotFoundError(f"step_dir {step_dir!r} is not a directory")
    files = {}
    for rel in _step_files(step_dir):
        path = os.path.join(step_dir, rel)
        files[rel] = [os.path.getsize(path), file_crc32(path)]
    manifest = {"format": 1, "files": files}
    write_json_atomically(os.path.join(step_dir, MANIFEST), manifest)
    return manifest


def verify_step(step_dir: str) -> str | None:
    """None if every file of the step matches its manifest, else the first reason it does not
    (no manifest, a missing file, a size or CRC-32 mismatch), naming the file."""
    path = os.path.join(step_dir, MANIFEST)
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return "no manifest (written before it finished?)"
    except (ValueError, KeyError, TypeError):
        return f"unreadable manifest {MANIFEST}"
    for rel, (size, crc) in sorted(files.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return f"file {rel} is missing"
        if os.path.getsize(full) != size:
            return f"file {rel} has {os.path.getsize(full)} bytes, expected {size}"
        if file_crc32(full) != crc:
            return f"file {rel} fails its CRC-32 check"
    return None


def _diff(recorded: Mapping, wanted: Mapping, defaults: Mapping, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(recorded) | set(wanted)):
        a, b = recorded.get(key, "<unset>"), wanted.get(key, "<unset>")
        default = defaults.get(key, "<unset>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff(a, b, default if isinstance(default, Mapping) else {},
                         f"{prefix}{key}.")
        elif a != b and not (key not in recorded and b == default):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _rename(recorded: Mapping, renamed: Mapping) -> dict:
    out = {}
    for key, value in recorded.items():
        sub = renamed.get(key)
        if isinstance(sub, Mapping) and isinstance(value, Mapping):
            value = _rename(value, sub)
        out[sub if isinstance(sub, str) else key] = value
    return out


def check_run_dir(run_dir: str, identity: Mapping, *, write: bool = True,
                  defaults: Mapping | None = None, renamed: Mapping | None = None) -> None:
    """Refuses ``run_dir`` if it holds a run of another identity; records ``identity`` otherwise.

    ``identity`` is a JSON-able mapping (e.g. :func:`qjax._src.config_keys.run_identity` plus
    the corpus fingerprint). A directory without ``run.json`` but with checkpoints or results
    was written by an older qjax or by hand: refused too, since what it is a run of is unknown.
    ``defaults`` (shaped like ``identity``) holds the default of each field: a field that a
    recorded identity lacks (it was added to qjax after the run) and that ``identity`` sets to
    its default is no difference, so runs of an older release resume. ``renamed`` (shaped like
    ``identity``, with ``{old name: new name}`` where names changed) reads a recorded identity's
    old names as the new ones.

    Raises:
      RunDirError: naming every differing field (``field: recorded -> wanted``).
    """
    identity = json.loads(json.dumps(identity))  # tuples -> lists, as read back from disk
    path = os.path.join(run_dir, RUN_FILE)
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        recorded = _rename(recorded, renamed or {})
        diff = _diff(recorded, identity, json.loads(json.dumps(defaults or {})))
        if diff:
            raise RunDirError(
                f"{run_dir} holds a run of another config ({'; '.join(diff)}): use another "
                f"out_dir (or name), or delete the directory to retrain")
        return
    stale = [n for n in ("ckpt", "done.json", "metrics.jsonl")
             if os.path.exists(os.path.join(run_dir, n))]
    if stale:
        raise RunDirError(f"{run_dir} holds {', '.join(stale)} but no {RUN_FILE} saying what it "
                          f"is a run of (an older qjax?): use another out_dir, or delete it")
    if write:
        os.makedirs(run_dir, exist_ok=True)
        write_json_atomically(path, identity)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class TrainingCheckpoints:
    """Orbax checkpoints of one run with manifests, resumed from the newest intact step.

    Args:
      directory: the ``ckpt`` folder of a run directory.
      max_to_keep: Orbax's retention (older steps are deleted with their manifests).
      lead: whether this process writes manifests and moves corrupt steps aside (process 0);
        every process verifies.
      log: where one-line notices go (default: stderr).
    """

    def __init__(self, directory: str, *, max_to_keep: int | None = 2, lead: bool = True,
                 create: bool = True, log: Callable[[str], None] = _say):
        self.directory = os.path.abspath(directory)
        self.lead, self.log, self.max_to_keep, self.create = lead, log, max_to_keep, create
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=self.max_to_keep, create=self.create))

    def steps(self) -> list[int]:
        """The saved steps (after the save in progress completes)."""
        self.wait()
        return sorted(self._manager.all_steps())

    def latest_intact_step(self, *, move_aside: bool = True) -> int | None:
        """The newest step whose files match its manifest, or None if there is none.

        Newer steps that fail verification are reported and (with ``move_aside``, by the lead
        process) moved to ``<run>/ckpt_corrupt/<step>-<n>`` so that training can write them
        again; other processes wait for the move.
        """
        corrupt = []
        intact = None
        for step in reversed(self.steps()):
            reason = verify_step(os.path.join(self.directory, str(step)))
            if reason is None:
                intact = step
                break
            corrupt.append((step, reason))
        for step, reason in corrupt:
            self.log(f"checkpoint step {step} in {self.directory} is not intact ({reason}); "
                     + (f"resuming from step {intact}" if intact is not None
                        else "no intact step: starting from step 0"))
        if corrupt and move_aside:
            if self.lead:
                aside = os.path.join(os.path.dirname(self.directory), "ckpt_corrupt")
                os.makedirs(aside, exist_ok=True)
                for step, _ in corrupt:
                    n = sum(1 for e in os.listdir(aside) if e.split("-")[0] == str(step))
                    shutil.move(os.path.join(self.directory, str(step)),
                                os.path.join(aside, f"{step}-{n}"))
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("qjax_checkpoint_move_aside")
            self._manager.close()
            self._manager = self._open()
        return intact

    def save(self, step: int, state) -> None:
        """Starts saving ``state`` (a pytree) at ``step`` and returns while it is written.

        Orbax writes the arrays in the background; a helper thread waits for it and then writes
        the manifest (a CRC-32 of every file), so training goes on meanwhile. The next
        :meth:`save`, :meth:`wait` and :meth:`close` wait for it first (and re-raise its error).
        A process killed before the manifest exists leaves a step that is not intact: resuming
        falls back to the previous one, which the next save waits for (so with ``max_to_keep >=
        2`` an intact step always remains).
        """
        self.wait()
        self._manager.save(step, args=ocp.args.StandardSave(state))
        self._pending = threading.Thread(target=self._finish, args=(step,), daemon=True,
                                         name=f"qjax-checkpoint-{step}")
        self._pending.start()

    def _finish(self, step: int) -> None:
        try:
            self._manager.wait_until_finished()
            if self.lead:
                write_manifest(os.path.join(self.directory, str(step)))
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Waits for the save in progress (arrays and manifest); re-raises its error."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def restore(self, step: int, like):
        """The state saved at ``step``, shaped (and sharded) like ``like``.

        Raises:
          RunDirError: the checkpoint does not fit ``like`` (another model or optimizer).
        """
        self.wait()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise RunDirError(f"checkpoint step {step} in {self.directory} does not fit this "
                              f"run's model and optimizer ({first})") from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()
