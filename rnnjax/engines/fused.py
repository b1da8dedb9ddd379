r"""The sequential engine of a dense cell with a sequence-level backward pass
(``rj.Sequential(gradient="fused")``).

A dense cell (:class:`rnnjax.cell.DenseCell`) computes its step as

.. math::

    (c_t, y_t) = \mathrm{update}(\theta, c_{t-1}, x_t W_x, h_{t-1} W_h),
    \qquad h_{t-1} = \mathrm{recurrent\_input}(c_{t-1}).

Only :math:`\bar h_{t-1} \mathrel{+}= \bar z^h_t W_h^\top` has to be sequential in the backward
pass. So the backward loop does that and the elementwise derivatives of ``update`` (and
accumulates the gradients of the small parameters ``update`` uses), stores
:math:`\bar z^x_t, \bar z^h_t`, and after the loop

.. math::

    \bar W_x = X^\top \bar Z^x, \qquad \bar W_h = H_{\mathrm{prev}}^\top \bar Z^h, \qquad
    \bar X = \bar Z^x W_x^\top

are three large matrix products over all ``T * batch`` rows. Where ``update`` reads columns
only through :math:`z^x_t + z^h_t` (``DenseCell.summed_columns``) their two cotangents are
equal, so each pass keeps those columns once. The forward pass is the sequential loop,
storing the carries and the products. Gradients equal autodiff's up to float rounding. It is
a ``jax.custom_vjp``: reverse mode to any order works, forward mode (``jax.jvp``,
``jax.jacfwd``) does not. Measured by ``benchmarks/experiments/custom_vjp_experiment.py``;
variants tried and dropped are in ``benchmarks/experiments/DECISIONS.md``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cell import Cell
from rnnjax.ops import matmul
from rnnjax.sequence import TimeMajor, mask_step, reset_carry


def _rows(a: jax.Array) -> jax.Array:
    """``(T, *batch, k)`` -> ``(T * prod(batch), k)``."""
    return a.reshape(-1, a.shape[-1])


def run(cell: Cell, params: Any, seqs: TimeMajor, *, unroll: int | bool):
    """``(ys_tm, final, None)`` of the sequential engine, differentiable by the
    sequence-level backward pass described above."""
    cell.check_params(params)
    final, ys = _fused(cell, seqs.backwards, unroll, params, seqs.carry, seqs.xs, seqs.resets, seqs.valid, seqs.zero)
    return ys, final, None


def _local(cell, rest, c_prev, zx, zh, reset, valid, zero):
    """One step without its two large products: reset, ``update``, the length mask."""
    new, y = cell.update(rest, reset_carry(c_prev, reset, zero), zx, zh)
    return mask_step(new, y, c_prev, valid)


def _rec_in(cell, c_prev, reset, zero):
    return cell.recurrent_input(reset_carry(c_prev, reset, zero))


def _kept(zx, zh, k):
    """What a step keeps of its products for the backward pass, given that ``update`` reads
    their first ``k`` columns only as ``zx + zh`` (``DenseCell.summed_columns``):
    ``(zx, zh)``; ``(zx + zh,)`` when ``k`` is every column; else
    ``(zx[:k] + zh[:k], zx[k:], zh[k:])`` (columns on the last axis)."""
    if k == 0:
        return zx, zh
    summed = zx[..., :k] + zh[..., :k]
    return (summed,) if k == zx.shape[-1] else (summed, zx[..., k:], zh[..., k:])


def _products(kept):
    """``(zx, zh)`` that ``update`` treats as the originals: the summed columns in ``zx``,
    zeros in ``zh``. :func:`_cotangents` maps the kept arrays' cotangents back."""
    if len(kept) == 2:
        return kept
    if len(kept) == 1:
        return kept[0], jnp.zeros_like(kept[0])
    summed, ax, ah = kept
    return jnp.concatenate([summed, ax], -1), jnp.concatenate([jnp.zeros_like(summed), ah], -1)


def _cotangents(d_kept):
    """Column blocks ``[(cotangent, columns)]`` of ``zx``'s and of ``zh``'s cotangent, from
    the cotangents of the kept arrays (a summed column's cotangent is both products')."""
    if len(d_kept) == 2:
        return [(d_kept[0], slice(None))], [(d_kept[1], slice(None))]
    if len(d_kept) == 1:
        return [(d_kept[0], slice(None))], [(d_kept[0], slice(None))]
    ds, dax, dah = d_kept
    k = ds.shape[-1]
    return [(ds, slice(None, k)), (dax, slice(k, None))], [(ds, slice(None, k)), (dah, slice(k, None))]


def _forward(cell, reverse, unroll, params, carry, xs_tm, resets, valid, zero):
    rest = params._replace(w_x=None, w_h=None)

    def body(c, inputs):
        x, reset, ok = inputs
        zx = matmul(x, params.w_x)
        zh = matmul(_rec_in(cell, c, reset, zero), params.w_h)
        new, y = _local(cell, rest, c, zx, zh, reset, ok, zero)
        # Summed columns are kept once (XLA shares the sum with update's own).
        return new, (y, c, _kept(zx, zh, cell.summed_columns(zx.shape[-1])))

    final, (ys, c_prevs, zs) = jax.lax.scan(body, carry, (xs_tm, resets, valid), reverse=reverse, unroll=unroll)
    return (final, ys), (c_prevs, zs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(cell, reverse, unroll, params, carry, xs_tm, resets, valid, zero):
    return _forward(cell, reverse, unroll, params, carry, xs_tm, resets, valid, zero)[0]


def _fused_fwd(cell, reverse, unroll, params, carry, xs_tm, resets, valid, zero):
    out, (c_prevs, zs) = _forward(cell, reverse, unroll, params, carry, xs_tm, resets, valid, zero)
    return out, (params, xs_tm, resets, valid, zero, c_prevs, zs)


def _fused_bwd(cell, reverse, unroll, res, cts):
    params, xs_tm, resets, valid, zero, c_prevs, zs = res
    d_final, d_ys = cts
    rest = params._replace(w_x=None, w_h=None)
    w_h_t = params.w_h.T

    def body(acc, inputs):
        d_new, d_rest = acc
        dy, c_prev, kept, reset, ok = inputs
        local = lambda r, c, *k: _local(cell, r, c, *_products(k), reset, ok, zero)
        _, vjp = jax.vjp(local, rest, c_prev, *kept)
        dr, dc_prev, *d_kept = vjp((d_new, dy))
        # The recurrent product's input: h_{t-1} = recurrent_input(reset(c_{t-1})).
        dzh = jnp.concatenate([d for d, _ in _cotangents(d_kept)[1]], -1)
        _, vjp_in = jax.vjp(lambda c: _rec_in(cell, c, reset, zero), c_prev)
        (dc_in,) = vjp_in(matmul(dzh, w_h_t).astype(kept[-1].dtype))
        dc_prev = jax.tree.map(jnp.add, dc_prev, dc_in)
        d_rest = jax.tree.map(jnp.add, d_rest, dr)
        return (dc_prev, d_rest), tuple(d_kept)

    d_rest0 = jax.tree.map(jnp.zeros_like, rest)
    (d_carry, d_rest), d_kept = jax.lax.scan(
        body, (d_final, d_rest0), (d_ys, c_prevs, zs, resets, valid), reverse=not reverse, unroll=unroll
    )
    x_blocks, h_blocks = _cotangents(d_kept)
    h_prevs = jax.vmap(lambda c, r: _rec_in(cell, c, r, zero), in_axes=(0, None if resets is None else 0))(
        c_prevs, resets
    )
    d_w_x = jnp.concatenate([_rows(xs_tm).T @ _rows(d) for d, _ in x_blocks], -1).astype(params.w_x.dtype)
    d_w_h = jnp.concatenate([_rows(h_prevs).T @ _rows(d) for d, _ in h_blocks], -1).astype(params.w_h.dtype)
    d_xs = sum(d @ params.w_x[:, cols].T for d, cols in x_blocks).astype(xs_tm.dtype)
    d_params = d_rest._replace(w_x=d_w_x, w_h=d_w_h)
    return d_params, d_carry, d_xs, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
