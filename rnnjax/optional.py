"""Optional dependencies: the extras that bring them and the error that names the extra.

The core (``pip install rnnjax``) needs only JAX, NumPy and Optax. The Flax modules need
``rnnjax[flax]``, the Equinox modules ``rnnjax[equinox]``, checkpoints ``rnnjax[checkpoint]``,
the weight loaders their own library (``rnnjax[torch]``, ``rnnjax[keras]``); ``rnnjax[all]``
brings every one.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# The distribution each optional module comes from, and the extra that installs it.
EXTRAS = {
    "flax": ("flax", "flax"),
    "equinox": ("equinox", "equinox"),
    "orbax.checkpoint": ("orbax-checkpoint", "checkpoint"),
    "torch": ("torch", "torch"),
    "keras": ("keras", "keras"),
    "matplotlib": ("matplotlib", "plot"),
}


def require(module: str, needed_by: str) -> ModuleType:
    """Import ``module`` (a key of :data:`EXTRAS`), or raise an ``ImportError`` that names the
    extra to install.

    Example:
      >>> from rnnjax.optional import require
      >>> require("numpy.linalg", "this example")  # doctest: +IGNORE_EXCEPTION_DETAIL
      Traceback (most recent call last):
        ...
      KeyError: 'numpy.linalg is not an optional dependency of rnnjax'
    """
    if module not in EXTRAS:
        raise KeyError(f"{module} is not an optional dependency of rnnjax")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package, extra = EXTRAS[module]
        raise ImportError(
            f"{needed_by} needs {package}, which is not installed: pip install 'rnnjax[{extra}]' "
            f"(or 'rnnjax[all]' for every optional dependency)"
        ) from err
