"""Implementation of :mod:`qjax.convert`."""
