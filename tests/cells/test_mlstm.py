"""rj.MLSTM (xLSTM 7B's mLSTM layer): chunkwise against the step recurrence in values and
gradients, decoding after a prefill, the layer against a NumPy float64 transcription of the
published equations, the reference's initialisation, and extreme gates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.cells import MLSTMParams
from rnnjax.cells.matrix_state import MLSTMState
from tests.cases import normal
from tests.compat import enable_x64
from tests.helpers import assert_trees_close

D, HEADS, DQK, DV = 5, 2, 4, 3  # d_qk != d_v: a swapped head size cannot pass
CELL = rj.MLSTM(HEADS, DQK, DV)


def random_params(cell, seed, dtype=np.float32, gate_scale=1.0, gate_bias=None):
    """Params with every block random (the init zeroes the gate and output-gate weights)."""
    rng = np.random.default_rng(seed)
    h, dqk, dv = cell.heads, cell.qk_head_size, cell.v_head_size
    b = rng.normal(size=2 * h) if gate_bias is None else np.asarray(gate_bias, np.float64)
    return MLSTMParams(
        w=jnp.asarray(rng.normal(size=(D, h * (2 * dqk + 2 * dv))) * 0.7, dtype),
        w_gates=jnp.asarray(rng.normal(size=(D, 2 * h)) * gate_scale, dtype),
        b_gates=jnp.asarray(b, dtype),
        norm=jnp.asarray(1 + 0.3 * rng.normal(size=(h, dv)), dtype),
        w_out=jnp.asarray(rng.normal(size=(h * dv, D)) * 0.5, dtype),
    )


def random_state(batch, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return MLSTMState(
        jnp.asarray(rng.normal(size=(*batch, HEADS, DQK, DV)), dtype),
        jnp.asarray(rng.normal(size=(*batch, HEADS, DQK)), dtype),
        jnp.asarray(rng.normal(size=(*batch, HEADS)), dtype),
    )


# -- (a) chunkwise == step recurrence, values and gradients ---------------------------------


@functools.partial(jax.jit, static_argnames=("method", "reverse"))
def loss_and_grad(params, xs, carry, lengths, resets, method, reverse):
    def loss(params, xs, carry):
        ys, final = rj.scan(CELL, params, xs, carry, lengths=lengths, resets=resets, reverse=reverse, method=method)
        weights = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
        return jnp.sum(ys * weights) + sum(jnp.sum(jnp.sin(c)) for c in final), (ys, final)

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, xs, carry)


# Each method is a compilation of a scan's gradient (seconds on a CPU): the default chunked
# method forwards, rj.Chunked(4) (T = 11: a partial last chunk) in reverse.
# Slow: the op-level float64 comparison (tests/test_linear_attention.py) covers the recurrence in the fast set.
@pytest.mark.slow
@pytest.mark.parametrize("method, reverse", [(None, False), (rj.Chunked(4), True)], ids=["default", "chunk4-reverse"])
def test_chunked_equals_sequential_in_values_and_gradients(method, reverse):
    steps = 11
    with enable_x64(True):
        params = random_params(CELL, 0, np.float64)
        xs = normal(1, (2, steps, D), np.float64)
        carry = random_state((2,), 2, np.float64)
        lengths = jnp.asarray([steps, 7])
        # A reset inside each sequence; sequence 1's at t = 9 is past its length (ignored).
        resets = jnp.zeros((2, steps), bool).at[0, 3].set(True).at[1, 5].set(True).at[1, 9].set(True)
        got = loss_and_grad(params, xs, carry, lengths, resets, method, reverse)
        expected = loss_and_grad(params, xs, carry, lengths, resets, rj.Sequential(), reverse)
    ys = got[0][1][0]
    assert np.all(np.asarray(ys[1, 7:]) == 0)  # past the length
    # float64: the two orders of summation differ by rounding only (unit roundoff 1e-16).
    assert_trees_close(got, expected, atol=1e-10, rtol=1e-9)


# -- (b) decoding from a chunkwise prefill ---------------------------------------------------


def test_step_after_prefill_equals_one_scan():
    params = random_params(CELL, 4)
    xs = normal(5, (2, 9, D))
    prefill = 6
    ys_all, final_all = rj.scan(CELL, params, xs)
    ys, carry = rj.scan(CELL, params, xs[:, :prefill])
    step = jax.jit(CELL.step)
    decoded = []
    for t in range(prefill, xs.shape[1]):
        carry, y = step(params, carry, xs[:, t])
        decoded.append(y)
    # float32: the chunkwise sums and the step's differ by rounding, ~1e-7 of the outputs (|y| ~ 1).
    assert_trees_close(ys, ys_all[:, :prefill], atol=1e-5, rtol=1e-5)
    assert_trees_close(jnp.stack(decoded, axis=1), ys_all[:, prefill:], atol=1e-5, rtol=1e-5)
    assert_trees_close(carry, final_all, atol=1e-5, rtol=1e-5)


# -- (c) the published equations, transcribed in NumPy float64 -------------------------------


def reference_layer(params, xs, cap, head_norm, eps=1e-6, norm_eps=1e-6):
    """xLSTM 7B's mLSTMLayer (xlstm/xlstm_large/model.py) with mlstm_kernels' recurrent step,
    one sequence ``(T, D)`` from the zero state, NumPy float64."""
    p = [np.asarray(a, np.float64) for a in params]
    w, w_gates, b_gates, norm_w, w_out = p
    xs = np.asarray(xs, np.float64)
    qk, v_dim = HEADS * DQK, HEADS * DV
    W_q, W_k, W_v, W_o = w[:, :qk], w[:, qk : 2 * qk], w[:, 2 * qk : 2 * qk + v_dim], w[:, 2 * qk + v_dim :]
    soft = (lambda a: a) if cap is None else (lambda a: cap * np.tanh(a / cap))
    C, n, m = np.zeros((HEADS, DQK, DV)), np.zeros((HEADS, DQK)), np.zeros(HEADS)
    ys = []
    for x in xs:
        q, k, v = (x @ W_q).reshape(HEADS, DQK), (x @ W_k).reshape(HEADS, DQK), (x @ W_v).reshape(HEADS, DV)
        i_pre = soft(x @ w_gates[:, :HEADS] + b_gates[:HEADS])
        f_pre = soft(x @ w_gates[:, HEADS:] + b_gates[HEADS:])
        h = np.zeros((HEADS, DV))
        for j in range(HEADS):
            log_f = -np.logaddexp(0.0, -f_pre[j])
            m_new = max(log_f + m[j], i_pre[j])
            f_act, i_act = np.exp(log_f + m[j] - m_new), np.exp(i_pre[j] - m_new)
            C[j] = f_act * C[j] + i_act * np.outer(k[j], v[j])
            n[j] = f_act * n[j] + i_act * k[j]
            m[j] = m_new
            qs = q[j] * DQK**-0.5
            h[j] = qs @ C[j] / (max(abs(qs @ n[j]), np.exp(-m_new)) + eps)
        if head_norm == "layer":  # MultiHeadLayerNorm: biased variance, weight, no bias
            centred = h - h.mean(-1, keepdims=True)
            h_norm = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + norm_eps)
        else:
            h_norm = h / np.sqrt((h**2).mean(-1, keepdims=True) + norm_eps)
        out_gate = 1 / (1 + np.exp(-(x @ W_o)))
        ys.append((out_gate * (h_norm * norm_w).reshape(-1)) @ w_out)
    return np.stack(ys), (C, n, m)


@pytest.mark.parametrize(
    "cell", [CELL, rj.MLSTM(HEADS, DQK, DV, gate_soft_cap=2.0, head_norm="rms")], ids=["7b", "cap2_rms"]
)
def test_layer_matches_published_equations(cell):
    with enable_x64(True):
        params = random_params(cell, 6, np.float64, gate_scale=2.0)
        xs = normal(7, (5, D), np.float64)
        ys, final = rj.scan(cell, params, xs)
        ref_ys, ref_final = reference_layer(params, xs, cell.gate_soft_cap, cell.head_norm)
    assert ys.shape == (5, D)
    # float64 rounding only: 1e-10 is far below any difference in a gate, scale, eps or norm.
    np.testing.assert_allclose(np.asarray(ys), ref_ys, atol=1e-10, rtol=1e-10)
    # The state is stored scaled by exp(-m); its unscaled value is what the equations define.
    for got, ref in zip((final.C, final.n), ref_final[:2]):
        scale = np.exp(np.asarray(final.m) - ref_final[2]).reshape((HEADS,) + (1,) * (got.ndim - 1))
        np.testing.assert_allclose(np.asarray(got) * scale, ref, atol=1e-10, rtol=1e-10)


def test_init_follows_xlstm_7b():
    heads, dim = 4, 256
    cell = rj.MLSTM(heads, 32, 64)
    p = jax.jit(cell.init, static_argnums=1)(jax.random.key(0), dim)
    qkv, w_o = np.asarray(p.w[:, : heads * (64 + 64)]), np.asarray(p.w[:, heads * (64 + 64) :])
    # 256 * 512 draws: the sample std is within 1% of the target with overwhelming probability.
    np.testing.assert_allclose(qkv.std(), np.sqrt(2 / (5 * dim)), rtol=0.01)
    np.testing.assert_allclose(np.asarray(p.w_out).std(), 2 / np.sqrt(heads * 64), rtol=0.02)
    assert not w_o.any() and not np.asarray(p.w_gates).any()  # output gate 1/2, gates from the biases
    np.testing.assert_array_equal(np.asarray(p.b_gates[:heads]), -10.0)
    np.testing.assert_allclose(np.asarray(p.b_gates[heads:]), np.linspace(3.0, 6.0, heads), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(p.norm), 1.0)
    assert p.norm.shape == (heads, 64) and p.w_out.shape == (heads * 64, dim)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="head_norm"):
        rj.MLSTM(2, 4, 4, head_norm="group")
    with pytest.raises((TypeError, ValueError), match="qk_head_size"):
        rj.MLSTM(2, 0, 4)
    with pytest.raises((TypeError, ValueError), match="gate_soft_cap"):
        rj.MLSTM(2, 4, 4, gate_soft_cap=-1.0)


# -- (d) extreme gates -----------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cell", "method"))
def value_and_grads(cell, params, xs, method):
    def loss(params, xs):
        ys, final = rj.scan(cell, params, xs, method=method)
        return jnp.sum(ys**2) + sum(jnp.sum(c**2) for c in final), (ys, final)

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, xs)


@pytest.mark.slow  # the op's extreme gates (tests/test_linear_attention.py) run in the fast set
@pytest.mark.parametrize("i_bias, f_bias", [(30.0, 30.0), (-30.0, 30.0), (30.0, -30.0), (-30.0, -30.0)])
def test_extreme_gates_stay_finite(i_bias, f_bias):
    # No soft cap, so the pre-activations reach the recurrence: +-30 from the biases, spread by
    # about +-3 by the weights. exp(30) summed over 13 steps would overflow float32's
    # products without the stabiliser m.
    cell = rj.MLSTM(HEADS, DQK, DV, gate_soft_cap=None)
    params = random_params(cell, 8, gate_scale=0.5, gate_bias=[i_bias] * HEADS + [f_bias] * HEADS)
    xs = normal(9, (2, 13, D))
    pre = np.asarray(xs) @ np.asarray(params.w_gates) + np.asarray(params.b_gates)
    assert np.all(np.abs(pre) > 25)  # every gate saturated
    for method in (rj.Sequential(), rj.Chunked(4)):
        (value, (ys, final)), grads = value_and_grads(cell, params, xs, method)
        leaves = jax.tree.leaves((value, ys, final, grads))
        assert all(bool(jnp.isfinite(leaf).all()) for leaf in leaves), (i_bias, f_bias, method)
        if i_bias > 0:  # an open input gate writes: finite without being silenced
            assert float(jnp.abs(ys).max()) > 0.1
