"""IndRNN: the step against a NumPy float64 transcription of Li et al. (2018)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.cells import IndRNNParams
from tests.cells.test_para import assert_blocks_are_the_jacobian
from tests.compat import enable_x64

D, H = 3, 5


def random_params(cell, seed):
    params = cell.init(jax.random.key(seed), D)
    rng = np.random.default_rng(seed)
    # u in [-2, 2] so that a clip at recurrent_max_abs=1 has something to do.
    return IndRNNParams(
        w_x=jnp.asarray(rng.normal(size=(D, H)), jnp.float32),
        u=jnp.asarray(rng.uniform(-2, 2, size=H), jnp.float32),
        b=None if params.b is None else jnp.asarray(rng.normal(size=H), jnp.float32),
    )


def numpy_indrnn(params, h, x, act, max_abs=None):
    w, u = np.asarray(params.w_x, np.float64), np.asarray(params.u, np.float64)
    b = 0.0 if params.b is None else np.asarray(params.b, np.float64)
    if max_abs is not None:
        u = np.minimum(np.maximum(u, -max_abs), max_abs)
    return act(np.asarray(x, np.float64) @ w + u * np.asarray(h, np.float64) + b)


relu = lambda v: np.maximum(v, 0.0)  # noqa: E731


@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batch2"])
@pytest.mark.parametrize(
    "cell, act",
    [
        (rj.IndRNN(H), relu),
        (rj.IndRNN(H, activation="tanh", use_bias=False, recurrent_max_abs=1.0), np.tanh),
    ],
    ids=["relu", "tanh_nobias_clipped"],
)
def test_step_matches_numpy_reference(cell, act, batch):
    params = random_params(cell, seed=len(batch))
    rng = np.random.default_rng(10 + len(batch))
    h = jnp.asarray(rng.normal(size=(*batch, H)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(*batch, D)), jnp.float32)
    new, y = cell.step(params, h, x)
    expected = numpy_indrnn(params, h, x, act, cell.recurrent_max_abs)
    assert y.shape == (*batch, H)
    np.testing.assert_allclose(np.asarray(new), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=1e-5)


def test_clip_bounds_the_recurrent_weight_only_in_the_step():
    cell = rj.IndRNN(1, activation="linear", use_bias=False, recurrent_max_abs=0.5)
    params = IndRNNParams(w_x=jnp.zeros((1, 1)), u=jnp.array([3.0]), b=None)
    h, _ = cell.step(params, jnp.array([2.0]), jnp.zeros(1))
    assert float(h[0]) == 1.0  # 0.5 * 2, not 3 * 2
    grad = jax.grad(lambda p: cell.step(p, jnp.array([2.0]), jnp.zeros(1))[0].sum())(params)
    assert float(grad.u[0]) == 0.0


def test_init_shapes_and_defaults():
    cell = rj.IndRNN(H)
    assert cell.activation == "relu" and cell.recurrent_max_abs is None
    params = cell.init(jax.random.key(0), D)
    assert isinstance(params, IndRNNParams)
    assert params.w_x.shape == (D, H) and params.u.shape == (H,) and params.b.shape == (H,)
    u = np.asarray(cell.init(jax.random.key(1), D).u)
    assert np.all(u >= 0) and np.all(u < 1)
    assert not np.any(np.asarray(params.b))
    assert rj.IndRNN(H, use_bias=False).init(jax.random.key(0), D).b is None
    custom = rj.IndRNN(H, recurrent_init=jax.nn.initializers.constant(0.25)).init(jax.random.key(0), D)
    np.testing.assert_array_equal(np.asarray(custom.u), 0.25)
    assert cell.output_size(D) == H and cell.input_size(params) == D


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 0}, "hidden_size.*0"),
        ({"hidden_size": 4, "activation": "nope"}, "activation 'nope'"),
        ({"hidden_size": 4, "recurrent_max_abs": 0.0}, "recurrent_max_abs.*0.0"),
        ({"hidden_size": 4, "recurrent_max_abs": -1.0}, "recurrent_max_abs.*-1.0"),
        ({"hidden_size": 4, "recurrent_max_abs": float("inf")}, "recurrent_max_abs.*inf"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rj.IndRNN(**kwargs)


@pytest.mark.parametrize(
    "cell",
    [rj.IndRNN(H, activation="tanh"), rj.IndRNN(H, activation="tanh", recurrent_max_abs=1.0), rj.IndRNN(H)],
    ids=["tanh", "tanh_clipped", "relu"],
)
def test_blocks_are_the_exact_jacobian(cell):
    assert isinstance(cell, rj.StructuredJacobian) and cell.jacobian_kind == "exact"
    params = random_params(cell, seed=4)
    rng = np.random.default_rng(4)
    h, x = rng.normal(size=(2, H)), rng.normal(size=(2, D))
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    with enable_x64(True):
        params, h, x = jax.tree.map(jnp.asarray, (params, h, x))
        assert_blocks_are_the_jacobian(cell, params, h, x)
        if cell.recurrent_max_abs is not None:
            # Units whose |u| exceeds the bound have blocks u' f'(pre) with u' = +-bound, not u.
            pre = x @ params.w_x + jnp.clip(params.u, -1.0, 1.0) * h + params.b
            blocks = cell.step_with_jacobian(params, h, x)[1][..., 0, 0]
            expected = jnp.clip(params.u, -1.0, 1.0) * (1 - jnp.tanh(pre) ** 2)
            np.testing.assert_allclose(np.asarray(blocks), np.asarray(expected), atol=1e-14)
            assert np.any(np.abs(np.asarray(params.u)) > 1.0)
