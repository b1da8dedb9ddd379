"""rj.Mamba2 (the Mamba2 layer's mixer): chunkwise against the step recurrence in values and
gradients, decoding after a prefill, the layer against a NumPy float64 transcription of
mamba_ssm's Mamba2 (its state in mamba's own layout), the reference's initialisation."""

import jax
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.cells import Mamba2Params
from tests.cases import normal
from tests.cells.matrix_state_checks import (
    causal_conv,
    check_chunked_equals_sequential,
    check_decoding_after_prefill,
    perturbed,
    silu,
)

D = 5
# Two groups of two heads, head_size != state_size: a swapped group, head or state axis cannot pass.
CELL = rj.Mamba2(heads=4, head_size=3, state_size=2, groups=2)


# Each direction compiles a chunkwise and a step gradient (10-20 s on a shared CPU): the fast
# set runs reverse (lengths, resets and the windows of a reversed sequence), make test-all both.
@pytest.mark.parametrize("reverse", [pytest.param(False, marks=pytest.mark.slow), True], ids=["forward", "reverse"])
def test_chunked_equals_sequential_in_values_and_gradients(reverse):
    check_chunked_equals_sequential(CELL, D, reverse)


@pytest.mark.slow  # about 10 s: the fast set decodes rj.GLA (the same engine and carry)
def test_decoding_after_a_chunkwise_prefill_equals_one_scan():
    check_decoding_after_prefill(CELL, D)


def numpy_mamba2(cell, p, xs):
    """mamba_ssm's Mamba2 on one sequence ``xs`` ``(T, D)`` in float64, by its decoding step
    (``Mamba2.step`` without the fused kernels): state ``(nheads, headdim, d_state)``."""
    p = Mamba2Params(*(np.asarray(a, np.float64) for a in p))
    h, hp, gn, n = cell.heads, cell.heads * cell.head_size, cell.groups * cell.state_size, cell.state_size
    zxbcdt = np.asarray(xs, np.float64) @ p.w_in
    z, xbc, dt = np.split(zxbcdt, [hp, 2 * hp + 2 * gn], axis=-1)
    xbc = silu(causal_conv(xbc, p.conv, p.conv_bias))  # conv1d(padding=d_conv-1)[:, :T], then SiLU
    x, B, C = np.split(xbc, [hp, hp + gn], axis=-1)
    dt = np.logaddexp(0, dt + p.dt_bias)  # softplus
    A = -np.exp(p.a_log)
    heads_per_group = h // cell.groups
    state, out = np.zeros((h, cell.head_size, n)), []
    for t in range(len(xs)):
        xt = x[t].reshape(h, cell.head_size)
        Bt = np.repeat(B[t].reshape(cell.groups, n), heads_per_group, axis=0)  # repeat "g n -> (g h) n"
        Ct = np.repeat(C[t].reshape(cell.groups, n), heads_per_group, axis=0)
        state = state * np.exp(dt[t] * A)[:, None, None] + np.einsum("h,hn,hp->hpn", dt[t], Bt, xt)
        y = np.einsum("hpn,hn->hp", state, Ct) + p.d[:, None] * xt
        out.append(y.reshape(hp))
    y = np.stack(out) * silu(z)  # RMSNormGated(norm_before_gate=False, group_size=d_ssm // ngroups)
    y = y.reshape(len(xs), cell.groups, -1)
    y = y / np.sqrt(np.mean(y**2, axis=-1, keepdims=True) + cell.norm_eps)
    return (y.reshape(len(xs), hp) * p.norm) @ p.w_out, state


def test_layer_equals_the_reference():
    params = perturbed(CELL.init(jax.random.key(1), D), 6)
    xs = normal(7, (2, 6, D))
    ys, carry = rj.scan(CELL, params, xs)
    expected = [numpy_mamba2(CELL, params, x) for x in xs]
    np.testing.assert_allclose(np.asarray(ys), np.stack([y for y, _ in expected]), atol=1e-5, rtol=1e-4)
    # rnnjax's state (d_k, d_v) = (state_size, head_size) is mamba's (headdim, d_state) transposed.
    mamba_state = np.stack([s for _, s in expected])
    np.testing.assert_allclose(np.asarray(carry.state), np.swapaxes(mamba_state, -1, -2), atol=1e-5, rtol=1e-4)


def test_the_reference_initialisation():
    params = CELL.init(jax.random.key(0), D)  # the shapes the tests above compiled (about 1 s per new shape)
    dt = np.asarray(jax.nn.softplus(params.dt_bias))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    a = np.exp(np.asarray(params.a_log))
    assert a.min() >= 1 and a.max() <= 16
    assert np.all(np.asarray(params.d) == 1) and np.all(np.asarray(params.norm) == 1)
    assert np.abs(np.asarray(params.conv)).max() <= 0.5 and np.abs(np.asarray(params.conv_bias)).max() <= 0.5
    channels = 4 * 3 + 2 * 2 * 2
    assert params.w_in.shape == (D, 4 * 3 + channels + 4) and params.conv.shape == (4, channels)
    carry = CELL.init_carry((2,))
    assert carry.conv.shape == (2, 3, channels) and carry.state.shape == (2, 4, 2, 3)
    assert CELL.query_scale() == 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(groups=3), "groups=3 must divide heads=4"),
    (dict(conv_width=0), "conv_width must be a positive int"),
    (dict(dt_min=0.5, dt_max=0.1), "dt_min <= dt_max"),
])
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rj.Mamba2(**{**dict(heads=4, head_size=3, state_size=2), **kwargs})
