"""Implementation of :mod:`qjax.attention` (documented there)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qjax._src import granularity as G
from qjax._src._checks import check_bool, check_int
from qjax._src.qarray import QArray
from qjax._src.quantize import dequantize, fake_quant, quantize
from qjax._src.spec import QuantSpec, check_spec

__all__ = ["quantized_attention", "kv_cache_spec", "AttentionQuant", "attention_quant",
           "KVCache", "init_kv_cache", "append_kv", "cached_attention", "kv_cache_bytes"]


def _check_qkv(q, k, v) -> tuple[int, int]:
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not hasattr(a, "ndim") or a.ndim != 4:
            raise ValueError(f"{name} must be (batch, length, heads, head_dim), got "
                             f"{getattr(a, 'shape', type(a).__name__)}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must be a real floating array, got {a.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {k.shape} and {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"the heads of k and v ({k.shape[2]}) must divide the heads of q "
                         f"({q.shape[2]})")
    return q.shape[1], k.shape[1]


def _fq(x, spec, name: str):
    spec = check_spec(spec, name, optional=True)
    return x.astype(jnp.float32) if spec is None else fake_quant(x.astype(jnp.float32), spec)


def _attend(qf, kf, vf, *, spec_p, mask, causal: bool, scale: float | None
            ) -> tuple[jax.Array, jax.Array]:
    """Softmax attention of float32 ``qf (B,T,H,D)`` over ``kf, vf (B,S,Hk,D)``, and the scaled
    logits ``(B,H,T,S)`` before masking."""
    t, s = qf.shape[1], kf.shape[1]
    rep = qf.shape[2] // kf.shape[2]
    if rep > 1:  # grouped-query attention: each key head serves `rep` query heads
        kf, vf = jnp.repeat(kf, rep, axis=2), jnp.repeat(vf, rep, axis=2)
    d = qf.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    logits = jnp.einsum("bthd,bshd->bhts", qf, kf, precision="highest") * scale
    allowed = jnp.ones((t, s), bool)
    if causal:
        allowed = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t)
    if mask is not None:
        allowed = allowed & jnp.asarray(mask, bool)
    scores = jnp.where(allowed, logits, -jnp.inf)
    # A row with nothing allowed gives zeros, not NaN.
    top = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.where(allowed, jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    p = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    p = _fq(p, spec_p, "spec_p")
    return jnp.einsum("bhts,bshd->bthd", p, vf, precision="highest"), logits


def quantized_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        spec_q: QuantSpec | None = None, spec_k: QuantSpec | None = None,
                        spec_v: QuantSpec | None = None, spec_p: QuantSpec | None = None,
                        mask: jax.Array | None = None, causal: bool = False,
                        scale: float | None = None, return_logits: bool = False
                        ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention with fake-quantized Q, K, V and probabilities (see the module docstring).

    Args:
      q: ``(B, T, H, D)`` floating; k, v: ``(B, S, Hk, D)``, ``Hk`` dividing ``H``.
      spec_q, spec_k, spec_v: specs applied to the ``(B, length, heads, D)`` arrays, e.g.
        ``QuantSpec("int8", PerAxis((0, 1, 2)))`` per token and head, or
        ``kv_cache_spec(4, 32)``; None leaves the operand in float.
      spec_p: spec of the probabilities ``(B, H, T, S)``, e.g. ``QuantSpec("uint8", "row")``.
      mask: bool, broadcastable to ``(B, H, T, S)``, True where attention is allowed.
      causal: also mask keys after each query (aligned to the end of the keys).
      scale: the score scale (default ``1 / sqrt(D)``).
      return_logits: also return the scaled logits ``S = fq(q) fq(k)^T * scale``, float32
        ``(B, H, T, S)``, before masking (what EdgeQAT's attention-map loss compares).

    Returns:
      ``(B, T, H, D)`` in ``q``'s dtype (and the logits with ``return_logits``); gradients
      follow each spec's estimator.
    """
    _check_qkv(q, k, v)
    out, logits = _attend(_fq(q, spec_q, "spec_q"), _fq(k, spec_k, "spec_k"),
                          _fq(v, spec_v, "spec_v"), spec_p=spec_p, mask=mask, causal=causal,
                          scale=scale)
    return (out.astype(q.dtype), logits) if check_bool("return_logits", return_logits) \
        else out.astype(q.dtype)


def kv_cache_spec(bits: int, group: int | None = None) -> QuantSpec:
    """Signed absmax ``int<bits>`` per token and head, per group of ``group`` channels of the
    head dimension (None: the whole head), round to nearest: the KV cache's (and its QAT's)
    spec for ``(B, S, H, D)`` keys and values."""
    bits = check_int("bits", bits)
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8 for a KV cache, got {bits}")
    gran = G.PerRow(-1) if group is None else G.PerGroup(-1, check_int("group", group, lo=1))
    return QuantSpec(f"int{bits}", gran)


@dataclasses.dataclass(frozen=True)
class AttentionQuant:
    """How a model's attention is quantized: specs of Q, K, V ``(B, length, heads, D)`` and of
    the probabilities ``(B, H, T, S)``; None leaves that operand in float.

    A model with a KV cache stores keys and values with ``k``'s spec (:attr:`cache_spec`), so a
    quantized cache needs ``k == v``; decoding then computes what QAT with these specs computed.
    """

    q: QuantSpec | None = None
    k: QuantSpec | None = None
    v: QuantSpec | None = None
    p: QuantSpec | None = None

    def __post_init__(self):
        for name in ("q", "k", "v", "p"):
            check_spec(getattr(self, name), name, optional=True)

    @property
    def cache_spec(self) -> QuantSpec | None:
        """The spec a KV cache stores keys and values with (:func:`init_kv_cache`)."""
        if self.k != self.v:
            raise ValueError(f"a KV cache stores keys and values with one spec: k ({self.k}) and "
                             f"v ({self.v}) differ")
        return self.k


def attention_quant(bits: int | None = 8, prob_bits: int | None = 8, kv_bits: int | None = None,
                    kv_group: int | None = None) -> AttentionQuant:
    """The usual attention recipe: Q, K, V signed absmax ``int<bits>`` per token and head (None:
    float); probabilities unsigned ``uint<prob_bits>`` per query row (absmax, so the row's
    largest probability is a level; None: float); with ``kv_bits``, K and V use
    :func:`kv_cache_spec` ``(kv_bits, kv_group)`` instead (the spec of the served cache).

    Raises:
      ValueError: a bit width outside 2..8 (``kv_bits``: 2, 4 or 8), a bad group.

    References:
      Shen et al., 2024 (EdgeQAT: quantized Q, K, attention map and KV cache).
    """
    def per_token(b, name):
        if b is None:
            return None
        return QuantSpec(f"int{check_int(name, b, lo=2, hi=8)}", G.PerRow(-1))

    q = per_token(bits, "bits")
    kv = kv_cache_spec(kv_bits, kv_group) if kv_bits is not None else q
    p = None if prob_bits is None else QuantSpec(
        f"uint{check_int('prob_bits', prob_bits, lo=2, hi=8)}", G.PerRow(-1))
    return AttentionQuant(q=q, k=kv, v=kv, p=p)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of ``length`` tokens in buffers of ``capacity`` tokens.

    ``k``/``v``: float arrays ``(B, capacity, Hk, D)``, or :class:`~qjax.QArray` of that shape
    (codes and scales) when the cache is quantized; ``length``: int32 scalar.
    """

    k: jax.Array | QArray
    v: jax.Array | QArray
    length: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[1]


def init_kv_cache(batch: int, capacity: int, heads: int, head_dim: int, *,
                  spec: QuantSpec | None = None, dtype=jnp.float32) -> KVCache:
    """An empty cache; with ``spec`` (e.g. :func:`kv_cache_spec`) keys and values are stored
    quantized (the group must divide ``head_dim``)."""
    for name, n in (("batch", batch), ("capacity", capacity), ("heads", heads),
                    ("head_dim", head_dim)):
        check_int(name, n, lo=1)
    zeros = jnp.zeros((batch, capacity, heads, head_dim), dtype)
    spec = check_spec(spec, "spec", optional=True)
    buf = zeros if spec is None else quantize(zeros, spec)
    return KVCache(buf, buf, jnp.zeros((), jnp.int32))


def _write(buf, new, start):
    if isinstance(buf, QArray):
        q = quantize(new, buf.spec)
        codes = jax.lax.dynamic_update_slice_in_dim(buf.codes, q.codes, start, axis=1)
        scale = jax.lax.dynamic_update_slice_in_dim(buf.scale, q.scale, start, axis=1)
        return dataclasses.replace(buf, codes=codes, scale=scale)
    return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start, axis=1)


def append_kv(cache: KVCache, k_new: jax.Array, v_new: jax.Array) -> KVCache:
    """The cache with ``T`` new tokens ``(B, T, Hk, D)`` written at ``cache.length``.

    Raises:
      ValueError: the shapes do not fit the cache, or (when the length is known, i.e. not
        traced) the tokens would run past its capacity.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    if k_new.shape != v_new.shape or k_new.ndim != 4 or k_new.shape[0] != cache.k.shape[0] \
            or k_new.shape[2:] != cache.k.shape[2:]:
        raise ValueError(f"k_new and v_new must be (batch, T, heads, head_dim) matching the "
                         f"cache {cache.k.shape}, got {k_new.shape} and {v_new.shape}")
    t = k_new.shape[1]
    if t > cache.capacity:
        raise ValueError(f"{t} new tokens exceed the cache capacity {cache.capacity}")
    try:
        held = int(cache.length)
    except jax.errors.ConcretizationTypeError:  # traced (inside jit): cannot be checked here
        held = None
    if held is not None and held + t > cache.capacity:
        raise ValueError(f"the cache holds {held} of {cache.capacity} tokens: "
                         f"{t} more do not fit; allocate a longer cache")
    return KVCache(_write(cache.k, k_new, cache.length), _write(cache.v, v_new, cache.length),
                   cache.length + t)


def _read(buf) -> jax.Array:
    return dequantize(buf).astype(jnp.float32) if isinstance(buf, QArray) else \
        buf.astype(jnp.float32)


def cached_attention(q: jax.Array, cache: KVCache, *, spec_q: QuantSpec | None = None,
                     spec_p: QuantSpec | None = None, scale: float | None = None) -> jax.Array:
    """Causal attention of the ``T`` newest queries ``(B, T, H, D)`` over the cache (which
    already holds their keys and values, :func:`append_kv`): query ``t`` sees cache positions
    ``< length - T + t + 1``; positions past ``length`` are masked."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    kf, vf = _read(cache.k), _read(cache.v)
    _check_qkv(q, kf, vf)
    t, s = q.shape[1], cache.capacity
    first = cache.length - t  # absolute position of the first query
    allowed = jnp.arange(s)[None, :] <= first + jnp.arange(t)[:, None]
    out, _ = _attend(_fq(q, spec_q, "spec_q"), kf, vf, spec_p=spec_p, mask=allowed,
                     causal=False, scale=scale)
    return out.astype(q.dtype)


def kv_cache_bytes(cache: KVCache) -> int:
    """Bytes of the keys and values buffers (codes and scales for a quantized cache)."""
    return sum(b.nbytes if isinstance(b, QArray) else int(b.size * b.dtype.itemsize)
               for b in (cache.k, cache.v))
