"""``rj.Associative()`` and ``rj.Chunked()``: the cells whose recurrence is linear (or linear
up to a clip) by associative scans (:mod:`rnnjax.engines.linear`, :mod:`rnnjax.engines.clipped`)."""

from __future__ import annotations

from typing import ClassVar

from rnnjax import tuning
from rnnjax.cell import Cell, ClippedLinearCell, LinearCell, frozen, runs_associatively
from rnnjax.checks import check_positive_int
from rnnjax.engines import clipped, linear
from rnnjax.methods.base import Method, methods_for


def check_linear(method: Method, cell: Cell) -> None:
    """Raise ``ValueError`` unless ``method`` (Associative, Chunked) can run ``cell``."""
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

    def splits_time(self) -> bool:
        return True

    def check(self, cell: Cell) -> None:
        check_linear(self, cell)

    def run(self, cell, params, seqs):
        return linear_engine(cell).run(cell, params, seqs, chunk_size=None, time_sharding=seqs.time_sharding)


@frozen
class Chunked(Method):
    """A :class:`rnnjax.LinearCell` (or :class:`rnnjax.cell.ClippedLinearCell`) sequentially
    within chunks of ``size`` steps (all chunks at once) and associatively across the chunks'
    summaries.

    Args:
      size: steps per chunk; ``None``: the per-backend default
        (:func:`rnnjax.tuning.default_chunk_size`).
    """

    name: ClassVar[str] = "chunked"
    size: int | None = None

    def __post_init__(self):
        if self.size is not None:
            check_positive_int(self.size, "size")

    def check(self, cell: Cell) -> None:
        check_linear(self, cell)

    def run(self, cell, params, seqs):
        size = self.size or tuning.default_chunk_size(seqs.steps)
        return linear_engine(cell).run(cell, params, seqs, chunk_size=int(size))
