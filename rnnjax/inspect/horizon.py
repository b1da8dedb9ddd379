r"""How far back a cell remembers: norms of :math:`\partial h_{T-1} / \partial h_t` and of
the saliency :math:`\partial y_{T-1} / \partial x_t` for every step (Bengio et al. 1994;
Pascanu et al. 2013)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.carry import CarryLayout
from rnnjax.cell import Cell, PyTree
from rnnjax.inspect.sequences import check_sequences, step_map, template, unflatten_batch


class Horizon(NamedTuple):
    r"""Output of :func:`jacobian_horizon`; both ``(*batch, T)``.

    Attributes:
      state: :math:`\|\partial h_{L-1} / \partial h_t\|`, ``h_t`` the state after step ``t``
        and ``L`` the sequence's length: how much a perturbation of the state after step
        ``t`` still moves the final state. Entry ``L - 1`` is the norm of the identity
        (``sqrt(n)`` for the Frobenius norm, 1 for the spectral norm).
      saliency: :math:`\|\partial y_{L-1} / \partial x_t\|`, the norm over the output's and
        the input's features of the last real output's dependence on input step ``t``.

    Entries at ``t >= L`` are 0.
    """

    state: jax.Array
    saliency: jax.Array


_NORMS = ("fro", 2)


def jacobian_horizon(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    carry: PyTree | None = None,
    *,
    lengths: jax.Array | None = None,
    ord: str | int = "fro",
) -> Horizon:
    r"""Norms of :math:`\partial h_{T-1} / \partial h_t` and :math:`\partial y_{T-1} / \partial x_t`
    for every step ``t``, from one forward and one reverse pass.

    With :math:`h_t = F(h_{t-1}, x_t)` the state after step ``t`` (the carry as a state
    vector, see :mod:`rnnjax.inspect`) and :math:`J_s = \partial F / \partial h` at step ``s``:

    .. math::

        \frac{\partial h_{T-1}}{\partial h_t} = J_{T-1} J_{T-2} \cdots J_{t+1}, \qquad
        \frac{\partial y_{T-1}}{\partial x_t} = \frac{\partial y_{T-1}}{\partial h_{T-2}}
            J_{T-2} \cdots J_{t+1} \frac{\partial F}{\partial x}\Big|_t \quad (t < T - 1)

    One scan adds a zero perturbation :math:`\epsilon_t` to the state after every step; the
    ``jax.vjp`` of :math:`(\epsilon, x) \mapsto (h_{T-1}, y_{T-1})`, vmapped over the
    ``n + m`` unit cotangents (``n`` state, ``m`` output features), gives every
    :math:`\partial h_{T-1} / \partial \epsilon_t = \partial h_{T-1} / \partial h_t` and
    :math:`\partial y_{T-1} / \partial x_t` as whole matrices. Cost: one forward pass and one
    reverse pass of width ``n + m``; memory ``(n + m) T (n + D)`` per sequence.

    Args:
      cell, params: any rnnjax cell and its parameters.
      xs: ``(*batch, T, D)`` (``(*batch, T, H, W, C)`` for ConvLSTM). Any batch axes.
      carry: initial carry, as ``cell.init_carry(batch_shape)``; zeros when ``None``.
      lengths: ``(*batch,)`` integers in ``[0, T]``. A sequence's final state and output
        are those of its step ``L - 1``, as in :func:`rnnjax.scan`; entries at ``t >= L``
        are 0 (a sequence of length 0 is all zeros).
      ord: the matrix norm, ``"fro"`` (Frobenius; default) or ``2`` (spectral, the largest
        singular value; an extra SVD per step).

    Returns:
      :class:`Horizon` ``(state, saliency)``, each ``(*batch, T)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.Elman(hidden_size=4)
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> xs = jnp.ones((2, 6, 2))
      >>> horizon = rj.inspect.jacobian_horizon(cell, params, xs, lengths=jnp.array([6, 3]))
      >>> horizon.state.shape
      (2, 6)
      >>> float(horizon.state[1, 2]), [float(v) for v in horizon.state[1, 3:]]  # sqrt(4); past L
      (2.0, [0.0, 0.0, 0.0])
    """
    if ord not in _NORMS:
        raise ValueError(f"ord must be 'fro' (Frobenius) or 2 (spectral), got {ord!r}")
    seq = check_sequences(cell, params, xs, carry, lengths)
    if seq.xs.shape[1] == 0:  # T = 0: no step, so nothing to measure
        empty = jnp.zeros((*seq.batch_shape, 0), jnp.result_type(*jax.tree.leaves(seq.carry)))
        return Horizon(empty, empty)
    state, saliency = _horizon_jit(cell, params, seq.xs, seq.carry, seq.lengths, ord)
    return Horizon(unflatten_batch(state, seq.batch_shape), unflatten_batch(saliency, seq.batch_shape))


def _matrix_norm(m: jax.Array, ord: str | int) -> jax.Array:
    """Norm of each ``(..., rows, cols)`` matrix."""
    if ord == "fro":
        return jnp.sqrt(jnp.sum(jnp.square(m), axis=(-2, -1)))
    return jnp.linalg.svd(m, compute_uv=False)[..., 0]


@functools.partial(jax.jit, static_argnums=(0, 5))
def _horizon_jit(cell, params, xs, carry, lengths, ord):
    def one(xs, carry, length):
        like = template(carry)
        step = step_map(cell, params, like)
        steps = xs.shape[0]
        v0 = CarryLayout(like).flatten(carry)

        def run(eps, xs):
            def body(v, inputs):
                t, x, e = inputs
                new, y = step(v, x)
                # Past the length the carry is frozen and no perturbation enters.
                return jnp.where(t < length, new + e, v), y

            final, ys = jax.lax.scan(body, v0, (jnp.arange(steps), xs, eps))
            y_last = ys[jnp.clip(length - 1, 0, steps - 1)] * (length > 0).astype(ys.dtype)
            return final, y_last

        eps = jnp.zeros((steps, v0.shape[0]), v0.dtype)
        (final, y_last), pullback = jax.vjp(run, eps, xs)
        n, m = final.shape[0], y_last.shape[0]
        seeds = (
            jnp.concatenate([jnp.eye(n, dtype=final.dtype), jnp.zeros((m, n), final.dtype)]),
            jnp.concatenate([jnp.zeros((n, m), y_last.dtype), jnp.eye(m, dtype=y_last.dtype)]),
        )
        d_eps, d_xs = jax.vmap(pullback)(seeds)  # (n + m, T, n), (n + m, T, *feat)
        state = jnp.moveaxis(d_eps[:n], 1, 0)  # (T, n, n): [t, i, j] = d h_final[i] / d h_t[j]
        saliency = jnp.moveaxis(d_xs[n:].reshape(m, steps, -1), 1, 0)  # (T, m, D)
        return _matrix_norm(state, ord), _matrix_norm(saliency, ord)

    return jax.vmap(one)(xs, carry, lengths)
