"""Implementation of :mod:`qjax.models.llama` (documented there)."""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qjax._src import typed_sharding
from qjax._src._checks import check_finite_positive, check_int
from qjax._src.attention import (
    AttentionQuant,
    KVCache,
    append_kv,
    attend,
    attention_logits,
    cached_attention,
    init_kv_cache,
)
from qjax._src.methods import edgeqat
from qjax._src.nn.ops import qat_active
from qjax._src.nn.recipe import Method
from qjax._src.quantize import fake_quant

__all__ = [
    "LlamaConfig", "Llama", "quantization_rules", "non_embedding_params", "BLOCK_LINEARS",
    "init_caches", "greedy_generate", "PARTITION_RULES",
]

#: Paths of the linear layers inside the blocks: ``blocks_<i>/attn/{q,k,v,o}``,
#: ``blocks_<i>/mlp/{gate,up,down}``.
BLOCK_LINEARS = r"blocks_\d+/(attn/[qkvo]|mlp/(gate|up|down))"


#: Partition rules of :class:`Llama` for :func:`qjax.sharding.param_specs` (q/k/v/gate/up
#: column-parallel, o/down row-parallel; the LM head and the embedding split over ``fsdp`` only,
#: so the logits keep the whole vocabulary for the loss).
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"blocks_\d+/(attn/[qkv]|mlp/(gate|up))/kernel", P("fsdp", "tensor")),
    (r"blocks_\d+/(attn/o|mlp/down)/kernel", P("tensor", "fsdp")),
    (r"lm_head/kernel", P("fsdp", None)),
    (r"embed/embedding", P(None, "fsdp")),
    (r".*norm/scale", P()),
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes of the decoder. ``hidden`` defaults to ``round_up(8/3 * d_model, hidden_multiple)``."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    hidden: int | None = None
    hidden_multiple: int = 256
    max_seq_len: int = 256
    rope_theta: float = 1e4
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len",
                     "hidden_multiple", "hidden"):
            v = getattr(self, name)
            if name == "hidden" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            check_finite_positive(name, getattr(self, name))
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads of even "
                "size"
            )

    @property
    def ffn_hidden(self) -> int:
        if self.hidden is not None:
            return self.hidden
        m = self.hidden_multiple
        return int(math.ceil(8 * self.d_model / 3 / m) * m)


def _rope(x: jax.Array, theta: float, positions: jax.Array | None = None) -> jax.Array:
    """Rotary embedding of ``x (batch, seq, heads, head_dim)``, pairs (i, i + head_dim/2), at
    ``positions (seq,)`` (default ``0..seq-1``)."""
    _, t, _, d = x.shape
    pos = jnp.arange(t, dtype=jnp.float32) if positions is None else positions.astype(
        jnp.float32)
    freqs = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2 / d)
    angles = pos[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class Embed(nn.Embed):
    """``nn.Embed`` whose lookup names its output sharding on explicit meshes.

    A gather's output sharding is ambiguous to JAX's explicit-sharding types; the embedded
    activations are sharded like the token ids, with the feature axis replicated.
    """

    def __call__(self, inputs):
        spec = typed_sharding.explicit_spec(inputs)
        if spec is None:
            return super().__call__(inputs)
        table = jax.sharding.reshard(self.embedding, P())
        return table.at[inputs].get(out_sharding=P(*spec, None))


def _float_attention(q, k, v, mask):
    """Softmax attention of ``q (B, T, H, D)`` over ``k, v (B, S, H, D)`` where ``mask (T, S)``."""
    hd = q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
    probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _adaptive(quant: AttentionQuant | None) -> bool:
    return quant is not None and quant.token_adaptive


def _quant_tokens(x, high, low_spec, low):
    """``x (B, T, H, D)`` as float32, fake-quantized with ``high`` (None: float), per token with
    ``low_spec`` where ``low (B, T)`` is True (EdgeQAT's token-adaptive widths)."""
    if high is None:
        return x.astype(jnp.float32)
    if low is None or low_spec is None:
        return fake_quant(x.astype(jnp.float32), high)
    return edgeqat.token_adaptive_fake_quant(x, low, high, low_spec)


class Attention(nn.Module):
    """Causal self-attention; ``quant`` (when :func:`~qjax.nn.ops.qat_active`) quantizes it.

    ``x (B, T, d) -> (B, T, d)``, or with ``cache`` (a :class:`~qjax.attention.KVCache`
    holding the ``cache.length`` tokens before ``x``) ``((B, T, d), cache extended by T
    tokens)``. With token-adaptive widths (``quant.token_adaptive``: EdgeQAT) it returns
    ``((B, T, d), low)``: ``low (B, T)`` in is the previous layer's choice of low-width tokens
    (None for the first layer), used for Q and K, and ``low`` out this layer's (the least
    important tokens by its own logits), used for V and passed on (None while QAT is off).
    """

    config: LlamaConfig
    quant: AttentionQuant | None = None

    @nn.compact
    def __call__(self, x, cache: KVCache | None = None, low: jax.Array | None = None):
        c = self.config
        b, t, d = x.shape
        hd = d // c.n_heads
        init = nn.initializers.normal(c.init_std)
        out_init = nn.initializers.normal(c.init_std / math.sqrt(2 * c.n_layers))
        dense = lambda name, k=init: nn.Dense(d, use_bias=False, kernel_init=k, name=name,
                                              dot_general=typed_sharding.dot_general)
        q = dense("q")(x).reshape(b, t, c.n_heads, hd)
        k = dense("k")(x).reshape(b, t, c.n_heads, hd)
        v = dense("v")(x).reshape(b, t, c.n_heads, hd)
        positions = None if cache is None else cache.length + jnp.arange(t)
        q, k = _rope(q, c.rope_theta, positions), _rope(k, c.rope_theta, positions)
        spec = self.quant if qat_active() else None
        if cache is not None:
            if _adaptive(spec):
                _ = spec.cache_spec  # raises: token-adaptive widths are not decoded with a cache
            cache = append_kv(cache, k, v)  # stored with the cache's own spec
            if spec is None:
                allowed = jnp.arange(cache.capacity)[None, :] <= cache.length - t + jnp.arange(
                    t)[:, None]
                out = _float_attention(q, cache.k.astype(q.dtype), cache.v.astype(q.dtype),
                                       allowed)
            else:
                out = cached_attention(q, cache, spec_q=spec.q, spec_p=spec.p)
            return dense("o", out_init)(out.reshape(b, t, d)), cache
        sow = self.is_mutable_collection(edgeqat.COLLECTION) and not self.is_initializing()
        if spec is None and not sow:
            out, low = _float_attention(q, k, v, jnp.tril(jnp.ones((t, t), bool))), None
        else:
            out, low = self._quantized(q, k, v, spec or AttentionQuant(), low, sow)
        out = dense("o", out_init)(out.reshape(b, t, d))
        return (out, low) if _adaptive(self.quant) else out

    def _quantized(self, q, k, v, spec: AttentionQuant, low, sow: bool):
        """Quantized attention (:func:`~qjax.attention.attention_logits` then
        :func:`~qjax.attention.attend`: the logits are computed once, before V, whose token
        widths they decide) and this layer's low-width tokens (or None). With ``sow``, EdgeQAT's
        statistics (:mod:`qjax.methods.edgeqat`) are sown on the way (only when that collection
        is mutable and not at init, so ``init`` returns params only): the scaled logits
        ``(B, H, T, T)`` (of the fake-quantized Q and K; float32 at HIGHEST precision, also
        without a spec) and, for quantized Q and K, their
        :func:`~qjax.methods.edgeqat.qk_entropy`."""
        qf = _quant_tokens(q, spec.q, spec.q_low, low)
        kf = _quant_tokens(k, spec.k, spec.k_low, low)
        if sow and spec.q is not None and spec.k is not None:
            self.sow(edgeqat.COLLECTION, "entropy", edgeqat.qk_entropy(qf))
            self.sow(edgeqat.COLLECTION, "entropy", edgeqat.qk_entropy(kf))
        logits = attention_logits(qf, kf)
        if sow:
            self.sow(edgeqat.COLLECTION, "scores", logits)
        cur = edgeqat.low_bit_tokens(edgeqat.token_importance(logits), spec.low_fraction) \
            if spec.token_adaptive else None
        vf = _quant_tokens(v, spec.v, spec.v_low, cur)
        return attend(logits, vf, spec_p=spec.p, causal=True).astype(v.dtype), cur


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        init = nn.initializers.normal(c.init_std)
        out_init = nn.initializers.normal(c.init_std / math.sqrt(2 * c.n_layers))
        h = c.ffn_hidden
        dense = functools.partial(nn.Dense, use_bias=False, dot_general=typed_sharding.dot_general)
        gate = dense(h, kernel_init=init, name="gate")(x)
        up = dense(h, kernel_init=init, name="up")(x)
        return dense(c.d_model, kernel_init=out_init, name="down")(
            nn.silu(gate) * up
        )


class Block(nn.Module):
    config: LlamaConfig
    attention: AttentionQuant | None = None

    @nn.compact
    def __call__(self, x, cache: KVCache | None = None, low: jax.Array | None = None):
        """``x``, or ``(x, cache)`` with a cache, or ``(x, low)`` with token-adaptive attention
        widths (see :class:`Attention`)."""
        eps = self.config.norm_eps
        attn = Attention(self.config, self.attention, name="attn")
        h = nn.RMSNorm(eps, name="attn_norm")(x)
        if cache is not None:
            a, carry = attn(h, cache)
        elif _adaptive(self.attention):
            a, carry = attn(h, low=low)
        else:
            a, carry = attn(h), None
        x = x + a
        x = x + MLP(self.config, name="mlp")(nn.RMSNorm(eps, name="mlp_norm")(x))
        return x if cache is None and not _adaptive(self.attention) else (x, carry)


class Llama(nn.Module):
    """Decoder-only LM: ``ids (batch, seq) int32 -> logits (batch, seq, vocab) float32``.

    ``attention``: optional quantization of the attention (see the module docstring).
    """

    config: LlamaConfig
    attention: AttentionQuant | None = None

    def setup(self):
        c = self.config
        self.embed = Embed(c.vocab_size, c.d_model,
                           embedding_init=nn.initializers.normal(c.init_std))
        self.blocks = [Block(c, self.attention) for _ in range(c.n_layers)]
        self.final_norm = nn.RMSNorm(c.norm_eps)
        self.lm_head = nn.Dense(c.vocab_size, use_bias=False,
                                dot_general=typed_sharding.dot_general,
                                kernel_init=nn.initializers.normal(c.init_std))

    def __call__(self, ids):
        if ids.shape[-1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {ids.shape[-1]} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        x, low = self.embed(ids), None
        for block in self.blocks:
            if _adaptive(self.attention):  # the low-width tokens pass from layer to layer
                x, low = block(x, low=low)
            else:
                x = block(x)
        return self.lm_head(self.final_norm(x)).astype(jnp.float32)

    def extend(self, ids, caches: tuple[KVCache, ...]):
        """Logits ``(batch, T, vocab)`` of ``T`` new tokens after the ones the caches hold, and
        the caches extended by them (one :class:`~qjax.attention.KVCache` per block)."""
        if not isinstance(caches, (tuple, list)) or len(caches) != self.config.n_layers:
            raise ValueError(f"caches must be a tuple of {self.config.n_layers} KVCaches (one "
                             f"per block, init_caches), got {type(caches).__name__}")
        x, out = self.embed(ids), []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block(x, cache)
            out.append(cache)
        return self.lm_head(self.final_norm(x)).astype(jnp.float32), tuple(out)


def init_caches(config: LlamaConfig, batch: int, capacity: int | None = None, *,
                attention: AttentionQuant | None = None) -> tuple[KVCache, ...]:
    """Empty KV caches of a :class:`Llama`, one per block, for ``capacity`` tokens (default
    ``max_seq_len``), stored with ``attention.cache_spec`` (None: float32)."""
    capacity = config.max_seq_len if capacity is None else check_int(
        "capacity", capacity, lo=1, hi=config.max_seq_len)
    spec = None if attention is None else attention.cache_spec
    hd = config.d_model // config.n_heads
    return tuple(init_kv_cache(batch, capacity, config.n_heads, hd, spec=spec)
                 for _ in range(config.n_layers))


def greedy_generate(extend, params, prompt: jax.Array, steps: int,
                    caches: tuple[KVCache, ...]) -> jax.Array:
    """Greedy decoding: ``prompt (B, P)`` int32 and ``steps`` new tokens, ``(B, P + steps)``.

    Args:
      extend: ``extend(params, ids, caches) -> (logits, caches)``, e.g.
        ``lambda p, i, c: model.apply({"params": p}, i, c, method="extend")`` (QAT) or
        ``lambda p, i, c: qjax.convert.serve(model, p, i, c, method="extend")`` (serving).
      params: its params; prompt: the first tokens (``P >= 1``); steps: tokens to generate.
      caches: empty caches with room for ``P + steps`` tokens (:func:`init_caches`).

    The prompt runs in one call (prefill), then one token per call in a ``lax.fori_loop``; jit
    the whole function for speed.
    """
    steps = check_int("steps", steps, lo=0)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, length >= 1) token ids, got {prompt.shape}")
    total = prompt.shape[1] + steps
    if caches and caches[0].capacity < total:
        raise ValueError(f"the caches hold {caches[0].capacity} tokens, fewer than the prompt "
                         f"and the {steps} new ones ({total}); allocate longer caches")
    logits, caches = extend(params, prompt, caches)
    out = jnp.zeros((prompt.shape[0], total), prompt.dtype).at[:, :prompt.shape[1]].set(prompt)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(prompt.dtype)

    def body(i, state):
        out, token, caches = state
        out = out.at[:, prompt.shape[1] + i].set(token)
        logits, caches = extend(params, token[:, None], caches)
        return out, jnp.argmax(logits[:, -1], axis=-1).astype(prompt.dtype), caches

    if steps == 0:
        return out
    out, token, _ = jax.lax.fori_loop(0, steps - 1, body, (out, first, caches))
    return out.at[:, total - 1].set(token)


def quantization_rules(method: Method | str | None) -> dict:
    """Rules for :func:`qjax.nn.quantize_model`: every linear layer in the blocks gets ``method``;
    the embedding and LM head stay in float. ``None`` quantizes nothing."""
    if method is None:
        return {}
    return {BLOCK_LINEARS: method}


def non_embedding_params(params) -> int:
    """Parameter count without the embedding and the LM head (and quantizer parameters)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    n = 0
    for path, leaf in flat:
        names = [str(getattr(p, "key", "")) for p in path]
        if names[0] in ("embed", "lm_head") or names[-1] in ("kernel_scale", "input_scale"):
            continue
        n += int(leaf.size)
    return n
