"""How a layer's kernel meets its input: the kernel's matrix view ``(*batch, K, N)``.

Every quantized layer (Dense, DenseGeneral, Einsum, Conv, in Linen or NNX, stacked by a scan or
not) is quantized, converted and served through one canonical view of its kernel: a matrix whose
rows ``K`` are the contracted axes flattened in order, whose columns ``N`` are the remaining
(output) axes flattened, with any dot-general batch axes (an einsum's shared labels, e.g. experts)
in front. A :class:`KernelLayout` records that view for one layer's kernel of ``shape``:

* ``contract``: kernel axes contracted with the input, in K order (row-major flattening);
* ``batch``: kernel axes shared with the input and the output (``lax.dot_general`` batch dims);
* ``out_axes``: the others, in order (flattened into N);
* ``x_contract`` / ``x_batch``: the input axes matching ``contract`` / ``batch``, counted from the
  end (negative), or None for a convolution (whose K = window x channels is not a set of input
  axes).

Weight scales are computed on the matrix view, so "per output channel" is one scale per column of
``(K, N)`` whatever the kernel's rank, a group runs along K, and the axes of a ``QuantSpec`` for
a weight always refer to the 2-D ``(K, N)`` matrix. Extra **leading** axes of an array passed to
:meth:`to_matrix` (a stack of layers from ``nn.scan`` / ``nnx.vmap``) are kept in front as batch
axes: scales never reduce over them.

For a convolution ``(*window, C, F)``, K is ``window x C`` flattened with C fastest, so a
Hadamard block or a group that divides C stays inside one kernel tap: rotating K in blocks of
``b | C`` is rotating the input channels, which the input side does along its last axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

__all__ = ["KernelLayout", "dense_layout", "general_layout", "einsum_layout", "conv_layout",
           "embed_layout"]

Kind = Literal["dense", "conv", "embed"]


def _prod(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """The matrix view of one layer's kernel (see the module docstring).

    Attributes:
      kind: ``"dense"`` (a dot-general with the input: Dense, DenseGeneral, Einsum),
        ``"conv"`` (channel-last convolution) or ``"embed"`` (a table looked up by id).
      shape: the kernel's shape as the layer's op sees it (one layer of a stack).
      contract: kernel axes contracted with the input, in K order.
      batch: kernel axes shared with the input and the output.
      x_contract, x_batch: the matching input axes, negative (from the end); None for conv/embed.
      equation: an einsum's equation (its output order and bias broadcast), else None.
    """

    kind: Kind
    shape: tuple[int, ...]
    contract: tuple[int, ...]
    batch: tuple[int, ...] = ()
    x_contract: tuple[int, ...] | None = None
    x_batch: tuple[int, ...] | None = None
    equation: str | None = None

    def __post_init__(self):
        if self.kind not in ("dense", "conv", "embed"):
            raise ValueError(f"kind must be 'dense', 'conv' or 'embed', got {self.kind!r}")
        if self.x_contract is not None and len(self.x_contract) != len(self.contract):
            raise ValueError(f"x_contract {self.x_contract} must match contract {self.contract}")
        if self.x_batch is not None and len(self.x_batch) != len(self.batch):
            raise ValueError(f"x_batch {self.x_batch} must match batch {self.batch}")
        x_axes = (self.x_contract or ()) + (self.x_batch or ())
        if len(set(x_axes)) != len(x_axes):
            raise ValueError(f"input axes {x_axes} must be distinct")
        nd = len(self.shape)
        axes = self.contract + self.batch
        if len(set(axes)) != len(axes) or any(not 0 <= a < nd for a in axes):
            raise ValueError(f"contract {self.contract} and batch {self.batch} must be distinct "
                             f"axes of a kernel of shape {self.shape}")
        if not self.contract:
            raise ValueError(f"a kernel of shape {self.shape} must contract at least one axis")

    @property
    def out_axes(self) -> tuple[int, ...]:
        used = set(self.contract) | set(self.batch)
        return tuple(a for a in range(len(self.shape)) if a not in used)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.batch)

    @property
    def k(self) -> int:
        """Rows of the matrix view: the contracted size."""
        return _prod(self.shape[a] for a in self.contract)

    @property
    def n(self) -> int:
        """Columns of the matrix view: the output features."""
        return _prod(self.shape[a] for a in self.out_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.out_axes)

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """``(*batch, K, N)``."""
        return self.batch_shape + (self.k, self.n)

    @property
    def channels(self) -> int:
        """Size of the innermost contracted axis: a Hadamard block or group along K that
        divides it never mixes two of the outer contracted indices (conv taps, heads)."""
        return self.shape[self.contract[-1]]

    def _lead(self, a: jax.Array) -> int:
        lead = a.ndim - len(self.shape)
        if lead < 0 or tuple(a.shape[lead:]) != self.shape:
            raise ValueError(f"kernel of shape {a.shape} does not end in the layer's kernel "
                             f"shape {self.shape}")
        return lead

    def to_matrix(self, kernel: jax.Array) -> jax.Array:
        """``(*stack, *shape)`` -> ``(*stack, *batch, K, N)`` (a transpose and a reshape)."""
        lead = self._lead(kernel)
        perm = tuple(range(lead)) + tuple(lead + a for a in
                                          self.batch + self.contract + self.out_axes)
        if perm != tuple(range(kernel.ndim)):
            kernel = jnp.transpose(kernel, perm)
        return kernel.reshape(kernel.shape[:lead] + self.matrix_shape)

    def from_matrix(self, m: jax.Array) -> jax.Array:
        """Inverse of :meth:`to_matrix`."""
        lead = m.ndim - len(self.matrix_shape)
        if lead < 0 or tuple(m.shape[lead:]) != self.matrix_shape:
            raise ValueError(f"matrix of shape {m.shape} does not end in {self.matrix_shape}")
        order = self.batch + self.contract + self.out_axes
        permuted = tuple(self.shape[a] for a in order)
        m = m.reshape(m.shape[:lead] + permuted)
        inv = [0] * len(order)
        for i, a in enumerate(order):
            inv[a] = i
        perm = tuple(range(lead)) + tuple(lead + i for i in inv)
        return m if perm == tuple(range(m.ndim)) else jnp.transpose(m, perm)

    def labels(self, x_ndim: int) -> tuple[str, str, str]:
        """An einsum's (input, kernel, output) labels, an input ellipsis spelled out as
        ``x_ndim - len(input labels)`` private labels."""
        lhs, out = self.equation.split("->")
        xs, ks = lhs.split(",")
        ell = "".join(chr(0x2460 + i) for i in range(x_ndim - len(xs.removeprefix("..."))))
        return (ell + xs.removeprefix("..."), ks,
                (ell + out.removeprefix("...")) if xs.startswith("...") else out)

    def x_order(self, ndim: int) -> tuple[list[int], list[int]]:
        """(input axes kept in front: batch then free, input axes contracted in K order)."""
        if self.x_contract is None:
            raise ValueError(f"a {self.kind} layer has no row view of its input")
        con = [a % ndim for a in self.x_contract]
        bat = [a % ndim for a in (self.x_batch or ())]
        free = [a for a in range(ndim) if a not in con and a not in bat]
        return bat + free, con

    def input_to_rows(self, x: jax.Array) -> jax.Array:
        """Input ``x`` -> ``(*x_batch, *x_free, K)``: contracted axes last, in K order."""
        keep, con = self.x_order(x.ndim)
        perm = tuple(keep + con)
        xt = x if perm == tuple(range(x.ndim)) else jnp.transpose(x, perm)
        return xt.reshape(xt.shape[:len(keep)] + (self.k,))

    def rows_to_input(self, rows: jax.Array, x_shape: tuple[int, ...]) -> jax.Array:
        """Inverse of :meth:`input_to_rows` for an input of ``x_shape``."""
        keep, con = self.x_order(len(x_shape))
        perm = keep + con
        xt = rows.reshape(tuple(x_shape[a] for a in perm))
        inv = [0] * len(perm)
        for i, a in enumerate(perm):
            inv[a] = i
        return xt if perm == list(range(len(x_shape))) else jnp.transpose(xt, inv)


def dense_layout(shape: Sequence[int]) -> KernelLayout:
    """``nn.Dense`` / ``nnx.Linear``: kernel ``(K, N)``, input's last axis contracted."""
    shape = tuple(int(d) for d in shape)
    if len(shape) != 2:
        raise ValueError(f"a Dense kernel is (K, N), got shape {shape}")
    return KernelLayout("dense", shape, (0,), (), (-1,), ())


def general_layout(shape: Sequence[int], axis: Sequence[int], batch_dims: Sequence[int],
                   x_ndim: int | None = None) -> KernelLayout:
    """``nn.DenseGeneral`` / ``nnx.LinearGeneral``: kernel ``(*batch, *in, *out)``.

    ``axis`` are the input axes contracted (in the kernel's ``in`` order) and ``batch_dims`` the
    input's batch axes (in order), for an input of rank ``x_ndim`` (None: take the axes as
    given, negative ones counted from the end).
    """
    shape = tuple(int(d) for d in shape)
    # Flax sorts the contracted axes before it builds the kernel and calls dot_general.
    if x_ndim is not None:
        axis = tuple(a - x_ndim for a in sorted(a % x_ndim for a in axis))
        batch_dims = tuple(a - x_ndim for a in sorted(a % x_ndim for a in batch_dims))
    else:
        for name, axes in (("axis", axis), ("batch_dims", batch_dims)):
            if len({a < 0 for a in axes}) > 1:
                raise ValueError(f"{name}={tuple(axes)} mixes negative and non-negative axes; "
                                 "without the input's rank give them with one sign")
        axis, batch_dims = tuple(sorted(axis)), tuple(sorted(batch_dims))
    axis, batch_dims = tuple(axis), tuple(batch_dims)
    nb, nc = len(batch_dims), len(axis)
    if nb + nc >= len(shape) or len(set(axis + batch_dims)) != nb + nc:
        raise ValueError(f"axis {axis} and batch_dims {batch_dims} do not fit a kernel of shape "
                         f"{shape}")
    return KernelLayout("dense", shape, tuple(range(nb, nb + nc)), tuple(range(nb)), axis,
                        batch_dims)


def einsum_layout(einsum_str: str, shape: Sequence[int]) -> KernelLayout:
    """A two-operand einsum ``"<x>,<kernel>-><out>"`` with the kernel second.

    Raises:
      ValueError: not a two-operand einsum with an explicit output, an ellipsis in the kernel or
        after the input's labels, a repeated label, or no contracted label.
    """
    s = einsum_str.replace(" ", "") if isinstance(einsum_str, str) else None
    if not s or "->" not in s or s.count(",") != 1:
        raise ValueError(f"einsum_str must look like 'x,kernel->out', got {einsum_str!r}")
    lhs, out = s.split("->")
    xs, ks = lhs.split(",")
    if "..." in ks or any("..." in t and not t.startswith("...") or t.count("...") > 1
                          for t in (xs, out)):
        raise ValueError(f"in {einsum_str!r} an ellipsis may only lead the input's and the "
                         "output's labels")
    lhs_x = xs
    xs = xs.removeprefix("...")
    out = out.removeprefix("...")
    if lhs_x.startswith("...") != s.split("->")[1].startswith("..."):
        raise ValueError(f"{einsum_str!r}: an input ellipsis must lead the output too")
    for labels in (xs, ks, out):
        if len(set(labels)) != len(labels):
            raise ValueError(f"{einsum_str!r}: repeated labels are not supported")
    shape = tuple(int(d) for d in shape)
    if len(ks) != len(shape):
        raise ValueError(f"{einsum_str!r}: kernel labels {ks!r} do not match shape {shape}")
    one_sided = [c for c in xs + ks if c not in out and (c in xs) != (c in ks)]
    if one_sided:
        raise ValueError(f"{einsum_str!r}: labels {''.join(one_sided)!r} are summed on one side "
                         "only; qjax quantizes einsums 'x,kernel->out' whose non-output labels "
                         "are contracted between the two operands")
    contract = tuple(i for i, c in enumerate(ks) if c in xs and c not in out)
    batch = tuple(i for i, c in enumerate(ks) if c in xs and c in out)
    if not contract:
        raise ValueError(f"{einsum_str!r}: the kernel contracts no input axis")
    n = len(xs)
    x_contract = tuple(xs.index(ks[i]) - n for i in contract)
    x_batch = tuple(xs.index(ks[i]) - n for i in batch)
    return KernelLayout("dense", shape, contract, batch, x_contract, x_batch, s)


def conv_layout(shape: Sequence[int]) -> KernelLayout:
    """Channel-last convolution kernel ``(*window, C_in / groups, F)``."""
    shape = tuple(int(d) for d in shape)
    if len(shape) < 3:
        raise ValueError(f"a conv kernel is (*window, C, F), got shape {shape}")
    return KernelLayout("conv", shape, tuple(range(len(shape) - 1)))


def embed_layout(shape: Sequence[int]) -> KernelLayout:
    """Embedding table ``(vocab, features)``: rows are quantized along ``features`` (K)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) != 2:
        raise ValueError(f"an embedding table is (vocab, features), got shape {shape}")
    return KernelLayout("embed", shape, (1,))
