r"""Affine recurrences :math:`s_t = A_t s_{t-1} + c_t` as monoids, solved in parallel.

An element ``(A, c)`` is the map :math:`s \mapsto A s + c`; ``combine(earlier, later)``
composes two maps and ``apply`` runs a composed map on a state. Four algebras: elementwise
(:data:`DIAG`, diagonal ``A``, real or complex), full matrices (:data:`FULL`, ``A`` of shape
``(..., n, n)``), log space (:func:`log_monoid`) for positive diagonal recurrences, and
elementwise maps clipped to a range (:data:`CLIP`, :math:`s \mapsto \mathrm{clip}(a s + c,
lo, hi)`, closed under composition too). The linear, clipped and Newton engines solve every
recurrence with :func:`solve_affine`: one associative scan, chunks, or the time axis split
over devices (:class:`SequenceSharding`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rnnjax.sharding.mesh import SequenceSharding, place

Array = jax.Array
PyTree = Any


class Monoid(NamedTuple):
    """The operations of one algebra of affine maps."""

    combine: Callable[[Any, Any], Any]
    identity: Callable[[Any], Any]  # an element shaped like the argument, the identity map
    apply: Callable[[Any, Array], Array]


def _diag_combine(e1, e2):
    a1, b1 = e1
    a2, b2 = e2
    return a1 * a2, a2 * b1 + b2


def mv(m: Array, v: Array) -> Array:
    return jnp.einsum("...ij,...j->...i", m, v)


def _full_combine(e1, e2):
    a1, b1 = e1
    a2, b2 = e2
    return a2 @ a1, mv(a2, b1) + b2


def _log_combine(e1, e2):
    la1, lb1 = e1
    la2, lb2 = e2
    return la1 + la2, jnp.logaddexp(la2 + lb1, lb2)


DIAG = Monoid(
    _diag_combine,
    lambda e: (jnp.ones_like(e[0]), jnp.zeros_like(e[1])),
    lambda e, h: e[0] * h + e[1],
)
FULL = Monoid(
    _full_combine,
    lambda e: (jnp.broadcast_to(jnp.eye(e[0].shape[-1], dtype=e[0].dtype), e[0].shape), jnp.zeros_like(e[1])),
    lambda e, h: mv(e[0], h) + e[1],
)


def _clip(v: Array, lo: Array, hi: Array) -> Array:
    return jnp.minimum(jnp.maximum(v, lo), hi)


def _clip_combine(e1, e2):
    a1, b1, lo1, hi1 = e1
    a2, b2, lo2, hi2 = e2
    # a2 * clip(z, lo1, hi1) + b2 = clip(a2 z + b2, a2 lo1 + b2, a2 hi1 + b2), the bounds
    # swapped when a2 < 0; a2 = 0 leaves the constant b2 (where 0 * inf would be nan).
    low, high = jnp.where(a2 < 0, hi1, lo1), jnp.where(a2 < 0, lo1, hi1)
    low = jnp.where(a2 == 0, b2, a2 * low + b2)
    high = jnp.where(a2 == 0, b2, a2 * high + b2)
    # clip(clip(v, low, high), lo2, hi2) = clip(v, clip(low, lo2, hi2), clip(high, lo2, hi2)).
    low, high = _clip(low, lo2, hi2), _clip(high, lo2, hi2)
    # Bounds that meet: the composition is the constant low, so slope 0 and offset low. Its
    # line would steepen with every later expanding map (|u| > 1) while changing nothing,
    # and overflow: inf * 0 and inf - inf would give nan.
    const = low == high
    return jnp.where(const, 0.0, a1 * a2), jnp.where(const, low, a2 * b1 + b2), low, high


# Clipped maps h -> clip(a h + b, lo, hi), elementwise, with infinite bounds where there are none.
# Not differentiable through the bounds' infinities: rnnjax.engines.clipped differentiates the
# states with the cell's own step instead.
CLIP = Monoid(
    _clip_combine,
    lambda e: (
        jnp.ones_like(e[0]),
        jnp.zeros_like(e[1]),
        jnp.full_like(e[2], -jnp.inf),
        jnp.full_like(e[3], jnp.inf),
    ),
    lambda e, h: _clip(e[0] * h + e[1], e[2], e[3]),
)


def log_monoid(neg: float) -> Monoid:
    # ``neg`` stands for log 0: finite, so that logaddexp's derivative gives exactly zero
    # weight to terms a reset or a frozen step removed (with -inf it gives them weight).
    return Monoid(
        _log_combine,
        lambda e: (jnp.zeros_like(e[0]), jnp.full_like(e[1], neg)),
        lambda e, h: jnp.exp(e[0]) * h + jnp.exp(e[1]),
    )


def solve_affine(
    monoid: Monoid, elems: Any, h0: Array, chunk_size: int | None = None, time_sharding: SequenceSharding | None = None
) -> Array:
    """All states ``s_t`` (time axis 0) of the recurrence ``elems`` started from ``h0``.

    ``chunk_size=None``: one associative scan over T. Otherwise chunks of ``chunk_size``
    steps: a sequential scan over the C positions of all chunks at once gives each chunk's
    local prefix maps, an associative scan over the chunks' total maps gives each chunk's
    starting state, and one elementwise pass applies the local maps to those starts.
    ``time_sharding`` (a :class:`SequenceSharding`): the same with one
    chunk per device.
    """
    if time_sharding is not None:
        return _solve_sharded(monoid, elems, h0, time_sharding)
    steps = jax.tree_util.tree_leaves(elems)[0].shape[0]
    if chunk_size is None or chunk_size >= steps:
        if chunk_size is not None:  # one chunk: a plain sequential scan
            return _sequential_affine(monoid, elems, h0)
        prefix = jax.lax.associative_scan(monoid.combine, elems)
        return monoid.apply(prefix, h0)
    size = chunk_size
    chunks = -(-steps // size)
    pad = chunks * size - steps
    elems = _pad_identity(monoid, elems, pad)  # cut off below
    # (chunks * C, ...) -> (C, chunks, ...): the sequential scan runs over positions in a chunk.
    elems = jax.tree.map(lambda e: jnp.swapaxes(e.reshape((chunks, size) + e.shape[1:]), 0, 1), elems)

    def body(acc, e):
        acc = monoid.combine(acc, e)
        return acc, acc

    start = monoid.identity(jax.tree.map(lambda e: e[0], elems))
    totals, local = jax.lax.scan(body, start, elems)
    across = jax.lax.associative_scan(monoid.combine, totals)  # (chunks, ...) inclusive
    starts = jnp.concatenate([h0[None], monoid.apply(jax.tree.map(lambda e: e[:-1], across), h0)], axis=0)
    states = monoid.apply(local, starts[None])  # (C, chunks, ...)
    states = jnp.swapaxes(states, 0, 1).reshape((chunks * size,) + states.shape[2:])
    return states[:steps]


def _sequential_affine(monoid: Monoid, elems: Any, h0: Array) -> Array:
    def body(h, e):
        h = monoid.apply(e, h)
        return h, h

    return jax.lax.scan(body, h0, elems)[1]


def _solve_sharded(monoid: Monoid, elems: PyTree, h0: Array, sharding: SequenceSharding) -> Array:
    """All states ``s_t`` (time axis 0) of ``elems`` from ``h0``, the time axis split over
    ``sharding``'s devices: local prefix maps on each device, an ``all_gather`` of each shard's
    total map, then each shard runs from the state the shards before it produce."""
    steps = jax.tree_util.tree_leaves(elems)[0].shape[0]
    elems = _pad_identity(monoid, elems, -steps % sharding.shards)
    axis, mesh = sharding.axis, sharding.mesh

    def local(elems, h0):
        prefix = jax.lax.associative_scan(monoid.combine, elems)  # this shard's prefix maps
        total = jax.tree.map(lambda e: e[-1:], prefix)
        totals = jax.tree.map(lambda e: jax.lax.all_gather(e, axis, axis=0, tiled=True), total)
        upto = jax.lax.associative_scan(monoid.combine, totals)  # (n, ...) inclusive over shards
        i = jax.lax.axis_index(axis)
        before = jax.tree.map(lambda e: e[jnp.maximum(i - 1, 0)], upto)
        start = jnp.where(i == 0, h0, monoid.apply(before, h0))
        return monoid.apply(prefix, start[None])

    states = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(axis), P()),
        out_specs=P(axis),
        axis_names=frozenset({axis}),
    )(place(elems, mesh, P(axis)), place(h0, mesh, P()))
    return states[:steps]


def _pad_identity(monoid: Monoid, elems: PyTree, pad: int) -> PyTree:
    """``elems`` followed by ``pad`` identity maps (they leave the state as it is)."""
    if not pad:
        return elems
    ident = monoid.identity(jax.tree.map(lambda e: jnp.broadcast_to(e[:1], (pad,) + e.shape[1:]), elems))
    return jax.tree.map(lambda e, i: jnp.concatenate([e, i], axis=0), elems, ident)
