"""How much of a chunkwise op's fwd+bwd is the layout around the engine: the op on
``(B, T, H, d)`` inputs (``rj.linear_attention``, through :func:`rnnjax.scan.evaluate`: the
concatenated step input, time-major, then chunks) against the engine itself on inputs
already in the chunk layout ``(B, H, N, C, d)`` (``rnnjax.engines.chunkwise`` /
``chunkwise_delta``), at B = 2, 4 heads, T = 4096, d = 64, C = 64, float32; medians of
interleaved rounds in one process.

A third row is the op as it was before: its inputs concatenated batch-major
``(B, T, sum of widths)``, which ``evaluate`` moves time-major. XLA materialised that
concatenation (it cannot slice through the transpose); concatenated time-major and handed
over transposed (``ops._run`` now), the two transposes cancel and each part is read from its
own array.

    python -m benchmarks.lab.chunked_overhead [--ops gla_head gated_delta] [--rounds 7]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.linear_attention import inputs, jax_fn
from rnnjax.engines import chunkwise, chunkwise_delta
from rnnjax.linear_attention import delta, ops
from rnnjax.scan import evaluate
from rnnjax.sequence import check_reverse, validate

B, H, T, C, D = 2, 4, 4096, 64, 64


def engine_fn(op: str):
    """``f(*chunked inputs) -> o`` calling the engine on ``(B, H, N, C, ...)`` arrays."""
    seg = chunkwise.segments(None, B, T // C, C)
    state = jnp.zeros((B, H, D, D))
    scale = D**-0.5
    if op in ("gla_head", "gla_key"):
        return lambda q, k, v, g: chunkwise.gla(q, k, v, g, state, seg, scale)[0]
    if op == "mlstm":
        zero = chunkwise.MLSTMState(state, jnp.zeros((B, H, D)), jnp.zeros((B, H)))
        return lambda q, k, v, i, f: chunkwise.mlstm(q, k, v, i, jax.nn.log_sigmoid(f), zero, seg, scale, 1e-6)[0]
    return lambda q, k, v, beta, g: chunkwise_delta.delta_rule(q, k, v, beta, g, state, seg, scale)[0]


def to_chunks(a: jax.Array) -> jax.Array:
    """``(B, T, H, ...)`` -> ``(B, H, N, C, ...)``."""
    a = a.reshape(B, T // C, C, *a.shape[2:])
    return jnp.moveaxis(a, 3, 1)


def _run_batch_major(cell, parts, state, lengths, resets, reverse, method, o_shape):
    """``rnnjax.linear_attention.ops._run`` before: the parts concatenated batch-major."""
    dtype = jnp.result_type(*parts)
    xs = jnp.concatenate([p.reshape(*p.shape[:-2], p.shape[-2] * p.shape[-1]).astype(dtype) for p in parts], axis=-1)
    xs, state, lengths, resets = validate(cell, None, xs, state, lengths, resets)
    o, final, _ = evaluate(cell, None, xs, state, lengths, resets, check_reverse(reverse), ops._method(method))
    return o.reshape(o_shape), final


def traced_with(run, fn):
    """``fn`` with the ops' ``_run`` replaced by ``run`` while it is traced."""

    def traced(*args):
        saved = ops._run, delta._run
        ops._run = delta._run = run
        try:
            return fn(*args)
        finally:
            ops._run, delta._run = saved

    return traced


def fwd_bwd(fn, n: int):
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(n))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ops", nargs="+", default=["gla_head", "gla_key", "mlstm", "gated_delta"])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    for op in args.ops:
        xs = inputs(op, B, T, H, D, D, jnp.float32)
        chunked = [to_chunks(a) for a in xs]
        calls = {
            "op (B, T, H, d)": (fwd_bwd(jax_fn(op, "chunked-64"), len(xs)), xs),
            "op, concatenated batch-major": (
                fwd_bwd(traced_with(_run_batch_major, jax_fn(op, "chunked-64")), len(xs)),
                xs,
            ),
            "engine (B, H, N, C, d)": (fwd_bwd(engine_fn(op), len(xs)), chunked),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        for fn, a in calls.values():
            jax.block_until_ready(fn(*a))
        for _ in range(args.rounds):
            for name, (fn, a) in calls.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(*a))
                times[name].append(time.perf_counter() - start)
        med = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
        line = ", ".join(f"{name} {ms:.1f} ms" for name, ms in med.items())
        op_ms = med["op (B, T, H, d)"]
        print(
            f"{op:12s} fwd+bwd: {line}; engine / op = {med['engine (B, H, N, C, d)'] / op_ms:.2f}, "
            f"before / op = {med['op, concatenated batch-major'] / op_ms:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
