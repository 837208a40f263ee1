"""Files written atomically and checked by CRC-32: the one low-level helper every writer uses.

Training checkpoints (:mod:`qjax.checkpoint`: manifests, ``run.json``, ``metrics.jsonl``) and
serving artifacts (:mod:`qjax.convert`: Orbax directories, StableHLO, GGUF) are written to a
temporary sibling and moved into place only when complete (:func:`write_atomically`), so a kill
leaves the old content or the new one, never half of one, and nothing else behind.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib
from collections.abc import Callable

__all__ = ["check_overwrite", "check_path", "file_crc32", "replace_path", "write_atomically",
           "write_json_atomically", "write_text_atomically"]

_CHUNK = 1 << 22


def file_crc32(path: str) -> int:
    """CRC-32 (``zlib.crc32``) of a file's bytes, read in 4 MiB chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def check_path(path: object, name: str = "path") -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")


def check_overwrite(path: object, overwrite: object) -> str:
    """The absolute ``path`` to write, after the writers' shared checks (module docstring).

    Raises:
      TypeError: ``path`` not a str or os.PathLike, ``overwrite`` not a bool (a truthy string such
        as ``"no"`` must not replace a file).
      FileExistsError: ``path`` exists (a file, a directory or a broken link) and ``overwrite``
        is False.
    """
    check_path(path)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool (True or False), got {overwrite!r}")
    path = os.path.abspath(path)
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    return path


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def replace_path(tmp: str, path: str) -> None:
    """Moves the complete ``tmp`` (a file or directory) to ``path``, replacing what is there.

    A file over a file (or nothing) is one atomic ``os.replace``. Otherwise (a directory on either
    side) the old ``path`` is renamed aside, ``tmp`` renamed in and the old one removed: ``path``
    holds the old or the new content, except between the two renames, and if the second rename
    fails the old one is put back. Nothing but ``path`` remains.
    """
    if not os.path.lexists(path) or not (os.path.isdir(tmp) or os.path.isdir(path)):
        os.replace(tmp, path)
        return
    old = f"{path}.old-{uuid.uuid4().hex}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    remove_path(old)


def write_atomically(path: str, write: Callable[[str], None], *, overwrite: bool) -> None:
    """``write(tmp)`` to a temporary sibling ``tmp`` of ``path`` (a file or a directory), then
    moves it to ``path``; the temporary is removed if anything fails.

    Call :func:`check_overwrite` first (before the work); this checks again just before the move,
    so a ``path`` that appeared meanwhile is not replaced unless ``overwrite``. Replacing a file
    with a file is one atomic ``os.replace``. Otherwise (a directory on either side) the old
    ``path`` is renamed aside, the new one renamed in and the old one removed: ``path`` holds the
    old or the new content except between the two renames, and the old one is put back if the
    second rename fails. Nothing but ``path`` remains.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        write(tmp)
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        replace_path(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            remove_path(tmp)
        raise


def write_text_atomically(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` (replacing it), flushed to disk before the rename."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_atomically(str(path), write, overwrite=True)


def write_json_atomically(path: str, obj) -> None:
    """:func:`write_text_atomically` of ``obj`` as indented JSON with sorted keys."""
    write_text_atomically(path, json.dumps(obj, indent=1, sort_keys=True))
