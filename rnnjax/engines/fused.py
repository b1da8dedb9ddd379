r"""The sequential engine of a dense cell with a sequence-level gradient: what
``rj.Sequential()`` runs for Elman, LSTM and GRU (``gradient="auto"`` or ``"fused"``).

A dense cell (:class:`rnnjax.cell.DenseCell`) computes its step as

.. math::

    (c_t, y_t) = \mathrm{update}(\theta, c_{t-1}, x_t W_x, h_{t-1} W_h),
    \qquad h_{t-1} = \mathrm{recurrent\_input}(c_{t-1}).

The recurrence is a ``jax.custom_jvp``. Its tangent keeps every product with a weight's or an
input's tangent out of the loop, as large products over all ``T * batch`` rows,

.. math::

    \dot Z^x = \dot X W_x + X \dot W_x, \qquad H_{\mathrm{prev}} \dot W_h,

and its tangent loop holds only :math:`\dot h_{t-1} W_h` and the linearisation of ``update``,
rematerialised per step (``jax.checkpoint``) from the carry and products the forward loop
stored. Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) runs that loop. Reverse
mode is JAX's transpose of it: a reverse loop with only :math:`\bar h_{t-1} \mathrel{+}= \bar
z^h_t W_h^\top` and ``update``'s derivatives (recomputed from the stored values), then

.. math::

    \bar W_x = X^\top \bar Z^x, \qquad \bar W_h = H_{\mathrm{prev}}^\top \bar Z^h, \qquad
    \bar X = \bar Z^x W_x^\top

as three large products, instead of autodiff's per-step outer products. Where ``update``
reads columns only through :math:`z^x_t + z^h_t` (``DenseCell.summed_columns``) their two
tangents are one array, stored once per step. Derivatives of every order equal autodiff's up
to float rounding. Measured by ``python -m benchmarks.lab.custom_jvp_experiment``, see
``benchmarks/lab/DECISIONS.md``.
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
    if k == zx.shape[-1]:
        return (zx + zh,)
    # jnp.split, not slicing: its transpose is a concatenate, where a slice's is a zero pad
    # that XLA:CPU then materialises once per step (benchmarks/lab/DECISIONS.md).
    (sx, ax), (sh, ah) = jnp.split(zx, [k], axis=-1), jnp.split(zh, [k], axis=-1)
    return sx + sh, ax, ah


def _products(kept):
    """``(zx, zh)`` that ``update`` treats as the originals: the summed columns in ``zx``,
    zeros in ``zh``."""
    if len(kept) == 2:
        return kept
    if len(kept) == 1:
        return kept[0], jnp.zeros_like(kept[0])
    summed, ax, ah = kept
    return jnp.concatenate([summed, ax], -1), jnp.concatenate([jnp.zeros_like(summed), ah], -1)


def _forward(cell, reverse, unroll, params, carry, xs_tm, resets, valid, zero, keep=True):
    """``((final, ys), (c_prevs, kept))``: the loop, storing each step's carry and products
    when ``keep`` (the tangent loop starts from them); ``(c_prevs, kept)`` is ``None`` otherwise."""
    rest = params._replace(w_x=None, w_h=None)

    def body(c, inputs):
        x, reset, ok = inputs
        zx = matmul(x, params.w_x)
        zh = matmul(_rec_in(cell, c, reset, zero), params.w_h)
        new, y = _local(cell, rest, c, zx, zh, reset, ok, zero)
        if not keep:
            return new, y
        # Summed columns are kept once (XLA shares the sum with update's own).
        return new, (y, c, _kept(zx, zh, cell.summed_columns(zx.shape[-1])))

    final, outs = jax.lax.scan(body, carry, (xs_tm, resets, valid), reverse=reverse, unroll=unroll)
    if not keep:
        return (final, outs), None
    ys, c_prevs, zs = outs
    return (final, ys), (c_prevs, zs)


def run(cell: Cell, params: Any, seqs: TimeMajor, *, unroll: int | bool):
    """``(ys_tm, final, None)`` of the sequential loop over ``seqs``, differentiated as the
    module docstring says."""
    cell.check_params(params)
    final, ys = _fused(cell, seqs.backwards, unroll, params, seqs.carry, seqs.xs, seqs.resets, seqs.valid, seqs.zero)
    return ys, final, None


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _fused(cell, reverse, unroll, params, carry, xs_tm, resets, valid, zero):
    return _forward(cell, reverse, unroll, params, carry, xs_tm, resets, valid, zero, keep=False)[0]


@_fused.defjvp
def _fused_jvp(cell, reverse, unroll, primals, tangents):
    params, carry, xs_tm, resets, valid, zero = primals
    d_params, d_carry, d_xs = tangents[:3]
    out, (c_prevs, zs) = _forward(cell, reverse, unroll, params, carry, xs_tm, resets, valid, zero)
    rest, d_rest = params._replace(w_x=None, w_h=None), d_params._replace(w_x=None, w_h=None)
    # The products with tangents of the weights and inputs, for all steps at once, on rows
    # (T * batch, k): their transposes are then plain X^T dZ products (3-D operands made XLA
    # transpose a (T * batch, k) array and run a slower product: 0.85x autodiff against 0.62x).
    on_rows = lambda a, w: matmul(_rows(a), w).reshape(*a.shape[:-1], w.shape[-1])  # noqa: E731
    d_zx = on_rows(d_xs, params.w_x) + on_rows(xs_tm, d_params.w_x)
    h_prevs = jax.vmap(lambda c, r: _rec_in(cell, c, r, zero), in_axes=(0, None if resets is None else 0))(
        c_prevs, resets
    )
    d_zh_w = on_rows(h_prevs, d_params.w_h)
    k = cell.summed_columns(params.w_x.shape[-1])
    # The tangents of what each step keeps, but for the recurrent product's own (added in the
    # loop): one stacked array per kept block, so its cotangent is stored once per step.
    d_kept_ext = _kept(d_zx, d_zh_w, k)
    # The loop's product is d_h @ w_h_t.T, so that its transpose is dz @ w_h_t on a (g, h)
    # array XLA lays out once, as the reverse-only custom_vjp did.
    w_h_t = params.w_h.T

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def tangent_step(d_c, c_prev, kept, d_kept_t, reset, ok):
        zx, zh = _products(kept)
        _, d_h = jax.jvp(lambda c: _rec_in(cell, c, reset, zero), (c_prev,), (d_c,))
        d_rec = matmul(d_h, w_h_t.T)
        d_zx_t, d_zh_t = _products(
            tuple(a + b for a, b in zip(d_kept_t, _kept(jnp.zeros_like(d_rec), d_rec.astype(d_kept_t[0].dtype), k)))
        )
        local = lambda r, c, a, b: _local(cell, r, c, a, b, reset, ok, zero)  # noqa: E731
        return jax.jvp(local, (rest, c_prev, zx, zh), (d_rest, d_c, d_zx_t, d_zh_t))[1]

    def body(d_c, inputs):
        d_new, d_y = tangent_step(d_c, *inputs)
        return d_new, d_y

    d_final, d_ys = jax.lax.scan(
        body, d_carry, (c_prevs, zs, d_kept_ext, resets, valid), reverse=reverse, unroll=unroll
    )
    return out, (d_final, d_ys)
