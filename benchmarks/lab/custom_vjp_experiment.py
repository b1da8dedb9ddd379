"""Decision script: does a hand-written sequence-level VJP for the LSTM beat autodiff on CPU?

Autodiff of ``lax.scan`` accumulates the weight gradients inside the backward loop: per step
an outer product ``h_{t-1}^T dz_t`` (and ``x_t^T dz_t``) plus an add into the running
gradient, and ``dx_t = dz_t W_x^T``. The custom VJP keeps only ``dh_{t-1} = dz_t W_h^T``
and the elementwise gate derivatives in the loop, stores ``dz`` for every step, and after
the loop forms ``dW_x = X^T dZ``, ``dW_h = H_prev^T dZ``, ``db = sum dZ`` and ``dX = dZ W_x^T``
as single large matrix products (which XLA:CPU runs on every core).

    python -m benchmarks.lab.custom_vjp_experiment                 # 1 device
    python -m benchmarks.lab.custom_vjp_experiment --host-devices 2  # also the batch split over 2

Prints median ms over interleaved repeats and the largest gradient difference.
Figures: ``benchmarks/lab/DECISIONS.md``.
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks import timing


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host-devices", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    if args.host_devices > 1 and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.host_devices}"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import rnnjax as rj

    B, H, T = args.batch, args.hidden, args.length
    cell = rj.LSTM(H)
    params = cell.init(jax.random.key(0), H)
    xs = jax.random.normal(jax.random.key(1), (B, T, H))

    def autodiff_seq(p, xs):
        return rj.scan(cell, p, xs)[0]

    @jax.custom_vjp
    def custom_seq(p, xs):
        return autodiff_seq(p, xs)

    def fwd(p, xs):
        xs_tm = jnp.swapaxes(xs, 0, 1)
        h0 = jnp.zeros((xs.shape[0], H), xs.dtype) + 0 * xs_tm[0, :, :1]  # varying under shard_map

        def body(carry, x):
            h, c = carry
            z = x @ p.w_x + h @ p.w_h + p.b
            i, f, g, o = jnp.split(z, 4, axis=-1)
            i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
            c_new = f * c + i * g
            h_new = o * jnp.tanh(c_new)
            return (h_new, c_new), (h_new, c_new, jnp.concatenate([i, f, g, o], axis=-1))

        _, (hs, cs, gates) = jax.lax.scan(body, (h0, h0), xs_tm)
        return jnp.swapaxes(hs, 0, 1), (p, xs_tm, hs, cs, gates)

    def bwd(res, dys):
        p, xs_tm, hs, cs, gates = res
        dys = jnp.swapaxes(dys, 0, 1)
        zeros = jnp.zeros_like(hs[:1])
        c_prev = jnp.concatenate([zeros, cs[:-1]], axis=0)
        h_prev = jnp.concatenate([zeros, hs[:-1]], axis=0)

        def body(carry, inputs):
            dh, dc = carry
            dy, c, cp, gate = inputs
            i, f, g, o = jnp.split(gate, 4, axis=-1)
            tc = jnp.tanh(c)
            dh = dh + dy
            do = dh * tc
            dc = dc + dh * o * (1 - tc * tc)
            dz = jnp.concatenate([dc * g * i * (1 - i), dc * cp * f * (1 - f), dc * i * (1 - g * g), do * o * (1 - o)], -1)
            return (dz @ p.w_h.T, dc * f), dz

        _, dz = jax.lax.scan(body, (jnp.zeros_like(hs[0]), jnp.zeros_like(hs[0])), (dys, cs, c_prev, gates), reverse=True)
        flat = lambda a: a.reshape(-1, a.shape[-1])
        dw_x = flat(xs_tm).T @ flat(dz)
        dw_h = flat(h_prev).T @ flat(dz)
        db = jnp.sum(flat(dz), axis=0)
        dxs = jnp.swapaxes(dz @ p.w_x.T, 0, 1)
        return p._replace(w_x=dw_x, w_h=dw_h, b=db), dxs

    custom_seq.defvjp(fwd, bwd)

    def grad_of(seq):
        return jax.grad(lambda p, x: jnp.sum(seq(p, x)), argnums=(0, 1))

    fns = {"autodiff": grad_of(autodiff_seq), "custom": grad_of(custom_seq)}
    devices = jax.devices()
    if len(devices) > 1:
        mesh = Mesh(np.array(devices), ("batch",))
        xs_sh = jax.device_put(xs, NamedSharding(mesh, P("batch")))
        params_sh = jax.device_put(params, NamedSharding(mesh, P()))
        for name in list(fns):
            seq = autodiff_seq if name == "autodiff" else custom_seq

            def sharded(p, x, seq=seq):
                with rj.distributed.data_parallel(mesh, "batch"):
                    return seq(p, x) if seq is autodiff_seq else _split(seq, p, x)

            def _split(seq, p, x):
                return jax.shard_map(lambda p, x: seq(jax.tree.map(lambda a: jax.lax.pcast(a, "batch", to="varying"), p), x),
                                     mesh=mesh, in_specs=(P(), P("batch")), out_specs=P("batch"))(p, x)

            fns[f"{name} x{len(devices)}"] = grad_of(sharded)
    args_for = lambda name: (params_sh, xs_sh) if " x" in name else (params, xs)
    compiled = {n: timing.compile_ahead(f, *args_for(n)) for n, f in fns.items()}
    ref = compiled["autodiff"].run()
    for n, f in compiled.items():
        out = f.run()
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
        print(f"{n:16s} max |grad diff| vs autodiff {diff:.1e}")
    for n, t in timing.compare(compiled, args.repeats).items():
        print(f"{n:16s} {1e3 * t.median_s:8.1f} ms (median of {len(t.times_s)})")


if __name__ == "__main__":
    main()
