"""Expensive set-up that a test session runs once, whichever pytest-xdist workers ask for it."""

import os
import shutil

try:
    import fcntl
except ImportError:  # Windows: no flock; each worker then does the work itself
    fcntl = None


def once_per_session(tmp_path_factory, name, work):
    """The folder in which ``work(folder)`` ran once for this test session.

    Every xdist worker that asks gets the same folder: the first runs ``work`` in it while it
    holds a lock, the others wait on the lock and then find the work done. (Under ``--dist
    loadgroup``, as the Makefile runs pytest, one worker runs all the tests of an xdist group,
    tests/conftest.py, and none waits; under ``--dist load`` the lock keeps it to one run.) If
    ``work`` raises, the next worker to ask runs it again, in an emptied folder. Without xdist,
    or without ``fcntl``, it is the caller's own folder.
    """
    base = tmp_path_factory.getbasetemp()  # under xdist: <session's temp root>/popen-gwN
    shared = fcntl is not None and os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = base.parent if shared else base
    folder, done = root / f"once-{name}", root / f"once-{name}.done"
    with open(root / f"once-{name}.lock", "w") as lock:
        if shared:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            work(folder)
            done.touch()
    return folder
