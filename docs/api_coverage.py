"""Which public names (``__all__`` of the public modules) no API page lists.

Shared by ``conf.py`` (``make docs`` fails on such a name) and ``tests/test_docs.py`` (so
``make test`` fails on it too, without Sphinx installed).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

DOCS = Path(__file__).resolve().parent

# Modules whose every __all__ name must appear in an autosummary table of docs/api/*.md.
PUBLIC_MODULES = [
    "rnnjax", "rnnjax.cells", "rnnjax.train", "rnnjax.inspect", "rnnjax.interop",
    "rnnjax.distributed", "rnnjax.parallel", "rnnjax.linear_attention", "rnnjax.flax.linen", "rnnjax.flax.nnx",
    "rnnjax.equinox",
]


def documented_names() -> set[str]:
    """``module.name`` of every entry of an autosummary table in docs/api/*.md."""
    names, module, in_table = set(), None, False
    for page in sorted((DOCS / "api").glob("*.md")):
        for line in page.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(".. currentmodule::"):
                module = stripped.split("::", 1)[1].strip()
            elif stripped.startswith(".. autosummary::"):
                in_table = True
            elif in_table and stripped.startswith("```"):
                in_table = False
            elif in_table and stripped and not stripped.startswith(":"):
                names.add(f"{module}.{stripped}")
    return names


def undocumented_names() -> list[str]:
    """``module.name`` of each public name (subpackages aside) that no API page lists."""
    documented, missing = documented_names(), []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if inspect.ismodule(getattr(module, name)):
                continue  # subpackages have pages of their own
            if f"{module_name}.{name}" not in documented:
                missing.append(f"{module_name}.{name}")
    return missing
