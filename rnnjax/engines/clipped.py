r"""The parallel engine of a :class:`rnnjax.cell.ClippedLinearCell` (``rj.IndRNN`` with a relu,
relu6, hard-tanh or identity activation): ``rj.Associative()`` and ``rj.Chunked()``.

With :math:`(a_t, b_t) =` ``cell.clipped_coefficients(params, x_t)`` and ``(lo, hi) =
cell.clip_range``, the states :math:`h_t = \mathrm{clip}(a_t \odot h_{t-1} + b_t, lo, hi)` are
the prefix compositions of the maps :math:`h \mapsto \mathrm{clip}(a_t h + b_t, lo, hi)`
(:data:`rnnjax.engines.affine.CLIP`): one associative scan gives them exactly, where Newton's
method needs an iteration per change of the activation pattern it has to propagate (16 or
more at T=4096 for a relu IndRNN; ``benchmarks/lab/DECISIONS.md``). A step past
a length is the identity map; a reset before step :math:`t` sets :math:`a_t = 0`.

Derivatives (forward and reverse mode, a ``jax.custom_jvp``) come from the cell's own
``step`` at the solved states, as in the Newton engine: with :math:`J_t = \partial h_t /
\partial h_{t-1}` (diagonal, one ``jax.jvp`` with a ones tangent) and :math:`u_t` the step's
tangent from the parameters' and inputs', the states' tangent is the linear recurrence
:math:`\dot h_t = J_t \dot h_{t-1} + u_t`, solved by the same kind of scan; JAX transposes
it into the reverse-mode gradient. So the derivative at a kink is the step's own.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cell import ClippedLinearCell
from rnnjax.engines.affine import CLIP, DIAG, clip_maps, solve_affine
from rnnjax.sequence import TimeMajor, expand_to, mask_step, reset_carry
from rnnjax.sharding.mesh import SequenceSharding


def run(
    cell: ClippedLinearCell,
    params: Any,
    seqs: TimeMajor,
    *,
    chunk_size: int | None,
    time_sharding: SequenceSharding | None = None,
):
    """``(ys_tm, final, None)``; ``chunk_size=None``: one associative scan over T, else
    sequential within chunks of ``chunk_size`` steps and associative across them."""
    fwd, back = seqs.forwards()
    xs, resets, valid, h0 = fwd.xs, fwd.resets, fwd.valid, fwd.carry
    if time_sharding is not None:
        xs = time_sharding.constrain(xs)
    states = _states_fn(cell, chunk_size, time_sharding)(params, xs, h0, resets, valid)
    prev = jnp.concatenate([h0[None].astype(states.dtype), states[:-1]], axis=0).astype(h0.dtype)
    # The outputs (and the final carry) are the cell's own step at the solved states.
    new, ys = _masked_step(cell, params, prev, xs, resets, valid)
    return back(ys), new[-1], None


def _masked_step(cell, params, prev, xs, resets, valid):
    """``cell.step`` at every step at once (time is one more batch axis), with a reset's zero
    carry, and the frozen carry and a zero output past a length, as the sequential engine's."""
    new, ys = cell.step(params, reset_carry(prev, resets, jnp.zeros((), prev.dtype)), xs)
    return mask_step(new, ys, prev, valid)


def _states_fn(cell: ClippedLinearCell, chunk_size: int | None, time_sharding: SequenceSharding | None):
    """``states(params, xs, h0, resets, valid) -> (T, *batch, N)``, the carry after every step
    in at least float32, differentiable through the cell's step (see the module's text)."""
    lo, hi = cell.clip_range  # type: ignore[misc]  # checked by the method: not None

    @jax.custom_jvp
    def states(params, xs, h0, resets, valid):
        a, b = cell.clipped_coefficients(params, xs)
        work = jnp.promote_types(jnp.result_type(a, b, h0), jnp.float32)
        a, b = (c.astype(work) for c in jnp.broadcast_arrays(a, b))
        low, high = jnp.full_like(b, lo), jnp.full_like(b, hi)
        if resets is not None:
            a = jnp.where(expand_to(resets, a), jnp.zeros((), work), a)
        if valid is not None:  # the identity map: a = 1, b = 0, no bounds
            keep = expand_to(valid, a)
            a, b = jnp.where(keep, a, 1.0), jnp.where(keep, b, 0.0)
            low, high = jnp.where(keep, low, -jnp.inf), jnp.where(keep, high, jnp.inf)
        return solve_affine(CLIP, clip_maps(a, b, low, high), h0.astype(work), chunk_size, time_sharding)

    @states.defjvp
    def states_jvp(primals, tangents):
        params, xs, h0, resets, valid = primals
        d_params, d_xs, d_h0, _, _ = tangents
        hs = states(params, xs, h0, resets, valid)
        prev = jnp.concatenate([h0[None].astype(hs.dtype), hs[:-1]], axis=0)

        def step(p, s, x):
            return _masked_step(cell, p, s.astype(h0.dtype), x, resets, valid)[0].astype(hs.dtype)

        # J_t: diagonal by the capability's definition, so one ones tangent gives all of it.
        jac = jax.jvp(lambda s: step(params, s, xs), (prev,), (jnp.ones_like(prev),))[1]
        drive = jax.jvp(lambda p, x: step(p, prev, x), (params, xs), (d_params, d_xs))[1]
        d_hs = solve_affine(DIAG, (jac, drive), d_h0.astype(hs.dtype), chunk_size, time_sharding)
        return hs, d_hs

    return states
