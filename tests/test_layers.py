"""RNN, Bidirectional and Stack: each equals the composition of rj.scan calls it stands for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax as rj
from rnnjax.layers import BidirectionalParams
from tests.cases import normal
from tests.compat import enable_x64
from tests.helpers import assert_trees_close

XS = normal(1, (3, 7, 4))
LENGTHS = jnp.array([7, 4, 0])
F32 = dict(atol=1e-6, rtol=1e-5)  # float32 rounding


def test_rnn_delegates_to_scan():
    layer = rj.RNN(rj.GRU(5), reverse=True, method=rj.Sequential(remat="step"))
    params = layer.init(jax.random.key(0), 4)
    assert_trees_close(layer.apply(params, XS, lengths=LENGTHS),
                       rj.scan(layer.cell, params, XS, lengths=LENGTHS, reverse=True), **F32)
    assert layer.output_size(4) == 5


def test_bidirectional_is_forward_and_reverse_scans_merged():
    layer = rj.Bidirectional(rj.RNN(rj.LSTM(5)))
    assert layer.backward == rj.RNN(rj.LSTM(5), reverse=True)
    params = layer.init(jax.random.key(0), 4)
    assert isinstance(params, BidirectionalParams)
    ys, (cf, cb) = layer.apply(params, XS, lengths=LENGTHS)
    yf, rf = rj.scan(rj.LSTM(5), params.forward, XS, lengths=LENGTHS)
    yb, rb = rj.scan(rj.LSTM(5), params.backward, XS, lengths=LENGTHS, reverse=True)
    assert_trees_close(ys, jnp.concatenate([yf, yb], -1), **F32)
    assert_trees_close((cf, cb), (rf, rb), **F32)
    assert layer.output_size(4) == 10


def test_bidirectional_over_padded_data_equals_unpadded():
    layer = rj.Bidirectional(rj.RNN(rj.GRU(5)))
    params = layer.init(jax.random.key(0), 4)
    ys, carries = layer.apply(params, XS, lengths=LENGTHS)
    ref_ys, ref_carries = layer.apply(params, XS[1, :4])
    assert_trees_close(ys[1, :4], ref_ys, **F32)
    assert_trees_close(jax.tree.map(lambda c: c[1], carries), ref_carries, **F32)
    assert not np.any(np.asarray(ys[1, 4:]))


@pytest.mark.parametrize("merge, expect", [
    ("sum", lambda f, b: f + b), ("mean", lambda f, b: (f + b) / 2), ("mul", lambda f, b: f * b),
    (lambda f, b: f - b, lambda f, b: f - b),
])
def test_bidirectional_merges(merge, expect):
    layer = rj.Bidirectional(rj.RNN(rj.Elman(5)), merge=merge)
    params = layer.init(jax.random.key(0), 4)
    yf, _ = rj.scan(rj.Elman(5), params.forward, XS)
    yb, _ = rj.scan(rj.Elman(5), params.backward, XS, reverse=True)
    assert_trees_close(layer.apply(params, XS)[0], expect(yf, yb), **F32)


def test_stack_chains_layers_and_carries():
    layers = [rj.Bidirectional(rj.RNN(rj.GRU(5))), rj.RNN(rj.LSTM(6))]
    stack = rj.Stack(layers)
    params = stack.init(jax.random.key(0), 4)
    ys, carries = stack.apply(params, XS, lengths=LENGTHS)
    y0, c0 = layers[0].apply(params[0], XS, lengths=LENGTHS)
    y1, c1 = layers[1].apply(params[1], y0, lengths=LENGTHS)
    assert_trees_close(ys, y1, **F32)
    assert_trees_close(carries, (c0, c1), **F32)
    assert stack.output_size(4) == 6 and ys.shape == (3, 7, 6)
    # Handing the carries back continues the sequences (a forward-only stack).
    forward = rj.Stack([rj.RNN(rj.GRU(5)), rj.RNN(rj.LSTM(6))])
    params = forward.init(jax.random.key(0), 4)
    ys_a, carry_a = forward.apply(params, XS[:, :3])
    ys_b, carry_b = forward.apply(params, XS[:, 3:], carry=carry_a)
    ys_full, carry_full = forward.apply(params, XS)
    assert_trees_close(jnp.concatenate([ys_a, ys_b], axis=1), ys_full, atol=1e-5, rtol=1e-5)
    assert_trees_close(carry_b, carry_full, atol=1e-5, rtol=1e-5)


def test_stack_dropout_needs_a_key_and_keeps_padding_zero():
    stack = rj.Stack([rj.RNN(rj.GRU(8)), rj.RNN(rj.GRU(8))], dropout=0.5)
    plain = rj.Stack([rj.RNN(rj.GRU(8)), rj.RNN(rj.GRU(8))])
    params = stack.init(jax.random.key(0), 4)
    assert_trees_close(stack.apply(params, XS, lengths=LENGTHS), plain.apply(params, XS, lengths=LENGTHS), **F32)
    ys1, _ = stack.apply(params, XS, lengths=LENGTHS, key=jax.random.key(1))
    ys2, _ = stack.apply(params, XS, lengths=LENGTHS, key=jax.random.key(2))
    ys0, _ = plain.apply(params, XS, lengths=LENGTHS)
    assert not np.allclose(ys1, ys0) and not np.allclose(ys1, ys2)
    assert not np.any(np.asarray(ys1[1, 4:])) and not np.any(np.asarray(ys1[2]))
    # Dropout acts between layers only: the first layer's output is what is dropped.
    y0, _ = stack.layers[0].apply(params[0], XS, lengths=LENGTHS)
    k0, _ = jax.random.split(jax.random.key(1), 2)
    _, drop_key = jax.random.split(k0)
    keep = jax.random.bernoulli(drop_key, 0.5, y0.shape)
    y1, _ = stack.layers[1].apply(params[1], jnp.where(keep, y0 * 2, 0), lengths=LENGTHS)
    assert_trees_close(ys1, y1, **F32)


def test_stack_residual_adds_inputs_where_sizes_match():
    stack = rj.Stack([rj.RNN(rj.GRU(4)), rj.RNN(rj.GRU(6)), rj.RNN(rj.GRU(6))], residual=True)
    params = stack.init(jax.random.key(0), 4)
    ys, _ = stack.apply(params, XS, lengths=LENGTHS)
    y = XS
    for layer, p in zip(stack.layers, params):
        out, _ = layer.apply(p, y, lengths=LENGTHS)
        y = out + y if out.shape == y.shape else out
    mask = (jnp.arange(7) < LENGTHS[:, None])[..., None]
    assert_trees_close(ys, jnp.where(mask, y, 0), **F32)
    assert not np.any(np.asarray(ys[2]))


def test_layers_vmap_jit_and_gradients():
    stack = rj.Stack([rj.Bidirectional(rj.RNN(rj.GRU(3))), rj.RNN(rj.LSTM(3))])
    params = stack.init(jax.random.key(0), 4)
    f = jax.jit(lambda p, x, n: stack.apply(p, x, lengths=n))
    batched = f(params, XS, LENGTHS)
    single = jax.jit(jax.vmap(lambda x, n: stack.apply(params, x, lengths=n)))(XS, LENGTHS)
    assert_trees_close(single, batched, **F32)
    f(params, XS * 2, LENGTHS + 0)
    assert f._cache_size() == 1
    with enable_x64(True):
        p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        x64 = XS[:2, :3].astype(jnp.float64)
        loss = lambda p, x: jnp.sum(stack.apply(p, x, lengths=jnp.array([3, 2]))[0] ** 2)
        # Jitted: one compilation for check_grads' calls, instead of one per eager operation.
        check_grads(jax.jit(loss), (p64, x64), order=1, modes=["rev"], atol=1e-4, rtol=1e-4)


def test_layer_configs_are_hashable_static_values():
    a = rj.Stack([rj.Bidirectional(rj.RNN(rj.GRU(3))), rj.RNN(rj.LSTM(3))], dropout=0.1)
    b = rj.Stack((rj.Bidirectional(rj.RNN(rj.GRU(3))), rj.RNN(rj.LSTM(3))), dropout=0.1)
    assert a == b and hash(a) == hash(b)


def test_bad_layer_input_is_rejected():
    with pytest.raises(TypeError, match=r"wrap it as rj.RNN"):
        rj.Stack([rj.GRU(3)])
    with pytest.raises(TypeError, match="RNN expects an rnnjax cell"):
        rj.RNN(object())
    with pytest.raises(ValueError, match="dropout must be in"):
        rj.Stack([rj.RNN(rj.GRU(3))], dropout=1.0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got '0.5'"):
        rj.Stack([rj.RNN(rj.GRU(3))], dropout="0.5")
    with pytest.raises(TypeError, match=r"unroll= is now method=rj.Sequential\(unroll=...\)"):
        rj.RNN(rj.GRU(3), unroll=0)
    with pytest.raises(TypeError, match=r"rj.RNN got unexpected keyword arguments \['speed'\]"):
        rj.RNN(rj.GRU(3), speed=1)
    with pytest.raises(TypeError, match="reverse must be a bool, got 'yes'"):
        rj.RNN(rj.GRU(3), reverse="yes")
    with pytest.raises(ValueError, match="unknown merge 'avg'"):
        rj.Bidirectional(rj.RNN(rj.GRU(3)), merge="avg")
    with pytest.raises(ValueError, match="needs equal output sizes"):
        rj.Bidirectional(rj.RNN(rj.GRU(3)), rj.RNN(rj.GRU(4), reverse=True), merge="sum").output_size(2)
    with pytest.raises(ValueError, match="merge='sum' needs equal output sizes, got forward 3 and backward 4"):
        rj.Bidirectional(rj.RNN(rj.GRU(3)), rj.RNN(rj.GRU(4), reverse=True), merge="sum").init(jax.random.key(0), 2)
    stack = rj.Stack([rj.RNN(rj.GRU(3)), rj.RNN(rj.GRU(3))])
    params = stack.init(jax.random.key(0), 4)
    with pytest.raises(TypeError, match="params must be a tuple of 2"):
        stack.apply(params[:1], XS)
    with pytest.raises(ValueError, match="carry of a Stack must be a tuple of 2"):
        stack.apply(params, XS, carry=jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"xs has shape \(3, 7, 5\); expected \(\.\.\., T, 4\)"):
        stack.apply(params, jnp.ones((3, 7, 5)))
    bi = rj.Bidirectional(rj.RNN(rj.GRU(3)))
    with pytest.raises(TypeError, match="expected BidirectionalParams"):
        bi.apply(params[0], XS)
