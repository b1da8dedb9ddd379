"""What the linen and nnx wrappers share: naming the core's parameter leaves and moving
them between the core's NamedTuple tree and a Flax-style nested dict.

A leaf's name is its path through the params: a NamedTuple field gives its name
(``w_x``), a :class:`rnnjax.Bidirectional` gives ``forward`` / ``backward`` and a
:class:`rnnjax.Stack` gives ``layers_0``, ``layers_1``, ...; ``None`` fields (an LSTM
without peepholes) have no leaf. No Flax import here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax import layers
from rnnjax.layers import LAYER_HINT, RNN, Bidirectional, Stack, as_cell, uses_key  # noqa: F401 (re-exported)

Path = tuple[str, ...]


def as_layer(layer: Any, owner: str = "Recurrent") -> Any:
    """``layer`` as a sequence-level layer (:func:`rnnjax.layers.as_layer`); a Flax module is refused."""
    if type(layer).__module__.split(".")[0] == "flax":
        raise TypeError(
            f"{owner}.layer is a Flax module ({type(layer).__name__}); expected {LAYER_HINT}. "
            "Flax cells run over time with flax.linen.RNN / flax.nnx.RNN instead"
        )
    return layers.as_layer(layer, owner)


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return f"item_{key.idx}"
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return f"item_{key.key}"
    return str(key)


def _leaf_path(layer: Any, keypath: tuple) -> Path:
    names = []
    node = layer
    for key in keypath:
        while isinstance(node, RNN):
            node = node.cell
        if isinstance(node, Stack) and isinstance(key, jax.tree_util.SequenceKey):
            names.append(f"layers_{key.idx}")
            node = node.layers[key.idx]
        elif isinstance(node, Bidirectional) and isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
            node = getattr(node, key.name)
        else:  # inside one cell's (or an unknown layer's) params
            names.append(_key_name(key))
            node = None
    return tuple(names)


def leaf_paths(layer: Any, params: Any) -> list[Path]:
    """The name path of every array leaf of ``params``, in ``jax.tree_util.tree_leaves`` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = [_leaf_path(layer, keypath) for keypath, _ in flat]
    seen: set[Path] = set()
    for i, path in enumerate(paths):
        clash = path in seen or any(p[: len(path)] == path or path[: len(p)] == p for p in paths[:i])
        if not path or clash:
            raise ValueError(f"cannot name the parameters of {layer!r}: leaf path {'/'.join(path)!r} is ambiguous")
        seen.add(path)
    return paths


def _structure_uncached(layer: Any, input_size: int, dtype: Any):
    template = jax.eval_shape(lambda: layer.init(jax.random.key(0), input_size, dtype))
    leaves, treedef = jax.tree_util.tree_flatten(template)
    return treedef, tuple(leaf_paths(layer, template)), tuple(leaves)


_structure_cached = functools.lru_cache(maxsize=256)(_structure_uncached)


def structure(layer: Any, input_size: int | None = None, dtype: Any = jnp.float32):
    """``(treedef, paths, shapes)`` of ``layer.init(key, input_size, dtype)``; shapes are
    ``jax.ShapeDtypeStruct`` leaves. The treedef and paths do not depend on ``input_size``;
    ``None``: the size the layer fixes (``fixed_input_size``), else 1."""
    if input_size is None:
        fixed = getattr(layer, "fixed_input_size", lambda: None)()  # user layers may lack it
        input_size = 1 if fixed is None else fixed
    try:
        return _structure_cached(layer, int(input_size), jnp.dtype(dtype))
    except TypeError as e:  # an unhashable user-defined layer
        if "unhashable" not in str(e):
            raise
        return _structure_uncached(layer, int(input_size), jnp.dtype(dtype))


def unwrap(leaf: Any) -> Any:
    """The array inside a Flax box (``nn.Partitioned``, ``nnx.Param``, ``nnx.VariableState``)."""
    if type(leaf).__module__.split(".")[0] != "flax":
        return leaf
    if hasattr(leaf, "unbox"):  # linen AxisMetadata
        return leaf.unbox()
    if hasattr(leaf, "get_value"):  # nnx.Variable, flax >= 0.11
        return leaf.get_value()
    return leaf.value  # nnx.Variable / VariableState, flax 0.10


def nest(paths: list[Path] | tuple[Path, ...], leaves: list[Any]) -> dict:
    """A nested dict with ``leaves[i]`` at ``paths[i]``."""
    tree: dict = {}
    for path, leaf in zip(paths, leaves):
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = leaf
    return tree


def _flat_entries(tree: Any, prefix: Path = ()) -> list[Path]:
    if isinstance(tree, Mapping):
        return [p for k, v in tree.items() for p in _flat_entries(v, (*prefix, str(k)))]
    return [prefix]


def from_core(layer: Any, params: Any) -> dict:
    """The core's params as a nested dict of arrays named by :func:`leaf_paths`."""
    layer = as_layer(layer, "from_core_params")
    treedef, _, _ = structure(layer)
    got = jax.tree_util.tree_structure(params)
    if got != treedef:
        raise ValueError(f"params have structure {got}; expected {treedef} (from {layer!r}.init)")
    return nest(leaf_paths(layer, params), jax.tree_util.tree_leaves(params))


def to_core(layer: Any, tree: Mapping, input_size: int | None = None, dtype: Any = jnp.float32) -> Any:
    """Rebuild the core's params (NamedTuples) from a nested dict named by :func:`leaf_paths`.

    Leaves may be boxed (``nn.Partitioned``, nnx variables); they are unwrapped."""
    layer = as_layer(layer, "to_core_params")
    if not isinstance(tree, Mapping):
        raise TypeError(f"expected a nested dict of parameters, got {type(tree).__name__}")
    treedef, paths, _ = structure(layer, input_size, dtype)
    expected = {"/".join(p) for p in paths}
    present = {"/".join(p) for p in _flat_entries(tree)}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise ValueError(
            f"parameters do not match {layer!r}: missing {missing}, unexpected {unexpected}; "
            f"expected entries {sorted(expected)}"
        )
    leaves = []
    for path in paths:
        node = tree
        for name in path:
            node = node[name]
        leaves.append(unwrap(node))
    return jax.tree_util.tree_unflatten(treedef, leaves)


Partitioning = Callable[[str, tuple], Any] | Mapping[str, Any] | None


def partition_names(spec: Partitioning, path: Path, shape: tuple[int, ...]) -> tuple | None:
    """Axis names for the leaf at ``path`` from ``param_partitioning`` (or ``None``).

    ``spec`` is a mapping from ``"forward/w_x"``-style paths or bare leaf names (``"w_x"``)
    to axis-name tuples, or a callable ``(path: str, shape) -> tuple | None``."""
    if spec is None:
        return None
    name = "/".join(path)
    if isinstance(spec, Mapping):
        names = spec[name] if name in spec else spec.get(path[-1])
    elif callable(spec):
        names = spec(name, tuple(shape))
    else:
        raise TypeError(
            f"param_partitioning must be a mapping from parameter names to axis names or a callable "
            f"(path, shape) -> axis names, got {spec!r}"
        )
    if names is None:
        return None
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(
            f"param_partitioning gives {names} for {name!r} of shape {tuple(shape)}; expected "
            f"{len(shape)} axis names (None for an axis that is not partitioned)"
        )
    return names
