"""Implementation of :mod:`qjax.nn.ops` (documented there)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import weakref
from collections.abc import Callable, Hashable, Iterator

import jax
import jax.numpy as jnp
from flax.core.tracers import current_trace

from qjax._src import formats as F
from qjax._src import granularity as G
from qjax._src import scales as S
from qjax._src import spec as SP
from qjax._src import typed_sharding
from qjax._src._checks import check_bool, check_pos_int
from qjax._src.hadamard import hadamard_transform, saturating_cast
from qjax._src.nn.layout import KernelLayout, conv_layout, dense_layout, einsum_layout, embed_layout
from qjax._src.nn.recipe import LayerQuant, learned
from qjax._src.qdot import qat_dense
from qjax._src.quantize import fake_quant, rotate_like_spec

__all__ = ["QUANT_RNG", "key_source", "backward_key", "qat_scope", "qat_active",
           "quantize_kernel", "quantize_input", "rotate_input", "integer_dense",
           "init_kernel_scale", "init_input_scale", "arrange_output", "add_bias", "dense_op",
           "einsum_op", "conv_op", "embed_op", "map_matrices", "per_matrix", "split_input"]


#: Name of the rng stream that keys a quantized backward's stochastic rounding (Linen ``rngs=``
#: of ``apply``, an ``nnx.Rngs`` stream).
QUANT_RNG = "quant"

_KEY_SOURCE: contextvars.ContextVar[Callable[[], jax.Array | None] | None] = (
    contextvars.ContextVar("qjax_key_source", default=None))


@contextlib.contextmanager
def key_source(source: Callable[[], jax.Array | None]) -> Iterator[None]:
    """Within the block, :func:`backward_key` asks ``source()`` for a key when none is given.

    ``source`` is called at most once per layer call that needs a key (a quantized backward),
    and may return None (no key available). Sources nest; the innermost wins.
    """
    if not callable(source):
        raise TypeError(f"source must be a callable returning a PRNG key or None, got {source!r}")
    token = _KEY_SOURCE.set(source)
    try:
        yield
    finally:
        _KEY_SOURCE.reset(token)


_QAT: contextvars.ContextVar[bool] = contextvars.ContextVar("qjax_qat", default=True)


@contextlib.contextmanager
def qat_scope(enabled: bool) -> Iterator[None]:
    """Within the block, :func:`qat_active` is ``enabled``.

    :meth:`qjax.nn.QuantizedLinenModel.apply` enters ``qat_scope(qat)``, so quantization a model
    does in its own code (e.g. :mod:`qjax.attention` in the reference Llama) follows the same
    ``qat=`` switch as the intercepted layers (a float phase before QAT, ``qat=False`` checks).
    """
    token = _QAT.set(check_bool("enabled", enabled))
    try:
        yield
    finally:
        _QAT.reset(token)


def qat_active() -> bool:
    """Whether quantization is on: the innermost :func:`qat_scope`'s flag, True outside any."""
    return _QAT.get()


def backward_key(lq: LayerQuant, key: jax.Array | None = None) -> jax.Array | None:
    """The PRNG key of ``lq``'s quantized backward: ``key``, else the innermost
    :func:`key_source`'s, else None (then differentiating the layer raises). None when ``lq``
    has the float backward (and ``key`` is ignored)."""
    if lq.backward == "float":
        return None
    if key is None:
        source = _KEY_SOURCE.get()
        key = None if source is None else source()
    return key


def map_matrices(f, m: jax.Array, *extras):
    """``f(matrix, *extra)`` for each trailing ``(K, N)`` matrix of ``m (*lead, K, N)``.

    ``extras`` are arrays with the same leading axes (or None). Without leading axes ``f`` runs
    once, unvmapped (the ops of a plain Dense layer are unchanged).
    """
    lead = m.shape[:-2]
    if not lead:
        return f(m, *extras)
    b = math.prod(lead)
    flat = lambda a: None if a is None else a.reshape((b,) + a.shape[len(lead):])
    axes = (0,) + tuple(None if e is None else 0 for e in extras)
    out = jax.vmap(f, in_axes=axes)(flat(m), *map(flat, extras))
    return jax.tree.map(lambda a: a.reshape(lead + a.shape[1:]), out)


def per_matrix(f, tree: dict, lead: tuple[int, ...]):
    """``f`` on each slice of ``tree``'s leaves along the leading axes ``lead``, stacked back.

    One matrix at a time, with the very ops of an unstacked layer (a vmapped Hadamard or
    statistic may round differently), so a stack converts exactly as its unrolled twin.
    """
    if not lead:
        return f(tree)
    b = math.prod(lead)
    flat = jax.tree.map(lambda a: a.reshape((b,) + a.shape[len(lead):]), tree)
    parts = [f(jax.tree.map(lambda a, i=i: a[i], flat)) for i in range(b)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *parts)
    return jax.tree.map(lambda a: a.reshape(lead + a.shape[1:]), stacked)


def rotate(a: jax.Array, rotation: tuple[int, str] | None, axis: int) -> jax.Array:
    """``a`` rotated by the half-form block Hadamard ``rotation`` along ``axis`` (or as is).

    Differentiable in reverse mode (the transpose written out, as the quantizers do); the other
    operand of such a layer is quantized, which already rules out forward mode."""
    if rotation is None:
        return a
    block, method = rotation
    return saturating_cast(hadamard_transform(a, block, axis=axis, method=method,
                                              explicit_vjp=True), a.dtype)


def init_kernel_scale(kernel: jax.Array, spec: SP.QuantSpec, layout: KernelLayout) -> jax.Array:
    """Initial learned parameter of a kernel ``(*stack, *layout.shape)``.

    Shape ``(*stack, *batch, *scale_shape(spec, (K, N)))``. LSQ: ``2 mean|w| / sqrt(QP)`` per
    block (on the POST grid: the 99th percentile of |w|, ASQ's); PACT: the Gaussian-optimal
    clip times the block RMS.

    References:
      Esser et al., 2020, Learned Step Size Quantization; Choi et al., 2018, PACT.
    """

    def one(m):
        x32 = rotate_like_spec(m.astype(jnp.float32), spec)
        xb, lay = G.to_blocks(x32, spec.granularity)
        if isinstance(spec.estimator, SP.LSQ) and isinstance(spec.format, F.POST):
            # ASQ's released init: the step is POST's clip, the 99th percentile of |w|.
            return S.Percentile(99.0).compute(xb, lay.reduce_axes, spec.format)[0]
        if isinstance(spec.estimator, SP.LSQ):
            return S.lsq_init(xb, spec.format.max_level, lay.reduce_axes)
        rms = jnp.sqrt(jnp.mean(jnp.square(xb), axis=lay.reduce_axes, keepdims=True))
        return S.gaussian_clip(spec.format) * rms + S.RMS_EPS

    return map_matrices(one, layout.to_matrix(kernel))


def init_input_scale(spec: SP.QuantSpec, features: int, stack: tuple[int, ...] = ()) -> jax.Array:
    """Initial learned input parameter, assuming unit-RMS Gaussian inputs (as after RMSNorm).

    LSQ: ``2 E|z| / sqrt(QP) = 2 sqrt(2/pi) / sqrt(QP)``; PACT: the Gaussian-optimal clip.
    Shape ``(*stack)`` for :class:`~qjax.PerTensor`, ``(*stack, features)`` for ``PerAxis(-1)``.
    """
    g = spec.granularity
    if isinstance(g, G.PerTensor):
        shape = ()
    elif isinstance(g, G.PerAxis) and g.axis in (-1, (-1,)):
        shape = (features,)
    else:
        raise ValueError(
            f"a learned input scale needs PerTensor() or PerAxis(-1) granularity, got {g}"
        )
    if isinstance(spec.estimator, SP.LSQ):
        value = 2.0 * math.sqrt(2.0 / math.pi) / math.sqrt(spec.format.max_level)
    else:
        value = S.gaussian_clip(spec.format)
    return jnp.full(tuple(stack) + shape, value, jnp.float32)


def quantize_kernel(kernel: jax.Array, lq: LayerQuant, layout: KernelLayout,
                    scale: jax.Array | None = None, *, key: jax.Array | None = None) -> jax.Array:
    """The kernel ``(*stack, *layout.shape)`` as the layer's op should see it in QAT."""
    if lq.weight is None:
        if lq.rotation is None or layout.kind == "embed":
            return kernel
        return layout.from_matrix(rotate(layout.to_matrix(kernel), lq.rotation, -2))
    m = layout.to_matrix(kernel)
    spec, axis_name = lq.weight, lq.weight_axis_name
    if key is not None and m.ndim > 2:
        key = jax.random.split(key, math.prod(m.shape[:-2])).reshape(m.shape[:-2])
    fq = lambda m2, s, k: fake_quant(m2, spec, scale=s, key=k, axis_name=axis_name)
    return layout.from_matrix(map_matrices(fq, m, scale, key))


def _on_rows(f, x: jax.Array, layout: KernelLayout) -> jax.Array:
    if layout.kind == "conv":
        return f(x)
    rows = layout.input_to_rows(x)
    return layout.rows_to_input(f(rows), x.shape)


# Quantized inputs of the current traces: id(x) -> (weak reference to x, {recipe: (trace, xq)}).
# An entry leaves when its input is freed (the trace that made it is over).
_SHARED_INPUTS: dict[int, tuple[weakref.ref, dict]] = {}


def _forget(table: dict, ident: int, _ref: weakref.ref) -> None:
    table.pop(ident, None)


def _shared_input(x: jax.Array, recipe: Hashable, compute: Callable[[], jax.Array]) -> jax.Array:
    """``compute()``, or the value it gave for this very ``x`` and ``recipe`` in this trace.

    Layers that quantize one input (attention's q, k and v; a SwiGLU's gate and up) then share
    one quantized input, so autodiff sums their cotangents before its backward (a Hadamard
    rotation, a trust mask): one backward pass instead of one per layer. The values are the same;
    the gradient equals the per-layer sum up to float summation order. Only tracers are shared
    (eager arrays would keep their quantized copies alive), and only in the trace that made them
    (a value made inside a scan body must not leak out of it).
    """
    if not isinstance(x, jax.core.Tracer):
        return compute()
    try:
        hash(recipe)
    except TypeError:  # a spec holding an array: not shareable
        return compute()
    trace = current_trace()
    entry = _SHARED_INPUTS.get(id(x))
    if entry is None or entry[0]() is not x:
        # The table is bound now: at interpreter exit the module's globals may be gone.
        forget = functools.partial(_forget, _SHARED_INPUTS, id(x))
        entry = (weakref.ref(x, forget), {})
        _SHARED_INPUTS[id(x)] = entry
    made = entry[1].get(recipe)
    if made is not None and made[0] == trace:
        return made[1]
    xq = compute()
    entry[1][recipe] = (trace, xq)
    return xq


def _row_view(layout: KernelLayout, ndim: int) -> tuple | None:
    """What :func:`_on_rows` does to an input of rank ``ndim`` (part of a sharing key)."""
    return None if layout.kind == "conv" else tuple(map(tuple, layout.x_order(ndim)))


def rotate_input(x: jax.Array, lq: LayerQuant, layout: KernelLayout) -> jax.Array:
    """The input rotated along K (channels for convolutions) by the recipe's half form.

    Shared, as :func:`quantize_input`'s result, by the layers rotating the same traced ``x``.
    """
    if lq.rotation is None:
        return x
    return _shared_input(x, ("rotate", lq.rotation, layout.kind, _row_view(layout, x.ndim)),
                         lambda: _on_rows(lambda r: rotate(r, lq.rotation, -1), x, layout))


def quantize_input(x: jax.Array, lq: LayerQuant, layout: KernelLayout,
                   scale: jax.Array | None = None, *, key: jax.Array | None = None) -> jax.Array:
    """The input as the layer's op should see it in QAT: fake-quantized and/or rotated.

    Without a learned ``scale`` or a ``key`` (both differ per layer) the result is shared by the
    layers that quantize the same traced ``x`` alike (:func:`_shared_input`).
    """
    if lq.activation is None:
        return rotate_input(x, lq, layout)
    spec, axis_name = lq.activation, lq.activation_axis_name
    compute = lambda: _on_rows(  # noqa: E731
        lambda r: fake_quant(r, spec, scale=scale, key=key, axis_name=axis_name), x, layout)
    if scale is not None or key is not None:
        return compute()
    return _shared_input(x, (spec, lq.rotation, axis_name, layout.kind,
                             _row_view(layout, x.ndim)), compute)


def arrange_output(y: jax.Array, x_shape: tuple[int, ...], layout: KernelLayout) -> jax.Array:
    """Rows product ``(*x_free, N)`` -> the layer's output (a reshape, and an einsum's order)."""
    keep, _ = layout.x_order(len(x_shape))
    free = tuple(x_shape[a] for a in keep)
    y = y.reshape(free + layout.out_shape)
    if layout.equation is None:
        return y
    xs, ks, out = layout.labels(len(x_shape))
    canon = [xs[a] for a in keep] + [ks[a] for a in layout.out_axes]
    perm = tuple(canon.index(c) for c in out)
    return y if perm == tuple(range(y.ndim)) else jnp.transpose(y, perm)


def add_bias(y: jax.Array, bias: jax.Array | None, layout: KernelLayout) -> jax.Array:
    """``y + bias`` broadcast as Flax layers do (an einsum's bias over its kernel labels)."""
    if bias is None:
        return y
    bias = jnp.asarray(bias, y.dtype)
    if layout.equation is not None:
        lhs, out = layout.equation.split("->")
        ks, out = lhs.split(",")[1], out.removeprefix("...")
        n_ell = y.ndim - len(out)
        sizes = zip(out, y.shape[n_ell:], strict=True)
        bias = bias.reshape((1,) * n_ell + tuple(d if c in ks else 1 for c, d in sizes))
    return y + bias


def integer_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, lq: LayerQuant,
                  layout: KernelLayout, *, dtype=None, out_sharding=None,
                  key: jax.Array | None = None) -> jax.Array:
    """QAT's integer forward of a dense layer (:func:`qjax._src.qdot.qat_dense` on the row view).

    With ``lq.backward == "int8"`` the gradient matmuls are int8 too, keyed by
    :func:`backward_key` (``key``, or the current :func:`key_source`'s).
    """
    dtype = dtype or jnp.result_type(x, kernel)
    rows = layout.input_to_rows(rotate_input(x.astype(dtype), lq, layout))
    m = rotate(layout.to_matrix(kernel.astype(dtype)), lq.rotation, -2)
    y = qat_dense(rows, m, lq.weight, lq.activation, out_sharding=out_sharding,
                  backward=lq.backward, key=backward_key(lq, key))
    return add_bias(arrange_output(y, x.shape, layout), bias, layout)


def _operands(x, kernel, lq, layout, w_scale, a_scale, qat, dtype):
    check_bool("qat", qat)
    dtype = dtype or jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if qat:
        x = quantize_input(x, lq, layout, a_scale)
        kernel = quantize_kernel(kernel, lq, layout, w_scale)
    return x, kernel, dtype


def dense_op(x, kernel, bias, lq, w_scale, a_scale, *, qat, dtype=None, precision=None,
             out_sharding=None, key=None):
    """``x (..., K) @ kernel (K, N) + bias`` with quantized operands when ``qat``.

    ``out_sharding`` names the output sharding on explicit meshes (as in ``nnx.Linear``); by
    default :func:`qjax._src.typed_sharding.dot_out_spec`. ``key``: see :func:`integer_dense`.
    """
    layout = dense_layout(kernel.shape)
    if qat and lq.integer_forward:
        check_bool("qat", qat)
        return integer_dense(x, kernel, bias, lq, layout, dtype=dtype, out_sharding=out_sharding,
                             key=key)
    x, kernel, dtype = _operands(x, kernel, lq, layout, w_scale, a_scale, qat, dtype)
    y = typed_sharding.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                                   precision=precision, out_sharding=out_sharding)
    return add_bias(y, bias, layout)


def einsum_op(einsum_str, x, kernel, bias, lq, w_scale, a_scale, *, qat, dtype=None,
              precision=None, out_sharding=None, key=None):
    """``einsum(einsum_str, x, kernel) + bias`` with quantized operands when ``qat``."""
    layout = einsum_layout(einsum_str, kernel.shape)
    if qat and lq.integer_forward:
        check_bool("qat", qat)
        return integer_dense(x, kernel, bias, lq, layout, dtype=dtype, out_sharding=out_sharding,
                             key=key)
    x, kernel, dtype = _operands(x, kernel, lq, layout, w_scale, a_scale, qat, dtype)
    y = jnp.einsum(einsum_str, x, kernel, precision=precision, out_sharding=out_sharding)
    return add_bias(y, bias, layout)


def conv_dimension_numbers(x_ndim: int, kernel_ndim: int):
    """Channel-last ``(N, *spatial, C)`` input, ``(*window, C, F)`` kernel."""
    spatial = "".join("HWDXYZ"[i] for i in range(kernel_ndim - 2))
    return jax.lax.ConvDimensionNumbers(*jax.lax.conv_dimension_numbers(
        (1,) * x_ndim, (1,) * kernel_ndim,
        ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")))


def conv_op(x, kernel, bias, lq, w_scale, a_scale, *, qat, strides, padding, kernel_dilation,
            dtype=None, precision=None):
    """Channel-last convolution ``x (N, *spatial, C)``, ``kernel (*window, C, F)``."""
    layout = conv_layout(kernel.shape)
    x, kernel, dtype = _operands(x, kernel, lq, layout, w_scale, a_scale, qat, dtype)
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding, rhs_dilation=kernel_dilation,
        dimension_numbers=conv_dimension_numbers(x.ndim, kernel.ndim), precision=precision,
    )
    return add_bias(y, bias, layout)


def embed_op(ids, table, lq, w_scale, *, qat, dtype=None):
    """Rows of the (fake-quantized when ``qat``) embedding table ``(vocab, features)``."""
    check_bool("qat", qat)
    if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
        raise TypeError(f"embedding ids must be integers, got {jnp.asarray(ids).dtype}")
    table = table.astype(dtype or table.dtype)
    if qat:
        table = quantize_kernel(table, lq, embed_layout(table.shape), w_scale)
    return jnp.take(table, ids, axis=0)


def split_input(args: tuple, kwargs: dict) -> tuple[jax.Array, tuple, dict]:
    """A Flax layer call's input and the rest: ``(x, other args, other kwargs)``; the input is
    the first positional argument or the keyword ``inputs`` (Flax's name for it)."""
    if args:
        return args[0], tuple(args[1:]), kwargs
    if "inputs" in kwargs:
        rest = dict(kwargs)
        return rest.pop("inputs"), (), rest
    raise TypeError("the layer was called without an input (positional or inputs=)")


def check_sizes(sizes: dict[str, object]) -> None:
    """Layer sizes must be positive ints: 0 or a negative size would fail deep inside an
    initializer (a division by zero, a broadcasting error)."""
    for name, value in sizes.items():
        check_pos_int(name, value)


def as_tuple(v, n: int, name: str) -> tuple[int, ...]:
    """``v`` (int or sequence) as an ``n``-tuple of positive ints (strides, sizes)."""
    t = (v,) * n if isinstance(v, int) else tuple(v)
    if len(t) != n:
        raise ValueError(f"{name} must have {n} entries, got {v!r}")
    check_sizes({f"{name}[{i}]": e for i, e in enumerate(t)})
    return t


def scales_for(lq: LayerQuant) -> tuple[bool, bool]:
    """Whether the weight / the activation learns a parameter."""
    return learned(lq.weight), learned(lq.activation)
