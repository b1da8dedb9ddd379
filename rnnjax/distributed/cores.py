"""All cores of a CPU as JAX devices."""

from __future__ import annotations

import os

import jax

from rnnjax.checks import check_positive_int


def cpu_core_count() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def use_cpu_cores(count: int | None = None) -> int:
    """Expose ``count`` CPU cores (default: all this process may use) as JAX CPU devices, so
    that ``make_train_step(..., mesh="local")`` splits the batch over them.

    A one-liner for the top of a script, right after the imports: JAX fixes its devices when
    it first computes, so this must run before anything touches a JAX array. It sets
    ``jax_num_cpu_devices`` (it does not touch ``XLA_FLAGS``); GPU and TPU devices are
    unaffected. Returns the number of CPU devices asked for.

    Note:
      On jax 0.10.2, XLA:CPU sometimes never finished a program running on two CPU devices at
      once, every thread idle: a long loop on replicated params, and once a data-parallel
      training step in a notebook (``benchmarks/lab/two_device_hang.py``).
      ``rj.inspect.fixed_points`` therefore runs on one device, and the notebooks keep one
      device.

    Raises:
      RuntimeError: JAX has computed already (its devices are fixed); the message says
        how many it has.

    Example::

        import rnnjax as rj
        rj.distributed.use_cpu_cores()      # first, before any JAX computation
        step = rj.train.make_train_step(loss_fn, optimizer, mesh="local")
    """
    n = cpu_core_count() if count is None else count
    check_positive_int(n, "count")
    try:
        jax.config.update("jax_num_cpu_devices", int(n))
    except RuntimeError as err:
        raise RuntimeError(
            f"rj.distributed.use_cpu_cores() must run before JAX computes anything: JAX has already "
            f"started with {jax.device_count()} device(s). Call it at the top of the script, right after "
            f"`import rnnjax as rj` (in a notebook: restart the kernel and run it first)"
        ) from err
    return int(n)
