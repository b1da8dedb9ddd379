"""Checkpoints of training states with orbax: atomic saves, checked restores.

A checkpoint directory holds one sub-directory per saved step (``<directory>/<step>``),
written by ``orbax.checkpoint.CheckpointManager``. Orbax writes each step into a
temporary directory and renames it when complete, so a save that is interrupted leaves
the previous checkpoints as they were and loadable; the unfinished temporary directory
is ignored (and replaced when that step is saved again).

orbax is imported on first use, not by ``import rnnjax``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rnnjax.checks import check_nonnegative_int, check_positive_int, is_int

PyTree = Any

__all__ = ["checkpoint_steps", "restore_checkpoint", "save_checkpoint"]


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax reports through absl's logger; keep its warnings (e.g. removing a stale
    temporary directory of an interrupted save) out of the user's output."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _manager(directory: Path, *, keep: int | None = None, read_only: bool = False):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=False,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=ocp.StandardCheckpointHandler())


def _directory(directory: Any) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    return Path(directory).expanduser().absolute()


def _key_str(key: Any) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_specs(tree: PyTree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{"params/w_h": (shape, dtype), ...}`` in the tree's flattening order."""
    return {
        "/".join(_key_str(k) for k in path): (tuple(np.shape(leaf)), _dtype(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _dtype(leaf: Any) -> np.dtype:
    return np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf))


def _stored_specs(metadata: Any) -> dict[str, tuple[tuple[int, ...], np.dtype | None]]:
    """The same for orbax's stored metadata tree (dicts and lists of array metadata)."""
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
            specs["/".join(prefix)] = (shape, None if dtype is None else np.dtype(dtype))

    walk(metadata, [])
    return specs


def _describe(spec: tuple[tuple[int, ...], Any]) -> str:
    return f"shape {spec[0]}" if spec[1] is None else f"shape {spec[0]} and dtype {spec[1]}"


def _check_matches(stored: dict, model: dict, step: int, directory: Path) -> None:
    where = f"checkpoint at step {step} in {directory} does not match the model"
    for path, (shape, dtype) in model.items():
        if path not in stored:
            raise ValueError(f"{where}: {path or '<root>'} is in the model but not in the checkpoint")
        s_shape, s_dtype = stored[path]
        if s_shape != shape:
            raise ValueError(f"{where}: {path} has shape {s_shape} in the checkpoint, {shape} in the model")
        if s_dtype is not None and s_dtype != dtype:
            raise ValueError(f"{where}: {path} has dtype {s_dtype} in the checkpoint, {dtype} in the model")
    for path in stored:
        if path not in model:
            raise ValueError(f"{where}: {path} is in the checkpoint but not in the model")


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The steps saved in ``directory``, ascending; ``[]`` when there are none.

    Example:
      >>> import tempfile, rnnjax as rj
      >>> rj.train.checkpoint_steps(tempfile.mkdtemp())
      []
    """
    path = _directory(directory)
    if not path.is_dir():
        return []
    with _quiet_orbax():
        manager = _manager(path, read_only=True)
        try:
            return sorted(int(s) for s in manager.all_steps())
        finally:
            manager.close()


def save_checkpoint(
    directory: str | os.PathLike,
    state: PyTree,
    *,
    step: int | None = None,
    keep: int | None = 3,
) -> Path:
    """Save ``state`` (any pytree of arrays, e.g. a ``TrainState``) as step ``step``.

    The save is atomic: until it completes, ``directory`` holds exactly the checkpoints
    it held before. Bad input raises before anything is written.

    Args:
      directory: the checkpoint directory (created if needed).
      state: the pytree to save; its arrays must be live (not donated to a step).
      step: the step number; ``int(state.step)`` by default. Must not be saved already.
      keep: how many of the most recent checkpoints to keep (older ones are deleted);
        ``None`` keeps all.

    Returns:
      The step's directory, ``<directory>/<step>``.

    Example:
      >>> import tempfile, jax.numpy as jnp, optax, rnnjax as rj
      >>> state = rj.train.TrainState.create({"w": jnp.ones(3)}, optax.adam(1e-3))
      >>> directory = tempfile.mkdtemp()
      >>> rj.train.save_checkpoint(directory, state).name
      '0'
      >>> restored = rj.train.restore_checkpoint(directory, state)
      >>> type(restored).__name__, restored.params["w"].tolist()
      ('TrainState', [1.0, 1.0, 1.0])
    """
    path = _directory(directory)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    if not leaves:
        raise ValueError("state has no arrays to save")
    for key_path, leaf in leaves:
        name = "/".join(_key_str(k) for k in key_path) or "<root>"
        if isinstance(leaf, jax.core.Tracer):
            raise TypeError(f"state has a traced value at {name}; save_checkpoint must be called outside jit")
        if isinstance(leaf, jax.Array) and leaf.is_deleted():
            raise ValueError(
                f"state's array at {name} has been deleted (donated to a train step); "
                f"save the state the step returned"
            )
        if not (isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex)) and not isinstance(leaf, bool)):
            raise TypeError(f"state has a {type(leaf).__name__} at {name}; expected arrays only")
    if step is None:
        if not hasattr(state, "step"):
            raise ValueError("state has no step attribute; pass step=")
        step = state.step
    if isinstance(step, (jax.Array, np.ndarray, np.generic)) and np.ndim(step) == 0 and np.issubdtype(np.asarray(step).dtype, np.integer):
        step = int(step)
    check_nonnegative_int(step, "step")
    check_positive_int(keep, "keep", optional=True)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    existing = checkpoint_steps(path)
    if step in existing:
        raise ValueError(
            f"a checkpoint for step {step} already exists in {path}; save under another step "
            f"(existing steps: {existing})"
        )

    import orbax.checkpoint as ocp

    with _quiet_orbax():
        manager = _manager(path, keep=None if keep is None else int(keep))
        try:
            saved = manager.save(step, args=ocp.args.StandardSave(state), force=True)
            manager.wait_until_finished()
        finally:
            manager.close()
    if not saved or step not in checkpoint_steps(path):
        raise RuntimeError(f"orbax did not save step {step} in {path}")
    return path / str(step)


def restore_checkpoint(directory: str | os.PathLike, like_state: PyTree, step: int | None = None) -> PyTree:
    """Load the checkpoint of ``step`` (the latest by default) into ``like_state``'s structure.

    Args:
      directory: the checkpoint directory.
      like_state: a pytree with the structure, shapes and dtypes to restore into, e.g. a
        freshly created ``TrainState`` or ``jax.eval_shape`` of one (values are not used;
        donated arrays are fine). NamedTuples and other containers come back as in it.
      step: the step to load; the latest by default.

    Returns:
      A new pytree like ``like_state`` holding the saved arrays.

    Raises:
      FileNotFoundError: no checkpoint (of that step) in ``directory``.
      ValueError: the checkpoint does not match ``like_state``; the message names the
        first mismatching path, e.g. ``params/w_h has shape (8, 24) in the checkpoint,
        (16, 48) in the model``.
    """
    path = _directory(directory)
    steps = checkpoint_steps(path)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {path}")
    if step is None:
        step = steps[-1]
    elif not is_int(step) or int(step) not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step!r} in {path}; it has steps {steps}")
    step = int(step)
    model = _leaf_specs(like_state)

    import orbax.checkpoint as ocp

    with _quiet_orbax():
        manager = _manager(path, read_only=True)
        try:
            metadata = manager.item_metadata(step)
            tree = getattr(metadata, "tree", metadata)
            _check_matches(_stored_specs(tree), model, step, path)
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x)), like_state)
            return manager.restore(step, args=ocp.args.StandardRestore(target))
        finally:
            manager.close()
