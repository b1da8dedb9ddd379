"""Test helpers that differ across the JAX versions rnnjax supports (pyproject: jax>=0.4.38)."""

import jax

try:
    enable_x64 = jax.enable_x64  # JAX >= 0.6: a context manager taking True/False
except AttributeError:  # older JAX
    from jax.experimental import enable_x64  # noqa: F401  (re-exported)
