"""The sequential engine: ``jax.lax.scan`` over the steps, with optional rematerialisation."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cell import Cell
from rnnjax.sequence import TimeMajor, mask_step, reset_carry


def run(cell: Cell, params: Any, seqs: TimeMajor, *, unroll: int | bool, remat: str | None):
    """``(ys_tm, final, None)``: ``cell.step`` over ``seqs`` one step at a time.

    ``remat``: ``None`` stores every step's activations for the backward pass; ``"step"``
    recomputes each step from its carry (``jax.checkpoint``); ``"sqrt"`` nests checkpoints
    over about sqrt(T) blocks of sqrt(T) steps, so activation memory is O(sqrt(T)).
    """

    def body(c, inputs):
        x, reset, valid = inputs
        new, y = cell.step(params, reset_carry(c, reset, seqs.zero), x)
        return mask_step(new, y, c, valid)

    inputs = (seqs.xs, seqs.resets, seqs.valid)
    if remat == "sqrt" and seqs.steps > 1:
        final, ys = _scan_sqrt_remat(body, seqs.carry, inputs, seqs.steps, seqs.backwards, unroll)
    else:
        if remat == "step":
            body = jax.checkpoint(body, prevent_cse=False)
        final, ys = jax.lax.scan(body, seqs.carry, inputs, reverse=seqs.backwards, unroll=unroll)
    return ys, final, None


def _scan_sqrt_remat(body, carry, inputs, steps, backwards, unroll):
    """``lax.scan(body, carry, inputs)`` with sqrt(T) nested checkpoints.

    The T steps are padded to ``blocks * block`` (``block = ceil(sqrt(T))``); padded steps keep
    the carry and are cut from the outputs. The outer scan over blocks is checkpointed, so its
    backward pass stores one carry per block and recomputes one block at a time.
    """
    block = math.ceil(math.sqrt(steps))
    blocks = math.ceil(steps / block)
    pad = blocks * block - steps

    def padded(a):
        if a is None:
            return None
        a = jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a
        return a.reshape(blocks, block, *a.shape[1:])

    blocked = (jnp.arange(blocks * block).reshape(blocks, block), *(padded(a) for a in inputs))

    def masked_body(c, step_inputs):
        t, *rest = step_inputs
        new, y = body(c, tuple(rest))
        if pad:
            new = jax.tree.map(lambda n, old: jnp.where(t < steps, n, old), new, c)
        return new, y

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def run_block(c, block_inputs):
        return jax.lax.scan(masked_body, c, block_inputs, reverse=backwards, unroll=unroll)

    final, ys = jax.lax.scan(run_block, carry, blocked, reverse=backwards)
    return final, ys.reshape(blocks * block, *ys.shape[2:])[:steps]
