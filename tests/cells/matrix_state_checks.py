"""Checks shared by the tests of matrix-state cells (tests/cells/test_gla.py, test_mamba2.py):
the chunkwise evaluation against the step recurrence, and decoding after a chunkwise prefill."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from tests.cases import normal
from tests.compat import enable_x64
from tests.helpers import assert_trees_close

STEPS = 11  # not a multiple of the chunk size 4: a partial last chunk
LENGTHS = np.array([STEPS, 6, 0])
# Resets at the first step (the initial state and window are hidden), at step 2 (inside the
# convolution's reach of the window), at a chunk boundary (4) and past a length (8 in row 1).
RESETS = np.zeros((3, STEPS), bool)
RESETS[0, [2, 4]] = True
RESETS[1, [0, 3, 8]] = True


def perturbed(tree, seed, scale=0.3):
    """``tree`` plus ``scale`` times standard normal noise on every leaf: no zero biases, unit
    norms or skip weights left from an initialisation, so every parameter acts."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape), a.dtype), tree)


@functools.partial(jax.jit, static_argnames=("cell", "method", "reverse"))
def loss_and_grad(cell, params, xs, carry, lengths, resets, method, reverse):
    def loss(params, xs, carry):
        ys, final = rj.scan(cell, params, xs, carry, lengths=lengths, resets=resets, reverse=reverse, method=method)
        weights = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(final)), (ys, final)

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, xs, carry)


def check_chunked_equals_sequential(cell, input_size, reverse):
    """``rj.Chunked(4)`` and ``rj.Sequential()`` agree to float64 rounding in outputs, final
    carry and the gradients of every parameter, input and initial carry leaf (window included),
    with lengths and resets."""
    with enable_x64(True):
        params = jax.tree.map(lambda a: np.asarray(a, np.float64), cell.init(jax.random.key(0), input_size))
        params = perturbed(params, 1)
        xs = normal(2, (3, STEPS, input_size), np.float64)
        carry = perturbed(cell.init_carry((3,), jnp.float64), 3, scale=1.0)
        lengths, resets = jnp.asarray(LENGTHS), jnp.asarray(RESETS)
        got = loss_and_grad(cell, params, xs, carry, lengths, resets, rj.Chunked(4), reverse)
        expected = loss_and_grad(cell, params, xs, carry, lengths, resets, rj.Sequential(), reverse)
    ys = np.asarray(got[0][1][0])
    assert not ys[1, 6:].any() and not ys[2].any()  # past each length
    assert np.abs(ys[0]).min() > 0  # and not zero where it is real
    # Both sum the same terms in other orders: float64 rounding (unit roundoff 1e-16) only.
    assert_trees_close(got, expected, atol=1e-10, rtol=1e-9)


def check_decoding_after_prefill(cell, input_size, prompt=3, steps=6):
    """``cell.step`` token by token from the carry a chunkwise ``rj.scan`` of a prompt returns
    (``rj.Chunked(2)``: a partial last chunk) gives the outputs and final carry of one
    ``rj.scan`` (the default method) over the whole sequence."""
    params = perturbed(cell.init(jax.random.key(0), input_size), 4)
    xs = normal(5, (2, steps, input_size))
    ys_all, final_all = rj.scan(cell, params, xs)
    ys, carry = rj.scan(cell, params, xs[:, :prompt], method=rj.Chunked(2))
    step = jax.jit(cell.step)
    decoded = []
    for t in range(prompt, steps):
        carry, y = step(params, carry, xs[:, t])
        decoded.append(y)
    got = (jnp.concatenate([ys, jnp.stack(decoded, axis=1)], axis=1), carry)
    # float32: chunkwise and step-by-step sums of the same terms differ by rounding.
    assert_trees_close(got, (ys_all, final_all), atol=2e-5, rtol=2e-5, check_dtypes=True)


def causal_conv(u, weight, bias=None):
    """Depthwise causal convolution of ``u`` ``(T, C)`` with zeros before the first step:
    ``out[t] = sum_k weight[k] * u[t - K + 1 + k]`` (``weight[-1]`` on the newest step)."""
    width = weight.shape[0]
    padded = np.concatenate([np.zeros((width - 1, u.shape[1])), u])
    out = sum(weight[k] * padded[k : k + len(u)] for k in range(width))
    return out if bias is None else out + bias


def silu(a):
    return a / (1 + np.exp(-a))
