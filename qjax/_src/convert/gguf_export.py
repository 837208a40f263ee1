"""GGUF export of serving params (llama.cpp's file format), with qjax's exact weight values.

Each tensor is written as:

* **Q8_0 / Q4_0**: a QArray trained with :func:`qjax.presets.gguf_q8_0` /
  :func:`~qjax.presets.gguf_q4_0` (serving layout ``(N, K)``, blocks of 32 along ``K``): its codes
  and float16 block scales are GGUF's own, repacked into GGUF blocks (``fp16 d`` then 32 int8
  codes; Q4_0 stores ``q + 8`` with code ``j`` in the low and ``j + 16`` in the high nibble of byte
  ``j``). gguf's dequantization ``d * q`` is qjax's ``q * scale``, bit for bit.
* **F32**: any other QArray, dequantized by qjax (so the values are again qjax's), and every float
  leaf.

With ``config`` (a :class:`~qjax.models.llama.LlamaConfig`), the params of the reference Llama
(:mod:`qjax.models.llama`) are written as a complete ``llama`` model: ``llama.*`` hyper-parameters,
a byte-level vocabulary of 256 tokens (``<0x00>`` ... ``<0xFF>``, SentencePiece byte tokens, no
space prefix, no BOS/EOS added), llama.cpp's tensor names, weights as ``(out, in)``, and the rows
of ``attn_q`` / ``attn_k`` permuted per head from the model's RoPE pairs ``(i, i + d/2)`` to
llama.cpp's ``(2i, 2i + 1)`` (the permutation of convert_hf_to_gguf.py's ``LlamaModel.permute``;
both use frequencies ``theta^(-2i/d)``). Without ``config`` the tensors keep their param paths as
names (``blocks_0.attn.q.kernel``) and their layouts.

Checks (ValueError naming what is wrong, before anything is written): QAT params (a
``kernel_scale`` leaf, or with ``model=`` a layer its rules quantize whose kernel is not a QArray:
convert them first); with ``config``, every tensor's shape against it (``n_layers`` blocks,
``d_model``, ``ffn_hidden``, ``vocab_size``) and that every leaf of the params is used (a leaf
llama.cpp would not read, e.g. a bias, an adapter or a learned ``input_scale``, is refused rather
than dropped). ``n_heads`` leaves no trace in the tensors (the projections are
``(d_model, d_model)`` for any head count): only LlamaConfig's own check applies (heads of an
even size that divide ``d_model``).

The file is written to a temporary path and renamed when complete; an existing ``path`` raises
``FileExistsError`` unless ``overwrite=True`` (:func:`qjax.convert.save`'s policy).

References:
  GGUF spec and gguf-py (``GGUFWriter``, ``gguf/constants.py``, ``gguf/quants.py``); llama.cpp
  ``convert_hf_to_gguf.py`` (``LlamaModel.permute``), ``ggml-quants.c`` (block_q8_0, block_q4_0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import gguf
import numpy as np

from qjax._src import presets
from qjax._src.convert.io import check_overwrite, flatten, write_atomically
from qjax._src.convert.weights import serving_layers
from qjax._src.models.llama import LlamaConfig
from qjax._src.qarray import QArray, relayout
from qjax._src.quantize import dequantize

__all__ = ["export_gguf", "gguf_tensor", "gguf_tensor_type", "file_type", "llama_tensors",
           "rope_permutation"]

_BLOCK = presets.GGUF_BLOCK
_QTYPES = {presets.gguf_q8_0(-1): gguf.GGMLQuantizationType.Q8_0,
           presets.gguf_q4_0(-1): gguf.GGMLQuantizationType.Q4_0}


def _blocks(w: QArray) -> tuple[np.ndarray, np.ndarray]:
    """(float16 scales ``(N, K/32)``, int codes ``(N, K/32, 32)``) of a GGUF-preset QArray."""
    n, k = w.shape
    d = np.asarray(w.scale, np.float32).reshape(n, k // _BLOCK).astype(np.float16)
    q = np.asarray(w.codes_float32()).astype(np.int32).reshape(n, k // _BLOCK, _BLOCK)
    return d, q


def gguf_tensor(a) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(data, type) of one tensor: raw Q8_0/Q4_0 blocks for GGUF-preset QArrays, else float32.

    Raw blocks are uint8 ``(N, K/32 * type_size)``; float32 arrays keep their shape.
    """
    if isinstance(a, QArray):
        qtype = _QTYPES.get(a.spec) if a.ndim == 2 and a.zero_point is None else None
        if qtype is None:
            return np.asarray(dequantize(a), np.float32), gguf.GGMLQuantizationType.F32
        d, q = _blocks(a)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            qs = q.astype(np.int8).view(np.uint8)
        else:
            u = (q + 8).astype(np.uint8)
            qs = u[..., : _BLOCK // 2] | (u[..., _BLOCK // 2 :] << np.uint8(4))
        raw = np.concatenate([d[..., None].view(np.uint8), qs], axis=-1)
        return raw.reshape(a.shape[0], -1), qtype
    return np.asarray(a, np.float32), gguf.GGMLQuantizationType.F32


def rope_permutation(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order taking per-head half-split RoPE pairs ``(i, i + hd/2)`` to ``(2i, 2i + 1)``.

    ``new_rows = old_rows[perm]``, as ``LlamaModel.permute`` in convert_hf_to_gguf.py.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    rows = np.arange(n_heads * head_dim)
    return rows.reshape(n_heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)


def _take_rows(a, perm: np.ndarray):
    if isinstance(a, QArray):
        a = relayout(a, k_major=False)  # rows of the (N, K) layout
        zp = None if a.zero_point is None else np.asarray(a.zero_point)[perm]
        return dataclasses.replace(a, codes=np.asarray(a.codes)[perm],
                                   scale=np.asarray(a.scale)[perm], zero_point=zp)
    return np.asarray(a)[perm]


def _out_in(node: Mapping, path: str, shape: tuple[int, int], used: set):
    """A Dense layer's weight as ``(out, in) = shape``: QArrays are stored so, float kernels
    transposed."""
    if not isinstance(node, Mapping) or "kernel" not in node:
        raise ValueError(f"params have no layer {path!r}: they do not match the Llama config")
    k = node["kernel"]
    used.add(f"{path}/kernel")
    if isinstance(k, QArray):
        if k.spec.hadamard_block is not None:
            raise ValueError(f"layer {path!r} is stored Hadamard-rotated; llama.cpp does not "
                             "rotate its inputs, so it cannot run this model")
        w = k
    else:
        w = np.asarray(k).T
    _check_shape(f"{path}/kernel (as (out, in))", w, shape)
    return w


def _check_shape(what: str, a, shape: tuple[int, ...]) -> None:
    got = tuple(a.shape) if isinstance(a, QArray) else tuple(np.shape(a))
    if got != tuple(shape):
        raise ValueError(f"{what} has shape {got}, the Llama config's is {tuple(shape)}: the "
                         "params do not match the config")


def _vector(node, path: str, key: str, shape: tuple[int, ...], used: set) -> np.ndarray:
    if not isinstance(node, Mapping) or key not in node:
        raise ValueError(f"params have no {path}/{key}: they do not match the Llama config")
    used.add(f"{path}/{key}")
    a = np.asarray(node[key])
    _check_shape(f"{path}/{key}", a, shape)
    return a


def llama_tensors(serving_params: Mapping, config: LlamaConfig) -> dict[str, object]:
    """llama.cpp tensor names -> QArray or array ``(out, in)`` for the reference Llama's params.

    Raises:
      ValueError: params that do not match ``config`` (a missing or extra block or leaf, a
        tensor of another shape; see the module docstring).
    """
    p = serving_params
    d, v, h = config.d_model, config.vocab_size, config.ffn_hidden
    perm = rope_permutation(config.n_heads, d // config.n_heads)
    used: set = set()
    blocks = {f"blocks_{i}" for i in range(config.n_layers)}
    extra = set(p) - {"embed", "final_norm", "lm_head"} - blocks
    if extra:
        raise ValueError(f"params have layers the Llama config does not: {sorted(extra)} "
                         f"(config.n_layers={config.n_layers})")
    missing = sorted(blocks - set(p))
    if missing:
        raise ValueError(f"params do not match the Llama config: missing {missing} "
                         f"(config.n_layers={config.n_layers})")
    out = {"token_embd.weight": _vector(p.get("embed"), "embed", "embedding", (v, d), used),
           "output_norm.weight": _vector(p.get("final_norm"), "final_norm", "scale", (d,), used),
           "output.weight": _out_in(p.get("lm_head"), "lm_head", (v, d), used)}
    for i in range(config.n_layers):
        name = f"blocks_{i}"
        b = p[name]
        pre = f"blk.{i}."
        attn, mlp = (b.get(k) if isinstance(b, Mapping) else None for k in ("attn", "mlp"))
        out[pre + "attn_norm.weight"] = _vector(b.get("attn_norm") if isinstance(
            b, Mapping) else None, f"{name}/attn_norm", "scale", (d,), used)
        out[pre + "ffn_norm.weight"] = _vector(b.get("mlp_norm") if isinstance(
            b, Mapping) else None, f"{name}/mlp_norm", "scale", (d,), used)
        for ours, theirs in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"),
                             ("o", "attn_output")):
            node = attn.get(ours) if isinstance(attn, Mapping) else None
            w = _out_in(node, f"{name}/attn/{ours}", (d, d), used)
            out[pre + theirs + ".weight"] = _take_rows(w, perm) if ours in "qk" else w
        for ours, shape in (("gate", (h, d)), ("up", (h, d)), ("down", (d, h))):
            node = mlp.get(ours) if isinstance(mlp, Mapping) else None
            out[pre + f"ffn_{ours}.weight"] = _out_in(node, f"{name}/mlp/{ours}", shape, used)
    unused = sorted(set(flatten(p)) - {"/" + u for u in used})
    if unused:
        raise ValueError(f"params have leaves a llama.cpp llama model does not read: {unused} "
                         "(they would be dropped)")
    return out


def _llama_metadata(w: gguf.GGUFWriter, config: LlamaConfig) -> None:
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.d_model)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.ffn_hidden)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_heads)
    w.add_rope_dimension_count(config.d_model // config.n_heads)
    w.add_rope_freq_base(float(config.rope_theta))
    w.add_layer_norm_rms_eps(float(config.norm_eps))
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<0x{i:02X}>" for i in range(256)])
    w.add_token_scores([0.0] * 256)
    w.add_token_types([gguf.TokenType.BYTE] * 256)
    w.add_unk_token_id(0)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)


def _check_converted(serving_params: Mapping, model) -> None:
    """QAT params are refused: a ``kernel_scale`` leaf anywhere, or with ``model`` (a
    QuantizedLinenModel or rules) a layer it quantizes whose kernel is not a QArray."""
    scales = [k for k in flatten(serving_params) if k.rsplit("/", 1)[-1] == "kernel_scale"]
    if scales:
        raise ValueError(f"params have a kernel_scale ({scales[0]}): these are QAT params; "
                         "convert them with qjax.convert.convert first")
    if model is None:
        return
    for path, site in serving_layers(model, serving_params).items():
        if site.recipe.weight is None:
            continue
        node = serving_params
        for key in site.keys:
            node = node.get(key) if isinstance(node, Mapping) else None
        kernel = node.get(site.param) if isinstance(node, Mapping) else None
        if not isinstance(kernel, QArray):
            raise ValueError(f"layer {path!r}: the model quantizes it but its kernel is not a "
                             "QArray; convert the params with qjax.convert.convert first")


def export_gguf(serving_params: Mapping, path: str, config: LlamaConfig | None = None, *,
                name: str = "qjax", model=None, overwrite: bool = False) -> None:
    """Writes ``serving_params`` to the GGUF file ``path`` (see the module docstring).

    Args:
      serving_params: the output of :func:`qjax.convert.convert`.
      path: the file to write (atomically).
      config: the reference Llama's config, to write a llama.cpp ``llama`` model; None writes the
        tensors under their param paths (architecture ``qjax``).
      name: ``general.name``.
      model: optional, the :class:`~qjax.nn.QuantizedLinenModel` (or rules) the params were
        converted with: every layer it quantizes must hold a QArray (float kernels there are
        unconverted QAT params, which would be written as F32).
      overwrite: replace an existing ``path`` (a file or a directory); False raises.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      ValueError: QAT params, params that do not match ``config``, or Hadamard-rotated weights
        for llama (module docstring).
    """
    if not isinstance(serving_params, Mapping):
        raise TypeError(f"serving_params must be a mapping, got {type(serving_params).__name__}")
    if config is not None and not isinstance(config, LlamaConfig):
        raise TypeError(f"config must be a LlamaConfig or None, got {type(config).__name__}")
    if config is not None and config.vocab_size != 256:
        raise ValueError(f"the byte-level vocabulary has 256 tokens; config.vocab_size is "
                         f"{config.vocab_size}")
    path = check_overwrite(path, overwrite)
    _check_converted(serving_params, model)
    tensors = (llama_tensors(serving_params, config) if config is not None
               else flatten(serving_params, sep="."))

    def write(tmp):
        w = gguf.GGUFWriter(tmp, "llama" if config is not None else "qjax")
        w.add_name(name)
        if config is not None:
            _llama_metadata(w, config)
            w.add_file_type(file_type(tensors))
        for tname, a in tensors.items():
            data, qtype = gguf_tensor(a)
            w.add_tensor(tname, data, raw_dtype=None if qtype == gguf.GGMLQuantizationType.F32
                         else qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    write_atomically(path, write, overwrite=overwrite)


def file_type(tensors: Mapping[str, object]) -> int:
    """llama.cpp's ``general.file_type``: the type of most block weights."""
    kinds = [gguf_tensor_type(a) for n, a in tensors.items() if n.startswith("blk.")]
    q4 = kinds.count(gguf.GGMLQuantizationType.Q4_0)
    q8 = kinds.count(gguf.GGMLQuantizationType.Q8_0)
    if q4 and q4 >= q8:
        return gguf.LlamaFileType.MOSTLY_Q4_0
    if q8:
        return gguf.LlamaFileType.MOSTLY_Q8_0
    return gguf.LlamaFileType.ALL_F32


def gguf_tensor_type(a) -> gguf.GGMLQuantizationType:
    """The GGUF type :func:`gguf_tensor` writes ``a`` as."""
    if isinstance(a, QArray) and a.ndim == 2 and a.zero_point is None and a.spec in _QTYPES:
        return _QTYPES[a.spec]
    return gguf.GGMLQuantizationType.F32
