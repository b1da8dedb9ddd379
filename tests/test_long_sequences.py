"""Every cell over T = 100 000 steps in float32 with its default initialisation and
standard-normal inputs: outputs and final carry are finite, and stay inside the bound
each cell's equations give (tanh cells |h| <= 1; linear cells a convex or geometric
combination of their inputs). The linear cells also run through the parallel drivers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.cells.minimal import g
from tests.cases import normal

T = 100_000
BATCH = 2
HIDDEN = 8
INPUT = 4
SPATIAL = (2, 2)  # ConvLSTM frames

CELLS = {
    "elman": rj.Elman(HIDDEN),
    "lstm": rj.LSTM(HIDDEN),
    "gru": rj.GRU(HIDDEN),
    "mgu": rj.MGU(HIDDEN),
    "indrnn": rj.IndRNN(HIDDEN),
    "mingru": rj.MinGRU(HIDDEN),
    "minlstm": rj.MinLSTM(HIDDEN),
    "lru": rj.LRU(HIDDEN),
    "convlstm": rj.ConvLSTM(2, kernel_size=3),
}
CASES = [(name, "sequential") for name in CELLS] + [
    (name, method) for name in ("mingru", "minlstm", "lru") for method in ("associative", "chunked")
]


@functools.lru_cache(maxsize=None)
def _data(name):
    cell = CELLS[name]
    params = cell.init(jax.random.key(0), INPUT)
    shape = (BATCH, T, *SPATIAL, INPUT) if cell.input_ndim == 3 else (BATCH, T, INPUT)
    return cell, params, normal(0, shape)


def _bound(name, params, xs):
    """Per-unit upper bound on |h_t| over the whole sequence, from the cell's equations, or
    None where the carry has no such bound (an LSTM's cell state)."""
    if name in ("elman", "lstm", "gru", "mgu", "convlstm"):
        return 1.0  # tanh output, or a convex combination of tanh outputs and h_0 = 0
    if name == "indrnn":
        # h_t = relu(a_t + u h_{t-1}) <= relu(a_t) + u h_{t-1} with 0 <= u < 1 (default init).
        u = np.asarray(params.u)
        assert (u >= 0).all() and (u < 1).all()
        a = np.asarray(xs @ params.w_x + params.b)
        return np.maximum(a, 0).max(axis=(0, 1)) / (1 - u)
    if name in ("mingru", "minlstm"):
        # h_t is a convex combination of h_0 = 0 and the candidates g(.) > 0 seen so far.
        pre = np.asarray(xs @ params.w + params.b)
        cand = np.asarray(g(jnp.asarray(pre[..., -HIDDEN:])))
        return cand.max(axis=(0, 1))
    if name == "lru":
        # |h_t| <= sum_k |lambda|^k gamma |x B| <= gamma max_t |x_t B| / (1 - |lambda|).
        lam = np.abs(np.asarray(CELLS["lru"].eigenvalues(params)))
        gamma = np.exp(np.asarray(params.gamma_log))
        xb = np.abs(np.asarray(xs @ params.b_re) + 1j * np.asarray(xs @ params.b_im))
        return gamma * xb.max(axis=(0, 1)) / (1 - lam)
    raise AssertionError(name)


# The fast set runs every cell sequentially and one parallel method (lru-chunked); make test-all
# runs the other parallel cases (about 10 s each).
FAST_PARALLEL = {("lru", "chunked")}


@pytest.mark.parametrize("name,method", [
    case if case[1] == "sequential" or case in FAST_PARALLEL else pytest.param(*case, marks=pytest.mark.slow)
    for case in CASES], ids=[f"{n}-{m}" for n, m in CASES])
def test_forward_over_100k_steps_is_finite_and_bounded(name, method):
    cell, params, xs = _data(name)
    ys, carry = rj.scan(cell, params, xs, method=method)
    ys = np.asarray(ys)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(carry)]
    assert ys.shape[:2] == (BATCH, T)
    assert np.isfinite(ys).all(), f"{name}: non-finite outputs"
    for leaf in leaves:
        assert np.isfinite(leaf).all(), f"{name}: non-finite final carry"
    bound = np.asarray(_bound(name, params, xs))
    slack = 1e-5  # float32 rounding of the convex combinations
    if name == "lru":
        # Its output mixes the state with the input (y = Re(h C) + D x); the state is bounded.
        h = np.abs(leaves[0])
        assert (h <= bound * (1 + slack)).all(), f"lru: |h| exceeds {bound}"
    else:
        # y_t = h_t for every other cell.
        assert (np.abs(ys) <= bound * (1 + slack) + slack).all(), f"{name}: |h| exceeds {bound}"
    if name in ("mingru", "minlstm", "indrnn"):
        assert (ys >= -slack).all(), f"{name}: negative h"
    if method != "sequential":
        ref_ys, ref_carry = rj.scan(cell, params, xs)
        np.testing.assert_allclose(ys, np.asarray(ref_ys), atol=1e-4, rtol=1e-4)
        for leaf, ref in zip(leaves, jax.tree.leaves(ref_carry)):
            np.testing.assert_allclose(leaf, np.asarray(ref), atol=1e-4, rtol=1e-4)
