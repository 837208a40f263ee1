"""Implementation of :mod:`qjax.methods.edgeqat` (documented there)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from qjax._src import granularity as G
from qjax._src._checks import check_floating, check_real
from qjax._src.quantize import fake_quant
from qjax._src.spec import QuantSpec, check_spec

__all__ = ["COLLECTION", "qk_entropy", "entropy_loss", "attention_map_loss",
           "token_importance", "low_bit_tokens", "token_adaptive_fake_quant"]

#: The Flax collection the reference Llama sows its EdgeQAT statistics into
#: (``apply(..., mutable=[COLLECTION])``): per layer ``"entropy"`` (:func:`qk_entropy` of the
#: quantized Q and of the quantized K) and ``"scores"`` (pre-softmax logits ``(B, H, T, T)``).
COLLECTION = "edgeqat"

# torch.nn.CosineSimilarity's floor on each norm: a row of zeros has cosine 0, not NaN.
_COS_EPS = 1e-6


def qk_entropy(x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """Gaussian-entropy proxy of the rows of a query or key tensor, a float32 scalar.

    ``x (B, T, H, D)``; for every token and head the unbiased variance over ``D``:
    ``mean_{b,t,h} log(1 + Var_d x[b, t, h, :])`` (over the tokens where ``token_mask (B, T)``
    is True, if given). The entropy of a Gaussian is ``log(sigma) + const``; ``1 +`` keeps the
    term finite and >= 0 for constant rows.
    """
    check_floating(x, "x")
    if x.ndim != 4 or x.shape[-1] < 2:
        raise ValueError(f"x must be (batch, tokens, heads, head_dim) with head_dim >= 2, got "
                         f"{x.shape}")
    terms = jnp.log1p(jnp.var(x.astype(jnp.float32), axis=-1, ddof=1))  # (B, T, H)
    if token_mask is None:
        return jnp.mean(terms)
    m = jnp.asarray(token_mask)
    if m.shape != x.shape[:2] or m.dtype != jnp.bool_:
        raise ValueError(f"token_mask must be a bool (batch, tokens) = {x.shape[:2]} array, got "
                         f"{m.dtype} {m.shape}")
    w = jnp.broadcast_to(m[..., None], terms.shape).astype(jnp.float32)
    return jnp.sum(terms * w) / jnp.maximum(jnp.sum(w), 1.0)


def entropy_loss(entropies: Sequence[jax.Array] | jax.Array) -> jax.Array:
    """``-1/2 log(mean_i e_i)`` of the :func:`qk_entropy` terms ``e_i`` (the quantized Q and K of
    every layer): minimizing it maximizes the entropy of the quantized queries and keys.

    The released code takes ``-1/2 log`` of the *sum* of the per-row terms over layers, Q and
    K; with the same number of rows in every term (the reference Llama) that is this loss plus a
    constant, so the gradients are the same.
    """
    if isinstance(entropies, (list, tuple)):
        if not entropies:
            raise ValueError("entropies must hold at least one qk_entropy term, got none")
        entropies = jnp.stack([jnp.asarray(v) for v in entropies])
    check_floating(entropies, "entropies")
    if entropies.size == 0:
        raise ValueError("entropies must hold at least one qk_entropy term, got none")
    e = entropies.astype(jnp.float32)
    return -0.5 * jnp.log(jnp.maximum(jnp.mean(e), jnp.finfo(jnp.float32).tiny))


def _mask_weights(mask, shape: tuple[int, ...]) -> jax.Array:
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    m = jnp.asarray(mask)
    if m.dtype != jnp.bool_:
        raise ValueError(f"mask must be a bool array (True where attention is allowed), got "
                         f"{m.dtype}")
    try:
        return jnp.broadcast_to(m, shape).astype(jnp.float32)
    except ValueError:
        raise ValueError(f"mask {m.shape} must broadcast to the scores {shape}") from None


def _cosines(s: jax.Array, t: jax.Array, mask) -> jax.Array:
    w = _mask_weights(mask, s.shape)
    axes = (-2, -1)
    s, t = jnp.where(w > 0, s, 0.0), jnp.where(w > 0, t, 0.0)
    dot = jnp.sum(s * t, axis=axes)
    ns = jnp.maximum(jnp.sqrt(jnp.sum(s * s, axis=axes)), _COS_EPS)
    nt = jnp.maximum(jnp.sqrt(jnp.sum(t * t, axis=axes)), _COS_EPS)
    return dot / (ns * nt)


def attention_map_loss(student_scores: Sequence[jax.Array] | jax.Array,
                       teacher_scores: Sequence[jax.Array] | jax.Array,
                       mask: jax.Array | None = None) -> jax.Array:
    """``1 - mean_{l,b,h} cos(S_l[b, h], T_l[b, h])``: the quantized model's attention logits
    against the float model's, a float32 scalar in ``[0, 2]`` (0 when they are proportional).

    Args:
      student_scores, teacher_scores: per layer, pre-softmax logits ``(B, H, T, S)`` (one array
        or a sequence of layers of one shape each); the teacher gets no gradient.
      mask: bool broadcastable to ``(B, H, T, S)``, True where attention is allowed (e.g. the
        causal mask): only those entries enter the cosines.

    The released code computes the same cosines (over the whole ``T x S`` map, masked entries
    included) and adds ``+log(sum of cosines)`` to the loss, which *lowers* the similarity under
    gradient descent; this function raises it, as the paper describes.
    """
    layered = isinstance(student_scores, (list, tuple))
    if layered != isinstance(teacher_scores, (list, tuple)) or (
            layered and len(student_scores) != len(teacher_scores)):
        raise ValueError("student_scores and teacher_scores must be two arrays or two sequences "
                         "with one array per layer each, of the same length")
    pairs = list(zip(student_scores, teacher_scores, strict=True)) if layered \
        else [(student_scores, teacher_scores)]
    if not pairs:
        raise ValueError("student_scores must hold at least one layer, got none")
    cos = []
    for s, t in pairs:
        check_floating(s, "student_scores")
        check_floating(t, "teacher_scores")
        if s.shape != t.shape or s.ndim != 4:
            raise ValueError(f"student and teacher scores must be (batch, heads, T, S) of one "
                             f"shape, got {s.shape} and {t.shape}")
        cos.append(_cosines(s.astype(jnp.float32),
                            jax.lax.stop_gradient(t.astype(jnp.float32)), mask))
    return 1.0 - jnp.mean(jnp.stack(cos))


def token_importance(scores: jax.Array) -> jax.Array:
    """EdgeQAT's importance of each query token, ``(B, T)`` float32: the pre-softmax logit it
    gives the first token, summed over heads, ``sum_h S[b, h, t, 0]`` (``scores (B, H, T, S)``).

    The released code averages it over the batch (one token set per batch); here each sequence
    gets its own.
    """
    check_floating(scores, "scores")
    if scores.ndim != 4:
        raise ValueError(f"scores must be (batch, heads, T, S), got {scores.shape}")
    return jnp.sum(scores[..., 0].astype(jnp.float32), axis=1)


def low_bit_tokens(importance: jax.Array, fraction: float) -> jax.Array:
    """Bool ``(B, T)``: the ``floor(fraction * T)`` least important tokens of each sequence
    (ties to the earlier token), the ones EdgeQAT quantizes with fewer bits."""
    check_floating(importance, "importance")
    if importance.ndim != 2:
        raise ValueError(f"importance must be (batch, tokens), got {importance.shape}")
    fraction = check_real("fraction", fraction, 0.0, 1.0)
    # Rounded first so that e.g. 0.29 * 100 (28.999...) selects 29 tokens.
    n = math.floor(round(fraction * importance.shape[1], 6))
    ranks = jnp.argsort(jnp.argsort(importance, axis=1, stable=True), axis=1, stable=True)
    return ranks < n


def _check_per_token(spec: QuantSpec, shape: tuple[int, ...], name: str) -> None:
    g = G.as_granularity(spec.granularity)
    if spec.hadamard_block is not None and \
            G.normalize_axis(spec.hadamard_axis, len(shape)) in (0, 1):
        raise ValueError(f"{name} must quantize each token on its own: its Hadamard rotation "
                         f"(hadamard_axis={spec.hadamard_axis}) mixes the batch or token axis of "
                         f"x {shape}")
    if isinstance(g, G.PerGroup):
        mixes = G.normalize_axis(g.axis, len(shape)) in (0, 1)
    elif isinstance(g, G.PerTensor):
        mixes = True
    else:
        mixes = bool({0, 1} & set(g.reduce_axes(shape)))
    if mixes:
        raise ValueError(f"{name} must quantize each token on its own (its scale may not span "
                         f"the batch or token axes of x {shape}), got granularity {g}")


def token_adaptive_fake_quant(x: jax.Array, low: jax.Array, spec_high: QuantSpec,
                              spec_low: QuantSpec) -> jax.Array:
    """``x (B, T, ...)`` fake-quantized per token: with ``spec_low`` where ``low (B, T)`` is True,
    else ``spec_high`` (e.g. int4 and int8 per token and head); float32 out.

    Both specs must quantize tokens independently (no scale across the batch or token axes), so
    each token's value depends only on its own entries and its bit width.
    """
    check_floating(x, "x")
    spec_high = check_spec(spec_high, "spec_high")
    spec_low = check_spec(spec_low, "spec_low")
    low = jnp.asarray(low)
    if x.ndim < 2 or low.shape != x.shape[:2] or low.dtype != jnp.bool_:
        raise ValueError(f"low must be a bool (batch, tokens) = {x.shape[:2]} array, got "
                         f"{low.dtype} {low.shape}")
    _check_per_token(spec_high, x.shape, "spec_high")
    _check_per_token(spec_low, x.shape, "spec_low")
    xf = x.astype(jnp.float32)
    sel = low.reshape(low.shape + (1,) * (x.ndim - 2))
    return jnp.where(sel, fake_quant(xf, spec_low), fake_quant(xf, spec_high))
