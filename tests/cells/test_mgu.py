"""MGU: the step against a NumPy float64 transcription of Zhou et al. (2016)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.cells import MGUParams

D, H = 3, 5


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def random_params(cell, seed):
    """Every parameter random (the bias too, which init sets to zeros)."""
    params = cell.init(jax.random.key(seed), D)
    rng = np.random.default_rng(seed)
    return type(params)(*[None if p is None else jnp.asarray(rng.normal(size=p.shape) * 0.5, jnp.float32) for p in params])


def numpy_mgu(params, h, x, act=np.tanh):
    w_x, w_h, b = (None if p is None else np.asarray(p, np.float64) for p in params)
    h, x = np.asarray(h, np.float64), np.asarray(x, np.float64)
    b = np.zeros(2 * H) if b is None else b
    f = sigmoid(x @ w_x[:, :H] + h @ w_h[:, :H] + b[:H])
    n = act(x @ w_x[:, H:] + (f * h) @ w_h[:, H:] + b[H:])
    return (1.0 - f) * h + f * n


@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batch2"])
@pytest.mark.parametrize(
    "cell, act",
    [(rj.MGU(H), np.tanh), (rj.MGU(H, use_bias=False, activation="relu"), lambda v: np.maximum(v, 0))],
    ids=["default", "nobias_relu"],
)
def test_step_matches_numpy_reference(cell, act, batch):
    params = random_params(cell, seed=len(batch))
    rng = np.random.default_rng(10 + len(batch))
    h = jnp.asarray(rng.normal(size=(*batch, H)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(*batch, D)), jnp.float32)
    new, y = cell.step(params, h, x)
    expected = numpy_mgu(params, h, x, act)
    assert y.shape == (*batch, H)
    np.testing.assert_allclose(np.asarray(new), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=1e-5)


def test_init_shapes_and_defaults():
    cell = rj.MGU(H)
    params = cell.init(jax.random.key(0), D)
    assert isinstance(params, MGUParams)
    assert params.w_x.shape == (D, 2 * H) and params.w_h.shape == (H, 2 * H) and params.b.shape == (2 * H,)
    assert not np.any(np.asarray(params.b))
    # Orthogonal per gate: each (H, H) block of w_h.
    for block in (params.w_h[:, :H], params.w_h[:, H:]):
        np.testing.assert_allclose(np.asarray(block.T @ block), np.eye(H), atol=1e-5)
    assert rj.MGU(H, use_bias=False).init(jax.random.key(0), D).b is None
    assert cell.output_size(D) == H and cell.input_size(params) == D


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 0}, "hidden_size.*0"),
        ({"hidden_size": 4, "activation": "nope"}, "activation 'nope'"),
        ({"hidden_size": 4, "gate_activation": "nope"}, "gate_activation 'nope'"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rj.MGU(**kwargs)
