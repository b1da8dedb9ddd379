"""rj.DeltaNet and rj.GatedDeltaNet (the layers' token mixers): the layers against NumPy float64
transcriptions of fla's DeltaNet and GatedDeltaNet (with deliberate wiring faults that the
comparison catches), chunkwise against the step recurrence in values and gradients, decoding
after a prefill, the reference's initialisation, bad configurations."""

import jax
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.cells.matrix_state import MatrixCarry
from tests.cases import normal
from tests.cells.matrix_state_checks import (
    causal_conv,
    check_chunked_equals_sequential,
    check_decoding_after_prefill,
    silu,
)
from tests.compat import enable_x64

D = 5
# d_k != d_v throughout: a swapped key and value axis cannot pass.
DELTA = rj.DeltaNet(heads=2, key_size=4, value_size=3, use_gate=True)  # fla's DeltaNet(use_gate=True)
DELTA_PLAIN = rj.DeltaNet(heads=2, key_size=4, value_size=3, conv_width=0, allow_neg_eigval=True)
GATED = rj.GatedDeltaNet(heads=2, key_size=4, value_size=3)
GATED_NEG = rj.GatedDeltaNet(heads=2, key_size=4, value_size=3, use_gate=False, allow_neg_eigval=True)


def random_params(cell, input_size, seed, scale=0.6):
    """float64 params of ``cell.init``'s structure and shapes, every leaf standard normal times
    ``scale``: no zero, unit or skip values left from an initialisation, and no init compiled
    (``jax.eval_shape`` only traces it)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: cell.init(jax.random.key(0), input_size))
    return jax.tree.map(lambda s: scale * rng.standard_normal(s.shape), shapes)


def softplus(a):
    return np.logaddexp(0.0, a)


def numpy_deltanet(cell, p, xs, fault=None):
    """fla's DeltaNet / GatedDeltaNet forward on one sequence ``xs`` ``(T, D)`` in float64, by
    fla's naive recurrent (gated) delta rule; state ``(heads, d_k, d_v)``. ``fault`` wires one
    piece wrongly, to show the comparison would catch it."""
    gated = isinstance(cell, rj.GatedDeltaNet)
    p = {name: None if a is None else np.asarray(a, np.float64) for name, a in p._asdict().items()}
    h, dk, dv = cell.heads, cell.key_size, cell.value_size
    xs = np.asarray(xs, np.float64)
    steps = len(xs)
    q, k, v, g = np.split(xs @ p["w_in"], np.cumsum([h * dk, h * dk, h * dv]), axis=-1)
    if cell.conv_width:  # ShortConvolution(activation="silu"), no bias, one per projection
        conv_q, conv_k, conv_v = np.split(p["conv"], np.cumsum([h * dk, h * dk]), axis=-1)
        q, k, v = silu(causal_conv(q, conv_q)), silu(causal_conv(k, conv_k)), silu(causal_conv(v, conv_v))
    else:
        q, k, v = silu(q), silu(k), silu(v)
    q, k, v = q.reshape(steps, h, dk), k.reshape(steps, h, dk), v.reshape(steps, h, dv)
    if fault != "no_l2":  # use_qk_l2norm_in_kernel: x / sqrt(sum(x^2) + 1e-6)
        q = q / np.sqrt(np.sum(q**2, axis=-1, keepdims=True) + 1e-6)
        k = k / np.sqrt(np.sum(k**2, axis=-1, keepdims=True) + 1e-6)
    beta = 1 / (1 + np.exp(-(xs @ p["w_beta"])))
    if cell.allow_neg_eigval and fault != "beta_factor":
        beta = beta * 2.0
    log_g = -np.exp(p["a_log"]) * softplus(xs @ p["w_a"] + p["dt_bias"]) if gated else np.zeros((steps, h))
    S, o = np.zeros((h, dk, dv)), []
    for t in range(steps):
        if fault != "decay_after":
            S = S * np.exp(log_g[t])[:, None, None]
        error = v[t] - np.einsum("hk,hkv->hv", k[t], S)
        S = S + np.einsum("hk,hv->hkv", k[t] * beta[t][:, None], error)
        if fault == "decay_after":
            S = S * np.exp(log_g[t])[:, None, None]
        o.append(np.einsum("hk,hkv->hv", q[t] * dk**-0.5, S))
    o = np.stack(o)
    y = o / np.sqrt(np.mean(o**2, axis=-1, keepdims=True) + cell.norm_eps) * p["norm"]  # RMSNorm per head
    if cell.use_gate and fault != "no_out_gate":  # FusedRMSNormGated: rmsnorm(o) * weight * swish(g)
        y = y * silu(g.reshape(steps, h, dv))
    return y.reshape(steps, h * dv) @ p["w_out"], S


# Each case: a configuration and the wiring faults it must catch.
CASES = {
    "deltanet-conv-gate": (DELTA, ("no_l2", "no_out_gate")),
    "deltanet-noconv-negeig": (DELTA_PLAIN, ("beta_factor", "no_l2")),
    "gated": (GATED, ("decay_after", "no_l2")),
    "gated-nogate-negeig": (GATED_NEG, ("beta_factor", "decay_after")),
}


@pytest.mark.parametrize(
    "name", [name if name == "gated" else pytest.param(name, marks=pytest.mark.slow) for name in CASES]
)
def test_layer_equals_the_published_equations(name):
    cell, faults = CASES[name]
    with enable_x64(True):
        params = random_params(cell, D, 6)
        xs = normal(7, (2, 6, D), np.float64)
        ys, carry = rj.scan(cell, params, xs, method=rj.Sequential())
    expected = [numpy_deltanet(cell, params, x) for x in xs]
    # float64: the two differ by rounding only.
    np.testing.assert_allclose(np.asarray(ys), np.stack([y for y, _ in expected]), atol=1e-10, rtol=1e-9)
    state = carry.state if isinstance(carry, MatrixCarry) else carry
    np.testing.assert_allclose(np.asarray(state), np.stack([s for _, s in expected]), atol=1e-10, rtol=1e-9)
    for fault in faults:  # each fault moves the outputs far beyond the tolerance above
        wrong = np.stack([numpy_deltanet(cell, params, x, fault)[0] for x in xs])
        assert np.abs(wrong - np.asarray(ys)).max() > 1e-3, fault


# Each direction compiles a chunkwise and a step gradient (10-20 s on a shared CPU): make test-all.
@pytest.mark.slow
@pytest.mark.parametrize("cell", [DELTA, GATED_NEG], ids=["deltanet", "gated"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_chunked_equals_sequential_in_values_and_gradients(cell, reverse):
    check_chunked_equals_sequential(cell, D, reverse)


# 11-15 s (a chunkwise delta/DPLR scan compiled twice): make test-all; the fast set scans the cells
# chunkwise against the step loop in tests/test_cells.py.
@pytest.mark.slow
def test_decoding_after_a_chunkwise_prefill_equals_one_scan():
    check_decoding_after_prefill(GATED, D)


def test_init_shapes_carry_and_the_reference_gate_init():
    params = GATED.init(jax.random.key(0), D)
    channels = 2 * (4 + 4 + 3)
    assert params.w_in.shape == (D, channels + 2 * 3) and params.conv.shape == (4, channels)
    assert params.w_beta.shape == params.w_a.shape == (D, 2) and params.w_out.shape == (6, D)
    a = np.exp(np.asarray(params.a_log))
    assert a.min() >= 0 and a.max() <= 16  # A ~ U(0, 16)
    dt = np.asarray(jax.nn.softplus(params.dt_bias))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert np.all(np.asarray(params.norm) == 1) and np.abs(np.asarray(params.conv)).max() <= 0.5
    carry = GATED.init_carry((2,))
    assert isinstance(carry, MatrixCarry) and carry.conv.shape == (2, 3, channels) and carry.state.shape == (2, 2, 4, 3)
    plain = DELTA_PLAIN.init(jax.random.key(0), D)
    assert plain.conv is None and plain.w_in.shape == (D, channels)  # no output gate block
    assert DELTA_PLAIN.init_carry((2,)).shape == (2, 2, 4, 3)
    default = rj.DeltaNet(4, 8, 16)
    assert (default.conv_width, default.use_gate, default.allow_neg_eigval, default.norm_eps) == (4, False, False, 1e-5)
    assert rj.GatedDeltaNet(4, 8, 16).use_gate and default.query_scale() == 8**-0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(heads=0), "heads must be a positive int"),
    (dict(conv_width=-1), "conv_width must be a non-negative int"),
    (dict(norm_eps=0.0), "norm_eps must be a positive"),
])
def test_bad_configuration_is_rejected(kwargs, message):
    for cls in (rj.DeltaNet, rj.GatedDeltaNet):
        with pytest.raises(ValueError, match=message):
            cls(**{**dict(heads=2, key_size=4, value_size=3), **kwargs})


def test_step_refuses_params_of_the_other_cell():
    params = DELTA.init(jax.random.key(0), D)
    with pytest.raises(TypeError, match="params is a DeltaNetParams; expected GatedDeltaNetParams"):
        GATED.step(params, GATED.init_carry(), np.ones(D, np.float32))
