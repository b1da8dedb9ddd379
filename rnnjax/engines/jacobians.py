r"""The state Jacobians a Newton solve linearises with, by structure.

A Newton iteration (:mod:`rnnjax.engines.newton`) needs, at every step, the Jacobian
:math:`J_t = \partial f / \partial s\,(s_{t-1}, x_t)` of the step on the flattened carry
(:class:`rnnjax.carry.CarryLayout`, size ``n``), or an approximation of it, in one of three
forms:

- ``"full"``: ``(n, n)`` matrices from ``jax.jacfwd`` (n tangents per step): DEER.
- ``"diag"``: ``(n,)`` diagonals. From the cell's unit blocks
  (:class:`rnnjax.cell.StructuredJacobian`: ``L`` tangents per step) when it has them, else the
  diagonal of ``jax.jacfwd``. Exact for a cell whose Jacobian is diagonal (``L = 1``,
  ``jacobian_kind == "exact"``), quasi-DEER otherwise.
- ``"block"``: ``(U, L, L)`` unit blocks of an exact block-diagonal Jacobian (``L > 1``, e.g.
  ``rj.ParaLSTM``'s ``(h, c)`` per unit); states are viewed as ``(L, U)``.

:class:`Structure` carries the matching affine algebra, product and transpose, so the engine
is written once for all three.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.carry import CarryLayout
from rnnjax.cell import Cell, StructuredJacobian, unit_width
from rnnjax.engines.affine import DIAG, FULL, Monoid, mv, solve_affine

Array = jax.Array


def _block_combine(e1, e2):
    a1, b1 = e1
    a2, b2 = e2
    return jnp.einsum("...uij,...ujk->...uik", a2, a1), _block_mv(a2, b1) + b2


def _block_mv(a: Array, s: Array) -> Array:
    """``(..., U, L, L)`` blocks applied to states ``(..., L, U)``."""
    return jnp.einsum("...uij,...ju->...iu", a, s)


BLOCK = Monoid(
    _block_combine,
    lambda e: (jnp.broadcast_to(jnp.eye(e[0].shape[-1], dtype=e[0].dtype), e[0].shape), jnp.zeros_like(e[1])),
    lambda e, h: _block_mv(e[0], h) + e[1],
)


class Structure(NamedTuple):
    """How one Newton solve represents the Jacobians.

    Attributes:
      kind: ``"full"``, ``"diag"`` or ``"block"`` (see the module docstring).
      from_cell: the Jacobians come from the cell's ``step_with_jacobian``, not ``jax.jacfwd``.
      exact: they are the whole Jacobian (Newton's method), not an approximation (quasi).
      units: ``(L, U)`` for ``"block"``; else ``None``.
    """

    kind: str
    from_cell: bool
    exact: bool
    units: tuple[int, int] | None = None

    def matvec(self, J: Array, s: Array) -> Array:
        """``J s`` for states ``s`` (..., n)."""
        if self.kind == "full":
            return mv(J, s)
        if self.kind == "diag":
            return J * s
        return _block_mv(J, self._split(s)).reshape(s.shape)

    def transpose(self, J: Array) -> Array:
        return J if self.kind == "diag" else jnp.swapaxes(J, -1, -2)

    def solve(self, J: Array, u: Array, h0: Array, time_sharding=None, sequential: bool = False) -> Array:
        """All states of :math:`s_t = J_t s_{t-1} + u_t` from ``h0`` (time axis 0): one
        associative scan, or with ``sequential`` a sequential one (``time_sharding`` wins)."""
        chunk = J.shape[0] if sequential else None  # one chunk of all steps: the sequential scan
        if self.kind != "block":
            return solve_affine(FULL if self.kind == "full" else DIAG, (J, u), h0, chunk, time_sharding)
        states = solve_affine(BLOCK, (J, self._split(u)), self._split(h0), chunk, time_sharding)
        return states.reshape(u.shape)

    def _split(self, s: Array) -> Array:
        assert self.units is not None
        return s.reshape(s.shape[:-1] + self.units)


def structure_for(cell: Cell, layout: CarryLayout, variant: str) -> Structure:
    """The structure a Newton ``variant`` uses for ``cell``: the cell's blocks wherever it has
    them (exact blocks serve ``"deer"`` too), ``jax.jacfwd`` otherwise."""
    full = variant in ("deer", "elk")
    kind = cell.jacobian_kind if isinstance(cell, StructuredJacobian) else None
    units = unit_width(cell)
    leaves = len(layout.shapes)
    if kind is not None and units is None:
        raise ValueError(
            f"{type(cell).__name__}.jacobian_kind is {kind!r} but its carry leaves do not all have one "
            "feature axis of the same width; a structured Jacobian needs carry leaves of shape (*batch, U)"
        )
    if kind == "exact" and (leaves == 1 or not full):
        return Structure("diag", True, leaves == 1)
    if kind == "exact" and variant == "deer":
        assert units is not None  # checked above
        return Structure("block", True, True, (leaves, units))
    if kind is not None and not full:
        return Structure("diag", True, False)
    return Structure("full" if full else "diag", False, full)


def jacobian_fn(cell: Cell, layout: CarryLayout, structure: Structure, step):
    """``one(params, s_prev, x, reset, valid) -> (J, F, y)`` for one sequence's step: ``F`` the
    new state and ``y`` the output, as ``step`` (the engine's masked step on flattened states)
    gives them."""

    if not structure.from_cell:

        def by_jacfwd(p, s, x, r, v):
            def out(s):
                new, y = step(p, s, x, r, v)
                return new, (new, y)

            jac, (val, y) = jax.jacfwd(out, has_aux=True)(s)
            return (jac if structure.kind == "full" else jnp.diagonal(jac)), val, y

        return by_jacfwd

    def by_blocks(p: Any, s: Array, x: Array, r: Array, v: Array):
        s_in = jnp.where(r, jnp.zeros_like(s), s)
        (new, y), blocks = cell.step_with_jacobian(p, layout.unflatten(s_in), x)  # type: ignore[attr-defined]
        blocks = blocks.astype(layout.real)
        # A reset cuts the dependence on s_prev; a step past the length is the identity map.
        eye = jnp.eye(blocks.shape[-1], dtype=blocks.dtype)
        blocks = jnp.where(v, jnp.where(r, jnp.zeros_like(blocks), blocks), eye)
        new = jnp.where(v, layout.flatten(new), s)
        y = jnp.where(v, y, jnp.zeros((), y.dtype))
        if structure.kind == "block":
            return blocks, new, y
        diagonal = jnp.diagonal(blocks, axis1=-2, axis2=-1)  # (U, L): leaf l's entry of unit u
        return diagonal.T.reshape(-1), new, y  # leaf-major, as CarryLayout.flatten

    return by_blocks
