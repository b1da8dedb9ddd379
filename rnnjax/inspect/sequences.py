"""The set-up every sequence tool of :mod:`rnnjax.inspect` shares: checked inputs with the
batch axes flattened to one, and a cell's step as a map on state vectors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.carry import CarryLayout
from rnnjax.cell import Cell, PyTree
from rnnjax.sequence import check_lengths, check_xs, compute_dtype, zero_past

StepMap = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def template(tree: PyTree) -> PyTree:
    """``tree`` with every leaf replaced by a ``jax.ShapeDtypeStruct`` of its shape and dtype."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), tree)


class Sequences(NamedTuple):
    """Checked sequence inputs, batch axes flattened to one: ``xs (B, T, *feat)``."""

    xs: jax.Array
    carry: PyTree  # leaves (B, *per-sequence shape)
    lengths: jax.Array  # (B,) in [0, T]
    batch_shape: tuple[int, ...]
    like: PyTree  # one unbatched carry, as ShapeDtypeStructs


def check_sequences(cell: Cell, params: Any, xs: Any, carry: PyTree | None, lengths: Any) -> Sequences:
    """``(xs, carry, lengths)`` of a sequence call checked, with defaults filled in (zero
    carry, full lengths) and the batch axes ``(*batch,)`` flattened to ``(B,)``."""
    xs = check_xs(cell, params, xs)
    k = cell.input_ndim
    batch_shape = tuple(xs.shape[: xs.ndim - k - 1])
    steps = xs.shape[-(k + 1)]
    feat = tuple(xs.shape[xs.ndim - k :])
    dtype = compute_dtype(xs, params)
    like = template(cell.carry_for(jax.ShapeDtypeStruct(feat, xs.dtype), dtype))
    batch = math.prod(batch_shape)
    x_step = jax.ShapeDtypeStruct((*batch_shape, *feat), xs.dtype)
    if carry is None:
        carry = cell.carry_for(x_step, dtype)
    else:
        cell.check_carry(carry, x_step)
    carry = jax.tree.map(lambda leaf, ref: jnp.asarray(leaf, ref.dtype).reshape((batch, *ref.shape)), carry, like)
    if lengths is None:
        lengths = jnp.full((batch,), steps, jnp.int32)
    else:
        lengths = jnp.clip(check_lengths(lengths, batch_shape, steps), 0, steps).reshape(batch)
    xs = xs.reshape((batch, steps, *feat))
    # Padding never reaches a cell, as in rj.scan: NaN there must not become 0 * NaN in a
    # derivative.
    xs = zero_past(xs, lengths, k)
    return Sequences(xs, carry, lengths, batch_shape, like)


def unflatten_batch(value: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
    """``(B, ...)`` -> ``(*batch_shape, ...)``: undoes the flattening of :func:`check_sequences`."""
    return value.reshape((*batch_shape, *value.shape[1:]))


def step_map(cell: Cell, params: Any, like: PyTree) -> StepMap:
    r"""The step of one sequence on state vectors, :math:`F(v, x) \to (v', y)`, ``y`` raveled.

    ``like`` is one unbatched carry (or its :func:`template`); ``v`` and ``v'`` are its
    vectors (:class:`rnnjax.carry.CarryLayout`) and ``v'`` keeps ``v``'s dtype.
    """
    layout = CarryLayout(like)

    def step(v, x):
        new, y = cell.step(params, layout.unflatten(v), x)
        return layout.flatten(new).astype(v.dtype), jnp.ravel(y)

    return step
