"""``rj.Newton()``: any cell by Newton iterations over all states at once
(:mod:`rnnjax.engines.newton`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from rnnjax import tuning
from rnnjax.cell import Cell, frozen
from rnnjax.cells.matrix_state import MatrixStateCell
from rnnjax.engines import newton
from rnnjax.methods.base import Method, methods_for


@frozen
class Newton(Method):
    """Any cell by Newton iterations over all states at once (:mod:`rnnjax.engines.newton`;
    :func:`rnnjax.parallel.newton_scan` also returns the iteration counts and the states).

    Each iteration linearises every step around the current guess and solves the linear
    recurrence with one associative scan. Cells that give their Jacobian's structure
    (:class:`rnnjax.cell.StructuredJacobian`) are linearised by ``L`` tangents per step instead
    of ``jax.jacfwd``'s ``n``: ``rj.ParaGRU``, ``rj.ParaLSTM`` and ``rj.IndRNN`` exactly (so
    ``"deer"`` is exact Newton with elementwise or ``2 x 2``-block scans), the dense cells
    (Elman, LSTM, GRU) for the diagonal ``"quasi-deer"`` uses.

    Args:
      variant: ``"auto"`` (default): the best the cell's capability allows, ``"deer"`` where the
        cell gives its exact Jacobian blocks (ParaGRU, ParaLSTM, IndRNN: exact Newton at
        quasi-DEER's cost), else ``"quasi-deer"`` (:meth:`resolve` names it). Or
        ``"deer"`` (exact Jacobians: full ``n x n`` ones, or the cell's exact blocks),
        ``"quasi-deer"`` (their diagonals), ``"elk"`` or ``"quasi-elk"`` (damped,
        Levenberg-Marquardt steps).
      tol: convergence threshold on :math:`\\max_{t,i}|s_t - f(s_{t-1}, x_t)|`; ``"auto"``:
        ``1e-5`` for float32 states, ``1e-10`` for float64, ``2e-2`` for 16-bit. Not reached
        within ``max_iters`` steps, the sequential loop's values are returned instead. ``None``:
        exactly ``max_iters`` iterations, no check, no fallback (a fixed-cost program, as
        ParaRNN trains: ``max_iters=3, init="step"`` for ``rj.ParaGRU``/``rj.ParaLSTM``; counts
        for other cells in ``benchmarks/lab/DECISIONS.md``).
      max_iters: Newton steps (the cap, or with ``tol=None`` the count), at most ``2**31 - 1``.
      damping: ELK's initial damping (``"elk"``, ``"quasi-elk"`` only); ``None``:
        :data:`rnnjax.engines.newton.DEFAULT_DAMPING`.
      init: the first iterate: ``"zero"`` states, or ``"step"``: one step of the cell from
        zero states at every position, all at once (ParaRNN's guess). States from elsewhere
        (e.g. the previous training step's) go in as ``guess=`` of ``rj.scan``,
        ``rj.parallel.newton_scan`` or ``rj.distributed.sequence_scan``.
      solve: how each iteration's linear recurrence (and the gradient's) is solved:
        ``"associative"`` (one parallel scan), ``"sequential"`` (a scan over time of that
        elementwise or small-block recurrence; the cell itself still runs at all steps at once)
        or ``"auto"``: sequential on CPU, associative on accelerators
        (:func:`rnnjax.tuning.newton_solve`). ELK's smoother is always associative.
      keep_states: also return the carry after every step in the engine's report
        (``info.states``; what ``rj.parallel.newton_scan`` asks for).

    Example:
      >>> import rnnjax as rj
      >>> rj.Newton("deer", tol=None, max_iters=3, init="step")
      Newton(variant='deer', tol=None, max_iters=3, damping=None, init='step', solve='auto', keep_states=False)
      >>> rj.Newton().resolve(rj.ParaLSTM(8), 4096).variant, rj.Newton().resolve(rj.GRU(8), 4096).variant
      ('deer', 'quasi-deer')
    """

    name: ClassVar[str] = "newton"
    variant: str = "auto"
    tol: float | str | None = "auto"
    max_iters: int = 50
    damping: float | None = None
    init: str = "zero"
    solve: str = "auto"
    keep_states: bool = False

    def __post_init__(self):
        newton.check_options(self.variant, self.tol, self.max_iters, self.damping, self.init, self.keep_states)
        tuning.newton_solve(self.solve)  # raises on an unknown value

    def takes_guess(self) -> bool:
        return True

    def splits_time(self, cell: Cell | None = None) -> bool:
        return self.variant in ("auto", "deer", "quasi-deer")  # ELK's Kalman smoother is not split

    def resolve(self, cell: Cell, steps: int, backend: str | None = None) -> Method:
        """This method with ``variant="auto"`` replaced by the cell's best variant."""
        del steps, backend
        if self.variant != "auto":
            return self
        return dataclasses.replace(self, variant=newton.best_variant(cell))

    def check(self, cell: Cell) -> None:
        if isinstance(cell, MatrixStateCell):
            raise ValueError(
                f"rj.Newton() linearises a nonlinear recurrence; {type(cell).__name__}'s matrix-state recurrence "
                f"is linear in its state, so its chunkwise form is exact. Methods that can run it: {methods_for(cell)}"
            )

    def run(self, cell, params, seqs):
        variant = self.variant if self.variant != "auto" else newton.best_variant(cell)
        damping = self.damping
        if damping is None and variant in ("elk", "quasi-elk"):
            damping = newton.DEFAULT_DAMPING
        tol = self.tol if self.tol is None or isinstance(self.tol, str) else float(self.tol)
        return newton.run(
            cell,
            params,
            seqs,
            variant=variant,
            tol=tol,
            max_iters=int(self.max_iters),
            damping=None if damping is None else float(damping),
            unroll=tuning.resolve_unroll("auto"),
            init=self.init,
            guess=seqs.guess,
            keep_states=bool(self.keep_states),
            time_sharding=seqs.time_sharding,
            solve=tuning.newton_solve(self.solve),
        )
