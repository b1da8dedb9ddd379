"""Decision script: how a Newton iteration solves its linear recurrence on this backend,
one associative scan or a sequential scan over time (``rj.Newton(solve=...)``).

    python -m benchmarks.lab.newton_solve [--repeats 21]

Two parts, every program compiled ahead and timed in interleaved rounds (medians):

- ``solve``: the elementwise recurrence ``s_t = a_t * s_{t-1} + b_t`` (``DIAG``, the solve of
  quasi-DEER and of exact Newton on single-leaf cells) over T steps of W = B x H states, by
  ``jax.lax.associative_scan`` against ``jax.lax.scan``, and the 2x2-block one (``BLOCK``,
  exact Newton on ``rj.ParaLSTM``) at the first size;
- ``training``: ``rj.ParaGRU`` forward+backward (gradient of ``sum(ys^2)`` w.r.t. the
  parameters) with ``rj.Newton("deer", tol=None, max_iters=3, init="step")`` and each solve,
  beside ``rj.Sequential()`` (B=4, H=64, D=64).

Figures: ``benchmarks/lab/DECISIONS.md``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from benchmarks import timing
from rnnjax.engines.affine import DIAG, solve_affine
from rnnjax.engines.jacobians import BLOCK


def solve_programs(steps, width, blocks=False):
    k1, k2 = jax.random.split(jax.random.key(0))
    if blocks:  # 2x2 blocks of W/2 units: (T, W/2, 2, 2) maps on (T, 2, W/2) states
        a = 0.5 * jax.random.uniform(k1, (steps, width // 2, 2, 2))
        b = jax.random.normal(k2, (steps, 2, width // 2))
        h0, monoid = jnp.zeros((2, width // 2)), BLOCK
    else:
        a = jax.random.uniform(k1, (steps, width))
        b = jax.random.normal(k2, (steps, width))
        h0, monoid = jnp.zeros((width,)), DIAG
    return {
        solve: timing.compile_ahead(lambda a, b, c=chunk: solve_affine(monoid, (a, b), h0, c), a, b)
        for solve, chunk in (("associative", None), ("sequential", steps))
    }


def training_programs(steps, batch=4, hidden=64):
    cell = rj.ParaGRU(hidden)
    params = cell.init(jax.random.key(0), hidden)
    xs = jax.random.normal(jax.random.key(1), (batch, steps, hidden))

    def grad(method):
        return jax.grad(lambda p, x: jnp.sum(rj.scan(cell, p, x, method=method)[0] ** 2))

    methods = {f"newton-{s}": rj.Newton("deer", tol=None, max_iters=3, init="step", solve=s)
               for s in ("associative", "sequential")}
    methods["sequential engine"] = rj.Sequential()
    return {name: timing.compile_ahead(grad(m), params, xs) for name, m in methods.items()}


def report(label, programs, repeats):
    outs = [jax.tree.leaves(p.run()) for p in programs.values()]
    for a, b in zip(outs[0], outs[1]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    results = timing.compare(programs, repeats)
    first = next(iter(results.values())).median_s
    print(f"{label:28s} " + "  ".join(f"{k} {1e3 * t.median_s:8.3f} ms ({first / t.median_s:.2f}x)"
                                      for k, t in results.items()), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1024:128,4096:128,1024:512,4096:2048", help="T:W pairs of the solve part")
    p.add_argument("--lengths", default="1024,4096", help="T of the training part")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    print("speed-up = associative / the column's time")
    for i, (steps, width) in enumerate(sizes):
        report(f"solve diag  T={steps} W={width}", solve_programs(steps, width), args.repeats)
        if i == 0:
            report(f"solve 2x2   T={steps} W={width}", solve_programs(steps, width, blocks=True), args.repeats)
    for steps in (int(t) for t in args.lengths.split(",")):
        report(f"ParaGRU fwd+bwd T={steps}", training_programs(steps, args.batch, args.hidden), max(5, args.repeats // 3))


if __name__ == "__main__":
    main()
