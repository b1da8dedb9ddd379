"""Weights in and out of PyTorch (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) and Keras
(``SimpleRNN``, ``LSTM``, ``GRU``, ``Bidirectional``).

Neither torch nor keras is imported by this module: the ``from_*`` functions read
attributes, ``state_dict()``, ``get_config()`` and ``get_weights()``, and
:func:`to_torch_state_dict` imports torch only when asked for tensors.

Conventions:

- Layers take batch-first inputs ``(*batch, T, D)``; transpose PyTorch's time-major
  ``(T, B, D)`` data (``batch_first=False``) with ``jnp.swapaxes(xs, 0, 1)``.
- Weight matrices are stored ``(in, out)``, transposed from PyTorch's ``(out, in)``; Keras
  already stores ``(in, out)``.
- Gate order is PyTorch's: LSTM ``i, f, g, o`` (Keras' too); GRU ``r, z, n`` (Keras'
  ``z, r, h`` is reordered on import).
- rnnjax's Elman and LSTM cells have one bias ``b``: import sums PyTorch's
  ``b_ih + b_hh``; export writes ``bias_ih = b`` and ``bias_hh = 0``. GRU keeps both
  (``b_x``, ``b_h``).
- ``lengths`` in ``apply`` reproduces PyTorch's packed sequences
  (``pack_padded_sequence``; outputs are zeros past each length, as
  ``pad_packed_sequence`` pads them) and Keras' right-padding masks; the backward
  direction runs over each sequence's own valid part in both.

Example:
  >>> import numpy as np, jax.numpy as jnp, rnnjax as rj
  >>> rng = np.random.default_rng(0)
  >>> shapes = {"weight_ih_l0": (12, 3), "weight_hh_l0": (12, 4),
  ...           "bias_ih_l0": (12,), "bias_hh_l0": (12,)}   # torch.nn.GRU(3, 4)
  >>> sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  >>> layer, params = rj.interop.from_torch_state_dict(sd, mode="GRU", input_size=3, hidden_size=4)
  >>> ys, carries = layer.apply(params, jnp.ones((2, 5, 3)), lengths=jnp.array([5, 2]))
  >>> h_n = rj.interop.torch_final_state(layer, carries)
  >>> ys.shape, h_n.shape
  ((2, 5, 4), (1, 2, 4))
  >>> back = rj.interop.to_torch_state_dict(layer, params, tensors=False)
  >>> list(back) == list(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.cell import ACTIVATIONS, check_positive_int
from rnnjax.cells.elman import Elman, ElmanParams
from rnnjax.cells.gru import GRU, GRUParams
from rnnjax.cells.lstm import LSTM, LSTMParams, LSTMState
from rnnjax.layers import RNN, Bidirectional, BidirectionalParams, Stack

__all__ = [
    "from_torch",
    "from_torch_state_dict",
    "torch_final_state",
    "to_torch_state_dict",
    "from_keras",
    "from_keras_config",
]


# -- shared helpers ------------------------------------------------------------------


def _to_numpy(value: Any, name: str) -> np.ndarray:
    """A numpy array from a numpy array, jax array or torch tensor (bfloat16 included)."""
    if hasattr(value, "detach"):
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bfloat16; go through float32
            return tensor.float().numpy().astype(jnp.bfloat16)
        value = tensor.numpy()
    array = np.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"{name} has dtype {array.dtype}; expected floating-point weights")
    return array


def _jnp(array: np.ndarray) -> jax.Array:
    return jnp.asarray(np.ascontiguousarray(array))


def _activation_name(activation: Any) -> str | None:
    """The ACTIVATIONS name of ``activation`` (a name or one of its callables), else None."""
    if isinstance(activation, str):
        return activation
    for name, fn in ACTIVATIONS.items():
        if activation is fn:
            return name
    return None


# -- PyTorch -------------------------------------------------------------------------

_TORCH_MODES = ("RNN_TANH", "RNN_RELU", "RNN", "LSTM", "GRU")
_GATES = {Elman: 1, LSTM: 4, GRU: 3}


def _torch_cell(mode: str, hidden_size: int, bias: bool, proj_size: int, nonlinearity: str):
    if mode not in _TORCH_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(_TORCH_MODES)} (PyTorch's module.mode)")
    if proj_size and mode != "LSTM":
        raise ValueError(f"proj_size={proj_size} is only supported by LSTM, not mode {mode!r}")
    if mode == "LSTM":
        return LSTM(hidden_size, proj_size=proj_size or None, use_bias=bias)
    if mode == "GRU":
        return GRU(hidden_size, reset_after=True, use_bias=bias)
    activation = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}.get(mode, nonlinearity)
    if activation not in ("tanh", "relu"):
        raise ValueError(f"unknown nonlinearity {activation!r}; PyTorch's nn.RNN has 'tanh' and 'relu'")
    return Elman(hidden_size, activation=activation, use_bias=bias)


def _torch_shapes(cell, input_size: int, num_layers: int, num_dirs: int) -> dict[str, tuple[int, ...]]:
    """PyTorch's state_dict keys, in PyTorch's order, with their shapes."""
    hid = cell.hidden_size
    gh = _GATES[type(cell)] * hid
    proj = getattr(cell, "proj_size", None)
    out = proj or hid
    shapes = {}
    for layer in range(num_layers):
        layer_in = input_size if layer == 0 else num_dirs * out
        for suffix in ("", "_reverse")[:num_dirs]:
            shapes[f"weight_ih_l{layer}{suffix}"] = (gh, layer_in)
            shapes[f"weight_hh_l{layer}{suffix}"] = (gh, out)
            if cell.use_bias:
                shapes[f"bias_ih_l{layer}{suffix}"] = (gh,)
                shapes[f"bias_hh_l{layer}{suffix}"] = (gh,)
            if proj:
                shapes[f"weight_hr_l{layer}{suffix}"] = (proj, hid)
    return shapes


def _cell_params_from_torch(cell, sd: Mapping[str, np.ndarray], tag: str):
    w_x = _jnp(sd[f"weight_ih_{tag}"].T)
    w_h = _jnp(sd[f"weight_hh_{tag}"].T)
    b_ih = sd.get(f"bias_ih_{tag}")
    b_hh = sd.get(f"bias_hh_{tag}")
    if isinstance(cell, GRU):
        return GRUParams(w_x, w_h, None if b_ih is None else _jnp(b_ih), None if b_hh is None else _jnp(b_hh))
    b = None if b_ih is None else _jnp(b_ih + b_hh)
    if isinstance(cell, LSTM):
        w_hr = sd.get(f"weight_hr_{tag}")
        return LSTMParams(w_x, w_h, b, None, None if w_hr is None else _jnp(w_hr.T))
    return ElmanParams(w_x, w_h, b)


def from_torch_state_dict(
    state_dict: Mapping[str, Any],
    *,
    mode: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    bias: bool = True,
    bidirectional: bool = False,
    proj_size: int = 0,
    nonlinearity: str = "tanh",
    dropout: float = 0.0,
) -> tuple[Stack, tuple]:
    """Build ``(layer, params)`` from the ``state_dict`` of a ``torch.nn.RNN/LSTM/GRU``.

    Args:
      state_dict: PyTorch's keys (``weight_ih_l0``, ``bias_hh_l1_reverse``,
        ``weight_hr_l0``, ...) to torch tensors or numpy arrays; every expected key must
        be there and no other.
      mode: PyTorch's ``module.mode``: ``"RNN_TANH"``, ``"RNN_RELU"``, ``"LSTM"`` or
        ``"GRU"``; ``"RNN"`` takes the activation from ``nonlinearity``.
      input_size, hidden_size, num_layers, bias, bidirectional, proj_size, dropout: the
        module's constructor arguments.
      nonlinearity: ``"tanh"`` or ``"relu"``; used with ``mode="RNN"`` only.

    Returns:
      ``layer``: an ``rj.Stack`` with ``num_layers`` entries, each ``rj.RNN(cell)`` or,
      when bidirectional, ``rj.Bidirectional(rj.RNN(cell), rj.RNN(cell, reverse=True))``
      with concatenated outputs; its ``dropout`` is PyTorch's (active only when ``apply``
      gets a ``key``). ``params``: a tuple with one entry per layer (cell params, or
      ``BidirectionalParams``), jax arrays in the state_dict's float dtype. Matrices are
      transposed to ``(in, out)``; Elman and LSTM biases are ``b_ih + b_hh``.

    ``layer.apply`` takes batch-first ``(*batch, T, D)`` inputs, with ``lengths`` in
    place of a packed sequence.
    """
    for value, name in ((input_size, "input_size"), (hidden_size, "hidden_size"), (num_layers, "num_layers")):
        check_positive_int(value, name)
    if proj_size is None:
        proj_size = 0
    if proj_size and proj_size >= hidden_size:
        raise ValueError(f"proj_size={proj_size} must be smaller than hidden_size={hidden_size} (as in PyTorch)")
    cell = _torch_cell(mode, hidden_size, bool(bias), int(proj_size), nonlinearity)
    num_dirs = 2 if bidirectional else 1
    expected = _torch_shapes(cell, input_size, num_layers, num_dirs)
    sd = {k: _to_numpy(v, k) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match mode={mode!r}, num_layers={num_layers}, bias={bias}, "
            f"bidirectional={bidirectional}, proj_size={proj_size}: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    for key, shape in expected.items():
        if sd[key].shape != shape:
            raise ValueError(
                f"state_dict[{key!r}] has shape {sd[key].shape}; expected {shape} for input_size="
                f"{input_size}, hidden_size={hidden_size}, proj_size={proj_size}"
            )
    layers, params = [], []
    for layer in range(num_layers):
        dirs = [_cell_params_from_torch(cell, sd, f"l{layer}{s}") for s in ("", "_reverse")[:num_dirs]]
        if bidirectional:
            layers.append(Bidirectional(RNN(cell), RNN(cell, reverse=True), merge="concat"))
            params.append(BidirectionalParams(*dirs))
        else:
            layers.append(RNN(cell))
            params.append(dirs[0])
    return Stack(layers, dropout=float(dropout)), tuple(params)


def from_torch(module: Any) -> tuple[Stack, tuple]:
    """Build ``(layer, params)`` from a ``torch.nn.RNN``, ``nn.LSTM`` or ``nn.GRU``.

    Reads ``mode``, ``input_size``, ``hidden_size``, ``num_layers``, ``bias``,
    ``bidirectional``, ``proj_size``, ``nonlinearity``, ``dropout`` and ``state_dict()``
    (any object with these attributes works) and calls :func:`from_torch_state_dict`.

    ``batch_first`` does not change the result: the returned layer always takes
    batch-first ``(*batch, T, D)`` inputs, so transpose time-major data
    (``batch_first=False``) with ``jnp.swapaxes(xs, 0, 1)``, and the outputs back.
    ``lengths=`` replaces ``pack_padded_sequence``. PyTorch's ``(h_n, c_n)`` is
    ``torch_final_state(layer, carries)``.

    Raises:
      TypeError: ``module`` is not an RNN, LSTM or GRU module (``nn.LSTMCell`` included).
    """
    mode = getattr(module, "mode", None)
    if not (isinstance(mode, str) and mode in _TORCH_MODES and callable(getattr(module, "state_dict", None))):
        raise TypeError(
            f"from_torch expects a torch.nn.RNN, nn.LSTM or nn.GRU module; got {type(module).__name__}"
        )
    return from_torch_state_dict(
        module.state_dict(),
        mode=mode,
        input_size=module.input_size,
        hidden_size=module.hidden_size,
        num_layers=getattr(module, "num_layers", 1),
        bias=getattr(module, "bias", True),
        bidirectional=getattr(module, "bidirectional", False),
        proj_size=getattr(module, "proj_size", 0),
        nonlinearity=getattr(module, "nonlinearity", "tanh"),
        dropout=getattr(module, "dropout", 0.0),
    )


def _layers_of(layer: Any, what: Any, name: str) -> tuple[tuple, tuple]:
    """``(layers, per-layer values)`` of a Stack, or of a single RNN/Bidirectional layer."""
    if isinstance(layer, Stack):
        if not (isinstance(what, tuple) and len(what) == len(layer.layers)):
            raise ValueError(f"{name} must be a tuple with one entry per layer of the Stack ({len(layer.layers)})")
        return layer.layers, what
    if isinstance(layer, (RNN, Bidirectional)):
        return (layer,), (what,)
    raise TypeError(f"expected an rj.Stack, rj.RNN or rj.Bidirectional layer; got {type(layer).__name__}")


def torch_final_state(layer: Any, carries: Any) -> jax.Array | tuple[jax.Array, jax.Array]:
    """PyTorch's final state from the carries ``layer.apply`` returned.

    Args:
      layer: the ``rj.Stack`` from :func:`from_torch` (or one ``RNN``/``Bidirectional``).
      carries: its final carries.

    Returns:
      ``h_n`` of shape ``(num_layers * num_directions, *batch, H_out)``, and for LSTM
      ``(h_n, c_n)`` with ``c_n`` of shape ``(num_layers * num_directions, *batch, H)``.
      Rows are layer-major, direction-minor: ``l0``, ``l0_reverse``, ``l1``, ...
    """
    layers, carries = _layers_of(layer, carries, "carries")
    hs, cs = [], []
    for i, (lay, carry) in enumerate(zip(layers, carries)):
        if isinstance(lay, Bidirectional):
            if not (isinstance(carry, tuple) and len(carry) == 2):
                raise ValueError(f"carries[{i}] of a Bidirectional layer must be a (forward, backward) pair")
            dirs = list(carry)
        elif isinstance(lay, RNN):
            dirs = [carry]
        else:
            raise TypeError(f"layer {i} is a {type(lay).__name__}; expected rj.RNN or rj.Bidirectional")
        for c in dirs:
            if isinstance(c, LSTMState):
                hs.append(c.h)
                cs.append(c.c)
            else:
                hs.append(c)
    if cs and len(cs) != len(hs):
        raise ValueError("carries mix LSTM and non-LSTM states; PyTorch modules have one cell type")
    h_n = jnp.stack(hs)
    return (h_n, jnp.stack(cs)) if cs else h_n


def _torch_signature(cell: Any, where: str) -> tuple:
    """``(mode, hidden_size, bias, proj_size)`` of a cell PyTorch can express; else ValueError."""
    act = _activation_name(getattr(cell, "activation", None))
    if isinstance(cell, Elman):
        if act not in ("tanh", "relu"):
            raise ValueError(f"{where}: Elman activation {cell.activation!r}; PyTorch's nn.RNN has only 'tanh' and 'relu'")
        return ("RNN_TANH" if act == "tanh" else "RNN_RELU", cell.hidden_size, cell.use_bias, 0)
    if isinstance(cell, (LSTM, GRU)):
        name = type(cell).__name__
        gate = _activation_name(cell.gate_activation)
        if act != "tanh" or gate != "sigmoid":
            raise ValueError(
                f"{where}: {name} with activation={cell.activation!r}, gate_activation={cell.gate_activation!r}; "
                f"PyTorch's nn.{name} uses tanh and sigmoid"
            )
        if isinstance(cell, LSTM):
            if cell.peephole:
                raise ValueError(f"{where}: LSTM with peephole=True; PyTorch's nn.LSTM has no peepholes")
            return ("LSTM", cell.hidden_size, cell.use_bias, cell.proj_size or 0)
        if not cell.reset_after:
            raise ValueError(f"{where}: GRU with reset_after=False; PyTorch's nn.GRU applies the reset gate after the product (reset_after=True)")
        return ("GRU", cell.hidden_size, cell.use_bias, 0)
    raise ValueError(f"{where}: PyTorch has no module for {type(cell).__name__} cells (only Elman, LSTM, GRU)")


def _cell_params_to_torch(cell, p, tag: str, out: dict) -> None:
    np_ = lambda a: np.ascontiguousarray(np.asarray(a))
    out[f"weight_ih_{tag}"] = np_(np.asarray(p.w_x).T)
    out[f"weight_hh_{tag}"] = np_(np.asarray(p.w_h).T)
    if cell.use_bias:
        if isinstance(cell, GRU):
            out[f"bias_ih_{tag}"], out[f"bias_hh_{tag}"] = np_(p.b_x), np_(p.b_h)
        else:
            b = np_(p.b)
            out[f"bias_ih_{tag}"], out[f"bias_hh_{tag}"] = b, np.zeros_like(b)
    if isinstance(cell, LSTM) and cell.proj_size:
        out[f"weight_hr_{tag}"] = np_(np.asarray(p.w_proj).T)


def to_torch_state_dict(layer: Any, params: Any, *, tensors: bool = True) -> dict:
    """The ``state_dict`` of the PyTorch module that computes what ``layer`` computes.

    Args:
      layer: an ``rj.Stack`` of ``rj.RNN(cell)`` layers, or of
        ``rj.Bidirectional(rj.RNN(cell), rj.RNN(cell, reverse=True))`` layers with
        ``merge="concat"`` (as :func:`from_torch` builds), or one such layer. Every cell
        is the same type, hidden size, bias setting and (LSTM) ``proj_size``: Elman with
        tanh or relu, LSTM without peepholes, GRU with ``reset_after=True``, with the
        default activations.
      params: the layer's params.
      tensors: return torch tensors (imports torch) or, with ``False``, numpy arrays.

    Returns:
      A dict with PyTorch's keys in PyTorch's order (``weight_ih_l0``, ``weight_hh_l0``,
      ``bias_ih_l0``, ``bias_hh_l0``, ``weight_hr_l0``, then ``..._l0_reverse``, then
      ``l1``), for ``nn.RNN/LSTM/GRU(input_size, hidden_size, num_layers, bias,
      bidirectional=..., proj_size=...)``; load it with ``module.load_state_dict``.
      Elman and LSTM biases are written as ``bias_ih = b`` and ``bias_hh = 0``. The
      Stack's dropout is not part of a state_dict: pass it to the module yourself.

    Raises:
      ValueError: naming what PyTorch cannot express (peepholes, ``reset_after=False``,
        other activations, mixed cells, a non-concat merge, a lone reversed layer,
        residual connections, nested stacks, ...).
    """
    layers, layer_params = _layers_of(layer, params, "params")
    if isinstance(layer, Stack) and layer.residual:
        raise ValueError("Stack with residual=True; PyTorch's modules have no residual connections")
    signature = num_dirs = out_size = None
    out: dict[str, np.ndarray] = {}
    for i, (lay, p) in enumerate(zip(layers, layer_params)):
        where = f"layer {i}"
        if isinstance(lay, RNN):
            if lay.reverse:
                raise ValueError(f"{where}: RNN with reverse=True alone; PyTorch runs a reversed direction only inside a bidirectional module")
            dirs = [(lay.cell, p, "")]
        elif isinstance(lay, Bidirectional):
            if lay.merge != "concat":
                raise ValueError(f"{where}: Bidirectional with merge={lay.merge!r}; PyTorch concatenates the directions (merge='concat')")
            f, b = lay.forward, lay.backward
            if not (isinstance(f, RNN) and isinstance(b, RNN) and not f.reverse and b.reverse):
                raise ValueError(f"{where}: Bidirectional must hold rj.RNN(cell) forwards and rj.RNN(cell, reverse=True) backwards")
            if not isinstance(p, BidirectionalParams):
                raise TypeError(f"params of {where} is a {type(p).__name__}; expected BidirectionalParams")
            dirs = [(f.cell, p.forward, ""), (b.cell, p.backward, "_reverse")]
        else:
            raise ValueError(f"{where} is a {type(lay).__name__}; PyTorch's modules stack only rj.RNN and rj.Bidirectional layers (no nested Stack)")
        if num_dirs is None:
            num_dirs = len(dirs)
        elif num_dirs != len(dirs):
            raise ValueError(f"{where} has {len(dirs)} direction(s) and layer 0 has {num_dirs}; PyTorch's layers all have the same")
        for cell, cp, suffix in dirs:
            sig = _torch_signature(cell, where)
            if signature is None:
                signature = sig
            elif sig != signature:
                raise ValueError(
                    f"{where} has a cell with (mode, hidden_size, bias, proj_size) = {sig}, layer 0 has {signature}; "
                    f"a PyTorch module has the same cell in every layer"
                )
            cell.check_params(cp)
            if out_size is not None and cell.input_size(cp) != num_dirs * out_size:
                raise ValueError(
                    f"{where} takes {cell.input_size(cp)} input features; PyTorch's layer {i} takes "
                    f"{num_dirs * out_size}, the previous layer's outputs"
                )
            _cell_params_to_torch(cell, cp, f"l{i}{suffix}", out)
        out_size = dirs[0][0].output_size(0)
    if not tensors:
        return out
    import torch  # imported here so that rnnjax never needs torch

    def tensor(a: np.ndarray):
        if a.dtype == jnp.bfloat16:
            return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(a.copy())

    return {k: tensor(v) for k, v in out.items()}


# -- Keras ---------------------------------------------------------------------------


def _leaky_relu_keras(x):
    return jax.nn.leaky_relu(x, negative_slope=0.2)  # Keras' default slope


# Keras activation names -> rnnjax activations with the same definition.
_KERAS_ACTIVATIONS: dict[str, Any] = {
    **{name: name for name in ("tanh", "sigmoid", "relu", "hard_sigmoid", "hard_tanh", "elu", "selu",
                               "gelu", "silu", "hard_silu", "mish", "relu6", "softplus", "softsign",
                               "exponential", "linear")},
    "swish": "silu",
    "hard_swish": "hard_silu",
    "leaky_relu": _leaky_relu_keras,
}

_KERAS_RNNS = {"SimpleRNN": (Elman, 1), "LSTM": (LSTM, 4), "GRU": (GRU, 3)}
_KERAS_CLASSES = (*_KERAS_RNNS, "Bidirectional")
_KERAS_MERGES = {"concat": "concat", "sum": "sum", "mul": "mul", "ave": "mean"}


def _keras_activation(identifier: Any, field: str) -> Any:
    if identifier is None:
        return "linear"
    if isinstance(identifier, dict) and isinstance(identifier.get("config"), str):
        identifier = identifier["config"]  # a serialized built-in function
    if isinstance(identifier, str) and identifier in _KERAS_ACTIVATIONS:
        return _KERAS_ACTIVATIONS[identifier]
    raise ValueError(
        f"{field}={identifier!r} has no rnnjax equivalent; supported Keras activations: "
        f"{sorted(_KERAS_ACTIVATIONS)}"
    )


def _unwrap_keras(config: Mapping[str, Any], class_name: str | None) -> tuple[dict, str | None]:
    """``(layer config, class name)`` from ``get_config()`` or a serialized ``{class_name, config}``."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict from keras_layer.get_config(); got {type(config).__name__}")
    if "class_name" in config and isinstance(config.get("config"), Mapping):
        return dict(config["config"]), class_name or config["class_name"]
    return dict(config), class_name


def _keras_rnn(cfg: dict, class_name: str | None, weights: list, where: str) -> tuple[RNN, Any, int]:
    """``(RNN layer, cell params, number of weights used)`` for a SimpleRNN/LSTM/GRU config."""
    if class_name is not None and class_name not in _KERAS_RNNS:
        raise ValueError(f"{where} is a Keras {class_name}; supported: {list(_KERAS_CLASSES)}")
    if cfg.get("stateful", False):
        raise ValueError(
            f"{where} has stateful=True; rnnjax keeps no state between calls: pass the previous "
            f"final carry as apply(..., carry=...) instead"
        )
    if "units" not in cfg:
        raise ValueError(f"{where}: config has no 'units'; expected keras_layer.get_config() of SimpleRNN, LSTM or GRU")
    units = int(cfg["units"])
    use_bias = bool(cfg.get("use_bias", True))
    n = 3 if use_bias else 2
    if len(weights) < n:
        raise ValueError(f"{where} needs {n} weight arrays (kernel, recurrent_kernel{', bias' if use_bias else ''}); got {len(weights)}")
    kernel, recurrent = (_to_numpy(w, f"{where} weights[{j}]") for j, w in enumerate(weights[:2]))
    if kernel.ndim != 2 or kernel.shape[1] % units or kernel.shape[1] // units not in (1, 3, 4):
        raise ValueError(f"{where}: kernel has shape {kernel.shape}; expected (input_size, k * {units}) with k = 1, 3 or 4")
    gates = kernel.shape[1] // units
    inferred = {g: name for name, (_, g) in _KERAS_RNNS.items()}[gates]
    if class_name is not None and class_name != inferred:
        raise ValueError(f"{where} is a {class_name} but its kernel has shape {kernel.shape}, that of a {inferred}")
    class_name = inferred
    gu = gates * units
    if recurrent.shape != (units, gu):
        raise ValueError(f"{where}: recurrent_kernel has shape {recurrent.shape}; expected {(units, gu)} for {class_name}(units={units})")
    bias = None
    if use_bias:
        bias = _to_numpy(weights[2], f"{where} weights[2]")
        expected_bias = (2, gu) if class_name == "GRU" and cfg.get("reset_after", True) else (gu,)
        if bias.shape != expected_bias:
            raise ValueError(f"{where}: bias has shape {bias.shape}; expected {expected_bias} for {class_name}(units={units})")
    act = _keras_activation(cfg.get("activation", "tanh"), f"{where} activation")
    if class_name == "SimpleRNN":
        cell = Elman(units, activation=act, use_bias=use_bias)
        params = ElmanParams(_jnp(kernel), _jnp(recurrent), None if bias is None else _jnp(bias))
    elif class_name == "LSTM":
        gate = _keras_activation(cfg.get("recurrent_activation", "sigmoid"), f"{where} recurrent_activation")
        cell = LSTM(units, use_bias=use_bias, activation=act, gate_activation=gate)
        params = LSTMParams(_jnp(kernel), _jnp(recurrent), None if bias is None else _jnp(bias), None, None)
    else:
        gate = _keras_activation(cfg.get("recurrent_activation", "sigmoid"), f"{where} recurrent_activation")
        reset_after = bool(cfg.get("reset_after", True))
        cell = GRU(units, reset_after=reset_after, use_bias=use_bias, activation=act, gate_activation=gate)

        def rzn(a):  # Keras' gate blocks z, r, h -> r, z, n on the last axis
            z, r, h = np.split(a, 3, axis=-1)
            return _jnp(np.concatenate([r, z, h], axis=-1))

        b_x = b_h = None
        if bias is not None:
            b_x, b_h = (rzn(bias[0]), rzn(bias[1])) if reset_after else (rzn(bias), None)
        params = GRUParams(rzn(kernel), rzn(recurrent), b_x, b_h)
    return RNN(cell, reverse=bool(cfg.get("go_backwards", False))), params, n


def from_keras_config(config: Mapping[str, Any], weights: Sequence[Any], *, class_name: str | None = None) -> tuple[Any, Any]:
    """Build ``(layer, params)`` from a Keras layer's ``get_config()`` and ``get_weights()``.

    Supports ``SimpleRNN``, ``LSTM``, ``GRU`` (``reset_after`` True or False) and
    ``Bidirectional`` around them. The class comes from ``class_name``, from a serialized
    ``{"class_name", "config"}`` dict, or else from the kernel's shape (``units`` times
    1, 4 or 3 columns); a Bidirectional config is recognised by its ``layer`` entry.

    Returns:
      ``rj.RNN(cell)`` and the cell's params for a plain layer (``rj.RNN(cell,
      reverse=True)`` for ``go_backwards=True``); ``rj.Bidirectional`` and
      ``BidirectionalParams`` for the wrapper, ``merge_mode`` concat/sum/mul/ave mapped to
      ``"concat"``/``"sum"``/``"mul"``/``"mean"``. ``activation`` and
      ``recurrent_activation`` become ``activation`` and ``gate_activation``; GRU gates
      are reordered from Keras' ``z, r, h`` to ``r, z, n``, and a ``reset_after`` bias
      ``(2, 3H)`` splits into ``b_x`` and ``b_h``.

    Differences to know:
      - Outputs stay aligned with the inputs. A Keras layer with ``go_backwards=True``
        returns its outputs in reversed time order: ``keras_ys == ys[..., ::-1, :]``.
      - A mask of right padding is ``lengths=mask.sum(-1)``. Outputs past a length are
        zeros (as in ``Bidirectional``; a plain Keras layer repeats the last output
        there). The backward direction runs over each sequence's valid part, as Keras.
      - Keras' ``return_sequences=False`` output is the final carry's ``h`` (merged over
        the two directions), not ``ys[..., -1, :]``; ``return_state`` states are the
        final carry.
      - ``dropout`` and ``recurrent_dropout`` are ignored (they act in training only),
        as is ``unroll``.

    Raises:
      ValueError: ``stateful=True``; ``merge_mode=None``; a forward layer with
        ``go_backwards=True`` inside Bidirectional; an activation with no rnnjax
        equivalent; other classes; weights of the wrong number or shape.

    Example:
      >>> import numpy as np, rnnjax as rj
      >>> config = {"units": 4, "activation": "tanh", "recurrent_activation": "sigmoid",
      ...           "use_bias": True, "reset_after": True}  # keras.layers.GRU(4).get_config()
      >>> weights = [np.ones((3, 12)), np.ones((4, 12)), np.ones((2, 12))]  # .get_weights()
      >>> layer, params = rj.interop.from_keras_config(config, weights)
      >>> type(layer.cell).__name__, params.w_x.shape, params.b_h.shape
      ('GRU', (3, 12), (12,))
    """
    cfg, cls = _unwrap_keras(config, class_name)
    weights = list(weights)
    if cls == "Bidirectional" or (cls is None and "layer" in cfg):
        return _keras_bidirectional(cfg, weights)
    layer, params, used = _keras_rnn(cfg, cls, weights, "layer")
    if used != len(weights):
        raise ValueError(f"got {len(weights)} weight arrays; the layer's config needs {used}")
    return layer, params


def _keras_bidirectional(cfg: dict, weights: list) -> tuple[Bidirectional, BidirectionalParams]:
    if cfg.get("merge_mode", "concat") is None:
        raise ValueError(
            "Bidirectional with merge_mode=None returns the two directions separately; rnnjax's "
            "Bidirectional returns merged outputs. Convert a merge_mode='concat' layer and split "
            "ys[..., :units] (forward) from ys[..., units:] (backward)"
        )
    merge = cfg.get("merge_mode", "concat")
    if merge not in _KERAS_MERGES:
        raise ValueError(f"Bidirectional merge_mode={merge!r}; supported: {list(_KERAS_MERGES)} and None")
    if "layer" not in cfg:
        raise ValueError("Bidirectional config has no 'layer' entry; expected keras_layer.get_config()")
    fwd_cfg, fwd_cls = _unwrap_keras(cfg["layer"], None)
    if cfg.get("backward_layer") is not None:
        bwd_cfg, bwd_cls = _unwrap_keras(cfg["backward_layer"], None)
    else:
        bwd_cfg, bwd_cls = dict(fwd_cfg, go_backwards=not fwd_cfg.get("go_backwards", False)), fwd_cls
    if fwd_cfg.get("go_backwards", False) or not bwd_cfg.get("go_backwards", False):
        raise ValueError(
            "Bidirectional needs a forward layer with go_backwards=False and a backward layer with "
            "go_backwards=True; Keras' other arrangement returns outputs in reversed time order"
        )
    fwd, fp, n = _keras_rnn(fwd_cfg, fwd_cls, weights, "Bidirectional forward layer")
    bwd, bp, m = _keras_rnn(bwd_cfg, bwd_cls, weights[n:], "Bidirectional backward layer")
    if n + m != len(weights):
        raise ValueError(f"got {len(weights)} weight arrays; the Bidirectional config needs {n + m}")
    return Bidirectional(fwd, bwd, merge=_KERAS_MERGES[merge]), BidirectionalParams(fp, bp)


def from_keras(layer: Any) -> tuple[Any, Any]:
    """Build ``(layer, params)`` from a built Keras ``SimpleRNN``, ``LSTM``, ``GRU`` or
    ``Bidirectional`` layer: :func:`from_keras_config` of ``layer.get_config()`` and
    ``layer.get_weights()``; see there for the conventions.

    Raises:
      TypeError: another class (checked by class name, subclasses included).
      ValueError: the layer has no weights yet (call or build it first), or a config
        rnnjax cannot reproduce.
    """
    names = [c.__name__ for c in type(layer).__mro__]
    cls = next((n for n in names if n in _KERAS_CLASSES), None)
    if cls is None or not callable(getattr(layer, "get_config", None)):
        raise TypeError(
            f"from_keras expects a Keras SimpleRNN, LSTM, GRU or Bidirectional layer; got {type(layer).__name__}"
        )
    weights = layer.get_weights()
    if not weights:
        raise ValueError(f"the {type(layer).__name__} layer has no weights yet; call it on an input (or build it) first")
    return from_keras_config(layer.get_config(), weights, class_name=cls)
