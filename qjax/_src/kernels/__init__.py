"""Implementation of :mod:`qjax.kernels`."""
