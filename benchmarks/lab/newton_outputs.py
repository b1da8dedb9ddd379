"""Decision script: what Newton's engine returns as outputs, timed against the sequential loop.

    python -m benchmarks.lab.newton_outputs [--repeats 15]

``rj.ParaGRU`` (B=16, D=H=64) trained by ``rj.Newton("deer", tol=None, max_iters=3,
init="step")`` and by ``rj.Sequential()``, forward and forward+backward (gradient of
``sum(ys^2)`` w.r.t. the parameters), compiled ahead and timed in interleaved rounds; it prints
each median and Newton / sequential. The ratio is what to compare between two versions of the
engine, each run in its own process (the sequential loop is the same program in both).

Figures: ``benchmarks/lab/DECISIONS.md``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import rnnjax as rj
from benchmarks import timing


def programs(steps, batch, hidden, mode):
    cell = rj.ParaGRU(hidden)
    params = cell.init(jax.random.key(0), hidden)
    xs = jax.random.normal(jax.random.key(1), (batch, steps, hidden))
    methods = {"newton": rj.Newton("deer", tol=None, max_iters=3, init="step"), "sequential": rj.Sequential()}

    def build(method):
        ys = lambda p, x: rj.scan(cell, p, x, method=method)[0]
        if mode == "fwd":
            return ys
        return jax.grad(lambda p, x: jnp.sum(ys(p, x) ** 2))

    return {name: timing.compile_ahead(build(m), params, xs) for name, m in methods.items()}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="1024,4096")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    env = timing.environment()
    print(", ".join(f"{k}={env[k]}" for k in ("date", "device", "cpu_count", "jax")), flush=True)
    for steps in (int(t) for t in args.lengths.split(",")):
        for mode in ("fwd", "fwd+bwd"):
            results = timing.compare(programs(steps, args.batch, args.hidden, mode), args.repeats)
            newton, seq = results["newton"].median_s, results["sequential"].median_s
            print(
                f"ParaGRU T={steps:5d} {mode:8s} newton {1e3 * newton:8.2f} ms  sequential {1e3 * seq:8.2f} ms  "
                f"newton/sequential {newton / seq:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
