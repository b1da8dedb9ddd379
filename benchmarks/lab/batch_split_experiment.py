"""Decision script: does splitting the batch into independent parts inside one step let
XLA:CPU run them on both cores? (It did not: forward equal, forward+backward slower.)

    python -m benchmarks.lab.batch_split_experiment       # LSTM B=32 D=H=128 T=1024, 7 rounds
    python -m benchmarks.lab.batch_split_experiment --batch 4 --hidden 8 --length 16 --repeats 1

Compares, forward and forward+backward (gradient of the sum of outputs with respect to the
parameters and the inputs), one ``rj.scan`` over the batch ("base") with one ``lax.scan``
whose step runs the cell on 2 or 4 batch parts ("split2", "split4"). Prints median ms over
interleaved rounds. Figures: ``benchmarks/lab/DECISIONS.md``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from benchmarks import timing


def split(cell, p, xs, n):
    """``rj.scan(cell, p, xs)[0]`` computed with the batch cut into ``n`` parts inside each step."""
    parts = jnp.split(jnp.swapaxes(xs, 0, 1), n, axis=1)  # T, B/n, D each

    def step(carries, x_parts):
        new, ys = [], []
        for c, x in zip(carries, x_parts):
            c, y = cell.step(p, c, x)
            new.append(c)
            ys.append(y)
        return tuple(new), tuple(ys)

    carries = tuple(cell.init_carry((xs.shape[0] // n,)) for _ in range(n))
    _, ys = jax.lax.scan(step, carries, tuple(parts))
    return jnp.swapaxes(jnp.concatenate(ys, axis=1), 0, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="B, divisible by 4")
    p.add_argument("--hidden", type=int, default=128, help="input and hidden size")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    args = p.parse_args(argv)
    cell = rj.LSTM(args.hidden)
    params = cell.init(jax.random.key(0), args.hidden)
    xs = jax.random.normal(jax.random.key(1), (args.batch, args.length, args.hidden))

    fns = {"base": lambda p, xs: rj.scan(cell, p, xs)[0],
           "split2": lambda p, xs: split(cell, p, xs, 2),
           "split4": lambda p, xs: split(cell, p, xs, 4)}
    for k in list(fns):
        fns[k + " bwd"] = jax.grad(lambda p, x, f=fns[k]: f(p, x).sum(), argnums=(0, 1))
    compiled = {k: timing.compile_ahead(f, params, xs) for k, f in fns.items()}
    np.testing.assert_allclose(compiled["split2"].run(), compiled["base"].run(), atol=1e-5)
    for k, t in timing.compare(compiled, args.repeats).items():
        print(f"{k:12s} {1e3 * t.median_s:7.1f} ms")


if __name__ == "__main__":
    main()
