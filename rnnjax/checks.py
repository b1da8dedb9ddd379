"""Checks of the arguments the library takes: ints, numbers, floating inputs, optimizers.

Each raises at call time with a message naming the argument and the value it got, e.g.
``ValueError("steps must be a non-negative int, got -1")``. Python ``bool`` is never
accepted as a number; NumPy integer and floating scalars are.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "check_finite_number",
    "check_float_input",
    "check_nonnegative_int",
    "check_nonnegative_number",
    "check_optimizer",
    "check_positive_int",
    "check_positive_number",
    "is_int",
    "is_real_number",
]


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy integer (not a ``bool``)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real_number(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy integer or float (not a ``bool``)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _fail(value: Any, name: str, kind: str, note: str | None, optional: bool) -> None:
    note = f" ({note})" if note else ""
    none = " or None" if optional else ""
    raise ValueError(f"{name} must be a {kind}{note}{none}, got {value!r}")


def check_positive_int(value: Any, name: str, *, note: str | None = None, optional: bool = False) -> None:
    """``value`` is an int ``>= 1`` (or ``None`` when ``optional``); ``note`` follows the
    expectation in the message: ``"chunk_size must be a positive int (steps per chunk), got 0"``."""
    if optional and value is None:
        return
    if not is_int(value) or value <= 0:
        _fail(value, name, "positive int", note, optional)


def check_nonnegative_int(value: Any, name: str, *, note: str | None = None, optional: bool = False) -> None:
    """``value`` is an int ``>= 0`` (or ``None`` when ``optional``); ``note`` as in
    :func:`check_positive_int`."""
    if optional and value is None:
        return
    if not is_int(value) or value < 0:
        _fail(value, name, "non-negative int", note, optional)


def check_positive_number(value: Any, name: str, *, finite: bool = True, optional: bool = False) -> None:
    """``value`` is a real number ``> 0`` (NaN is not), finite unless ``finite=False``
    (``inf`` allowed), or ``None`` when ``optional``."""
    if optional and value is None:
        return
    if not is_real_number(value) or (finite and not math.isfinite(value)) or not value > 0:
        _fail(value, name, "positive finite number" if finite else "positive number", None, optional)


def check_nonnegative_number(value: Any, name: str) -> None:
    """``value`` is a real number ``>= 0`` (``inf`` allowed, NaN not)."""
    if not is_real_number(value) or not value >= 0:
        _fail(value, name, "non-negative number", None, False)


def check_finite_number(value: Any, name: str) -> None:
    """``value`` is a finite real number of any sign."""
    if not is_real_number(value) or not math.isfinite(value):
        _fail(value, name, "finite number", None, False)


def check_float_input(x: jax.Array, name: str = "x") -> None:
    """``x`` (an array or a scalar) has a real floating dtype; raises ``TypeError`` naming the cast."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} has dtype {dtype}; expected a floating dtype (float32, bfloat16, ...). "
            f"Cast it, e.g. {name}.astype(jnp.float32)"
        )


def check_optimizer(optimizer: Any, example: str = "optax.adam(1e-3)") -> None:
    """``optimizer`` has callable ``init`` and ``update``, as an ``optax.GradientTransformation``;
    ``example`` is the one the ``TypeError`` suggests."""
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"optimizer must be an optax.GradientTransformation (e.g. {example}), got {optimizer!r}")
