"""Granularity: which elements share one scale.

This is the one module that knows block layouts. Every granularity turns ``x`` into a *blocked*
view ``xb`` plus the axes of ``xb`` that a scale reduces over; a scale has the shape of ``xb`` with
those axes kept as size 1, so it broadcasts against ``xb``.

* :class:`PerTensor`: one scale for the whole array.
* :class:`PerAxis` ``(axis)``: one scale per index along ``axis`` (an int or a tuple of ints),
  shared across every other axis. Per output channel of a Flax kernel ``(K, N)`` is ``PerAxis(-1)``.
* :class:`PerRow` ``(axis=-1)``: one scale per 1-D slice along ``axis`` (reduce over ``axis``,
  keep the others). Per token for activations ``(..., K)`` is ``PerRow(-1)``; per output channel of
  a weight stored ``(N, K)`` is ``PerRow(-1)`` and of a Flax kernel ``(K, N)`` is ``PerRow(0)``.
* :class:`PerGroup` ``(axis, size)``: ``axis`` split into contiguous groups of ``size``; one scale
  per group and per index of every other axis (sub-channel / block quantization).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from qjax._src import typed_sharding
from qjax._src._checks import check_int

__all__ = ["PerTensor", "PerAxis", "PerRow", "PerGroup", "Granularity", "Layout", "to_blocks",
           "normalize_axis"]


def _check_axis(axis: object, name: str = "axis") -> int:
    return check_int(name, axis)


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """``axis`` in ``[0, ndim)``; ValueError naming ``name`` if out of range."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array of rank {ndim}")
    return axis % ndim


@dataclasses.dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def reduce_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(range(len(shape)))


@dataclasses.dataclass(frozen=True)
class PerAxis:
    """One scale per index along ``axis`` (int or tuple of ints); reduces over the others."""

    axis: int | tuple[int, ...]

    def __post_init__(self):
        if isinstance(self.axis, (tuple, list)):
            if not self.axis:
                raise ValueError("axis must name at least one axis")
            object.__setattr__(self, "axis", tuple(_check_axis(a) for a in self.axis))
        else:
            object.__setattr__(self, "axis", _check_axis(self.axis))

    def reduce_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        kept = {normalize_axis(a, len(shape)) for a in axes}
        return tuple(i for i in range(len(shape)) if i not in kept)


@dataclasses.dataclass(frozen=True)
class PerRow:
    """One scale per 1-D slice along ``axis``: reduces over ``axis`` only."""

    axis: int = -1

    def __post_init__(self):
        object.__setattr__(self, "axis", _check_axis(self.axis))

    def reduce_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (normalize_axis(self.axis, len(shape)),)


@dataclasses.dataclass(frozen=True)
class PerGroup:
    """Groups of ``size`` contiguous elements along ``axis``, one scale per group."""

    axis: int
    size: int

    def __post_init__(self):
        object.__setattr__(self, "axis", _check_axis(self.axis))
        size = _check_axis(self.size, "size")
        if size <= 0:
            raise ValueError(f"group size must be positive, got {size}")
        object.__setattr__(self, "size", size)


Granularity = PerTensor | PerAxis | PerRow | PerGroup
GRANULARITY_TYPES = (PerTensor, PerAxis, PerRow, PerGroup)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How ``x`` of ``shape`` maps to its blocked view.

    Attributes:
      shape: the original shape.
      blocked_shape: the shape of the blocked view ``xb``.
      reduce_axes: axes of ``xb`` a scale reduces over.
    """

    shape: tuple[int, ...]
    blocked_shape: tuple[int, ...]
    reduce_axes: tuple[int, ...]

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of a scale: ``blocked_shape`` with the reduced axes set to 1."""
        return tuple(1 if i in self.reduce_axes else d for i, d in enumerate(self.blocked_shape))

    @property
    def block_elements(self) -> int:
        """Number of elements that share one scale."""
        return int(np.prod([self.blocked_shape[i] for i in self.reduce_axes], dtype=np.int64))

    def block(self, x: jax.Array) -> jax.Array:
        return x.reshape(self.blocked_shape)

    def unblock(self, xb: jax.Array, like: jax.Array | None = None) -> jax.Array:
        """Back to ``shape``; ``like`` (the array before blocking) lends its explicit sharding."""
        return typed_sharding.reshape(xb, self.shape, like)


def layout(granularity: Granularity, shape: tuple[int, ...]) -> Layout:
    """The :class:`Layout` of ``granularity`` for an array of ``shape``.

    Raises:
      TypeError: if ``shape`` is not a sequence of ints.
      ValueError: if a dimension is negative, an axis is out of range or a group size does not
        divide its axis.
    """
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape must be a tuple of ints, got {shape!r} ({type(shape).__name__})")
    shape = tuple(check_int("shape dimension", d, lo=0) for d in shape)
    if isinstance(granularity, PerGroup):
        if not shape:
            raise ValueError("PerGroup needs an array of rank >= 1")
        axis = normalize_axis(granularity.axis, len(shape))
        size = granularity.size
        if shape[axis] % size:
            raise ValueError(
                f"group size {size} does not divide axis {granularity.axis} of size {shape[axis]}"
            )
        blocked = shape[:axis] + (shape[axis] // size, size) + shape[axis + 1 :]
        return Layout(shape, blocked, (axis + 1,))
    if isinstance(granularity, GRANULARITY_TYPES):
        return Layout(shape, shape, granularity.reduce_axes(shape))
    raise TypeError(
        f"granularity must be PerTensor, PerAxis, PerRow or PerGroup, got {granularity!r}"
    )


def to_blocks(x: jax.Array, granularity: Granularity) -> tuple[jax.Array, Layout]:
    """Returns the blocked view of ``x`` and its :class:`Layout`."""
    lay = layout(granularity, x.shape)
    return lay.block(x), lay


def as_granularity(g: Granularity | str) -> Granularity:
    """Returns ``g`` or parses ``"tensor"``, ``"row"`` (per row along the last axis)."""
    if isinstance(g, GRANULARITY_TYPES):
        return g
    if g == "tensor":
        return PerTensor()
    if g in ("row", "token"):
        return PerRow(-1)
    raise ValueError(
        f"unknown granularity {g!r}; pass PerTensor(), PerAxis(axis), PerRow(axis), "
        "PerGroup(axis, size) or one of 'tensor', 'row', 'token'"
    )
