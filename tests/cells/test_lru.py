"""LRU: the step against a NumPy complex128 transcription of Orvieto et al. (2023), the
paper's initialisation, dtypes and long-run stability."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.cells import LRUParams
from tests.cases import normal
from tests.compat import enable_x64

D, N = 3, 5


def random_params(seed):
    """Random values for every parameter, unrelated to the paper's initialisation."""
    rng = np.random.default_rng(seed)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return LRUParams(
        nu_log=f32(rng.normal(size=N) - 1.0),
        theta_log=f32(rng.normal(size=N)),
        gamma_log=f32(rng.normal(size=N) * 0.3),
        b_re=f32(rng.normal(size=(D, N))),
        b_im=f32(rng.normal(size=(D, N))),
        c_re=f32(rng.normal(size=(N, D))),
        c_im=f32(rng.normal(size=(N, D))),
        d=f32(rng.normal(size=D)),
    )


def numpy_lru(params, h, x):
    p = LRUParams(*(np.asarray(v, np.float64) for v in params))
    lam = np.exp(-np.exp(p.nu_log) + 1j * np.exp(p.theta_log))
    B = p.b_re + 1j * p.b_im
    C = p.c_re + 1j * p.c_im
    x = np.asarray(x, np.float64)
    h_new = lam * np.asarray(h, np.complex128) + np.exp(p.gamma_log) * (x @ B)
    y = (h_new @ C).real + p.d * x
    return h_new, y, lam


@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batch2"])
def test_step_and_coefficients_match_numpy_reference(batch):
    cell = rj.LRU(N)
    params = random_params(seed=len(batch))
    rng = np.random.default_rng(10 + len(batch))
    h = jnp.asarray(rng.normal(size=(*batch, N)) + 1j * rng.normal(size=(*batch, N)), jnp.complex64)
    x = jnp.asarray(rng.normal(size=(*batch, D)), jnp.float32)
    new, y = cell.step(params, h, x)
    expected_h, expected_y, lam = numpy_lru(params, h, x)
    assert new.shape == (*batch, N) and new.dtype == jnp.complex64
    assert y.shape == (*batch, D) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(new), expected_h, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y), expected_y, atol=1e-5, rtol=1e-5)
    a, b = cell.coefficients(params, x)
    assert a.shape == b.shape == (*batch, N) and a.dtype == b.dtype == jnp.complex64
    np.testing.assert_allclose(np.asarray(a), np.broadcast_to(lam, a.shape), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(a * h + b), np.asarray(new), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cell.readout(params, new, x)), np.asarray(y), atol=1e-6)


def test_init_follows_the_paper():
    cell = rj.LRU(256, r_min=0.9, r_max=0.999, max_phase=np.pi / 10)
    params = cell.init(jax.random.key(0), D)
    lam = np.asarray(cell.eigenvalues(params), np.complex128)
    r = np.abs(lam)
    assert np.all(r >= 0.9 - 1e-6) and np.all(r <= 0.999 + 1e-6)
    # |lambda|^2 uniform on [r_min^2, r_max^2] (uniform on the ring's area).
    assert abs(np.mean(r**2) - (0.9**2 + 0.999**2) / 2) < 0.02
    phase = np.exp(np.asarray(params.theta_log, np.float64))
    assert np.all(phase >= 0) and np.all(phase < np.pi / 10 + 1e-6)
    # gamma normalises the input: gamma^2 = 1 - |lambda|^2.
    np.testing.assert_allclose(np.exp(2 * np.asarray(params.gamma_log, np.float64)), 1 - r**2, rtol=1e-3)
    assert params.b_re.shape == params.b_im.shape == (D, 256)
    assert params.c_re.shape == params.c_im.shape == (256, D) and params.d.shape == (D,)
    assert abs(np.var(np.asarray(params.b_re)) - 1 / (2 * D)) < 0.03
    assert abs(np.var(np.asarray(params.c_im)) - 1 / 256) < 0.001
    assert cell.output_size(D) == D and cell.input_size(params) == D
    # The defaults: the whole unit disc and every phase.
    default = rj.LRU(N)
    assert (default.r_min, default.r_max, default.max_phase) == (0.0, 1.0, 2 * np.pi)
    r = np.abs(np.asarray(default.eigenvalues(default.init(jax.random.key(1), D))))
    assert np.all(np.isfinite(r)) and np.all(r < 1)


def test_carry_is_complex_of_the_matching_precision():
    cell = rj.LRU(N)
    assert cell.init_carry((2,)).dtype == jnp.complex64
    assert cell.init_carry((), jnp.bfloat16).dtype == jnp.complex64
    with enable_x64(True):
        assert cell.init_carry((2,), jnp.float64).dtype == jnp.complex128


def test_bfloat16_inputs_with_float32_params():
    cell = rj.LRU(N)
    params = random_params(seed=5)
    x = normal(0, (2, D))
    h32, y32 = cell.step(params, cell.init_carry((2,)), x)
    h16, y16 = cell.step(params, cell.init_carry((2,)), x.astype(jnp.bfloat16))
    a, b = cell.coefficients(params, x.astype(jnp.bfloat16))
    assert b.dtype == jnp.complex64 and h16.dtype == jnp.complex64 and y16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(h16), np.asarray(h32), atol=0.05)
    np.testing.assert_allclose(np.asarray(y16), np.asarray(y32), atol=0.1)


def test_stays_bounded_over_a_long_constant_input():
    cell = rj.LRU(N, r_min=0.9, r_max=0.99)
    params = cell.init(jax.random.key(1), D)
    steps = 2000
    xs = jnp.ones((2, steps, D), jnp.float32) * jnp.array([[[1.0]], [[-3.0]]])
    ys, h = rj.scan(cell, params, xs)
    assert np.isfinite(np.asarray(ys)).all() and np.isfinite(np.asarray(h)).all()
    # The state converges to the fixed point b / (1 - lambda) (0.99 ** 2000 ~ 2e-9).
    a, b = cell.coefficients(params, xs[:, 0])
    fixed = np.asarray(b, np.complex128) / (1 - np.asarray(a, np.complex128))
    np.testing.assert_allclose(np.asarray(h), fixed, rtol=1e-3, atol=1e-4)
    # Every output obeys |h_t| <= |b| / (1 - |lambda|), so |y_t| <= |C|^T that + |d x|.
    C = np.abs(np.asarray(params.c_re, np.float64) + 1j * np.asarray(params.c_im, np.float64))
    h_bound = np.abs(np.asarray(b, np.complex128)) / (1 - np.abs(np.asarray(a, np.complex128)))
    y_bound = h_bound @ C + np.abs(np.asarray(params.d) * np.asarray(xs[:, 0]))
    assert np.all(np.abs(np.asarray(ys)) <= y_bound[:, None, :] * (1 + 1e-4) + 1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 0}, "hidden_size.*0"),
        ({"hidden_size": 4, "r_min": 0.9, "r_max": 0.9}, "r_min=0.9 and r_max=0.9"),
        ({"hidden_size": 4, "r_min": 0.5, "r_max": 0.4}, "r_min=0.5 and r_max=0.4"),
        ({"hidden_size": 4, "r_max": 1.5}, "r_max=1.5"),
        ({"hidden_size": 4, "r_min": -0.1}, "r_min=-0.1"),
        ({"hidden_size": 4, "max_phase": 0.0}, "max_phase.*0.0"),
        ({"hidden_size": 4, "r_max": float("nan")}, "r_max.*nan"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rj.LRU(**kwargs)
