"""Where the chunkwise delta rule's time and memory go (``rnnjax/engines/chunkwise_delta.py``),
on the chunk layout ``(B, H, N, C, d)`` at B = 2, 4 heads, T = 4096, d = 64, C = 64:

- the unit-lower inverse: its ``custom_jvp`` (``dT = -T dA T``) against autodiff of the row
  updates of the forward substitution;
- the per-chunk arrays computed all at once or ``chunk_group(C)`` chunks at a time (one step of
  the loop over groups, checkpointed; ``chunk_groups.py`` compares the loops): run time and
  XLA's compiled temporary memory of fwd+bwd.

    python -m benchmarks.lab.delta_rule_parts
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from rnnjax.engines import chunkwise, chunkwise_delta

B, H, N, C, D = 2, 4, 64, 64, 64


def measure(label: str, fn, *args) -> None:
    """Median of 7 runs and the compiled temporaries of ``fn`` (jit)."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(7):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    print(f"{label:44s} {1e3 * np.median(times):7.1f} ms   temp {temp:6.0f} MiB", flush=True)


def main() -> None:
    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], (B, H, N, C, D))
    k = jax.random.normal(keys[1], (B, H, N, C, D))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(keys[2], (B, H, N, C, D))
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (B, H, N, C)))
    g = jax.nn.log_sigmoid(4 + jax.random.normal(keys[4], (B, H, N, C)))
    seg = chunkwise.segments(None, B, N, C)
    A = beta[..., :, None] * chunkwise_delta._scores(k, k, jnp.cumsum(g, axis=3), seg.same, strict=True)

    loss = lambda f: jax.grad(lambda A: jnp.sum(jnp.sin(f(A))))
    measure("inverse fwd", chunkwise_delta.unit_lower_inverse, A)
    measure("inverse fwd+bwd, custom_jvp", loss(chunkwise_delta.unit_lower_inverse), A)
    measure("inverse fwd+bwd, autodiff of the row updates", loss(chunkwise_delta.unit_lower_inverse.fun), A)

    # The op on (B, T, H, d) inputs, as benchmarks/linear_attention.py calls it.
    to_op = lambda a: jnp.moveaxis(a, 1, 3).reshape(B, N * C, H, *a.shape[4:])
    args = [to_op(a) for a in (q, k, v, beta, g)]
    op = lambda *a: rj.linear_attention.delta_rule(*a, method=rj.Chunked(C))[0]
    grad = jax.grad(lambda *a: jnp.sum(op(*a)), argnums=(0, 1, 2, 3, 4))
    group = chunkwise_delta.chunk_group
    for size in (group(C), N):  # N: every chunk at once
        chunkwise_delta.chunk_group = lambda chunk, size=size: size
        jax.clear_caches()  # rnnjax's evaluation keeps traced programs per cell
        measure(f"delta_rule fwd+bwd, {size} chunks at a time", grad, *args)
    chunkwise_delta.chunk_group = group


if __name__ == "__main__":
    main()
