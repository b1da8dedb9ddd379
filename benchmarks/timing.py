"""The one timing loop of the benchmarks: compile ahead of time (timed apart), warm up, time
calls that wait for their result, report the median.

    compiled = timing.compile_ahead(fn, params, xs)      # jit + lower + compile, timed
    result = timing.measure(compiled, repeats=7)         # warm-up, then 7 timed calls
    result.compile_s, result.first_s, result.median_s

    # several variants, called in alternation (a, b, a, b, ...) so that drift on a shared
    # machine hits all of them alike:
    results = timing.compare({"base": compiled_a, "new": compiled_b}, rounds=7)

A "run" here is a zero-argument callable that does one call and waits for its result
(:meth:`Compiled.run`, or :func:`blocking`). The garbage collector is off during timed calls.

JAX is imported inside the functions that need it: ``benchmarks.run`` imports this module
before ``--host-devices`` sets ``XLA_FLAGS``, which must happen before JAX starts.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

K = TypeVar("K")
Run = Callable[[], Any]


def median(times: list[float]) -> float:
    """The median of ``times`` (seconds)."""
    return statistics.median(times)


def minor_faults() -> int | None:
    """The process's minor page faults so far (memory touched for the first time), or
    None where ``resource`` is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed_call(run: Run) -> tuple[Any, float]:
    """``(run(), seconds it took)``: one call outside the timed loop, e.g. the warm-up."""
    t0 = time.perf_counter()
    out = run()
    return out, time.perf_counter() - t0


def blocking(fn: Callable, *args: Any) -> Run:
    """A run of ``fn(*args)`` that waits for the result (``jax.block_until_ready``)."""
    import jax  # not at import time: see the module docstring

    return lambda: jax.block_until_ready(fn(*args))


@dataclasses.dataclass
class Compiled:
    """A function compiled ahead of time for fixed arguments."""

    executable: Any  # jax.stages.Compiled: as_text(), cost_analysis(), memory_analysis()
    args: tuple
    compile_s: float  # trace + lower + compile
    lower_s: float  # trace + lower only

    def run(self) -> Any:
        """One call on the arguments it was compiled for; waits for the result."""
        import jax

        return jax.block_until_ready(self.executable(*self.args))


def compile_ahead(fn: Callable, *args: Any, **jit_kwargs: Any) -> Compiled:
    """``jax.jit(fn, **jit_kwargs)`` lowered and compiled for ``args``, each phase timed."""
    import jax

    t0 = time.perf_counter()
    lowered = jax.jit(fn, **jit_kwargs).lower(*args)
    t1 = time.perf_counter()
    executable = lowered.compile()
    t2 = time.perf_counter()
    return Compiled(executable, args, compile_s=t2 - t0, lower_s=t1 - t0)


def time_calls(run: Run, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run``, back to back."""
    return time_interleaved({None: run}, repeats)[None]


def time_interleaved(runs: Mapping[K, Run], rounds: int) -> dict[K, list[float]]:
    """Seconds of each run's call in each of ``rounds`` rounds; a round calls every run once,
    in order, so that all see the same machine state."""
    times: dict[K, list[float]] = {name: [] for name in runs}
    gc.disable()  # no collection inside a timed call
    try:
        for _ in range(rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


@dataclasses.dataclass
class Timing:
    """What :func:`measure` and :func:`compare` report, in seconds."""

    times_s: list[float]  # the timed calls
    first_s: float  # the first (warm-up) call
    compile_s: float | None = None  # trace + lower + compile; None when not compiled ahead
    lower_s: float | None = None

    @property
    def median_s(self) -> float:
        return median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)


def measure(target: Compiled | Run, repeats: int, warmup: int = 1) -> Timing:
    """``warmup`` calls (the first one timed), then ``repeats`` timed calls."""
    return compare({None: target}, repeats, warmup)[None]


def compare(targets: Mapping[K, Compiled | Run], rounds: int, warmup: int = 1) -> dict[K, Timing]:
    """Each target warmed up (``warmup`` calls, the first one timed), then timed over
    ``rounds`` interleaved rounds (:func:`time_interleaved`)."""
    runs = {name: t.run if isinstance(t, Compiled) else t for name, t in targets.items()}
    first = {}
    for name, run in runs.items():
        first[name] = timed_call(run)[1]
        for _ in range(warmup - 1):
            run()
    times = time_interleaved(runs, rounds)
    out = {}
    for name, target in targets.items():
        out[name] = Timing(times[name], first[name])
        if isinstance(target, Compiled):
            out[name].compile_s, out[name].lower_s = target.compile_s, target.lower_s
    return out


def environment() -> dict[str, Any]:
    """Where and with what a benchmark ran: date, command, device, library versions, XLA_FLAGS."""
    import jax
    import jaxlib
    import numpy as np

    import rnnjax

    device = jax.devices()[0]
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        backend=jax.default_backend(),
        device=str(device),
        device_kind=device.device_kind,
        device_count=jax.device_count(),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        rnnjax=rnnjax.__version__,
        numpy=np.__version__,
        python=platform.python_version(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )
