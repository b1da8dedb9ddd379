"""``rj.Chunked()`` on a :class:`rnnjax.cells.matrix_state.MatrixStateCell`: the per-step pieces
(projections, the short convolution, the readout) for all steps at once, the recurrence chunk
by chunk (:mod:`rnnjax.engines.chunkwise`). Lengths, resets and reverse mean what they mean for
``rj.Sequential()`` (:mod:`rnnjax.sequence`): padding keeps the state (no write, no decay) and
outputs zeros; a reset zeroes the state and the convolution's window."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rnnjax.cells.matrix_state import (
    DeltaInputs,
    GatedInputs,
    Inputs,
    MatrixCarry,
    MatrixStateCell,
    MLSTMInputs,
    MLSTMState,
)
from rnnjax.engines import chunkwise, chunkwise_delta
from rnnjax.sequence import TimeMajor, expand_to
from rnnjax.sharding.mesh import SequenceSharding, place

Array = jax.Array


def run(cell: MatrixStateCell, params: Any, seqs: TimeMajor, *, chunk_size: int):
    """``(ys_tm, final_carry, None)`` for ``seqs``, chunks of ``chunk_size`` steps."""
    fwd, unflip = seqs.forwards()
    resets = fwd.resets
    if resets is not None and fwd.valid is not None:
        resets = resets & fwd.valid  # resets at or past a length are ignored
    conv_in, rest = cell.split(params, fwd.xs)
    conv_out, state, conv_final = None, fwd.carry, None
    if cell.conv_width:
        assert conv_in is not None, f"{type(cell).__name__}.split gave no convolution input"
        windows, conv_final = conv_windows(conv_in, fwd.carry.conv, resets, fwd.lengths)
        conv_out, state = cell.convolve(params, windows), fwd.carry.state
    inputs = cell.mix(params, conv_out, rest)
    o, final = recurrence(cell, inputs, state, resets, fwd.valid, chunk_size, fwd.time_sharding)
    ys = cell.readout(params, o, conv_out, rest)
    if fwd.valid is not None:
        ys = jnp.where(expand_to(fwd.valid, ys), ys, jnp.zeros((), ys.dtype))
    if conv_final is not None:
        final = MatrixCarry(conv_final, final)
    return unflip(ys), final, None


def conv_windows(conv_in: Array, window: Array, resets: Array | None, lengths: Array | None) -> tuple[Array, Array]:
    """The causal convolution's window at every step and the final window.

    Args:
      conv_in: ``(T, *batch, channels)``, processing order.
      window: ``(*batch, K - 1, channels)``, the inputs before the first step (oldest first).
      resets: ``(T, *batch)`` or ``None``; a reset hides every earlier input.
      lengths: ``(*batch,)`` or ``None``; the final window ends at each sequence's last step.

    Returns:
      ``(windows, final)``: ``(T, *batch, K, channels)`` and ``(*batch, K - 1, channels)``.
    """
    steps, width = conv_in.shape[0], window.shape[-2] + 1
    ext = jnp.concatenate([jnp.moveaxis(window, -2, 0).astype(conv_in.dtype), conv_in], axis=0)  # (K-1+T, ...)
    seg = jnp.zeros(conv_in.shape[:-1], jnp.int32) if resets is None else jnp.cumsum(resets, axis=0, dtype=jnp.int32)
    seg_ext = jnp.concatenate([jnp.zeros((width - 1, *seg.shape[1:]), jnp.int32), seg], axis=0)
    slots = [
        jnp.where((seg_ext[s : s + steps] == seg)[..., None], ext[s : s + steps], jnp.zeros((), ext.dtype))
        for s in range(width)
    ]
    windows = jnp.stack(slots, axis=-2)
    ends = jnp.full(seg.shape[1:], steps, jnp.int32) if lengths is None else lengths
    idx = ends[None] + jnp.arange(width - 1).reshape((width - 1,) + (1,) * ends.ndim)  # (K-1, *batch)
    last = jnp.take_along_axis(seg_ext, (ends + width - 2)[None], axis=0)
    kept = jnp.take_along_axis(seg_ext, idx, axis=0) == last
    final = jnp.where(kept[..., None], jnp.take_along_axis(ext, idx[..., None], axis=0), jnp.zeros((), ext.dtype))
    return windows, jnp.moveaxis(final, 0, -2).astype(window.dtype)


def _to_chunks(a: Array, size: int, fill: float) -> Array:
    """``(T, B, *rest)`` -> ``(B, *rest[:1], N, C, *rest[1:])``, padded at the end with ``fill``."""
    steps = a.shape[0]
    pad = -steps % size
    if pad:
        a = jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), fill, a.dtype)], axis=0)
    a = a.reshape(a.shape[0] // size, size, *a.shape[1:])
    order = (2, 3, 0, 1, *range(4, a.ndim)) if a.ndim > 3 else (2, 0, 1)
    return jnp.transpose(a, order)


def _from_chunks(a: Array, steps: int) -> Array:
    """``(B, H, N, C, d)`` -> ``(T, B, H, d)``."""
    a = jnp.transpose(a, (2, 3, 0, 1, 4))
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])[:steps]


def recurrence(
    cell: MatrixStateCell,
    inputs: Inputs,
    state: Any,
    resets: Array | None,
    valid: Array | None,
    size: int,
    time_sharding: SequenceSharding | None = None,
):
    """The recurrence over time-major ``inputs`` (``(T, *batch, heads, ...)``) from ``state``:
    ``(o (T, *batch, heads, d_v), final_state)``; padding (``valid`` false) changes nothing.
    ``time_sharding``: the time axis split over devices (:func:`_sharded`)."""
    steps, batch_shape = inputs.q.shape[0], inputs.q.shape[1:-2]
    flat = math.prod(batch_shape)
    tm = lambda a: a.reshape(steps, flat, *a.shape[1 + len(batch_shape) :])  # (T, B, ...)
    st = lambda a: a.reshape(flat, *a.shape[len(batch_shape) :])
    unst = lambda a: a.reshape(*batch_shape, *a.shape[1:])
    mask = None if valid is None else tm(valid)
    keep = lambda a, fill: a if mask is None else jnp.where(expand_to(mask, a), a, jnp.asarray(fill, a.dtype))
    gates: tuple[Array, ...]
    if isinstance(inputs, GatedInputs):  # padding writes nothing and does not decay
        gates = () if inputs.log_decay is None else (keep(tm(inputs.log_decay), 0),)
        fills = (0.0,) * len(gates)
        state = st(state)
    elif isinstance(inputs, MLSTMInputs):  # padding: no input (i = -inf) and no forgetting (log sigma(f) = 0)
        gates = (keep(tm(inputs.input_gate), -jnp.inf), keep(jax.nn.log_sigmoid(tm(inputs.forget_gate)), 0))
        fills = (-jnp.inf, 0.0)
        state = MLSTMState(*map(st, state))
    elif isinstance(inputs, DeltaInputs):  # padding: beta = 0 and no decay, the identity transition
        gates = (keep(tm(inputs.beta), 0),) + (() if inputs.log_decay is None else (keep(tm(inputs.log_decay), 0),))
        fills = (0.0,) * len(gates)
        state = st(state)
    else:  # DPLR padding: a = b = 0 and no decay, the identity transition
        gates = tuple(keep(tm(a), 0) for a in (inputs.a, inputs.b, inputs.log_decay))
        fills = (0.0,) * 3
        state = st(state)
    arrays = (tm(inputs.q), keep(tm(inputs.k), 0), tm(inputs.v), *gates)
    problem = _Problem(cell, max(1, min(size, steps)), (0.0, 0.0, 0.0, *fills))
    resets = None if resets is None else tm(resets)
    if time_sharding is None:
        o, final = problem.solve(arrays, state, resets)
    else:
        o, final = _sharded(problem, arrays, state, resets, time_sharding)
    return o.reshape(steps, *batch_shape, *o.shape[2:]), jax.tree.map(unst, final)


class _Problem:
    """One recurrence's chunkwise solve on ``(T, B, ...)`` arrays ``(q, k, v, *gates)``."""

    def __init__(self, cell: MatrixStateCell, size: int, fills: tuple[float, ...]):
        self.cell, self.size, self.fills = cell, size, fills

    def solve(self, arrays: tuple[Array, ...], state: Any, resets: Array | None) -> tuple[Array, Any]:
        steps, flat, size = arrays[0].shape[0], arrays[0].shape[1], min(self.size, arrays[0].shape[0])
        chunks = -(-steps // size)
        seg = chunkwise.segments(None if resets is None else _to_chunks(resets, size, False), flat, chunks, size)
        q, k, v, *gates = (_to_chunks(a, size, f) for a, f in zip(arrays, self.fills))
        recurrence, scale = self.cell.recurrence, self.cell.query_scale()
        if recurrence == "gla":
            o, final = chunkwise.gla(q, k, v, gates[0] if gates else None, state, seg, scale)
        elif recurrence == "mlstm":
            i, log_f = gates
            o, final = chunkwise.mlstm(q, k, v, i, log_f, state, seg, scale, self.cell.eps)
        elif recurrence == "delta":
            beta, *g = gates
            o, final = chunkwise_delta.delta_rule(q, k, v, beta, g[0] if g else None, state, seg, scale)
        else:
            a, b, w = gates
            o, final = chunkwise_delta.dplr(q, k, v, a, b, w, state, seg, scale)
        return _from_chunks(o, steps), final

    def identity(self, state: Any) -> Any:
        """The state a stretch of steps is summarised from: zeros (and ``m = -inf``)."""
        zero = jax.tree.map(jnp.zeros_like, state)
        return zero._replace(m=jnp.full_like(state.m, -jnp.inf)) if self.cell.recurrence == "mlstm" else zero

    def transition(self, arrays: tuple[Array, ...], resets: Array | None, start=lambda a: a) -> Array:
        """What these steps do to the incoming state: its total log decay (``-inf`` across a
        reset) for gla and the mLSTM, the ``(B, H, d_k, d_k)`` matrix of the transitions'
        product for the delta rule and DPLR (the steps run from the identity with ``v = 0``;
        ``start`` prepares that identity, e.g. marks it varying over a mesh axis)."""
        if self.cell.recurrence in ("delta", "dplr"):
            q, k = arrays[:2]
            d_k = k.shape[-1]
            eye = jnp.broadcast_to(jnp.eye(d_k, dtype=k.dtype), (*k.shape[1:3], d_k, d_k))
            return self.solve((q, k, jnp.zeros_like(k), *arrays[3:]), start(eye), resets)[1]
        gates = arrays[3:]
        if self.cell.recurrence == "gla" and not gates:
            total = jnp.zeros(arrays[0].shape[1:3], arrays[0].dtype)
        else:
            total = jnp.sum(gates[-1], axis=0)  # log decay per head (or key): GLA's g, mLSTM's log sigma(f)
        if resets is None:
            return total
        cut = jnp.any(resets, axis=0).reshape(resets.shape[1:] + (1,) * (total.ndim - 1))
        return jnp.where(cut, -jnp.inf, total)

    def fold(self, state: Any, summary: Any, transition: Array) -> Any:
        """``state`` carried through a stretch summarised by ``summary`` and its
        :meth:`transition`."""
        if self.cell.recurrence in ("delta", "dplr"):
            return jnp.einsum("...kl,...le->...ke", transition, state) + summary
        log_decay = transition
        if self.cell.recurrence == "gla":
            decay = jnp.exp(log_decay)
            return (decay[..., None, None] if decay.ndim == 2 else decay[..., None]) * state + summary
        C, n, m = summary
        return chunkwise.fold_mlstm(state, C, n, m, log_decay)


def _sharded(problem: _Problem, arrays, state, resets, sharding: SequenceSharding):
    """:meth:`_Problem.solve` with the time axis split over ``sharding``'s devices: each shard
    summarises its steps from the identity state (the transition ``S -> A S + B``), the shards
    exchange the summaries (one ``all_gather``), and each runs its steps again from the state
    the shards before it produce (its outputs corrected by its incoming state)."""
    steps, n, axis = arrays[0].shape[0], sharding.shards, sharding.axis
    pad = -steps % n
    if pad:  # padding steps write nothing and do not decay
        arrays = tuple(
            jnp.concatenate([a, jnp.full((pad, *a.shape[1:]), f, a.dtype)]) for a, f in zip(arrays, problem.fills)
        )
        resets = None if resets is None else jnp.concatenate([resets, jnp.zeros((pad, *resets.shape[1:]), bool)])

    def local(arrays, state, resets):
        varying = lambda a: jax.lax.pcast(a, (axis,), to="varying")  # the loop's carry differs per shard
        _, summary = problem.solve(arrays, jax.tree.map(varying, problem.identity(state)), resets)
        gather = lambda a: jax.lax.all_gather(a, axis, axis=0)
        summaries, transitions = jax.tree.map(gather, summary), gather(problem.transition(arrays, resets, varying))
        starts = [state]
        for j in range(n):
            starts.append(problem.fold(starts[-1], jax.tree.map(lambda a, j=j: a[j], summaries), transitions[j]))
        incoming = jax.tree.map(lambda *s: jnp.stack(s)[jax.lax.axis_index(axis)], *starts[:n])
        o, _ = problem.solve(arrays, incoming, resets)
        return o, jax.tree.map(lambda a: a[None], starts[n])  # every shard's copy is the same

    specs = (P(axis), P(), None if resets is None else P(axis))
    o, final = jax.shard_map(
        local, mesh=sharding.mesh, in_specs=specs, out_specs=(P(axis), P(axis)), axis_names=frozenset({axis})
    )(*(place(a, sharding.mesh, sp) if sp is not None else a for a, sp in zip((arrays, state, resets), specs)))
    return o[:steps], jax.tree.map(lambda a: a[0], final)
