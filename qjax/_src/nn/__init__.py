"""Implementation of :mod:`qjax.nn`."""
