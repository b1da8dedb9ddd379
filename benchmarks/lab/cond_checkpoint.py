"""Where the chunkwise ops with per-key decays checkpoint the choice between their separable
and exact in-chunk scores (``lax.cond`` on the chunks' decay span): around the whole cond
(``outer``, as before) or around each branch (``branches``,
:func:`rnnjax.engines.chunkwise.checkpointed_cond`). A cond's backward keeps the residuals of
both branches, the untaken one's zero-filled; checkpointed branches keep only their operands.
Fwd+bwd of per-key ``gla``, ``rwkv7`` and KDA (``delta_rule`` with per-key decays), B = 2,
4 heads, d_k = d_v = 64, the default chunk sizes, float32; each row in a fresh process,
medians of ``--repeats`` calls, and the compiled memory (arguments, outputs, temporaries).

    python -m benchmarks.lab.cond_checkpoint [--lengths 64 1024 4096] [--repeats 7]
"""

from __future__ import annotations

import argparse

from benchmarks.lab.chunk_states import in_fresh_processes, measure

OPS = ("gla_key", "rwkv7", "kda")
VARIANTS = ("outer", "branches")


def _outer_cond(pred, on_true, on_false, *args):
    """The cond checkpointed as a whole (the form before ``checkpointed_cond``)."""
    import jax

    return jax.checkpoint(lambda *a: jax.lax.cond(pred, on_true, on_false, *a), prevent_cse=False)(*args)


def one(op: str, variant: str, steps: int, repeats: int) -> None:
    import jax.numpy as jnp

    from benchmarks.linear_attention import inputs
    from rnnjax.engines import chunkwise, chunkwise_delta

    if variant == "outer":
        chunkwise.checkpointed_cond = chunkwise_delta.checkpointed_cond = _outer_cond
    if op == "kda":  # the gated delta rule's inputs with one decay per key
        q, k, v, beta, g = inputs("gated_delta", 2, steps, 4, 64, 64, jnp.float32)
        print(measure("gated_delta", steps, repeats, (q, k, v, beta, jnp.broadcast_to(g[..., None], k.shape) / 4)))
    else:
        print(measure(op, steps, repeats))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lab.cond_checkpoint", description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 1024, 4096])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--one", nargs=3, metavar=("VARIANT", "OP", "T"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return one(args.one[1], args.one[0], int(args.one[2]), args.repeats)
    print(f"{'op':8s} {'T':>6} | {'outer ms':>9} {'MiB':>7} | {'branches ms':>11} {'MiB':>7} | outer / branches")
    for op in args.ops:
        for steps in args.lengths:
            row = in_fresh_processes("benchmarks.lab.cond_checkpoint", [op, str(steps)], VARIANTS, args.repeats)
            (ot, om), (bt, bm) = row["outer"], row["branches"]
            print(f"{op:8s} {steps:6d} | {ot:9.1f} {om:7.1f} | {bt:11.1f} {bm:7.1f} | "
                  f"{ot / bt:.2f}x time, {om / bm:.2f}x memory")


if __name__ == "__main__":
    main()
