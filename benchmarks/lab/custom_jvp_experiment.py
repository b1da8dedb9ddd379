"""Decision script: can the sequence-level backward pass keep forward mode?

Gradients of ``sum(ys)`` for a dense cell (B=32, D=H=128, T=1024, one CPU device), timed in
alternation in one process:

- ``autodiff``: JAX's transpose of the ``lax.scan`` (``rj.Sequential(gradient="autodiff")``,
  the default before);
- ``fused-jvp``: the ``custom_jvp`` of ``rnnjax/engines/fused.py`` (now the default for dense
  cells) whose tangent loop holds only the recurrent product and ``update``'s linearisation,
  rematerialised per step: JAX's transpose of it is the sequence-level backward pass, and
  ``jax.jvp`` works.

The reverse-only ``custom_vjp`` it replaced (``fused.run`` at commit 88910dd) measured
alongside in the same process before it was removed: ``DECISIONS.md`` has those figures.

    python -m benchmarks.lab.custom_jvp_experiment [--cells lstm gru elman] [--repeats 9]

Prints median ms per gradient and the ratios to autodiff. Figures: ``DECISIONS.md``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import rnnjax as rj
from benchmarks import timing
from rnnjax import sequence
from rnnjax.engines import fused, sequential

CELLS = {"lstm": rj.LSTM, "gru": rj.GRU, "elman": rj.Elman}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", nargs="+", default=list(CELLS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    engines = {
        "autodiff": lambda c, p, s: sequential.run(c, p, s, unroll=1, remat=None),
        "fused-jvp": lambda c, p, s: fused.run(c, p, s, unroll=1),
    }
    print(f"B={args.batch} D=H={args.hidden} T={args.length}, {jax.devices()[0].device_kind}, medians of "
          f"{args.repeats} interleaved calls")
    for name in args.cells:
        cell = CELLS[name](args.hidden)
        params = cell.init(jax.random.key(0), args.hidden)
        xs = jax.random.normal(jax.random.key(1), (args.batch, args.length, args.hidden))
        compiled = {}
        for label, engine in engines.items():
            def loss(p, xs, engine=engine):
                seqs = sequence.canonical(cell, p, xs, None, None, None, False)
                return jnp.sum(engine(cell, p, seqs)[0])

            compiled[label] = timing.compile_ahead(jax.grad(loss, argnums=(0, 1)), params, xs)
        results = timing.compare(compiled, args.repeats)
        base = results["autodiff"].median_s
        row = "  ".join(f"{k} {r.median_s * 1e3:7.1f} ms ({r.median_s / base:.2f})" for k, r in results.items())
        print(f"{name:6s} {row}")


if __name__ == "__main__":
    main()
