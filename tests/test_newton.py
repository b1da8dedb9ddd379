"""Newton's methods (rj.parallel.newton_scan, rj.scan(method=rj.Newton(...))): DEER, quasi-DEER,
ELK and quasi-ELK against the sequential driver, convergence and fallback, gradients by
the implicit function theorem, bad options.

float32 tolerance: 1e-5 absolute (the default tol) for converged solves of the small,
contractive cells in tests/cases.py; the fallback is the sequential driver to rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax as rj
from rnnjax import parallel
from rnnjax.cells.matrix_state import MatrixStateCell
from rnnjax.engines.elk import elk_step, solve_small
from tests.cases import CELL_CASES, INPUT_SIZE, normal, random_case, seq_shape
from tests.compat import enable_x64
from tests.helpers import assert_trees_close

STEPS = 6
LENGTHS = jnp.array([6, 4, 0])
RESETS = jnp.zeros((3, STEPS), bool).at[0, 2].set(True).at[1, 1].set(True).at[1, 3].set(True).at[2, 4].set(True)
F32 = dict(atol=1e-5, rtol=1e-5, check_dtypes=True)  # float32 rounding; the same dtypes and shapes


def data(cell, key=0, dtype=jnp.float32, batch=(3,), steps=STEPS):
    return random_case(cell, steps, key, dtype, batch)


# DEER and quasi-DEER over every cell but ConvLSTM (whose flattened state is a whole
# frame; it runs with quasi-DEER), backwards so that lengths, resets and reverse all act;
# forwards runs are in the tests further down. Both variants differentiate the same step
# (jax.jacfwd) and differ in the solver only: the fast set runs each cell with one of them,
# DEER and quasi-DEER by turns, and make test-all runs the other too (each compiles a
# Newton solver, about 3 s). Matrix-state cells are linear in their state: rj.Newton() refuses them.
NAMES = [name for name in sorted(CELL_CASES)
         if name != "convlstm" and not isinstance(CELL_CASES[name], MatrixStateCell)]
# The RG-LRU is linear (Associative is its method) and the sLSTM has its own Newton checks
# (tests/cells/): both run here in make test-all only.
CASES = [(name, variant, True, (i + j) % 2 == 1 or name in ("rglru", "slstm"))  # (name, variant, reverse, slow)
         for i, name in enumerate(NAMES) for j, variant in enumerate(("deer", "quasi-deer"))]
CASES += [("gru", "elk", True, False), ("lstm_proj_peephole", "quasi-elk", False, False),
          ("convlstm", "quasi-deer", True, False)]


@pytest.mark.parametrize("name, variant, reverse", [
    pytest.param(n, v, r, marks=[pytest.mark.slow] if slow else [], id=f"{n}-{v}-{'reverse' if r else 'forward'}")
    for n, v, r, slow in CASES])
def test_newton_matches_sequential(name, variant, reverse):
    cell = CELL_CASES[name]
    params, xs, carry = data(cell)
    kw = dict(lengths=LENGTHS, resets=RESETS, reverse=reverse)
    ys, final, info = rj.parallel.newton_scan(cell, params, xs, carry, newton=variant, **kw)
    assert bool(info.converged) and 0 <= int(info.iterations) <= parallel.DEFAULT_MAX_ITERS
    assert float(info.residual) <= 1e-5
    assert_trees_close((ys, final), rj.scan(cell, params, xs, carry, **kw), **F32)
    assert not np.any(np.asarray(ys[1, 4:])) and not np.any(np.asarray(ys[2]))


def trained_like_gru(hidden=16, steps=256, key=0):
    """A GRU as training leaves them: contractive recurrent weights and an update gate that
    keeps most of the state (z ~ 0.7)."""
    cell = rj.GRU(hidden)
    params = cell.init(jax.random.key(key), INPUT_SIZE)
    b_x = params.b_x.at[hidden : 2 * hidden].set(1.0)
    params = params._replace(w_h=0.6 * params.w_h, b_x=b_x)
    xs = normal(key + 1, (2, steps, INPUT_SIZE))
    return cell, params, xs


@pytest.mark.parametrize("variant, max_steps", [("deer", 8), ("quasi-deer", 30)])
def test_newton_converges_on_a_trained_like_gru(variant, max_steps):
    cell, params, xs = trained_like_gru()
    ys, h, info = rj.parallel.newton_scan(cell, params, xs, newton=variant)
    assert bool(info.converged) and int(info.iterations) <= max_steps, info
    assert_trees_close((ys, h), rj.scan(cell, params, xs), **F32)


def chaotic_elman(steps=64):
    cell = rj.Elman(16)
    params = cell.init(jax.random.key(0), INPUT_SIZE)
    params = params._replace(w_h=3.0 * params.w_h)  # orthogonal * 3: expanding, chaotic under tanh
    return cell, params, normal(1, (2, steps, INPUT_SIZE))


def test_newton_falls_back_to_sequential_when_it_does_not_converge():
    cell, params, xs = chaotic_elman()
    expected = rj.scan(cell, params, xs)
    ys, h, info = rj.parallel.newton_scan(cell, params, xs, newton="deer", max_iters=1)
    assert not bool(info.converged) and int(info.iterations) == 1 and float(info.residual) > 1e-5
    assert_trees_close((ys, h), expected, atol=1e-6, rtol=1e-5, check_dtypes=True)
    # Whatever happens with the default budget, the answer is never a wrong iterate.
    ys, h, info = rj.parallel.newton_scan(cell, params, xs, newton="quasi-deer", max_iters=5)
    assert not bool(info.converged)
    assert_trees_close((ys, h), expected, atol=1e-6, rtol=1e-5, check_dtypes=True)
    # rj.scan gives the same values, without the info.
    assert_trees_close(rj.scan(cell, params, xs, method=rj.Newton("deer", max_iters=1)), expected, atol=1e-6, rtol=1e-5, check_dtypes=True)


@pytest.mark.parametrize("steps", [5, 1])  # T = 1: the smoother has no step to go back over
def test_elk_step_is_the_damped_least_squares_solution(steps):
    n, damping = 3, 0.7
    rng = np.random.default_rng(0)
    J = rng.normal(size=(steps, 1, n, n))
    u, guess = rng.normal(size=(steps, 1, n)), rng.normal(size=(steps, 1, n))
    h0 = rng.normal(size=(1, n))
    for full in (True, False):
        Jm = J[:, 0] if full else J[:, 0] * np.eye(n)
        # Least squares over s_1..s_T: rows s_t - J_t s_{t-1} = u_t (s_0 = h0 moved to the
        # right-hand side) and sqrt(damping) s_t = sqrt(damping) guess_t.
        A = np.zeros((2 * steps * n, steps * n))
        rhs = np.concatenate([u[:, 0].ravel(), np.sqrt(damping) * guess[:, 0].ravel()])
        rhs[:n] += Jm[0] @ h0[0]
        for t in range(steps):
            A[t * n : (t + 1) * n, t * n : (t + 1) * n] = np.eye(n)
            if t:
                A[t * n : (t + 1) * n, (t - 1) * n : t * n] = -Jm[t]
            A[(steps + t) * n : (steps + t + 1) * n, t * n : (t + 1) * n] = np.sqrt(damping) * np.eye(n)
        best = np.linalg.lstsq(A, rhs, rcond=None)[0].reshape(steps, n)
        # The solver folds s_0 into the first step: F_1 = J_1 s_0 + u_1.
        F = np.zeros_like(u)
        F[0, 0] = Jm[0] @ h0[0] + u[0, 0]
        Jx = J if full else np.diagonal(J, axis1=-2, axis2=-1)
        with enable_x64(True):
            got = jax.jit(elk_step, static_argnums=(4, 5))(Jx, u, F, guess, damping, full)
        np.testing.assert_allclose(np.asarray(got[:, 0]), best, atol=1e-10)


def test_small_solver_pivots():
    a = jnp.array([[[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])  # needs a row swap
    b = jnp.array([[[2.0], [1.0], [3.0]]])
    np.testing.assert_allclose(solve_small(a, b)[0, :, 0], [1.0, 1.0, 1.0])


# ---- gradients: implicit function theorem at the solution ----


@pytest.mark.parametrize("name, variant", [("gru", "deer")] + [  # the others, about 15 s each: make test-all
    pytest.param(name, variant, marks=pytest.mark.slow) for name, variant in [("lstm", "quasi-deer"), ("lru", "quasi-elk")]])
def test_check_grads_and_equal_to_sequential_gradients(name, variant):
    cell = CELL_CASES[name]
    with enable_x64(True):
        params, xs, carry = data(cell, key=2, dtype=jnp.float64, batch=(2,), steps=4)
        kw = dict(lengths=jnp.array([4, 3]), resets=jnp.zeros((2, 4), bool).at[0, 2].set(True), reverse=True)

        def loss(p, x, c, method=rj.Newton(variant)):
            ys, final = rj.scan(cell, p, x, c, method=method, **kw)
            return jnp.sum(ys**2) + sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in jax.tree.leaves(final))

        # jax.grad through a while_loop would raise: the gradient comes from the custom VJP.
        loss = jax.jit(loss, static_argnames="method")  # one compilation for check_grads' calls
        got = jax.grad(loss, argnums=(0, 1, 2))(params, xs, carry)
        want = jax.grad(lambda *a: loss(*a, method="sequential"), argnums=(0, 1, 2))(params, xs, carry)
        assert_trees_close(got, want, atol=1e-9, rtol=1e-5, check_dtypes=True)
        check_grads(loss, (params, xs, carry), order=1, modes=["rev"])


def test_gradients_after_fallbacks_equal_sequential_gradients():
    # max_iters=1: the forward solve falls back, and so does the quasi-Newton adjoint solve.
    cell, params, xs = chaotic_elman(steps=16)

    def loss(p, **kw):
        ys, h = rj.scan(cell, p, xs, **kw)
        return jnp.sum(ys**2) + jnp.sum(h**2)

    got = jax.grad(lambda p: loss(p, method=rj.Newton("quasi-deer", max_iters=1)))(params)
    assert_trees_close(got, jax.grad(loss)(params), atol=1e-4, rtol=1e-4, check_dtypes=True)


# ---- batching, jit ----


def test_vmap_and_jit_equal_the_batched_call():
    cell = CELL_CASES["gru"]
    params, xs, carry = data(cell, key=3)
    run = lambda x, c, n, r: rj.scan(cell, params, x, c, lengths=n, resets=r, method="newton")
    expected = run(xs, carry, LENGTHS, RESETS)
    assert_trees_close(jax.vmap(run)(xs, carry, LENGTHS, RESETS), expected, atol=1e-5, rtol=1e-5, check_dtypes=True)
    assert_trees_close(jax.jit(run)(xs, carry, LENGTHS, RESETS), expected, atol=1e-6, rtol=1e-5, check_dtypes=True)


# ---- how each iteration's linear recurrence is solved ----


def test_an_empty_batch_through_every_newton_front_door():
    # Batch 0: the sequential method's empty arrays (the residual of no states is 0), and the
    # reports of a solve that had nothing to do.
    cell = rj.GRU(4)
    params, xs, carry = data(cell, batch=(0,))
    want = rj.scan(cell, params, xs, carry)
    ys, final, info = rj.parallel.newton_scan(cell, params, xs, carry)
    assert_trees_close((ys, final), want, atol=0, rtol=0, check_dtypes=True)
    assert bool(info.converged) and int(info.iterations) == 0 and info.states.shape == (0, STEPS, 4)
    mesh = jax.make_mesh((1,), ("seq",))
    got = rj.distributed.sequence_scan(cell, params, xs, carry, mesh=mesh, method=rj.Newton())
    assert_trees_close(got, want, atol=0, rtol=0, check_dtypes=True)


@pytest.mark.parametrize("name, variant", [
    ("gru", "deer"),  # full Jacobians (jax.jacfwd)
    ("gru", "quasi-deer"),  # the dense cell's unit diagonal, and the iterated adjoint
    pytest.param("paralstm", "deer", marks=pytest.mark.slow),  # exact 2x2 blocks
])
def test_sequential_and_associative_linear_solves_give_the_same_values_and_gradients(name, variant):
    cell = {"gru": rj.GRU(4), "paralstm": rj.ParaLSTM(4)}[name]
    params, xs, carry = data(cell)
    kw = dict(lengths=LENGTHS, resets=RESETS, reverse=True)

    def run(solve):
        method = rj.Newton(variant, tol=None, max_iters=STEPS, solve=solve)
        return jax.value_and_grad(lambda p: jnp.sum(rj.scan(cell, p, xs, carry, method=method, **kw)[0] ** 2))(params)

    sequential, associative = run("sequential"), run("associative")
    assert_trees_close(sequential, associative, atol=1e-5, rtol=1e-5)
    # Both are the sequential engine's numbers (STEPS iterations solve STEPS steps exactly).
    exact = jax.value_and_grad(lambda p: jnp.sum(rj.scan(cell, p, xs, carry, **kw)[0] ** 2))(params)
    assert_trees_close(sequential, exact, atol=1e-5, rtol=1e-5)


def test_auto_solves_sequentially_on_cpu_and_associatively_on_accelerators():
    from rnnjax.tuning import newton_solve

    assert newton_solve("auto", backend="cpu") == "sequential"
    assert newton_solve("auto", backend="gpu") == newton_solve("auto", backend="tpu") == "associative"
    assert newton_solve("associative", backend="cpu") == "associative"
    cell = rj.GRU(4)
    params, xs, _ = data(cell)
    program = lambda solve: str(jax.make_jaxpr(  # noqa: E731
        lambda x: rj.scan(cell, params, x, method=rj.Newton("quasi-deer", tol=None, max_iters=2, solve=solve))[0])(xs))
    assert program("sequential").count("scan[") > program("associative").count("scan[")


# ---- bad options ----


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tol=0.0), "tol must be a positive finite number, got 0.0"),
        (dict(tol=-1e-3), "tol must be a positive finite number, got -0.001"),
        (dict(tol=float("nan")), "tol must be a positive finite number, got nan"),
        (dict(max_iters=0), "max_iters must be a positive int, got 0"),
        (dict(max_iters=2.0), "max_iters must be a positive int, got 2.0"),
        (dict(max_iters=2**31), r"max_iters must be at most 2\*\*31 - 1 = 2147483647, got 2147483648"),
        (dict(newton="newton"), r"unknown Newton variant 'newton'; expected 'auto' or one of \['deer', 'quasi-deer', 'elk', 'quasi-elk'\]"),
        (dict(newton="deer", damping=1.0), "damping applies to the variants 'elk' and 'quasi-elk'; got 'deer'"),
        (dict(newton="elk", damping=0.0), "damping must be a positive finite number, got 0.0"),
        (dict(solve="scan"), r"solve must be one of \['auto', 'associative', 'sequential'\], got 'scan'"),
    ],
    ids=lambda v: None if isinstance(v, dict) else "",
)
def test_bad_newton_options_raise_a_clear_error(kwargs, message):
    cell = rj.GRU(4)
    params = cell.init(jax.random.key(0), INPUT_SIZE)
    xs = jnp.ones((2, 5, INPUT_SIZE))
    options = {"variant" if k == "newton" else k: v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        rj.Newton(**options)
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda x: rj.parallel.newton_scan(cell, params, x, **kwargs))(xs)
