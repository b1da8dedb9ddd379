"""Weights in from Keras' ``SimpleRNN``, ``LSTM``, ``GRU`` and ``Bidirectional`` layers.

keras is never imported: the functions read ``get_config()`` and ``get_weights()``
(numpy arrays, or anything ``np.asarray`` takes).

Conventions: matrices stay ``(in, out)`` as Keras stores them; LSTM gates stay
``i, f, g, o``; GRU gates are reordered from Keras' ``z, r, h`` to ``r, z, n``.
A right-padding mask is ``lengths=mask.sum(-1)``; the backward direction runs over each
sequence's own valid part, as in Keras.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rnnjax.cells.elman import Elman, ElmanParams
from rnnjax.cells.gru import GRU, GRUParams
from rnnjax.cells.lstm import LSTM, LSTMParams
from rnnjax.interop.weights import GATE_BLOCKS, to_jax, to_numpy
from rnnjax.layers import RNN, Bidirectional, BidirectionalParams

__all__ = ["from_keras", "from_keras_config"]


def _leaky_relu_keras(x):
    return jax.nn.leaky_relu(x, negative_slope=0.2)  # Keras' default slope


# Keras activation names -> rnnjax activations with the same definition.
_KERAS_ACTIVATIONS: dict[str, Any] = {
    **{
        name: name
        for name in (
            "tanh",
            "sigmoid",
            "relu",
            "hard_sigmoid",
            "hard_tanh",
            "elu",
            "selu",
            "gelu",
            "silu",
            "hard_silu",
            "mish",
            "relu6",
            "softplus",
            "softsign",
            "exponential",
            "linear",
        )
    },
    "swish": "silu",
    "hard_swish": "hard_silu",
    "leaky_relu": _leaky_relu_keras,
}

_KERAS_RNNS = {"SimpleRNN": Elman, "LSTM": LSTM, "GRU": GRU}
_KERAS_RNN_BY_GATES = {GATE_BLOCKS[cell]: name for name, cell in _KERAS_RNNS.items()}
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
        f"{field}={identifier!r} has no rnnjax equivalent; supported Keras activations: {sorted(_KERAS_ACTIVATIONS)}"
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
        raise ValueError(
            f"{where} needs {n} weight arrays (kernel, recurrent_kernel{', bias' if use_bias else ''}); "
            f"got {len(weights)}"
        )
    kernel, recurrent = (to_numpy(w, f"{where} weights[{j}]") for j, w in enumerate(weights[:2]))
    if kernel.ndim != 2 or kernel.shape[1] % units or kernel.shape[1] // units not in _KERAS_RNN_BY_GATES:
        raise ValueError(
            f"{where}: kernel has shape {kernel.shape}; expected (input_size, k * {units}) with k = 1, 3 or 4"
        )
    gates = kernel.shape[1] // units
    inferred = _KERAS_RNN_BY_GATES[gates]
    if class_name is not None and class_name != inferred:
        raise ValueError(f"{where} is a {class_name} but its kernel has shape {kernel.shape}, that of a {inferred}")
    class_name = inferred
    gu = gates * units
    if recurrent.shape != (units, gu):
        raise ValueError(
            f"{where}: recurrent_kernel has shape {recurrent.shape}; expected {(units, gu)} "
            f"for {class_name}(units={units})"
        )
    bias = None
    if use_bias:
        bias = to_numpy(weights[2], f"{where} weights[2]")
        expected_bias = (2, gu) if class_name == "GRU" and cfg.get("reset_after", True) else (gu,)
        if bias.shape != expected_bias:
            raise ValueError(
                f"{where}: bias has shape {bias.shape}; expected {expected_bias} for {class_name}(units={units})"
            )
    act = _keras_activation(cfg.get("activation", "tanh"), f"{where} activation")
    cell: Elman | LSTM | GRU
    params: ElmanParams | LSTMParams | GRUParams
    if class_name == "SimpleRNN":
        cell = Elman(units, activation=act, use_bias=use_bias)
        params = ElmanParams(to_jax(kernel), to_jax(recurrent), None if bias is None else to_jax(bias))
    elif class_name == "LSTM":
        gate = _keras_activation(cfg.get("recurrent_activation", "sigmoid"), f"{where} recurrent_activation")
        cell = LSTM(units, use_bias=use_bias, activation=act, gate_activation=gate)
        params = LSTMParams(to_jax(kernel), to_jax(recurrent), None if bias is None else to_jax(bias), None, None)
    else:
        gate = _keras_activation(cfg.get("recurrent_activation", "sigmoid"), f"{where} recurrent_activation")
        reset_after = bool(cfg.get("reset_after", True))
        cell = GRU(units, reset_after=reset_after, use_bias=use_bias, activation=act, gate_activation=gate)

        def rzn(a):  # Keras' gate blocks z, r, h -> r, z, n on the last axis
            z, r, h = np.split(a, 3, axis=-1)
            return to_jax(np.concatenate([r, z, h], axis=-1))

        b_x = b_h = None
        if bias is not None:
            b_x, b_h = (rzn(bias[0]), rzn(bias[1])) if reset_after else (rzn(bias), None)
        params = GRUParams(rzn(kernel), rzn(recurrent), b_x, b_h)
    return RNN(cell, reverse=bool(cfg.get("go_backwards", False))), params, n


def from_keras_config(
    config: Mapping[str, Any], weights: Sequence[Any], *, class_name: str | None = None
) -> tuple[Any, Any]:
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
        raise ValueError(
            f"the {type(layer).__name__} layer has no weights yet; call it on an input (or build it) first"
        )
    return from_keras_config(layer.get_config(), weights, class_name=cls)
