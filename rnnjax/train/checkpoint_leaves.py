"""How each leaf of a state is stored by orbax and read back, and the checks against a model.

A checkpoint's record lists every leaf: its path (``"params/rnn/w_x"``), shape and dtype,
and the shape and dtype orbax stores. They differ where orbax (tensorstore) cannot store
the value as it is:

- a typed PRNG key (``jax.random.key``, dtype ``key<fry>``) is stored as its key data
  (uint32, the key's shape plus the impl's) with the impl's name, and comes back as a typed
  key of that impl; a raw ``jax.random.PRNGKey`` is an ordinary uint32 array;
- integers tensorstore lacks (``uint2``, ``uint4``) are stored as uint8 values, 8-bit
  floats it lacks (``float8_e4m3``) as their bits in uint8;
- a zero-size array is not stored (orbax refuses them); its shape and dtype rebuild it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.checks import is_int

PyTree = Any
Spec = tuple[tuple[int, ...], str | None]  # (shape, dtype name); None: not known

__all__ = [
    "check_matches",
    "check_records",
    "decode",
    "encode",
    "leaf_paths",
    "model_specs",
    "orbax_specs",
    "restore_target",
]


def _key_str(key: Any) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """``[("params/w_h", leaf), ...]`` in the tree's flattening order."""
    return [("/".join(_key_str(k) for k in path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _dtype_name(leaf: Any) -> str:
    return str(leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf))


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def model_specs(tree: PyTree) -> dict[str, Spec]:
    """``{"params/w_h": (shape, dtype name), ...}`` of a model's state (arrays, abstract
    arrays or Python scalars)."""
    return {path: (tuple(np.shape(leaf)), _dtype_name(leaf)) for path, leaf in leaf_paths(tree)}


def _storable(dtype: np.dtype) -> bool:
    import tensorstore

    try:
        tensorstore.dtype(np.dtype(dtype).name)
    except (ValueError, TypeError):
        return False
    return True


def _stored_dtype(dtype: np.dtype) -> np.dtype | None:
    """The dtype orbax stores an array of ``dtype`` as; None where it cannot."""
    if _storable(dtype):
        return dtype
    if jnp.issubdtype(dtype, jnp.integer) and dtype.itemsize == 1:  # sub-byte integers
        return np.dtype(np.int8 if jnp.issubdtype(dtype, jnp.signedinteger) else np.uint8)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits == 8:  # as their bits
        return np.dtype(np.uint8)
    return None


def _to_storable(value: Any, path: str) -> Any:
    dtype = np.dtype(value.dtype)
    stored = _stored_dtype(dtype)
    if stored is None:
        raise TypeError(
            f"state's array at {path} has dtype {dtype}, which orbax cannot store; cast it (e.g. to float32)"
        )
    if stored == dtype:
        return value
    if jnp.issubdtype(dtype, jnp.integer):
        return value.astype(stored)
    return (
        np.asarray(value).view(stored) if isinstance(value, np.ndarray) else jax.lax.bitcast_convert_type(value, stored)
    )


def encode(state: PyTree) -> tuple[PyTree, list[dict[str, Any]]]:
    """The tree orbax saves (``state`` with converted leaves; None for zero-size ones) and
    the records of its leaves.

    Raises:
      TypeError: a leaf's dtype can be stored neither as it is nor converted.
    """
    stored, records = [], []
    for path, leaf in leaf_paths(state):
        record: dict[str, Any] = {"path": path, "shape": list(np.shape(leaf)), "dtype": _dtype_name(leaf)}
        value = leaf
        if _is_key(leaf):
            record["key_impl"] = str(jax.random.key_impl(leaf))
            value = jax.random.key_data(leaf)
        elif hasattr(leaf, "dtype"):
            value = _to_storable(leaf, path)
        record["stored_shape"], record["stored_dtype"] = list(np.shape(value)), _dtype_name(value)
        if np.size(value) == 0:
            record["empty"] = True
            value = None
        stored.append(value)
        records.append(record)
    return jax.tree.unflatten(jax.tree.structure(state), stored), records


_FIELDS = {"path": str, "shape": list, "dtype": str, "stored_shape": list, "stored_dtype": str}


def check_records(records: list[Any]) -> None:
    """Raise ValueError naming the first leaf record that lacks a field :func:`encode` writes,
    or whose stored shape and dtype are not what :func:`encode` makes of its shape and dtype."""
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"leaf {i} is a {type(record).__name__}, not a dict")
        for field, kind in _FIELDS.items():
            if not isinstance(record.get(field), kind):
                raise ValueError(f"leaf {i} ({record.get('path', '?')}) has no {kind.__name__} {field!r}")
        try:
            _check_storage(record)
        except ValueError as e:
            raise ValueError(f"leaf {i} ({record['path']}) {e}") from None


@functools.cache
def _key_spec(impl: str) -> tuple[str, tuple[int, ...], str] | None:
    """A typed key's dtype name, and its data's shape and dtype name, for a PRNG impl's name;
    None for a name JAX does not know (a user's impl: not checked)."""
    try:
        key = jax.eval_shape(lambda: jax.random.key(0, impl=impl))
        data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl)))
    except (ValueError, TypeError):
        return None
    return str(key.dtype), tuple(data.shape), str(data.dtype)


def _check_storage(record: dict[str, Any]) -> None:
    """Raise ValueError unless the record's stored shape and dtype are :func:`encode`'s."""
    shape, stored_shape = record["shape"], record["stored_shape"]
    for name, dims in (("shape", shape), ("stored_shape", stored_shape)):
        if not all(is_int(d) and d >= 0 for d in dims):
            raise ValueError(f"has {name} {dims}, not a shape")
    if "key_impl" in record:
        spec = _key_spec(str(record["key_impl"]))
        if spec is None:
            expected_shape, expected_dtype = stored_shape[: len(shape)], None
        else:
            dtype, data_shape, expected_dtype = spec
            if record["dtype"] != dtype:
                raise ValueError(f"has dtype {record['dtype']} but key impl {record['key_impl']} (dtype {dtype})")
            expected_shape = [*shape, *data_shape]
    else:
        try:
            stored = _stored_dtype(np.dtype(jnp.dtype(record["dtype"])))
        except TypeError:
            raise ValueError(f"has dtype {record['dtype']!r}, which is not a dtype") from None
        if stored is None:
            raise ValueError(f"has dtype {record['dtype']}, which orbax cannot store")
        expected_shape, expected_dtype = shape, str(stored)
    if stored_shape != expected_shape:
        raise ValueError(f"has shape {shape} but is stored with shape {stored_shape}")
    if expected_dtype is not None and record["stored_dtype"] != expected_dtype:
        raise ValueError(f"has dtype {record['dtype']} but is stored as {record['stored_dtype']}")
    if bool(record.get("empty")) != (math.prod(stored_shape) == 0):
        raise ValueError(
            f"is {'' if record.get('empty') else 'not '}marked empty but is stored with shape {stored_shape}"
        )


def orbax_specs(metadata: Any) -> dict[str, Spec]:
    """``{"params/w_h": (shape, dtype name), ...}`` of orbax's metadata tree (nested dicts
    and lists of array metadata)."""
    specs = {}

    def walk(node, prefix):
        if node is None:
            return
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, prefix + [str(key)])
        elif isinstance(node, (list, tuple)) and not hasattr(node, "shape"):
            for i, value in enumerate(node):
                walk(value, prefix + [str(i)])
        else:
            shape = tuple(getattr(node, "shape", np.shape(node)) or ())
            dtype = getattr(node, "dtype", None)
            specs["/".join(prefix)] = (shape, None if dtype is None else str(np.dtype(dtype)))

    walk(metadata, [])
    return specs


def check_matches(
    stored: dict[str, Spec], model: dict[str, Spec], where: str, names=("the checkpoint", "the model")
) -> None:
    """Raise ``ValueError(f"{where}: <first difference>")`` unless the specs agree; ``names``
    name the two sides in the message."""
    ours, theirs = names
    for path, (shape, dtype) in model.items():
        if path not in stored:
            raise ValueError(f"{where}: {path or '<root>'} is in {theirs} but not in {ours}")
        s_shape, s_dtype = stored[path]
        if s_shape != shape:
            raise ValueError(f"{where}: {path} has shape {s_shape} in {ours}, {shape} in {theirs}")
        if s_dtype is not None and s_dtype != dtype:
            raise ValueError(f"{where}: {path} has dtype {s_dtype} in {ours}, {dtype} in {theirs}")
    for path in stored:
        if path not in model:
            raise ValueError(f"{where}: {path} is in {ours} but not in {theirs}")


def _data_sharding(like: Any, ndim: int) -> Any:
    """The model leaf's sharding, for its stored data of ``ndim`` dimensions (a key's data
    has more: a NamedSharding's spec leaves them whole). None, and orbax places the array
    as it was saved, where the model has no sharding on real devices (``jax.eval_shape``
    of a state on an explicit mesh gives one on an abstract mesh)."""
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return sharding if isinstance(sharding.mesh, jax.sharding.Mesh) else None
    if isinstance(sharding, jax.sharding.SingleDeviceSharding) or ndim == len(np.shape(like)):
        return sharding
    return None


def restore_target(like: Any, record: dict[str, Any]) -> jax.ShapeDtypeStruct | None:
    """What orbax reads for one leaf: its stored shape and dtype, placed like the model's."""
    if record.get("empty"):
        return None
    shape = tuple(record["stored_shape"])
    return jax.ShapeDtypeStruct(shape, jnp.dtype(record["stored_dtype"]), sharding=_data_sharding(like, len(shape)))


def decode(value: Any, like: Any, record: dict[str, Any]) -> Any:
    """The model's leaf from what orbax read (``value``; None for a zero-size leaf)."""
    stored = jnp.dtype(record["stored_dtype"])
    if record.get("empty"):
        shape = tuple(record["stored_shape"])
        sharding = _data_sharding(like, len(shape))
        value = np.zeros(shape, stored) if isinstance(like, np.ndarray) else jnp.zeros(shape, stored, device=sharding)
    if "key_impl" in record:
        impl = jax.random.key_impl(like) if isinstance(like, jax.Array) else record["key_impl"]
        return jax.random.wrap_key_data(value, impl=impl)
    dtype = jnp.dtype(record["dtype"])
    if dtype == stored:
        return value
    if jnp.issubdtype(dtype, jnp.floating):  # 8-bit floats were stored as their bits
        return (
            np.asarray(value).view(dtype)
            if isinstance(value, np.ndarray)
            else jax.lax.bitcast_convert_type(value, dtype)
        )
    return value.astype(dtype)
