"""Keeping orbax quiet: its log lines during a save or restore, and the reports of the reads
it abandons when one read fails.

When one array of a checkpoint cannot be read, orbax raises at once and closes its event
loop; the other reads, still running in tensorstore's threads, end later and report
themselves, from other threads or at garbage collection: ``RuntimeError: Event loop is
closed`` (a callback to the closed loop), ``Exception ignored in: <coroutine object
_read_array_index_and_device_put>`` (an orbax coroutine finalised with its read's error) and
asyncio's ``Task exception was never retrieved`` - up to hundreds of tracebacks after the
one error that matters, which rnnjax raises naming the step. :func:`silence_abandoned_reads`
drops exactly these reports, by filters on ``sys.unraisablehook`` and on the ``asyncio``
logger that stay installed (the reports come at any later time) and pass everything else on.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["quiet_orbax", "silence_abandoned_reads"]

_STATUS = re.compile(r"[A-Z][A-Z_]+: ")  # absl's status codes, as tensorstore's errors begin
_ASYNCIO_REPORTS = re.compile(r"\w+ exception was never retrieved|Task was destroyed but it is pending")


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Keep orbax's log lines (absl's logger: e.g. a missing optional metadata file, or the
    errors it logs before raising them) out of the user's output while it runs."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    import orbax.checkpoint
    import tensorstore

    return (
        os.path.dirname(os.path.dirname(orbax.checkpoint.__file__)) + os.sep,
        os.path.dirname(tensorstore.__file__) + os.sep,
    )


def _from_orbax(error: BaseException | None) -> bool:
    """Whether ``error`` was raised by orbax or tensorstore (whose errors are ValueErrors
    with an absl status, ``"OUT_OF_RANGE: Error reading ..."``, or carry their spec)."""
    if error is None:
        return False
    if "[tensorstore_spec=" in str(error) or (type(error) is ValueError and _STATUS.match(str(error))):
        return True
    dirs = _library_dirs()
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(dirs):
            return True
        tb = tb.tb_next
    return False


def _is_abandoned_read(unraisable: Any) -> bool:
    """A callback to a closed event loop from a thread with no Python caller (tensorstore's),
    or an orbax coroutine that ended with an error while being finalised."""
    first = unraisable.exc_traceback.tb_frame.f_code if unraisable.exc_traceback is not None else None
    if (
        unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"
        and first is not None
        and first.co_name == "call_soon_threadsafe"
        and first.co_filename.endswith(os.path.join("asyncio", "base_events.py"))
    ):
        return True
    coroutine = unraisable.object
    return inspect.iscoroutine(coroutine) and coroutine.cr_code.co_filename.startswith(_library_dirs())


class _AbandonedTasks(logging.Filter):
    """Drops asyncio's reports of never-retrieved errors of orbax's and tensorstore's reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not _ASYNCIO_REPORTS.match(text):
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not (_from_orbax(error) or any(d in text for d in _library_dirs()))


def silence_abandoned_reads() -> None:
    """Install the two filters (once; again if someone replaced ``sys.unraisablehook``)."""
    if not getattr(sys.unraisablehook, "_rnnjax_filter", False):
        previous = sys.unraisablehook

        def hook(unraisable):
            if not _is_abandoned_read(unraisable):
                previous(unraisable)

        hook._rnnjax_filter = True  # type: ignore[attr-defined]  # marks our hook
        sys.unraisablehook = hook
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedTasks) for f in logger.filters):
        logger.addFilter(_AbandonedTasks())
