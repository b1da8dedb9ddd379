"""rnnjax.interop against outputs PyTorch and Keras computed (tests/fixtures/*.npz, written by
tests/fixtures/make_fixtures.py); neither library is needed here."""

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax import interop
from rnnjax.ops import ACTIVATIONS
from rnnjax.layers import BidirectionalParams

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TORCH_CASES = sorted(p.stem for p in FIXTURES.glob("torch_*.npz"))
KERAS_CASES = sorted(p.stem for p in FIXTURES.glob("keras_*.npz"))
TOL = 1e-5


def test_fixtures_exist():
    assert len(TORCH_CASES) >= 8 and len(KERAS_CASES) >= 7, "run tests/fixtures/make_fixtures.py"


@functools.cache
def load(name):
    with np.load(FIXTURES / f"{name}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(str(arrays.pop("config"))), arrays


@functools.partial(jax.jit, static_argnums=0)
def apply(layer, params, xs, lengths):
    return layer.apply(params, xs, lengths=lengths)


def torch_args(config):
    kw = dict(config["kwargs"])
    kw.pop("batch_first", None)
    return dict(mode=config["mode"], **kw)


def torch_state_dict(arrays):
    return {k[3:]: v for k, v in arrays.items() if k.startswith("sd.")}


def from_torch_fixture(name):
    config, arrays = load(name)
    return interop.from_torch_state_dict(torch_state_dict(arrays), **torch_args(config))


def run_torch_case(layer, params, config, arrays):
    """rnnjax's ``(ys, final)`` laid out as the fixture's torch outputs."""
    batch_first = config["kwargs"].get("batch_first", False)
    xs = arrays["xs"] if batch_first else np.swapaxes(arrays["xs"], 0, 1)
    ys, carries = apply(layer, params, jnp.asarray(xs), arrays.get("lengths"))
    ys = np.asarray(ys) if batch_first else np.swapaxes(np.asarray(ys), 0, 1)
    final = interop.torch_final_state(layer, carries)
    return ys, final if isinstance(final, tuple) else (final,)


def assert_close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = float(np.abs(got.astype(np.float64) - want).max())
    assert err <= TOL, f"{what}: max abs error {err:.2e}"


# -- PyTorch -----------------------------------------------------------------------


@pytest.mark.parametrize("name", TORCH_CASES)
def test_torch_fixture(name):
    config, arrays = load(name)
    layer, params = from_torch_fixture(name)
    kw = config["kwargs"]
    assert isinstance(layer, rj.Stack) and len(layer.layers) == kw.get("num_layers", 1)
    assert layer.dropout == kw.get("dropout", 0.0)
    assert all(isinstance(l, rj.Bidirectional if kw.get("bidirectional") else rj.RNN) for l in layer.layers)
    ys, final = run_torch_case(layer, params, config, arrays)
    # The whole padded array: packed outputs are zeros past each length in both libraries.
    assert_close(ys, arrays["ys"], f"{name} outputs")
    assert_close(final[0], arrays["h_n"], f"{name} h_n")
    assert (len(final) == 2) == ("c_n" in arrays)
    if "c_n" in arrays:
        assert_close(final[1], arrays["c_n"], f"{name} c_n")


@pytest.mark.parametrize("name", TORCH_CASES)
def test_to_torch_state_dict_round_trips(name):
    config, arrays = load(name)
    layer, params = from_torch_fixture(name)
    back = interop.to_torch_state_dict(layer, params, tensors=False)
    sd = torch_state_dict(arrays)
    assert list(back) == config["state_dict_keys"]
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in sd.items()}
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in back.values())
    layer2, params2 = interop.from_torch_state_dict(back, **torch_args(config))
    assert layer2 == layer
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    if config["mode"] == "GRU":  # GRU keeps both biases, so the state_dict itself comes back
        for k in sd:
            np.testing.assert_array_equal(back[k], sd[k])
    else:
        for k in sd:
            if k.startswith("bias_hh"):
                assert not back[k].any()
            elif k.startswith("bias_ih"):
                np.testing.assert_allclose(back[k], sd[k] + sd["bias_hh" + k[7:]])
            else:
                np.testing.assert_array_equal(back[k], sd[k])


class FakeGRU:
    """Duck-typed stand-in for torch.nn.GRU: the attributes and a numpy state_dict."""

    mode = "GRU"

    def __init__(self, config, sd):
        for k, v in config["kwargs"].items():
            setattr(self, k, v)
        self.proj_size, self.dropout = 0, 0.0
        self._sd = sd

    def state_dict(self):
        return dict(self._sd)


def test_from_torch_duck_typed_module():
    name = "torch_gru_2layer_bidir_packed"
    config, arrays = load(name)
    layer, params = interop.from_torch(FakeGRU(config, torch_state_dict(arrays)))
    assert layer == from_torch_fixture(name)[0]
    ys, final = run_torch_case(layer, params, config, arrays)
    assert_close(ys, arrays["ys"], "outputs")
    assert_close(final[0], arrays["h_n"], "h_n")


def test_torch_final_state_any_batch_shape():
    config, arrays = load("torch_lstm_2layer_bidir_proj_packed")
    layer, params = from_torch_fixture("torch_lstm_2layer_bidir_proj_packed")
    xs = jnp.asarray(arrays["xs"])[None]  # batch shape (1, B)
    _, carries = apply(layer, params, xs, jnp.asarray(arrays["lengths"])[None])
    h_n, c_n = interop.torch_final_state(layer, carries)
    assert_close(h_n, arrays["h_n"][:, None], "h_n")
    assert_close(c_n, arrays["c_n"][:, None], "c_n")
    single = interop.torch_final_state(layer.layers[0], carries[0])  # one layer alone
    assert_close(single[0], arrays["h_n"][:2, None], "layer 0 h_n")


def test_from_torch_rejects_other_objects():
    with pytest.raises(TypeError, match="got object"):
        interop.from_torch(object())

    class LSTMCellLike:  # a cell module has no `mode`
        input_size, hidden_size = 4, 5

        def state_dict(self):
            return {}

    with pytest.raises(TypeError, match="LSTMCellLike"):
        interop.from_torch(LSTMCellLike())


def test_from_torch_state_dict_errors():
    config, arrays = load("torch_lstm")
    sd, kw = torch_state_dict(arrays), torch_args(config)
    with pytest.raises(ValueError, match="unknown mode 'LSTMCell'"):
        interop.from_torch_state_dict(sd, **{**kw, "mode": "LSTMCell"})
    with pytest.raises(ValueError, match=r"missing keys \['bias_hh_l0'\]"):
        interop.from_torch_state_dict({k: v for k, v in sd.items() if k != "bias_hh_l0"}, **kw)
    with pytest.raises(ValueError, match=r"unexpected keys \['weight_ih_l1'\]"):
        interop.from_torch_state_dict({**sd, "weight_ih_l1": sd["weight_ih_l0"]}, **kw)
    with pytest.raises(ValueError, match=r"weight_ih_l0.*shape \(20, 4\); expected \(20, 3\)"):
        interop.from_torch_state_dict(sd, **{**kw, "input_size": 3})
    with pytest.raises(ValueError, match="proj_size=2 is only supported by LSTM"):
        interop.from_torch_state_dict(sd, **{**kw, "mode": "GRU", "proj_size": 2})
    with pytest.raises(ValueError, match="nonlinearity 'sigmoid'"):
        interop.from_torch_state_dict(sd, **{**kw, "mode": "RNN", "nonlinearity": "sigmoid"})
    with pytest.raises(TypeError, match="weight_ih_l0 has dtype int64"):
        interop.from_torch_state_dict({**sd, "weight_ih_l0": sd["weight_ih_l0"].astype(np.int64)}, **kw)


def test_from_torch_state_dict_mode_rnn_uses_nonlinearity():
    config, arrays = load("torch_rnn_relu_nobias")
    kw = {**torch_args(config), "mode": "RNN", "nonlinearity": "relu"}
    layer, _ = interop.from_torch_state_dict(torch_state_dict(arrays), **kw)
    assert layer == from_torch_fixture("torch_rnn_relu_nobias")[0]


@pytest.mark.parametrize(
    "layer, match",
    [
        (rj.RNN(rj.LSTM(4, peephole=True)), "peephole=True"),
        (rj.RNN(rj.GRU(4, reset_after=False)), "reset_after=False"),
        (rj.RNN(rj.Elman(4, activation="sigmoid")), "Elman activation 'sigmoid'"),
        (rj.RNN(rj.LSTM(4, gate_activation="hard_sigmoid")), "gate_activation='hard_sigmoid'"),
        (rj.RNN(rj.GRU(4), reverse=True), "reverse=True alone"),
        (rj.Bidirectional(rj.RNN(rj.GRU(4)), merge="sum"), "merge='sum'"),
        (rj.Stack([rj.RNN(rj.GRU(4)), rj.RNN(rj.LSTM(4))]), r"\('LSTM', 4, True, 0\), layer 0 has \('GRU'"),
        (rj.Stack([rj.RNN(rj.GRU(4)), rj.RNN(rj.GRU(5))]), "same cell in every layer"),
        (rj.Stack([rj.RNN(rj.GRU(4)), rj.Bidirectional(rj.RNN(rj.GRU(4)))]), "2 direction"),
        (rj.Stack([rj.Stack([rj.RNN(rj.GRU(4))])]), "no nested Stack"),
        (rj.Stack([rj.RNN(rj.GRU(4)), rj.RNN(rj.GRU(4))], residual=True), "residual"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_to_torch_state_dict_rejects_what_torch_cannot_express(layer, match):
    params = layer.init(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=match):
        interop.to_torch_state_dict(layer, params, tensors=False)


def test_to_torch_state_dict_of_a_single_layer():
    cell = rj.LSTM(4, proj_size=2)
    layer = rj.Bidirectional(rj.RNN(cell))
    params = layer.init(jax.random.key(0), 3)
    sd = interop.to_torch_state_dict(layer, params, tensors=False)
    assert list(sd) == [f"{w}_l0{s}" for s in ("", "_reverse")
                        for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")]
    assert sd["weight_hh_l0"].shape == (16, 2) and sd["weight_hr_l0_reverse"].shape == (2, 4)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_to_torch_state_dict_tensors_are_pytorch_tensors():
    """The lazy ``import torch`` in rnnjax/interop/torch.py reaches PyTorch, not that module."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    kw = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True, proj_size=2, batch_first=True)
    module = torch.nn.LSTM(**kw)
    layer, params = interop.from_torch(module)
    sd = interop.to_torch_state_dict(layer, params)
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in sd.values())
    fresh = torch.nn.LSTM(**kw)
    fresh.load_state_dict(sd)
    xs = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    with torch.no_grad():
        want, (h_n, c_n) = fresh(torch.from_numpy(xs))
    ys, carries = layer.apply(params, jnp.asarray(xs))
    assert_close(ys, want.numpy(), "outputs")
    got_h, got_c = interop.torch_final_state(layer, carries)
    assert_close(got_h, h_n.numpy(), "h_n")
    assert_close(got_c, c_n.numpy(), "c_n")
    half = interop.to_torch_state_dict(layer, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
    assert all(v.dtype == torch.bfloat16 for v in half.values())
    layer16, params16 = interop.from_torch(module.to(torch.bfloat16))
    assert layer16 == layer and all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params16))


# -- Keras -------------------------------------------------------------------------


def keras_weights(arrays, config):
    return [arrays[f"w{i}"] for i in range(config["num_weights"])]


@pytest.mark.parametrize("name", KERAS_CASES)
def test_keras_fixture(name):
    config, arrays = load(name)
    cfg = config["config"]
    layer, params = interop.from_keras_config(cfg, keras_weights(arrays, config))  # class from the weights
    assert isinstance(layer, rj.Bidirectional if config["class_name"] == "Bidirectional" else rj.RNN)
    ys, carry = apply(layer, params, jnp.asarray(arrays["xs"]), arrays.get("lengths"))
    want = arrays["ys"][:, ::-1] if cfg.get("go_backwards") else arrays["ys"]  # Keras reverses time
    if "lengths" in arrays:
        valid = np.arange(want.shape[1]) < arrays["lengths"][:, None]
        assert_close(np.asarray(ys)[valid], want[valid], f"{name} outputs (valid steps)")
    # Everything: Bidirectional writes zeros past the mask, as rnnjax does past lengths.
    assert_close(ys, want, f"{name} outputs")
    leaves = jax.tree.leaves(carry)
    assert len(leaves) == config["num_states"]
    for i, leaf in enumerate(leaves):
        assert_close(leaf, arrays[f"state{i}"], f"{name} state {i}")


def test_keras_class_name_and_serialized_config():
    config, arrays = load("keras_gru_reset_before")
    weights = keras_weights(arrays, config)
    base = interop.from_keras_config(config["config"], weights)
    named = interop.from_keras_config(config["config"], weights, class_name="GRU")
    serialized = interop.from_keras_config({"class_name": "GRU", "config": config["config"]}, weights)
    assert base[0] == named[0] == serialized[0] == rj.RNN(rj.GRU(5, reset_after=False, gate_activation="hard_sigmoid"))
    with pytest.raises(ValueError, match="is a LSTM but its kernel has shape"):
        interop.from_keras_config(config["config"], weights, class_name="LSTM")
    with pytest.raises(ValueError, match="Keras ConvLSTM2D"):
        interop.from_keras_config(config["config"], weights, class_name="ConvLSTM2D")


def test_keras_merge_modes():
    config, arrays = load("keras_bidir_gru_sum_masked")
    weights = keras_weights(arrays, config)
    cfg = copy.deepcopy(config["config"])
    cfg["merge_mode"] = "ave"
    layer, params = interop.from_keras_config(cfg, weights)
    assert layer.merge == "mean" and isinstance(params, BidirectionalParams)
    ys, _ = apply(layer, params, jnp.asarray(arrays["xs"]), arrays["lengths"])
    assert_close(2 * np.asarray(ys), arrays["ys"], "ave = sum / 2")
    cfg["merge_mode"] = None
    with pytest.raises(ValueError, match="merge_mode=None.*merged outputs"):
        interop.from_keras_config(cfg, weights)


def test_keras_activation_mapping():
    config, arrays = load("keras_simple_rnn")
    weights = keras_weights(arrays, config)
    cases = {"swish": "silu", "relu": "relu", None: "linear", "hard_sigmoid": "hard_sigmoid"}
    for keras_name, ours in cases.items():
        layer, _ = interop.from_keras_config({**config["config"], "activation": keras_name}, weights)
        assert layer.cell.activation == ours
    layer, _ = interop.from_keras_config({**config["config"], "activation": "gelu"}, weights)
    x = jnp.linspace(-3, 3, 7)
    assert layer.cell.activation == "gelu"
    np.testing.assert_allclose(ACTIVATIONS["gelu"](x), jax.nn.gelu(x, approximate=False))  # Keras' exact gelu
    with pytest.raises(ValueError, match="activation='softmax' has no rnnjax equivalent"):
        interop.from_keras_config({**config["config"], "activation": "softmax"}, weights)


def test_keras_config_errors():
    config, arrays = load("keras_bidir_lstm_concat_masked")
    weights = keras_weights(arrays, config)
    cfg = config["config"]
    stateful = copy.deepcopy(cfg)
    stateful["layer"]["config"]["stateful"] = True
    with pytest.raises(ValueError, match="stateful=True"):
        interop.from_keras_config(stateful, weights)
    forward_backwards = copy.deepcopy(cfg)
    forward_backwards["layer"]["config"]["go_backwards"] = True
    with pytest.raises(ValueError, match="go_backwards=False"):
        interop.from_keras_config(forward_backwards, weights)
    with pytest.raises(ValueError, match="backward layer needs 3 weight arrays.*got 2"):
        interop.from_keras_config(cfg, weights[:5])
    with pytest.raises(ValueError, match="got 7 weight arrays; the Bidirectional config needs 6"):
        interop.from_keras_config(cfg, [*weights, weights[0]])
    with pytest.raises(ValueError, match=r"recurrent_kernel has shape \(5, 20\); expected \(4, 16\)"):
        interop.from_keras_config({**cfg["layer"]["config"], "units": 4}, [weights[0][:, :16], *weights[1:3]])
    # Without a backward_layer entry the backward config is the forward one, reversed.
    no_backward = {k: v for k, v in cfg.items() if k != "backward_layer"}
    assert interop.from_keras_config(no_backward, weights)[0] == interop.from_keras_config(cfg, weights)[0]


def test_from_keras_rejects_other_classes():
    class Dense:
        def get_config(self):
            return {"units": 4}

        def get_weights(self):
            return []

    with pytest.raises(TypeError, match="got Dense"):
        interop.from_keras(Dense())

    class LSTM(Dense):  # right name, not built yet
        pass

    with pytest.raises(ValueError, match="no weights yet"):
        interop.from_keras(LSTM())


def test_import_pulls_in_neither_torch_nor_keras():
    code = "import sys, rnnjax, rnnjax.interop; print(sorted({'torch', 'keras'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
