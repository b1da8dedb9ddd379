"""The method a front door runs when given none: the chunkwise form for matrix-state cells,
the sequential loop for every other cell."""

from __future__ import annotations

from rnnjax.cell import Cell
from rnnjax.cells.matrix_state import MatrixStateCell
from rnnjax.methods.base import Method, as_method
from rnnjax.methods.linear import Chunked
from rnnjax.methods.sequential import Sequential


def default_method(cell: Cell) -> Method:
    """``rj.Chunked()`` for a :class:`rnnjax.cells.matrix_state.MatrixStateCell`, else
    ``rj.Sequential()``."""
    return Chunked() if isinstance(cell, MatrixStateCell) else Sequential()


def method_for(cell: Cell, method: Method | str | None) -> Method:
    """``method`` as a value (:func:`rnnjax.methods.as_method`); ``None``: :func:`default_method`."""
    return default_method(cell) if method is None else as_method(method)
