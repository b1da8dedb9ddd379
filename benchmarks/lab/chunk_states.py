"""How the chunkwise ``gla`` with one decay per head gets the state before each chunk: by a
loop over the chunks (``lax.scan``, which stacks its per-chunk states into loop buffers) or as
one ``(N, N) x (N, d_k d_v)`` product per head (:func:`rnnjax.engines.chunkwise.chunk_states`).
Fwd+bwd of ``rj.linear_attention.gla`` (``rj.Chunked(64)``, B = 2, 4 heads, d_k = d_v = 64,
float32) at several ``T``; each row runs in a fresh process (the protocol of
``benchmarks.linear_attention --order isolated``), medians of ``--repeats`` calls, and the
compiled memory (arguments, outputs and temporaries).

    python -m benchmarks.lab.chunk_states [--lengths 1024 4096 8192 16384] [--repeats 9]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORMS = {"loop": 0, "product": 10**9}  # rnnjax.engines.chunkwise.STATE_PRODUCT_CHUNKS for each form


def one(form: str, steps: int, repeats: int) -> None:
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.linear_attention import inputs, jax_fn
    from rnnjax.engines import chunkwise

    chunkwise.STATE_PRODUCT_CHUNKS = FORMS[form]
    xs = inputs("gla_head", 2, steps, 4, 64, 64, jnp.float32)
    f = jax_fn("gla_head", "chunked-64")
    grad = jax.jit(jax.grad(lambda *x: jnp.sum(f(*x)), argnums=(0, 1, 2, 3)))
    mem = grad.lower(*xs).compile().memory_analysis()
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    jax.block_until_ready(grad(*xs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(grad(*xs))
        times.append(time.perf_counter() - start)
    print(f"{1e3 * float(np.median(times)):.1f} {total / 2**20:.1f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lab.chunk_states", description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--one", nargs=2, metavar=("FORM", "T"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return one(args.one[0], int(args.one[1]), args.repeats)
    print(f"{'T':>6} {'chunks':>6} | {'loop ms':>8} {'MiB':>7} | {'product ms':>10} {'MiB':>7} | loop / product")
    for steps in args.lengths:
        row = {}
        for form in FORMS:
            cmd = [sys.executable, "-m", "benchmarks.lab.chunk_states", "--one", form, str(steps), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
            row[form] = (float(out[0]), float(out[1]))
        (lt, lm), (pt, pm) = row["loop"], row["product"]
        print(f"{steps:6d} {steps // 64:6d} | {lt:8.1f} {lm:7.1f} | {pt:10.1f} {pm:7.1f} | {lt / pt:.2f}x time, {lm / pm:.2f}x memory")


if __name__ == "__main__":
    main()
