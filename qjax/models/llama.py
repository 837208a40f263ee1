"""A Llama-style decoder in plain Flax Linen, quantized with :func:`qjax.nn.quantize_model`.

The QuEST paper's setup: RMSNorm (eps 1e-5), rotary embeddings (theta 1e4), SwiGLU MLP with hidden
``round_up(8/3 * d, multiple)``, no biases, untied input embedding and LM head, init std 0.02 and
``0.02 / sqrt(2 L)`` for the residual output projections. The model is written with ordinary
``nn.Dense`` layers; :func:`quantization_rules` quantizes every linear layer inside the blocks
(``blocks_<i>/attn/{q,k,v,o}``, ``blocks_<i>/mlp/{gate,up,down}``) and leaves the embedding, the
LM head and the norms in high precision.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qjax import typed_sharding
from qjax.nn.recipe import Method

__all__ = [
    "LlamaConfig", "Llama", "quantization_rules", "non_embedding_params", "BLOCK_LINEARS",
]

#: Paths of the linear layers inside the blocks: ``blocks_<i>/attn/{q,k,v,o}``,
#: ``blocks_<i>/mlp/{gate,up,down}``.
BLOCK_LINEARS = r"blocks_\d+/(attn/[qkvo]|mlp/(gate|up|down))"


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
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
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


def _rope(x: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of ``x (batch, seq, heads, head_dim)``, pairs (i, i + head_dim/2)."""
    _, t, _, d = x.shape
    freqs = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2 / d)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]
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


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
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
        q, k = _rope(q, c.rope_theta), _rope(k, c.rope_theta)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
        mask = jnp.tril(jnp.ones((t, t), bool))
        probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return dense("o", out_init)(out)


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

    @nn.compact
    def __call__(self, x):
        eps = self.config.norm_eps
        x = x + Attention(self.config, name="attn")(nn.RMSNorm(eps, name="attn_norm")(x))
        return x + MLP(self.config, name="mlp")(nn.RMSNorm(eps, name="mlp_norm")(x))


class Llama(nn.Module):
    """Decoder-only LM: ``ids (batch, seq) int32 -> logits (batch, seq, vocab) float32``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, ids):
        c = self.config
        if ids.shape[-1] > c.max_seq_len:
            raise ValueError(f"sequence length {ids.shape[-1]} exceeds max_seq_len {c.max_seq_len}")
        x = Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(c.init_std),
                     name="embed")(ids)
        for i in range(c.n_layers):
            x = Block(c, name=f"blocks_{i}")(x)
        x = nn.RMSNorm(c.norm_eps, name="final_norm")(x)
        logits = nn.Dense(c.vocab_size, use_bias=False, dot_general=typed_sharding.dot_general,
                          kernel_init=nn.initializers.normal(c.init_std), name="lm_head")(x)
        return logits.astype(jnp.float32)


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
