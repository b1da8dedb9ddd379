"""``rj.Associative()`` and ``rj.Chunked()``: the cells whose recurrence is linear (or linear
up to a clip) by associative scans (:mod:`rnnjax.engines.linear`, :mod:`rnnjax.engines.clipped`)."""

from __future__ import annotations

from typing import ClassVar

from rnnjax import tuning
from rnnjax.cell import Cell, ClippedLinearCell, LinearCell, frozen, runs_associatively
from rnnjax.cells.matrix_state import MatrixStateCell
from rnnjax.checks import check_positive_int
from rnnjax.engines import clipped, linear, matrix
from rnnjax.methods.base import Method, methods_for


def check_linear(method: Method, cell: Cell) -> None:
    """Raise ``ValueError`` unless ``method`` (Associative, Chunked) can run ``cell``."""
    if isinstance(cell, MatrixStateCell) and isinstance(method, Chunked):
        return
    if isinstance(cell, MatrixStateCell):
        raise ValueError(
            f"rj.{type(method).__name__}() runs vector-state linear recurrences; {type(cell).__name__} has a "
            f"matrix state. Methods that can run it: {methods_for(cell)}"
        )
    if not runs_associatively(cell):
        what = type(cell).__name__
        if isinstance(cell, ClippedLinearCell):  # one whose configuration is not clipped-linear
            what = f"{cell!r} (its clip_range is None: the activation is not a clip)"
        raise ValueError(
            f"rj.{type(method).__name__}() needs a cell with a linear recurrence (an rj.LinearCell such as "
            f"MinGRU, MinLSTM, LRU, or one linear up to a clip such as rj.IndRNN with 'relu'); {what} is "
            f"not one. Methods that can run it: {methods_for(cell)}"
        )


def linear_engine(cell: Cell):
    return linear if isinstance(cell, LinearCell) else clipped


@frozen
class Associative(Method):
    """``jax.lax.associative_scan`` over the ``(a_t, b_t)`` of an :class:`rnnjax.LinearCell`
    (MinGRU, MinLSTM, LRU, yours), or over the clipped maps of a
    :class:`rnnjax.cell.ClippedLinearCell` (``rj.IndRNN`` with ``"relu"``): O(log T) depth, exact
    states; gradients by parallel scans too."""

    name: ClassVar[str] = "associative"

    def splits_time(self, cell: Cell | None = None) -> bool:
        return True

    def check(self, cell: Cell) -> None:
        check_linear(self, cell)

    def run(self, cell, params, seqs):
        return linear_engine(cell).run(cell, params, seqs, chunk_size=None, time_sharding=seqs.time_sharding)


@frozen
class Chunked(Method):
    """Chunks of ``size`` steps. A :class:`rnnjax.LinearCell` (or
    :class:`rnnjax.cell.ClippedLinearCell`) runs sequentially within the chunks (all chunks at
    once) and associatively across the chunks' summaries. A matrix-state cell
    (:class:`rnnjax.cells.matrix_state.MatrixStateCell`: ``rj.GLA``, ``rj.Mamba2``, ``rj.MLSTM``,
    the ops of :mod:`rnnjax.linear_attention`) runs the chunkwise form: matrix products within a
    chunk, the state passed from chunk to chunk (:mod:`rnnjax.engines.chunkwise`).

    Args:
      size: steps per chunk; ``None``: the per-backend default
        (:func:`rnnjax.tuning.default_chunk_size`, :func:`rnnjax.tuning.matrix_chunk_size`).
    """

    name: ClassVar[str] = "chunked"
    size: int | None = None

    def __post_init__(self):
        if self.size is not None:
            check_positive_int(self.size, "size")

    def splits_time(self, cell: Cell | None = None) -> bool:
        return isinstance(cell, MatrixStateCell)  # the chunkwise form splits; vector cells: rj.Associative()

    def check(self, cell: Cell) -> None:
        check_linear(self, cell)

    def run(self, cell, params, seqs):
        if isinstance(cell, MatrixStateCell):
            return matrix.run(cell, params, seqs, chunk_size=self.size or tuning.matrix_chunk_size(cell))
        size = self.size or tuning.default_chunk_size(seqs.steps)
        return linear_engine(cell).run(cell, params, seqs, chunk_size=int(size))
