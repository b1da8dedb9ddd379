"""rnnjax.equinox: the modules hold the core's params and delegate every computation to the core."""

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rnnjax as rj
from rnnjax.equinox import Recurrent, StepCell
from tests.flax_cases import LENGTHS, RESETS, XS, D
from tests.helpers import assert_trees_close

EXACT = dict(atol=0.0, rtol=0)

CASES = {
    "elman_cell": rj.Elman(4),  # a cell directly: wrapped as rj.RNN(cell)
    "lstm_proj_reverse": rj.RNN(rj.LSTM(4, proj_size=2), reverse=True),
    "bigru": rj.Bidirectional(rj.RNN(rj.GRU(4))),
    "stack": rj.Stack([rj.RNN(rj.GRU(4)), rj.RNN(rj.LSTM(4))], residual=True),
    "gla": rj.GLA(heads=2, key_size=8, value_size=8),  # matrix state (*batch, heads, 8, 8), rj.Chunked()
}


def as_core(layer):
    return rj.RNN(layer) if isinstance(layer, rj.Cell) else layer


# One compiled program per (model structure, option set), shared by the tests below.
@eqx.filter_jit
def run(model, xs, lengths=None, resets=None, carry=None):
    return model(xs, lengths=lengths, resets=resets, carry=carry, return_carry=True)


@partial(jax.jit, static_argnums=0)
def run_core(layer, params, xs, lengths, resets):
    return layer.apply(params, xs, lengths=lengths, resets=resets)


@pytest.mark.parametrize("name", CASES)
def test_module_equals_core(name):
    layer, core = CASES[name], as_core(CASES[name])
    key = jax.random.key(0)
    model = Recurrent(layer, D, key=key)
    params = core.init(key, D)
    assert model.layer == core and model.input_size == D and model.output_size == core.output_size(D)
    assert_trees_close(model.params, params, check_dtypes=True, **EXACT)  # the core's init, the same key
    # The params are the only array leaves: what eqx.filter keeps, and what optax sees.
    arrays = eqx.filter(model, eqx.is_array)
    assert jax.tree.structure(arrays.params) == jax.tree.structure(params)
    assert len(jax.tree.leaves(arrays)) == len(jax.tree.leaves(params))

    ys, carry = core.apply(params, XS, lengths=LENGTHS, resets=RESETS)
    assert_trees_close(model(XS, lengths=LENGTHS, resets=RESETS, return_carry=True), (ys, carry), **EXACT)
    ys2, _ = core.apply(params, XS, carry=carry)  # a given carry is passed on
    assert_trees_close(model(XS, carry=carry), ys2, **EXACT)
    if name == "bigru":  # jitted: the same program as the core's under jax.jit
        jitted = run_core(core, params, XS, LENGTHS, RESETS)
        assert_trees_close(run(model, XS, LENGTHS, RESETS), jitted, **EXACT)


@pytest.mark.parametrize("name", ["bigru", "gla"])
def test_unbatched_under_vmap_equals_the_batched_call(name):
    model = Recurrent(CASES[name], D, key=jax.random.key(1))
    expected = run(model, XS, LENGTHS, RESETS)
    one = run(model, XS[0], LENGTHS[0], RESETS[0])  # a single sequence (T, D), lengths ()
    assert one[0].shape == (6, model.output_size)
    assert_trees_close(one, jax.tree.map(lambda a: a[0], expected), atol=1e-6, rtol=1e-5)
    if name == "bigru":  # the module as an argument, or closed over
        vmapped = eqx.filter_vmap(run, in_axes=(None, 0, 0, 0))(model, XS, LENGTHS, RESETS)
    else:
        vmapped = jax.vmap(lambda x, n, r: run(model, x, n, r))(XS, LENGTHS, RESETS)
    assert_trees_close(vmapped, expected, atol=1e-6, rtol=1e-5)


def test_step_cell_equals_cell_step():
    cell = rj.LSTM(4, peephole=True)
    model = StepCell(cell, D, key=jax.random.key(2))
    assert_trees_close(model.params, cell.init(jax.random.key(2), D), **EXACT)
    assert model.cell == cell and model.output_size == 4
    carry = jax.tree.map(lambda c: c + 0.5, model.init_carry((2,)))
    assert_trees_close(model(carry, XS[:, 0]), cell.step(model.params, carry, XS[:, 0]), **EXACT)
    # Over time with jax.lax.scan (time-major) it is rj.scan's sequential loop.
    _, ys = jax.lax.scan(lambda c, x: model(c, x), model.init_carry((2,)), jnp.swapaxes(XS, 0, 1))
    assert_trees_close(jnp.swapaxes(ys, 0, 1), rj.scan(cell, model.params, XS)[0], atol=1e-6, rtol=1e-5)
    unbatched = model(model.init_carry(), XS[1, 0])
    assert_trees_close(unbatched, cell.step(model.params, cell.init_carry(()), XS[1, 0]), **EXACT)


def test_stack_dropout_needs_a_key_unless_inference():
    layer = rj.Stack([rj.RNN(rj.GRU(4)), rj.RNN(rj.GRU(4))], dropout=0.3)
    model = Recurrent(layer, D, key=jax.random.key(0))
    clean, _ = layer.apply(model.params, XS)
    key = jax.random.key(7)
    dropped = model(XS, key=key)
    assert_trees_close(dropped, layer.apply(model.params, XS, key=key)[0], **EXACT)
    assert not np.allclose(dropped, clean)
    with pytest.raises(ValueError, match="has dropout: pass key=... \\(training\\) or inference=True"):
        model(XS)
    assert_trees_close(model(XS, key=key, inference=True), clean, **EXACT)
    evaluating = eqx.nn.inference_mode(model)  # Equinox's switch sets the field
    assert evaluating.inference and not model.inference
    assert_trees_close(evaluating(XS), clean, **EXACT)
    assert_trees_close(evaluating(XS, key=key, inference=False), dropped, **EXACT)
    # Layers without dropout ignore key and inference.
    gru = Recurrent(rj.GRU(4), D, key=jax.random.key(0))
    assert_trees_close(gru(XS, key=key), gru(XS, inference=True), **EXACT)


def test_one_optax_step_through_filter_value_and_grad_equals_the_core_gradient():
    layer = rj.RNN(rj.GRU(4))
    model = Recurrent(layer, D, key=jax.random.key(3))
    targets = jnp.cos(XS).sum(-1, keepdims=True)

    def core_loss(params):
        ys, _ = layer.apply(params, XS, lengths=LENGTHS)
        return jnp.mean((ys.sum(-1, keepdims=True) - targets) ** 2)

    def loss(model):
        return jnp.mean((model(XS, lengths=LENGTHS).sum(-1, keepdims=True) - targets) ** 2)

    tx = optax.adam(1e-2)
    traces = []

    @eqx.filter_jit
    def step(model, opt_state):
        traces.append(None)  # runs when the step is traced, not when it runs
        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, value, grads

    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    new, opt_state, value, grads = step(model, opt_state)
    expected_value, expected_grads = jax.jit(jax.value_and_grad(core_loss))(model.params)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    assert_trees_close(grads.params, expected_grads, atol=1e-7, rtol=1e-5)
    updates, _ = tx.update(expected_grads, tx.init(model.params), model.params)
    assert_trees_close(new.params, optax.apply_updates(model.params, updates), atol=1e-7, rtol=1e-5)
    assert not np.allclose(new.params.w_x, model.params.w_x)
    assert new.layer == model.layer and type(new.params) is type(model.params)
    step(new, opt_state)  # new weights, the same structure: no second trace
    assert len(traces) == 1


def test_given_params_and_an_ensemble():
    layer = rj.Bidirectional(rj.RNN(rj.GRU(4)))
    params = layer.init(jax.random.key(4), D)  # e.g. weights from rj.interop.from_torch
    model = Recurrent(layer, D, params=params)
    assert_trees_close(model.params, params, **EXACT)
    replaced = eqx.tree_at(lambda m: m.params, model, layer.init(jax.random.key(5), D))
    assert not np.allclose(replaced(XS), model(XS))
    # An ensemble: one module per key, params with a leading member axis.
    ensemble = eqx.filter_vmap(lambda k: Recurrent(rj.Elman(4), D, key=k))(jax.random.split(jax.random.key(0), 2))
    assert ensemble.params.w_x.shape == (2, D, 4)
    ys = eqx.filter_vmap(lambda m: m(XS, lengths=LENGTHS))(ensemble)
    for i in range(2):
        member = jax.tree.map(lambda a, i=i: a[i], ensemble.params)
        np.testing.assert_allclose(ys[i], rj.scan(rj.Elman(4), member, XS, lengths=LENGTHS)[0], atol=1e-6, rtol=1e-5)
    assert not np.allclose(ys[0], ys[1])


def test_bad_input():
    with pytest.raises(TypeError, match="Recurrent.layer is an Equinox module \\(GRUCell\\)"):
        Recurrent(eqx.nn.GRUCell(3, 4, key=jax.random.key(0)), D, key=jax.random.key(0))
    with pytest.raises(TypeError, match="Recurrent.layer must be an rnnjax cell"):
        Recurrent(rj.LSTM, D, key=jax.random.key(0))
    with pytest.raises(TypeError, match="StepCell takes the cell itself"):
        StepCell(rj.RNN(rj.GRU(4)), D, key=jax.random.key(0))
    with pytest.raises(ValueError, match="input_size must be a positive int, got 3.5"):
        Recurrent(rj.GRU(4), 3.5, key=jax.random.key(0))  # not silently 3
    with pytest.raises(ValueError, match="exactly one of key= .* and params="):
        Recurrent(rj.GRU(4), D)
    model = Recurrent(rj.GRU(4), D, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"xs has shape \(6, 5\); expected \(\.\.\., T, 3\) for input_size=3 of GRU"):
        model(jnp.ones((6, 5)))
    with pytest.raises(ValueError, match=r"x has shape \(5,\); expected \(\.\.\., 3\) for input_size=3 of GRU"):
        StepCell(rj.GRU(4), D, key=jax.random.key(0))(jnp.zeros(4), jnp.ones(5))
    with pytest.raises(ValueError, match=r"params leaf \.w_x has shape \(5, 12\); expected \(3, 12\) for input_size=3"):
        Recurrent(rj.GRU(4), D, params=rj.GRU(4).init(jax.random.key(0), 5))
    with pytest.raises(ValueError, match="params have structure"):
        Recurrent(rj.GRU(4), D, params=rj.LSTM(4).init(jax.random.key(0), D))
