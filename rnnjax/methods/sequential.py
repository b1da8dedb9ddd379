"""``rj.Sequential()``: ``jax.lax.scan`` over the steps (:mod:`rnnjax.engines.sequential`,
the sequence-level derivative of :mod:`rnnjax.engines.fused`)."""

from __future__ import annotations

from typing import ClassVar

from rnnjax import tuning
from rnnjax.cell import Cell, DenseCell, frozen
from rnnjax.engines import fused, sequential
from rnnjax.methods.base import Method

REMAT = (None, "step", "sqrt")
GRADIENTS = ("auto", "autodiff", "fused")


@frozen
class Sequential(Method):
    """``jax.lax.scan`` over the steps: T dependent steps, any cell.

    Args:
      unroll: steps per loop iteration (``jax.lax.scan``'s ``unroll``), or ``"auto"``: the
        measured best for the backend (1 on CPU, 16 on GPU; :mod:`rnnjax.tuning`).
      remat: what the backward pass recomputes instead of storing: ``None`` (nothing;
        O(T) activations), ``"step"`` (each step from its carry), ``"sqrt"`` (nested
        checkpoints over about sqrt(T) blocks: O(sqrt(T)) activation memory for about one
        extra forward pass).
      gradient: how derivatives go through the loop. ``"fused"``: for dense cells
        (:class:`rnnjax.cell.DenseCell`: Elman, LSTM, GRU with ``reset_after``), the
        sequence-level derivative (:mod:`rnnjax.engines.fused`): products with the weights'
        tangents and cotangents leave the loop as large products over all steps; forward
        and reverse mode to any order; training 10-40% faster than autodiff on a CPU. It
        keeps its own residuals, so it takes no ``remat``. ``"autodiff"``: JAX's own
        derivative of the loop. ``"auto"`` (default): ``"fused"`` for dense cells without
        ``remat``, ``"autodiff"`` otherwise.

    Example:
      >>> import rnnjax as rj
      >>> rj.Sequential(remat="sqrt")
      Sequential(unroll='auto', remat='sqrt', gradient='auto')
      >>> rj.Sequential(remat="step", gradient="fused")
      Traceback (most recent call last):
        ...
      ValueError: gradient='fused' keeps its own residuals; it does not combine with remat='step'
    """

    name: ClassVar[str] = "sequential"
    unroll: int | bool | str = "auto"
    remat: str | None = None
    gradient: str = "auto"

    def __post_init__(self):
        tuning.check_unroll(self.unroll)
        if self.remat not in REMAT:
            raise ValueError(f"remat must be one of {REMAT}, got {self.remat!r}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        if self.gradient == "fused" and self.remat is not None:
            raise ValueError(f"gradient='fused' keeps its own residuals; it does not combine with remat={self.remat!r}")

    def check(self, cell: Cell) -> None:
        if self.gradient == "fused" and not (isinstance(cell, DenseCell) and cell.fusable):
            raise ValueError(
                f"gradient='fused' needs a dense cell (rj.Elman, rj.LSTM, rj.GRU with reset_after=True: "
                f"rnnjax.cell.DenseCell); {type(cell).__name__} with this configuration is not one: use "
                "rj.Sequential(gradient='autodiff')"
            )

    def uses_fused(self, cell: Cell) -> bool:
        """Whether this method differentiates ``cell`` by the sequence-level derivative."""
        if self.gradient == "auto":
            return self.remat is None and isinstance(cell, DenseCell) and cell.fusable
        return self.gradient == "fused"

    def run(self, cell, params, seqs):
        unroll = tuning.resolve_unroll(self.unroll)
        if self.uses_fused(cell):
            return fused.run(cell, params, seqs, unroll=unroll)
        return sequential.run(cell, params, seqs, unroll=unroll, remat=self.remat)
