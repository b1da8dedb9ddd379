"""Decision script: would a batch-major loop (read x[:, t], write y[:, t] in place) beat
rj.scan's time-major loop (transpose xs in, ys out)? Forward only.

    python benchmarks/layout_experiment.py elman 256 1024 4096 16384

Measured here (2-core CPU, jax 0.10.2, B=32 D=H=128, median of 9, ms):
  glibc defaults:         Elman 1024: 14.97 vs 13.28, 4096: 75.9 vs 74.0; LSTM 1024: 49.4 vs 48.1
  --malloc reuse settings: Elman 1024: 14.97 vs 13.39, 4096: 55.3 vs 52.6; LSTM 1024: 48.6 vs 48.4
Interleaved calls, glibc defaults, Elman us/step (page faults per step), rnnjax vs batch-major:
  T=1024 14.1 (1.1) vs 13.1 (0); T=4096 18.5 (8) vs 17.2 (4); T=16384 18.7 (8) vs 17.8 (4),
so the batch-major loop is ~7% faster at every T but no flatter (max/min 1.33 vs 1.36).
Batch-major saves one fresh (T, B, D) buffer and a transpose: 5-11% for the Elman forward,
nothing for LSTM/GRU, and nothing for training (autodiff needs the time-major scan; a
closed-over xs read by dynamic_slice makes the backward pass O(T^2)). Not adopted. The
growth of Elman's time per step past T=2048 under glibc's defaults is page faults (counted
with getrusage at T=4096: 32 782 per call, every page of two 64 MiB buffers; 16 385 batch-major), gone with
MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967295.
"""
import time, sys, jax, jax.numpy as jnp, numpy as np
import rnnjax as rj
cellname = sys.argv[1]; Ts = [int(a) for a in sys.argv[2:]]
cell = {"elman": rj.Elman(128), "lstm": rj.LSTM(128), "gru": rj.GRU(128)}[cellname]
params = cell.init(jax.random.key(0), 128)

def base(p, xs):
    return rj.scan(cell, p, xs)[0]

def batch_major(p, xs):
    B, T, D = xs.shape
    c0 = cell.init_carry((B,), xs.dtype)
    ys0 = jnp.zeros((B, T, cell.hidden_size), xs.dtype)
    def body(t, state):
        c, ys = state
        x = jax.lax.dynamic_index_in_dim(xs, t, axis=1, keepdims=False)
        c, y = cell.step(p, c, x)
        ys = jax.lax.dynamic_update_index_in_dim(ys, y, t, axis=1)
        return c, ys
    return jax.lax.fori_loop(0, T, body, (c0, ys0))[1]

for T in Ts:
    xs = jax.random.normal(jax.random.key(1), (32, T, 128))
    fns = {"base": jax.jit(base), "batch_major": jax.jit(batch_major)}
    np.testing.assert_allclose(fns["batch_major"](params, xs), fns["base"](params, xs), atol=1e-5)
    for f in fns.values(): jax.block_until_ready(f(params, xs))
    times = {k: [] for k in fns}
    for _ in range(9):
        for k, f in fns.items():
            t0 = time.perf_counter(); jax.block_until_ready(f(params, xs)); times[k].append(time.perf_counter() - t0)
    print(cellname, T, "  ".join(f"{k} {1e3*np.median(v):7.2f} ms ({1e6*np.median(v)/T:5.1f} us/step)" for k, v in times.items()), flush=True)
