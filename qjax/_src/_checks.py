"""Argument checks shared by the public API.

A bad hyper-parameter (a NaN, a bool where a count belongs, a truthy string where a bool belongs)
would otherwise surface much later, as NaN updates or an error far from the argument. These
checks inspect static Python values, dtypes and shapes only, never (possibly traced) array
values. This module imports nothing from qjax, so every other module can use it.
"""

from __future__ import annotations

import math
import numbers

import jax.numpy as jnp
import numpy as np

__all__ = ["check_int", "check_pos_int", "check_bool", "check_number", "check_real",
           "check_finite_positive", "check_axis_name", "check_floating"]


def check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (either bound optional).

    Python and numpy integers are accepted; bools are refused (``True`` is not a count or an axis).
    """
    bounds = (f" in [{lo}, {hi}]" if lo is not None and hi is not None
              else f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else "")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int{bounds}, got {value!r} ({type(value).__name__})")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be{bounds}, got {value}")
    return int(value)


def check_pos_int(name: str, value: object, *, allow_zero: bool = False) -> int:
    """``value`` as an int > 0 (>= 0 with ``allow_zero``)."""
    v = check_int(name, value)
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {v}")
    return v


def check_bool(name: str, value: object) -> bool:
    """``value`` as a bool; any other object is refused (``"no"`` would otherwise mean True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
    return bool(value)


def check_number(name: str, value: object) -> float:
    """``value`` (a Python or numpy int or float, not a bool or a str) as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.number)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_real(name: str, value: object, low: float = -math.inf, high: float = math.inf, *,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float, after checking that it is a finite real number (not a bool) in the
    interval from ``low`` to ``high``, open at an end if ``low_open`` / ``high_open``.

    Raises:
      TypeError: ``value`` is not a real number (strings, bools, arrays, None).
      ValueError: ``value`` is NaN, infinite or outside the interval.
    """
    left = "(" if low_open or math.isinf(low) else "["
    right = ")" if high_open or math.isinf(high) else "]"
    interval = f"{left}{low:g}, {high:g}{right}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.number)):
        raise TypeError(f"{name} must be a finite real number in {interval}, got {value!r} "
                        f"({type(value).__name__})")
    v = float(value)
    above = low < v if low_open else low <= v
    below = v < high if high_open else v <= high
    if not (math.isfinite(v) and above and below):
        raise ValueError(f"{name} must be a finite real number in {interval}, got {value!r}")
    return v


def check_finite_positive(name: str, value: object) -> float:
    """``value`` as a finite float > 0 (a hyper-parameter that scales a step or a clip)."""
    v = check_number(name, value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return v


def check_axis_name(name: str, value: object) -> None:
    """TypeError unless ``value`` is a mesh axis name, a non-empty tuple of names, or None."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
        return
    raise TypeError(f"{name} must be a mesh axis name (str), a non-empty tuple of names or None, "
                    f"got {value!r}")


def check_floating(x: object, name: str = "x") -> None:
    """TypeError unless ``x`` is an array with a floating dtype (integer inputs would truncate)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        got = type(x).__name__ if dtype is None else f"dtype {dtype}"
        raise TypeError(f"{name} must be a floating array (float32, bfloat16, float16), got {got}")
