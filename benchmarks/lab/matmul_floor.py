"""The floor the chunkwise gla's fwd+bwd cannot go under on this CPU: its 12 batched matrix
products alone (4 forward, 8 backward, every one ``(C, 64) x (64, C)``-sized per chunk:
``QK^T``, ``(P)V``, ``(K e^{b_C - b})^T V``, ``(Q e^b) S``, and the two cotangents of each),
timed as bare ``jnp.einsum`` calls on ready operands, against ``rj.Sequential()``'s
and ``rj.Chunked()``'s fwd+bwd of the per-head ``gla`` op in the same process
(B = 2, 4 heads, T = 4096, d_k = d_v = 64, C = 64, float32; medians of interleaved rounds).

A product ``C = A B`` has the cotangents ``dA = dC B^T`` and ``dB = A^T dC``, so a backward
pass has all three kinds; XLA:CPU sends a product to YNNPACK only when its left operand
contracts over its last axis (``A^T B`` goes to Eigen: ``xla/backends/cpu/ynn_support.cc``).

    python -m benchmarks.lab.matmul_floor
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.linear_attention import inputs, jax_fn

B, H, T, C, D = 2, 4, 4096, 64, 64


def main(rounds: int = 9) -> None:
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.normal(k, (B, H, T // C, C, D)) for k in keys)
    xs = inputs("gla_head", B, T, H, D, D, jnp.float32)
    grad = lambda f: jax.jit(jax.grad(lambda *x: jnp.sum(f(*x)), argnums=(0, 1, 2, 3)))
    calls = {
        "product A B": (jax.jit(lambda a, b: jnp.einsum("...ij,...je->...ie", a, b)), (a, b)),
        "product A B^T": (jax.jit(lambda a, b: jnp.einsum("...id,...jd->...ij", a, b)), (a, b)),
        "product A^T B": (jax.jit(lambda a, b: jnp.einsum("...ji,...je->...ie", a, b)), (a, b)),
        "gla per-head op, rj.Sequential() fwd+bwd": (grad(jax_fn("gla_head", "sequential")), xs),
        "gla per-head op, rj.Chunked(64) fwd+bwd": (grad(jax_fn("gla_head", "chunked-64")), xs),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    med = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    for name, ms in med.items():
        print(f"{name:58s} {ms:8.2f} ms")
    products = list(med.values())[:3]
    sequential, chunked = list(med.values())[3:]
    floor = 4 * sum(products)  # each kind 4 times: 12 products
    print(
        f"\n12 products (4 of each kind): {floor:.1f} ms = sequential / {sequential / floor:.1f}; "
        f"12 of the fastest kind: sequential / {sequential / (12 * min(products)):.1f}; "
        f"chunked now: {chunked:.1f} ms = sequential / {sequential / chunked:.1f}"
    )


if __name__ == "__main__":
    main()
