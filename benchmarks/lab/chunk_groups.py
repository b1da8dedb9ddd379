"""How the chunkwise delta rule and RWKV-7 (``rnnjax/engines/chunkwise_delta.py``) loop over
their chunks. Each chunk reduces to four arrays ``(Q', O_0, M, B)``, computed a group of
chunks at a time, and the state passes along by ``S_{n+1} = M_n S_n + B_n``:

- ``third`` (until 2026-12-08): groups of 8 under ``lax.map`` on the driver's
  ``(B, H, N, C, d)`` layout, the chunk axis moved to the front of each group's inputs and
  back from each stacked output, then a loop over the stacked arrays (``affine_scan``);
- ``major``: the same on chunk-major ``(N, B, H, C, d)`` arrays, where a group is a reshape;
- ``carried`` (the library): one loop over groups of ``chunk_group(C)`` chunks that carries the
  state, computing each group's arrays and passing the state through them, so nothing per
  chunk is stacked but the output.

Fwd+bwd of gated ``delta_rule``, ``delta_rule`` and ``rwkv7`` (B = 2, 4 heads,
d_k = d_v = 64, the default chunk sizes, float32): compiled memory (arguments, outputs,
temporaries) and the median of ``--rounds`` calls, all variants compiled in one process and
called in turn (``benchmarks.timing.time_interleaved``). ``--groups`` sweeps the group size
for ``carried`` (0: the library's ``chunk_group``); ``--chunk`` sets ``C``.

    python -m benchmarks.lab.chunk_groups [--lengths 1024 4096] [--rounds 15] [--groups 0 2 4 8] [--chunk 64]
"""

from __future__ import annotations

import argparse
import functools

OPS = ("gated_delta", "delta", "rwkv7")


def stacked_solve(chunks, state, *args, per_key: bool, major: bool):
    """The stacked variants: ``args`` chunk-major, as the library passes them."""
    import jax
    import jax.numpy as jnp

    from rnnjax.engines import chunkwise

    group = 8  # the stacked loops' groups (chunks), before 2026-12-08
    if not per_key:  # the library checkpoints its loop step instead
        chunks = jax.checkpoint(chunks, prevent_cse=False)
    leaves, tree = jax.tree_util.tree_flatten(args)
    count = leaves[0].shape[0]
    group = min(group, count)
    assert count % group == 0, f"chunks {count} not a multiple of the group {group}"
    if major:
        grouped = [a.reshape(count // group, group, *a.shape[1:]) for a in leaves]
    else:  # (N, B, H, ...) -> (B, H, N / g, g, ...) -> (N / g, B, H, g, ...)
        third = [jnp.moveaxis(a, 0, 2) for a in leaves]
        grouped = [jnp.moveaxis(a.reshape(*a.shape[:2], count // group, group, *a.shape[3:]), 2, 0) for a in third]
    out = jax.lax.map(lambda xs: chunks(*jax.tree_util.tree_unflatten(tree, xs)), grouped)
    if major:
        Qp, O0, M, B = (a.reshape(count, *a.shape[2:]) for a in out)
    else:
        Qp, O0, M, B = (
            jnp.moveaxis(jnp.moveaxis(a, 0, 2).reshape(*a.shape[1:3], count, *a.shape[4:]), 2, 0) for a in out
        )
    incoming, final = chunkwise.affine_scan(jnp.matmul, M, B, state)
    return jnp.moveaxis(O0 + jnp.einsum("...id,...de->...ie", Qp, incoming), 0, 2), final


def compare(op: str, steps: int, rounds: int, groups: list[int], chunk: int) -> dict[str, tuple[float, float, float]]:
    """``{variant: (median ms, compiled MiB, largest difference from the first carried)}``."""
    import jax
    import jax.numpy as jnp

    from benchmarks import timing
    from benchmarks.linear_attention import build_jax, inputs
    from rnnjax.engines import chunkwise_delta

    args = inputs(op, 2, steps, 4, 64, 64, jnp.float32)
    solve, chunk_group = chunkwise_delta._solve, chunkwise_delta.chunk_group
    variants = {
        "third": (functools.partial(stacked_solve, major=False), chunk_group),
        "major": (functools.partial(stacked_solve, major=True), chunk_group),
        **{f"carried-{g or 'default'}": (solve, (lambda size, g=g: g) if g else chunk_group) for g in groups},
    }
    built = {}
    for name, (variant, group) in variants.items():
        chunkwise_delta._solve, chunkwise_delta.chunk_group = variant, group
        jax.clear_caches()  # the ops' traced programs are cached across builds
        try:
            built[name] = build_jax(
                op, f"chunked-{chunk}" if chunk else "chunked", "fwd+bwd", args, max_gb=float("inf")
            )
        finally:
            chunkwise_delta._solve, chunkwise_delta.chunk_group = solve, chunk_group
    outputs = {v: c.run() for v, (c, _) in built.items()}
    ref = outputs[list(variants)[2]]
    diff = lambda a: max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(ref)))
    times = timing.time_interleaved({v: c.run for v, (c, _) in built.items()}, rounds)
    return {v: (1e3 * timing.median(times[v]), peak / 2**20, diff(outputs[v])) for v, (_, peak) in built.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lab.chunk_groups", description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--groups", type=int, nargs="+", default=[0], help="chunks per group; 0: chunk_group(C)")
    p.add_argument("--chunk", type=int, default=None, help="C (default: the op's)")
    args = p.parse_args(argv)
    print("variant: median ms fwd+bwd, compiled MiB (time of third / variant), largest difference from the")
    print("first carried variant (gradients included); chunk size", args.chunk or "the op's default")
    for op in args.ops:
        for steps in args.lengths:
            row = compare(op, steps, args.rounds, args.groups, args.chunk)
            third = row["third"][0]
            cells = "  ".join(f"{v} {t:.1f} ms {m:.1f} MiB ({third / t:.2f}x) {e:.0e}" for v, (t, m, e) in row.items())
            print(f"{op:11s} T={steps:5d} | {cells}", flush=True)


if __name__ == "__main__":
    main()
