"""Small decoder models for ``qat_step.py`` beside the reference Llama, in two other Flax styles.

* :class:`NnxLM`: Flax NNX as written today: ``nnx.Embed``, blocks (``nnx.List``) of
  ``nnx.RMSNorm``, attention with ``nnx.LinearGeneral`` heads (q/k/v: d -> (heads, head_dim);
  o: (heads, head_dim) -> d, ``axis=(-2, -1)``), an ``nnx.Linear`` SwiGLU MLP, an ``nnx.Linear``
  head. Linear paths: ``blocks/<i>/attn/{q,k,v,o}``, ``blocks/<i>/mlp/{gate,up,down}``.
* :class:`EinsumLM`: Gemma-style Flax Linen: ``nn.Einsum`` projections (q/k/v
  ``"BTD,DNH->BTNH"``, o ``"BTNH,NHD->BTD"``, no bias), a GeGLU MLP of ``nn.DenseGeneral`` layers
  (gate and up fused: ``features=(2, hidden)``; down ``DenseGeneral(d)``), ``nn.RMSNorm``, an
  ``nn.Embed`` and an ``nn.Dense`` head. Linear paths: ``blocks_<i>/attn/{q,k,v,o}``,
  ``blocks_<i>/mlp/{gate_up,down}``.

Both use rotary positions and causal softmax attention in float (the attention core is no
quantization site); their embedding and head are float in every benchmark case.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

#: Linear layers inside the blocks of :class:`NnxLM` (NNX attribute paths).
NNX_LINEARS = r"blocks/\d+/(attn/[qkvo]|mlp/(gate|up|down))"
#: Linear layers inside the blocks of :class:`EinsumLM` (Linen module paths).
EINSUM_LINEARS = r"blocks_\d+/(attn/[qkvo]|mlp/(gate_up|down))"


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 64
    hidden: int = 768


def rope(x: jax.Array) -> jax.Array:
    """Rotary position embedding of ``x (B, T, N, H)`` (half-split convention)."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10_000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * freq  # (T, H/2)
    sin, cos = jnp.sin(angle)[None, :, None], jnp.cos(angle)[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention of ``(B, T, N, H)`` queries, keys and values, causal."""
    q, k = rope(q), rope(k)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    t = q.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(s.dtype).min)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), v)


# ---------------------------------------------------------------------------------------- NNX
class NnxAttention(nnx.Module):
    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        heads = (cfg.n_heads, cfg.head_dim)
        self.q = nnx.LinearGeneral(cfg.d_model, heads, use_bias=False, rngs=rngs)
        self.k = nnx.LinearGeneral(cfg.d_model, heads, use_bias=False, rngs=rngs)
        self.v = nnx.LinearGeneral(cfg.d_model, heads, use_bias=False, rngs=rngs)
        self.o = nnx.LinearGeneral(heads, cfg.d_model, axis=(-2, -1), use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.o(causal_attention(self.q(x), self.k(x), self.v(x)))


class NnxMlp(nnx.Module):
    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        self.gate = nnx.Linear(cfg.d_model, cfg.hidden, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(cfg.d_model, cfg.hidden, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(cfg.hidden, cfg.d_model, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(nnx.silu(self.gate(x)) * self.up(x))


class NnxBlock(nnx.Module):
    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.attn = NnxAttention(cfg, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.mlp = NnxMlp(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class NnxLM(nnx.Module):
    """Decoder LM in Flax NNX: ids ``(B, T)`` -> logits ``(B, T, vocab)``."""

    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# -------------------------------------------------------------------------------------- Linen
class EinsumAttention(nn.Module):
    cfg: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        qkv = [nn.Einsum((c.d_model, c.n_heads, c.head_dim), "BTD,DNH->BTNH", use_bias=False,
                         name=n)(x) for n in "qkv"]
        y = causal_attention(*qkv)
        return nn.Einsum((c.n_heads, c.head_dim, c.d_model), "BTNH,NHD->BTD", use_bias=False,
                         name="o")(y)


class EinsumMlp(nn.Module):
    cfg: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = nn.DenseGeneral((2, self.cfg.hidden), use_bias=False, name="gate_up")(x)
        h = nn.gelu(gate_up[..., 0, :]) * gate_up[..., 1, :]
        return nn.DenseGeneral(self.cfg.d_model, use_bias=False, name="down")(h)


class EinsumBlock(nn.Module):
    cfg: BlockConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + EinsumAttention(self.cfg, name="attn")(nn.RMSNorm(name="attn_norm")(x))
        return x + EinsumMlp(self.cfg, name="mlp")(nn.RMSNorm(name="mlp_norm")(x))


class EinsumLM(nn.Module):
    """Gemma-style decoder LM in Flax Linen: ids ``(B, T)`` -> logits ``(B, T, vocab)``."""

    cfg: BlockConfig

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(self.cfg.vocab_size, self.cfg.d_model, name="embed")(ids)
        for i in range(self.cfg.n_layers):
            x = EinsumBlock(self.cfg, name=f"blocks_{i}")(x)
        return nn.Dense(self.cfg.vocab_size, use_bias=False, name="head")(
            nn.RMSNorm(name="norm")(x))
