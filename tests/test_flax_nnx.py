"""rnnjax.flax.nnx: the module holds nnx.Params and delegates every computation to the core."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization
from jax.sharding import PartitionSpec as P

import rnnjax as rj
from rnnjax.flax import nnx as rjn
from tests.flax_cases import CASES, EXPECTED_PARAMS, LENGTHS, RESETS, XS, D
from tests.helpers import assert_trees_close

EXACT = dict(atol=0.0, rtol=0)


def as_core(layer):
    return rj.RNN(layer) if isinstance(layer, rj.Cell) else layer


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def pure(state):
    if hasattr(nnx, "to_pure_dict"):  # flax >= 0.11; the State method before
        return nnx.to_pure_dict(state)
    return state.to_pure_dict()


@nnx.jit(static_argnames="return_carry")
def run(model, xs, lengths=None, resets=None, carry=None, return_carry=False):
    return model(xs, lengths, resets, carry, return_carry=return_carry, deterministic=True)


@pytest.mark.parametrize("name", CASES)
def test_module_equals_core(name):
    layer, core = CASES[name], as_core(CASES[name])
    key = jax.random.key(0)
    model = rjn.Recurrent(layer, D, rngs=nnx.Rngs(params=key), deterministic=True)
    assert shapes(pure(nnx.state(model, nnx.Param))) == EXPECTED_PARAMS[name]
    params = model.core_params()
    # Init is the core's, from the one key rngs.params() gives.
    assert_trees_close(params, core.init(nnx.Rngs(params=key).params(), D), **EXACT)
    assert_trees_close(rjn.to_core_params(layer, nnx.state(model, nnx.Param)), params, **EXACT)

    ys, carry = core.apply(params, XS, lengths=LENGTHS, resets=RESETS)
    got = model(XS, lengths=LENGTHS, resets=RESETS, return_carry=True)
    assert_trees_close(got, (ys, carry), **EXACT)  # eager: the very same operations
    assert_trees_close(run(model, XS, LENGTHS, RESETS, return_carry=True), (ys, carry), atol=1e-6, rtol=0)
    ys2, _ = core.apply(params, XS, carry=carry)  # a given carry is passed on
    assert_trees_close(model(XS, carry=carry), ys2, **EXACT)


def test_stack_dropout_streams():
    layer = CASES["stack_dropout"]
    model = rjn.Recurrent(layer, D, rngs=nnx.Rngs(0))
    params = model.core_params()
    clean, _ = layer.apply(params, XS)
    key = jax.random.key(7)
    assert_trees_close(model(XS, rngs=key), layer.apply(params, XS, key=key)[0], **EXACT)
    assert_trees_close(model(XS, rngs=nnx.Rngs(dropout=key)),
                       layer.apply(params, XS, key=nnx.Rngs(dropout=key).dropout())[0], **EXACT)
    # Training mode by default (as nnx.Dropout): the kept stream advances between calls.
    first, second = model(XS), model(XS)
    assert not np.allclose(first, clean) and not np.allclose(first, second)
    model.eval()
    assert_trees_close(model(XS), clean, **EXACT)
    assert_trees_close(model(XS, deterministic=False, rngs=key), layer.apply(params, XS, key=key)[0], **EXACT)
    # Without a dropout or default stream the call must bring one.
    no_stream = rjn.Recurrent(layer, D, rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="has dropout and no random stream"):
        no_stream(XS)
    assert_trees_close(no_stream(XS, rngs=key), layer.apply(no_stream.core_params(), XS, key=key)[0], **EXACT)


def test_train_in_a_larger_model_with_optax():
    class Tagger(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(7, 3, rngs=rngs)
            self.rnn = rjn.Recurrent(rj.Stack([rj.RNN(rj.GRU(6)), rj.RNN(rj.GRU(6))], dropout=0.1), 3, rngs=rngs)
            self.out = nnx.Linear(6, 7, rngs=rngs)

        def __call__(self, tokens, lengths):
            return self.out(self.rnn(self.embed(tokens), lengths))

    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 7, (3, 8)), jnp.int32)
    lengths = jnp.array([8, 5, 7])
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.arange(8) < lengths[:, None] - 1
    model = Tagger(nnx.Rngs(0))
    assert set(pure(nnx.state(model, nnx.Param))["rnn"]) == {"layers_0", "layers_1"}
    assert "rngs" in pure(nnx.state(model))["rnn"]  # the dropout stream is state, not a parameter

    def loss_fn(model):
        losses = optax.softmax_cross_entropy_with_integer_labels(model(tokens, lengths), targets)
        return jnp.sum(losses * mask) / mask.sum()

    tx = optax.adam(0.05)

    @nnx.jit
    def step(model, opt_state):
        loss, grads = nnx.value_and_grad(loss_fn)(model)  # with dropout: training mode
        params = nnx.state(model, nnx.Param)
        updates, opt_state = tx.update(grads, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        return loss, opt_state

    opt_state = tx.init(nnx.state(model, nnx.Param))
    losses = []
    for _ in range(10):
        loss, opt_state = step(model, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_nnx_vmap_ensemble():
    cell = rj.LSTM(4)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return rjn.Recurrent(cell, D, rngs=rngs)

    @nnx.vmap(in_axes=(0, None, None), out_axes=0)
    def forward(model, xs, lengths):
        return model(xs, lengths)

    ensemble = create(nnx.Rngs(0))
    params = pure(nnx.state(ensemble, nnx.Param))
    assert shapes(params) == {"w_x": (3, 3, 16), "w_h": (3, 4, 16), "b": (3, 16)}
    ys = forward(ensemble, XS, LENGTHS)
    assert ys.shape == (3, 2, 6, 4)
    for i in range(3):
        member = rjn.to_core_params(cell, jax.tree.map(lambda a, i=i: a[i], params))
        expected, _ = rj.scan(cell, member, XS, lengths=LENGTHS)
        np.testing.assert_allclose(ys[i], expected, atol=1e-6, rtol=0)
    assert not np.allclose(ys[0], ys[1])  # members were initialised from different keys


def test_core_params_round_trip_and_load():
    layer = CASES["bigru"]
    model = rjn.Recurrent(layer, D, rngs=nnx.Rngs(0))
    params = layer.init(jax.random.key(4), D)  # e.g. weights from rj.interop.from_torch
    tree = rjn.from_core_params(layer, params)
    assert_trees_close(rjn.to_core_params(layer, tree), params, **EXACT)
    model.load_core_params(params)
    assert_trees_close(model.core_params(), params, **EXACT)
    assert_trees_close(pure(nnx.state(model, nnx.Param)), tree, **EXACT)
    assert_trees_close(model(XS, lengths=LENGTHS), layer.apply(params, XS, lengths=LENGTHS)[0], **EXACT)
    other = rjn.Recurrent(layer, D, rngs=nnx.Rngs(1))
    nnx.update(other, nnx.State(tree))  # the pure dict loads through nnx too
    assert_trees_close(other.core_params(), params, **EXACT)
    with pytest.raises(ValueError, match=r"'forward/w_x' has shape \(5, 12\); expected \(3, 12\)"):
        model.load_core_params(layer.init(jax.random.key(0), 5))
    with pytest.raises(ValueError, match="params have structure"):
        model.load_core_params(rj.RNN(rj.GRU(4)).init(jax.random.key(0), D))


def test_split_merge_and_serialization_round_trip():
    model = rjn.Recurrent(CASES["lru"], D, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    assert_trees_close(merged(XS), model(XS), **EXACT)
    # The functional API under plain jax.jit.
    ys, h = jax.jit(lambda state, xs: nnx.merge(graphdef, state)(xs, return_carry=True))(state, XS)
    assert_trees_close((ys, h), rj.scan(CASES["lru"], model.core_params(), XS), atol=1e-6, rtol=0)
    data = serialization.to_bytes(pure(nnx.state(model)))
    other = rjn.Recurrent(CASES["lru"], D, rngs=nnx.Rngs(1))
    target = nnx.state(other)
    restored = serialization.from_bytes(pure(target), data)
    nnx.replace_by_pure_dict(target, restored)
    nnx.update(other, target)
    assert_trees_close(other.core_params(), model.core_params(), **EXACT)
    assert_trees_close(other(XS), model(XS), **EXACT)


def test_partitioning_metadata():
    layer = CASES["bigru"]
    spec = {"w_x": (None, "model"), "backward/w_h": ("model", None)}
    mesh = jax.make_mesh((1,), ("model",))
    # Flax >= 0.12 shards annotated variables when they are created, inside a mesh.
    with jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else contextlib.nullcontext():
        model = rjn.Recurrent(layer, D, rngs=nnx.Rngs(0), param_partitioning=spec)
    specs = pure(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    assert specs["forward"]["w_x"] == P(None, "model") and specs["backward"]["w_x"] == P(None, "model")
    assert specs["backward"]["w_h"] == P("model", None) and specs["forward"]["w_h"] == P()
    plain = rjn.Recurrent(layer, D, rngs=nnx.Rngs(0))
    assert_trees_close(model.core_params(), plain.core_params(), **EXACT)
    model.load_core_params(layer.init(jax.random.key(1), D))  # loading keeps the metadata
    assert pure(nnx.get_partition_spec(nnx.state(model, nnx.Param)))["forward"]["w_x"] == P(None, "model")
    with pytest.raises(ValueError, match=r"\('model',\) for 'forward/w_x' of shape \(3, 12\); expected 2 axis names"):
        rjn.Recurrent(layer, D, rngs=nnx.Rngs(0), param_partitioning={"w_x": ("model",)})


def test_bad_input():
    with pytest.raises(TypeError, match="Recurrent.layer is a Flax module"):
        rjn.Recurrent(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), D, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="Recurrent.layer must be an rnnjax cell"):
        rjn.Recurrent(rj.LSTM, D, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_size must be a positive int, got 3.5"):
        rjn.Recurrent(rj.GRU(4), 3.5, rngs=nnx.Rngs(0))  # not silently 3
    model = rjn.Recurrent(rj.GRU(4), D, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"xs has shape \(2, 6, 5\); expected \(\.\.\., T, 3\) for input_size=3 of GRU"):
        model(jnp.ones((2, 6, 5)))
    with pytest.raises(ValueError, match=r"missing \['w_h'\], unexpected \['w_hh'\]"):
        tree = pure(nnx.state(model, nnx.Param))
        tree["w_hh"] = tree.pop("w_h")
        rjn.to_core_params(rj.GRU(4), tree)
