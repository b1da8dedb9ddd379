r"""Parallel-in-time evaluation: the whole sequence at once.

:func:`rnnjax.scan` runs these through its method values (:mod:`rnnjax.methods`); this
module gives the same engines as functions with their own reports:

- :func:`linear_scan`: cells with a linear recurrence :math:`h_t = a_t \odot h_{t-1} + b_t`
  (:class:`rnnjax.LinearCell`: MinGRU, MinLSTM, LRU, yours) or one linear up to a clip
  (:class:`rnnjax.cell.ClippedLinearCell`: ``rj.IndRNN`` with ``"relu"``), by an associative
  scan (``rj.Associative()``) or in chunks (``rj.Chunked(size)``).
- :func:`newton_scan`: any cell, by Newton iterations over all states at once (DEER,
  quasi-DEER, ELK; ``rj.Newton()``), with a sequential fallback; it also returns a
  :class:`NewtonInfo`.
- :func:`choose_method`, :func:`cell_kind`, :func:`default_chunk_size`: what ``rj.Auto()``
  and ``rj.Chunked()`` pick, from :mod:`rnnjax.tuning`; :func:`runs_associatively`: whether
  ``rj.Associative()`` and ``rj.Chunked()`` can run a cell.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cell import Cell, ClippedLinearCell, LinearCell, PyTree, runs_associatively
from rnnjax.engines.newton import DEFAULT_DAMPING, DEFAULT_TOL, VARIANTS, NewtonInfo
from rnnjax.methods import BY_NAME, Associative, Chunked, Newton, Sequential
from rnnjax.scan import evaluate
from rnnjax.sequence import check_reverse, validate
from rnnjax.tuning import cell_kind, choose_method, default_chunk_size

Array = jax.Array

__all__ = [
    "METHODS",
    "NEWTON_VARIANTS",
    "DEFAULT_NEWTON",
    "DEFAULT_MAX_ITERS",
    "DEFAULT_DAMPING",
    "DEFAULT_TOL",
    "NewtonInfo",
    "newton_scan",
    "linear_scan",
    "choose_method",
    "cell_kind",
    "runs_associatively",
    "default_chunk_size",
]

METHODS = tuple(sorted(BY_NAME))
NEWTON_VARIANTS = ("auto", *VARIANTS)
DEFAULT_NEWTON = Newton.variant
DEFAULT_MAX_ITERS = Newton.max_iters


def linear_scan(
    cell: LinearCell | ClippedLinearCell,
    params: Any,
    xs: Array,
    carry: Array | None = None,
    *,
    lengths: Array | None = None,
    resets: Array | None = None,
    reverse: bool = False,
    chunk_size: int | None = None,
) -> tuple[Array, Array]:
    r"""Run a :class:`rnnjax.LinearCell` (:mod:`rnnjax.engines.linear`) or a
    :class:`rnnjax.cell.ClippedLinearCell` (:mod:`rnnjax.engines.clipped`) over time in parallel:
    ``rj.scan`` with ``rj.Associative()`` (``chunk_size=None``) or ``rj.Chunked(chunk_size)``.

    Returns:
      ``(ys, final_carry)`` as :func:`rnnjax.scan`; float32 values within about ``1e-5``
      of the sequential method's for ``T`` up to a few thousand (the order of the products
      differs).

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.MinGRU(hidden_size=8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jax.random.normal(jax.random.key(1), (2, 50, 3))
      >>> ys, h = rj.parallel.linear_scan(cell, params, xs, lengths=jnp.array([50, 20]))
      >>> ys_ref, h_ref = rj.scan(cell, params, xs, lengths=jnp.array([50, 20]))
      >>> bool(jnp.allclose(ys, ys_ref, atol=1e-5)), bool(jnp.allclose(h, h_ref, atol=1e-5))
      (True, True)
    """
    method = Associative() if chunk_size is None else Chunked(chunk_size)
    method.check(cell)
    xs, carry, lengths, resets = validate(cell, params, xs, carry, lengths, resets)
    ys, final, _ = evaluate(cell, params, xs, carry, lengths, resets, check_reverse(reverse), method)
    return ys, final


def newton_scan(
    cell: Cell,
    params: Any,
    xs: Array,
    carry: PyTree | None = None,
    *,
    lengths: Array | None = None,
    resets: Array | None = None,
    reverse: bool = False,
    newton: str | None = None,
    tol: float | str | None = "auto",
    max_iters: int | None = None,
    damping: float | None = None,
    init: str = "zero",
    guess: PyTree | None = None,
    solve: str = "auto",
) -> tuple[Array, PyTree, NewtonInfo]:
    r"""Run any cell over time by Newton's method on all states at once
    (:mod:`rnnjax.engines.newton`); return ``(ys, final_carry, info)``.

    ``rj.scan(..., method=rj.Newton(newton, tol, max_iters, damping, init, solve))`` gives the same
    ``(ys, final_carry)``. Variants: ``"deer"`` (exact Jacobians: quadratic convergence; full
    ``n x n`` ones, ``T n^2`` memory, unless the cell gives exact structured ones, see
    :class:`rnnjax.cell.StructuredJacobian`), ``"quasi-deer"`` (diagonals,
    elementwise scans, linear convergence), ``"elk"``/``"quasi-elk"`` (Levenberg-Marquardt
    steps by a parallel Kalman smoother, damping adapted as a trust region). With a
    tolerance the iteration stops when
    :math:`\max_{t,i}|s^{(k)}_{t,i} - f(s^{(k)}_{t-1}, x_t)_i| \le` ``tol``; if that does not
    happen within ``max_iters`` steps (or the iterate is not finite) the result comes from a
    sequential scan, never a non-converged iterate. ``jax.lax.cond`` picks the branch, so
    only one runs, except under ``jax.vmap``. With ``tol=None`` exactly ``max_iters`` steps
    run, with no check and no fallback. Gradients come from the implicit function theorem at
    the returned states (one reverse linear solve with exact Jacobians; iterations with
    diagonal ones).

    Args:
      cell, params, xs, carry, lengths, resets, reverse: as :func:`rnnjax.scan`.
      newton: ``"auto"`` (``None``: ``"deer"`` for cells with exact Jacobian blocks, else
        ``"quasi-deer"``; :class:`rnnjax.Newton`), ``"deer"``, ``"quasi-deer"``, ``"elk"`` or
        ``"quasi-elk"``.
      tol: positive, ``"auto"`` (``1e-5`` for float32 states, ``1e-10`` for float64), or
        ``None`` (a fixed ``max_iters`` iterations).
      max_iters: positive int, Newton steps (before falling back, or in all with ``tol=None``);
        ``None``: 50.
      damping: ELK's initial damping, only for ``"elk"``/``"quasi-elk"``; ``None``: 1.
      init: the first iterate, ``"zero"`` or ``"step"`` (one cell step from zero states,
        at every position at once), when no ``guess`` is given.
      guess: the first iterate: carries after every step, shaped as ``info.states`` (each
        carry leaf ``(*batch, T, ...)``), e.g. the states a previous call returned for nearby
        parameters.
      solve: ``"auto"``, ``"associative"`` or ``"sequential"``: how each iteration's linear
        recurrence is solved (:class:`rnnjax.Newton`).

    Returns:
      ``ys``, ``final_carry`` as :func:`rnnjax.scan` and a :class:`NewtonInfo` whose
      ``states`` holds the carry after every step.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.GRU(hidden_size=4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jax.random.normal(jax.random.key(1), (2, 40, 3))
      >>> ys, h, info = rj.parallel.newton_scan(cell, params, xs, newton="deer")
      >>> bool(info.converged), bool(jnp.allclose(ys, rj.scan(cell, params, xs)[0], atol=1e-5))
      (True, True)
      >>> info.states.shape
      (2, 40, 4)
    """
    method = Newton(
        newton or Newton.variant,
        tol,
        Newton.max_iters if max_iters is None else max_iters,
        damping,
        init,
        solve,
        keep_states=True,
    )
    xs, carry, lengths, resets = validate(cell, params, xs, carry, lengths, resets)
    reverse = check_reverse(reverse)
    if xs.shape[-(cell.input_ndim + 1)] == 0:  # nothing to solve: the report of no iterations
        ys, final, _ = evaluate(cell, params, xs, carry, lengths, resets, reverse, Sequential())
        nb = xs.ndim - cell.input_ndim - 1  # batch axes
        states = jax.tree.map(lambda c: jnp.zeros(c.shape[:nb] + (0,) + c.shape[nb:], c.dtype), final)
        return ys, final, NewtonInfo(jnp.int32(0), jnp.bool_(True), jnp.zeros((), jnp.float32), states)
    return evaluate(cell, params, xs, carry, lengths, resets, reverse, method, guess)
