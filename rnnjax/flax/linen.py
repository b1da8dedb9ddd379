"""Flax linen modules around rnnjax cells and layers.

The modules hold parameters and delegate every computation to the core: ``Recurrent``
calls ``layer.apply`` and ``StepCell`` calls ``cell.step``. Each array of the core's
params is its own Flax param, named by its path (``w_x``; ``forward/w_x`` in a
:class:`rnnjax.Bidirectional`; ``layers_0/...`` in a :class:`rnnjax.Stack`), and is
initialised by the core's ``layer.init`` from one ``self.make_rng("params")`` key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.cell import carry_batch_shape
from rnnjax.flax import _params
from rnnjax.flax._params import Partitioning

__all__ = ["Recurrent", "StepCell", "from_core_params", "to_core_params"]


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            return None
        tree = tree[name]
    return tree


def _entries(paths, shapes, partitioning: Partitioning) -> tuple:
    """Nested ``(name, leaf_index, axis_names)`` / ``(name, sub_entries)`` tuples, one level per scope."""
    groups: dict[str, Any] = {}
    for i, (path, shape) in enumerate(zip(paths, shapes)):
        node = groups
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = (i, _params.partition_names(partitioning, path, shape.shape))

    def freeze(node):
        return tuple((k, freeze(v)) if isinstance(v, dict) else (k, *v) for k, v in node.items())

    return freeze(groups)


def _declare_entries(module: nn.Module, entries: tuple, init_leaves, out: dict) -> None:
    stored = module.variables.get("params", {})
    for entry in entries:
        name = entry[0]
        if len(entry) == 2:  # a group of parameters: its own scope
            out.update(_Params(entry[1], name=name)(init_leaves))
            continue
        _, index, names = entry
        if init_leaves is not None:
            value = init_leaves[index]

            def init_fn(rng, value=value, names=names):
                del rng  # the values come from the core's init, drawn from one key
                return value if names is None else nn.Partitioned(value, names=names)
        else:  # the parameter exists; Flax compares the placeholder's shape with it
            shape = np.shape(_params.unwrap(stored[name])) if name in stored else ()

            def init_fn(rng, shape=shape):  # type: ignore[misc]  # other defaults; Flax passes rng only
                del rng
                return jnp.zeros(shape)

        out[index] = module.param(name, init_fn)


class _Params(nn.Module):
    """One nesting level of parameters (``forward``, ``layers_0``, ...)."""

    entries: tuple

    @nn.compact
    def __call__(self, init_leaves):
        out: dict[int, Any] = {}
        _declare_entries(self, self.entries, init_leaves, out)
        return out


def _declare(module: nn.Module, layer: Any, input_size: int) -> Any:
    """Declare ``layer``'s params in ``module`` and return them as the core's NamedTuples."""
    treedef, paths, shapes = _params.structure(layer, input_size, module.dtype)
    stored = module.variables.get("params", {})
    init_leaves = None
    missing = ["/".join(path) for path in paths if _lookup(stored, path) is None]
    if missing:
        if not module.is_mutable_collection("params"):
            raise ValueError(
                f"the params of {type(module).__name__} lack {missing} for {layer!r}; expected entries "
                f"{sorted('/'.join(p) for p in paths)} (build them with model.init or from_core_params)"
            )
        key = module.make_rng("params")
        init_leaves = jax.tree_util.tree_leaves(layer.init(key, input_size, module.dtype))
    out: dict[int, Any] = {}
    _declare_entries(module, _entries(paths, shapes, module.param_partitioning), init_leaves, out)
    return jax.tree_util.tree_unflatten(treedef, [out[i] for i in range(len(paths))])


def _input_size(x: Any, name: str, layer: Any) -> int:
    shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
    if not shape:
        raise ValueError(f"{name} has shape (); expected (..., features) for {layer!r}")
    return int(shape[-1])


class Recurrent(nn.Module):
    """An rnnjax cell or layer as a linen module: ``ys = Recurrent(layer)(xs)``.

    Attributes:
      layer: an rnnjax cell (run as ``rj.RNN(cell)``) or layer (``rj.RNN``,
        ``rj.Bidirectional``, ``rj.Stack``, or any object with the layer methods).
      dtype: dtype of the parameters, passed to ``layer.init``. Computation follows the
        core: inputs and parameters are promoted.
      param_partitioning: ``None``, a mapping from parameter paths (``"forward/w_x"``) or
        names (``"w_x"``) to axis names, or a callable ``(path, shape) -> axis names or
        None``. Named parameters are boxed in ``nn.Partitioned`` (read them with
        ``nn.get_partition_spec``).
      deterministic, return_carry: defaults of the call arguments (set them here under
        ``nn.vmap``/``nn.scan``, whose lifted calls drop keyword arguments).

    Params: one Flax param per array of the core's params, named by its path; the
    input size is taken from ``xs`` at ``init``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> from rnnjax.flax import linen as rjl
      >>> model = rjl.Recurrent(rj.Bidirectional(rj.RNN(rj.GRU(4))))
      >>> xs = jnp.ones((2, 5, 3))
      >>> variables = model.init(jax.random.key(0), xs)
      >>> ys, (h_fwd, h_bwd) = model.apply(variables, xs, lengths=jnp.array([5, 2]), return_carry=True)
      >>> ys.shape, h_fwd.shape, sorted(variables["params"])
      ((2, 5, 8), (2, 4), ['backward', 'forward'])
    """

    layer: Any
    dtype: Any = jnp.float32
    param_partitioning: Partitioning = None
    deterministic: bool | None = None
    return_carry: bool = False

    def __post_init__(self):
        _params.as_layer(self.layer)
        super().__post_init__()

    @nn.compact
    def __call__(self, xs, lengths=None, resets=None, carry=None, *, return_carry=None, deterministic=None):
        """Run the layer over ``xs``.

        Args:
          xs: ``(*batch, T, D)`` (``(*batch, T, H, W, C)`` for ConvLSTM).
          lengths, resets, carry: as in ``layer.apply`` (see :func:`rnnjax.scan`). Under
            ``nn.vmap`` pass them positionally: its lifted call drops keyword arguments.
          return_carry: also return the final carry (default: the attribute).
          deterministic: ``False`` applies the layer's dropout (``rj.Stack(dropout=...)``)
            with a key from ``self.make_rng("dropout")``. Required (here or as the
            attribute) for layers with dropout; layers without dropout ignore it.

        Returns:
          ``ys`` of shape ``(*batch, T, layer.output_size(D))``, or ``(ys, carry)`` with
          ``return_carry=True``: the core's order, unlike ``flax.linen.RNN``'s
          ``(carry, ys)``.
        """
        layer = _params.as_layer(self.layer)
        params = _declare(self, layer, _input_size(xs, "xs", layer))
        deterministic = self.deterministic if deterministic is None else deterministic
        key = None
        if _params.uses_key(layer):
            if deterministic is None:
                raise ValueError(
                    f"{layer!r} has dropout: pass deterministic=True (no dropout) or deterministic=False "
                    "(dropout, with a 'dropout' rng: model.apply(..., rngs={'dropout': key}))"
                )
            if not deterministic:
                key = self.make_rng("dropout")
        ys, carry = layer.apply(params, xs, lengths=lengths, resets=resets, carry=carry, key=key)
        return_carry = self.return_carry if return_carry is None else return_carry
        return (ys, carry) if return_carry else ys

    @nn.nowrap
    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> Any:
        """The layer's zero carry, ``layer.init_carry(batch_shape, dtype)``."""
        return _params.as_layer(self.layer).init_carry(batch_shape, dtype)

    @nn.nowrap
    def core_params(self, variables: Mapping) -> Any:
        """The core's params (NamedTuples) from ``variables`` or ``variables["params"]``."""
        return to_core_params(self.layer, variables, dtype=self.dtype)


class StepCell(nn.RNNCellBase):
    """One step of an rnnjax cell as a linen cell: ``carry, y = StepCell(cell)(carry, x)``.

    Follows Flax's ``RNNCellBase`` protocol, so it runs inside ``flax.linen.RNN`` and
    under ``nn.scan``; parameters are named as in :class:`Recurrent`.

    Attributes:
      cell: an rnnjax cell.
      dtype: dtype of the parameters and of ``initialize_carry``'s carry.
      param_partitioning: as in :class:`Recurrent`.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj, flax.linen as nn
      >>> from rnnjax.flax import linen as rjl
      >>> model = nn.RNN(rjl.StepCell(rj.LSTM(4)))
      >>> xs = jnp.ones((2, 5, 3))
      >>> ys, variables = model.init_with_output(jax.random.key(0), xs)
      >>> ys.shape
      (2, 5, 4)
    """

    cell: Any
    dtype: Any = jnp.float32
    param_partitioning: Partitioning = None

    def __post_init__(self):
        _params.as_cell(self.cell)
        super().__post_init__()

    @nn.compact
    def __call__(self, carry, x):
        """``(carry, x) -> (carry, y)``: ``cell.step``; ``x`` is ``(*batch, D)``."""
        params = _declare(self, _params.as_layer(self.cell), _input_size(x, "x", self.cell))
        return self.cell.step(params, carry, x)

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> Any:
        """Zeros for inputs of shape ``input_shape`` (``(*batch, D)``); ``rng`` is unused."""
        del rng
        return self.cell.init_carry(carry_batch_shape(tuple(input_shape)), self.dtype)

    @property
    def num_feature_axes(self) -> int:
        return self.cell.input_ndim


def to_core_params(layer: Any, params: Mapping, *, input_size: int | None = None, dtype: Any = jnp.float32) -> Any:
    """The core's params (NamedTuples) from a linen params tree.

    Args:
      layer: the cell or layer the module wraps.
      params: ``variables["params"]`` (or ``variables`` itself); ``nn.Partitioned`` boxes
        are unboxed.
      input_size, dtype: only to derive the structure, which does not depend on them
        (``None``: the size the layer fixes, else 1).

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> from rnnjax.flax import linen as rjl
      >>> variables = rjl.Recurrent(rj.Elman(4)).init(jax.random.key(0), jnp.ones((5, 3)))
      >>> rjl.to_core_params(rj.Elman(4), variables).w_x.shape
      (3, 4)
    """
    layer = _params.as_layer(layer, "to_core_params")
    _, paths, _ = _params.structure(layer, input_size, dtype)
    if isinstance(params, Mapping) and "params" in params and "params" not in {p[0] for p in paths}:
        params = params["params"]
    return _params.to_core(layer, params, input_size, dtype)


def from_core_params(layer: Any, params: Any, *, param_partitioning: Partitioning = None) -> dict:
    """A linen params tree (``variables["params"]``) from the core's params.

    With ``param_partitioning`` (as in :class:`Recurrent`) leaves are boxed in
    ``nn.Partitioned``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> from rnnjax.flax import linen as rjl
      >>> layer = rj.RNN(rj.LSTM(4, proj_size=2))
      >>> tree = rjl.from_core_params(layer, layer.init(jax.random.key(0), 3))
      >>> ys = rjl.Recurrent(layer).apply({"params": tree}, jnp.ones((5, 3)))
      >>> sorted(tree), ys.shape
      (['b', 'w_h', 'w_proj', 'w_x'], (5, 2))
    """
    layer = _params.as_layer(layer, "from_core_params")
    tree = _params.from_core(layer, params)
    if param_partitioning is None:
        return tree
    paths = _params.leaf_paths(layer, params)
    leaves = []
    for path, leaf in zip(paths, jax.tree_util.tree_leaves(params)):
        names = _params.partition_names(param_partitioning, path, np.shape(leaf))
        leaves.append(leaf if names is None else nn.Partitioned(leaf, names=names))
    return _params.nest(paths, leaves)
