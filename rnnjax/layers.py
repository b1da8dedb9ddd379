"""Sequence-level layers: ``RNN(cell)``, ``Bidirectional`` and ``Stack``.

Every layer is a frozen, hashable dataclass with

- ``init(key, input_size, dtype=jnp.float32) -> params``
- ``apply(params, xs, *, lengths=None, resets=None, carry=None, key=None) -> (ys, carry)``
- ``output_size(input_size) -> int`` and ``init_carry(batch_shape, dtype) -> carry``

``xs`` is ``(*batch, T, D)`` (``(*batch, T, H, W, C)`` for ConvLSTM), and ``lengths`` and
``resets`` mean what they mean in :func:`rnnjax.scan`. ``key`` feeds dropout and
nothing else; without a key a layer is deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import Cell, PyTree, frozen
from rnnjax.checks import is_real_number
from rnnjax.methods import Method, method_for
from rnnjax.scan import check_no_replaced_options, scan
from rnnjax.sequence import check_reverse, zero_past


@frozen
class RNN:
    """A cell run over the time axis by :func:`rnnjax.scan`.

    Args:
      cell: any rnnjax cell.
      reverse: run each sequence backwards over its valid part (see :func:`rnnjax.scan`).
      method: how to evaluate the recurrence: a method value (``rj.Sequential()``,
        ``rj.Associative()``, ``rj.Chunked()``, ``rj.Newton()``, ``rj.Auto()``) or its name;
        checked against the cell when the layer is built.

    Params are the cell's; the carry is the cell's final carry.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> layer = rj.RNN(rj.LSTM(8), method=rj.Sequential(remat="sqrt"))
      >>> params = layer.init(jax.random.key(0), input_size=3)
      >>> ys, (h, c) = layer.apply(params, jnp.ones((2, 5, 3)), lengths=jnp.array([5, 2]))
      >>> ys.shape, h.shape
      ((2, 5, 8), (2, 8))
    """

    cell: Cell
    reverse: bool = False
    method: Method | str | None = None  # None: the cell's default (rnnjax.methods.default_method)

    def __new__(cls, *args: Any, **kwargs: Any) -> RNN:
        # An old option (unroll=, vjp=, ...) names its method value instead of Python's bare
        # "unexpected keyword argument".
        fields = {f.name for f in dataclasses.fields(cls)}
        check_no_replaced_options({k: v for k, v in kwargs.items() if k not in fields}, "rj.RNN")
        return super().__new__(cls)

    def __post_init__(self):
        if not isinstance(self.cell, Cell):
            raise TypeError(f"RNN expects an rnnjax cell (e.g. rj.LSTM(64)), got {self.cell!r}")
        object.__setattr__(self, "reverse", check_reverse(self.reverse))
        object.__setattr__(self, "method", method_for(self.cell, self.method))
        self.method.check(self.cell)

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> NamedTuple:
        return self.cell.init(key, input_size, dtype)

    def fixed_input_size(self) -> int | None:
        return self.cell.fixed_input_size()

    def output_size(self, input_size: int) -> int:
        return self.cell.output_size(input_size)

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> PyTree:
        return self.cell.init_carry(batch_shape, dtype)

    def apply(self, params, xs, *, lengths=None, resets=None, carry=None, key=None):
        del key  # a single recurrent layer has no randomness
        return scan(
            self.cell, params, xs, carry, lengths=lengths, resets=resets, reverse=self.reverse, method=self.method
        )


class BidirectionalParams(NamedTuple):
    forward: Any  # the forward layer's params
    backward: Any  # the backward layer's params


_MERGES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "concat": lambda f, b: jnp.concatenate([f, b], axis=-1),
    "sum": lambda f, b: f + b,
    "mean": lambda f, b: (f + b) / 2,
    "mul": lambda f, b: f * b,
}


@frozen
class Bidirectional:
    """Two layers over the same sequence, one forwards and one backwards, outputs merged.

    Args:
      forward: the forward layer, e.g. ``rj.RNN(rj.GRU(64))``.
      backward: the backward layer; by default a copy of ``forward`` with ``reverse``
        flipped (its own parameters). Its outputs are aligned with the inputs.
      merge: ``"concat"`` (features ``[forward, backward]``, as PyTorch and Keras),
        ``"sum"``, ``"mean"``, ``"mul"``, or a callable ``(y_fwd, y_bwd) -> y``.

    Params: ``BidirectionalParams(forward, backward)``. Carry: ``(forward, backward)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> layer = rj.Bidirectional(rj.RNN(rj.GRU(8)))
      >>> params = layer.init(jax.random.key(0), input_size=3)
      >>> ys, (h_fwd, h_bwd) = layer.apply(params, jnp.ones((4, 3)))
      >>> ys.shape
      (4, 16)
    """

    forward: Any
    backward: Any = None
    merge: str | Callable[[jax.Array, jax.Array], jax.Array] = "concat"

    def __post_init__(self):
        for name in ("forward", "backward"):
            layer = getattr(self, name)
            if layer is not None and not (hasattr(layer, "init") and hasattr(layer, "apply")):
                raise TypeError(f"Bidirectional.{name} must be a layer such as rj.RNN(cell), got {layer!r}")
        if self.backward is None:
            if not isinstance(self.forward, RNN):
                raise TypeError("Bidirectional needs an explicit backward layer unless forward is an rj.RNN")
            object.__setattr__(self, "backward", dataclasses.replace(self.forward, reverse=not self.forward.reverse))
        if not callable(self.merge) and self.merge not in _MERGES:
            raise ValueError(f"unknown merge {self.merge!r}; expected a callable or one of {sorted(_MERGES)}")

    def fixed_input_size(self) -> int | None:
        return self.forward.fixed_input_size() or self.backward.fixed_input_size()

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> BidirectionalParams:
        self.output_size(input_size)  # a merge other than concat needs equal sizes: say so now
        kf, kb = jax.random.split(key)
        return BidirectionalParams(self.forward.init(kf, input_size, dtype), self.backward.init(kb, input_size, dtype))

    def output_size(self, input_size: int) -> int:
        f, b = self.forward.output_size(input_size), self.backward.output_size(input_size)
        if self.merge == "concat":
            return f + b
        if f != b:
            raise ValueError(
                f"merge={self.merge!r} needs equal output sizes, got forward {f} and backward {b}; "
                f"use merge='concat' or layers of one size"
            )
        return f

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> tuple:
        return (self.forward.init_carry(batch_shape, dtype), self.backward.init_carry(batch_shape, dtype))

    def apply(self, params, xs, *, lengths=None, resets=None, carry=None, key=None):
        if not isinstance(params, BidirectionalParams):
            raise TypeError(
                f"params is a {type(params).__name__}; expected BidirectionalParams (from Bidirectional.init)"
            )
        if carry is not None and not (isinstance(carry, tuple) and len(carry) == 2):
            raise ValueError("carry of a Bidirectional layer must be a (forward, backward) pair")
        kf, kb = (None, None) if key is None else jax.random.split(key)
        cf, cb = (None, None) if carry is None else carry
        yf, cf = self.forward.apply(params.forward, xs, lengths=lengths, resets=resets, carry=cf, key=kf)
        yb, cb = self.backward.apply(params.backward, xs, lengths=lengths, resets=resets, carry=cb, key=kb)
        if self.merge != "concat" and not callable(self.merge) and yf.shape != yb.shape:
            raise ValueError(
                f"merge={self.merge!r} needs equal output sizes, got forward {yf.shape[-1]} and "
                f"backward {yb.shape[-1]}; use merge='concat' or layers of one size"
            )
        merge = self.merge if callable(self.merge) else _MERGES[self.merge]
        return merge(yf, yb), (cf, cb)


@frozen
class Stack:
    """Layers applied one after another, with dropout and residual connections between them.

    Args:
      layers: a sequence of layers (``RNN``, ``Bidirectional``, ``Stack``, ...).
      dropout: probability of zeroing each output feature of every layer but the last,
        independently per step (PyTorch's ``dropout``). Active only when ``apply`` gets a
        ``key``; kept features are scaled by ``1 / (1 - dropout)``.
      residual: add each layer's input to its output wherever the two have the same
        number of features (usually every layer but the first).

    Params: a tuple with one entry per layer. Carry: a tuple with one carry per layer.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> layer = rj.Stack([rj.Bidirectional(rj.RNN(rj.GRU(8))), rj.RNN(rj.LSTM(8))], dropout=0.1)
      >>> params = layer.init(jax.random.key(0), input_size=3)
      >>> ys, carries = layer.apply(params, jnp.ones((2, 5, 3)), key=jax.random.key(1))
      >>> ys.shape, len(carries)
      ((2, 5, 8), 2)
    """

    layers: Sequence[Any]
    dropout: float = 0.0
    residual: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("Stack needs at least one layer")
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Cell):
                raise TypeError(f"Stack.layers[{i}] is a cell; wrap it as rj.RNN({layer!r})")
            if not (hasattr(layer, "init") and hasattr(layer, "apply")):
                raise TypeError(f"Stack.layers[{i}] must be a layer such as rj.RNN(cell), got {layer!r}")
        if not is_real_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def _sizes(self, input_size: int) -> list[int]:
        sizes = [input_size]
        for layer in self.layers:
            sizes.append(layer.output_size(sizes[-1]))
        return sizes

    def fixed_input_size(self) -> int | None:
        return self.layers[0].fixed_input_size()

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> tuple:
        sizes = self._sizes(input_size)
        keys = jax.random.split(key, len(self.layers))
        return tuple(layer.init(k, n, dtype) for layer, k, n in zip(self.layers, keys, sizes))

    def output_size(self, input_size: int) -> int:
        return self._sizes(input_size)[-1]

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> tuple:
        return tuple(layer.init_carry(batch_shape, dtype) for layer in self.layers)

    def apply(self, params, xs, *, lengths=None, resets=None, carry=None, key=None):
        n = len(self.layers)
        if not isinstance(params, tuple) or len(params) != n:
            raise TypeError(
                f"params must be a tuple of {n} layer params (from Stack.init), got {type(params).__name__}"
            )
        if carry is not None and not (isinstance(carry, tuple) and len(carry) == n):
            raise ValueError(f"carry of a Stack must be a tuple of {n} layer carries, or None")
        keys = [None] * n if key is None else list(jax.random.split(key, n))
        carries = []
        for i, (layer, p) in enumerate(zip(self.layers, params)):
            layer_key = drop_key = None
            if keys[i] is not None:
                layer_key, drop_key = jax.random.split(keys[i])
            ys, c = layer.apply(
                p, xs, lengths=lengths, resets=resets, carry=None if carry is None else carry[i], key=layer_key
            )
            carries.append(c)
            if self.residual and ys.shape == xs.shape:
                ys = ys + xs.astype(ys.dtype)
                if lengths is not None:
                    ys = zero_past(ys, lengths, xs.ndim - jnp.ndim(lengths) - 1)
            if i < n - 1 and drop_key is not None and self.dropout > 0:
                keep = jax.random.bernoulli(drop_key, 1.0 - self.dropout, ys.shape)
                ys = jnp.where(keep, ys / (1.0 - self.dropout), jnp.zeros((), ys.dtype))
            xs = ys
        return xs, tuple(carries)


# Shared by the Flax and Equinox wrappers; not exported by rnnjax.
LAYER_HINT = "an rnnjax cell (e.g. rj.LSTM(64)) or layer (rj.RNN, rj.Bidirectional, rj.Stack)"


def as_layer(layer: Any, owner: str = "Recurrent") -> Any:
    """``layer`` as a sequence-level layer: a cell becomes ``RNN(cell)``; anything without
    ``init`` and ``apply`` is a ``TypeError`` naming ``owner``."""
    if isinstance(layer, Cell):
        return RNN(layer)
    if isinstance(layer, type) or not (
        callable(getattr(layer, "init", None)) and callable(getattr(layer, "apply", None))
    ):
        raise TypeError(f"{owner}.layer must be {LAYER_HINT}, got {layer!r}")
    return layer


def as_cell(cell: Any, owner: str = "StepCell") -> Cell:
    """``cell`` itself if it is an rnnjax cell, else a ``TypeError`` naming ``owner``."""
    if not isinstance(cell, Cell):
        hint = " (StepCell takes the cell itself, e.g. rj.GRU(8), not a layer)" if hasattr(cell, "apply") else ""
        raise TypeError(f"{owner}.cell must be an rnnjax cell such as rj.LSTM(64), got {cell!r}{hint}")
    return cell


def uses_key(layer: Any) -> bool:
    """Whether ``layer.apply`` draws random numbers from its ``key`` (dropout)."""
    if isinstance(layer, (Cell, RNN)):
        return False
    if isinstance(layer, Bidirectional):
        return uses_key(layer.forward) or uses_key(layer.backward)
    if isinstance(layer, Stack):
        return (layer.dropout > 0 and len(layer.layers) > 1) or any(uses_key(sub) for sub in layer.layers)
    return True  # a user-defined layer: assume it may
