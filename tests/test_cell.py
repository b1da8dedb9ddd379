"""The Cell protocol (rnnjax/cell.py): a user-defined cell works with every driver and layer,
and the shared checks and helpers do what they say."""

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.ops import ACTIVATIONS, resolve_activation, stacked_init
from tests.cases import normal


class LeakyParams(NamedTuple):
    w: jax.Array  # (input_size, hidden)


@dataclass(frozen=True)
class Leaky(rj.Cell):
    """A user's own cell: h_t = decay * h_{t-1} + tanh(x_t W)."""

    hidden_size: int
    decay: float = 0.5
    params_type = LeakyParams

    def init(self, key, input_size, dtype=jnp.float32):
        return LeakyParams(jax.random.normal(key, (input_size, self.hidden_size), dtype))

    def init_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros((*batch_shape, self.hidden_size), dtype)

    def step(self, params, carry, x):
        self.check_params(params)
        self.check_input(params, x)
        h = self.decay * carry + jnp.tanh(x @ params.w)
        return h, h

    def output_size(self, input_size):
        return self.hidden_size

    def input_size(self, params):
        return params.w.shape[0]


def test_a_user_defined_cell_runs_through_scan_and_layers():
    cell = Leaky(4)
    params = cell.init(jax.random.key(0), 3)
    xs = normal(1, (2, 5, 3))
    ys, h = rj.scan(cell, params, xs, lengths=jnp.array([5, 2]), reverse=True)
    # By hand, for the second sequence (length 2, backwards).
    h_ref = jnp.zeros(4)
    for t in (1, 0):
        h_ref = 0.5 * h_ref + jnp.tanh(xs[1, t] @ params.w)
    np.testing.assert_allclose(h[1], h_ref, atol=1e-6)
    stack = rj.Stack([rj.Bidirectional(rj.RNN(cell)), rj.RNN(rj.GRU(2))])
    out, _ = stack.apply(stack.init(jax.random.key(2), 3), xs)
    assert out.shape == (2, 5, 2)
    with pytest.raises(ValueError, match=r"xs has shape \(2, 5, 4\); expected \(\.\.\., T, 3\) for input_size=3 of Leaky"):
        rj.scan(cell, params, jnp.ones((2, 5, 4)))


def test_a_cell_missing_a_method_cannot_be_built():
    class Incomplete(rj.Cell):
        def init(self, key, input_size, dtype=jnp.float32):
            return ()

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_final_carry_with_lengths_gathers_no_stored_carries():
    """The carry is frozen inside the loop: the scan stacks outputs only, never carries."""
    cell = rj.LSTM(4)
    params = cell.init(jax.random.key(0), 3)
    jaxpr = jax.make_jaxpr(lambda xs, n: rj.scan(cell, params, xs, lengths=n, reverse=True))(
        jnp.ones((2, 9, 3)), jnp.array([9, 4]))
    scans = []
    def collect(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "scan":
                scans.append(eqn)
            for value in eqn.params.values():  # nested jaxprs: pjit, scan bodies
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    collect(inner)
    collect(jaxpr.jaxpr)
    assert len(scans) == 1
    stacked = scans[0].outvars[scans[0].params["num_carry"]:]
    assert [v.aval.shape for v in stacked] == [(9, 2, 4)]  # the outputs ys, nothing else


def test_resolve_activation():
    assert resolve_activation("relu") is jax.nn.relu
    fn = lambda x: x * 2  # noqa: E731
    assert resolve_activation(fn) is fn
    np.testing.assert_allclose(ACTIVATIONS["gelu"](jnp.array(1.0)), 0.8413447, rtol=1e-6)  # exact, erf form
    np.testing.assert_allclose(ACTIVATIONS["hard_sigmoid"](jnp.array([-4.0, 0.0, 1.5, 4.0])), [0, 0.5, 0.75, 1])
    with pytest.raises(ValueError, match="unknown activation 'swishy'; expected a callable or one of"):
        resolve_activation("swishy")


def test_stacked_init_makes_each_gate_block_orthogonal():
    w = stacked_init(jax.nn.initializers.orthogonal(), jax.random.key(0), 6, 6, 4, jnp.float32)
    assert w.shape == (6, 24)
    for g in range(4):
        block = w[:, 6 * g : 6 * (g + 1)]
        np.testing.assert_allclose(block.T @ block, np.eye(6), atol=1e-5)


def test_lstm_forget_bias_and_gate_layout():
    params = rj.LSTM(3, forget_bias=2.0).init(jax.random.key(0), 2)
    np.testing.assert_array_equal(params.b, [0, 0, 0, 2, 2, 2, 0, 0, 0, 0, 0, 0])


def test_a_real_carry_for_a_complex_cell_is_rejected():
    cell = rj.LRU(4)
    params = cell.init(jax.random.key(0), 3)
    with pytest.raises(TypeError, match="carry has a leaf of dtype float32; expected a complex dtype"):
        rj.scan(cell, params, jnp.ones((2, 5, 3)), jnp.zeros((2, 4)))
