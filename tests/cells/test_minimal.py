"""minGRU and minLSTM: the step against NumPy float64 transcriptions of Feng et al. (2024),
the linear form ``a * h + b`` and its log-space version."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.cells import MinGRUParams, MinLSTMParams

D, H = 3, 5


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def numpy_g(v):
    return np.where(v >= 0, v + 0.5, sigmoid(v))


def numpy_pre(params, x, blocks):
    w = np.asarray(params.w, np.float64)
    b = 0.0 if params.b is None else np.asarray(params.b, np.float64)
    pre = np.asarray(x, np.float64) @ w + b
    return [pre[..., k * H : (k + 1) * H] for k in range(blocks)]


def numpy_min_gru(params, h, x, candidate):
    z_pre, h_pre = numpy_pre(params, x, 2)
    z = sigmoid(z_pre)
    h_tilde = numpy_g(h_pre) if candidate == "g" else h_pre
    return (1.0 - z) * np.asarray(h, np.float64) + z * h_tilde


def numpy_min_lstm(params, h, x, candidate):
    f_pre, i_pre, h_pre = numpy_pre(params, x, 3)
    f, i = sigmoid(f_pre), sigmoid(i_pre)
    h_tilde = numpy_g(h_pre) if candidate == "g" else h_pre
    return f / (f + i) * np.asarray(h, np.float64) + i / (f + i) * h_tilde


REFERENCES = {rj.MinGRU: numpy_min_gru, rj.MinLSTM: numpy_min_lstm}
CELLS = [
    rj.MinGRU(H),
    rj.MinGRU(H, candidate="identity", use_bias=False),
    rj.MinLSTM(H),
    rj.MinLSTM(H, candidate="identity", use_bias=False),
]
IDS = ["mingru_g", "mingru_identity_nobias", "minlstm_g", "minlstm_identity_nobias"]


def random_params(cell, seed, scale=1.0):
    params = cell.init(jax.random.key(seed), D)
    rng = np.random.default_rng(seed)
    return type(params)(*[None if p is None else jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32) for p in params])


def random_inputs(batch, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(*batch, H)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(*batch, D)) * scale, jnp.float32)
    return h, x


@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batch2"])
@pytest.mark.parametrize("cell", CELLS, ids=IDS)
def test_step_and_coefficients_match_numpy_reference(cell, batch):
    params = random_params(cell, seed=len(batch))
    h, x = random_inputs(batch, seed=10 + len(batch))
    new, y = cell.step(params, h, x)
    expected = REFERENCES[type(cell)](params, h, x, cell.candidate)
    assert y.shape == (*batch, H)
    np.testing.assert_allclose(np.asarray(new), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(new))
    a, b = cell.coefficients(params, x)
    assert a.shape == b.shape == (*batch, H)
    np.testing.assert_allclose(np.asarray(a * h + b), np.asarray(new), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cell", [c for c in CELLS if c.candidate == "g"], ids=["mingru", "minlstm"])
def test_log_coefficients_exponentiate_to_coefficients(cell):
    params = random_params(cell, seed=3)
    _, x = random_inputs((4,), seed=4, scale=3.0)
    log_a, log_b = cell.log_coefficients(params, x)
    a, b = cell.coefficients(params, x)
    np.testing.assert_allclose(np.exp(np.asarray(log_a)), np.asarray(a), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.exp(np.asarray(log_b)), np.asarray(b), rtol=1e-5, atol=1e-7)
    # Saturated gates: the logs stay finite (and so do their gradients) where a or b
    # underflow to zero in float32.
    big = x * 1e3
    log_a, log_b = cell.log_coefficients(params, big)
    assert np.isfinite(np.asarray(log_a)).all() and np.isfinite(np.asarray(log_b)).all()
    assert np.asarray(log_a).min() < -100 or np.asarray(log_b).min() < -100
    grads = jax.grad(lambda p: sum(jnp.sum(v) for v in cell.log_coefficients(p, big)))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("cls", [rj.MinGRU, rj.MinLSTM])
def test_log_coefficients_need_the_positive_candidate(cls):
    cell = cls(H, candidate="identity")
    params = cell.init(jax.random.key(0), D)
    with pytest.raises(ValueError, match="candidate='g'.*'identity'"):
        cell.log_coefficients(params, jnp.ones(D))


def test_init_shapes():
    for cell, params_type, blocks in ((rj.MinGRU(H), MinGRUParams, 2), (rj.MinLSTM(H), MinLSTMParams, 3)):
        params = cell.init(jax.random.key(0), D)
        assert isinstance(params, params_type)
        assert params.w.shape == (D, blocks * H) and params.b.shape == (blocks * H,)
        assert not np.any(np.asarray(params.b))
        assert type(cell)(H, use_bias=False).init(jax.random.key(0), D).b is None
        assert isinstance(cell, rj.LinearCell)
        assert cell.candidate == "g" and cell.output_size(D) == H and cell.input_size(params) == D


@pytest.mark.parametrize("cls", [rj.MinGRU, rj.MinLSTM])
@pytest.mark.parametrize(
    "kwargs, match",
    [({"hidden_size": 0}, "hidden_size.*0"), ({"hidden_size": 4, "candidate": "tanh"}, "candidate 'tanh'")],
)
def test_bad_config_raises(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("candidate", ["g", "identity"])
def test_min_lstm_with_both_gates_underflowing_agrees_across_methods(candidate):
    # sigmoid(-100) is ~4e-44 (denormal) in float32: f / (f + i) would be 0 / 0. The gate
    # ratio is sigma(log i - log f) = 1/2 here, in every method.
    cell = rj.MinLSTM(H, candidate=candidate)
    params = cell.init(jax.random.key(0), D)
    params = params._replace(w=jnp.zeros_like(params.w), b=jnp.full_like(params.b, -100.0).at[2 * H :].set(1.0))
    xs, h0 = jnp.ones((4, D)), jnp.full((H,), 2.0)
    a, b = cell.coefficients(params, xs[0])
    np.testing.assert_array_equal(a, np.full(H, 0.5, np.float32))
    want = rj.scan(cell, params, xs, h0)
    assert np.isfinite(np.asarray(want[0])).all()
    h_tilde = 1.5 if candidate == "g" else 1.0  # g(1) = 1.5
    expected = h_tilde + (2.0 - h_tilde) * 0.5 ** np.arange(1, 5)  # h_t = (h_{t-1} + h~) / 2
    np.testing.assert_allclose(want[0], np.repeat(expected[:, None], H, 1), rtol=1e-6)
    for method in ("associative", rj.Chunked(2)):
        got = rj.scan(cell, params, xs, h0, method=method)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
