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

from rnnjax.cells.matrix_state import GatedInputs, MatrixCarry, MatrixStateCell, MLSTMInputs, MLSTMState
from rnnjax.engines import chunkwise
from rnnjax.sequence import TimeMajor, expand_to

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
        windows, conv_final = conv_windows(conv_in, fwd.carry.conv, resets, fwd.lengths)
        conv_out, state = cell.convolve(params, windows), fwd.carry.state
    inputs = cell.mix(params, conv_out, rest)
    o, final = recurrence(cell, inputs, state, resets, fwd.valid, chunk_size)
    ys = cell.readout(params, o, conv_out, rest)
    if fwd.valid is not None:
        ys = jnp.where(expand_to(fwd.valid, ys), ys, jnp.zeros((), ys.dtype))
    if cell.conv_width:
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
    return a.reshape(-1, *a.shape[2:])[:steps]


def recurrence(cell: MatrixStateCell, inputs: GatedInputs | MLSTMInputs, state: Any, resets, valid, size: int):
    """The recurrence over time-major ``inputs`` (``(T, *batch, heads, ...)``) from ``state``:
    ``(o (T, *batch, heads, d_v), final_state)``; padding (``valid`` false) changes nothing."""
    steps, batch_shape = inputs.q.shape[0], inputs.q.shape[1:-2]
    size = max(1, min(size, steps))
    flat = math.prod(batch_shape)
    tm = lambda a: a.reshape(steps, flat, *a.shape[1 + len(batch_shape) :])  # (T, B, ...)
    st = lambda a: a.reshape(flat, *a.shape[len(batch_shape) :])
    unst = lambda a: a.reshape(*batch_shape, *a.shape[1:])
    mask = None if valid is None else tm(valid)
    keep = lambda a, fill: a if mask is None else jnp.where(expand_to(mask, a), a, jnp.asarray(fill, a.dtype))
    chunks = steps // size + (steps % size > 0)
    seg = chunkwise.segments(None if resets is None else _to_chunks(tm(resets), size, False), flat, chunks, size)
    q, k, v = (_to_chunks(tm(a), size, 0) for a in inputs[:3])
    if isinstance(inputs, GatedInputs):
        k = _to_chunks(keep(tm(inputs.k), 0), size, 0)
        g = None if inputs.log_decay is None else _to_chunks(keep(tm(inputs.log_decay), 0), size, 0)
        o, final = chunkwise.gla(q, k, v, g, st(state), seg, cell.query_scale())
        return unst_time(_from_chunks(o, steps), batch_shape), unst(final)
    i = _to_chunks(keep(tm(inputs.input_gate), -jnp.inf), size, -jnp.inf)
    log_f = _to_chunks(keep(jax.nn.log_sigmoid(tm(inputs.forget_gate)), 0), size, 0)
    h, final = chunkwise.mlstm(q, k, v, i, log_f, MLSTMState(*map(st, state)), seg, cell.query_scale(), cell.eps)
    return unst_time(_from_chunks(h, steps), batch_shape), MLSTMState(*map(unst, final))


def unst_time(a: Array, batch_shape: tuple[int, ...]) -> Array:
    """``(T, B, ...)`` -> ``(T, *batch, ...)``."""
    return a.reshape(a.shape[0], *batch_shape, *a.shape[2:])
