"""ParaGRU and ParaLSTM (rnnjax/cells/para.py): one step against a NumPy float64 transcription of
ParaRNN's equations, initialisation, bad input, and the Jacobian structure they claim.

rj.scan over lengths and reverse against a plain loop of ``cell.step``, vmap, gradients and
recompilation run for both cells through tests/cases.py (tests/test_cells.py); resets, through
the Newton tests (tests/test_newton.py) against the sequential driver.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.carry import CarryLayout
from rnnjax.cells import ParaGRUParams, ParaLSTMParams, ParaLSTMState
from tests.compat import enable_x64

D, H = 3, 4
F32 = dict(atol=2e-6, rtol=2e-6)  # float32 rounding of a few O(1) operations


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def f64(a):
    return np.asarray(a, np.float64)


def random_params(cell, seed, dtype=np.float32):
    """Params drawn by NumPy, every row different and ``a``, ``p`` of order 1 (so that the
    recurrence matters), in ``dtype``."""
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.normal(size=shape).astype(dtype)  # noqa: E731
    b = draw(3 * H) if cell.use_bias else None
    if isinstance(cell, rj.ParaGRU):
        return ParaGRUParams(w_x=draw(D, 3 * H), a=draw(3, H), b=b)
    return ParaLSTMParams(w_x=draw(D, 3 * H), a=draw(3, H), p=draw(2, H), b=b)


def numpy_paragru(params, h, x):
    """ParaRNN's GRUDiagMH step (z weights the candidate), in float64."""
    w, a = f64(params.w_x), f64(params.a)
    pre = f64(x) @ w + (0.0 if params.b is None else f64(params.b))
    h = f64(h)
    z = sigmoid(a[0] * h + pre[..., :H])
    r = sigmoid(a[1] * h + pre[..., H : 2 * H])
    n = np.tanh(a[2] * (h * r) + pre[..., 2 * H :])
    return z * n + (1 - z) * h


def numpy_paralstm(params, state, x):
    """ParaRNN's LSTMCIFGDiagMH step, in float64: ``(h, c)``."""
    w, a, p = f64(params.w_x), f64(params.a), f64(params.p)
    pre = f64(x) @ w + (0.0 if params.b is None else f64(params.b))
    h, c_prev = f64(state.h), f64(state.c)
    f = sigmoid(a[0] * h + pre[..., :H] + p[0] * c_prev)
    c = f * c_prev + (1 - f) * np.tanh(a[2] * h + pre[..., 2 * H :])
    o = sigmoid(a[1] * h + pre[..., H : 2 * H] + p[1] * c)
    return o * np.tanh(c), c


@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batch2"])
@pytest.mark.parametrize("cell", [rj.ParaGRU(H), rj.ParaLSTM(H), rj.ParaLSTM(H, use_bias=False)], ids=str)
def test_step_matches_numpy_reference(cell, batch):
    params = random_params(cell, seed=len(batch))
    rng = np.random.default_rng(10 + len(batch))
    x = rng.normal(size=(*batch, D)).astype(np.float32)
    carry = jax.tree.map(lambda c: rng.normal(size=c.shape).astype(np.float32), cell.init_carry(batch))
    new, y = cell.step(params, carry, jnp.asarray(x))
    if isinstance(cell, rj.ParaGRU):
        expected = numpy_paragru(params, carry, x)
        np.testing.assert_allclose(np.asarray(new), expected, **F32)
    else:
        h, c = numpy_paralstm(params, carry, x)
        assert isinstance(new, ParaLSTMState)
        np.testing.assert_allclose(np.asarray(new.h), h, **F32)
        np.testing.assert_allclose(np.asarray(new.c), c, **F32)
        expected = h
    assert y.shape == (*batch, H)
    np.testing.assert_allclose(np.asarray(y), expected, **F32)


def test_paragru_update_gate_weights_the_candidate():
    """ParaRNN's convention, opposite to rj.GRU's: z -> 1 takes the candidate, z -> 0 keeps h."""
    cell = rj.ParaGRU(1)
    h, x = jnp.array([0.5]), jnp.zeros(1)
    for b_z, expected in ((30.0, np.tanh(0.0)), (-30.0, 0.5)):  # candidate tanh(0 + 0) = 0
        params = ParaGRUParams(w_x=jnp.zeros((1, 3)), a=jnp.zeros((3, 1)), b=jnp.array([b_z, 0.0, 0.0]))
        np.testing.assert_allclose(np.asarray(cell.step(params, h, x)[0]), [expected], atol=1e-6)


@pytest.mark.parametrize("cls", [rj.ParaGRU, rj.ParaLSTM])
def test_init_follows_pararnn_defaults(cls):
    hidden, inputs = 1024, 16
    params = cls(hidden).init(jax.random.key(0), inputs)
    assert params.w_x.shape == (inputs, 3 * hidden) and params.a.shape == (3, hidden)
    assert params.b.shape == (3 * hidden,) and params.w_x.dtype == jnp.float32
    # The first gate's bias (z, f) spreads over [-1, 0]; the others are zero.
    b = np.asarray(params.b).reshape(3, hidden)
    np.testing.assert_allclose(b[0], -np.linspace(0, 1, hidden), atol=1e-7)
    assert not np.any(b[1:])
    # w_x: Glorot-uniform per gate, bound sqrt(6 / (inputs + hidden)); its draws come close to it.
    bound = np.sqrt(6 / (inputs + hidden))
    w = np.abs(np.asarray(params.w_x))
    assert 0.99 * bound < w.max() <= bound * (1 + 1e-6)
    # a (and ParaLSTM's peepholes): normal with std 2 / sqrt(5 hidden) = 0.028. Over 3072 draws
    # the sample std is within 6 % of it (4.7 standard errors; 1 / sqrt(hidden) would be 12 % off)
    # and the mean within 5 standard errors of 0.
    std = 2 / np.sqrt(5 * hidden)
    diagonal = [np.asarray(params.a)] + ([np.asarray(params.p)] if cls is rj.ParaLSTM else [])
    for values in diagonal:
        assert abs(values.std() / std - 1) < 0.06, values.std()
        assert abs(values.mean()) < 5 * std / np.sqrt(values.size)
    if cls is rj.ParaLSTM:
        assert params.p.shape == (2, hidden) and not np.allclose(params.p, params.a[:2])


def test_init_options():
    constant = jax.nn.initializers.constant
    cell = rj.ParaLSTM(H, use_bias=False, recurrent_init=constant(0.25), peephole_init=constant(-0.5))
    params = cell.init(jax.random.key(0), D, jnp.bfloat16)
    assert params.b is None and params.w_x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params.a, np.float32), 0.25)
    np.testing.assert_array_equal(np.asarray(params.p, np.float32), -0.5)
    gru = rj.ParaGRU(H, bias_init=jax.nn.initializers.zeros, kernel_init=constant(1.0))
    params = gru.init(jax.random.key(0), D)
    assert not np.any(np.asarray(params.b)) and np.all(np.asarray(params.w_x) == 1.0)
    assert gru.output_size(D) == H and gru.input_size(params) == D


@pytest.mark.parametrize("cls", [rj.ParaGRU, rj.ParaLSTM])
def test_bad_input_and_params_raise(cls):
    cell = cls(H)
    params = random_params(cell, seed=0)
    carry = cell.init_carry((2,))
    name = cls.__name__
    expected = rf"x has shape \(2, 5\); expected \(\.\.\., {D}\) for input_size={D} of {name}"
    with pytest.raises(ValueError, match=expected):
        cell.step(params, carry, jnp.ones((2, 5)))
    with pytest.raises(TypeError, match="floating"):
        cell.step(params, carry, jnp.ones((2, D), jnp.int32))
    other = random_params(rj.ParaLSTM(H) if cls is rj.ParaGRU else rj.ParaGRU(H), seed=0)
    with pytest.raises(TypeError, match=rf"params is a {type(other).__name__}; expected {name}Params"):
        cell.step(other, carry, jnp.ones((2, D)))
    with pytest.raises(ValueError, match=r"params.a has shape \(2, 4\); expected \(3, 4\)"):
        cell.step(params._replace(a=params.a[:2]), carry, jnp.ones((2, D)))
    with pytest.raises(ValueError, match="hidden_size.*0"):
        cls(0)
    with pytest.raises(ValueError, match="gate_activation 'nope'"):
        cls(H, gate_activation="nope")


def assert_blocks_are_the_jacobian(cell, params, carry, x):
    """``cell.step_with_jacobian``'s blocks against ``jax.jacfwd`` of ``cell.step`` on the flat
    carry of one sequence (float64): equal to rounding inside the unit blocks, and every entry
    of the Jacobian outside them exactly zero. ``carry`` and ``x`` have one batch axis."""
    (new, y), blocks = cell.step_with_jacobian(params, carry, x)
    expected_new, expected_y = cell.step(params, carry, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected_y))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), new, expected_new)
    units = cell.hidden_size
    leaves = len(jax.tree.leaves(carry))
    assert blocks.shape == (x.shape[0], units, leaves, leaves) and blocks.dtype == jnp.float64
    layout = CarryLayout(jax.tree.map(lambda c: c[0], carry))
    # CarryLayout puts leaf l's unit u at l * units + u: the blocks' (u, l, m) entry is the
    # Jacobian's (l * units + u, m * units + u).
    rows = (np.arange(leaves)[None, :, None] * units + np.arange(units)[:, None, None]).repeat(leaves, 2)
    cols = rows.transpose(0, 2, 1)
    for b in range(x.shape[0]):
        flat_step = lambda v, b=b: layout.flatten(cell.step(params, layout.unflatten(v), x[b])[0])  # noqa: E731
        full = np.asarray(jax.jacfwd(flat_step)(layout.flatten(jax.tree.map(lambda c, b=b: c[b], carry))))
        outside = full.copy()
        outside[rows, cols] = 0.0
        assert not np.any(outside), "the step mixes units: its Jacobian is not unit-block-diagonal"
        # Both are forward-mode derivatives of the same float64 operations, summed in other orders.
        np.testing.assert_allclose(np.asarray(blocks[b]), full[rows, cols], rtol=0, atol=64 * np.finfo(np.float64).eps)
        assert np.abs(full[rows, cols]).max() > 0.1  # the blocks being compared are not all zero


@pytest.mark.parametrize("cell", [rj.ParaGRU(H), rj.ParaLSTM(H)], ids=str)
def test_blocks_are_the_exact_jacobian(cell):
    assert isinstance(cell, rj.StructuredJacobian) and cell.jacobian_kind == "exact"
    rng = np.random.default_rng(3)
    params = random_params(cell, seed=3, dtype=np.float64)
    with enable_x64(True):
        params = jax.tree.map(jnp.asarray, params)
        carry = jax.tree.map(lambda c: jnp.asarray(rng.normal(size=c.shape)), cell.init_carry((2,)))
        assert_blocks_are_the_jacobian(cell, params, carry, jnp.asarray(rng.normal(size=(2, D))))
