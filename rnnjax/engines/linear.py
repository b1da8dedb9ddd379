r"""The parallel engine of a :class:`rnnjax.LinearCell`: ``rj.Associative()`` and
``rj.Chunked()``.

With :math:`(a_t, b_t) =` ``cell.coefficients(params, x_t)``, the states
:math:`h_t = a_t \odot h_{t-1} + b_t` are the prefix compositions of the maps
:math:`h \mapsto a_t h + b_t`. A step past a length is the identity map :math:`(1, 0)`; a
reset before step :math:`t` sets :math:`a_t = 0`. Cells in log space
(``LinearCell.log_space``: MinGRU, MinLSTM with ``candidate="g"``) compose
:math:`(\log a, \log b)` with :math:`\log b_{12} = \mathrm{logaddexp}(\log a_2 + \log b_1,
\log b_2)`, which keeps decays near 1 exact where :math:`1 - z` rounds to 1. The scan runs
in at least float32; gradients are autodiff through the same (parallel) scans.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cell import LinearCell
from rnnjax.engines.affine import DIAG, log_monoid, solve_affine
from rnnjax.sequence import TimeMajor, expand_to
from rnnjax.sharding.mesh import SequenceSharding


def run(
    cell: LinearCell,
    params: Any,
    seqs: TimeMajor,
    *,
    chunk_size: int | None,
    time_sharding: SequenceSharding | None = None,
):
    """``(ys_tm, final, None)``; ``chunk_size=None``: one associative scan over T, else
    sequential within chunks of ``chunk_size`` steps and associative across them."""
    fwd, back = seqs.forwards()
    x_p, resets, valid = fwd.xs, fwd.resets, fwd.valid
    y_dtype = jax.eval_shape(lambda c, x: cell.step(params, c, x)[1], fwd.carry, x_p[0]).dtype
    if time_sharding is not None:
        x_p = time_sharding.constrain(x_p)
    if cell.log_space:
        la, lb = cell.log_coefficients(params, x_p)  # type: ignore[attr-defined]  # defined when log_space
        real = jnp.promote_types(jnp.result_type(la, lb), jnp.float32)
        la, lb = (c.astype(real) for c in jnp.broadcast_arrays(la, lb))
        # log 0, small enough that T of them still sum to a finite number.
        neg = float(jnp.finfo(real).min) / (2 * fwd.steps)
        if resets is not None:
            la = jnp.where(expand_to(resets, la), neg, la)
        if valid is not None:
            la = jnp.where(expand_to(valid, la), la, 0.0)
            lb = jnp.where(expand_to(valid, lb), lb, neg)
        monoid, elems, h0 = log_monoid(neg), (la, lb), fwd.carry.astype(real)
    else:
        a, b = cell.coefficients(params, x_p)
        work = jnp.promote_types(jnp.result_type(a, b, fwd.carry), jnp.float32)
        # A user's cell may return an ``a`` shared by all steps, e.g. (N,): the scan needs T.
        a, b = (c.astype(work) for c in jnp.broadcast_arrays(a, b))
        if resets is not None:
            a = jnp.where(expand_to(resets, a), jnp.zeros((), work), a)
        if valid is not None:
            a = jnp.where(expand_to(valid, a), a, jnp.ones((), work))
            b = jnp.where(expand_to(valid, b), b, jnp.zeros((), work))
        monoid, elems, h0 = DIAG, (a, b), fwd.carry.astype(work)
    hs = solve_affine(monoid, elems, h0, chunk_size, time_sharding)  # (T, *batch, N), processing order
    final = hs[-1].astype(fwd.carry.dtype)
    ys = cell.readout(params, hs, x_p).astype(y_dtype)
    if valid is not None:
        ys = jnp.where(expand_to(valid, ys), ys, jnp.zeros((), ys.dtype))
    return back(ys), final, None
