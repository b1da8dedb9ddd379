"""Flax modules around rnnjax cells and layers: ``rnnjax.flax.linen`` and ``rnnjax.flax.nnx``.

Import the one you use (each imports only its own Flax API)::

    from rnnjax.flax import linen as rjl
    from rnnjax.flax import nnx as rjn

The modules hold parameters only and call the core (``layer.apply``, ``cell.step``) for
every computation. ``import rnnjax`` does not import this package; it needs the extra
``rnnjax[flax]``.
"""

import importlib

from rnnjax.optional import require

require("flax", "rnnjax.flax")  # runs before either submodule: a clear error without rnnjax[flax]

__all__ = ["linen", "nnx"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"rnnjax.flax.{name}")
    raise AttributeError(f"module 'rnnjax.flax' has no attribute {name!r}")
