"""Shared test settings: float32 matmuls at full precision, hypothesis profile for CI."""

import os

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_default_matmul_precision", "highest")

settings.register_profile(
    "qjax",
    max_examples=int(os.environ.get("QJAX_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("qjax")
