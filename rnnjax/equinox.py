"""Equinox modules around rnnjax cells and layers: :class:`Recurrent` and :class:`StepCell`.

Each module holds a static rnnjax layer (or cell) and its params, the core's NamedTuples
exactly as ``layer.init`` returns them, in the field ``params``: those arrays are the
module's only array leaves, so ``eqx.filter(model, eqx.is_array)`` selects them,
``eqx.filter_grad`` differentiates them and ``model.params`` goes straight to
``layer.apply``. Every computation is the core's (``layer.apply``, ``cell.step``).

As Equinox's own layers, the modules act on what they are given: one sequence ``(T, D)``,
or any leading batch shape ``(*batch, T, D)``; ``jax.vmap`` over a batch of single-sequence
calls gives the batched call's numbers. ``import rnnjax`` does not import this module; it
needs the extra ``rnnjax[equinox]``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.checks import check_positive_int
from rnnjax.layers import LAYER_HINT, as_cell, as_layer, uses_key
from rnnjax.optional import require

require("equinox", "rnnjax.equinox")  # before the import below: a clear error without rnnjax[equinox]

import equinox as eqx  # noqa: E402

__all__ = ["Recurrent", "StepCell"]


def _as_layer(layer: Any) -> Any:
    """``layer`` as a sequence-level layer (:func:`rnnjax.layers.as_layer`); an Equinox module is refused."""
    if isinstance(layer, eqx.Module):
        raise TypeError(
            f"Recurrent.layer is an Equinox module ({type(layer).__name__}); expected {LAYER_HINT}. "
            "Equinox cells run over time with jax.lax.scan instead"
        )
    return as_layer(layer, "Recurrent")


def _checked_params(owner: Any, params: Any, input_size: int, dtype: Any) -> Any:
    """``params`` if their structure and shapes are those of ``owner.init(key, input_size)``."""
    template = jax.eval_shape(lambda: owner.init(jax.random.key(0), input_size, dtype))
    want, got = jax.tree_util.tree_structure(template), jax.tree_util.tree_structure(params)
    if got != want:  # type: ignore[operator]  # PyTreeDef's stubs declare no __ne__
        raise ValueError(f"params have structure {got}; expected {want} (from {owner!r}.init)")
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    for (path, leaf), expected in zip(flat, jax.tree_util.tree_leaves(template)):
        if jnp.shape(leaf) != expected.shape:
            raise ValueError(
                f"params leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; expected "
                f"{expected.shape} for input_size={input_size}"
            )
    return jax.tree_util.tree_map(jnp.asarray, params)


def _init_params(owner: Any, input_size: Any, key: Any, dtype: Any, params: Any) -> Any:
    check_positive_int(input_size, "input_size")
    if (key is None) == (params is None):
        raise ValueError("pass exactly one of key= (initialise with the core's init) and params= (given weights)")
    if params is None:
        return owner.init(key, int(input_size), dtype)
    return _checked_params(owner, params, int(input_size), dtype)


class Recurrent(eqx.Module):
    """An rnnjax cell or layer as an Equinox module: ``ys = Recurrent(layer, D, key=key)(xs)``.

    Args:
      layer: an rnnjax cell (run as ``rj.RNN(cell)``) or layer (``rj.RNN``,
        ``rj.Bidirectional``, ``rj.Stack``, or any object with the layer methods). How
        the recurrence is evaluated (``method``) and its direction (``reverse``) are the
        layer's: ``rj.RNN(cell, reverse=True, method=rj.Associative())``.
      input_size: ``D``, features of ``xs`` (channels for ConvLSTM).
      key: the key of ``layer.init(key, input_size, dtype)``; ``model.params`` equals it.
      dtype: dtype of the parameters. Computation follows the core: inputs and
        parameters are promoted.
      params: instead of ``key``, given params (e.g. from ``rj.interop.from_torch``), the
        structure and shapes of ``layer.init``'s; checked.
      inference: default of the call argument; ``eqx.nn.inference_mode(model)`` sets it.

    Call: ``model(xs, *, carry=None, lengths=None, resets=None, key=None, inference=None,
    return_carry=False)`` is ``layer.apply(model.params, xs, ...)``: ``xs`` of shape
    ``(*batch, T, D)``, ``batch`` possibly empty, gives ``ys`` of shape
    ``(*batch, T, output_size)``, or ``(ys, carry)`` with ``return_carry=True``. ``key``
    feeds the dropout of a layer that has it (required unless ``inference``).

    Fields: ``params`` (the core's params, the only array leaves), ``inference``, and the
    static ``layer`` and ``input_size``. Replace the weights with
    ``eqx.tree_at(lambda m: m.params, model, new_params)``.

    Example:
      >>> import jax, jax.numpy as jnp, equinox as eqx, rnnjax as rj
      >>> from rnnjax.equinox import Recurrent
      >>> layer = rj.Bidirectional(rj.RNN(rj.GRU(4)))
      >>> model = Recurrent(layer, 3, key=jax.random.key(0))
      >>> xs, lengths = jnp.ones((2, 5, 3)), jnp.array([5, 2])
      >>> ys, (h_fwd, h_bwd) = model(xs[0], lengths=lengths[0], return_carry=True)  # one sequence
      >>> ys.shape, h_fwd.shape, type(model.params).__name__
      ((5, 8), (4,), 'BidirectionalParams')
      >>> batched = eqx.filter_vmap(lambda m, x, n: m(x, lengths=n), in_axes=(None, 0, 0))(model, xs, lengths)
      >>> bool(jnp.allclose(batched, model(xs, lengths=lengths), atol=1e-6))  # or the whole batch at once
      True
    """

    params: Any
    inference: bool
    layer: Any = eqx.field(static=True)
    input_size: int = eqx.field(static=True)

    def __init__(
        self,
        layer: Any,
        input_size: int,
        *,
        key: jax.Array | None = None,
        dtype: Any = jnp.float32,
        params: Any = None,
        inference: bool = False,
    ):
        self.layer = _as_layer(layer)
        self.params = _init_params(self.layer, input_size, key, dtype, params)
        self.input_size = int(input_size)
        self.inference = inference

    @property
    def output_size(self) -> int:
        """The number of features of ``ys``, ``layer.output_size(input_size)``."""
        return self.layer.output_size(self.input_size)

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> Any:
        """The layer's zero carry, ``layer.init_carry(batch_shape, dtype)``."""
        return self.layer.init_carry(batch_shape, dtype)

    def __call__(
        self,
        xs: jax.Array,
        *,
        carry: Any = None,
        lengths: jax.Array | None = None,
        resets: jax.Array | None = None,
        key: jax.Array | None = None,
        inference: bool | None = None,
        return_carry: bool = False,
    ) -> Any:
        """Run the layer over ``xs``: ``layer.apply(self.params, xs, ...)``.

        Args:
          xs: ``(*batch, T, D)``, ``batch`` possibly empty (``(*batch, T, H, W, C)`` for
            ConvLSTM).
          carry: initial carry, leaves ``(*batch, ...)`` (``None``: zeros).
          lengths: ``(*batch,)`` ints; resets: ``(*batch, T)`` bools; as in
            :func:`rnnjax.scan`.
          key: the dropout key of a layer with dropout (``rj.Stack(dropout=...)``), required
            unless ``inference``; other layers ignore it. Under ``jax.vmap`` give one key
            per example (``jax.random.split(key, B)``), or every example gets one mask.
          inference: ``True`` turns dropout off (default: the field).
          return_carry: also return the final carry.

        Returns:
          ``ys`` of shape ``(*batch, T, output_size)``, or ``(ys, carry)`` with
          ``return_carry=True`` (the core's order).
        """
        drop_key = None
        if uses_key(self.layer):
            inference = self.inference if inference is None else inference
            if not inference:
                if key is None:
                    raise ValueError(
                        f"{self.layer!r} has dropout: pass key=... (training) or inference=True, "
                        "or call eqx.nn.inference_mode(model) for evaluation"
                    )
                drop_key = key
        ys, carry = self.layer.apply(self.params, xs, lengths=lengths, resets=resets, carry=carry, key=drop_key)
        return (ys, carry) if return_carry else ys


class StepCell(eqx.Module):
    """One step of an rnnjax cell as an Equinox module: ``carry, y = StepCell(cell, D, key=key)(carry, x)``.

    The order is the core's (and ``jax.lax.scan``'s), ``(carry, x) -> (carry, y)``, not
    ``eqx.nn.GRUCell``'s ``(x, hidden) -> hidden``, so
    ``jax.lax.scan(lambda c, x: model(c, x), carry, xs)`` runs it over a time-major ``xs``
    (a lambda: ``scan`` hashes its function, and a module holding arrays is not hashable).

    Args:
      cell: an rnnjax cell.
      input_size: ``D``, features of ``x``.
      key, dtype, params: as in :class:`Recurrent` (``cell.init(key, input_size, dtype)``).

    Call: ``model(carry, x)`` is ``cell.step(model.params, carry, x)``: ``x`` of shape
    ``(*batch, D)``, carry leaves ``(*batch, ...)``, ``y`` of shape ``(*batch, output_size)``.

    Fields: ``params`` (the cell's params NamedTuple, the only array leaves) and the
    static ``cell`` and ``input_size``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> from rnnjax.equinox import StepCell
      >>> model = StepCell(rj.LSTM(4), 3, key=jax.random.key(0))
      >>> (h, c), y = model(model.init_carry(), jnp.ones(3))
      >>> _, ys = jax.lax.scan(lambda c, x: model(c, x), model.init_carry((2,)), jnp.ones((5, 2, 3)))
      >>> y.shape, ys.shape
      ((4,), (5, 2, 4))
    """

    params: Any
    cell: Any = eqx.field(static=True)
    input_size: int = eqx.field(static=True)

    def __init__(
        self,
        cell: Any,
        input_size: int,
        *,
        key: jax.Array | None = None,
        dtype: Any = jnp.float32,
        params: Any = None,
    ):
        self.cell = as_cell(cell)
        self.params = _init_params(self.cell, input_size, key, dtype, params)
        self.input_size = int(input_size)

    @property
    def output_size(self) -> int:
        """The number of features of ``y``, ``cell.output_size(input_size)``."""
        return self.cell.output_size(self.input_size)

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> Any:
        """The cell's zero carry, ``cell.init_carry(batch_shape, dtype)``."""
        return self.cell.init_carry(batch_shape, dtype)

    def __call__(self, carry: Any, x: jax.Array) -> tuple[Any, jax.Array]:
        """``cell.step(self.params, carry, x)``: ``x`` is ``(*batch, D)``, ``y`` is
        ``(*batch, output_size)``, carry leaves ``(*batch, ...)``."""
        return self.cell.step(self.params, carry, x)
