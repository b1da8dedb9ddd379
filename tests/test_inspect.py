"""rnnjax.inspect: fixed points, horizons, integrated gradients and Lyapunov exponents checked
against hand-built systems with known answers and explicit per-step Jacobians."""

import dataclasses
import functools
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rnnjax as rj
from tests.cases import normal, random_case, uniform
from tests.compat import enable_x64
from tests.helpers import assert_trees_close

INSPECT = rj.inspect


# ---- a hand-built linear recurrence: h' = A h + x B + c -----------------------------------------


class AffineParams(NamedTuple):
    a: jax.Array  # (n, n): the recurrence, h' = a @ h + ...
    b: jax.Array  # (input_size, n)
    c: jax.Array  # (n,)


@dataclasses.dataclass(frozen=True)
class Affine(rj.Cell):
    hidden_size: int
    params_type = AffineParams

    def init(self, key, input_size, dtype=jnp.float32):
        ka, kb, kc = jax.random.split(key, 3)
        n = self.hidden_size
        return AffineParams(
            jax.random.normal(ka, (n, n), dtype) / n,
            jax.random.normal(kb, (input_size, n), dtype),
            jax.random.normal(kc, (n,), dtype),
        )

    def init_carry(self, batch_shape=(), dtype=jnp.float32):
        return jnp.zeros((*batch_shape, self.hidden_size), dtype)

    def step(self, params, carry, x):
        h = carry @ params.a.T + x @ params.b + params.c
        return h, h

    def output_size(self, input_size):
        return self.hidden_size

    def input_size(self, params):
        return params.b.shape[0]


def matrix_with_eigenvalues(eigenvalues, key=0):
    """A real matrix V diag V^-1 (complex pairs as 2x2 rotation-scaling blocks), V well conditioned."""
    blocks, i = [], 0
    while i < len(eigenvalues):
        lam = complex(eigenvalues[i])
        if lam.imag:
            blocks.append(np.array([[lam.real, -lam.imag], [lam.imag, lam.real]]))
            i += 2
        else:
            blocks.append(np.array([[lam.real]]))
            i += 1
    n = sum(b.shape[0] for b in blocks)
    d = np.zeros((n, n))
    at = 0
    for b in blocks:
        d[at : at + b.shape[0], at : at + b.shape[0]] = b
        at += b.shape[0]
    v = np.eye(n) + 0.3 * np.random.default_rng(key).standard_normal((n, n))
    return v @ d @ np.linalg.inv(v)


def affine_params(eigenvalues, input_size=2, key=0):
    a = matrix_with_eigenvalues(eigenvalues, key)
    rng = np.random.default_rng(key + 1)
    n = a.shape[0]
    return AffineParams(
        jnp.asarray(a, jnp.float32),
        jnp.asarray(rng.standard_normal((input_size, n)), jnp.float32),
        jnp.asarray(rng.standard_normal(n), jnp.float32),
    )


def sorted_by_modulus(values):
    values = np.asarray(values)
    return values[np.argsort(-np.abs(values), kind="stable")]


# ---- fixed points ---------------------------------------------------------------------------------


@pytest.mark.parametrize("newton_steps", [0, 5])
@pytest.mark.parametrize(
    "eigenvalues, stability",
    [([0.9, 0.5, -0.3], "stable"), ([1.5, 0.5, -0.3], "saddle"), ([1.5, -2.0, 1.2], "unstable")],
)
def test_fixed_point_of_a_linear_recurrence(eigenvalues, stability, newton_steps):
    cell = Affine(3)
    params = affine_params(eigenvalues)
    x = jnp.array([0.3, -0.7])
    starts = normal(0, (16, 3))
    # Adam alone, or Adam and Newton. q's Hessian (I - A)^T (I - A) has a condition number of
    # up to ~450 here, slow for Adam alone.
    steps = 4000 if newton_steps == 0 else 200
    fp = INSPECT.fixed_points(cell, params, x, starts, steps=steps, newton_steps=newton_steps)
    # The unique fixed point solves (I - A) h = x B + c.
    expected = np.linalg.solve(np.eye(3) - np.asarray(params.a, np.float64), np.asarray(x @ params.b + params.c, np.float64))
    assert fp.points.shape == (1, 3) and fp.num_candidates == 16
    assert fp.num_dropped == 0 and fp.num_merged == 15
    np.testing.assert_allclose(fp.points[0], expected, atol=1e-4)
    assert fp.q[0] < 1e-8
    np.testing.assert_allclose(fp.jacobians[0], params.a, atol=1e-6)
    np.testing.assert_allclose(fp.eigenvalues[0], sorted_by_modulus(eigenvalues), atol=1e-5)
    assert fp.stability.tolist() == [stability]


def tanh_fixed_point():
    """The positive root of h = tanh(2 h), by fixed-point iteration (a contraction there)."""
    h = 1.0
    for _ in range(200):
        h = np.tanh(2.0 * h)
    return h


TANH_CELL = rj.Elman(2, use_bias=False)


@functools.cache
def tanh_params():
    """TANH_CELL's params with w_h = 2 I (built on first use, not when the module is collected)."""
    return TANH_CELL.init(jax.random.key(0), 1)._replace(w_h=2.0 * jnp.eye(2))


def test_fixed_points_of_a_tanh_network_with_known_attractors():
    # h' = tanh(2 h) per unit: 0 repels (slope 2) and +-h* attract (slope 2 (1 - h*^2) < 1),
    # so in 2-D: 4 stable corners, 4 saddles on the axes, an unstable origin.
    h_star = tanh_fixed_point()
    slope = 2.0 * (1.0 - h_star**2)
    starts = uniform(1, (200, 2), -1.2, 1.2)
    fp = INSPECT.fixed_points(TANH_CELL, tanh_params(), jnp.zeros(1), starts)
    assert fp.counts() == {"stable": 4, "unstable": 1, "saddle": 4, "marginal": 0}
    assert fp.num_dropped + fp.num_merged + len(fp.points) == 200
    coords = {"stable": {-h_star, h_star}, "unstable": {0.0}, "saddle": {-h_star, 0.0, h_star}}
    found = set()
    for point, eig, kind in zip(fp.points, fp.eigenvalues, fp.stability):
        for value in point:
            assert min(abs(value - c) for c in coords[kind]) < 1e-4
        found.add(tuple(np.round(point, 3)))
        expected = sorted([2.0 if abs(v) < 1e-3 else slope for v in point], reverse=True)
        np.testing.assert_allclose(np.abs(eig), expected, atol=1e-4)
    assert len(found) == 9


def test_fixed_points_accept_carries_and_complex_states():
    # LRU with zero input: h' = lambda h, one stable fixed point at 0; its eigenvalues, in the
    # real state space (real parts, then imaginary parts), are lambda and conj(lambda).
    cell = rj.LRU(3, r_min=0.3, r_max=0.95)
    params = cell.init(jax.random.key(0), 2)
    starts = normal(1, (8, 3)) + 1j * normal(2, (8, 3))
    from_carry = INSPECT.fixed_points(cell, params, jnp.zeros(2), starts.astype(jnp.complex64))
    from_vectors = INSPECT.fixed_points(cell, params, jnp.zeros(2), jnp.concatenate([starts.real, starts.imag], -1))
    lam = np.asarray(cell.eigenvalues(params))
    for fp in (from_carry, from_vectors):
        assert fp.stability.tolist() == ["stable"]
        np.testing.assert_allclose(fp.points[0], np.zeros(6), atol=1e-4)
        np.testing.assert_allclose(np.sort_complex(fp.eigenvalues[0]), np.sort_complex(np.concatenate([lam, lam.conj()])), atol=1e-5)
    # An LSTM's carry (h, c) batched over K is the same as its state vectors [h, c].
    lstm = rj.LSTM(3)
    lstm_params = lstm.init(jax.random.key(3), 2)
    vectors = normal(4, (6, 6)) * 0.5
    carry = lstm.init_carry((6,))._replace(h=vectors[:, :3], c=vectors[:, 3:])
    a = INSPECT.fixed_point_candidates(lstm, lstm_params, jnp.ones(2), carry, steps=50)
    b = INSPECT.fixed_point_candidates(lstm, lstm_params, jnp.ones(2), vectors, steps=50)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_fixed_point_candidates_use_the_given_optimizer_and_drop_slow_points():
    # q decreases with the optimiser; with too few steps nothing converges, and fixed_points
    # reports every candidate as dropped rather than returning unconverged points.
    starts = uniform(1, (20, 2), -1.2, 1.2)
    q0 = jax.vmap(lambda h: 0.5 * jnp.sum((jnp.tanh(2.0 * h) - h) ** 2))(starts)
    _, q = INSPECT.fixed_point_candidates(TANH_CELL, tanh_params(), jnp.zeros(1), starts, optimizer=optax.sgd(0.1), steps=100)
    assert bool(jnp.all(q <= q0))
    fp = INSPECT.fixed_points(TANH_CELL, tanh_params(), jnp.zeros(1), starts, optimizer=optax.sgd(1e-4), steps=2,
                              newton_steps=0)
    assert len(fp.points) == 0 and fp.num_dropped == 20 and fp.eigenvalues.shape == (0, 2)
    # Newton steps alone converge from where the optimiser left off.
    fp = INSPECT.fixed_points(TANH_CELL, tanh_params(), jnp.zeros(1), starts, optimizer=optax.sgd(1e-4), steps=2,
                              newton_steps=20)
    assert fp.num_dropped < 20 and np.all(fp.q < 1e-12)


def test_classify_stability_marginal_tolerance():
    eig = np.array([[0.9995, 0.2], [1.0005, 1.5]])
    assert INSPECT.classify_stability(eig, tol=1e-6).tolist() == ["stable", "unstable"]
    assert INSPECT.classify_stability(eig, tol=1e-3).tolist() == ["marginal", "marginal"]


# ---- the horizon against explicit per-step Jacobians -------------------------------------------------


def explicit_vector(carry):
    """The state vector as the docs define it, written out: leaves in order, complex as re then im."""
    parts = []
    for leaf in jax.tree.leaves(carry):
        leaf = np.asarray(leaf).ravel()
        parts += [leaf.real, leaf.imag] if np.iscomplexobj(leaf) else [leaf]
    return np.concatenate(parts)


@functools.lru_cache(maxsize=None)
def step_and_jacobians(cell):
    """Jitted ``(params, v, x, like) -> (v', d F / d v, d F / d x)`` for one step ``F(v, x) = (v', y)``
    on state vectors (``like``: a carry of the same structure): one compilation per cell, where
    running ``jax.jacfwd`` eagerly compiled each of its operations on its own."""

    def F(params, v, x, like):
        new, y = cell.step(params, INSPECT.carry_from_vector(v, like), x)
        return jnp.asarray(explicit_vector_jax(new)), y

    def step(params, v, x, like):
        jacobian = lambda argnum: jax.jacfwd(F, argnums=argnum)(params, v, x, like)
        return F(params, v, x, like)[0], jacobian(1), jacobian(2)

    return jax.jit(step)


def explicit_horizon(cell, params, xs, carry, length, ord):
    """Products of per-step Jacobians in float64, one step at a time."""
    v = jnp.asarray(explicit_vector(carry))
    J, K, Gy, Gx = [], [], [], []
    for t in range(length):
        # by_state: (d h_t / d h_{t-1}, d y_t / d h_{t-1}); by_input: (d h_t / d x_t, d y_t / d x_t)
        next_v, by_state, by_input = step_and_jacobians(cell)(params, v, xs[t], carry)
        J.append(np.asarray(by_state[0], np.float64))
        Gy.append(np.asarray(by_state[1], np.float64))
        K.append(np.asarray(by_input[0], np.float64))
        Gx.append(np.asarray(by_input[1], np.float64))
        v = next_v
    norm = (lambda m: np.linalg.norm(m)) if ord == "fro" else (lambda m: np.linalg.norm(m, 2))
    steps = xs.shape[0]
    state, saliency = np.zeros(steps), np.zeros(steps)
    for t in range(length):
        product = np.eye(len(v))
        for s in range(length - 1, t, -1):
            product = product @ J[s]
        state[t] = norm(product)
        if t == length - 1:
            saliency[t] = norm(Gx[t])
        else:
            back = Gy[length - 1]
            for s in range(length - 2, t, -1):
                back = back @ J[s]
            saliency[t] = norm(back @ K[t])
    return state, saliency


def explicit_vector_jax(carry):
    parts = []
    for leaf in jax.tree.leaves(carry):
        leaf = leaf.ravel()
        parts += [leaf.real, leaf.imag] if jnp.iscomplexobj(leaf) else [leaf]
    return jnp.concatenate(parts)


# The fast set runs each cell with one norm, "fro" and 2 by turns; make test-all both.
@pytest.mark.parametrize("name, cell, ord", [
    pytest.param(name, cell, ord, id=f"{ord}-{name}", marks=[pytest.mark.slow] if (i + j) % 2 else [])
    for i, (name, cell) in enumerate([("gru", rj.GRU(4)), ("lstm", rj.LSTM(3)), ("lru", rj.LRU(3, r_min=0.5))])
    for j, ord in enumerate(["fro", 2])])
def test_horizon_equals_products_of_explicit_jacobians(name, cell, ord):
    params, xs, carry = random_case(cell, 6, batch=(2,))
    lengths = jnp.array([6, 4])
    horizon = INSPECT.jacobian_horizon(cell, params, xs, carry, lengths=lengths, ord=ord)
    assert horizon.state.shape == horizon.saliency.shape == (2, 6)
    for b in range(2):
        one_carry = jax.tree.map(lambda c, b=b: c[b], carry)
        state, saliency = explicit_horizon(cell, params, xs[b], one_carry, int(lengths[b]), ord)
        np.testing.assert_allclose(horizon.state[b], state, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(horizon.saliency[b], saliency, rtol=2e-5, atol=1e-6)
    assert bool(jnp.all(horizon.state[1, 4:] == 0)) and bool(jnp.all(horizon.saliency[1, 4:] == 0))


def test_horizon_batch_axes_vmap_and_jit_agree():
    cell = rj.GRU(4)
    params, xs, _ = random_case(cell, 5, batch=(2, 3))
    lengths = jnp.array([[5, 2, 0], [1, 3, 5]])
    batched = INSPECT.jacobian_horizon(cell, params, xs, lengths=lengths)
    assert batched.state.shape == (2, 3, 5)
    one = lambda x, length: INSPECT.jacobian_horizon(cell, params, x, lengths=length)
    mapped = jax.vmap(jax.vmap(one))(xs, lengths)
    jitted = jax.jit(INSPECT.jacobian_horizon, static_argnums=(0,))(cell, params, xs, lengths=lengths)
    for other in (mapped, jitted):
        np.testing.assert_allclose(other.state, batched.state, rtol=1e-6)
        np.testing.assert_allclose(other.saliency, batched.saliency, rtol=1e-6)
    assert bool(jnp.all(batched.state[0, 2] == 0))  # length 0: nothing depends on anything
    np.testing.assert_allclose(batched.state[1, 0, 0], 2.0, rtol=1e-6)  # length 1: ||I_4||_F


def test_padding_never_reaches_the_inspected_cell():
    # NaN/Inf past a length changes neither the horizon, the trajectory nor the exponents
    # (their derivatives would be 0 * NaN if the padding reached the cell).
    cell = rj.LSTM(3)
    params, xs, _ = random_case(cell, 5, batch=(2,))
    lengths = jnp.array([5, 2])
    dirty = xs.at[1, 2:].set(jnp.nan).at[1, 4].set(jnp.inf)
    clean = xs.at[1, 2:].set(0.0)
    for fn in (lambda x: INSPECT.jacobian_horizon(cell, params, x, lengths=lengths),
               lambda x: INSPECT.state_trajectory(cell, params, x, lengths=lengths),
               lambda x: INSPECT.lyapunov_exponents(cell, params, x, k=2, lengths=lengths)):
        got, want = fn(dirty), fn(clean)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert np.isfinite(np.asarray(a)).all()
            np.testing.assert_array_equal(a, b)


def test_horizon_of_no_steps_is_empty():
    cell = rj.GRU(4)
    params = cell.init(jax.random.key(0), 3)
    horizon = INSPECT.jacobian_horizon(cell, params, jnp.ones((2, 0, 3)))
    assert horizon.state.shape == horizon.saliency.shape == (2, 0)



# Matrix-state cells: the carry is a state matrix per head (and a convolution's window); the
# tools see it as one state vector, and rj.scan runs the cell chunkwise by default.
MATRIX_CELLS = {"mlstm": rj.MLSTM(2, 3, 2), "gla_conv": rj.GLA(heads=2, key_size=2, value_size=3, conv_width=2)}


# The GLA case (a convolution window in the carry) in make test-all: each case compiles a
# horizon and a Jacobian of a scan.
@pytest.mark.slow  # several Jacobians of a chunkwise scan: 5 s
@pytest.mark.parametrize("name", MATRIX_CELLS)
def test_horizon_and_state_vectors_of_matrix_state_cells(name):
    cell = MATRIX_CELLS[name]
    # float32 params widened on the host: a float64 init would compile anew.
    case = jax.tree.map(lambda a: np.asarray(a, np.float64), random_case(cell, 5, batch=(2,)))
    rows, lengths = np.array([0, 1]), np.array([5, 3])
    with enable_x64(True):
        params, xs, carry = jax.tree.map(jnp.asarray, case)
        horizon = INSPECT.jacobian_horizon(cell, params, xs, carry, lengths=jnp.asarray(lengths))
        vectors = INSPECT.state_vector(cell, carry)
        last = lambda x: rj.scan(cell, params, x, carry, lengths=jnp.asarray(lengths))[0][rows, lengths - 1]
        jac = np.asarray(jax.jit(jax.jacrev(last))(xs))[rows, :, rows]  # (2, D_out, T, D)
        restored = INSPECT.carry_from_vector(vectors, jax.tree.map(lambda c: c[0], carry))
        state, saliency = np.asarray(horizon.state), np.asarray(horizon.saliency)
    n = sum(leaf[0].size for leaf in jax.tree.leaves(carry))
    assert vectors.shape == (2, n)
    assert_trees_close(restored, carry, atol=0, rtol=0)
    np.testing.assert_allclose(state[rows, lengths - 1], np.sqrt(n), rtol=1e-12)  # ||I_n||_F
    assert not state[1, 3:].any() and not saliency[1, 3:].any()
    # The saliency from the step's reverse pass is the input Jacobian of the chunkwise scan;
    # float64: the two differ by rounding only.
    np.testing.assert_allclose(saliency, np.linalg.norm(jac, axis=(1, 3)), rtol=1e-9, atol=1e-12)


# ---- integrated gradients ---------------------------------------------------------------------------


def test_integrated_gradients_are_complete():
    cell = rj.GRU(6)
    params, xs, _ = random_case(cell, 12, batch=(3,))
    readout = normal(5, (6,))
    fn = lambda xs: rj.scan(cell, params, xs)[0][..., -1, :] @ readout  # one output per sequence
    baseline = 0.1 * jnp.ones_like(xs)
    errors = {}
    for steps in (16, 256):
        ig = INSPECT.integrated_gradients(fn, xs, baseline, steps=steps)
        assert ig.values.shape == xs.shape and ig.per_step.shape == (3, 12)
        np.testing.assert_allclose(ig.difference, fn(xs) - fn(baseline), rtol=1e-6)
        np.testing.assert_allclose(ig.per_step.sum(-1), ig.values.sum((-2, -1)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ig.error, ig.values.sum((-2, -1)) - ig.difference, atol=1e-6)
        errors[steps] = np.abs(np.asarray(ig.error))
    # Completeness: the attributions sum to f(x) - f(x') up to the quadrature error, which
    # the trapezoid rule shrinks like 1/steps^2.
    difference = np.abs(np.asarray(ig.difference))
    assert np.all(errors[256] <= 1e-3 * difference + 1e-5), (errors[256], difference)
    assert np.all(errors[256] < errors[16])
    # Each sequence's attributions come from its own sequence only.
    single = INSPECT.integrated_gradients(lambda x: fn(x[None])[0], xs[1], baseline[1], steps=256)
    np.testing.assert_allclose(single.values, ig.values[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rule", ["trapezoid", "midpoint", "left", "right"])
def test_integrated_gradients_of_a_linear_function_are_exact(rule):
    w = normal(0, (7, 3))
    xs = normal(1, (7, 3))
    baseline = normal(2, (7, 3))
    ig = INSPECT.integrated_gradients(lambda x: jnp.sum(w * x), xs, baseline, steps=3, rule=rule)
    np.testing.assert_allclose(ig.values, w * (xs - baseline), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ig.per_step, jnp.sum(w * (xs - baseline), -1), rtol=1e-5, atol=1e-6)
    assert abs(float(ig.error)) < 1e-5


# ---- Lyapunov exponents -------------------------------------------------------------------------------


def test_lyapunov_exponents_of_a_linear_recurrence_are_log_eigenvalue_moduli():
    eigenvalues = [1.1, 0.6 + 0.3j, 0.6 - 0.3j, -0.5, 0.2]
    cell = Affine(5)
    params = affine_params(eigenvalues)._replace(c=jnp.zeros(5))
    xs = jnp.zeros((2, 2000, 2))  # zero input: the state stays 0; exponents do not depend on it
    exps = INSPECT.lyapunov_exponents(cell, params, xs, k=5, burn_in=100)
    expected = np.sort(np.log(np.abs(np.asarray(eigenvalues))))[::-1]
    assert exps.shape == (2, 5)
    # A complex pair's frame keeps rotating: each of its two averages converges like 1/T
    # (here ~3e-4), their sum at once.
    np.testing.assert_allclose(exps[0], expected, atol=1e-3)
    np.testing.assert_allclose(exps[0, 1] + exps[0, 2], expected[1] + expected[2], atol=1e-5)
    np.testing.assert_allclose(exps[1], exps[0])
    top2 = INSPECT.lyapunov_exponents(cell, params, xs[0], k=2, burn_in=100, key=jax.random.key(7))
    np.testing.assert_allclose(top2, expected[:2], atol=2e-3)


def test_lyapunov_exponents_of_an_lru_and_with_lengths():
    cell = rj.LRU(3, r_min=0.4, r_max=0.95)
    params = cell.init(jax.random.key(0), 2)
    xs = normal(1, (2, 300, 2))  # the input does not change a linear map's J
    exps = INSPECT.lyapunov_exponents(cell, params, xs, k=6, lengths=jnp.array([300, 150]), burn_in=50)
    expected = np.sort(np.repeat(np.log(np.abs(np.asarray(cell.eigenvalues(params)))), 2))[::-1]
    np.testing.assert_allclose(exps, np.stack([expected, expected]), atol=2e-3)
    short = INSPECT.lyapunov_exponents(cell, params, xs, k=1, lengths=jnp.array([30, 300]), burn_in=50)
    assert np.isnan(short[0, 0]) and np.isfinite(short[1, 0])


# ---- bad input -------------------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors():
    gru = rj.GRU(8)
    params = gru.init(jax.random.key(0), 3)
    xs = jnp.ones((2, 5, 3))
    with pytest.raises(ValueError, match=r"k=9 exceeds the state size 8 of GRU\(hidden_size=8"):
        INSPECT.lyapunov_exponents(gru, params, xs, k=9)
    with pytest.raises(ValueError, match=r"k=17 exceeds the state size 16 of LSTM"):
        lstm = rj.LSTM(8)
        INSPECT.lyapunov_exponents(lstm, lstm.init(jax.random.key(0), 3), xs, k=17)
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        INSPECT.lyapunov_exponents(gru, params, xs, k=0)
    with pytest.raises(ValueError, match=r"burn_in=5 must be an int in \[0, T\) for T=5"):
        INSPECT.lyapunov_exponents(gru, params, xs, k=2, burn_in=5)
    with pytest.raises(ValueError, match=r"initial_states has shape \(4, 7\); expected \(K, 8\) state vectors of GRU"):
        INSPECT.fixed_points(gru, params, jnp.zeros(3), jnp.zeros((4, 7)))
    with pytest.raises(ValueError, match=r"initial_states has shape \(8,\); expected \(K, 8\)"):
        INSPECT.fixed_points(gru, params, jnp.zeros(3), jnp.zeros(8))
    lstm = rj.LSTM(4)
    lstm_params = lstm.init(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=r"initial_states has leaves of shapes \[\(5, 4\), \(5, 3\)\]; expected \(K, 8\)"):
        INSPECT.fixed_points(lstm, lstm_params, jnp.zeros(3), rj.LSTM(4).init_carry((5,))._replace(c=jnp.zeros((5, 3))))
    with pytest.raises(ValueError, match=r"initial_states has structure .*expected \(K, 8\)"):
        INSPECT.fixed_points(lstm, lstm_params, jnp.zeros(3), (jnp.zeros((5, 4)),))
    with pytest.raises(ValueError, match=r"x_const has shape \(2, 3\); expected \(3,\) for input_size=3 of GRU"):
        INSPECT.fixed_points(gru, params, jnp.zeros((2, 3)), jnp.zeros((4, 8)))
    with pytest.raises(ValueError, match=r"xs has shape \(2, 5, 4\); expected \(..., T, 3\)"):
        INSPECT.jacobian_horizon(gru, params, jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match=r"lengths has shape \(3,\); expected \(2,\)"):
        INSPECT.jacobian_horizon(gru, params, xs, lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="ord must be 'fro'"):
        INSPECT.jacobian_horizon(gru, params, xs, ord=1)
    with pytest.raises(ValueError, match=r"baseline has shape \(4, 3\); expected a shape broadcastable to xs's \(2, 5, 3\)"):
        INSPECT.integrated_gradients(jnp.sum, xs, jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"fn returned shape \(2, 5\); expected a scalar or one value per sequence"):
        INSPECT.integrated_gradients(lambda x: x.sum(-1), xs)
    with pytest.raises(ValueError, match="unknown rule 'simpson'"):
        INSPECT.integrated_gradients(jnp.sum, xs, rule="simpson")


# ---- state vectors, trajectories, plots ---------------------------------------------------------------------


def test_state_vectors_and_trajectories():
    cell = rj.LRU(3)
    params, xs, carry = random_case(cell, 7, batch=(2,))
    vectors = INSPECT.state_vector(cell, carry)
    assert vectors.shape == (2, 6) and vectors.dtype == jnp.float32
    np.testing.assert_array_equal(vectors[0], explicit_vector(jax.tree.map(lambda c: c[0], carry)))
    back = INSPECT.carry_from_vector(vectors, cell.init_carry())
    np.testing.assert_array_equal(back, carry)
    lengths = jnp.array([7, 3])
    states = INSPECT.state_trajectory(cell, params, xs, carry, lengths=lengths)
    assert states.shape == (2, 7, 6)
    _, last = rj.scan(cell, params, xs, carry, lengths=lengths)
    np.testing.assert_allclose(states[:, -1], INSPECT.state_vector(cell, last), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(states[1, 3:], jnp.broadcast_to(states[1, 2], (4, 6)))


@pytest.mark.slow  # a fresh interpreter: 5 s
def test_matplotlib_is_imported_only_by_the_plots():
    code = "import sys, rnnjax; assert 'matplotlib' not in sys.modules, 'imported matplotlib'"
    subprocess.run([sys.executable, "-c", code], check=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = INSPECT.state_trajectory(TANH_CELL, tanh_params(), normal(0, (4, 10, 1)),
                                      carry=uniform(1, (4, 2), -1, 1))
    fp = INSPECT.fixed_points(TANH_CELL, tanh_params(), jnp.zeros(1), states.reshape(-1, 2))
    ax = INSPECT.plot_pca_trajectories(states, fp)
    assert len(ax.lines) == 4 and len(ax.collections) == len(set(fp.stability.tolist()))
    ax = INSPECT.plot_horizons({"tanh": INSPECT.jacobian_horizon(TANH_CELL, tanh_params(), jnp.ones((3, 8, 1))).state})
    assert len(ax.lines) == 1 and float(ax.lines[0].get_ydata()[0]) == 1.0
    plt.close("all")
