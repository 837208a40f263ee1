"""Implementation of :mod:`qjax.precision`."""
