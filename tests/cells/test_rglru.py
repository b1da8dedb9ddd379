"""RG-LRU: parity with RecurrentGemma's JAX ``RGLRU`` layer (tests/fixtures/rglru_recurrentgemma.npz,
written by tests/fixtures/make_rglru_fixture.py; recurrentgemma is not needed here), the
documented first-token difference, the parallel methods, the initialisation and bad input."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax as rj
from rnnjax.cells import RGLRUParams
from tests.compat import enable_x64
from tests.helpers import assert_trees_close

FIXTURE = np.load(Path(__file__).resolve().parent.parent / "fixtures" / "rglru_recurrentgemma.npz")
CONFIG = json.loads(str(FIXTURE["config"]))
CELL = rj.RGLRU(CONFIG["width"], num_heads=CONFIG["num_heads"])
T = FIXTURE["x"].shape[1]
# float32: each step rounds its few operations (gates, exp, expm1, sqrt, the update) at 2^-24
# relative, and a_t < 1 shrinks earlier steps' errors, so T steps stay below
# T * 8 * 2^-24 * max|y| (1.5e-5 here; measured 2.6e-7, RecurrentGemma's own float32 run 3.2e-7).
F32_ATOL = T * 8 * 2.0**-24 * float(np.max(np.abs(FIXTURE["y"])))
F64_ATOL = 1e-12  # float64 rounding of the same few operations (measured 4e-16)


def fixture_params(dtype):
    return RGLRUParams(*(jnp.asarray(FIXTURE[name], dtype) for name in RGLRUParams._fields))


@functools.cache
def scan_fn(method):
    return jax.jit(lambda p, x, h0, resets=None: rj.scan(CELL, p, x, h0, resets=resets, method=method))


def loss(p, x, h0, method=None):
    ys, h = rj.scan(CELL, p, x, h0, method=method or rj.Sequential())
    return jnp.sum(ys * FIXTURE["y_cot"]) + jnp.sum(h * FIXTURE["h_cot"])


def test_matches_recurrentgemma_float32():
    p, x, h0 = fixture_params(jnp.float32), jnp.asarray(FIXTURE["x"]), jnp.asarray(FIXTURE["h0"])
    ys, h = scan_fn(rj.Sequential())(p, x, h0)
    assert ys.dtype == h.dtype == jnp.float32
    # Against the layer run in float64 on the same float32 values, and against its float32 run.
    np.testing.assert_allclose(np.asarray(ys, np.float64), FIXTURE["y"], atol=F32_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(h, np.float64), FIXTURE["h"], atol=F32_ATOL, rtol=0)
    np.testing.assert_allclose(ys, FIXTURE["y_f32"], atol=F32_ATOL + CONFIG["float32_reference_max_err"], rtol=0)
    np.testing.assert_allclose(h, FIXTURE["h_f32"], atol=F32_ATOL + CONFIG["float32_reference_max_err"], rtol=0)


@pytest.mark.slow
def test_matches_recurrentgemma_float64_values_and_gradients():
    with enable_x64(True):
        p = fixture_params(jnp.float64)
        x, h0 = jnp.asarray(FIXTURE["x"], jnp.float64), jnp.asarray(FIXTURE["h0"], jnp.float64)
        ys, h = rj.scan(CELL, p, x, h0)
        np.testing.assert_allclose(ys, FIXTURE["y"], atol=F64_ATOL, rtol=0)
        np.testing.assert_allclose(h, FIXTURE["h"], atol=F64_ATOL, rtol=0)
        grad_p, grad_x, grad_h0 = jax.grad(loss, argnums=(0, 1, 2))(p, x, h0)
        np.testing.assert_allclose(grad_x, FIXTURE["grad_x"], atol=F64_ATOL, rtol=0)
        np.testing.assert_allclose(grad_h0, FIXTURE["grad_h0"], atol=F64_ATOL, rtol=0)
        for name in RGLRUParams._fields:
            expected = FIXTURE[f"grad_{name}"]
            np.testing.assert_allclose(getattr(grad_p, name), expected, atol=F64_ATOL, rtol=0, err_msg=name)


@jax.jit
def first_token_runs(p, x, h0):
    """The layer's position-0 step two ways: a reset at t = 0, and the carry start_carry gives."""
    resets = jnp.zeros(x.shape[:2], bool).at[:, 0].set(True)
    a0, _ = CELL.coefficients(p, x[:, 0])
    return a0, rj.scan(CELL, p, x, h0, resets=resets), rj.scan(CELL, p, x, CELL.start_carry(p, x[:, 0]))


def test_first_token_of_a_document_is_not_normalised_by_recurrentgemma():
    p, x, h0 = fixture_params(jnp.float32), jnp.asarray(FIXTURE["x"]), jnp.asarray(FIXTURE["h0"])
    a0, (ys, _), (start_ys, start_h) = first_token_runs(p, x, h0)
    # A reset drops the state as the layer does at position 0, but keeps sqrt(1 - a_0^2).
    np.testing.assert_allclose(ys[:, 0], np.sqrt(1 - np.asarray(a0, np.float64) ** 2) * FIXTURE["y_start"][:, 0],
                               atol=F32_ATOL, rtol=0)
    assert np.max(np.abs(ys[:, 0] - FIXTURE["y_start"][:, 0])) > 0.1
    # start_carry makes the first step the layer's position-0 step: the whole sequence agrees.
    np.testing.assert_allclose(np.asarray(start_ys, np.float64), FIXTURE["y_start"], atol=F32_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(start_h, np.float64), FIXTURE["h_start"], atol=F32_ATOL, rtol=0)


def test_associative_equals_sequential():
    p, x, h0 = fixture_params(jnp.float32), jnp.asarray(FIXTURE["x"]), jnp.asarray(FIXTURE["h0"])
    expected = scan_fn(rj.Sequential())(p, x, h0)
    assert_trees_close(scan_fn(rj.Associative())(p, x, h0), expected, atol=1e-6, rtol=1e-6, check_dtypes=True)


@pytest.mark.slow
def test_associative_and_chunked_equal_sequential_values_and_gradients():
    p, x, h0 = fixture_params(jnp.float32), jnp.asarray(FIXTURE["x"]), jnp.asarray(FIXTURE["h0"])
    expected = scan_fn(rj.Sequential())(p, x, h0)
    expected_grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(p, x, h0)
    for method in (rj.Associative(), rj.Chunked(4)):
        assert_trees_close(scan_fn(method)(p, x, h0), expected, atol=1e-6, rtol=1e-6, check_dtypes=True)
        grads = jax.jit(jax.grad(functools.partial(loss, method=method), argnums=(0, 1, 2)))(p, x, h0)
        assert_trees_close(grads, expected_grads, atol=1e-5, rtol=1e-5, check_dtypes=True)


@pytest.mark.slow
def test_check_grads_float64_forward_and_reverse():
    with enable_x64(True):
        p = fixture_params(jnp.float64)
        x, h0 = jnp.asarray(FIXTURE["x"][:, :4], jnp.float64), jnp.asarray(FIXTURE["h0"], jnp.float64)

        def f(p, x, h0):
            ys, h = rj.scan(CELL, p, x, h0, method=rj.Associative())
            return jnp.sum(ys**2) + jnp.sum(h**2)

        check_grads(jax.jit(f), (p, x, h0), order=1, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)


def test_gradients_stay_finite_where_a_gate_saturates():
    # sigmoid(-200) is 0 in float32: a_t = 1 and 1 - a_t^2 = 0, where sqrt' is infinite; times the
    # gate's zero derivative that was NaN. RecurrentGemma's bound keeps it finite.
    p = fixture_params(jnp.float32)._replace(a_gate_b=jnp.full(FIXTURE["a_gate_b"].shape, -200.0))
    x, h0 = jnp.asarray(FIXTURE["x"][:, 0]), jnp.asarray(FIXTURE["h0"])
    a, b = CELL.coefficients(p, x)
    assert np.all(np.asarray(a) == 1) and not np.any(np.asarray(b))
    grads = jax.jit(jax.grad(lambda p, x, h: jnp.sum(CELL.step(p, h, x)[1] ** 2), argnums=(0, 1, 2)))(p, x, h0)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_init_follows_recurrentgemma():
    cell = rj.RGLRU(256, num_heads=4, w_init_variance_scale=2.0)
    params = jax.jit(cell.init, static_argnums=1)(jax.random.key(0), 256)
    radius = np.exp(-np.logaddexp(0.0, np.asarray(params.a_param, np.float64)))  # exp(-softplus)
    assert np.all(radius >= 0.9 - 1e-6) and np.all(radius <= 0.999 + 1e-6)
    # radius^2 uniform on [0.9^2, 0.999^2] (uniform on the ring's area); 0.015 is 4 standard errors.
    assert abs(np.mean(radius**2) - (0.9**2 + 0.999**2) / 2) < 0.015
    assert params.a_gate_w.shape == params.input_gate_w.shape == (4, 64, 64)
    # Variance w_init_variance_scale / width, as Flax's variance_scaling fan-in of the stacked blocks.
    assert abs(np.var(np.asarray(params.a_gate_w)) * 256 / 2 - 1) < 0.1
    assert abs(np.var(np.asarray(params.input_gate_w)) * 256 / 2 - 1) < 0.1
    assert not np.any(np.asarray(params.a_gate_b)) and not np.any(np.asarray(params.input_gate_b))
    assert cell.output_size(256) == 256 and cell.input_size(params) == 256
    assert cell.init_carry((2, 3)).shape == (2, 3, 256)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"width": 0}, "width.*0"),
        ({"width": 6, "num_heads": 4}, "width=6 is not a multiple of num_heads=4"),
        ({"width": 4, "num_heads": 0}, "num_heads.*0"),
        ({"width": 4, "c": 0.0}, "c must be.*0.0"),
        ({"width": 4, "min_rad": 0.9, "max_rad": 0.9}, "min_rad=0.9 and max_rad=0.9"),
        ({"width": 4, "max_rad": 1.0}, "max_rad=1.0"),
        ({"width": 4, "min_rad": -0.1}, "min_rad=-0.1"),
        ({"width": 4, "w_init_variance_scale": -1.0}, "w_init_variance_scale"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rj.RGLRU(**kwargs)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match=r"input_size=5 .*expected input_size=width=8"):
        CELL.init(jax.random.key(0), 5)
    p = fixture_params(jnp.float32)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 8\) for input_size=8"):
        CELL.step(p, CELL.init_carry((2,)), jnp.ones((2, 5)))
    other = jax.eval_shape(lambda: rj.RGLRU(8, num_heads=4).init(jax.random.key(0), 8))
    other = RGLRUParams(*(jnp.zeros(leaf.shape) for leaf in other))
    with pytest.raises(ValueError, match=r"params.a_gate_w has shape \(4, 2, 2\); expected \(2, 4, 4\)"):
        CELL.step(other, CELL.init_carry((2,)), jnp.ones((2, 8)))
