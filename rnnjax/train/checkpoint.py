"""Checkpoints of training states with orbax: atomic saves, one writer per step, checked restores.

A checkpoint directory holds one folder per saved step, ``<directory>/<step>``: orbax's
item ``default/`` and rnnjax's record ``rnnjax_checkpoint.json`` (each leaf's path, shape
and dtype, and a checksum of the record's content). Only folders with a record are
checkpoints; nothing else in the directory is listed or deleted
(:mod:`rnnjax.train.checkpoint_store`).

Writers. Each save writes into a staging folder of its own and publishes it with one
rename under ``fcntl.flock`` of ``<directory>/.rnnjax.lock``, refusing to replace an
existing step: an interrupted save leaves the directory as it was, and of two processes
saving one step, one publishes and the other gets a ``ValueError``; a restore never mixes
two writers' arrays. In a multi-process JAX run (``jax.distributed``) every process calls
:func:`save_checkpoint` and orbax coordinates the writing: process 0 draws the staging
folder's name and broadcasts it, and alone publishes, prunes and takes the lock; then all
processes learn the outcome from one more broadcast.

Steps. "Latest" is the highest step number. ``keep=n`` keeps the ``n`` highest steps and
always the step just saved. Saving a step lower than existing ones (a run restarted from
an earlier checkpoint) warns: :func:`restore_checkpoint` keeps returning the highest step
unless given ``step=``.

Reading. A checkpoint whose files are missing, truncated or disagree with its record, or
whose record was edited or damaged (its checksum disagrees; a record of format 1, from
before checksums, must be consistent with itself and orbax's metadata), raises
:class:`CorruptCheckpointError` naming its folder and the other steps;
``restore_checkpoint(..., skip_unreadable=True)`` restores the highest readable step
instead, warning for each step it skips. The tracebacks orbax's abandoned reads print after
such a failure are dropped (:mod:`rnnjax.train.checkpoint_quiet`).

orbax is imported on first use, not by ``import rnnjax``.
"""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rnnjax.checks import check_nonnegative_int, check_positive_int, is_int
from rnnjax.optional import require
from rnnjax.train import checkpoint_leaves as leaves
from rnnjax.train import checkpoint_quiet as quiet
from rnnjax.train import checkpoint_store as store

PyTree = Any
_FORMAT = 2  # 2: the record carries its checksum; 1 (read too): none

__all__ = ["CorruptCheckpointError", "checkpoint_steps", "restore_checkpoint", "save_checkpoint"]


class CorruptCheckpointError(ValueError):
    """A listed checkpoint cannot be read (a file is missing, truncated, edited or inconsistent)."""


def _directory(directory: Any) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
    return Path(directory).expanduser().absolute()


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The steps saved in ``directory``, ascending; ``[]`` when there are none.

    Only rnnjax checkpoints count: a folder ``7`` of the user's is not a step.

    Example:
      >>> import tempfile, rnnjax as rj
      >>> rj.train.checkpoint_steps(tempfile.mkdtemp())
      []
    """
    return store.list_steps(_directory(directory))


def _check_state(state: PyTree) -> None:
    found = leaves.leaf_paths(state)
    if not found:
        raise ValueError("state has no arrays to save")
    for name, leaf in found:
        name = name or "<root>"
        if isinstance(leaf, jax.core.Tracer):
            raise TypeError(f"state has a traced value at {name}; save_checkpoint must be called outside jit")
        if isinstance(leaf, jax.Array) and leaf.is_deleted():
            raise ValueError(
                f"state's array at {name} has been deleted (donated to a train step); save the state the step returned"
            )
        if not (
            isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex)) and not isinstance(leaf, bool)
        ):
            raise TypeError(f"state has a {type(leaf).__name__} at {name}; expected arrays only")


def _step_of(state: PyTree, step: Any) -> int:
    if step is None:
        if not hasattr(state, "step"):
            raise ValueError("state has no step attribute; pass step=")
        step = state.step
    if (
        isinstance(step, (jax.Array, np.ndarray, np.generic))
        and np.ndim(step) == 0
        and np.issubdtype(np.asarray(step).dtype, np.integer)
    ):
        step = int(step)
    check_nonnegative_int(step, "step")
    return int(step)


def _from_process_0(value: np.ndarray | np.generic) -> np.ndarray:
    """``value`` as process 0 has it, in every process (a collective: all must call it)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(value))


def _shared_token() -> str:
    """A name for this save's staging folder, drawn by process 0 and the same everywhere."""
    token = np.frombuffer(uuid.uuid4().bytes, np.uint32)
    return _from_process_0(token).astype(np.uint32).tobytes().hex()


def _already_saved(step: int, path: Path, meanwhile: bool = False) -> ValueError:
    how = " (another process saved it while this save was writing; this save was discarded)" if meanwhile else ""
    return ValueError(
        f"a checkpoint for step {step} already exists in {path}{how}; save under another step "
        f"(existing steps: {store.list_steps(path)})"
    )


def save_checkpoint(
    directory: str | os.PathLike,
    state: PyTree,
    *,
    step: int | None = None,
    keep: int | None = 3,
) -> Path:
    """Save ``state`` (any pytree of arrays, e.g. a ``TrainState``) as step ``step``.

    The save is atomic: until it completes, ``directory`` holds exactly the checkpoints
    it held before. Bad input raises before anything is written. Typed PRNG keys
    (``jax.random.key``), zero-size arrays and JAX's dtypes (bfloat16, complex, int4,
    uint4, the float8 kinds) round-trip exactly. In a multi-process run, every process calls
    it with the same arguments.

    Args:
      directory: the checkpoint directory (created if needed).
      state: the pytree to save; its arrays must be live (not donated to a step).
      step: the step number; ``int(state.step)`` by default. Must not be saved already.
        A step lower than saved ones warns: restores still default to the highest.
      keep: how many of the highest steps to keep (others are deleted; the step just
        saved always stays); ``None`` keeps all.

    Returns:
      The step's directory, ``<directory>/<step>``.

    Raises:
      ValueError: the step exists already, also when another process saved it during
        this save (this one is then discarded); or bad input; or the lock file
        ``<directory>/.rnnjax.lock`` is a symbolic link (it is not followed).
      TypeError: ``state`` holds something other than arrays, or a traced value.

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
    require("orbax.checkpoint", "rj.train.save_checkpoint")
    path = _directory(directory)
    _check_state(state)
    step = _step_of(state, step)
    check_positive_int(keep, "keep", optional=True)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    stored, records = leaves.encode(state)
    existing = store.list_steps(path)
    if step in existing:
        raise _already_saved(step, path)
    higher = [s for s in existing if s > step]
    if higher:
        warnings.warn(
            f"saving step {step} in {path}, which has higher steps {higher}: restore_checkpoint() "
            f"restores the highest step ({higher[-1]}); pass step={step} to load this one",
            stacklevel=2,
        )
    record = {"format": _FORMAT, "step": step, "leaves": records}
    _write(path, step, stored, record, keep)
    return path / str(step)


def _write(path: Path, step: int, stored: PyTree, record: dict, keep: int | None) -> None:
    import orbax.checkpoint as ocp

    quiet.silence_abandoned_reads()
    owner = jax.process_index() == 0
    token = _shared_token()
    with quiet.quiet_orbax(), store.staging(path, step, token, owner=owner) as folder:
        checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        checkpointer.save(folder / store.ITEM, args=ocp.args.StandardSave(stored))
        outcome = 0
        error: Exception | None = None
        if owner:
            try:
                store.commit(folder, path, step, record, keep)
            except store.StepExistsError:
                outcome, error = 1, _already_saved(step, path, meanwhile=True)
            except Exception as e:  # all processes must reach the broadcast below
                outcome, error = 2, e
        outcome = int(_from_process_0(np.int32(outcome)))
    if outcome == 1:
        raise error or _already_saved(step, path, meanwhile=True)
    if outcome == 2:
        if error is not None:
            raise error
        raise RuntimeError(f"process 0 could not publish the checkpoint of step {step} in {path}; see its error")


def _reason(error: BaseException) -> str:
    """The first line of an error, without the tensorstore spec that follows its message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text.split(" [tensorstore_spec=")[0].split(". See full TensorStore details")[0]
    text = text if len(text) <= 300 else text[:300] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _raised_by_jax(error: BaseException | None) -> bool:
    """Whether ``error`` (or its cause) was raised in jax or jaxlib: placing the arrays read
    failed (a sharding, device memory), not reading the files."""
    import jaxlib

    dirs = tuple(os.path.dirname(str(m.__file__)) + os.sep for m in (jax, jaxlib))  # packages: __file__ is set
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if isinstance(error, MemoryError) or (tb is not None and tb.tb_frame.f_code.co_filename.startswith(dirs)):
            return True
        error = error.__cause__ or error.__context__
    return False


def _records(folder: Path) -> list[dict[str, Any]]:
    """The leaves' records, checked against orbax's own metadata of the folder.

    Raises:
      CorruptCheckpointError: what is wrong with the folder (the caller names the step).
    """
    import orbax.checkpoint as ocp
    from etils import epath

    try:
        record = store.read_record(folder)
    except store.DamagedRecordError as e:
        raise CorruptCheckpointError(f"its record {store.RECORD} is damaged or was edited: {e}") from e
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"its record {store.RECORD} cannot be read ({_reason(e)})") from e
    item = folder / store.ITEM
    if not (item / "_METADATA").is_file():
        raise CorruptCheckpointError(f"orbax's metadata file {item / '_METADATA'} is missing")
    try:
        metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(item))
        on_disk = leaves.orbax_specs(getattr(metadata, "tree", metadata))
    except Exception as e:
        raise CorruptCheckpointError(f"orbax's metadata in {item} cannot be read ({_reason(e)})") from e
    if record is None:  # a checkpoint of an earlier rnnjax: orbax's metadata is all there is
        if not on_disk:
            raise CorruptCheckpointError(f"orbax's metadata in {item} lists no arrays")
        return [
            {"path": p, "shape": list(s), "dtype": d, "stored_shape": list(s), "stored_dtype": d}
            for p, (s, d) in on_disk.items()
        ]
    if "step" in record and record["step"] != int(folder.name):
        raise CorruptCheckpointError(f"its record {store.RECORD} is of step {record['step']!r}, not {folder.name}")
    try:
        leaves.check_records(record["leaves"])
    except ValueError as e:
        raise CorruptCheckpointError(f"its record {store.RECORD} is malformed: {e}") from e
    expected = {
        r["path"]: (tuple(r["stored_shape"]), r["stored_dtype"]) for r in record["leaves"] if not r.get("empty")
    }
    try:
        leaves.check_matches(
            on_disk, expected, "orbax's metadata does not match the record", ("orbax's metadata", "the record")
        )
    except ValueError as e:
        raise CorruptCheckpointError(str(e)) from e
    return record["leaves"]


def _restore_step(path: Path, step: int, like_state: PyTree) -> PyTree:
    """The state of one step.

    Raises:
      CorruptCheckpointError: the files cannot be read (the caller names the step).
      ValueError: the checkpoint does not match the model.
    """
    import orbax.checkpoint as ocp

    folder = path / str(step)
    records = {r["path"]: r for r in _records(folder)}
    stored = {p: (tuple(r["shape"]), r["dtype"]) for p, r in records.items()}
    model = leaves.model_specs(like_state)
    leaves.check_matches(stored, model, f"checkpoint at step {step} in {path} does not match the model")
    for p, r in records.items():
        if r["dtype"] is None:  # orbax's metadata of an earlier rnnjax's checkpoint may lack it
            records[p] = {**r, "dtype": model[p][1], "stored_dtype": model[p][1]}
    like = leaves.leaf_paths(like_state)
    treedef = jax.tree.structure(like_state)
    target = jax.tree.unflatten(treedef, [leaves.restore_target(leaf, records[p]) for p, leaf in like])
    try:
        checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        read = checkpointer.restore(folder / store.ITEM, args=ocp.args.StandardRestore(target))
        values = treedef.flatten_up_to(read)  # type: ignore[attr-defined]  # jax's PyTreeDef is opaque to mypy
    except Exception as e:
        if _raised_by_jax(e):
            e.add_note(f"while restoring the checkpoint of step {step} in {folder}")
            raise
        raise CorruptCheckpointError(f"reading its arrays failed ({_reason(e)})") from e
    return jax.tree.unflatten(treedef, [leaves.decode(v, leaf, records[p]) for v, (p, leaf) in zip(values, like)])


def _unreadable(path: Path, step: int, steps: list[int], error: CorruptCheckpointError) -> CorruptCheckpointError:
    others = [s for s in steps if s != step]
    if others:
        hint = (
            f"other steps in {path}: {others}; restore one with restore_checkpoint(..., step={others[-1]}), "
            f"or pass skip_unreadable=True to restore the newest readable step"
        )
    else:
        hint = f"{path} has no other checkpoint"
    return CorruptCheckpointError(f"checkpoint of step {step} in {path / str(step)} cannot be read: {error}; {hint}")


def restore_checkpoint(
    directory: str | os.PathLike,
    like_state: PyTree,
    step: int | None = None,
    *,
    skip_unreadable: bool = False,
) -> PyTree:
    """Load the checkpoint of ``step`` (the highest by default) into ``like_state``'s structure.

    Args:
      directory: the checkpoint directory.
      like_state: a pytree with the structure, shapes and dtypes to restore into, e.g. a
        freshly created ``TrainState`` or ``jax.eval_shape`` of one (values are not used;
        donated arrays are fine). NamedTuples and other containers come back as in it;
        arrays are placed with its arrays' shardings.
      step: the step to load; the highest by default.
      skip_unreadable: when the highest step cannot be read (a file is missing or
        truncated), restore the highest one that can, with a warning naming each step
        skipped. A checkpoint that does not match the model still raises.

    Returns:
      A new pytree like ``like_state`` holding the saved arrays.

    Raises:
      FileNotFoundError: no checkpoint (of that step) in ``directory``.
      CorruptCheckpointError: the checkpoint cannot be read (with ``skip_unreadable``:
        none can); the message names the step's folder and the other steps.
      ValueError: the checkpoint does not match ``like_state``; the message names the
        first mismatching path, e.g. ``params/w_h has shape (8, 24) in the checkpoint,
        (16, 48) in the model``.
    """
    require("orbax.checkpoint", "rj.train.restore_checkpoint")
    path = _directory(directory)
    steps = store.list_steps(path)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {path}")
    if step is not None:
        if skip_unreadable:
            raise ValueError("skip_unreadable=True chooses among the steps; pass it or step=, not both")
        if not is_int(step) or int(step) not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step!r} in {path}; it has steps {steps}")
    candidates = [int(step)] if step is not None else steps[::-1]
    quiet.silence_abandoned_reads()
    with quiet.quiet_orbax():
        for i, candidate in enumerate(candidates):
            try:
                return _restore_step(path, candidate, like_state)
            except CorruptCheckpointError as e:
                if not skip_unreadable:
                    raise _unreadable(path, candidate, steps, e) from e.__cause__
                error = e
                if i + 1 < len(candidates):
                    warnings.warn(
                        f"skipped the checkpoint of step {candidate} in {path / str(candidate)}, which cannot be "
                        f"read ({e}); restoring step {candidates[i + 1]}",
                        stacklevel=2,
                    )
    raise CorruptCheckpointError(f"no checkpoint in {path} can be read (steps {steps}); step {steps[0]}: {error}")
