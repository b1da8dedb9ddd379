"""The chunkwise delta rule's and RWKV-7's layout around their loop over chunk groups
(``rnnjax/engines/chunkwise_delta.py``): ``chunk-third``, as before, kept the driver's
``(B, H, N, C, d)`` and moved the chunk axis to the front of each group's inputs
(``(N / g, B, H, g, C, d)``) and back from each stacked output, then again around the loop
over chunk states; ``chunk-major`` moves the inputs once to ``(N, B, H, C, d)``, where a group
is a reshape and the stacked outputs are the loop's inputs (one transpose in, one out).
Fwd+bwd of gated ``delta_rule``, ``delta_rule`` and ``rwkv7`` (B = 2, 4 heads,
d_k = d_v = 64, the default chunk sizes, float32): compiled memory (arguments, outputs,
temporaries) and the median of ``--rounds`` calls, both variants compiled in one process and
called in turn (``benchmarks.timing.time_interleaved``).

    python -m benchmarks.lab.chunk_major [--lengths 1024 4096] [--rounds 15]
"""

from __future__ import annotations

import argparse

OPS = ("gated_delta", "delta", "rwkv7")
VARIANTS = ("chunk-third", "chunk-major")


def chunk_third_solve(chunks, state, *args):
    """The previous ``chunkwise_delta._solve``, on the ``(B, H, N, C, ...)`` layout that
    ``args`` (chunk-major, as the library passes them) are moved back to."""
    import jax
    import jax.numpy as jnp

    from rnnjax.engines import chunkwise, chunkwise_delta

    leaves, tree = jax.tree_util.tree_flatten(jax.tree.map(lambda a: jnp.moveaxis(a, 0, 2), args))
    count = leaves[0].shape[2]
    group = min(chunkwise_delta.CHUNK_GROUP, count)
    assert count % group == 0, f"chunks {count} not a multiple of the group {group}"
    grouped = [jnp.moveaxis(a.reshape(*a.shape[:2], count // group, group, *a.shape[3:]), 2, 0) for a in leaves]
    out = jax.lax.map(lambda xs: chunks(*jax.tree_util.tree_unflatten(tree, xs)), grouped)
    Qp, O0, M, B = (jnp.moveaxis(a, 0, 2).reshape(*a.shape[1:3], count, *a.shape[4:]) for a in out)
    major = lambda a: jnp.moveaxis(a, 2, 0)
    incoming, final = chunkwise.affine_scan(jnp.matmul, major(M), major(B), state)
    return O0 + jnp.einsum("...id,...de->...ie", Qp, jnp.moveaxis(incoming, 0, 2)), final


def compare(op: str, steps: int, rounds: int) -> dict[str, tuple[float, float, float]]:
    """``{variant: (median ms, compiled MiB, largest difference from chunk-major)}``."""
    import jax
    import jax.numpy as jnp

    from benchmarks import timing
    from benchmarks.linear_attention import build_jax, inputs
    from rnnjax.engines import chunkwise_delta

    args = inputs(op, 2, steps, 4, 64, 64, jnp.float32)
    built, original = {}, chunkwise_delta._solve
    for variant in VARIANTS:
        chunkwise_delta._solve = chunk_third_solve if variant == "chunk-third" else original
        jax.clear_caches()  # the ops' traced programs are cached across builds
        try:
            built[variant] = build_jax(op, "chunked", "fwd+bwd", args, max_gb=float("inf"))
        finally:
            chunkwise_delta._solve = original
    outputs = {v: c.run() for v, (c, _) in built.items()}
    diff = lambda a, b: max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    times = timing.time_interleaved({v: c.run for v, (c, _) in built.items()}, rounds)
    return {
        v: (1e3 * timing.median(times[v]), peak / 2**20, diff(outputs[v], outputs["chunk-major"]))
        for v, (_, peak) in built.items()
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lab.chunk_major", description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    print(
        f"{'op':11s} {'T':>6} | {'chunk-third ms':>14} {'MiB':>7} | {'chunk-major ms':>14} {'MiB':>7} | "
        "third / major | largest difference"
    )
    for op in args.ops:
        for steps in args.lengths:
            row = compare(op, steps, args.rounds)
            (tt, tm, err), (mt, mm, _) = row["chunk-third"], row["chunk-major"]
            print(
                f"{op:11s} {steps:6d} | {tt:14.1f} {tm:7.1f} | {mt:14.1f} {mm:7.1f} | "
                f"{tt / mt:.2f}x time, {tm / mm:.2f}x memory | {err:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
