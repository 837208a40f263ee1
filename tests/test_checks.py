"""The argument checks every public function validates its static arguments with."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from qjax._src._checks import (
    check_axis_name,
    check_bool,
    check_finite_positive,
    check_floating,
    check_int,
    check_number,
    check_pos_int,
    check_real,
)


def test_check_int():
    assert check_int("n", np.int64(3), lo=1) == 3 and type(check_int("n", np.int8(3))) is int
    with pytest.raises(TypeError, match=r"n must be an int >= 1, got True"):
        check_int("n", True, lo=1)
    with pytest.raises(TypeError, match="n must be an int"):
        check_int("n", 2.0)
    with pytest.raises(ValueError, match=r"n must be in \[1, 4\], got 5"):
        check_int("n", 5, 1, 4)
    assert check_pos_int("k", 0, allow_zero=True) == 0
    with pytest.raises(ValueError, match="k must be positive, got 0"):
        check_pos_int("k", 0)
    with pytest.raises(ValueError, match="k must be >= 0, got -1"):
        check_pos_int("k", -1, allow_zero=True)


def test_check_bool():
    assert check_bool("flag", np.bool_(True)) is True
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match="flag must be a bool"):
            check_bool("flag", bad)


def test_check_numbers():
    assert check_number("x", np.float32(0.25)) == 0.25 and check_number("x", 3) == 3.0
    with pytest.raises(TypeError, match="x must be a number"):
        check_number("x", "3")
    assert check_finite_positive("c", np.float32(0.5)) == 0.5
    assert check_finite_positive("c", 2) == 2.0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="c must be positive and finite"):
            check_finite_positive("c", bad)
    for bad in (True, "3", None):
        with pytest.raises(TypeError, match="c must be a number"):
            check_finite_positive("c", bad)
    assert check_real("b1", 0.0, 0.0, 1.0, high_open=True) == 0.0
    for bad in (1.0, -0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"b1 must be a finite real number in \[0, 1\)"):
            check_real("b1", bad, 0.0, 1.0, high_open=True)
    with pytest.raises(TypeError, match="b1 must be a finite real number"):
        check_real("b1", True, 0.0, 1.0)


def test_check_axis_name_and_floating():
    for ok in (None, "data", ("data", "model")):
        check_axis_name("axis_name", ok)
    for bad in (5, (), ("data", 1), ["data"]):
        with pytest.raises(TypeError, match="axis_name must be a mesh axis name"):
            check_axis_name("axis_name", bad)
    check_floating(jnp.zeros(2, jnp.bfloat16), "x")
    with pytest.raises(TypeError, match=r"x must be a floating array .* got dtype int32"):
        check_floating(jnp.zeros(2, jnp.int32), "x")
    with pytest.raises(TypeError, match="w must be a floating array .* got list"):
        check_floating([1.0], "w")
