"""Lyapunov exponents of a cell's state dynamics along a trajectory, by the QR method
(Benettin et al. 1980; Dieci, Russell & Van Vleck 1997)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.carry import CarryLayout
from rnnjax.cell import Cell, PyTree
from rnnjax.checks import check_positive_int, is_int
from rnnjax.inspect.sequences import check_sequences, step_map, template, unflatten_batch


def lyapunov_exponents(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    k: int,
    carry: PyTree | None = None,
    *,
    lengths: jax.Array | None = None,
    burn_in: int = 0,
    key: jax.Array | None = None,
) -> jax.Array:
    r"""The ``k`` largest Lyapunov exponents of the state dynamics along a trajectory, by the
    QR method (Benettin et al. 1980; Dieci, Russell & Van Vleck 1997).

    With :math:`J_t = \partial F / \partial h` at step ``t`` of the trajectory driven by
    ``xs`` and :math:`Q_0` a random ``(n, k)`` orthonormal frame:

    .. math::

        J_t Q_{t-1} = Q_t R_t \ (\text{QR}), \qquad
        \lambda_i = \frac{1}{L - b} \sum_{t=b}^{L-1} \log |(R_t)_{ii}|

    over the steps ``t >= burn_in`` (``b``) of each sequence's length ``L``. Exponents are
    per step, natural log, sorted in decreasing order. For a linear recurrence
    :math:`h_t = A h_{t-1} + B x_t` they converge to :math:`\log|\mathrm{eig}(A)|`. The
    products :math:`J_t Q` are ``k`` forward-mode derivatives (``jax.linearize``), so the
    full Jacobian is never formed. A unit that stops responding (e.g. a dead ReLU) gives
    :math:`-\infty`.

    Args:
      cell, params: any rnnjax cell and its parameters.
      xs: ``(*batch, T, D)`` inputs driving the trajectory.
      k: how many exponents, ``1 <= k <= n`` (``n`` the state size, see :mod:`rnnjax.inspect`).
      carry: initial carry as ``cell.init_carry(batch_shape)``; zeros when ``None``.
      lengths: ``(*batch,)`` integers in ``[0, T]``; steps past a length are left out. A
        sequence with no step at or past ``burn_in`` gets NaN.
      burn_in: steps whose ``log |R_ii|`` are left out of the average (the frame aligning
        with the leading directions), ``0 <= burn_in < T``.
      key: a ``jax.random`` key for :math:`Q_0`; ``None`` uses ``jax.random.key(0)``.

    Returns:
      ``(*batch, k)`` exponents, largest first.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.LRU(hidden_size=2, r_min=0.5, r_max=0.9)
      >>> params = cell.init(jax.random.key(0), input_size=1)
      >>> exps = rj.inspect.lyapunov_exponents(cell, params, jnp.zeros((200, 1)), k=4, burn_in=50)
      >>> expected = jnp.sort(jnp.repeat(jnp.log(jnp.abs(cell.eigenvalues(params))), 2))[::-1]
      >>> bool(jnp.allclose(exps, expected, atol=1e-4))
      True
    """
    seq = check_sequences(cell, params, xs, carry, lengths)
    layout = CarryLayout(seq.like)
    n = layout.n
    check_positive_int(k, "k")
    if k > n:
        raise ValueError(
            f"k={k} exceeds the state size {n} of {cell!r} (the flattened carry; see the rnnjax.inspect "
            f"docstring); choose k <= {n}"
        )
    steps = seq.xs.shape[1]
    if not is_int(burn_in) or not 0 <= burn_in < max(steps, 1):
        raise ValueError(f"burn_in={burn_in!r} must be an int in [0, T) for T={steps}")
    if key is None:
        key = jax.random.key(0)
    frame, _ = jnp.linalg.qr(jax.random.normal(key, (n, int(k)), layout.real))
    exps = _lyapunov_jit(cell, params, seq.xs, seq.carry, seq.lengths, frame, int(burn_in))
    return unflatten_batch(exps, seq.batch_shape)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _lyapunov_jit(cell, params, xs, carry, lengths, frame, burn_in):
    def one(xs, carry, length):
        like = template(carry)
        step = step_map(cell, params, like)

        def body(state, inputs):
            v, q, total = state
            t, x = inputs
            new, push = jax.linearize(lambda u: step(u, x)[0], v)
            q_new, r = jnp.linalg.qr(jax.vmap(push, in_axes=1, out_axes=1)(q))
            valid = t < length
            count = valid & (t >= burn_in)
            total = total + jnp.where(count, jnp.log(jnp.abs(jnp.diagonal(r))), 0.0)
            return (jnp.where(valid, new, v), jnp.where(valid, q_new, q), total), None

        init = (CarryLayout(like).flatten(carry), frame, jnp.zeros(frame.shape[1], frame.dtype))
        (_, _, total), _ = jax.lax.scan(body, init, (jnp.arange(xs.shape[0]), xs))
        counted = length - burn_in
        exps = jnp.where(counted > 0, total / jnp.maximum(counted, 1).astype(total.dtype), jnp.nan)
        return -jnp.sort(-exps)

    return jax.vmap(one)(xs, carry, lengths)
