"""ConvLSTM: the step against NumPy float64 references (a per-pixel LSTM for a 1x1 kernel,
an explicit zero-padded convolution otherwise), shapes, and the scan driver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.cells import ConvLSTMParams, ConvLSTMState
from tests.cases import normal

C, F, HW = 3, 2, (4, 5)


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def random_params(cell, seed):
    params = cell.init(jax.random.key(seed), C)
    rng = np.random.default_rng(seed)
    return type(params)(*[None if p is None else jnp.asarray(rng.normal(size=p.shape) * 0.5, jnp.float32) for p in params])


def random_state(batch, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(*batch, *HW, C)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(*batch, *HW, F)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(*batch, *HW, F)), jnp.float32)
    return ConvLSTMState(h, c), x


def lstm_gates_to_state(z, c_prev):
    zi, zf, zg, zo = np.split(z, 4, axis=-1)
    c = sigmoid(zf) * c_prev + sigmoid(zi) * np.tanh(zg)
    return sigmoid(zo) * np.tanh(c), c


def numpy_per_pixel_lstm(params, state, x):
    """A 1x1 kernel: an ordinary LSTM applied at every pixel independently."""
    w_x = np.asarray(params.w_x, np.float64)[0, 0]  # (C, 4F)
    w_h = np.asarray(params.w_h, np.float64)[0, 0]  # (F, 4F)
    b = 0.0 if params.b is None else np.asarray(params.b, np.float64)
    h_prev, c_prev = (np.asarray(v, np.float64) for v in state)
    out_h, out_c = np.zeros_like(h_prev), np.zeros_like(c_prev)
    for idx in np.ndindex(*x.shape[:-1]):
        z = np.asarray(x[idx], np.float64) @ w_x + h_prev[idx] @ w_h + b
        out_h[idx], out_c[idx] = lstm_gates_to_state(z, c_prev[idx])
    return out_h, out_c


def numpy_same_conv(inp, kernel):
    """Cross-correlation with stride 1 and zero padding that keeps (H, W); odd kernels.
    ``inp``: (H, W, I), ``kernel``: (kh, kw, I, O)."""
    kh, kw = kernel.shape[:2]
    padded = np.pad(inp, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = np.zeros((*inp.shape[:2], kernel.shape[-1]))
    for i in range(inp.shape[0]):
        for j in range(inp.shape[1]):
            out[i, j] = np.einsum("abc,abco->o", padded[i : i + kh, j : j + kw], kernel)
    return out


def numpy_conv_lstm(params, state, x):
    w_x, w_h = np.asarray(params.w_x, np.float64), np.asarray(params.w_h, np.float64)
    b = 0.0 if params.b is None else np.asarray(params.b, np.float64)
    h_prev, c_prev = (np.asarray(v, np.float64) for v in state)
    x = np.asarray(x, np.float64)
    out_h, out_c = np.zeros_like(h_prev), np.zeros_like(c_prev)
    for idx in np.ndindex(*x.shape[:-3]):
        z = numpy_same_conv(x[idx], w_x) + numpy_same_conv(h_prev[idx], w_h) + b
        out_h[idx], out_c[idx] = lstm_gates_to_state(z, c_prev[idx])
    return out_h, out_c


@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batch2"])
def test_1x1_kernel_is_a_per_pixel_lstm(batch):
    cell = rj.ConvLSTM(F, kernel_size=1)
    params = random_params(cell, seed=len(batch))
    state, x = random_state(batch, seed=10 + len(batch))
    new, y = cell.step(params, state, x)
    expected_h, expected_c = numpy_per_pixel_lstm(params, state, x)
    np.testing.assert_allclose(np.asarray(new.h), expected_h, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new.c), expected_c, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(new.h))


@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batch2"])
@pytest.mark.parametrize("kernel_size", [3, (3, 1)], ids=["3x3", "3x1"])
def test_step_matches_numpy_convolution(kernel_size, batch):
    cell = rj.ConvLSTM(F, kernel_size=kernel_size, use_bias=kernel_size == 3)
    params = random_params(cell, seed=20 + len(batch))
    state, x = random_state(batch, seed=30 + len(batch))
    new, y = cell.step(params, state, x)
    expected_h, expected_c = numpy_conv_lstm(params, state, x)
    np.testing.assert_allclose(np.asarray(new.h), expected_h, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new.c), expected_c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [(), (2,), (2, 3)], ids=str)
def test_output_shapes_for_any_batch_shape(batch):
    cell = rj.ConvLSTM(F)
    params = cell.init(jax.random.key(0), C)
    state, y = cell.step(params, cell.init_carry((*batch, *HW)), jnp.ones((*batch, *HW, C)))
    assert y.shape == state.h.shape == state.c.shape == (*batch, *HW, F)


def test_scan_over_sequences_of_feature_maps_and_lengths_freeze_the_carry():
    cell = rj.ConvLSTM(F, kernel_size=3)
    params = cell.init(jax.random.key(1), C)
    xs = normal(2, (2, 4, *HW, C))
    ys, final = rj.scan(cell, params, xs, lengths=jnp.array([4, 2]))
    assert ys.shape == (2, 4, *HW, F)
    assert final.h.shape == final.c.shape == (2, *HW, F)
    assert not np.any(np.asarray(ys[1, 2:]))
    # The carry of the length-2 sequence is the carry after its second step.
    ys_short, short = rj.scan(cell, params, xs[1, :2])
    for got, expected in zip(final, short):
        np.testing.assert_allclose(np.asarray(got[1]), np.asarray(expected), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ys[1, :2]), np.asarray(ys_short), atol=1e-6)


def test_init_shapes_and_defaults():
    cell = rj.ConvLSTM(F)
    assert cell.kernel_size == (3, 3) and cell.forget_bias == 1.0 and cell.input_ndim == 3
    params = cell.init(jax.random.key(0), C)
    assert isinstance(params, ConvLSTMParams)
    assert params.w_x.shape == (3, 3, C, 4 * F) and params.w_h.shape == (3, 3, F, 4 * F)
    np.testing.assert_array_equal(np.asarray(params.b), np.repeat([0.0, 1.0, 0.0, 0.0], F))
    assert rj.ConvLSTM(F, kernel_size=(1, 5), use_bias=False).init(jax.random.key(0), C).w_x.shape == (1, 5, C, 4 * F)
    assert rj.ConvLSTM(F, use_bias=False).init(jax.random.key(0), C).b is None
    assert cell.output_size(C) == F and cell.input_size(params) == C
    # An int kernel_size is stored as the pair it means.
    assert rj.ConvLSTM(F, kernel_size=3) == cell and hash(rj.ConvLSTM(F, kernel_size=[3, 3])) == hash(cell)


def test_bad_inputs_raise():
    cell = rj.ConvLSTM(F)
    params = cell.init(jax.random.key(0), C)
    with pytest.raises(ValueError, match=r"x has shape \(5, 3\).*\(\*batch, H, W, C\)"):
        cell.step(params, cell.init_carry((5,)), jnp.ones((5, C)))
    with pytest.raises(ValueError, match=r"expected \(\.\.\., H, W, 3\)"):
        cell.step(params, cell.init_carry(HW), jnp.ones((*HW, C + 1)))
    with pytest.raises(ValueError, match=r"carry.h has shape \(4, 4, 2\); expected \(4, 5, 2\)"):
        cell.step(params, cell.init_carry((4, 4)), jnp.ones((*HW, C)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 0}, "hidden_size.*0"),
        ({"hidden_size": 2, "kernel_size": 0}, "kernel_size.*0"),
        ({"hidden_size": 2, "kernel_size": (3,)}, r"kernel_size.*\(3,\)"),
        ({"hidden_size": 2, "kernel_size": "3"}, "kernel_size.*'3'"),
        ({"hidden_size": 2, "activation": "nope"}, "activation 'nope'"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rj.ConvLSTM(**kwargs)
