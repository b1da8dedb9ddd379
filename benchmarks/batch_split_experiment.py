"""Decision script: does splitting the batch into independent halves inside one step let
XLA:CPU run them on both cores? (It did not: forward equal, forward+backward slower.)

    python benchmarks/batch_split_experiment.py

Measured here (2-core CPU, jax 0.10.2, LSTM B=32 D=H=128 T=1024, median of 7):
base 55.3 ms, split2 51.7, split4 51.9; forward+backward base 202, split2 308, split4 390.
Two separate rj.scan calls over the batch halves (two independent while loops in one
program; 2026-11-27): forward 47.8 -> 56.0 ms, forward+backward 193 -> 343 ms. XLA:CPU runs
the two loops one after the other, so host devices (shard_map) remain the way to both cores.
"""
import time, jax, jax.numpy as jnp, numpy as np
import rnnjax as rj
cell = rj.LSTM(128)
params = cell.init(jax.random.key(0), 128)
xs = jax.random.normal(jax.random.key(1), (32, 1024, 128))

def base(p, xs):
    return rj.scan(cell, p, xs)[0]

def split(p, xs, n=2):
    parts = jnp.split(jnp.swapaxes(xs, 0, 1), n, axis=1)  # T, B/n, D each
    def step(carries, x_parts):
        new, ys = [], []
        for c, x in zip(carries, x_parts):
            c, y = cell.step(p, c, x)
            new.append(c); ys.append(y)
        return tuple(new), tuple(ys)
    carries = tuple(cell.init_carry((32 // n,)) for _ in range(n))
    _, ys = jax.lax.scan(step, carries, tuple(parts))
    return jnp.swapaxes(jnp.concatenate(ys, axis=1), 0, 1)

fns = {"base": jax.jit(base), "split2": jax.jit(split), "split4": jax.jit(lambda p, x: split(p, x, 4))}
for k in list(fns):
    f = fns[k]
    fns[k + " bwd"] = jax.jit(jax.grad(lambda p, x, f=f: f(p, x).sum(), argnums=(0, 1)))
np.testing.assert_allclose(fns["split2"](params, xs), fns["base"](params, xs), atol=1e-5)
for f in fns.values(): jax.block_until_ready(f(params, xs))
times = {k: [] for k in fns}
for _ in range(7):
    for k, f in fns.items():
        t0 = time.perf_counter(); jax.block_until_ready(f(params, xs)); times[k].append(time.perf_counter() - t0)
for k, v in times.items(): print(f"{k:12s} {1e3*np.median(v):7.1f} ms")
