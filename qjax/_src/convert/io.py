"""Serving params on disk (Orbax) and the serving forward as a StableHLO artifact (jax.export).

Serving params hold :class:`~qjax.QArray` leaves whose spec is static metadata. On disk (and as
the exported function's argument) they are plain arrays: each QArray becomes
``{"codes", "scale"[, "zero_point"]}`` (:func:`to_arrays`); :func:`from_arrays` rebuilds the
QArrays from a template with the same structure (e.g. freshly converted params, or
``jax.eval_shape`` of the conversion).

A checkpoint directory holds ``arrays/`` (an Orbax PyTree checkpoint of the plain arrays) and
``manifest.json`` (format tag, every leaf's path, shape, dtype and CRC-32, and each QArray's
spec). :func:`save` writes everything into a temporary sibling directory and renames it into place
only when complete, so a crash never leaves a half-written checkpoint; :func:`restore` checks the
manifest, the arrays and their checksums and raises ``ValueError`` on a corrupt or truncated one.

One overwrite policy for every writer (:func:`save`, :func:`export_serving`,
:func:`qjax.convert.export_gguf`): an ``overwrite: bool = False`` keyword; an existing ``path`` (a
file or a directory) raises ``FileExistsError`` unless ``overwrite=True``, which replaces it,
whatever its kind, with the complete new one (:func:`write_atomically`): nothing else is left
behind.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from qjax._src.atomic_files import check_overwrite, check_path, write_atomically
from qjax._src.convert.serve import serve
from qjax._src.nn.rewrite import QuantizedLinenModel
from qjax._src.qarray import QArray

__all__ = ["to_arrays", "from_arrays", "save", "restore", "directory_bytes", "export_serving",
           "load_exported"]

FORMAT = "qjax-serving-v1"
_QFIELDS = ("codes", "scale", "zero_point")


def to_arrays(serving_params: Mapping) -> dict:
    """Nested dict of arrays: each QArray as ``{"codes", "scale"[, "zero_point"]}``."""
    if isinstance(serving_params, QArray):
        return {f: getattr(serving_params, f) for f in _QFIELDS
                if getattr(serving_params, f) is not None}
    if isinstance(serving_params, Mapping):
        return {str(k): to_arrays(v) for k, v in serving_params.items()}
    return serving_params


def from_arrays(arrays: Mapping, like: Mapping, _path: str = "") -> dict:
    """Inverse of :func:`to_arrays`, with the QArray metadata (spec, shape, dtype, packed,
    k_major) of ``like``.

    Raises:
      ValueError: if the structure, a shape or a QArray field's dtype differs from ``like``'s
        (e.g. float codes, which ``dequantize`` cannot unpack).
    """
    if isinstance(like, QArray):
        if not isinstance(arrays, Mapping) or "codes" not in arrays:
            raise ValueError(f"{_path!r}: expected a packed QArray, got a plain array")
        fields = {f: arrays.get(f) for f in _QFIELDS}
        for f in _QFIELDS:
            want = getattr(like, f)
            got = fields[f]
            if (want is None) != (got is None) or (
                    want is not None and tuple(np.shape(got)) != tuple(want.shape)):
                raise ValueError(f"{_path}/{f}: shape {np.shape(got)} does not match the model's "
                                 f"{None if want is None else tuple(want.shape)}")
            # Stored codes are int8/uint8 (or fp8) by format: another dtype would not decode.
            if want is not None and _dtype(got) != np.dtype(want.dtype):
                raise ValueError(f"{_path}/{f}: dtype {_dtype(got)} does not match the model's "
                                 f"{np.dtype(want.dtype)}")
        return QArray(spec=like.spec, shape=like.shape, dtype=like.dtype, packed=like.packed,
                      k_major=like.k_major, **fields)
    if isinstance(like, Mapping):
        if not isinstance(arrays, Mapping) or set(map(str, like)) != set(arrays):
            got = sorted(arrays) if isinstance(arrays, Mapping) else "an array"
            raise ValueError(f"{_path or '/'}: keys {got} do not match the model's "
                             f"{sorted(map(str, like))}")
        return {k: from_arrays(arrays[str(k)], v, f"{_path}/{k}") for k, v in like.items()}
    if tuple(np.shape(arrays)) != tuple(np.shape(like)):
        raise ValueError(f"{_path}: shape {np.shape(arrays)} does not match the model's "
                         f"{np.shape(like)}")
    return arrays


def _dtype(a) -> np.dtype:
    """dtype of an array, a tracer (under ``jax.export``) or a nested list."""
    return np.dtype(a.dtype) if hasattr(a, "dtype") else np.asarray(a).dtype


def flatten(tree: Mapping, sep: str = "/", prefix: str = "") -> dict[str, object]:
    """``{"<sep>a<sep>b": leaf}`` for a nested dict (QArrays are leaves); ``prefix`` starts keys."""
    out = {}
    for k, v in tree.items():
        p = f"{prefix}{sep}{k}" if prefix or sep == "/" else str(k)
        out.update(flatten(v, sep, p) if isinstance(v, Mapping) else {p: v})
    return out


def _crc(a) -> int:
    return zlib.crc32(np.ascontiguousarray(np.asarray(a)).tobytes())


def _manifest(serving_params: Mapping) -> dict:
    leaves = {p: {"shape": list(np.shape(a)), "dtype": str(np.asarray(a).dtype), "crc32": _crc(a)}
              for p, a in flatten(to_arrays(serving_params)).items()}
    return {"format": FORMAT, "leaves": leaves, "qarrays": _manifest_qarrays(serving_params)}


def directory_bytes(path: str) -> int:
    """Total size of the files under ``path`` (0 if it does not exist)."""
    check_path(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _as_tree(serving):
    """Serving params as a nested dict: an NNX serving model's state as a pure dict."""
    if isinstance(serving, nnx.Module):
        return nnx.to_pure_dict(nnx.state(serving))
    return serving


def save(path: str, serving_params, *, overwrite: bool = False) -> int:
    """Writes serving params (or an NNX serving model's state) to the directory ``path``
    atomically; returns its size in bytes.

    ``overwrite=True`` replaces whatever ``path`` holds, a checkpoint, another directory or a file
    (see the module docstring).

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      TypeError: ``path`` is not a path, ``serving_params`` not a mapping, ``overwrite`` not a
        bool (a truthy string such as ``"no"`` must not replace a checkpoint).
    """
    serving_params = _as_tree(serving_params)
    if not isinstance(serving_params, Mapping):
        raise TypeError(f"serving_params must be a mapping or an NNX serving model, got "
                        f"{type(serving_params).__name__}")
    path = check_overwrite(path, overwrite)

    def write(tmp):
        os.makedirs(tmp)
        arrays = jax.tree_util.tree_map(np.asarray, to_arrays(serving_params))
        ocp.PyTreeCheckpointer().save(os.path.join(tmp, "arrays"), arrays)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(_manifest(serving_params), f)

    write_atomically(path, write, overwrite=overwrite)
    return directory_bytes(path)


def _unflatten(flat: dict[str, object]) -> dict:
    out: dict = {}
    for p, a in flat.items():
        node = out
        keys = p.strip("/").split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = a
    return out


def restore(path: str, like=None):
    """Reads a checkpoint written by :func:`save`.

    Args:
      path: the checkpoint directory.
      like: serving params (or their ``jax.eval_shape``) of the same model: rebuilds QArrays; or
        an NNX serving model of the same model (e.g. ``convert`` of a freshly initialized one):
        returns a copy of it holding the restored state. If None, returns the plain arrays
        (enough for :func:`load_exported`'s function).

    Raises:
      FileNotFoundError: no directory at ``path``.
      ValueError: not a qjax serving checkpoint, corrupt or truncated, or not matching ``like``.
    """
    check_path(path)
    if isinstance(like, nnx.Module):
        graphdef, state = nnx.split(like)
        nnx.replace_by_pure_dict(state, restore(path, nnx.to_pure_dict(state)))
        return nnx.merge(graphdef, state)
    if like is not None and not isinstance(like, Mapping):
        raise TypeError(f"like must be a mapping of serving params, an NNX serving model or "
                        f"None, got {type(like).__name__}")
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no serving checkpoint at {path}")
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a complete qjax serving checkpoint (manifest.json: "
                         f"{e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: manifest format is not {FORMAT!r}")
    try:
        arrays = ocp.PyTreeCheckpointer().restore(os.path.join(path, "arrays"))
        flat = {p: np.asarray(a) for p, a in flatten(arrays).items()}
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types on bad files
        raise ValueError(f"{path}: the arrays are corrupt or truncated ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    want = manifest["leaves"]
    if set(flat) != set(want):
        raise ValueError(f"{path}: arrays {sorted(set(flat) ^ set(want))} are missing or extra")
    for p, meta in want.items():
        a = flat[p]
        if list(a.shape) != meta["shape"] or str(a.dtype) != meta["dtype"] or _crc(a) != meta[
                "crc32"]:
            raise ValueError(f"{path}: array {p} is corrupt (shape, dtype or checksum differs "
                             "from the manifest)")
    plain = _unflatten(flat)
    if like is None:
        return plain

    def identity(qarrays: dict) -> dict:
        return {p: {**m, "spec": spec_identity(m["spec"])} for p, m in qarrays.items()}

    if identity(_manifest_qarrays(like)) != identity(manifest["qarrays"]):
        raise ValueError(f"{path}: the quantized layers or specs differ from the model's")
    return from_arrays(plain, like)


# QuantSpec's field names before they were made to mean one thing each (manifests written then):
# ``scale`` (the rule), ``hadamard`` (the block), ``Trust.clip``.
_SPEC_RENAMES = ((re.compile(r"\bscale=(?=[A-Z])"), "scale_rule="),
                 (re.compile(r"\bhadamard=(?=\d|None)"), "hadamard_block="),
                 (re.compile(r"(Trust\(multiplier=[^,]+, )clip="), r"\1clip_ratio="))
_HADAMARD_METHOD = re.compile(r", hadamard_method='\w+'")


def spec_identity(text: str) -> str:
    """A QuantSpec repr (from a manifest or ``repr``) in today's field names, without the Hadamard
    method: the methods compute the same rotation (to float rounding), so a checkpoint written
    with one loads into a model whose specs use another (the default moved from ``"matmul"`` to
    ``"kronecker"``); the model's method rotates the activations."""
    if "scale_rule=" not in text:
        for pattern, new in _SPEC_RENAMES:
            text = pattern.sub(new, text)
    return _HADAMARD_METHOD.sub("", text)


def _manifest_qarrays(like: Mapping) -> dict:
    out = {}

    def walk(t, prefix=""):
        for k, v in t.items():
            if isinstance(v, QArray):
                out[f"{prefix}/{k}"] = {"shape": list(v.shape), "dtype": v.dtype,
                                        "packed": v.packed, "k_major": v.k_major,
                                        "spec": repr(v.spec)}
            elif isinstance(v, Mapping):
                walk(v, f"{prefix}/{k}")

    walk(like)
    return out


def _struct(a):
    return jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype if not hasattr(a, "dtype")
                                else a.dtype)


def export_serving(model, *args, path: str | None = None, backend: str = "xla",
                   overwrite: bool = False) -> bytes:
    """Serializes the serving forward to StableHLO (``jax.export``) for the shapes of the inputs.

    * Linen: ``export_serving(model, serving_params, *inputs)``;
    * NNX: ``export_serving(serving_model, *inputs)``.

    The exported function takes ``(to_arrays(serving_params), *inputs)`` (NNX: the arrays of the
    serving model's state as a pure dict): plain arrays, so it runs without qjax
    (``jax.export.deserialize(data).call(arrays, *inputs)``).

    Returns:
      The serialized artifact; also written atomically to ``path`` if given.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False (checked before exporting;
        ``overwrite=True`` replaces a file or directory there, see the module docstring).
      TypeError: a bad ``model``, ``path`` or ``overwrite``.
    """
    if path is not None:
        path = check_overwrite(path, overwrite)
    elif not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool (True or False), got {overwrite!r}")
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        like = nnx.to_pure_dict(state)

        def forward(arrays, *a):
            s = nnx.clone(state)
            nnx.replace_by_pure_dict(s, from_arrays(arrays, like))
            return serve(nnx.merge(graphdef, s), *a, backend=backend)
    elif isinstance(model, QuantizedLinenModel):
        if not args or not isinstance(args[0], Mapping):
            raise TypeError("export_serving(model, serving_params, *inputs): serving_params must "
                            "be a mapping")
        like, args = args[0], args[1:]

        def forward(arrays, *a):
            return serve(model, from_arrays(arrays, like), *a, backend=backend)
    else:
        raise TypeError(f"model must be a qjax.nn.QuantizedLinenModel or an NNX serving model, "
                        f"got {type(model).__name__}")
    arrays = to_arrays(like)
    exported = jax.export.export(jax.jit(forward))(
        jax.tree_util.tree_map(_struct, arrays), *jax.tree_util.tree_map(_struct, args))
    data = bytes(exported.serialize())
    if path is not None:
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)

        write_atomically(path, write, overwrite=overwrite)
    return data


def load_exported(source: str | bytes) -> Callable:
    """The exported serving forward: ``f(arrays, *args)``, from a path or serialized bytes.

    Raises:
      ValueError: if the artifact cannot be deserialized (corrupt or truncated).
    """
    if isinstance(source, str):
        with open(source, "rb") as f:
            source = f.read()
    if not isinstance(source, (bytes, bytearray)):
        raise TypeError(f"source must be a path or bytes, got {type(source).__name__}")
    try:
        exported = jax.export.deserialize(bytearray(source))
    except Exception as e:  # noqa: BLE001 - flatbuffers raise various types on bad input
        raise ValueError(f"not a valid jax.export artifact ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    return exported.call
