"""The linear methods (rj.Associative, rj.Chunked; rnnjax/engines/linear.py), rj.Auto, the
method values' checks and rj.RNN's pass-through. Newton's methods are in tests/test_newton.py.

Every method is compared with the sequential driver (itself checked against a plain loop
in tests/test_cells.py) on the same call: lengths, resets, reverse and a non-zero initial
carry together. float32 tolerance: 1e-5 absolute.
"""

import functools
import re
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax as rj
from rnnjax import parallel, tuning
from rnnjax.engines.affine import DIAG, solve_affine
from tests.cases import CELL_CASES, INPUT_SIZE, normal, random_case
from tests.compat import enable_x64
from tests.helpers import assert_trees_close

LINEAR = sorted(name for name, cell in CELL_CASES.items() if isinstance(cell, rj.LinearCell))
STEPS = 7
LENGTHS = jnp.array([7, 4, 0])
# Boundaries inside, at the edge of, and past a length; sequence 1 has two in a row.
RESETS = jnp.zeros((3, STEPS), bool).at[0, 3].set(True).at[1, 1].set(True).at[1, 2].set(True).at[1, 5].set(True)
F32 = dict(atol=1e-5, rtol=1e-5, check_dtypes=True)  # float32 rounding; the same dtypes and shapes


def data(cell, key=0, dtype=jnp.float32, batch=(3,), steps=STEPS):
    return random_case(cell, steps, key, dtype, batch)


# Each (cell, method) in one direction, forward and reverse by turns; make test-all runs the
# other direction too.
@pytest.mark.parametrize("name, method, reverse", [
    pytest.param(name, method, reverse, marks=[pytest.mark.slow] if (i + j + reverse) % 2 else [],
                 id=f"{name}-{method_id}-{'reverse' if reverse else 'forward'}")
    for i, name in enumerate(LINEAR)
    for j, (method_id, method) in enumerate([("associative", rj.Associative()), ("chunked", rj.Chunked(3))])
    for reverse in (False, True)])
def test_linear_methods_match_sequential(name, method, reverse):
    cell = CELL_CASES[name]
    params, xs, carry = data(cell)
    kw = dict(lengths=LENGTHS, resets=RESETS, reverse=reverse)
    expected = rj.scan(cell, params, xs, carry, **kw)
    ys, final = rj.scan(cell, params, xs, carry, method=method, **kw)
    assert_trees_close((ys, final), expected, **F32)
    assert not np.any(np.asarray(ys[1, 4:])) and not np.any(np.asarray(ys[2]))


@pytest.mark.parametrize("name", ["mingru", "lru"])
def test_linear_methods_without_masks_and_in_one_chunk(name):
    cell = CELL_CASES[name]
    params, xs, _ = data(cell, key=1)
    for reverse in (False, True):
        expected = rj.scan(cell, params, xs, reverse=reverse)
        assert_trees_close(rj.scan(cell, params, xs, reverse=reverse, method="associative"), expected, **F32)
    # chunk_size >= T: one chunk, a plain sequential pass over the coefficients.
    assert_trees_close(rj.scan(cell, params, xs, method=rj.Chunked(16)), rj.scan(cell, params, xs), **F32)


def test_long_float32_sequence_in_log_space_stays_close():
    cell = rj.MinGRU(4)
    params, xs, _ = data(cell, key=2, batch=(2,), steps=2048)
    expected = rj.scan(cell, params, xs)
    assert_trees_close(rj.scan(cell, params, xs, method="associative"), expected, atol=2e-5, rtol=1e-5, check_dtypes=True)
    assert_trees_close(rj.scan(cell, params, xs, method=rj.Chunked(64)), expected, atol=2e-5, rtol=1e-5, check_dtypes=True)


def test_associative_combines_earlier_then_later():
    # h_t = a_t h_{t-1} + b_t is not commutative in its steps: a wrong operand order fails here.
    a = jnp.array([0.5, 2.0, 0.1, 3.0])[:, None]
    b = jnp.array([1.0, -1.0, 4.0, 0.5])[:, None]
    h, expected = jnp.array([0.7]), []
    for t in range(4):
        h = a[t] * h + b[t]
        expected.append(h)
    for chunk in (None, 3):
        states = solve_affine(DIAG, (a, b), jnp.array([0.7]), chunk)
        np.testing.assert_allclose(states, jnp.stack(expected), rtol=1e-6)


def test_associative_gradient_has_no_sequential_loop():
    cell = CELL_CASES["lru"]
    params, xs, carry = data(cell)

    def loss(p):
        ys, h = rj.scan(cell, p, xs, carry, lengths=LENGTHS, resets=RESETS, reverse=True, method="associative")
        return jnp.sum(ys**2) + jnp.sum(jnp.abs(h) ** 2)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert not re.search(r"\b(scan|while)\[", jaxpr)


@pytest.mark.parametrize("name, method", [("mingru", "associative"), ("lru", "chunked")] + [  # the others: make test-all
    pytest.param(name, method, marks=pytest.mark.slow) for name, method in [("lru", "associative"),
                                                                            ("minlstm_identity_nobias", "chunked")]])
def test_check_grads_and_equal_to_sequential_gradients(name, method):
    cell = CELL_CASES[name]
    with enable_x64(True):
        params, xs, carry = data(cell, key=3, dtype=jnp.float64, batch=(2,), steps=5)
        lengths, resets = jnp.array([5, 3]), jnp.zeros((2, 5), bool).at[0, 2].set(True)

        def loss(p, x, c, method=method):
            ys, h = rj.scan(cell, p, x, c, lengths=lengths, resets=resets, reverse=True,
                            method=rj.Chunked(2) if method == "chunked" else method)
            return jnp.sum(ys**2) + jnp.sum(jnp.abs(h) ** 2)

        loss = jax.jit(loss, static_argnames="method")  # one compilation for check_grads' calls
        check_grads(loss, (params, xs, carry), order=1, modes=["rev"])
        got = jax.grad(loss, argnums=(0, 1, 2))(params, xs, carry)
        want = jax.grad(lambda *a: loss(*a, method="sequential"), argnums=(0, 1, 2))(params, xs, carry)
        assert_trees_close(got, want, atol=1e-10, rtol=1e-5, check_dtypes=True)


def test_vmap_over_single_sequences_equals_batched_call():
    cell = CELL_CASES["minlstm"]
    params, xs, carry = data(cell, key=4)
    run = lambda x, c, n, r: rj.scan(cell, params, x, c, lengths=n, resets=r, reverse=True, method="associative")
    assert_trees_close(jax.vmap(run)(xs, carry, LENGTHS, RESETS), run(xs, carry, LENGTHS, RESETS), atol=1e-6, rtol=1e-5, check_dtypes=True)


def test_jit_with_traced_lengths_equals_concrete():
    cell = CELL_CASES["mingru"]
    params, xs, carry = data(cell, key=5)
    f = jax.jit(lambda n: rj.scan(cell, params, xs, carry, lengths=n, method=rj.Chunked(2)))
    assert_trees_close(f(LENGTHS), rj.scan(cell, params, xs, carry, lengths=LENGTHS), atol=1e-5, rtol=1e-5, check_dtypes=True)


def test_zero_steps_and_dtypes_follow_the_sequential_driver():
    cell = CELL_CASES["mingru"]
    params, xs, carry = data(cell, steps=0)
    assert_trees_close(rj.scan(cell, params, xs, carry, method="associative"), rj.scan(cell, params, xs, carry), **F32)
    # bfloat16 inputs with float32 params compute in float32, as the sequential driver does.
    params, xs, _ = data(cell, key=6)
    assert_trees_close(rj.scan(cell, params, xs.astype(jnp.bfloat16), method="associative"),
                       rj.scan(cell, params, xs.astype(jnp.bfloat16)), **F32)


# ---- a diagonal linear cell built by a user from their own a, b ----


class EMAParams(NamedTuple):
    w: jax.Array  # (input_size, hidden)
    decay: jax.Array  # (hidden,), before the sigmoid


@dataclass(frozen=True)
class EMA(rj.LinearCell):
    """h_t = a * h_{t-1} + (1 - a) * (x_t W), a = sigmoid(decay): one a for all steps."""

    hidden_size: int
    params_type = EMAParams

    def init(self, key, input_size, dtype=jnp.float32):
        return EMAParams(jax.random.normal(key, (input_size, self.hidden_size), dtype), jnp.zeros(self.hidden_size, dtype))

    def init_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros((*batch_shape, self.hidden_size), dtype)

    def output_size(self, input_size):
        return self.hidden_size

    def input_size(self, params):
        return params.w.shape[0]

    def coefficients(self, params, x):
        a = jax.nn.sigmoid(params.decay)  # (hidden,): broadcast over batch and time by the driver
        return a, (1 - a) * (x @ params.w)


def test_a_users_linear_cell_runs_in_parallel():
    cell = EMA(4)
    params, xs, carry = data(cell, key=7)
    kw = dict(lengths=LENGTHS, resets=RESETS, reverse=True)
    expected = rj.scan(cell, params, xs, carry, **kw)
    for method in ("associative", "chunked"):
        assert_trees_close(rj.scan(cell, params, xs, carry, method=method, **kw), expected, **F32)


# ---- "auto" ----


def test_auto_on_cpu_runs_what_the_table_says(monkeypatch):
    cell = CELL_CASES["mingru"]
    params, xs, carry = data(cell)
    assert parallel.choose_method(cell, STEPS, backend="cpu") == "sequential"
    assert_trees_close(rj.scan(cell, params, xs, carry, method="auto", lengths=LENGTHS), rj.scan(cell, params, xs, carry, lengths=LENGTHS), **F32)
    assert parallel.cell_kind(rj.GRU(3)) == "nonlinear" and parallel.cell_kind(rj.LRU(3)) == "linear"
    assert parallel.cell_kind(rj.MinLSTM(3, candidate="identity")) == "linear"
    assert parallel.cell_kind(rj.IndRNN(3)) == "clipped_linear" and parallel.cell_kind(rj.IndRNN(3, activation="tanh")) == "exact_jacobian"
    assert parallel.cell_kind(rj.ParaLSTM(3)) == "exact_jacobian" and parallel.cell_kind(rj.LSTM(3, proj_size=2)) == "nonlinear"
    # Another table: associative from T=4 on, for log-space cells only.
    table = dict(tuning.AUTO_TABLE["cpu"], log_linear=((0, "sequential"), (4, "associative")))
    monkeypatch.setitem(tuning.AUTO_TABLE, "cpu", table)
    assert parallel.choose_method(cell, 3, backend="cpu") == "sequential"
    assert parallel.choose_method(cell, 4, backend="cpu") == "associative"
    assert parallel.choose_method(rj.LRU(3), 4, backend="cpu") == "sequential"
    jaxpr = str(jax.make_jaxpr(lambda x: rj.scan(cell, params, x, method="auto"))(xs))
    assert "scan[" not in jaxpr and "while[" not in jaxpr


def test_every_table_row_names_a_method_the_cell_kind_can_run():
    for backend, table in tuning.AUTO_TABLE.items():
        assert set(table) == {*tuning.CELL_KINDS, "chunk_size"}, backend
        for kind in tuning.CELL_KINDS:
            rows = table[kind]
            assert rows[0][0] == 0 and list(rows) == sorted(rows), (backend, kind)
            allowed = {"nonlinear": ("sequential", "newton"), "exact_jacobian": ("sequential", "newton"),
                       "clipped_linear": ("sequential", "associative", "chunked", "newton")}.get(
                kind, ("sequential", "associative", "chunked"))
            assert all(method in allowed for _, method in rows), (backend, kind)
        assert table["chunk_size"] == "sqrt" or int(table["chunk_size"]) >= 1
    assert parallel.default_chunk_size(1, backend="cpu") >= 1


# ---- rj.RNN and Bidirectional pass the method through ----


def test_rnn_and_bidirectional_pass_the_method_to_scan():
    layer = rj.RNN(rj.MinGRU(5), method=rj.Chunked(2))
    params = layer.init(jax.random.key(0), INPUT_SIZE)
    xs = normal(1, (3, STEPS, INPUT_SIZE))
    assert_trees_close(layer.apply(params, xs, lengths=LENGTHS),
                       rj.scan(layer.cell, params, xs, lengths=LENGTHS, method=rj.Chunked(2)), atol=0, rtol=1e-5, check_dtypes=True)
    bidir = rj.Bidirectional(layer)
    assert bidir.backward.method == rj.Chunked(2) and bidir.backward.reverse
    assert rj.RNN(rj.MinGRU(5), method="chunked").method == rj.Chunked()
    with pytest.raises(ValueError, match=r"rj.Associative\(\) needs a cell with a linear recurrence"):
        rj.RNN(rj.GRU(5), method="associative")


# ---- bad input: clear errors at trace time, the same for every method ----

GRU = rj.GRU(4)
MINGRU = rj.MinGRU(4)


@functools.cache
def params_of(cell):
    """``cell``'s params for INPUT_SIZE inputs (built on first use, not when the module is collected)."""
    return cell.init(jax.random.key(0), INPUT_SIZE)
XS = jnp.ones((2, 5, INPUT_SIZE))


@pytest.mark.parametrize(
    "cell, kwargs, message",
    [
        (MINGRU, dict(method="fast"), re.escape(
            "unknown method 'fast'; expected a method value such as rj.Sequential() or one of "
            "['associative', 'auto', 'chunked', 'kernel', 'newton', 'sequential']")),
        (GRU, dict(method="associative"), re.escape(
            "rj.Associative() needs a cell with a linear recurrence (an rj.LinearCell such as MinGRU, "
            "MinLSTM, LRU, or one linear up to a clip such as rj.IndRNN with 'relu'); GRU is not one. "
            "Methods that can run it: rj.Sequential(), rj.Newton(), rj.Auto()")),
        (GRU, dict(method="chunked"), r"rj.Chunked\(\) needs a cell with a linear recurrence"),
        (MINGRU, dict(method=rj.Chunked), "unknown method <class"),
    ],
    ids=lambda v: None if isinstance(v, dict) else "",
)
def test_bad_options_raise_a_clear_error(cell, kwargs, message):
    params = params_of(cell)
    with pytest.raises(ValueError, match=message):
        rj.scan(cell, params, XS, **kwargs)
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda x: rj.scan(cell, params, x, **kwargs))(XS)


@pytest.mark.parametrize("method", ["associative", "chunked", "newton", "auto"])
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(xs=jnp.ones((2, 5, 4))), ValueError, r"xs has shape \(2, 5, 4\); expected \(\.\.\., T, 3\)"),
        (dict(xs=jnp.ones((2, 5, 3), jnp.int32)), TypeError, "xs has dtype int32; expected a floating"),
        (dict(lengths=jnp.array([5, 6])), ValueError, r"lengths has the value 6; expected every length in \[0, T=5\]"),
        (dict(resets=jnp.zeros((2, 4), bool)), ValueError, r"resets has shape \(2, 4\); expected \(2, 5\)"),
        (dict(carry=jnp.zeros((3, 4))), ValueError, r"carry has a leaf of shape \(3, 4\); expected \(2, 4\)"),
        (dict(params=rj.MinLSTM(4).init(jax.random.key(0), 3)), TypeError, "params is a MinLSTMParams; expected MinGRUParams"),
    ],
    ids=lambda v: None if isinstance(v, dict) else "",
)
def test_bad_input_gives_the_sequential_drivers_error(method, kwargs, error, message):
    args = dict(params=params_of(MINGRU), xs=XS, carry=None)
    args.update(kwargs)
    params, xs, carry = args.pop("params"), args.pop("xs"), args.pop("carry")
    for m in ("sequential", method):
        with pytest.raises(error, match=message):
            rj.scan(MINGRU, params, xs, carry, method=m, **args)
    with pytest.raises(error, match=message):
        parallel.linear_scan(MINGRU, params, xs, carry, **args)
