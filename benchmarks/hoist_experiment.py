"""Decision script: LSTM with the input projection inside the step vs hoisted out of the loop.

    python -m benchmarks.hoist_experiment [--length 1024] [--repeats 7]

Prints median ms for forward and forward+backward (grad w.r.t. params and inputs of the
sum of outputs), B=32, D=H=128, float32, both variants in one process, interleaved.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj


def lstm_inside(params, xs):
    return rj.scan(rj.LSTM(128), params, xs)[0]


def lstm_hoisted(params, xs):
    w_x, w_h, b = params.w_x, params.w_h, params.b
    u = jnp.einsum("btd,dg->tbg", xs, w_x) + b          # (T, B, 4H): one large product

    def step(carry, u_t):
        h, c = carry
        z = u_t + h @ w_h
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((xs.shape[0], w_h.shape[0]), xs.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), u)
    return jnp.swapaxes(hs, 0, 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    params = rj.LSTM(128).init(jax.random.key(0), 128)
    xs = jax.random.normal(jax.random.key(1), (32, args.length, 128))
    fns = {}
    for name, f in (("inside", lstm_inside), ("hoisted", lstm_hoisted)):
        fns[name, "fwd"] = jax.jit(f)
        fns[name, "fwd+bwd"] = jax.jit(jax.grad(lambda p, x, f=f: f(p, x).sum(), argnums=(0, 1)))
    ref = fns["inside", "fwd"](params, xs)
    np.testing.assert_allclose(fns["hoisted", "fwd"](params, xs), ref, atol=1e-5)
    times = {k: [] for k in fns}
    for k, f in fns.items():
        jax.block_until_ready(f(params, xs))
    for _ in range(args.repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(params, xs))
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        print(f"{k[0]:8s} {k[1]:8s} median {1e3 * np.median(v):8.1f} ms")


if __name__ == "__main__":
    main()
