"""Flax NNX modules around rnnjax cells and layers.

:class:`Recurrent` holds one ``nnx.Param`` per array of the core's params, as an
attribute named by its path (``w_x``; ``forward.w_x`` in a :class:`rnnjax.Bidirectional`;
``layers_0.w_x`` in a :class:`rnnjax.Stack`), and calls the core's ``layer.apply`` for
every computation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rnnjax.checks import check_positive_int
from rnnjax.flax import _params
from rnnjax.flax._params import Partitioning

__all__ = ["Recurrent", "from_core_params", "to_core_params"]


def _get(variable: nnx.Variable) -> Any:
    return _params.unwrap(variable)


def _set(variable: nnx.Variable, value: Any) -> None:
    if hasattr(variable, "set_value"):  # flax >= 0.11
        variable.set_value(value)
    else:
        variable.value = value


class ParamGroup(nnx.Module):
    """One nesting level of a :class:`Recurrent`'s parameters (``forward``, ``layers_0``, ...)."""


_RESERVED = {"layer", "input_size", "dtype", "deterministic", "rngs"}


def _check_name(owner: Any, name: str) -> None:
    if name in _RESERVED or hasattr(type(owner), name) or not name.isidentifier():
        raise ValueError(
            f"cannot hold a parameter named {name!r} as an attribute of {type(owner).__name__}; "
            "rename the field of the cell's params NamedTuple"
        )


def _dropout_key(rngs: Any) -> jax.Array:
    if rngs is None:
        raise ValueError(
            "the layer has dropout and no random stream: pass rngs=nnx.Rngs(dropout=...) (or a key) "
            "to the call, construct the module with a 'dropout' or default stream, or call it with "
            "deterministic=True"
        )
    if isinstance(rngs, nnx.Rngs):
        return rngs.dropout()  # the 'default' stream when there is no 'dropout' stream
    if callable(rngs):  # an nnx.RngStream
        return rngs()
    return rngs  # a key


class Recurrent(nnx.Module):
    """An rnnjax cell or layer as an NNX module: ``ys = Recurrent(layer, D, rngs=rngs)(xs)``.

    Args:
      layer: an rnnjax cell (run as ``rj.RNN(cell)``) or layer (``rj.RNN``,
        ``rj.Bidirectional``, ``rj.Stack``, or any object with the layer methods).
      input_size: ``D``, features of ``xs`` (channels for ConvLSTM).
      rngs: ``rngs.params()`` gives the one key of ``layer.init(key, input_size, dtype)``;
        layers with dropout also keep a fork of its ``dropout`` stream (``default`` when
        there is none; with neither, the call needs ``rngs``).
      dtype: dtype of the parameters. Computation follows the core: inputs and
        parameters are promoted.
      param_partitioning: ``None``, a mapping from parameter paths (``"forward/w_x"``) or
        names (``"w_x"``) to axis names, or a callable ``(path, shape) -> axis names or
        None``; the names become the ``nnx.Param``'s sharding metadata (read them with
        ``nnx.get_partition_spec``; Flax >= 0.12 shards eagerly and needs a mesh).
      deterministic: default of the call argument (``model.eval()`` sets it to True).

    Attributes: ``layer``, ``input_size``, and one ``nnx.Param`` per parameter array,
    nested in :class:`ParamGroup` modules as the params are (``model.forward.w_x``).

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> from flax import nnx
      >>> from rnnjax.flax import nnx as rjn
      >>> model = rjn.Recurrent(rj.Bidirectional(rj.RNN(rj.LSTM(4))), 3, rngs=nnx.Rngs(0))
      >>> ys, (fwd, bwd) = model(jnp.ones((2, 5, 3)), lengths=jnp.array([5, 2]), return_carry=True)
      >>> ys.shape, model.forward.w_x.shape, type(model.core_params()).__name__
      ((2, 5, 8), (3, 16), 'BidirectionalParams')
    """

    def __init__(
        self,
        layer: Any,
        input_size: int,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_partitioning: Partitioning = None,
        deterministic: bool = False,
    ):
        self.layer = _params.as_layer(layer)
        check_positive_int(input_size, "input_size")
        self.input_size = int(input_size)
        self.dtype = dtype
        self.deterministic = deterministic
        params = self.layer.init(rngs.params(), self.input_size, dtype)
        paths = _params.leaf_paths(self.layer, params)
        for path, leaf in zip(paths, jax.tree_util.tree_leaves(params)):
            owner = self
            for name in path[:-1]:
                if not isinstance(getattr(owner, name, None), ParamGroup):
                    _check_name(owner, name)
                    setattr(owner, name, ParamGroup())
                owner = getattr(owner, name)
            _check_name(owner, path[-1])
            names = _params.partition_names(param_partitioning, path, np.shape(leaf))
            if names is not None:
                leaf = nnx.with_partitioning(lambda leaf=leaf: leaf, names)()
            setattr(owner, path[-1], nnx.Param(leaf))
        stream = None
        if _params.uses_key(self.layer):
            try:
                stream = rngs.dropout  # the 'default' stream when there is no 'dropout' one
            except (AttributeError, KeyError):  # neither: rngs must come with each call
                pass
            else:  # flax >= 0.11 layers keep a fork of the stream; 0.10 ones share the Rngs
                stream = stream.fork() if hasattr(stream, "fork") else rngs
        self.rngs = stream  # assigned once: flax >= 0.12 fixes data/static on first assignment

    def _variables(self) -> list[nnx.Variable]:
        _, paths, _ = _params.structure(self.layer, self.input_size, self.dtype)
        out = []
        for path in paths:
            node: Any = self
            for name in path:
                node = getattr(node, name)
            out.append(node)
        return out

    def core_params(self) -> Any:
        """The parameters as the core's params (NamedTuples), for ``layer.apply``."""
        treedef, _, _ = _params.structure(self.layer, self.input_size, self.dtype)
        return jax.tree_util.tree_unflatten(treedef, [_get(v) for v in self._variables()])

    def load_core_params(self, params: Any) -> None:
        """Set the parameters from the core's params (e.g. from ``rj.interop``), in place;
        shapes must match, metadata is kept."""
        treedef, paths, _ = _params.structure(self.layer, self.input_size, self.dtype)
        got = jax.tree_util.tree_structure(params)
        if got != treedef:
            raise ValueError(f"params have structure {got}; expected {treedef} (from {self.layer!r}.init)")
        for path, variable, leaf in zip(paths, self._variables(), jax.tree_util.tree_leaves(params)):
            old, new = np.shape(_get(variable)), np.shape(leaf)
            if old != new:
                raise ValueError(
                    f"params leaf {'/'.join(path)!r} has shape {new}; expected {old} for input_size={self.input_size}"
                )
            _set(variable, jnp.asarray(leaf))

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> Any:
        """The layer's zero carry, ``layer.init_carry(batch_shape, dtype)``."""
        return self.layer.init_carry(batch_shape, dtype)

    def __call__(self, xs, lengths=None, resets=None, carry=None, *, return_carry=False, deterministic=None, rngs=None):
        """Run the layer over ``xs``.

        Args:
          xs: ``(*batch, T, D)`` (``(*batch, T, H, W, C)`` for ConvLSTM).
          lengths, resets, carry: as in ``layer.apply`` (see :func:`rnnjax.scan`).
          return_carry: also return the final carry.
          deterministic: ``False`` applies the layer's dropout (``rj.Stack(dropout=...)``);
            default: the attribute. Layers without dropout ignore it.
          rngs: ``nnx.Rngs``, an ``RngStream`` or a key for the dropout mask; default:
            the stream kept at construction.

        Returns:
          ``ys`` of shape ``(*batch, T, layer.output_size(D))``, or ``(ys, carry)`` with
          ``return_carry=True`` (the core's order).
        """
        deterministic = self.deterministic if deterministic is None else deterministic
        key = None
        if not deterministic and _params.uses_key(self.layer):
            key = _dropout_key(self.rngs if rngs is None else rngs)
        ys, carry = self.layer.apply(self.core_params(), xs, lengths=lengths, resets=resets, carry=carry, key=key)
        return (ys, carry) if return_carry else ys


def _pure(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _pure(v) for k, v in tree.items()}
    return _params.unwrap(tree)


def to_core_params(layer: Any, state: Mapping, *, input_size: int | None = None, dtype: Any = jnp.float32) -> Any:
    """The core's params (NamedTuples) from ``nnx.state(model, nnx.Param)`` (or its pure dict).

    ``input_size`` and ``dtype`` only derive the structure, which does not depend on them.

    Example:
      >>> import jax, rnnjax as rj
      >>> from flax import nnx
      >>> from rnnjax.flax import nnx as rjn
      >>> model = rjn.Recurrent(rj.Elman(4), 3, rngs=nnx.Rngs(0))
      >>> rjn.to_core_params(rj.Elman(4), nnx.state(model, nnx.Param)).w_h.shape
      (4, 4)
    """
    return _params.to_core(layer, _pure(state), input_size, dtype)


def from_core_params(layer: Any, params: Any) -> dict:
    """A pure dict of arrays shaped as ``nnx.state(model, nnx.Param)``, from the core's params.

    Load it with ``nnx.update(model, nnx.State(tree))``, or load the core's params with
    :meth:`Recurrent.load_core_params`.

    Example:
      >>> import jax, rnnjax as rj
      >>> from flax import nnx
      >>> from rnnjax.flax import nnx as rjn
      >>> layer = rj.Bidirectional(rj.RNN(rj.GRU(4)))
      >>> tree = rjn.from_core_params(layer, layer.init(jax.random.key(1), 3))
      >>> model = rjn.Recurrent(layer, 3, rngs=nnx.Rngs(0))
      >>> nnx.update(model, nnx.State(tree))
      >>> bool((model.forward.w_x[...] == tree["forward"]["w_x"]).all())
      True
    """
    return _params.from_core(_params.as_layer(layer, "from_core_params"), params)
