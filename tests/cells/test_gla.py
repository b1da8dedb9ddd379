"""rj.GLA (the Gated Linear Attention layer's token mixer): chunkwise against the step
recurrence in values and gradients, decoding after a prefill, the layer against a NumPy float64
transcription of the published equations (fla's GatedLinearAttention), its configuration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.cells import GLAParams
from rnnjax.cells.matrix_state import MatrixCarry
from tests.cases import normal
from tests.cells.matrix_state_checks import (
    causal_conv,
    check_chunked_equals_sequential,
    check_decoding_after_prefill,
    perturbed,
    silu,
)

D = 5
CONV = rj.GLA(heads=2, key_size=4, value_size=3, conv_width=4, gate_rank=3)  # d_k != d_v
PLAIN = rj.GLA(heads=2, key_size=4, value_size=3, gate_rank=3)


# Each direction compiles a chunkwise and a step gradient (10-20 s on a shared CPU): make
# test-all runs them; the fast set runs Mamba2's (the same engine, convolution windows included).
@pytest.mark.slow
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_chunked_equals_sequential_in_values_and_gradients(reverse):
    check_chunked_equals_sequential(CONV, D, reverse)


def test_decoding_after_a_chunkwise_prefill_equals_one_scan():
    check_decoding_after_prefill(CONV, D)  # its whole-sequence scan is the one compiled below


def numpy_gla(cell, p, xs):
    """fla's GatedLinearAttention forward on one sequence ``xs`` ``(T, D)``, in float64."""
    p = GLAParams(*(None if a is None else np.asarray(a, np.float64) for a in p))
    h, dk, dv = cell.heads, cell.key_size, cell.value_size
    xs = np.asarray(xs, np.float64)
    proj = xs @ p.w_in
    q, k, v, g = np.split(proj, np.cumsum([h * dk, h * dk, h * dv]), axis=-1)
    if cell.conv_width:  # ShortConvolution(activation="silu"), no bias, one per projection
        conv_q, conv_k, conv_v = np.split(p.conv, np.cumsum([h * dk, h * dk]), axis=-1)
        q, k, v = silu(causal_conv(q, conv_q)), silu(causal_conv(k, conv_k)), silu(causal_conv(v, conv_v))
    gk = -np.logaddexp(0, -(xs @ p.w_gate_a @ p.w_gate_b + p.b_gate)) / cell.gate_normalizer  # logsigmoid / 16
    q, k, gk = (a.reshape(len(xs), h, dk) for a in (q, k, gk))
    v, g = v.reshape(len(xs), h, dv), g.reshape(len(xs), h, dv)
    S, o = np.zeros((h, dk, dv)), []
    for t in range(len(xs)):
        S = np.exp(gk[t])[:, :, None] * S + k[t][:, :, None] * v[t][:, None, :]
        o.append(np.einsum("hk,hkv->hv", q[t] * dk**-0.5, S))
    o = np.stack(o)
    # FusedRMSNormGated: rmsnorm(o) * weight * swish(g), per head.
    normed = o / np.sqrt(np.mean(o**2, axis=-1, keepdims=True) + cell.norm_eps) * p.norm
    return (normed * silu(g)).reshape(len(xs), h * dv) @ p.w_out


@pytest.mark.parametrize("cell", [PLAIN, CONV], ids=["no-conv", "conv4"])
def test_layer_equals_the_published_equations(cell):
    params = perturbed(cell.init(jax.random.key(1), D), 6)
    xs = normal(7, (2, 6, D))
    ys, _ = rj.scan(cell, params, xs)
    expected = np.stack([numpy_gla(cell, params, x) for x in xs])
    np.testing.assert_allclose(np.asarray(ys), expected, atol=1e-5, rtol=1e-4)  # float32 rounding


def test_init_shapes_carry_and_defaults():
    params = CONV.init(jax.random.key(0), D)
    channels = 2 * (4 + 4 + 3)
    assert params.w_in.shape == (D, 2 * (4 + 4 + 3 + 3)) and params.conv.shape == (4, channels)
    assert params.w_gate_a.shape == (D, 3) and params.w_gate_b.shape == (3, 8) and params.w_out.shape == (6, D)
    assert np.all(np.asarray(params.b_gate) == 0) and np.all(np.asarray(params.norm) == 1)
    assert np.abs(np.asarray(params.conv)).max() <= 0.5  # U(-1/sqrt(4), 1/sqrt(4))
    assert PLAIN.init(jax.random.key(0), D).conv is None
    carry = CONV.init_carry((2,))
    assert isinstance(carry, MatrixCarry) and carry.conv.shape == (2, 3, channels) and carry.state.shape == (2, 2, 4, 3)
    assert PLAIN.init_carry((2,)).shape == (2, 2, 4, 3)
    default = rj.GLA(4, 8, 16)
    assert (default.conv_width, default.gate_rank, default.gate_normalizer, default.norm_eps) == (0, 16, 16.0, 1e-5)
    assert default.query_scale() == 8**-0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(heads=0), "heads must be a positive int"),
    (dict(conv_width=-1), "conv_width must be a non-negative int"),
    (dict(gate_normalizer=0.0), "gate_normalizer must be a positive"),
])
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rj.GLA(**{**dict(heads=2, key_size=4, value_size=3), **kwargs})


def test_step_refuses_params_of_another_shape():
    params = PLAIN.init(jax.random.key(0), D)
    with pytest.raises(ValueError, match=r"params.conv has shape None; expected \(4, 22\)"):
        CONV.step(params, CONV.init_carry(), jnp.ones(D))
