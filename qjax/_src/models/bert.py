"""Implementation of :mod:`qjax.models.bert` (documented there)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax._src._checks import check_pos_int, check_real
from qjax._src.nn.recipe import Method

__all__ = [
    "BertConfig", "Bert", "MINILM_L6", "BERT_LINEARS", "AUXILIARY_TENSORS", "quantization_rules",
    "mean_pool", "l2_normalize", "tensor_map", "bert_from_tensors", "bert_tensors",
    "load_bert_safetensors",
]

#: Paths of the linear layers inside the blocks (``nnx.iter_modules`` paths joined by ``/``).
BERT_LINEARS = r"layers/\d+/(attention/(query|key|value|output)|intermediate|output)"

#: Tensors of a ``BertModel`` file that the encoder does not use: the ``position_ids`` buffer
#: (checked to be ``arange``) and the ``[CLS]`` pooler (sentence-transformers mean-pools instead).
#: Each may be absent; if present its shape is checked.
AUXILIARY_TENSORS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Sizes of the encoder; the defaults are all-MiniLM-L6-v2's (22.7M parameters).

    ``hidden`` is the FFN width (Hugging Face ``intermediate_size``), ``max_seq_len`` the number
    of position embeddings, ``type_vocab_size`` the number of token types (segments).
    """

    vocab_size: int = 30522
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 12
    hidden: int = 1536
    max_seq_len: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "hidden", "max_seq_len",
                     "type_vocab_size"):
            check_pos_int(name, getattr(self, name))
        check_real("norm_eps", self.norm_eps, 0.0, low_open=True)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads})")

    @classmethod
    def from_hf(cls, hf: Mapping) -> BertConfig:
        """From a Hugging Face ``config.json`` dict of a ``BertModel``.

        Raises:
          ValueError: ``model_type`` is not ``"bert"``, ``hidden_act`` not ``"gelu"`` (exact) or
            ``position_embedding_type`` not ``"absolute"`` (what this encoder implements).
        """
        if not isinstance(hf, Mapping):
            raise TypeError(f"hf must be a mapping (config.json), got {type(hf).__name__}")
        for key, allowed in (("model_type", "bert"), ("hidden_act", "gelu"),
                             ("position_embedding_type", "absolute")):
            if hf.get(key, allowed) != allowed:
                raise ValueError(f"config.json {key}={hf[key]!r} is not supported; allowed: "
                                 f"{allowed!r}")
        try:
            return cls(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                       n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                       hidden=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
                       type_vocab_size=hf.get("type_vocab_size", 2),
                       norm_eps=hf.get("layer_norm_eps", 1e-12))
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None


#: all-MiniLM-L6-v2 (``nreimers/MiniLM-L6-H384-uncased`` fine-tuned by sentence-transformers).
MINILM_L6 = BertConfig()


def _layer_norm(d: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # torch's LayerNorm centres before squaring; E[x^2] - E[x]^2 would not match it at eps 1e-12.
    return nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, rngs=rngs)


class BertEmbeddings(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs):
        self.word = nnx.Embed(c.vocab_size, c.d_model, rngs=rngs)
        self.position = nnx.Embed(c.max_seq_len, c.d_model, rngs=rngs)
        self.token_type = nnx.Embed(c.type_vocab_size, c.d_model, rngs=rngs)
        self.norm = _layer_norm(c.d_model, c.norm_eps, rngs)

    def __call__(self, ids: jax.Array, token_types: jax.Array) -> jax.Array:
        pos = jnp.arange(ids.shape[-1])
        return self.norm(self.word(ids) + self.position(pos)[None] + self.token_type(token_types))


class BertAttention(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs):
        d = c.d_model
        self.n_heads = c.n_heads
        self.query = nnx.Linear(d, d, rngs=rngs)
        self.key = nnx.Linear(d, d, rngs=rngs)
        self.value = nnx.Linear(d, d, rngs=rngs)
        self.output = nnx.Linear(d, d, rngs=rngs)
        self.norm = _layer_norm(d, c.norm_eps, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, d = x.shape
        hd = d // self.n_heads
        split = lambda y: y.reshape(b, t, self.n_heads, hd)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        # Padded keys get the lowest float: exp underflows to exactly 0, as with Hugging Face's
        # additive finfo.min mask.
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return self.norm(x + self.output(out))


class BertLayer(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs):
        self.attention = BertAttention(c, rngs)
        self.intermediate = nnx.Linear(c.d_model, c.hidden, rngs=rngs)
        self.output = nnx.Linear(c.hidden, c.d_model, rngs=rngs)
        self.norm = _layer_norm(c.d_model, c.norm_eps, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.attention(x, mask)
        return self.norm(x + self.output(jax.nn.gelu(self.intermediate(x), approximate=False)))


def mean_pool(h: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of token states over unmasked positions: ``sum_t m_t h_t / max(sum_t m_t, 1e-9)``.

    Args:
      h: ``(batch, seq, d)`` float token states.
      mask: ``(batch, seq)`` attention mask (nonzero / True for real tokens).

    Returns:
      ``(batch, d)`` in ``h.dtype``; an all-padding row gives zeros.

    References: Reimers & Gurevych 2019 (sentence-transformers ``Pooling``, mean mode).
    """
    if h.ndim < 2 or mask.shape != h.shape[:-1]:
        raise ValueError(f"mask shape {mask.shape} must be h's shape {h.shape} without the "
                         "feature axis")
    m = mask.astype(h.dtype)[..., None]
    return jnp.sum(h * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, eps)`` along the last axis (torch ``F.normalize``); zeros stay zeros."""
    check_real("eps", eps, 0.0, low_open=True)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class Bert(nnx.Module):
    """BERT encoder with mean pooling and L2 normalization (see the module docstring).

    ``model(ids, mask, token_types=None)`` with ``ids (batch, seq)`` integer token ids, ``mask
    (batch, seq)`` the attention mask (1 for tokens, 0 for padding) and ``token_types`` the
    segment ids (zeros when None) returns the unit-norm sentence embeddings ``(batch, d_model)``
    float32; :meth:`token_states` returns the last layer's ``(batch, seq, d_model)``.
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a BertConfig, got {type(config).__name__}")
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs)
        self.layers = nnx.List([BertLayer(config, rngs) for _ in range(config.n_layers)])

    def token_states(self, ids: jax.Array, mask: jax.Array,
                     token_types: jax.Array | None = None) -> jax.Array:
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"ids must be a (batch, seq) integer array, got {ids.dtype} "
                             f"{ids.shape}")
        if mask.shape != ids.shape:
            raise ValueError(f"mask shape {mask.shape} must equal ids shape {ids.shape}")
        if ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        if token_types is None:
            token_types = jnp.zeros_like(ids)
        elif token_types.shape != ids.shape:
            raise ValueError(f"token_types shape {token_types.shape} must equal ids shape "
                             f"{ids.shape}")
        keep = mask.astype(bool)
        h = self.embeddings(ids, token_types)
        for layer in self.layers:
            h = layer(h, keep)
        return h

    def __call__(self, ids: jax.Array, mask: jax.Array,
                 token_types: jax.Array | None = None) -> jax.Array:
        return l2_normalize(mean_pool(self.token_states(ids, mask, token_types), mask))


def quantization_rules(method: Method | str | None) -> dict:
    """Rules for :func:`qjax.nn.quantize_model`: every linear layer in the blocks gets
    ``method`` (a Method, a method name or a LayerQuant); embeddings and norms stay float."""
    return {} if method is None else {BERT_LINEARS: method}


# --- Hugging Face BertModel tensors -------------------------------------------------------------

def tensor_map(config: BertConfig) -> dict[str, tuple[tuple, tuple[int, ...], bool]]:
    """Hugging Face tensor name -> ``(state path, shape in the file, transposed)``.

    ``transposed`` marks linear weights, stored ``(out, in)`` by torch and ``(in, out)`` as
    ``nnx.Linear`` kernels. The map covers every parameter of :class:`Bert` exactly once;
    :data:`AUXILIARY_TENSORS` are not in it.
    """
    if not isinstance(config, BertConfig):
        raise TypeError(f"config must be a BertConfig, got {type(config).__name__}")
    c = config
    d, f = c.d_model, c.hidden
    out = {}

    def norm(hf, path):
        out[f"{hf}.weight"] = (path + ("scale",), (d,), False)
        out[f"{hf}.bias"] = (path + ("bias",), (d,), False)

    def linear(hf, path, n_in, n_out):
        out[f"{hf}.weight"] = (path + ("kernel",), (n_out, n_in), True)
        out[f"{hf}.bias"] = (path + ("bias",), (n_out,), False)

    for hf, name, rows in (("word", "word", c.vocab_size), ("position", "position", c.max_seq_len),
                           ("token_type", "token_type", c.type_vocab_size)):
        out[f"embeddings.{hf}_embeddings.weight"] = (("embeddings", name, "embedding"), (rows, d),
                                                     False)
    norm("embeddings.LayerNorm", ("embeddings", "norm"))
    for i in range(c.n_layers):
        hf, path = f"encoder.layer.{i}", ("layers", i)
        for p in ("query", "key", "value"):
            linear(f"{hf}.attention.self.{p}", path + ("attention", p), d, d)
        linear(f"{hf}.attention.output.dense", path + ("attention", "output"), d, d)
        norm(f"{hf}.attention.output.LayerNorm", path + ("attention", "norm"))
        linear(f"{hf}.intermediate.dense", path + ("intermediate",), d, f)
        linear(f"{hf}.output.dense", path + ("output",), f, d)
        norm(f"{hf}.output.LayerNorm", path + ("norm",))
    return out


def _names(names, limit: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def _check_auxiliary(tensors: Mapping[str, np.ndarray], config: BertConfig) -> None:
    d, n = config.d_model, config.max_seq_len
    expected = {"embeddings.position_ids": ((1, n), (n,)), "pooler.dense.weight": ((d, d),),
                "pooler.dense.bias": ((d,),)}
    for name, shapes in expected.items():
        if name not in tensors:
            continue
        t = tensors[name]
        if tuple(t.shape) not in shapes:
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected "
                             f"{' or '.join(map(str, shapes))}")
        if name == "embeddings.position_ids" and not np.array_equal(
                np.asarray(t).reshape(-1), np.arange(n)):
            raise ValueError(f"tensor {name!r} is not arange({n}): this encoder uses absolute "
                             "positions 0..seq-1")


def bert_from_tensors(tensors: Mapping[str, np.ndarray], config: BertConfig) -> Bert:
    """A :class:`Bert` whose parameters are ``tensors`` (Hugging Face ``BertModel`` names).

    Every tensor must be used exactly once: each name of :func:`tensor_map` present with its
    shape and a floating dtype (cast to float32), plus optionally :data:`AUXILIARY_TENSORS`.

    Raises:
      ValueError: naming the tensors that are missing or unexpected (e.g. a file of another
        architecture, or a ``bert.``-prefixed checkpoint), or a tensor of the wrong shape or
        dtype.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of names to arrays, got "
                        f"{type(tensors).__name__}")
    mapping = tensor_map(config)
    missing = set(mapping) - set(tensors)
    unexpected = set(tensors) - set(mapping) - set(AUXILIARY_TENSORS)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {_names(unexpected)}")
        raise ValueError("not a Hugging Face BertModel checkpoint of " f"{config}: "
                         + "; ".join(parts))
    _check_auxiliary(tensors, config)
    pure: dict = {}
    for name, (path, shape, transposed) in mapping.items():
        t = np.asarray(tensors[name])
        if tuple(t.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if not np.issubdtype(t.dtype, np.floating) and t.dtype.name != "bfloat16":
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, expected a float dtype")
        node = pure
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray((t.T if transposed else t).astype(np.float32))
    abstract = nnx.eval_shape(lambda: Bert(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def bert_tensors(model: Bert) -> dict[str, np.ndarray]:
    """The inverse of :func:`bert_from_tensors`: a float :class:`Bert`'s parameters under their
    Hugging Face names (float32, linear weights ``(out, in)``), e.g. for ``safetensors``.

    Raises:
      ValueError: the model has quantized layers (export the float model before
        :func:`qjax.nn.quantize_model`).
    """
    if not isinstance(model, Bert):
        raise TypeError(f"model must be a Bert, got {type(model).__name__}")
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out = {}
    for name, (path, _, transposed) in tensor_map(model.config).items():
        node = pure
        try:
            for key in path:
                node = node[key]
        except KeyError:
            raise ValueError(f"parameter {'/'.join(map(str, path))} not found: bert_tensors "
                             "takes a float Bert (not one after quantize_model)") from None
        t = np.asarray(node, np.float32)
        out[name] = np.ascontiguousarray(t.T if transposed else t)
    return out


def load_bert_safetensors(source: str | os.PathLike | bytes, config: BertConfig) -> Bert:
    """Loads a Hugging Face ``BertModel`` ``.safetensors`` file (a path, or the file's bytes)
    with ``safetensors``' numpy reader; see :func:`bert_from_tensors` for the checks.

    Raises:
      ModuleNotFoundError: ``safetensors`` is not installed (``pip install "safetensors>=0.4"``,
        part of the ``models`` extra).
    """
    try:
        from safetensors import numpy as stnp
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError('loading safetensors files needs safetensors (in the optional '
                                  '"models" extra): pip install "safetensors>=0.4"',
                                  name=e.name) from e
    if isinstance(source, bytes):
        tensors = stnp.load(source)
    elif isinstance(source, (str, os.PathLike)):
        tensors = stnp.load_file(os.fspath(source))
    else:
        raise TypeError(f"source must be a path or bytes, got {type(source).__name__}")
    return bert_from_tensors(tensors, config)
