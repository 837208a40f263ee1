"""Walking a jaxpr for tests that check what a function compiles to."""

from __future__ import annotations

from collections.abc import Iterator


def equations(jaxpr, in_scan: bool = False) -> Iterator[tuple[object, bool]]:
    """``(eqn, inside_a_scan)`` for every equation of ``jaxpr`` (a ``Jaxpr``) and of the jaxprs
    nested in its equations' parameters (jit, scan, custom_vjp, cond branches)."""
    for eqn in jaxpr.eqns:
        yield eqn, in_scan
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr, or a Jaxpr itself
                if hasattr(inner, "eqns"):
                    yield from equations(inner, in_scan or eqn.primitive.name == "scan")
