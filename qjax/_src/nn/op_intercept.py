"""Quantize ``jnp.einsum`` / ``lax.dot_general`` calls on a Linen module's own parameters.

A module that contracts its own ``self.param`` with ``jnp.einsum`` or ``jax.lax.dot_general``
(rather than through a Flax layer) has a "raw" kernel. :func:`quantize_model` matches its rules
against such a parameter's path (``"<module path>/<param name>"``, e.g. ``"proj/w"``), so these
kernels are quantized, converted and served like a layer's:

* while a quantized model runs, :func:`patched_ops` routes ``jnp.einsum`` and
  ``jax.lax.dot_general`` through a handler; the handler looks at the innermost running Linen
  module (tracked by the model's method interceptor, :func:`entered`) and, if one operand *is*
  one of that module's parameters (the very array ``self.param`` returned) and the other is the
  input, treats the call as a layer whose kernel is that parameter;
* ``einsum`` with the parameter as either operand (the equation is rewritten to put it second),
  and ``dot_general`` with the parameter as the right-hand operand, are recognised; any other
  call (a child layer's own op, two activations, a parameter transformed before the op) passes
  through unchanged;
* learned scales (LSQ, PACT) need a Flax layer to hold ``kernel_scale`` / ``input_scale``: a
  rule giving one to a raw parameter is refused naming it.

The patch swaps the two module attributes for the duration of a model call (trace time), so it
is process-global while it lasts: do not trace another model in another thread at that moment.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import jax
import jax.numpy as jnp

from qjax._src.nn.layout import KernelLayout, einsum_layout

__all__ = ["patched_ops", "entered", "current_module", "match_raw_call"]

_MODULES = contextvars.ContextVar("qjax_module_stack", default=())
_HANDLING = contextvars.ContextVar("qjax_handling_op", default=False)


@contextlib.contextmanager
def entered(module):
    """Marks ``module`` as the innermost running module (the model's method interceptor)."""
    token = _MODULES.set(_MODULES.get() + (module,))
    try:
        yield
    finally:
        _MODULES.reset(token)


def current_module():
    stack = _MODULES.get()
    return stack[-1] if stack else None


@contextlib.contextmanager
def patched_ops(handler: Callable):
    """Routes ``jnp.einsum`` / ``jax.lax.dot_general`` calls to ``handler(op, args, kwargs,
    original)`` (``op`` is ``"einsum"`` or ``"dot_general"``) while the context is open.

    Calls made by the handler itself (and by the ops it runs) are not routed again.
    """
    originals = {"einsum": jnp.einsum, "dot_general": jax.lax.dot_general}

    def route(op):
        def f(*args, **kwargs):
            if _HANDLING.get():
                return originals[op](*args, **kwargs)
            token = _HANDLING.set(True)
            try:
                return handler(op, args, kwargs, originals[op])
            finally:
                _HANDLING.reset(token)
        return f

    jnp.einsum, jax.lax.dot_general = route("einsum"), route("dot_general")
    try:
        yield
    finally:
        jnp.einsum, jax.lax.dot_general = originals["einsum"], originals["dot_general"]


def _swap_einsum(eq: str) -> str:
    lhs, out = eq.replace(" ", "").split("->")
    a, b = lhs.split(",")
    return f"{b},{a}->{out}"


def match_raw_call(op: str, args: tuple, kwargs: dict, params: dict):
    """The raw kernel in one op call, or None.

    Args:
      op, args, kwargs: the intercepted call.
      params: the running module's own parameters ``{name: value}`` (not its children's).

    Returns:
      ``(name, x, kernel, layout, call)``: the parameter's name, the input, the kernel, a
      function giving the kernel's :class:`KernelLayout` (None if the call has no layout qjax
      knows), and ``call(x, kernel)`` redoing the op with new operands in the original order.
      None when no operand (or both) is one of ``params``.
    """
    def find(a):
        for name, v in params.items():
            if v is a:
                return name
        return None

    if op == "einsum":
        if len(args) != 3 or not isinstance(args[0], str) or "->" not in args[0]:
            return None
        eq, a, b = args
        if eq.count(",") != 1:
            return None
        na, nb = find(a), find(b)
        if nb is not None and na is None:
            return (nb, a, b, lambda: _layout_or_none(lambda: einsum_layout(eq, b.shape)),
                    lambda x, k: jnp.einsum(eq, x, k, **kwargs))
        if na is not None and nb is None:
            swapped = _swap_einsum(eq)
            return (na, b, a, lambda: _layout_or_none(lambda: einsum_layout(swapped, a.shape)),
                    lambda x, k: jnp.einsum(eq, k, x, **kwargs))
        return None
    if len(args) < 2:
        return None
    lhs, rhs = args[0], args[1]
    dims = args[2] if len(args) > 2 else kwargs.get("dimension_numbers")
    name = find(rhs)
    if name is None or find(lhs) is not None or dims is None:
        return None
    (lc, rc), (lb, rb) = dims
    nx, nk = len(lhs.shape), len(rhs.shape)

    def layout():
        return _layout_or_none(lambda: KernelLayout(
            "dense", tuple(rhs.shape), tuple(int(a) % nk for a in rc),
            tuple(int(a) % nk for a in rb), tuple(int(a) % nx - nx for a in lc),
            tuple(int(a) % nx - nx for a in lb)))

    rest = {k: v for k, v in kwargs.items() if k != "dimension_numbers"}
    return (name, lhs, rhs, layout,
            lambda x, k: jax.lax.dot_general(x, k, dims, *args[3:], **rest))


def _layout_or_none(make):
    try:
        return make()
    except ValueError:
        return None
