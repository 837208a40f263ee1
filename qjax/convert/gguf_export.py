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

The file is written to a temporary path and renamed when complete.

References:
  GGUF spec and gguf-py (``GGUFWriter``, ``gguf/constants.py``, ``gguf/quants.py``); llama.cpp
  ``convert_hf_to_gguf.py`` (``LlamaModel.permute``), ``ggml-quants.c`` (block_q8_0, block_q4_0).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping

import gguf
import numpy as np

from qjax import presets
from qjax.convert.io import flatten
from qjax.models.llama import LlamaConfig
from qjax.qarray import QArray
from qjax.quantize import dequantize

__all__ = ["export_gguf", "gguf_tensor", "llama_tensors", "rope_permutation"]

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
        zp = None if a.zero_point is None else np.asarray(a.zero_point)[perm]
        return QArray(np.asarray(a.codes)[perm], np.asarray(a.scale)[perm], zp, a.spec, a.shape,
                      a.dtype)
    return np.asarray(a)[perm]


def _out_in(node: Mapping, path: str):
    """A Dense layer's weight as ``(out, in)``: QArrays are stored so, float kernels transposed."""
    if not isinstance(node, Mapping) or "kernel" not in node:
        raise ValueError(f"params have no layer {path!r}: they do not match the Llama config")
    k = node["kernel"]
    if isinstance(k, QArray):
        if k.spec.hadamard is not None:
            raise ValueError(f"layer {path!r} is stored Hadamard-rotated; llama.cpp does not "
                             "rotate its inputs, so it cannot run this model")
        return k
    return np.asarray(k).T


def llama_tensors(serving_params: Mapping, config: LlamaConfig) -> dict[str, object]:
    """llama.cpp tensor names -> QArray or array ``(out, in)`` for the reference Llama's params."""
    p = serving_params
    hd = config.d_model // config.n_heads
    perm = rope_permutation(config.n_heads, hd)
    try:
        out = {"token_embd.weight": np.asarray(p["embed"]["embedding"]),
               "output_norm.weight": np.asarray(p["final_norm"]["scale"]),
               "output.weight": _out_in(p["lm_head"], "lm_head")}
        for i in range(config.n_layers):
            b = p[f"blocks_{i}"]
            pre = f"blk.{i}."
            out[pre + "attn_norm.weight"] = np.asarray(b["attn_norm"]["scale"])
            out[pre + "ffn_norm.weight"] = np.asarray(b["mlp_norm"]["scale"])
            for ours, theirs in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"),
                                 ("o", "attn_output")):
                w = _out_in(b["attn"][ours], f"blocks_{i}/attn/{ours}")
                out[pre + theirs + ".weight"] = _take_rows(w, perm) if ours in "qk" else w
            for ours in ("gate", "up", "down"):
                out[pre + f"ffn_{ours}.weight"] = _out_in(b["mlp"][ours], f"blocks_{i}/mlp/{ours}")
    except (KeyError, TypeError) as e:
        raise ValueError(f"params do not match the Llama config: missing {e}") from None
    if out["token_embd.weight"].shape != (config.vocab_size, config.d_model):
        raise ValueError(f"embedding shape {out['token_embd.weight'].shape} does not match the "
                         f"config ({config.vocab_size}, {config.d_model})")
    extra = set(p) - {"embed", "final_norm", "lm_head"} - {
        f"blocks_{i}" for i in range(config.n_layers)}
    if extra:
        raise ValueError(f"params have layers the Llama config does not: {sorted(extra)}")
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
    if config.vocab_size != 256:
        raise ValueError(f"the byte-level vocabulary has 256 tokens; config.vocab_size is "
                         f"{config.vocab_size}")
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


def export_gguf(serving_params: Mapping, path: str, config: LlamaConfig | None = None, *,
                name: str = "qjax") -> None:
    """Writes ``serving_params`` to the GGUF file ``path`` (see the module docstring).

    Args:
      serving_params: the output of :func:`qjax.convert.convert`.
      path: the file to write (replaced atomically).
      config: the reference Llama's config, to write a llama.cpp ``llama`` model; None writes the
        tensors under their param paths (architecture ``qjax``).
      name: ``general.name``.

    Raises:
      ValueError: params that do not match ``config``, or Hadamard-rotated weights for llama.
    """
    if not isinstance(serving_params, Mapping):
        raise TypeError(f"serving_params must be a mapping, got {type(serving_params).__name__}")
    if config is not None and not isinstance(config, LlamaConfig):
        raise TypeError(f"config must be a LlamaConfig or None, got {type(config).__name__}")
    tensors = (llama_tensors(serving_params, config) if config is not None
               else flatten(serving_params, sep="."))
    path = os.path.abspath(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        w = gguf.GGUFWriter(tmp, "llama" if config is not None else "qjax")
        w.add_name(name)
        if config is not None:
            _llama_metadata(w, config)
            w.add_file_type(_file_type(tensors))
        for tname, a in tensors.items():
            data, qtype = gguf_tensor(a)
            w.add_tensor(tname, data, raw_dtype=None if qtype == gguf.GGMLQuantizationType.F32
                         else qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _file_type(tensors: dict[str, object]) -> int:
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
