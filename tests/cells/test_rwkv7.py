"""rj.RWKV7 (RWKV-7's time mix): the layer against a NumPy float64 transcription of the official
RWKV-LM v7 time mix and its one-token state update (with deliberate wiring faults that the
comparison catches), chunkwise against the step recurrence in values and gradients, decoding
after a prefill, fla's initialisation, bad configurations."""

import math

import jax
import numpy as np
import pytest

import rnnjax as rj
from tests.cases import normal
from tests.cells.matrix_state_checks import check_chunked_equals_sequential, check_decoding_after_prefill
from tests.compat import enable_x64

D = 5
# d_k != d_v and the three ranks differ: a swapped head, key/value axis or factor cannot pass.
CELL = rj.RWKV7(hidden_size=D, heads=2, head_size=4, value_size=3, decay_rank=3, a_rank=2, gate_rank=4)


def random_params(cell, seed, scale=0.6):
    """float64 params of ``cell.init``'s structure and shapes, every leaf standard normal times
    ``scale`` (the init's zero projections and constant vectors would hide wiring faults); no
    init is compiled (``jax.eval_shape`` only traces it)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: cell.init(jax.random.key(0), cell.hidden_size))
    return jax.tree.map(lambda s: scale * rng.standard_normal(s.shape), shapes)


def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def numpy_rwkv7(cell, p, xs, fault=None):
    """The official ``RWKV_Tmix_x070.forward`` (``RWKV-v7/rwkv_v7_demo.py``, first layer) on one
    sequence ``xs`` ``(T, C)`` in float64, its WKV by the one-token update of
    ``rwkv_v7_demo_rnn.py`` (state ``(H, N_v, N_k)``). ``fault`` wires one piece wrongly."""
    p = {name: np.asarray(a, np.float64) for name, a in p._asdict().items()}
    xs = np.asarray(xs, np.float64)
    (T, C), H, N, V = xs.shape, cell.heads, cell.head_size, cell.d_v
    shift = 2 if fault == "shift_by_two" else 1
    prev = np.concatenate([np.zeros((shift, C)), xs[:-shift]])  # time_shift = ZeroPad2d((0, 0, 1, -1))
    xx = prev - xs
    xr, xw, xk, xv, xa, xg = (xs + xx * p["mix"][i] for i in range(6))
    W_r, W_k, W_v = np.split(p["w_in"], [H * N, 2 * H * N], axis=-1)
    r, k, v = xr @ W_r, xk @ W_k, xv @ W_v
    w = -np.logaddexp(0, -(p["b_decay"] + np.tanh(xw @ p["w_decay_a"]) @ p["w_decay_b"])) - 0.5  # -softplus(-.) - 0.5
    a = sigmoid(p["b_rate"] + (xa @ p["w_rate_a"]) @ p["w_rate_b"])
    g = sigmoid(xg @ p["w_gate_a"]) @ p["w_gate_b"]
    kk = (k * p["k_k"]).reshape(T, H, N)
    if fault != "kk_not_normalised":  # F.normalize(dim=-1, p=2.0)
        kk = kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)
    kk = kk.reshape(T, H * N)
    if fault != "k_not_updated":
        k = k * (1 + (a - 1) * p["k_a"])
    state, out = np.zeros((H, V, N)), []
    for t in range(T):
        decay = np.exp(-np.exp(w[t])).reshape(H, 1, N)
        vk = v[t].reshape(H, V, 1) @ k[t].reshape(H, 1, N)
        ab = (-kk[t]).reshape(H, N, 1) @ (kk[t] * a[t]).reshape(H, 1, N)
        if fault == "a_b_swapped":
            ab = np.swapaxes(ab, -1, -2)
        state = state * decay + state @ ab + vk
        out.append((state @ r[t].reshape(H, N, 1)).reshape(H, V))
    o = np.stack(out)
    # ln_x = GroupNorm(H, H * V): each head's V channels, biased variance, weight and bias.
    centred = o - o.mean(-1, keepdims=True)
    o = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + cell.norm_eps)
    o = o * p["norm"].reshape(H, V) + p["norm_bias"].reshape(H, V)
    bonus = (r.reshape(T, H, N) * k.reshape(T, H, N) * p["r_k"]).sum(-1, keepdims=True) * v.reshape(T, H, V)
    return ((o + bonus).reshape(T, H * V) * g) @ p["w_out"], state


FAULTS = ("shift_by_two", "kk_not_normalised", "k_not_updated", "a_b_swapped")


def test_layer_equals_the_published_equations():
    params = random_params(CELL, 6)
    with enable_x64(True):
        xs = normal(7, (2, 6, D), np.float64)
        ys, carry = rj.scan(CELL, params, xs, method=rj.Sequential())
    expected = [numpy_rwkv7(CELL, params, x) for x in xs]
    # float64: the two differ by rounding only.
    np.testing.assert_allclose(np.asarray(ys), np.stack([y for y, _ in expected]), atol=1e-10, rtol=1e-9)
    # rnnjax's state (d_k, d_v) is the reference's (N_v, N_k) transposed; the window holds x_{T-1}.
    ref_state = np.stack([s for _, s in expected])
    np.testing.assert_allclose(np.asarray(carry.state), np.swapaxes(ref_state, -1, -2), atol=1e-10, rtol=1e-9)
    np.testing.assert_array_equal(np.asarray(carry.conv), np.asarray(xs)[:, -1:])
    for fault in FAULTS:  # each fault moves the outputs far beyond the tolerance above
        wrong = np.stack([numpy_rwkv7(CELL, params, x, fault)[0] for x in xs])
        assert np.abs(wrong - np.asarray(ys)).max() > 1e-3, fault


# Each direction compiles a chunkwise and a step gradient (10-20 s on a shared CPU): make test-all.
@pytest.mark.slow
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_chunked_equals_sequential_in_values_and_gradients(reverse):
    check_chunked_equals_sequential(CELL, D, reverse)


# 11-15 s (a chunkwise delta/DPLR scan compiled twice): make test-all; the fast set scans the cells
# chunkwise against the step loop in tests/test_cells.py.
@pytest.mark.slow
def test_decoding_after_a_chunkwise_prefill_equals_one_scan():
    check_decoding_after_prefill(CELL, D)


@pytest.mark.slow  # a gradient's compilation (about 5 s); the forward Chunked == Sequential check also catches it
def test_gradients_are_finite_where_the_input_and_the_previous_one_are_zero():
    # k = 0 there, so the removal key k * k_k normalises a zero vector: its norm's derivative is 0/0.
    params = random_params(CELL, 3)
    xs = np.zeros((4, D), np.float32)
    xs[0] = 1.0

    def loss(params):
        ys, carry = rj.scan(CELL, params, xs, method=rj.Sequential())
        return (ys**2).sum() + (carry.state**2).sum()

    grads = jax.jit(jax.grad(loss))(jax.tree.map(lambda a: np.asarray(a, np.float32), params))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def numpy_fla_init(cell, layer, layers):
    """fla's ``RWKV7Attention._initialize_weights`` vectors, its loop over channels transcribed
    (``hidden_size`` = the key width, as in fla)."""
    C, hd = cell.hidden_size, cell.head_size
    r0, r1 = layer / (layers - 1), 1.0 - layer / layers
    ddd, www, zigzag, linear = (np.zeros(C) for _ in range(4))
    for n in range(C):
        linear[n] = n / (C - 1) - 0.5
        zigzag[n] = ((n % hd) - ((hd - 1) / 2)) / ((hd - 1) / 2)
        zigzag[n] = zigzag[n] * abs(zigzag[n])
        www[n] = -6 + 6 * (n / (C - 1)) ** (1 + 1 * r0**0.3)
        ddd[n] = n / C
    mix = np.stack([1.0 - ddd ** (e * r1) for e in (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)])
    return dict(
        mix=mix,
        b_decay=www + 0.5 + zigzag * 2.5,
        b_rate=-0.19 + zigzag * 0.3 + linear * 0.4,
        k_k=0.71 - linear * 0.1,
        norm=np.full(C, ((layer + 1) / layers) ** 0.7),
    )


def test_the_reference_initialisation():
    cell = rj.RWKV7(hidden_size=8, heads=2, head_size=4, layer=1, layers=3)  # key width = hidden_size, as fla
    params = jax.jit(cell.init, static_argnums=1)(jax.random.key(0), 8)
    for name, value in numpy_fla_init(cell, 1, 3).items():
        np.testing.assert_allclose(np.asarray(getattr(params, name)), value, rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(np.asarray(params.k_a), np.float32(1.02))
    np.testing.assert_array_equal(np.asarray(params.r_k), np.float32(-0.04))
    assert not np.asarray(params.w_out).any() and not np.asarray(params.norm_bias).any()
    for first in (params.w_decay_a, params.w_rate_a, params.w_gate_a):  # LoRA first factors zero
        assert first.shape[1] == 32 and not np.asarray(first).any()  # fla's default ranks: 32 at this width
    # Orthogonal second factors (rank 32 > out 8): gain 0.1 * sqrt(32 / 8); rows orthogonal.
    wb = np.asarray(params.w_decay_b)
    np.testing.assert_allclose(wb.T @ wb, (0.1 * math.sqrt(32 / 8)) ** 2 * np.eye(8), atol=1e-5)
    w_r, w_k = np.asarray(params.w_in[:, :8]), np.asarray(params.w_in[:, 8:16])
    np.testing.assert_allclose(w_r.T @ w_r, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(w_k.T @ w_k, 0.01 * np.eye(8), atol=1e-6)
    carry = cell.init_carry((3,))
    assert carry.conv.shape == (3, 1, 8) and carry.state.shape == (3, 2, 4, 4)
    assert cell.query_scale() == 1.0 and cell.conv_width == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(heads=0), "heads must be a positive int"),
    (dict(value_size=0), "value_size must be a positive int"),
    (dict(layer=2, layers=2), r"layer=2 must be an int in \[0, layers=2\)"),
    (dict(norm_eps=-1.0), "norm_eps must be a positive"),
])
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rj.RWKV7(**{**dict(hidden_size=8, heads=2, head_size=4), **kwargs})


def test_input_size_must_be_the_hidden_size():
    with pytest.raises(ValueError, match=r"input_size=6; expected hidden_size=5"):
        CELL.init(jax.random.key(0), 6)
