"""State vectors: a (batched) carry as real vectors ``(*batch, n)`` and back, and the state
after every step of a sequence."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.carry import CarryLayout
from rnnjax.cell import Cell, PyTree
from rnnjax.inspect.sequences import check_sequences, step_map, template, unflatten_batch


def state_vector(cell: Cell, carry: PyTree) -> jax.Array:
    """A carry of ``cell`` as real state vectors: ``(*batch, n)``.

    Each leaf's per-sequence part (the leaf of ``cell.init_carry()``: ``(features,)``, or a
    matrix-state cell's ``(heads, d_k, d_v)``; ConvLSTM's with the frame's ``(H, W)`` before
    it) is raveled; leaves are concatenated in tree order, a complex leaf as its real parts
    followed by its imaginary parts.

    Example:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.LSTM(hidden_size=4)
      >>> rj.inspect.state_vector(cell, cell.init_carry((2, 3))).shape  # h then c
      (2, 3, 8)
    """
    leaves = jax.tree_util.tree_leaves(carry)
    if not leaves:
        raise ValueError("carry has no leaves")
    # A carry's leading axes are the step input's without its features (rnnjax.cell), so one
    # sequence's part of a leaf is the unbatched carry's leaf after the input's other axes.
    unbatched = jax.tree_util.tree_leaves(jax.eval_shape(lambda: cell.init_carry(())))
    own = [u.ndim + cell.input_ndim - 1 for u in unbatched]
    if len(own) != len(leaves):
        raise ValueError(
            f"carry has {len(leaves)} leaves; expected {len(own)}, as {type(cell).__name__}.init_carry(batch_shape)"
        )
    batch_shape = tuple(leaves[0].shape[: leaves[0].ndim - own[0]])
    for leaf, k in zip(leaves, own):
        if leaf.ndim < k or tuple(leaf.shape[: leaf.ndim - k]) != batch_shape:
            raise ValueError(
                f"carry has leaves of shapes {[tuple(x.shape) for x in leaves]}; expected "
                f"(*batch, features) with one batch shape, as {type(cell).__name__}.init_carry(batch_shape)"
            )
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise TypeError(f"carry has a leaf of dtype {leaf.dtype}; expected a floating or complex dtype")
    flat = jax.tree.unflatten(
        jax.tree.structure(carry), [leaf.reshape((-1, *leaf.shape[leaf.ndim - k :])) for leaf, k in zip(leaves, own)]
    )
    # The layout is taken from the traced leaves, so each keeps its own (canonical) dtype.
    vectors = jax.vmap(lambda one: CarryLayout(one).flatten(one))(flat)
    return vectors.reshape((*batch_shape, vectors.shape[-1]))


def carry_from_vector(vector: jax.Array, like: PyTree) -> PyTree:
    """State vectors ``(*batch, n)`` back to a carry: the inverse of :func:`state_vector`.

    ``like`` is one unbatched carry (e.g. ``cell.init_carry()``) giving the leaves' shapes and
    dtypes; the result's leaves have shapes ``(*batch, *leaf.shape)``.

    Example:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.LRU(hidden_size=3)
      >>> h = rj.inspect.carry_from_vector(jnp.arange(6.0), cell.init_carry())  # real, imag
      >>> h
      Array([0.+3.j, 1.+4.j, 2.+5.j], dtype=complex64)
    """
    layout = CarryLayout(like)
    n = layout.n
    vector = jnp.asarray(vector)
    if vector.ndim < 1 or vector.shape[-1] != n:
        shapes = jax.tree.map(lambda leaf: tuple(leaf.shape), like)
        raise ValueError(f"vector has shape {tuple(vector.shape)}; expected (..., {n}) for a carry like {shapes}")
    batch_shape = vector.shape[:-1]
    carries = jax.vmap(layout.unflatten)(vector.reshape(-1, n))
    return jax.tree.map(lambda leaf: leaf.reshape((*batch_shape, *leaf.shape[1:])), carries)


def state_trajectory(
    cell: Cell, params: Any, xs: jax.Array, carry: PyTree | None = None, *, lengths: jax.Array | None = None
) -> jax.Array:
    """The state vector after every step: ``(*batch, T, n)``.

    Entry ``t`` is :func:`state_vector` of the carry after step ``t`` of
    ``rj.scan(cell, params, xs, carry, lengths=lengths)``; past a sequence's length the
    carry is frozen, so entries there repeat the last real state.

    Args:
      cell, params: any rnnjax cell and its parameters.
      xs: ``(*batch, T, D)`` inputs (``(*batch, T, H, W, C)`` for ConvLSTM).
      carry: initial carry as ``cell.init_carry(batch_shape)``; zeros when ``None``.
      lengths: ``(*batch,)`` integers in ``[0, T]``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.LSTM(hidden_size=4)
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> xs = jnp.ones((3, 5, 2))
      >>> states = rj.inspect.state_trajectory(cell, params, xs)
      >>> states.shape
      (3, 5, 8)
      >>> _, last = rj.scan(cell, params, xs)
      >>> bool(jnp.allclose(states[:, -1], rj.inspect.state_vector(cell, last)))
      True
    """
    seq = check_sequences(cell, params, xs, carry, lengths)
    return unflatten_batch(_trajectory_jit(cell, params, seq.xs, seq.carry, seq.lengths), seq.batch_shape)


@functools.partial(jax.jit, static_argnums=(0,))
def _trajectory_jit(cell, params, xs, carry, lengths):
    def one(xs, carry, length):
        like = template(carry)
        step = step_map(cell, params, like)

        def body(v, inputs):
            t, x = inputs
            new, _ = step(v, x)
            new = jnp.where(t < length, new, v)
            return new, new

        _, vs = jax.lax.scan(body, CarryLayout(like).flatten(carry), (jnp.arange(xs.shape[0]), xs))
        return vs

    return jax.vmap(one)(xs, carry, lengths)
