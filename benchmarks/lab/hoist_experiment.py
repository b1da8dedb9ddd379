"""Decision script: LSTM with the input projection inside the step vs hoisted out of the loop.

    python -m benchmarks.lab.hoist_experiment [--length 1024] [--repeats 7]

Prints median ms for forward and forward+backward (grad w.r.t. params and inputs of the
sum of outputs), B=32, D=H=128, float32, both variants in one process, interleaved.
Figures: ``benchmarks/lab/DECISIONS.md``.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from benchmarks import timing


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


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    params = rj.LSTM(128).init(jax.random.key(0), 128)
    xs = jax.random.normal(jax.random.key(1), (32, args.length, 128))
    compiled = {}
    for name, f in (("inside", lstm_inside), ("hoisted", lstm_hoisted)):
        compiled[name, "fwd"] = timing.compile_ahead(f, params, xs)
        compiled[name, "fwd+bwd"] = timing.compile_ahead(jax.grad(lambda p, x, f=f: f(p, x).sum(), argnums=(0, 1)),
                                                         params, xs)
    np.testing.assert_allclose(compiled["hoisted", "fwd"].run(), compiled["inside", "fwd"].run(), atol=1e-5)
    for k, t in timing.compare(compiled, args.repeats).items():
        print(f"{k[0]:8s} {k[1]:8s} median {1e3 * t.median_s:8.1f} ms")


if __name__ == "__main__":
    main()
