"""Up to which in-chunk decay span the per-key chunkwise ops compute their scores as one
product (:data:`rnnjax.engines.chunkwise.SEPARABLE_SPAN`): per-key ``gla`` in float32 against
the step recurrence in float64 (largest error of the outputs and of the gradients, relative to
the largest entry) with the bound at 60 (the exact form by secondary chunks past it) and at
120 (the separable product), for decays whose chunk spans run from ~40 to ~190; then fwd+bwd
time and compiled memory of both at T = ``--length`` on a strong-decay input (spans near 90),
both compiled in one process and called in turn.

    python -m benchmarks.lab.separable_span [--length 1024] [--rounds 11]
"""

from __future__ import annotations

import argparse

BOUNDS = (60.0, 120.0)


def _inputs(steps: int, per_step: float, dtype, seed: int = 0):
    """``(q, k, v, g)``, B = 2, 4 heads, d = 64; log decays uniform in ``[-2 per_step, 0]``."""
    import jax

    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(keys[i], (2, steps, 4, 64), dtype) for i in range(3))
    return q, k, v, -jax.random.uniform(keys[3], q.shape, dtype, 0.0, 2 * per_step)


def _with_bound(bound: float, fn, *args):
    """``fn(*args)`` traced with ``SEPARABLE_SPAN = bound``."""
    import jax

    from rnnjax.engines import chunkwise

    saved, chunkwise.SEPARABLE_SPAN = chunkwise.SEPARABLE_SPAN, bound
    jax.clear_caches()  # the op's traced programs are cached across bounds
    try:
        return fn(*args)
    finally:
        chunkwise.SEPARABLE_SPAN = saved


def accuracy(per_steps: list[float]) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import rnnjax as rj

    jax.config.update("jax_enable_x64", True)
    gla = lambda method: lambda *a: rj.linear_attention.gla(*a, method=method)[0]
    grads = lambda f, args: jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2, 3))(*args)
    chunked = gla(rj.Chunked(64))
    values_and_grads = lambda args: (chunked(*args), grads(chunked, args))
    print(f"{'per-step':>8} {'span':>6} | " + " | ".join(f"bound {b:.0f}: outputs / gradients" for b in BOUNDS))
    for per_step in per_steps:
        args64 = _inputs(256, per_step, jnp.float64)
        args32 = tuple(a.astype(jnp.float32) for a in args64)
        want, want_g = gla(rj.Sequential())(*args64), grads(gla(rj.Sequential()), args64)
        g = np.asarray(args64[3]).reshape(2, 4, 64, 4, 64)
        span = float(-np.min(np.sum(g[:, :, 1:], axis=2)))
        row = []
        for bound in BOUNDS:
            got, got_g = _with_bound(bound, values_and_grads, args32)
            err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            g_err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got_g, want_g))
            row.append(f"{err:.1e} / {g_err:.1e}")
        print(f"{per_step:8.2f} {span:6.1f} | " + " | ".join(f"{r:>32s}" for r in row))
    jax.config.update("jax_enable_x64", False)


def speed(steps: int, rounds: int) -> None:
    import jax
    import jax.numpy as jnp

    from benchmarks import timing
    from benchmarks.linear_attention import build_jax

    q, k, v, _ = _inputs(steps, 1.0, jnp.float32)
    g = -jax.random.uniform(jax.random.key(7), q.shape, jnp.float32, 1.0, 1.86)  # chunk spans near 90
    build = lambda args: build_jax("gla_key", "chunked", "fwd+bwd", args, float("inf"))
    built = {b: _with_bound(b, build, (q, k, v, g)) for b in BOUNDS}
    for compiled, _ in built.values():
        compiled.run()
    times = timing.time_interleaved({b: c.run for b, (c, _) in built.items()}, rounds)
    for b, (_, peak) in built.items():
        print(f"bound {b:.0f}: T={steps} fwd+bwd {1e3 * timing.median(times[b]):.1f} ms, {peak / 2**20:.1f} MiB")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lab.separable_span", description=__doc__.split("\n")[0])
    p.add_argument("--per-step", type=float, nargs="+", default=[0.5, 1.0, 1.25, 1.4, 2.5])
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=11)
    args = p.parse_args(argv)
    accuracy(args.per_step)
    speed(args.length, args.rounds)


if __name__ == "__main__":
    main()
