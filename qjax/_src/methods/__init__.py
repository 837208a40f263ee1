"""Implementation of :mod:`qjax.methods`."""
