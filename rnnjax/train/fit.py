"""``fit``: run a training step over batches, with a progress line and an evaluation hook."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any

import jax
import numpy as np

from rnnjax.cell import PyTree
from rnnjax.checks import check_nonnegative_int, check_positive_int
from rnnjax.train.checks import check_not_donated

__all__ = ["fit"]


class _Progress:
    """One progress line: rewritten in place on terminals and in notebooks, throttled
    plain lines elsewhere (log files, CI)."""

    def __init__(self, enabled: bool, file: Any, total: int | None):
        self.enabled = enabled
        self.file = file
        self.total = total
        self.width = 0
        self.last_plain = -math.inf
        isatty = getattr(file, "isatty", None)
        interactive = bool(isatty()) if callable(isatty) else False
        self.interactive = interactive or "ipykernel" in type(file).__module__

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        if self.interactive:
            self.file.write("\r" + text + " " * max(0, self.width - len(text)))
            self.width = len(text)
        elif force or time.perf_counter() - self.last_plain >= 10.0:
            self.file.write(text + "\n")
            self.last_plain = time.perf_counter()
        self.file.flush()

    def line(self, text: str) -> None:
        """A line that stays (evaluation results, the summary)."""
        if not self.enabled:
            return
        if self.interactive and self.width:
            self.file.write("\r" + " " * self.width + "\r")
            self.width = 0
        self.file.write(text + "\n")
        self.file.flush()


class _Interrupts:
    """Ctrl-C while ``fit`` runs, with its own SIGINT handler installed (:func:`_sigint`).

    The first press asks ``fit`` to stop after the current step. A second raises
    ``KeyboardInterrupt`` at once (a batch iterator or ``eval_fn`` that blocks), except
    inside a step, where it waits until the step's outputs are bound: a step that consumed
    the state by donation has then handed back the new one. A third press inside a step
    raises at once (a step that hangs), even if that loses a donated state.
    Without the handler (not the main thread, or SIGINT handled by someone else) nothing
    is pressed here and ``KeyboardInterrupt`` arrives as Python raises it.
    """

    def __init__(self) -> None:
        self.presses = 0
        self.in_step = False
        self.held = False  # a second press waits for the step to end
        self.raised = False  # a KeyboardInterrupt came from a second or third press
        self.finished = False  # fit has its outcome: presses no longer raise

    @property
    def stop(self) -> bool:
        return self.presses > 0

    def handle(self, signum: int, frame: Any) -> None:
        self.presses += 1
        if self.presses == 1 or self.finished:
            return
        if self.presses == 2 and self.in_step:
            self.held = True
            return
        self.raised = True
        raise KeyboardInterrupt

    def step_starts(self) -> None:
        self.in_step = True

    def step_ends(self) -> None:
        self.in_step = False
        if self.held:
            self.held = False
            self.raised = True
            raise KeyboardInterrupt


@contextlib.contextmanager
def _sigint() -> Iterator[_Interrupts]:
    """Route SIGINT to an :class:`_Interrupts` while the context runs, when ``fit`` runs in
    the main thread and SIGINT has Python's default handler (a signal handler can only be
    set there; someone else's handler is left alone); the previous handler comes back after."""
    interrupts = _Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield interrupts
        return
    signal.signal(signal.SIGINT, interrupts.handle)
    try:
        yield interrupts
    finally:
        signal.signal(signal.SIGINT, previous)


def _lost(state: PyTree) -> bool:
    """Whether an array of ``state`` was deleted (donated to a step that did not return)."""
    return any(isinstance(leaf, jax.Array) and leaf.is_deleted() for leaf in jax.tree.leaves(state))


def _format_metrics(values: Mapping[str, Any]) -> str:
    """Scalar metrics as ``name value`` pairs, the loss first."""
    names = sorted(values, key=lambda name: (name != "loss", name != "grad_norm", name))
    return "  ".join(f"{name} {float(values[name]):#.4g}" for name in names if np.ndim(values[name]) == 0)


def fit(
    step_fn: Callable[..., Any],
    state: PyTree,
    batches: Iterable[PyTree] | Callable[[int], PyTree],
    *,
    steps: int | None = None,
    eval_fn: Callable[[PyTree], Any] | None = None,
    eval_every: int = 100,
    progress: bool = True,
    log_every: int = 10,
    carry: PyTree | None = None,
    on_log: Callable[[dict], None] | None = None,
    first_step: int | None = None,
    file: Any = None,
) -> tuple[PyTree, dict[str, list]]:
    """Run ``step_fn`` over ``batches``; return the final state and the history.

    Args:
      step_fn: ``step(state, batch) -> (state, metrics)`` as from :func:`make_train_step`;
        with ``carry``, ``step(state, carry, batch) -> (state, carry, metrics)`` as from
        :func:`make_tbptt_step`. ``metrics`` is a dict of scalars.
      state: the initial state (donated steps delete it: use the returned one). A state
        deleted by an earlier donation raises a ``ValueError`` before any step runs.
      batches: an iterable of batches, or a callable ``i -> batch`` (then ``steps`` is
        required). ``i`` is the global step index, starting at ``first_step``.
      steps: the number of steps; by default until ``batches`` is exhausted.
      eval_fn: ``eval_fn(state) -> float or dict of floats``, called every ``eval_every``
        steps and after the last step.
      eval_every: steps between evaluations.
      progress: show a progress line (steps, loss, steps/s, evaluations) and a final
        summary line on ``file``. ``False`` prints nothing.
      log_every: steps between reading metrics back from the device (and updating the
        progress line); also after the first step and the last.
      carry: the initial carry of a TBPTT step; each batch continues from the carry the
        previous batch returned (consecutive windows of long streams). The final carry
        is ``history["carry"]``.
      on_log: called at every log point with a dict: ``step``, the mean of each metric
        since the previous log point, ``seconds`` since the start and ``steps_per_second``.
      first_step: the index of the first step; ``int(state.step)`` by default (0 when the
        state has no ``step``), so a resumed run continues the numbering.
      file: where the progress goes; ``sys.stderr`` by default.

    Returns:
      ``(state, history)``: ``history["step"]`` and one list per metric with every
      step's value; ``history["eval_step"]`` and ``history["eval_<name>"]`` (``"eval"``
      for a scalar ``eval_fn``).

    Ctrl-C stops the run after the current step, wherever the signal lands, and returns
    what was done (without a final evaluation). A second Ctrl-C raises
    ``KeyboardInterrupt`` with ``err.state`` as below (inside a step: once the step has
    returned); a third inside a step raises at once, for a step that hangs (``err.state``
    is then ``None`` if the step had consumed it). ``fit`` handles SIGINT itself only in
    the main thread and over Python's default handler; otherwise a ``KeyboardInterrupt``
    returns what was done, or is raised as below if a step had consumed the state.

    Raises:
      KeyboardInterrupt: a second Ctrl-C, with ``err.state`` and ``err.history`` as below.
      Exception: any other exception (from ``step_fn``, ``batches``, ``eval_fn``,
        ``on_log``, ...) stops the run and is re-raised as it is, with the last good state
        attached: ``err.state`` is the state after the last completed step (the one to
        save or continue from; ``None`` only if the failing step had already consumed it
        by donation), ``err.history`` the history up to it (with ``"carry"``, the carry
        after it); a note on the exception says so::

            try:
                state, history = rj.train.fit(step, state, batches)
            except Exception as err:
                state, history = err.state, err.history

    Example:
      >>> import jax.numpy as jnp, optax, rnnjax as rj
      >>> loss_fn = lambda p, x: jnp.mean((x * p - 1.0) ** 2)
      >>> step = rj.train.make_train_step(loss_fn, optax.sgd(0.1))
      >>> state = rj.train.TrainState.create(jnp.zeros(2), optax.sgd(0.1))
      >>> state, history = rj.train.fit(step, state, [jnp.ones(2)] * 20, progress=False)
      >>> len(history["loss"]), history["loss"][-1] < history["loss"][0]
      (20, True)
    """
    if not callable(step_fn):
        raise TypeError(f"step_fn must be callable, got {step_fn!r}")
    check_positive_int(eval_every, "eval_every")
    check_positive_int(log_every, "log_every")
    check_nonnegative_int(steps, "steps", optional=True)
    if callable(batches) and not isinstance(batches, Iterable):
        if steps is None:
            raise ValueError("steps is required when batches is a callable i -> batch")
        iterator = None
    else:
        iterator = iter(batches)
    total = steps
    if total is None and isinstance(batches, Sized):
        total = len(batches)
    check_not_donated(state, "state")
    if first_step is None:
        step_attr = getattr(state, "step", None)
        first_step = int(step_attr) if step_attr is not None else 0

    bar = _Progress(bool(progress), sys.stderr if file is None else file, total)
    history: dict[str, Any] = {"step": []}
    pending: list[tuple[int, Any]] = []
    last_eval: dict[str, Any] = {}  # floats, or arrays for non-scalar metrics
    start = time.perf_counter()
    mark = (start, 0)  # time and step count at the previous log point
    done = 0
    first_loss = last_loss = None
    interrupted = False

    def flush() -> dict:
        nonlocal pending, mark, first_loss, last_loss
        if not pending:
            return {}
        values = jax.device_get([m for _, m in pending])
        for (index, _), metrics in zip(pending, values):
            history["step"].append(index)
            for name, value in metrics.items():
                value = float(value) if np.ndim(value) == 0 else np.asarray(value)
                history.setdefault(name, []).append(value)
        means = {
            name: float(np.mean([m[name] for m in values])) for name in values[-1] if np.ndim(values[-1][name]) == 0
        }
        if first_loss is None and "loss" in values[0]:
            first_loss = float(values[0]["loss"])
        if "loss" in values[-1]:
            last_loss = float(values[-1]["loss"])
        now = time.perf_counter()
        rate = (done - mark[1]) / max(now - mark[0], 1e-9)
        record = {"step": pending[-1][0], **means, "seconds": now - start, "steps_per_second": rate}
        speed = f"{rate:.1f} steps/s" if mark[1] else "(first step)"
        mark = (now, done)
        pending = []
        count = f"{done}/{total}" if total is not None else f"{done}"
        bar.update(
            f"step {count}  {_format_metrics(means)}  {speed}  {now - start:.0f} s"
            + (f"  | {_format_metrics(last_eval)}" if last_eval else ""),
            force=done == 1,
        )
        if on_log is not None:
            on_log(record)
        return record

    def evaluate(index: int) -> None:
        nonlocal mark
        result = eval_fn(state)  # type: ignore[misc]  # called only when eval_fn is not None
        if not isinstance(result, Mapping):
            result = {"eval": result}
        else:
            result = {f"eval_{name}": value for name, value in result.items()}
        result = jax.device_get(dict(result))
        history.setdefault("eval_step", []).append(index)
        for name, value in result.items():
            value = float(value) if np.ndim(value) == 0 else np.asarray(value)
            history.setdefault(name, []).append(value)
            last_eval[name] = value
        bar.line(f"step {index}: {_format_metrics(last_eval)}")
        mark = (time.perf_counter(), mark[1])  # evaluation time is not training time

    last_eval_done = 0
    with _sigint() as sigint:
        try:
            try:
                while (steps is None or done < steps) and not sigint.stop:
                    index = first_step + done
                    if iterator is None:
                        batch = batches(index)  # type: ignore[operator]  # the callable form
                    else:
                        try:
                            batch = next(iterator)
                        except StopIteration:
                            break
                    # From the call until the outputs are bound, a donated state exists only
                    # inside the step: a second Ctrl-C waits for step_ends.
                    sigint.step_starts()
                    try:
                        if carry is None:
                            state, metrics = step_fn(state, batch)
                        else:
                            state, carry, metrics = step_fn(state, carry, batch)
                        done += 1
                        if not isinstance(metrics, Mapping):
                            raise TypeError(f"step_fn must return a dict of metrics last, got {type(metrics).__name__}")
                        pending.append((index + 1, metrics))
                    finally:
                        sigint.step_ends()
                    if done == 1 or done % log_every == 0 or done == total:
                        flush()
                    if eval_fn is not None and done % eval_every == 0 and not sigint.stop:
                        flush()
                        evaluate(first_step + done)
                        last_eval_done = done
            except KeyboardInterrupt:
                # Raised by Python's own handler (fit's is not installed) or by the step: the
                # state is good unless a step consumed it; a second press stops fit itself.
                if sigint.raised or _lost(state):
                    raise
                interrupted = True
            interrupted = interrupted or sigint.stop
            flush()
            if eval_fn is not None and done > last_eval_done and not interrupted:
                evaluate(first_step + done)
            jax.block_until_ready(state)
        except (Exception, KeyboardInterrupt) as err:
            sigint.finished = True
            if carry is not None:
                history["carry"] = carry
            _attach_last_good(err, state, history, first_step + done)
            try:  # the steps done before the error still count (history, on_log, progress)
                flush()
                bar.line(
                    _summary(done, time.perf_counter() - start, first_loss, last_loss, last_eval)
                    + f" (stopped by {type(err).__name__})"
                )
            except Exception as lost:  # noqa: BLE001 - the first error is the one to raise
                err.add_note(f"rj.train.fit could not record the last metrics: {type(lost).__name__}: {lost}")
            raise
        sigint.finished = True
        if carry is not None:
            history["carry"] = carry
        summary = _summary(done, time.perf_counter() - start, first_loss, last_loss, last_eval)
        bar.line(summary + (" (interrupted)" if interrupted else ""))
    return state, history


def _summary(
    done: int, seconds: float, first_loss: float | None, last_loss: float | None, last_eval: Mapping[str, float]
) -> str:
    """The final line: steps, time, speed, the first and last loss, the last evaluation."""
    summary = f"fit: {done} steps in {seconds:.1f} s ({done / max(seconds, 1e-9):.1f} steps/s)"
    if first_loss is not None:
        summary += f", loss {first_loss:#.4g} -> {last_loss:#.4g}"
    if last_eval:
        summary += f", {_format_metrics(last_eval)}"
    return summary


def _attach_last_good(err: BaseException, state: PyTree, history: dict, step: int) -> None:
    """Hand the last good state back on ``err``: ``err.state``, ``err.history`` and a note."""
    try:  # a state donated to the step that failed is deleted; one it computed may hold the error
        lost = _lost(state)
        if not lost:
            jax.block_until_ready(state)
    except Exception:  # noqa: BLE001 - whatever reading it raises, it is not a good state
        lost = True
    err.state, err.history = (None if lost else state), history  # type: ignore[attr-defined]
    if lost:
        err.add_note(
            f"rj.train.fit stopped: the state after step {step} was consumed by the failure (donated "
            f"to the step that failed), so err.state is None; the history up to it is in err.history"
        )
    else:
        err.add_note(
            f"rj.train.fit stopped: the last good state (after step {step}) is in err.state, "
            f"the history up to it in err.history"
        )
