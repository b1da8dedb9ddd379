"""The folders of a checkpoint directory: which are checkpoints, and how a save publishes one.

``<directory>/<step>`` is a checkpoint when it holds the record ``rnnjax_checkpoint.json``
(written last, before the folder gets its name, with a checksum of its own content) or,
for checkpoints of earlier rnnjax versions, orbax's ``_CHECKPOINT_METADATA`` next to the
item folder ``default``. No other folder is listed, and no other folder is ever deleted.

A save writes into a staging folder of its own, ``<directory>/.rnnjax-tmp-<step>-<token>``,
and publishes it by renaming it to ``<step>`` while holding ``fcntl.flock`` on
``<directory>/.rnnjax.lock``, after checking that ``<step>`` does not exist: of two writers
of one step, one publishes and the other gets :class:`StepExistsError`. Pruning, and the
removal of staging folders of killed saves (their writer no longer holds the folder's
``.writer.lock``), happen under the same lock. Where the file system has no ``flock``, the
rename still keeps writers apart: it never replaces a non-empty folder. The lock file is
opened without following a symbolic link: a link there is refused, never locked or created
through.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RECORD = "rnnjax_checkpoint.json"
_CHECKSUM = "checksum"  # in records of format 2 on; format 1 (and older) records have none
ITEM = "default"  # orbax's item folder, as orbax's CheckpointManager names it
_LEGACY_MARKER = "_CHECKPOINT_METADATA"
_LOCK = ".rnnjax.lock"
_WRITER_LOCK = ".writer.lock"
_STAGING = ".rnnjax-tmp-"
_TRASH = ".rnnjax-delete-"
_STEP = re.compile(r"0|[1-9][0-9]*")
# flock is advisory and not offered by every file system; without it the rename decides.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

__all__ = ["ITEM", "RECORD", "DamagedRecordError", "StepExistsError", "commit", "list_steps", "read_record", "staging"]


class StepExistsError(ValueError):
    """Another writer published the step first."""


class DamagedRecordError(ValueError):
    """A record parses, but its content is not what was written (its checksum disagrees)."""


def step_of(name: str) -> int | None:
    """The step a folder name stands for (``"12"`` -> 12), or None (``"012"``, ``"x"``)."""
    return int(name) if _STEP.fullmatch(name) else None


def is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a published checkpoint (new or legacy layout)."""
    if (folder / RECORD).is_file():
        return True
    return (folder / _LEGACY_MARKER).is_file() and (folder / ITEM).is_dir()


def list_steps(directory: Path) -> list[int]:
    """The steps of the checkpoints in ``directory``, ascending; ``[]`` if it does not exist."""
    if not directory.is_dir():
        return []
    steps = []
    for entry in os.scandir(directory):
        step = step_of(entry.name)
        if step is not None and entry.is_dir() and is_checkpoint(Path(entry.path)):
            steps.append(step)
    return sorted(steps)


def _checksum(record: dict[str, Any]) -> str:
    """The SHA-256 of the record's content (without its checksum) as canonical JSON: a
    change of any value or name changes it; a change of layout (spaces) does not."""
    content = {name: value for name, value in record.items() if name != _CHECKSUM}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def read_record(folder: Path) -> dict[str, Any] | None:
    """The parsed record of a checkpoint folder, its checksum verified; None for a legacy
    checkpoint. A record without a checksum is read only if its format is 1 (or unnamed).

    Raises:
      DamagedRecordError: the content does not match its checksum, or the checksum is missing.
      OSError, ValueError: the record cannot be read or is not a record.
    """
    path = folder / RECORD
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not an rnnjax checkpoint record (not a JSON object)")
    if _CHECKSUM in record:
        if record[_CHECKSUM] != _checksum(record):
            raise DamagedRecordError("its content does not match its checksum")
    elif record.get("format", 1) != 1:
        raise DamagedRecordError(f"it has format {record['format']!r} but no checksum")
    if not isinstance(record.get("leaves"), list):
        raise ValueError(f"{path} is not an rnnjax checkpoint record (no 'leaves' list)")
    return record


def _flock(fd: int, flags: int) -> bool:
    """``flock(fd, flags)``; False where the file system offers no locks."""
    try:
        fcntl.flock(fd, flags)
    except OSError as error:
        if error.errno in _NO_LOCKS:
            return False
        raise
    return True


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[bool]:
    """Hold ``<directory>/.rnnjax.lock``; yields whether the file system gave the lock."""
    lock = directory / _LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        if os.path.islink(lock):  # ELOOP on Linux; other systems name it otherwise
            raise ValueError(
                f"{lock} is a symbolic link; rnnjax locks the checkpoint directory through a regular file "
                f"there and does not follow links (it would lock, or create, the file linked to): remove the link"
            ) from error
        raise
    try:
        yield _flock(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def staging(directory: Path, step: int, token: str, *, owner: bool) -> Iterator[Path]:
    """The staging folder of one save of ``step``, named by ``token`` (the same in every
    process of a multi-process run).

    The ``owner`` (process 0) creates it, holds its writer lock until the context ends, and
    removes it then unless :func:`commit` published it. Other processes only get its path.
    """
    folder = directory / f"{_STAGING}{step}-{token}"
    if not owner:
        yield folder
        return
    directory.mkdir(parents=True, exist_ok=True)
    with _directory_lock(directory):  # a cleaner never sees the folder without its lock
        folder.mkdir()
        fd = os.open(folder / _WRITER_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        yield folder
    finally:
        os.close(fd)
        if folder.exists():  # not published: a failed save leaves nothing behind
            shutil.rmtree(folder, ignore_errors=True)


def commit(folder: Path, directory: Path, step: int, record: dict[str, Any], keep: int | None) -> list[int]:
    """Publish the staging ``folder`` as ``<directory>/<step>`` with its ``record``; then
    prune to the ``keep`` highest steps (never ``step`` itself) and remove what killed
    saves left behind. Returns the pruned steps.

    Raises:
      StepExistsError: ``<directory>/<step>`` exists (another writer published it).
    """
    with open(folder / RECORD, "w") as f:
        f.write(json.dumps({**record, _CHECKSUM: _checksum(record)}))
        f.flush()
        os.fsync(f.fileno())  # orbax syncs its files; the record that makes them a checkpoint too
    final = directory / str(step)
    with _directory_lock(directory) as locked:
        if os.path.lexists(final):
            raise StepExistsError(str(final))
        os.unlink(folder / _WRITER_LOCK)
        try:
            os.rename(folder, final)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):  # published meanwhile, unlocked
                raise StepExistsError(str(final)) from error
            raise
        pruned = _prune(directory, keep, step)
        if locked:  # without the lock a live writer's folder could look abandoned
            _remove_leftovers(directory)
    return pruned


def _prune(directory: Path, keep: int | None, saved: int) -> list[int]:
    if keep is None:
        return []
    steps = list_steps(directory)
    kept = set(steps[-keep:]) | {saved}
    pruned = [s for s in steps if s not in kept]
    for step in pruned:
        _remove(directory / str(step))
    return pruned


def _remove(folder: Path) -> None:
    """Delete a folder; renamed first, so that it stops being a checkpoint at once. A
    symbolic link is unlinked, never followed."""
    if folder.is_symlink():
        os.unlink(folder)
        return
    trash = folder.parent / f"{_TRASH}{folder.name}-{uuid.uuid4().hex}"
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(directory: Path) -> None:
    """Remove staging folders whose writer is gone and deletions a crash interrupted."""
    for entry in os.scandir(directory):
        if not entry.is_dir(follow_symlinks=False):
            continue
        if entry.name.startswith(_TRASH) or (entry.name.startswith(_STAGING) and _writer_gone(Path(entry.path))):
            shutil.rmtree(entry.path, ignore_errors=True)


def _writer_gone(folder: Path) -> bool:
    """Whether no process holds ``folder``'s writer lock (the lock dies with its process)."""
    try:
        fd = os.open(folder / _WRITER_LOCK, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True  # created with its lock under the directory lock: the writer died
    except OSError:
        return False
    try:
        return _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
