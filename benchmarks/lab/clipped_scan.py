"""Decision script: a relu ``rj.IndRNN`` in parallel by one associative scan of clipped maps
(``rj.Associative()``, :mod:`rnnjax.engines.clipped`) against the sequential loop and exact
Newton.

    python -m benchmarks.lab.clipped_scan [--repeats 15]

Two parts:

- ``accuracy``: T=4096, B=4, H=64, D=16, the default initialisation (``u`` uniform in
  ``[0, 1)``). Max |ys - float64 sequential| / max |float64 sequential ys|, and the same for
  each leaf of the gradient of ``sum(ys^2)`` w.r.t. the parameters (the worst leaf), for the
  float32 sequential loop (the rounding floor), the associative scan, the chunked scan, and
  exact Newton (``"deer"``, from ``init="step"``) with 5 and 16 fixed iterations.
- ``timing``: forward and forward+backward (that gradient) at each ``--lengths`` T, B=16,
  H=D=``--hidden``, every program compiled ahead and timed in interleaved rounds (medians);
  speed-up = the sequential loop's time / the column's time.

Figures: ``benchmarks/lab/DECISIONS.md``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from benchmarks import timing

METHODS = {
    "sequential": rj.Sequential(),
    "associative": rj.Associative(),
    "chunked": rj.Chunked(),
    "newton-5": rj.Newton("deer", tol=None, max_iters=5, init="step"),
    "newton-16": rj.Newton("deer", tol=None, max_iters=16, init="step"),
}


def problem(steps, batch, hidden, inputs, dtype=jnp.float32):
    cell = rj.IndRNN(hidden)
    params = cell.init(jax.random.key(0), inputs, dtype)
    xs = jax.random.normal(jax.random.key(1), (batch, steps, inputs), dtype)
    return cell, params, xs


def outputs(cell, method):
    return lambda p, x: rj.scan(cell, p, x, method=method)[0]


def gradient(cell, method):
    return jax.grad(lambda p, x: jnp.sum(rj.scan(cell, p, x, method=method)[0] ** 2))


def relative_error(got, want):
    """max |got - want| / max |want|, the worst over the leaves."""
    return max(
        float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    )


def accuracy(steps=4096, batch=4, hidden=64, inputs=16):
    cell, params, xs = problem(steps, batch, hidden, inputs)
    jax.config.update("jax_enable_x64", True)
    try:
        p64, x64 = jax.tree.map(lambda a: a.astype(jnp.float64), (params, xs))
        ys64 = np.asarray(jax.jit(outputs(cell, rj.Sequential()))(p64, x64))
        g64 = jax.tree.map(np.asarray, jax.jit(gradient(cell, rj.Sequential()))(p64, x64))
    finally:
        jax.config.update("jax_enable_x64", False)
    scale = float(np.max(np.abs(ys64)))
    print(
        f"accuracy: IndRNN(relu) T={steps} B={batch} H={hidden} D={inputs}, max |ys| {scale:.3g}; "
        "max |value - float64 sequential| / max |float64 sequential|, worst leaf:"
    )
    for name, method in METHODS.items():
        ys = jax.jit(outputs(cell, method))(params, xs)
        g = jax.jit(gradient(cell, method))(params, xs)
        print(f"  {name:12s} ys {relative_error(ys, ys64):9.3g}   gradient {relative_error(g, g64):9.3g}", flush=True)


def timing_part(steps, hidden, repeats, batch=16):
    cell, params, xs = problem(steps, batch, hidden, hidden)
    for mode, build in (("fwd", outputs), ("fwd+bwd", gradient)):
        programs = {name: timing.compile_ahead(build(cell, m), params, xs) for name, m in METHODS.items()}
        results = timing.compare(programs, repeats)
        base = results["sequential"].median_s
        print(
            f"T={steps:5d} H={hidden:3d} {mode:8s} "
            + "  ".join(f"{k} {1e3 * t.median_s:8.2f} ms ({base / t.median_s:.2f}x)" for k, t in results.items()),
            flush=True,
        )


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="1024,4096")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--parts", default="accuracy,timing")
    p.add_argument("--tiny", action="store_true", help="T=64, H=8, 3 rounds: a check that the script runs")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if args.tiny:
        args.lengths, args.hidden, args.repeats = "64", 8, 3
    env = timing.environment()
    print(", ".join(f"{k}={env[k]}" for k in ("date", "command", "device", "cpu_count", "jax", "rnnjax")), flush=True)
    if "accuracy" in parts:
        accuracy(steps=64 if args.tiny else 4096)
    if "timing" in parts:
        for steps in (int(t) for t in args.lengths.split(",")):
            timing_part(steps, args.hidden, args.repeats)


if __name__ == "__main__":
    main()
