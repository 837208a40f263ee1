"""A small zoo of tiny, deterministic Flax models written the way people write Flax today.

The model code here is plain Flax (Linen and NNX) with no qjax imports: the zoo is the *input* to
``qjax.nn.quantize_model`` -> train -> convert -> serve -> export tests. Every model compiles in a
second or two on CPU.

Sizes: d_model 32, 2 heads x 16, MLP 64, vocab 64, sequence 8, batch 2, images 2 x 8 x 8 x 3. Every
size a quantized layer contracts is a multiple of 16; the only exceptions are the convolutions
that read the 3 RGB channels, which are listed in ``float_layers`` rather than ``layers``.

``ZOO[name]`` is a :class:`ZooModel`:

* ``make()``: a Linen module instance, or a fresh NNX module built with ``nnx.Rngs(0)``;
* ``inputs()``: positional example inputs from a fixed PRNG key;
* ``loss(outputs, inputs)``: scalar float32 (next-token cross-entropy for the language models,
  cross-entropy against fixed labels for the image models);
* ``layers``: exact paths of the layers quantization should match, as ``quantize_model`` sees them
  (Linen: ``module.path`` joined with "/", e.g. ``"blocks_0/attn/q"``; a scanned Linen block has
  one path for all its layers, e.g. ``"layers/attn/q"``. NNX: the ``nnx.iter_modules`` path joined
  with "/", list items as integers, e.g. ``"blocks/0/attn/q"``);
* ``rules``: regex -> None, whose ``re.fullmatch`` matches exactly ``layers`` among the model's
  quantizable layers (Linen Dense/DenseGeneral/Einsum/Conv; NNX Linear/LinearGeneral/Einsum/Conv);
* ``raw_params``: parameter paths used by raw ``jnp.einsum`` calls (no Flax layer), e.g.
  ``"proj/w"``;
* ``float_layers``: quantizable layers deliberately left out of ``layers`` (convolutions over the 3
  RGB input channels, whose contracted size is not a multiple of 16).

``unrolled_twin(name)`` (for ``"linen_scan"`` and ``"nnx_scan"``) returns ``(twin, map_params)``:
the same architecture with the blocks in a Python loop, and a function mapping the scanned model's
parameters to the twin's, such that ``twin(map_params(params)) == scanned(params)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ZooModel", "ZOO", "unrolled_twin", "SCANNED"]

D_MODEL = 32
NUM_HEADS = 2
HEAD_DIM = 16
MLP_DIM = 64
VOCAB = 64
SEQ = 8
BATCH = 2
NUM_BLOCKS = 2
NUM_CLASSES = 10
IMAGE_SHAPE = (BATCH, 8, 8, 3)
# Gemma-style stacked gate+up projection: DenseGeneral(features=(2, GEMMA_MLP_DIM)).
GEMMA_MLP_DIM = 32


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    api: Literal["linen", "nnx"]
    make: Callable[[], Any]
    inputs: Callable[[], tuple]
    loss: Callable[[Any, tuple], jax.Array]
    layers: tuple[str, ...]
    rules: Mapping[str, None]
    raw_params: tuple[str, ...] = ()
    float_layers: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Inputs, losses and shared math


def _tokens() -> tuple[jax.Array]:
    return (jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, VOCAB, dtype=jnp.int32),)


def _images() -> tuple[jax.Array]:
    return (jax.random.normal(jax.random.key(0), IMAGE_SHAPE, jnp.float32),)


_LABELS = (3, 7)  # fixed class labels of the two images


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def next_token_loss(logits: jax.Array, inputs: tuple) -> jax.Array:
    """Next-token cross-entropy: logits[:, t] predicts tokens[:, t + 1]."""
    (tokens,) = inputs
    return _cross_entropy(logits[:, :-1], tokens[:, 1:])


def classification_loss(logits: jax.Array, inputs: tuple) -> jax.Array:
    """Cross-entropy of the two images against fixed labels."""
    del inputs
    return _cross_entropy(logits, jnp.asarray(_LABELS, jnp.int32))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Multi-head causal softmax attention on (B, T, N, H) arrays."""
    seq = q.shape[1]
    logits = jnp.einsum("btnh,bsnh->bnts", q * (q.shape[-1] ** -0.5), k)
    mask = jnp.tril(jnp.ones((seq, seq), jnp.bool_))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", weights, v)


# ---------------------------------------------------------------------------------------------
# Linen: Llama-style decoder (nn.Dense projections), unrolled or scanned


class DenseAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, NUM_HEADS, HEAD_DIM)  # noqa: E731
        q = split(nn.Dense(NUM_HEADS * HEAD_DIM, use_bias=False, name="q")(x))
        k = split(nn.Dense(NUM_HEADS * HEAD_DIM, use_bias=False, name="k")(x))
        v = split(nn.Dense(NUM_HEADS * HEAD_DIM, use_bias=False, name="v")(x))
        y = causal_attention(q, k, v).reshape(b, t, NUM_HEADS * HEAD_DIM)
        return nn.Dense(D_MODEL, use_bias=False, name="o")(y)


class DenseMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.silu(nn.Dense(MLP_DIM, use_bias=False, name="up")(x))
        return nn.Dense(D_MODEL, use_bias=False, name="down")(h)


class LlamaBlock(nn.Module):
    """Pre-norm decoder block. With ``scanned=True`` it has the ``nn.scan`` signature
    ``(carry, _) -> (carry, None)`` (as MaxText's decoder layers do with ``scan_layers``)."""

    scanned: bool = False

    @nn.compact
    def __call__(self, x, _=None):
        x = x + DenseAttention(name="attn")(nn.RMSNorm(name="attn_norm")(x))
        x = x + DenseMLP(name="mlp")(nn.RMSNorm(name="mlp_norm")(x))
        return (x, None) if self.scanned else x


class LlamaLM(nn.Module):
    """Embed -> blocks -> RMSNorm -> untied head. ``scan=True`` runs the blocks with ``nn.scan``
    as one module ``layers`` (params stacked on a leading axis of size ``NUM_BLOCKS``);
    otherwise the blocks are ``blocks_0``, ``blocks_1``, ..."""

    scan: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D_MODEL, name="embed")(tokens)
        if self.scan:
            stack = nn.scan(LlamaBlock, variable_axes={"params": 0},
                            split_rngs={"params": True}, in_axes=nn.broadcast,
                            length=NUM_BLOCKS)
            x, _ = stack(scanned=True, name="layers")(x, None)
        else:
            for i in range(NUM_BLOCKS):
                x = LlamaBlock(name=f"blocks_{i}")(x)
        x = nn.RMSNorm(name="final_norm")(x)
        return nn.Dense(VOCAB, use_bias=False, name="head")(x)


def _block_layers(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}/{p}" for p in ("attn/q", "attn/k", "attn/v", "attn/o",
                                            "mlp/up", "mlp/down"))


# ---------------------------------------------------------------------------------------------
# Linen: Gemma-style decoder (nn.Einsum attention, nn.DenseGeneral gated MLP)


class EinsumAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        proj = lambda name: nn.Einsum(  # noqa: E731
            shape=(D_MODEL, NUM_HEADS, HEAD_DIM), einsum_str="BTD,DNH->BTNH", use_bias=False,
            name=name)
        q, k, v = proj("q")(x), proj("k")(x), proj("v")(x)
        y = causal_attention(q, k, v)
        return nn.Einsum(shape=(NUM_HEADS, HEAD_DIM, D_MODEL), einsum_str="BTNH,NHD->BTD",
                         use_bias=False, name="o")(y)


class GatedMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral(features=(2, GEMMA_MLP_DIM), axis=-1, use_bias=False,
                            name="gate_up")(x)
        h = nn.gelu(h[..., 0, :]) * h[..., 1, :]
        return nn.DenseGeneral(D_MODEL, axis=-1, use_bias=False, name="down")(h)


class GemmaBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + EinsumAttention(name="attn")(nn.RMSNorm(name="attn_norm")(x))
        x = x + GatedMLP(name="mlp")(nn.RMSNorm(name="mlp_norm")(x))
        return x


class GemmaLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D_MODEL, name="embed")(tokens)
        for i in range(NUM_BLOCKS):
            x = GemmaBlock(name=f"blocks_{i}")(x)
        x = nn.RMSNorm(name="final_norm")(x)
        return nn.Dense(VOCAB, use_bias=False, name="head")(x)


# ---------------------------------------------------------------------------------------------
# Linen: small CNN, ViT-style patch model, raw-einsum projection


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, images):
        x = nn.relu(nn.Conv(16, (3, 3), strides=(1, 1), name="conv1")(images))
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2), name="conv2")(x))
        x = nn.relu(nn.Conv(32, (1, 1), name="conv3")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(NUM_CLASSES, name="head")(x)


class ViTMLPBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm")(x)
        h = nn.gelu(nn.Dense(MLP_DIM, name="up")(h))
        return x + nn.Dense(D_MODEL, name="down")(h)


class TinyViT(nn.Module):
    @nn.compact
    def __call__(self, images):
        x = nn.Conv(D_MODEL, kernel_size=(4, 4), strides=(4, 4), padding="VALID",
                    name="patch_embed")(images)                    # (B, 2, 2, 32)
        x = x.reshape(x.shape[0], -1, x.shape[-1])                  # (B, 4, 32) patch tokens
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], D_MODEL))
        x = ViTMLPBlock(name="block")(x)
        x = nn.LayerNorm(name="final_norm")(x)
        return nn.Dense(NUM_CLASSES, name="head")(jnp.mean(x, axis=1))


class RawEinsumProj(nn.Module):
    """A projection written as a raw ``jnp.einsum`` on its own parameter (no Flax layer)."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.lecun_normal(), (D_MODEL, D_MODEL))
        return jnp.einsum("btd,dh->bth", x, w)


class RawEinsumLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D_MODEL, name="embed")(tokens)
        x = nn.gelu(RawEinsumProj(name="proj")(x))
        return nn.Dense(VOCAB, name="head")(x)


# ---------------------------------------------------------------------------------------------
# NNX: decoder with LinearGeneral heads, blocks in an nnx.List


class NnxAttention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q = nnx.LinearGeneral(D_MODEL, (NUM_HEADS, HEAD_DIM), use_bias=False, rngs=rngs)
        self.k = nnx.LinearGeneral(D_MODEL, (NUM_HEADS, HEAD_DIM), use_bias=False, rngs=rngs)
        self.v = nnx.LinearGeneral(D_MODEL, (NUM_HEADS, HEAD_DIM), use_bias=False, rngs=rngs)
        self.o = nnx.LinearGeneral((NUM_HEADS, HEAD_DIM), D_MODEL, axis=(-2, -1),
                                   use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.o(causal_attention(self.q(x), self.k(x), self.v(x)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(D_MODEL, MLP_DIM, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(MLP_DIM, D_MODEL, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.silu(self.up(x)))


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
        self.attn = NnxAttention(rngs)
        self.mlp_norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
        self.mlp = NnxMLP(rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class NnxLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(rngs) for _ in range(NUM_BLOCKS)])
        self.final_norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
        self.head = nnx.Linear(D_MODEL, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


# ---------------------------------------------------------------------------------------------
# NNX: scan over layers (blocks created by nnx.vmap, run by nnx.scan), and its unrolled twin


class NnxLinearAttention(nnx.Module):
    """Attention with plain ``nnx.Linear`` q/k/v/o projections."""

    def __init__(self, rngs: nnx.Rngs):
        inner = NUM_HEADS * HEAD_DIM
        self.q = nnx.Linear(D_MODEL, inner, use_bias=False, rngs=rngs)
        self.k = nnx.Linear(D_MODEL, inner, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(D_MODEL, inner, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(inner, D_MODEL, use_bias=False, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, NUM_HEADS, HEAD_DIM)  # noqa: E731
        y = causal_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.reshape(b, t, NUM_HEADS * HEAD_DIM))


class NnxScanBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
        self.attn = NnxLinearAttention(rngs)
        self.mlp_norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
        self.mlp = NnxMLP(rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class NnxScannedLM(nnx.Module):
    """The Flax NNX "scan over layers" pattern: ``self.blocks`` is one ``NnxScanBlock`` whose
    parameters carry a leading layer axis of size ``NUM_BLOCKS``."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)

        @nnx.split_rngs(splits=NUM_BLOCKS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_blocks(rngs: nnx.Rngs):
            return NnxScanBlock(rngs)

        self.blocks = create_blocks(rngs)
        self.final_norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
        self.head = nnx.Linear(D_MODEL, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(x, block):
            return block(x)

        x = forward(x, self.blocks)
        return self.head(self.final_norm(x))


class NnxUnrolledLM(nnx.Module):
    """``NnxScannedLM`` with its blocks in an ``nnx.List`` run by a Python loop."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
        self.blocks = nnx.List([NnxScanBlock(rngs) for _ in range(NUM_BLOCKS)])
        self.final_norm = nnx.RMSNorm(D_MODEL, rngs=rngs)
        self.head = nnx.Linear(D_MODEL, VOCAB, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))


# ---------------------------------------------------------------------------------------------
# The zoo

_LLAMA_RULES = {r"blocks_\d+/(attn/[qkvo]|mlp/(up|down))": None, r"head": None}


def _nnx_blocks_layers(fmt: str) -> tuple[str, ...]:
    return tuple(f"{fmt}/{p}" for p in ("attn/q", "attn/k", "attn/v", "attn/o",
                                         "mlp/up", "mlp/down"))


ZOO: dict[str, ZooModel] = {
    m.name: m for m in (
        ZooModel(
            name="linen_dense",
            api="linen",
            make=lambda: LlamaLM(),
            inputs=_tokens,
            loss=next_token_loss,
            layers=(*_block_layers("blocks_0"), *_block_layers("blocks_1"), "head"),
            rules=dict(_LLAMA_RULES),
        ),
        ZooModel(
            name="linen_einsum",
            api="linen",
            make=lambda: GemmaLM(),
            inputs=_tokens,
            loss=next_token_loss,
            layers=tuple(f"blocks_{i}/{p}" for i in range(NUM_BLOCKS)
                         for p in ("attn/q", "attn/k", "attn/v", "attn/o",
                                   "mlp/gate_up", "mlp/down")) + ("head",),
            rules={r"blocks_\d+/attn/[qkvo]": None, r"blocks_\d+/mlp/(gate_up|down)": None,
                   r"head": None},
        ),
        ZooModel(
            name="linen_cnn",
            api="linen",
            make=lambda: SmallCNN(),
            inputs=_images,
            loss=classification_loss,
            layers=("conv2", "conv3", "head"),
            rules={r"conv[23]": None, r"head": None},
            float_layers=("conv1",),
        ),
        ZooModel(
            name="linen_scan",
            api="linen",
            make=lambda: LlamaLM(scan=True),
            inputs=_tokens,
            loss=next_token_loss,
            layers=(*_block_layers("layers"), "head"),
            rules={r"layers/(attn/[qkvo]|mlp/(up|down))": None, r"head": None},
        ),
        ZooModel(
            name="nnx_block",
            api="nnx",
            make=lambda: NnxLM(nnx.Rngs(0)),
            inputs=_tokens,
            loss=next_token_loss,
            layers=(*_nnx_blocks_layers("blocks/0"), *_nnx_blocks_layers("blocks/1"), "head"),
            rules={r"blocks/\d+/(attn/[qkvo]|mlp/(up|down))": None, r"head": None},
        ),
        ZooModel(
            name="nnx_scan",
            api="nnx",
            make=lambda: NnxScannedLM(nnx.Rngs(0)),
            inputs=_tokens,
            loss=next_token_loss,
            layers=(*_nnx_blocks_layers("blocks"), "head"),
            rules={r"blocks/(attn/[qkvo]|mlp/(up|down))": None, r"head": None},
        ),
        ZooModel(
            name="linen_vit",
            api="linen",
            make=lambda: TinyViT(),
            inputs=_images,
            loss=classification_loss,
            layers=("block/up", "block/down", "head"),
            rules={r"block/(up|down)": None, r"head": None},
            float_layers=("patch_embed",),
        ),
        ZooModel(
            name="linen_raw_einsum",
            api="linen",
            make=lambda: RawEinsumLM(),
            inputs=_tokens,
            loss=next_token_loss,
            layers=("head",),
            rules={r"head": None},
            raw_params=("proj/w",),
        ),
    )
}

SCANNED = ("linen_scan", "nnx_scan")


# ---------------------------------------------------------------------------------------------
# Unrolled twins of the scanned models


def _unstack(tree, i: int):
    return jax.tree.map(lambda a: a[i], tree)


def _map_linen_scan(stacked):
    """Scanned ``LlamaLM`` params -> unrolled ``LlamaLM`` params: ``layers/...`` (leading axis
    NUM_BLOCKS) -> ``blocks_{i}/...``. Takes a params dict or a variables dict
    ``{"params": ...}`` and returns the same kind."""
    stacked = nn.unbox(stacked)
    if "params" in stacked and "layers" not in stacked:
        return {**stacked, "params": _map_linen_scan(stacked["params"])}
    out = {k: v for k, v in stacked.items() if k != "layers"}
    for i in range(NUM_BLOCKS):
        out[f"blocks_{i}"] = _unstack(stacked["layers"], i)
    return out


def _map_nnx_scan(stacked):
    """Scanned ``NnxScannedLM`` state -> ``NnxUnrolledLM`` state: ``blocks/...`` (leading axis
    NUM_BLOCKS) -> ``blocks/{i}/...``. Takes an ``nnx.State`` (returns an ``nnx.State`` for
    ``nnx.update(twin, ...)`` / ``nnx.merge``) or a pure dict (returns a pure dict for
    ``nnx.replace_by_pure_dict``)."""
    is_state = isinstance(stacked, nnx.State)
    pure = nnx.to_pure_dict(stacked) if is_state else stacked
    out = {k: v for k, v in pure.items() if k != "blocks"}
    out["blocks"] = {i: _unstack(pure["blocks"], i) for i in range(NUM_BLOCKS)}
    if not is_state:
        return out
    state = nnx.state(nnx.eval_shape(lambda: NnxUnrolledLM(nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, out)
    return state


def unrolled_twin(name: str) -> tuple[ZooModel, Callable[[Any], Any]]:
    """``(twin, map_params)`` for a scanned zoo model (``"linen_scan"`` or ``"nnx_scan"``).

    Linen::

        twin, map_params = unrolled_twin("linen_scan")
        params = scanned.make().init(key, *scanned.inputs())["params"]
        twin.make().apply({"params": map_params(params)}, *inputs)  # == scanned apply

    NNX::

        twin, map_params = unrolled_twin("nnx_scan")
        model = scanned.make(); other = twin.make()
        nnx.update(other, map_params(nnx.state(model)))            # other(*inputs) == model(...)
    """
    base = ZOO[name]
    if name == "linen_scan":
        twin = dataclasses.replace(
            base, name="linen_scan_unrolled", make=lambda: LlamaLM(scan=False),
            layers=(*_block_layers("blocks_0"), *_block_layers("blocks_1"), "head"),
            rules=dict(_LLAMA_RULES))
        return twin, _map_linen_scan
    if name == "nnx_scan":
        twin = dataclasses.replace(
            base, name="nnx_scan_unrolled", make=lambda: NnxUnrolledLM(nnx.Rngs(0)),
            layers=(*_nnx_blocks_layers("blocks/0"), *_nnx_blocks_layers("blocks/1"), "head"),
            rules={r"blocks/\d+/(attn/[qkvo]|mlp/(up|down))": None, r"head": None})
        return twin, _map_nnx_scan
    raise ValueError(f"{name!r} has no unrolled twin; scanned models: {SCANNED}")
