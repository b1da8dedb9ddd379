"""Structured Jacobians (rnnjax/engines/jacobians.py, rnnjax.cell.StructuredJacobian) and
Newton as used in training: a fixed iteration count, the one-step initial guess, a caller's guess."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.carry import CarryLayout
from rnnjax.engines.affine import solve_affine
from rnnjax.engines.jacobians import BLOCK, structure_for

from .cases import normal
from .helpers import assert_trees_close

T, B, D, H = 48, 2, 3, 4
XS = normal(0, (B, T, D))
LENGTHS = jnp.array([T, 30])
RESETS = jnp.zeros((B, T), bool).at[0, 20].set(True).at[1, 7].set(True)


def layout_of(cell, dtype=jnp.float32):
    return CarryLayout(cell.init_carry((), dtype))


@pytest.mark.parametrize(
    "cell",
    [
        pytest.param(rj.Elman(H), id="elman", marks=pytest.mark.slow),
        pytest.param(rj.GRU(H), id="gru"),  # its own analytic diagonal
        pytest.param(rj.GRU(H, use_bias=False, activation="relu"), id="gru_nobias_relu", marks=pytest.mark.slow),
        pytest.param(rj.LSTM(H, peephole=True), id="lstm_peephole"),
    ],
)
def test_dense_cells_give_the_unit_diagonal_blocks_of_their_jacobian(cell):
    with jax.enable_x64(True):
        params = cell.init(jax.random.key(1), D, jnp.float64)
        params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(normal(2, p.shape, np.float64)), params)
        carry = jax.tree.map(lambda c: jnp.asarray(normal(3, c.shape, np.float64)), cell.init_carry((2,), jnp.float64))
        x = jnp.asarray(normal(4, (2, D), np.float64))
        (new, y), blocks = cell.step_with_jacobian(params, carry, x)
        assert_trees_close((new, y), cell.step(params, carry, x), atol=0, rtol=0)
        layout = layout_of(cell, jnp.float64)
        full = jax.vmap(
            lambda c, x: jax.jacfwd(lambda s: layout.flatten(cell.step(params, layout.unflatten(s), x)[0]))(
                layout.flatten(c)
            )
        )(carry, x)
        leaves = blocks.shape[-1]
        full = full.reshape(2, leaves, H, leaves, H)
        expected = jnp.stack([full[:, :, u, :, u] for u in range(H)], axis=1)  # (2, U, L, L)
        np.testing.assert_allclose(np.asarray(blocks), np.asarray(expected), rtol=1e-12, atol=1e-14)
        assert float(jnp.max(jnp.abs(full))) > float(jnp.max(jnp.abs(expected))) / 100  # units do mix


def test_cells_without_unit_structure_say_so():
    assert rj.LSTM(H, proj_size=2).jacobian_kind is None
    assert rj.GRU(H, reset_after=False).jacobian_kind is None
    assert rj.GRU(H).jacobian_kind == "unit-diagonal"
    assert rj.ParaLSTM(H).jacobian_kind == "exact"
    with pytest.raises(ValueError, match="no unit structure"):
        cell = rj.LSTM(H, proj_size=2)
        cell.step_with_jacobian(cell.init(jax.random.key(0), D), cell.init_carry(()), jnp.ones(D))


@pytest.mark.parametrize(
    "cell, variant, expected",
    [
        (rj.ParaGRU(H), "deer", ("diag", True, True)),
        (rj.IndRNN(H), "quasi-deer", ("diag", True, True)),
        (rj.ParaLSTM(H), "deer", ("block", True, True)),
        (rj.ParaLSTM(H), "quasi-deer", ("diag", True, False)),
        (rj.ParaLSTM(H), "elk", ("full", False, True)),
        (rj.GRU(H), "quasi-deer", ("diag", True, False)),
        (rj.LSTM(H), "quasi-elk", ("diag", True, False)),
        (rj.GRU(H), "deer", ("full", False, True)),
        (rj.MGU(H), "quasi-deer", ("diag", False, False)),
        (rj.LSTM(H, proj_size=2), "quasi-deer", ("diag", False, False)),
    ],
)
def test_each_cell_and_variant_gets_the_cheapest_exact_or_approximate_jacobian(cell, variant, expected):
    assert structure_for(cell, layout_of(cell), variant)[:3] == expected


def test_block_recurrence_by_an_associative_scan_equals_the_loop():
    steps, units, size = 9, 3, 2
    a = 0.7 * normal(5, (steps, units, size, size))
    b = normal(6, (steps, size, units))
    h0 = normal(7, (size, units))
    expected, h = [], h0
    for t in range(steps):
        h = jnp.einsum("uij,ju->iu", a[t], h) + b[t]
        expected.append(h)
    np.testing.assert_allclose(solve_affine(BLOCK, (a, b), h0), jnp.stack(expected), rtol=1e-5, atol=1e-5)


FIXED = rj.Newton("deer", tol=None, max_iters=4, init="step")


def loss(cell, params, method, reverse):
    ys, final = rj.scan(cell, params, XS, lengths=LENGTHS, resets=RESETS, reverse=reverse, method=method)
    return jnp.sum(ys**2) + sum(jnp.sum(f**2) for f in jax.tree.leaves(final))


@pytest.mark.parametrize(
    "cell, reverse",
    [
        pytest.param(rj.ParaLSTM(H), True, id="paralstm-reverse"),
        pytest.param(rj.ParaGRU(H), False, id="paragru", marks=pytest.mark.slow),
        pytest.param(rj.ParaLSTM(H), False, id="paralstm", marks=pytest.mark.slow),
        pytest.param(rj.ParaGRU(H), True, id="paragru-reverse", marks=pytest.mark.slow),
    ],
)
def test_four_exact_newton_steps_from_the_one_step_guess_give_the_sequential_values_and_gradients(cell, reverse):
    params = cell.init(jax.random.key(0), D)
    run = lambda p, method: jax.value_and_grad(lambda p: loss(cell, p, method, reverse))(p)
    # Quadratic convergence: float32 rounding is reached in 3 steps at T = 4096
    # (benchmarks/lab/newton_training.py --check); 1e-5 is about 100 ulps of the bounded states.
    assert_trees_close(run(params, FIXED), run(params, rj.Sequential()), atol=1e-5, rtol=1e-5)


def test_a_fixed_iteration_count_compiles_to_no_data_dependent_loop_or_branch():
    cell = rj.ParaGRU(H)
    params = cell.init(jax.random.key(0), D)
    grad = jax.grad(lambda p: loss(cell, p, FIXED, False))
    program = str(jax.make_jaxpr(grad)(params))
    assert "while[" not in program and "cond[" not in program
    converging = str(jax.make_jaxpr(jax.grad(lambda p: loss(cell, p, rj.Newton("deer"), False)))(params))
    assert "while[" in converging  # the check above can fail
    _, _, info = rj.parallel.newton_scan(cell, params, XS, newton="deer", tol=None, max_iters=2)
    assert int(info.iterations) == 2


@pytest.mark.parametrize("reverse", [pytest.param(False, marks=pytest.mark.slow), True])
def test_the_step_guess_is_one_cell_step_from_zero_states_and_a_solution_guess_needs_no_step(reverse):
    cell = rj.ParaLSTM(H)
    params = cell.init(jax.random.key(0), D)
    kw = dict(lengths=LENGTHS, resets=RESETS, reverse=reverse, newton="deer")
    one_step = jax.vmap(jax.vmap(lambda x: cell.step(params, cell.init_carry(()), x)[0]))(XS)
    one_step = jax.tree.map(
        lambda s: jnp.where(jnp.arange(T)[None, :, None] < LENGTHS[:, None, None], s, 0.0), one_step
    )
    by_init = rj.parallel.newton_scan(cell, params, XS, tol=None, max_iters=1, init="step", **kw)
    by_guess = rj.parallel.newton_scan(cell, params, XS, tol=None, max_iters=1, guess=one_step, **kw)
    # Two programs compute the one-step states (in the engine; above): equal up to rounding.
    assert_trees_close(by_init, by_guess, atol=1e-6, rtol=1e-6)
    ys, final, info = rj.parallel.newton_scan(cell, params, XS, **kw)
    again = rj.parallel.newton_scan(cell, params, XS, guess=info.states, **kw)
    assert int(again[2].iterations) <= 1 < int(info.iterations)
    assert_trees_close(again[:2], (ys, final), atol=1e-6, rtol=1e-6)
    last = jax.tree.map(lambda s: s[jnp.arange(B), jnp.where(reverse, 0, LENGTHS - 1)], info.states)
    # Aligned with the inputs (another compiled path to the same numbers: rounding apart).
    assert_trees_close(last, final, atol=1e-6, rtol=1e-6)


def test_bad_guesses_and_options_are_refused():
    cell = rj.ParaLSTM(H)
    params = cell.init(jax.random.key(0), D)
    guess = cell.init_carry((B,))  # no time axis
    with pytest.raises(ValueError, match=rf"expected \({B}, {T}, {H}\)"):
        rj.parallel.newton_scan(cell, params, XS, guess=guess)
    with pytest.raises(ValueError, match="expected the carry's"):
        rj.parallel.newton_scan(cell, params, XS, guess=jnp.zeros((B, T, H)))
    with pytest.raises(ValueError, match='tol must be a positive number, "auto" or None'):
        rj.Newton(tol="fast")
    with pytest.raises(ValueError, match="init must be one of"):
        rj.Newton(init="ones")
