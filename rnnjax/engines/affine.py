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


def _safe_mul(a: Array, x: Array) -> Array:
    """``a * x`` with ``0 * inf = 0``: a constant map (slope 0), or an input on the anchor of
    a map whose slope overflowed, moves nothing. A nan still gives nan."""
    return jnp.where((a == 0) | (x == 0), jnp.zeros((), jnp.result_type(a, x)), a * x)


class ClipMap(NamedTuple):
    """Elementwise maps :math:`h \\mapsto \\mathrm{clip}(v + s (h - t), lo, hi)`: the line of
    slope ``slope`` through the point (``anchor``, ``value``), clipped to ``[low, high]``.

    ``value`` and ``anchor`` are finite; ``slope`` may overflow to +-inf (a composition of
    expanding steps); ``low <= high``, +-inf where there is no bound, ``low == high`` (with
    ``slope = 0``) for a constant map. See :func:`clip_maps`.
    """

    value: Array
    anchor: Array
    slope: Array
    low: Array
    high: Array


def clip_maps(a: Array, b: Array, lo: Array, hi: Array) -> ClipMap:
    """The maps :math:`h \\mapsto \\mathrm{clip}(a h + b, lo, hi)` (arrays of one shape, a
    real floating dtype, ``lo <= hi``) as :data:`CLIP`'s elements."""
    # |a| < 1: anchored at the input 0, where the line is b. |a| >= 1: at the value clip(0, lo,
    # hi) in the range, reached at (v - b) / a; compositions of such maps keep a finite value
    # while their slope overflows (see _clip_combine). a = 0: the constant clip(b, lo, hi).
    flat = jnp.abs(a) < 1
    const = a == 0
    value = jnp.where(flat, b, _clip(jnp.zeros_like(b), lo, hi))
    anchor = jnp.where(flat, 0.0, (value - b) / jnp.where(flat, 1.0, a)).astype(b.dtype)
    level = _clip(b, lo, hi)
    return ClipMap(
        jnp.where(const, level, value),
        anchor,
        a,
        jnp.where(const, level, lo),
        jnp.where(const, level, hi),
    )


def _clip_combine(e1: ClipMap, e2: ClipMap) -> ClipMap:
    v1, t1, s1, lo1, hi1 = e1
    v2, t2, s2, lo2, hi2 = e2
    # s2 * clip(z, lo1, hi1) + ... = clip(..., g2's line at lo1, at hi1): swapped when s2 < 0.
    at_lo, at_hi = v2 + _safe_mul(s2, lo1 - t2), v2 + _safe_mul(s2, hi1 - t2)
    low, high = jnp.where(s2 < 0, at_hi, at_lo), jnp.where(s2 < 0, at_lo, at_hi)
    # clip(clip(v, low, high), lo2, hi2) = clip(v, clip(low, lo2, hi2), clip(high, lo2, hi2)).
    low, high = _clip(low, lo2, hi2), _clip(high, lo2, hi2)
    # g2(g1(h)): the lines compose to the line of slope s1 s2 through (t1, image), the image
    # of the earlier anchor: t1 stays exact and only a value of the map's scale is rounded.
    # That is the anchor while |s2| <= 1 (contracting maps: the plain a2 * b1 + b2 at anchor
    # 0) or while the image lies within the bounds. Otherwise (expanding maps, whose slope may
    # overflow) the anchor is a preimage with a finite value: of v2 where g2 is the steeper
    # (t2 is its sharp point), else of the bound the image passed (t1 is the sharp point; the
    # clipped value at t1 survives a slope of inf), or of v2 when that bound is infinite.
    slope = _safe_mul(s1, s2)
    image = v2 + _safe_mul(s2, v1 - t2)
    level = _clip(image, low, high)
    inner = (jnp.abs(s2) <= 1) | (slope == 0) | ((level == image) & (jnp.abs(image) < jnp.inf))
    target = jnp.where((jnp.abs(s1) >= jnp.abs(s2)) & (jnp.abs(level) < jnp.inf), level, v2)
    shift = ((t2 - v1) + (target - v2) / jnp.where(inner, 1.0, s2)) / jnp.where(inner, 1.0, s1)
    value = jnp.where(inner, image, target)
    anchor = jnp.where(inner, t1, t1 + shift)
    # Bounds that meet: the constant map low (slope 0). Its line would steepen with every
    # later expanding map while changing nothing.
    const = low == high
    zero = jnp.zeros((), slope.dtype)
    return ClipMap(
        jnp.where(const, low, value), jnp.where(const, zero, anchor), jnp.where(const, zero, slope), low, high
    )


def _clip_apply(e: ClipMap, h: Array) -> Array:
    return _clip(e.value + _safe_mul(e.slope, h - e.anchor), e.low, e.high)


# Clipped maps, elementwise (ClipMap, built by clip_maps). Not differentiable through the
# bounds' infinities: rnnjax.engines.clipped differentiates the states with the cell's own
# step instead.
CLIP = Monoid(
    _clip_combine,
    lambda e: ClipMap(
        jnp.zeros_like(e.value),
        jnp.zeros_like(e.anchor),
        jnp.ones_like(e.slope),
        jnp.full_like(e.low, -jnp.inf),
        jnp.full_like(e.high, jnp.inf),
    ),
    _clip_apply,
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
