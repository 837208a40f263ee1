"""Running a Linen model with its layers (and raw einsum / dot_general calls) routed to handlers.

:func:`run_linen` is the one interception both QAT (:mod:`qjax._src.nn.rewrite`) and serving
(:mod:`qjax.convert.serve`) use: a ``flax.linen.intercept_methods`` interceptor hands each matched
layer's ``__call__`` to a handler, which typically runs the layer's own op through
:func:`call_linen_layer` on substituted parameters (a quantized or dequantized kernel), and
:mod:`qjax._src.nn.op_intercept` routes ``jnp.einsum`` / ``lax.dot_general`` calls on a module's own
parameters to an op handler.

Each handler runs inside an :func:`qjax._src.nn.ops.key_source` of its module: a layer with a
quantized backward (``backward="int8"``) that is given no key draws one from the module's
``"quant"`` rng stream (:func:`quant_key`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax

from qjax._src.nn import ops
from qjax._src.nn.op_intercept import current_module, entered, match_raw_call, patched_ops
from qjax._src.nn.recipe import LayerQuant, learned
from qjax._src.nn.site import LINEN_TYPES

__all__ = ["run_linen", "call_linen_layer", "layer_params", "own_params", "raw_site_call",
           "create_input_scale", "quant_key"]

_INNER_APPLY = contextvars.ContextVar("qjax_inner_apply", default=False)


def call_linen_layer(module: nn.Module, params: Mapping, *args, **kwargs):
    """Runs a bound Linen layer's own ``__call__`` on ``params`` (e.g. a substituted kernel).

    Used inside an interceptor: the call is not intercepted again.
    """
    token = _INNER_APPLY.set(True)
    try:
        return module.clone(parent=None).apply({"params": dict(params)}, *args, **kwargs)
    finally:
        _INNER_APPLY.reset(token)


def layer_params(module: nn.Module) -> dict:
    return dict(nn.unbox(module.variables.get("params", {})))


def own_params(module: nn.Module) -> dict:
    """A module's own parameters (not its children's), as ``self.param`` returns them."""
    if module.scope is None:
        return {}
    # Unboxed (nn.Partitioned etc.): the very arrays ``self.param`` returned.
    return {k: nn.unbox(v) for k, v in module.variables.get("params", {}).items()
            if not isinstance(v, Mapping)}


def quant_key(m: nn.Module) -> jax.Array | None:
    """A key from bound module ``m``'s ``"quant"`` rng stream (:data:`qjax.nn.ops.QUANT_RNG`), or
    None when the ``init`` / ``apply`` was given no such stream.

    ``make_rng`` folds the module's path and a per-module call count into the stream's key, so
    layers and repeated calls get different keys, and the same ``rngs`` give the same keys. The
    stream is checked by name: Flax's fallback to ``"params"`` would key the noise by the
    initialization seed.
    """
    return m.make_rng(ops.QUANT_RNG) if m.has_rng(ops.QUANT_RNG) else None


def run_linen(model: nn.Module, method: Callable, handler: Callable, sites: Mapping | None,
              op_handler: Callable | None = None):
    """Runs ``method()`` (an ``init``/``apply`` of ``model``) with each Linen layer's call routed
    to ``handler(site, module, args, kwargs, next_fun)``; ``sites=None`` routes every layer
    of :data:`LINEN_TYPES` (with ``site=None``). With ``op_handler``, ``jnp.einsum`` and
    ``lax.dot_general`` calls are routed to ``op_handler(module, op, args, kwargs, original)``
    with the innermost running module that is not a Flax layer (:mod:`qjax._src.nn.op_intercept`).
    """

    def intercept(next_fun, a, kw, context):
        m = context.module
        with entered(m):
            if _INNER_APPLY.get() or context.method_name != "__call__" or not isinstance(
                    m, LINEN_TYPES):
                return next_fun(*a, **kw)
            a, rest, kw = ops.split_input(a, kw)  # the input positional, as handlers take it
            a = (a,) + rest
            site = None if sites is None else sites.get("/".join(m.path))
            if sites is not None and (site is None or site.raw):
                return next_fun(*a, **kw)
            with ops.key_source(lambda: quant_key(m)):
                return handler(site, m, a, kw, next_fun)

    def route_op(op, args, kwargs, original):
        m = current_module()
        if _INNER_APPLY.get() or m is None or isinstance(m, LINEN_TYPES) or m.scope is None:
            return original(*args, **kwargs)
        with ops.key_source(lambda: quant_key(m)):
            return op_handler(m, op, args, kwargs, original)

    ops_context = patched_ops(route_op) if op_handler else contextlib.nullcontext()
    with nn.intercept_methods(intercept), ops_context:
        return method()


def raw_site_call(sites: Mapping, m: nn.Module, op: str, args, kwargs):
    """``(site, x, kernel, call)`` of an intercepted op on a raw kernel of ``sites``, or None."""
    hit = match_raw_call(op, args, kwargs, own_params(m))
    if hit is None:
        return None
    name, x, kernel, _, call = hit
    site = sites.get("/".join(tuple(m.path) + (name,)))
    return None if site is None or not site.raw else (site, x, kernel, call)




def create_input_scale(m: nn.Module, lq: LayerQuant, layout, x) -> None:
    """Creates a learned ``input_scale`` in layer ``m``'s scope (at ``init``) if ``lq`` learns
    one, for the input ``x`` (a per-channel scale has one entry per feature of the row view,
    or per input channel of a convolution, all groups included)."""
    if learned(lq.activation):
        feats = x.shape[-1] if layout.kind == "conv" else layout.k
        m.param("input_scale", lambda _: ops.init_input_scale(lq.activation, feats))
