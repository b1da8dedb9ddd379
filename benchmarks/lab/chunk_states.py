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


def measure(op: str, steps: int, repeats: int, args: tuple | None = None) -> str:
    """``"<median ms> <compiled MiB>"`` of ``op``'s chunked fwd+bwd, built and timed as
    ``benchmarks.linear_attention`` does (B = 2, 4 heads, d = 64, float32 unless ``args``)."""
    import jax.numpy as jnp

    from benchmarks import timing
    from benchmarks.linear_attention import build_jax, inputs

    args = inputs(op, 2, steps, 4, 64, 64, jnp.float32) if args is None else args
    compiled, peak = build_jax(op, "chunked", "fwd+bwd", args, max_gb=float("inf"))
    compiled.run()
    return f"{1e3 * timing.median(timing.time_calls(compiled.run, repeats)):.1f} {peak / 2**20:.1f}"


def in_fresh_processes(module: str, case: list[str], variants, repeats: int) -> dict[str, tuple[float, float]]:
    """``{variant: (ms, MiB)}``: ``python -m <module> --one <variant> *case`` per variant, each in
    a fresh process (no program run before it in the process changes its speed)."""
    row = {}
    for variant in variants:
        cmd = [sys.executable, "-m", module, "--one", variant, *case, "--repeats", str(repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
        row[variant] = (float(out[-2]), float(out[-1]))
    return row


def one(form: str, steps: int, repeats: int) -> None:
    from rnnjax.engines import chunkwise

    chunkwise.STATE_PRODUCT_CHUNKS = FORMS[form]
    print(measure("gla_head", steps, repeats))


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
        row = in_fresh_processes("benchmarks.lab.chunk_states", [str(steps)], FORMS, args.repeats)
        (lt, lm), (pt, pm) = row["loop"], row["product"]
        print(f"{steps:6d} {steps // 64:6d} | {lt:8.1f} {lm:7.1f} | {pt:10.1f} {pm:7.1f} | "
              f"{lt / pt:.2f}x time, {lm / pm:.2f}x memory")


if __name__ == "__main__":
    main()
