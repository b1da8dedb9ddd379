"""rnnjax.flax.linen: the modules hold Flax params and delegate every computation to the core."""

import subprocess
import sys
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization
from jax.sharding import PartitionSpec as P

import rnnjax as rj
from rnnjax.flax import linen as rjl
from tests.flax_cases import CASES, EXPECTED_PARAMS, LENGTHS, RESETS, XS, D
from tests.helpers import assert_trees_close

EXACT = dict(atol=0.0, rtol=0)


class Probe(nn.Module):
    """Gives the key a module's first ``self.make_rng(stream)`` gets at the root scope."""

    stream: str = "params"

    @nn.compact
    def __call__(self):
        return self.make_rng(self.stream)


def first_key(key, stream="params"):
    return Probe(stream).apply({}, rngs={stream: key})


def as_core(layer):
    return rj.RNN(layer) if isinstance(layer, rj.Cell) else layer


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


@pytest.mark.parametrize("name", CASES)
def test_module_equals_core(name):
    layer, core = CASES[name], as_core(CASES[name])
    model = rjl.Recurrent(layer, deterministic=True)
    key = jax.random.key(0)
    variables = model.init(key, XS)
    assert shapes(variables["params"]) == EXPECTED_PARAMS[name]
    params = model.core_params(variables)
    # Init is the core's, from the one key the module draws with make_rng("params").
    assert_trees_close(params, core.init(first_key(key), D), **EXACT)

    ys, carry = core.apply(params, XS, lengths=LENGTHS, resets=RESETS)
    got = model.apply(variables, XS, lengths=LENGTHS, resets=RESETS, return_carry=True)
    assert_trees_close(got, (ys, carry), **EXACT)  # eager: the very same operations
    jitted = jax.jit(partial(model.apply, return_carry=True))(variables, XS, LENGTHS, RESETS)
    assert_trees_close(jitted, (ys, carry), atol=1e-6, rtol=0)
    # A given carry is passed on: continuing from the final carry.
    ys2, _ = core.apply(params, XS, carry=carry)
    assert_trees_close(model.apply(variables, XS, carry=carry), ys2, **EXACT)


def test_stack_dropout_uses_the_dropout_rng():
    layer = CASES["stack_dropout"]
    model = rjl.Recurrent(layer)
    variables = model.init(jax.random.key(0), XS, deterministic=True)
    params = model.core_params(variables)
    key = jax.random.key(7)
    ys = model.apply(variables, XS, deterministic=False, rngs={"dropout": key})
    expected, _ = layer.apply(params, XS, key=first_key(key, "dropout"))
    assert_trees_close(ys, expected, **EXACT)
    assert not np.allclose(ys, model.apply(variables, XS, deterministic=True))
    with pytest.raises(ValueError, match="has dropout: pass deterministic=True"):
        model.apply(variables, XS)
    # The attribute is the default; without dropout the flag is not needed.
    assert_trees_close(rjl.Recurrent(layer, deterministic=True).apply(variables, XS), layer.apply(params, XS)[0], **EXACT)
    gru = rjl.Recurrent(rj.GRU(4))
    gru_vars = gru.init(jax.random.key(0), XS)
    assert_trees_close(gru.apply(gru_vars, XS, deterministic=False), gru.apply(gru_vars, XS), **EXACT)


class Tagger(nn.Module):
    """Embed -> Recurrent -> Dense, the shape of a sequence tagger or language model."""

    @nn.compact
    def __call__(self, tokens, lengths, deterministic):
        x = nn.Embed(7, 3)(tokens)
        x = rjl.Recurrent(rj.Stack([rj.RNN(rj.GRU(6)), rj.RNN(rj.GRU(6))], dropout=0.1))(
            x, lengths, deterministic=deterministic)
        return nn.Dense(7)(x)


def test_train_in_a_larger_model_with_optax():
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 7, (3, 8)), jnp.int32)
    lengths = jnp.array([8, 5, 7])
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.arange(8) < lengths[:, None] - 1
    model = Tagger()
    params = model.init(jax.random.key(0), tokens, lengths, True)["params"]
    assert set(params["Recurrent_0"]) == {"layers_0", "layers_1"}

    def loss_fn(params, key=None):
        logits = model.apply({"params": params}, tokens, lengths, key is None,
                             rngs=None if key is None else {"dropout": key})
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(losses * mask) / mask.sum()

    tx = optax.adam(0.05)

    @jax.jit
    def step(params, opt_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, key)  # with dropout: training mode
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for i in range(10):
        params, opt_state, loss = step(params, opt_state, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_nn_vmap_ensemble():
    cell = rj.LSTM(4)
    Ensemble = nn.vmap(rjl.Recurrent, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=None, axis_size=3)
    model = Ensemble(cell)
    variables = model.init(jax.random.key(0), XS)
    assert shapes(variables["params"]) == {"w_x": (3, 3, 16), "w_h": (3, 4, 16), "b": (3, 16)}
    ys = model.apply(variables, XS, LENGTHS)  # positional: nn.vmap drops keyword arguments
    assert ys.shape == (3, 2, 6, 4)
    for i in range(3):
        member = jax.tree.map(lambda a, i=i: a[i], variables["params"])
        expected, _ = rj.scan(cell, rjl.to_core_params(cell, member), XS, lengths=LENGTHS)
        np.testing.assert_allclose(ys[i], expected, atol=1e-6, rtol=0)
    assert not np.allclose(ys[0], ys[1])  # members were initialised from different keys


def test_step_cell_in_flax_rnn_and_nn_scan():
    cell = rj.GRU(4)
    rnn = nn.RNN(rjl.StepCell(cell))
    variables = rnn.init(jax.random.key(0), XS)
    params = rjl.to_core_params(cell, variables["params"]["cell"])
    expected, last = rj.scan(cell, params, XS)
    np.testing.assert_allclose(rnn.apply(variables, XS), expected, atol=1e-6, rtol=0)

    Scanned = nn.scan(rjl.StepCell, variable_broadcast="params", split_rngs={"params": False},
                      in_axes=1, out_axes=1)
    scanned = Scanned(cell)
    carry = scanned.initialize_carry(jax.random.key(0), XS[:, 0].shape)
    assert_trees_close(carry, cell.init_carry((2,)), **EXACT)
    variables = scanned.init(jax.random.key(0), carry, XS)
    assert shapes(variables["params"]) == {"w_x": (3, 12), "w_h": (4, 12), "b_x": (12,), "b_h": (12,)}
    params = rjl.to_core_params(cell, variables)
    h, ys = scanned.apply(variables, carry, XS)
    expected, last = rj.scan(cell, params, XS)
    assert_trees_close((ys, h), (expected, last), atol=1e-6, rtol=0)
    assert rjl.StepCell(rj.ConvLSTM(2)).num_feature_axes == 3


def test_core_params_round_trip_and_import():
    layer = CASES["bigru"]
    params = layer.init(jax.random.key(4), D)  # e.g. weights from rj.interop.from_torch
    tree = rjl.from_core_params(layer, params)
    assert shapes(tree) == EXPECTED_PARAMS["bigru"]
    assert_trees_close(rjl.to_core_params(layer, tree), params, **EXACT)
    assert_trees_close(rjl.to_core_params(layer, {"params": tree}), params, **EXACT)
    ys = rjl.Recurrent(layer).apply({"params": tree}, XS, lengths=LENGTHS)
    assert_trees_close(ys, layer.apply(params, XS, lengths=LENGTHS)[0], **EXACT)


def test_serialization_round_trip():
    model = rjl.Recurrent(CASES["lstm_proj"])
    variables = model.init(jax.random.key(0), XS)
    data = serialization.to_bytes(variables)
    template = model.init(jax.random.key(9), XS)
    restored = serialization.from_bytes(template, data)
    assert_trees_close(restored, variables, **EXACT)
    assert_trees_close(model.apply(restored, XS), model.apply(variables, XS), **EXACT)


def test_partitioning_metadata():
    layer = CASES["bigru"]
    spec = {"w_x": (None, "model"), "backward/w_h": ("model", None)}
    model = rjl.Recurrent(layer, param_partitioning=spec)
    variables = model.init(jax.random.key(0), XS)
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["forward"]["w_x"] == P(None, "model") and specs["backward"]["w_x"] == P(None, "model")
    assert specs["backward"]["w_h"] == P("model", None) and specs["forward"]["w_h"] == P()
    assert isinstance(variables["params"]["forward"]["w_x"], nn.Partitioned)
    plain = rjl.Recurrent(layer).init(jax.random.key(0), XS)
    assert_trees_close(model.core_params(variables), rjl.to_core_params(layer, plain), **EXACT)
    assert_trees_close(model.apply(variables, XS), rjl.Recurrent(layer).apply(plain, XS), **EXACT)
    # A callable (path, shape) -> names, and boxed trees from core params.
    by_rank = rjl.Recurrent(rj.Elman(4), param_partitioning=lambda path, shape: ("data", "model")[-len(shape):])
    specs = nn.get_partition_spec(by_rank.init(jax.random.key(0), XS))["params"]
    assert specs == {"w_x": P("data", "model"), "w_h": P("data", "model"), "b": P("model")}
    tree = rjl.from_core_params(layer, layer.init(jax.random.key(0), D), param_partitioning=spec)
    assert nn.get_partition_spec(tree)["forward"]["w_x"] == P(None, "model")
    with pytest.raises(ValueError, match=r"\('model',\) for 'forward/w_x' of shape \(3, 12\); expected 2 axis names"):
        rjl.Recurrent(layer, param_partitioning={"w_x": ("model",)}).init(jax.random.key(0), XS)


def test_bad_input():
    with pytest.raises(TypeError, match="Recurrent.layer is a Flax module"):
        rjl.Recurrent(nn.Dense(3))
    with pytest.raises(TypeError, match="Recurrent.layer must be an rnnjax cell"):
        rjl.Recurrent("lstm")
    with pytest.raises(TypeError, match="StepCell.cell must be an rnnjax cell.*not a layer"):
        rjl.StepCell(rj.RNN(rj.GRU(4)))
    model = rjl.Recurrent(rj.GRU(4))
    variables = model.init(jax.random.key(0), XS)
    # The core's error, naming the shapes, not a Flax shape mismatch.
    with pytest.raises(ValueError, match=r"xs has shape \(2, 6, 5\); expected \(\.\.\., T, 3\) for input_size=3 of GRU"):
        model.apply(variables, jnp.ones((2, 6, 5)))
    with pytest.raises(ValueError, match=r"lengths"):
        model.apply(variables, XS, lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"missing \['w_h'\], unexpected \['w_hh'\]"):
        p = dict(variables["params"])
        p["w_hh"] = p.pop("w_h")
        rjl.to_core_params(rj.GRU(4), p)
    with pytest.raises(ValueError, match=r"lack \['w_h'\] for RNN\(cell=GRU"):
        model.apply({"params": {k: v for k, v in variables["params"].items() if k != "w_h"}}, XS)
    with pytest.raises(ValueError, match=r"xs has shape \(\)"):
        model.init(jax.random.key(0), jnp.float32(1.0))


def test_import_rnnjax_does_not_import_flax_wrappers():
    code = ("import sys, rnnjax, rnnjax.flax; "
            "print(sorted(m for m in sys.modules if m.startswith('rnnjax.flax.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    from pathlib import Path

    core = Path(rj.__file__).parent
    for path in [*core.glob("*.py"), *core.glob("cells/*.py")]:
        text = path.read_text()
        assert "rnnjax.flax" not in text and "from rnnjax import flax" not in text, path


NEW_CELLS = {
    "gated_deltanet": rj.GatedDeltaNet(heads=2, key_size=2, value_size=3),
    "rwkv7": rj.RWKV7(hidden_size=D, heads=2, head_size=2, decay_rank=2, a_rank=2, gate_rank=2),
    "rglru": rj.RGLRU(D),
    "slstm": rj.SLSTM(4, num_heads=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW_CELLS)
def test_new_cells_in_a_bidirectional_stack_module(name):
    """The cells of "Matrix-state recurrences II" in rj.Bidirectional inside rj.Stack, wrapped
    by the linen module: the core's init and outputs (lengths, resets) through Flax."""
    cell = NEW_CELLS[name]
    second = rj.RGLRU(2 * cell.output_size(D)) if name == "rglru" else cell
    layer = rj.Stack([rj.Bidirectional(rj.RNN(cell)), rj.RNN(second)]) if name != "rwkv7" else rj.RNN(cell)
    model = rjl.Recurrent(layer, deterministic=True)
    key = jax.random.key(0)
    variables = model.init(key, XS)
    params = model.core_params(variables)
    assert_trees_close(params, layer.init(first_key(key), D), **EXACT)
    expected = layer.apply(params, XS, lengths=LENGTHS, resets=RESETS)
    got = jax.jit(partial(model.apply, return_carry=True))(variables, XS, LENGTHS, RESETS)
    assert_trees_close(got, expected, atol=1e-5, rtol=1e-5)
