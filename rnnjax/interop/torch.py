"""Weights in and out of PyTorch's ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU``.

torch is imported only by ``to_torch_state_dict(..., tensors=True)``; the ``from_*``
functions read attributes and ``state_dict()``, so a duck-typed object works too.

Conventions:

- Layers take batch-first inputs ``(*batch, T, D)``; transpose PyTorch's time-major
  ``(T, B, D)`` data (``batch_first=False``) with ``jnp.swapaxes(xs, 0, 1)``.
- Weight matrices are stored ``(in, out)``, transposed from PyTorch's ``(out, in)``.
  Gate order is PyTorch's: LSTM ``i, f, g, o``; GRU ``r, z, n``.
- rnnjax's Elman and LSTM cells have one bias ``b``: import sums PyTorch's
  ``b_ih + b_hh``; export writes ``bias_ih = b`` and ``bias_hh = 0``. GRU keeps both
  (``b_x``, ``b_h``).
- ``lengths`` in ``apply`` reproduces packed sequences (``pack_padded_sequence``;
  outputs are zeros past each length, as ``pad_packed_sequence`` pads them); the
  backward direction runs over each sequence's own valid part.

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

from rnnjax.cell import check_positive_int
from rnnjax.cells.elman import Elman, ElmanParams
from rnnjax.cells.gru import GRU, GRUParams
from rnnjax.cells.lstm import LSTM, LSTMParams, LSTMState
from rnnjax.interop.weights import GATE_BLOCKS, to_jax, to_numpy
from rnnjax.layers import RNN, Bidirectional, BidirectionalParams, Stack
from rnnjax.ops import ACTIVATIONS
from rnnjax.optional import require

__all__ = ["from_torch", "from_torch_state_dict", "torch_final_state", "to_torch_state_dict"]


def _activation_name(activation: Any) -> str | None:
    """The ACTIVATIONS name of ``activation`` (a name or one of its callables), else None."""
    if isinstance(activation, str):
        return activation
    for name, fn in ACTIVATIONS.items():
        if activation is fn:
            return name
    return None


def _contiguous(array: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array))


_TORCH_MODES = ("RNN_TANH", "RNN_RELU", "RNN", "LSTM", "GRU")


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
    gh = GATE_BLOCKS[type(cell)] * hid
    proj = getattr(cell, "proj_size", None)
    out = proj or hid
    shapes: dict[str, tuple[int, ...]] = {}
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
    w_x = to_jax(sd[f"weight_ih_{tag}"].T)
    w_h = to_jax(sd[f"weight_hh_{tag}"].T)
    b_ih = sd.get(f"bias_ih_{tag}")
    b_hh = sd.get(f"bias_hh_{tag}")
    if isinstance(cell, GRU):
        return GRUParams(w_x, w_h, None if b_ih is None else to_jax(b_ih), None if b_hh is None else to_jax(b_hh))
    b = None if b_ih is None else to_jax(b_ih + b_hh)
    if isinstance(cell, LSTM):
        w_hr = sd.get(f"weight_hr_{tag}")
        return LSTMParams(w_x, w_h, b, None, None if w_hr is None else to_jax(w_hr.T))
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
    sd = {k: to_numpy(v, k) for k, v in state_dict.items()}
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
    layers: list[RNN | Bidirectional] = []
    params: list[Any] = []
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
        raise TypeError(f"from_torch expects a torch.nn.RNN, nn.LSTM or nn.GRU module; got {type(module).__name__}")
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


def _layers_of(layer: Any, what: Any, name: str) -> tuple[Sequence[Any], tuple]:
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
            raise ValueError(
                f"{where}: Elman activation {cell.activation!r}; PyTorch's nn.RNN has only 'tanh' and 'relu'"
            )
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
            raise ValueError(
                f"{where}: GRU with reset_after=False; PyTorch's nn.GRU applies the reset gate after "
                "the product (reset_after=True)"
            )
        return ("GRU", cell.hidden_size, cell.use_bias, 0)
    raise ValueError(f"{where}: PyTorch has no module for {type(cell).__name__} cells (only Elman, LSTM, GRU)")


def _cell_params_to_torch(cell, p, tag: str, out: dict) -> None:
    out[f"weight_ih_{tag}"] = _contiguous(np.asarray(p.w_x).T)
    out[f"weight_hh_{tag}"] = _contiguous(np.asarray(p.w_h).T)
    if cell.use_bias:
        if isinstance(cell, GRU):
            out[f"bias_ih_{tag}"], out[f"bias_hh_{tag}"] = _contiguous(p.b_x), _contiguous(p.b_h)
        else:
            b = _contiguous(p.b)
            out[f"bias_ih_{tag}"], out[f"bias_hh_{tag}"] = b, np.zeros_like(b)
    if isinstance(cell, LSTM) and cell.proj_size:
        out[f"weight_hr_{tag}"] = _contiguous(np.asarray(p.w_proj).T)


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
                raise ValueError(
                    f"{where}: RNN with reverse=True alone; PyTorch runs a reversed direction only inside "
                    "a bidirectional module"
                )
            dirs = [(lay.cell, p, "")]
        elif isinstance(lay, Bidirectional):
            if lay.merge != "concat":
                raise ValueError(
                    f"{where}: Bidirectional with merge={lay.merge!r}; PyTorch concatenates the directions "
                    "(merge='concat')"
                )
            f, b = lay.forward, lay.backward
            if not (isinstance(f, RNN) and isinstance(b, RNN) and not f.reverse and b.reverse):
                raise ValueError(
                    f"{where}: Bidirectional must hold rj.RNN(cell) forwards and rj.RNN(cell, reverse=True) backwards"
                )
            if not isinstance(p, BidirectionalParams):
                raise TypeError(f"params of {where} is a {type(p).__name__}; expected BidirectionalParams")
            dirs = [(f.cell, p.forward, ""), (b.cell, p.backward, "_reverse")]
        else:
            raise ValueError(
                f"{where} is a {type(lay).__name__}; PyTorch's modules stack only rj.RNN and "
                "rj.Bidirectional layers (no nested Stack)"
            )
        if num_dirs is None:
            num_dirs = len(dirs)
        elif num_dirs != len(dirs):
            raise ValueError(
                f"{where} has {len(dirs)} direction(s) and layer 0 has {num_dirs}; PyTorch's layers all have the same"
            )
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
    torch = require("torch", "to_torch_state_dict(..., tensors=True)")  # lazily: rnnjax never needs torch

    def tensor(a: np.ndarray):
        if a.dtype == jnp.bfloat16:
            return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(a.copy())

    return {k: tensor(v) for k, v in out.items()}
