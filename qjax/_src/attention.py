"""Implementation of :mod:`qjax.attention` (documented there)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qjax._src import granularity as G
from qjax._src._checks import check_bool, check_int, check_real
from qjax._src.qarray import QArray
from qjax._src.quantize import dequantize, fake_quant, quantize
from qjax._src.spec import QuantSpec, check_spec

__all__ = ["quantized_attention", "attention_logits", "attend", "kv_cache_spec",
           "AttentionQuant", "attention_quant", "KVCache", "init_kv_cache", "append_kv",
           "cached_attention", "kv_cache_bytes"]


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


def _repeat_heads(x: jax.Array, heads: int) -> jax.Array:
    """``x (B, S, Hk, D)`` with each head repeated to ``heads`` (grouped-query attention)."""
    rep = heads // x.shape[2]
    return jnp.repeat(x, rep, axis=2) if rep > 1 else x


def attention_logits(q: jax.Array, k: jax.Array, *, scale: float | None = None) -> jax.Array:
    """The scaled logits ``S = q k^T * scale``, float32 ``(B, H, T, S)``, before any mask.

    Args:
      q: ``(B, T, H, D)`` floating (already fake-quantized, if it is to be); k: ``(B, S, Hk, D)``,
        ``Hk`` dividing ``H`` (each key head serves ``H / Hk`` query heads).
      scale: default ``1 / sqrt(D)``.
    """
    _check_qkv(q, k, k)
    d = q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kf = _repeat_heads(k.astype(jnp.float32), q.shape[2])
    return jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kf, precision="highest") * scale


def attend(logits: jax.Array, v: jax.Array, *, spec_p: QuantSpec | None = None,
           mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
    """Softmax attention of ``logits (B, H, T, S)`` (:func:`attention_logits`) over the values
    ``v (B, S, Hk, D)``: ``O = fq_p(softmax(S + mask)) v``, float32 ``(B, T, H, D)``.

    ``mask`` (bool, broadcastable to ``(B, H, T, S)``, True = attend) and ``causal`` as in
    :func:`quantized_attention`; a row with nothing allowed gives zeros, not NaN.
    """
    if not hasattr(logits, "ndim") or logits.ndim != 4:
        raise ValueError(f"logits must be (batch, heads, T, S), got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    b, h, t, s = logits.shape
    if not hasattr(v, "ndim") or v.ndim != 4 or v.shape[0] != b or v.shape[1] != s \
            or h % v.shape[2]:
        raise ValueError(f"v must be (batch, S, heads dividing {h}, head_dim) for logits "
                         f"{logits.shape}, got {getattr(v, 'shape', type(v).__name__)}")
    allowed = jnp.ones((t, s), bool)
    if check_bool("causal", causal):
        allowed = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t)
    if mask is not None:
        allowed = allowed & jnp.asarray(mask, bool)
    scores = jnp.where(allowed, logits.astype(jnp.float32), -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.where(allowed, jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    p = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    p = _fq(p, spec_p, "spec_p")
    vf = _repeat_heads(v.astype(jnp.float32), h)
    return jnp.einsum("bhts,bshd->bthd", p, vf, precision="highest")


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
    logits = attention_logits(_fq(q, spec_q, "spec_q"), _fq(k, spec_k, "spec_k"), scale=scale)
    out = attend(logits, _fq(v, spec_v, "spec_v"), spec_p=spec_p, mask=mask, causal=causal)
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

    Token-adaptive widths (EdgeQAT): with ``low_fraction > 0`` the ``floor(low_fraction * T)``
    least important tokens of each sequence (:func:`qjax.methods.edgeqat.low_bit_tokens` of
    :func:`~qjax.methods.edgeqat.token_importance`) use ``q_low``, ``k_low``, ``v_low`` instead
    of ``q``, ``k``, ``v``. A model applies them as the authors' code does: a layer's V with the
    tokens its own logits rank lowest, its Q and K with the previous layer's (the first layer's Q
    and K at the high width); :class:`qjax.models.Llama` does. Each low spec goes with its high
    one (both None or both set), and both must quantize tokens on their own (per token, head or
    group; checked when applied).

    A model with a KV cache stores keys and values with ``k``'s spec (:attr:`cache_spec`), so a
    quantized cache needs ``k == v``; decoding then computes what QAT with these specs computed.
    Token-adaptive widths have no cache: a token's width depends on its rank among the whole
    sequence's tokens, later ones included, which decoding does not know yet.
    """

    q: QuantSpec | None = None
    k: QuantSpec | None = None
    v: QuantSpec | None = None
    p: QuantSpec | None = None
    q_low: QuantSpec | None = None
    k_low: QuantSpec | None = None
    v_low: QuantSpec | None = None
    low_fraction: float = 0.0

    def __post_init__(self):
        for name in ("q", "k", "v", "p", "q_low", "k_low", "v_low"):
            check_spec(getattr(self, name), name, optional=True)
        check_real("low_fraction", self.low_fraction, 0.0, 1.0)
        for name in ("q", "k", "v"):
            high, low = getattr(self, name), getattr(self, name + "_low")
            if (high is None) != (low is None) and (self.low_fraction > 0 or low is not None):
                raise ValueError(f"{name}_low goes with {name}: set both or neither (got "
                                 f"{name}={high}, {name}_low={low})")
        if self.low_fraction > 0 and self.q_low is None and self.k_low is None \
                and self.v_low is None:
            raise ValueError("low_fraction > 0 needs the low-width specs q_low, k_low, v_low")

    @property
    def token_adaptive(self) -> bool:
        """Whether some tokens use the low-width specs."""
        return self.low_fraction > 0

    @property
    def cache_spec(self) -> QuantSpec | None:
        """The spec a KV cache stores keys and values with (:func:`init_kv_cache`)."""
        if self.token_adaptive:
            raise ValueError("token-adaptive attention widths (low_fraction > 0) cannot be "
                             "cached: a token's width depends on its rank among the whole "
                             "sequence; decode with a uniform AttentionQuant")
        if self.k != self.v:
            raise ValueError(f"a KV cache stores keys and values with one spec: k ({self.k}) and "
                             f"v ({self.v}) differ")
        return self.k


def attention_quant(bits: int | None = 8, prob_bits: int | None = 8, kv_bits: int | None = None,
                    kv_group: int | None = None, *, low_bits: int | None = None,
                    low_fraction: float = 0.5) -> AttentionQuant:
    """The usual attention recipe: Q, K, V signed absmax ``int<bits>`` per token and head (None:
    float); probabilities unsigned ``uint<prob_bits>`` per query row (absmax, so the row's
    largest probability is a level; None: float); with ``kv_bits``, K and V use
    :func:`kv_cache_spec` ``(kv_bits, kv_group)`` instead (the spec of the served cache).

    ``low_bits``: EdgeQAT's token-adaptive widths (:class:`AttentionQuant`): the
    ``low_fraction`` least important tokens take ``int<low_bits>`` for Q, K and V (K and V per
    ``kv_group`` when ``kv_bits`` is set), below the widths of the others (the authors: 8 and 4,
    half the tokens).

    Raises:
      ValueError: a bit width outside 2..8 (``kv_bits``: 2, 4 or 8), a bad group, ``low_bits``
        without a quantized Q, K or V or not below their widths, ``low_fraction`` outside
        ``(0, 1]`` with ``low_bits``.

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
    if low_bits is None:
        return AttentionQuant(q=q, k=kv, v=kv, p=p)
    low_bits = check_int("low_bits", low_bits, lo=2, hi=7)
    widths = [b for b in (bits, kv_bits if kv_bits is not None else bits) if b is not None]
    if not widths or low_bits >= min(widths):
        raise ValueError(f"low_bits ({low_bits}) must be below the widths of Q, K and V "
                         f"(bits={bits}, kv_bits={kv_bits})")
    check_real("low_fraction", low_fraction, 0.0, 1.0, low_open=True)
    kv_low = None if kv is None else (
        QuantSpec(f"int{low_bits}", kv.granularity) if kv_bits is not None
        else per_token(low_bits, "low_bits"))
    return AttentionQuant(q=q, k=kv, v=kv, p=p, q_low=per_token(low_bits, "low_bits")
                          if q is not None else None, k_low=kv_low, v_low=kv_low,
                          low_fraction=low_fraction)


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
    out = attend(attention_logits(_fq(q, spec_q, "spec_q"), kf, scale=scale), vf,
                 spec_p=spec_p, mask=allowed)
    return out.astype(q.dtype)


def kv_cache_bytes(cache: KVCache) -> int:
    """Bytes of the keys and values buffers (codes and scales for a quantized cache)."""
    return sum(b.nbytes if isinstance(b, QArray) else int(b.size * b.dtype.itemsize)
               for b in (cache.k, cache.v))
