"""Quantized layers of a model ("sites"): which layer, which recipe, which kernel layout.

A :class:`Site` is what :func:`qjax.nn.quantize_model` decided for one layer, and what
:mod:`qjax.convert` needs to convert and serve it: the layer's path, its Flax class, its
:class:`~qjax.nn.LayerQuant`, its :class:`~qjax.nn.KernelLayout` (contraction axes) and, for a
stack of layers (``nn.scan``, ``nnx.vmap``), the axes of the stored kernel that index the layers.

:func:`linen_layout` and :func:`nnx_layout` read a Flax layer's kernel layout from its attributes
(Dense, DenseGeneral, Einsum, Conv in Linen; Linear, LinearGeneral, Einsum, Conv in NNX).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
from flax import nnx

from qjax._src.nn.double_rounding import DoubleRounding
from qjax._src.nn.layout import (
    KernelLayout,
    conv_layout,
    dense_layout,
    einsum_layout,
    general_layout,
)
from qjax._src.nn.lowrank import LowRankQAT
from qjax._src.nn.recipe import LayerQuant

__all__ = ["Site", "linen_layout", "nnx_layout", "path_keys", "subtree", "LINEN_TYPES",
           "NNX_TYPES"]

LINEN_TYPES = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)
NNX_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)


@dataclasses.dataclass(frozen=True)
class Site:
    """One quantized layer.

    Attributes:
      path: the layer's path, ``"/"``-joined (Linen module path; NNX attribute path).
      module: the Flax class name (``"Dense"``, ``"Einsum"``, ``"Linear"``, ...).
      recipe: the layer's :class:`~qjax.nn.LayerQuant`.
      layout: its kernel's :class:`~qjax.nn.KernelLayout` (one layer of a stack).
      stacked: axes of the stored kernel that index stacked layers (``()`` when not stacked).
      stack_shape: their sizes.
      param: the kernel's parameter name: ``"kernel"`` for Flax layers; for a module's own
        parameter fed to ``jnp.einsum`` / ``lax.dot_general`` (a "raw" kernel, whose site path is
        the parameter's path ``"<module path>/<param>"``), that parameter's name.
      raw: whether the kernel is such a raw parameter.
      adapter: the layer's weight parametrization, if any: a low-rank QAT recipe
        (:class:`~qjax.nn.lowrank.LowRankQAT`: a frozen tensor plus trained adapters) or a
        multi-precision one (:class:`~qjax.nn.double_rounding.DoubleRounding`).
    """

    path: str
    module: str
    recipe: LayerQuant
    layout: KernelLayout
    stacked: tuple[int, ...] = ()
    stack_shape: tuple[int, ...] = ()
    param: str = "kernel"
    raw: bool = False
    adapter: LowRankQAT | DoubleRounding | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """Parameter-tree keys of the module holding the kernel (``()`` for the root)."""
        keys = path_keys(self.path)
        return keys[:-1] if self.raw else keys

    @property
    def contract_axes(self) -> tuple[int, ...]:
        """Kernel axes contracted with the input (one layer's kernel)."""
        return self.layout.contract

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The stored kernel's shape (stack axes included)."""
        shape = list(self.layout.shape)
        for axis, size in zip(self.stacked, self.stack_shape, strict=True):
            shape.insert(axis, size)
        return tuple(shape)


def path_keys(path: str) -> tuple[str, ...]:
    """``"a/b/c"`` -> ``("a", "b", "c")``; ``""`` (the root module) -> ``()``."""
    return tuple(path.split("/")) if path else ()


def subtree(tree: Mapping, keys: tuple[str, ...], what: str = "params") -> Mapping:
    """The node of the nested mapping ``tree`` at ``keys`` (a layer's parameters).

    Raises:
      ValueError: naming the first missing key: ``what`` do not match the model.
    """
    node = tree
    for i, key in enumerate(keys):
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"{what} have no layer {'/'.join(keys[:i + 1])!r}: they do not "
                             "match the model")
        node = node[key]
    if not isinstance(node, Mapping):
        raise ValueError(f"{what} of layer {'/'.join(keys)!r} are not a mapping: they do not "
                         "match the model")
    return node


def linen_layout(module: nn.Module, kernel_shape: tuple[int, ...], x_ndim: int,
                 einsum_str: str | None = None) -> KernelLayout | None:
    """The layout of a Linen layer's kernel for an input of rank ``x_ndim`` (None: unknown)."""
    if isinstance(module, nn.Dense):
        return dense_layout(kernel_shape)
    if isinstance(module, nn.Conv):
        return conv_layout(kernel_shape)
    if isinstance(module, nn.Einsum):
        eq = einsum_str or module.einsum_str
        return None if eq is None else einsum_layout(eq, kernel_shape)
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
        batch = module.batch_dims if isinstance(module.batch_dims, (tuple, list)) else (
            module.batch_dims,)
        return general_layout(kernel_shape, axis, batch, x_ndim)
    return None


def nnx_layout(module: nnx.Module) -> tuple[KernelLayout, int] | None:
    """(layout of one layer's kernel, number of leading stacked axes) of an NNX layer, or None.

    Stacked layers (``nnx.vmap`` of a constructor) have kernels with extra leading axes.
    """
    if not isinstance(module, NNX_TYPES):
        return None
    stored = tuple(module.kernel[...].shape)
    if isinstance(module, nnx.Linear):
        shape = (module.in_features, module.out_features)
        make = lambda s: dense_layout(s)
    elif isinstance(module, nnx.Conv):
        shape = tuple(module.kernel_shape)
        make = conv_layout
    elif isinstance(module, nnx.Einsum):
        xs_ks = module.einsum_str.replace(" ", "").split("->")[0].split(",")
        shape = stored[len(stored) - len(xs_ks[1]):]
        make = lambda s: einsum_layout(module.einsum_str, s)
    else:  # LinearGeneral
        ins = tuple(module.in_features)
        outs = tuple(module.out_features)
        batch_axis = dict(module.batch_axis)
        shape = tuple(batch_axis.values()) + ins + outs
        make = lambda s: general_layout(s, module.axis, tuple(batch_axis), None)
    lead = len(stored) - len(shape)
    if lead < 0 or stored[lead:] != tuple(shape):
        raise ValueError(f"kernel of shape {stored} does not end in the layer's kernel shape "
                         f"{tuple(shape)}")
    return make(tuple(shape)), lead
