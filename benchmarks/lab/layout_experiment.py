"""Decision script: would a batch-major loop (read x[:, t], write y[:, t] in place) beat
rj.scan's time-major loop (transpose xs in, ys out)? Forward only.

    python -m benchmarks.lab.layout_experiment elman 256 1024 4096 16384

B=32, D=H=128, float32; for each T, prints the median ms (and µs per step) of both loops
over 9 interleaved rounds. Figures: ``benchmarks/lab/DECISIONS.md``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from benchmarks import timing

CELLS = {"elman": rj.Elman, "lstm": rj.LSTM, "gru": rj.GRU}


def batch_major(cell, p, xs):
    """``rj.scan(cell, p, xs)[0]`` by a loop that reads and writes the batch-first arrays in place."""
    batch, steps, _ = xs.shape
    c0 = cell.init_carry((batch,), xs.dtype)
    ys0 = jnp.zeros((batch, steps, cell.hidden_size), xs.dtype)

    def body(t, state):
        c, ys = state
        x = jax.lax.dynamic_index_in_dim(xs, t, axis=1, keepdims=False)
        c, y = cell.step(p, c, x)
        ys = jax.lax.dynamic_update_index_in_dim(ys, y, t, axis=1)
        return c, ys

    return jax.lax.fori_loop(0, steps, body, (c0, ys0))[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cell", choices=sorted(CELLS))
    p.add_argument("lengths", nargs="+", type=int, metavar="T")
    args = p.parse_args(argv)
    cell = CELLS[args.cell](128)
    params = cell.init(jax.random.key(0), 128)
    for steps in args.lengths:
        xs = jax.random.normal(jax.random.key(1), (32, steps, 128))
        compiled = {"base": timing.compile_ahead(lambda p, xs: rj.scan(cell, p, xs)[0], params, xs),
                    "batch_major": timing.compile_ahead(lambda p, xs: batch_major(cell, p, xs), params, xs)}
        np.testing.assert_allclose(compiled["batch_major"].run(), compiled["base"].run(), atol=1e-5)
        results = timing.compare(compiled, 9)
        print(args.cell, steps, "  ".join(f"{k} {1e3 * t.median_s:7.2f} ms ({1e6 * t.median_s / steps:5.1f} us/step)"
                                          for k, t in results.items()), flush=True)


if __name__ == "__main__":
    main()
