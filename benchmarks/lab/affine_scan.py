"""How the chunkwise ops differentiate their loop over chunks, ``S_n = A_n o S_{n-1} + L_n``
(per-key ``gla``'s decays, the delta rule's and RWKV-7's ``d_k x d_k`` transitions): autodiff
of the ``lax.scan`` (``loop``, as before), whose forward stacks the states twice (once as the
output, once as its backward's residual), or :func:`rnnjax.engines.chunkwise.affine_scan`
(``custom_jvp``), whose derivative is the same recurrence reading the forward's one stack.
Fwd+bwd of per-key ``gla``, gated ``delta_rule`` and ``rwkv7`` (B = 2, 4 heads, d_k = d_v = 64,
the default chunk sizes, float32): compiled memory (arguments, outputs, temporaries) and the
median of ``--rounds`` calls, both variants compiled in one process and called in turn
(``benchmarks.timing.time_interleaved``: a fresh process per variant moved this op's time by
up to 30% between runs on 2026-12-07).

    python -m benchmarks.lab.affine_scan [--lengths 1024 4096] [--rounds 15]
"""

from __future__ import annotations

import argparse

OPS = ("gla_key", "gated_delta", "rwkv7")
VARIANTS = ("loop", "affine_scan")


def compare(op: str, steps: int, rounds: int) -> dict[str, tuple[float, float]]:
    """``{variant: (median ms, compiled MiB)}``."""
    import jax
    import jax.numpy as jnp

    from benchmarks import timing
    from benchmarks.linear_attention import build_jax, inputs
    from rnnjax.engines import chunkwise, chunkwise_delta

    args = inputs(op, 2, steps, 4, 64, 64, jnp.float32)
    built, original = {}, chunkwise.affine_scan
    for variant in VARIANTS:
        chunkwise.affine_scan = chunkwise_delta.affine_scan = chunkwise.affine_loop if variant == "loop" else original
        jax.clear_caches()  # the ops' traced programs are cached across builds
        try:
            built[variant] = build_jax(op, "chunked", "fwd+bwd", args, max_gb=float("inf"))
        finally:
            chunkwise.affine_scan = chunkwise_delta.affine_scan = original
    for compiled, _ in built.values():
        compiled.run()
    times = timing.time_interleaved({v: c.run for v, (c, _) in built.items()}, rounds)
    return {v: (1e3 * timing.median(times[v]), peak / 2**20) for v, (_, peak) in built.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lab.affine_scan", description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    print(f"{'op':11s} {'T':>6} | {'loop ms':>8} {'MiB':>7} | {'affine_scan ms':>14} {'MiB':>7} | loop / affine_scan")
    for op in args.ops:
        for steps in args.lengths:
            row = compare(op, steps, args.rounds)
            (lt, lm), (at, am) = row["loop"], row["affine_scan"]
            print(f"{op:11s} {steps:6d} | {lt:8.1f} {lm:7.1f} | {at:14.1f} {am:7.1f} | "
                  f"{lt / at:.2f}x time, {lm / am:.2f}x memory")


if __name__ == "__main__":
    main()
