"""Implementation of :mod:`qjax.models`."""
