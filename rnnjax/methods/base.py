"""The :class:`Method` protocol every method value implements, the registry of their names
(:data:`BY_NAME`) and :func:`as_method`."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from rnnjax.cell import Cell, runs_associatively
from rnnjax.cells.matrix_state import MatrixStateCell
from rnnjax.sequence import TimeMajor

# The method values by name (their ``name``), filled as each is defined.
BY_NAME: dict[str, type[Method]] = {}


class Method(abc.ABC):
    """How to evaluate a recurrence: a frozen, hashable value that holds all of its options and
    runs through one :meth:`run` on the canonical form. A new engine is a subclass here (its
    options as fields, checked in ``__post_init__``), one file in :mod:`rnnjax.engines`, and a
    test; every front door reaches it through :func:`rnnjax.scan.evaluate`."""

    name: ClassVar[str]
    #: Whether ``as_method(name)`` builds this method's default value (a method whose fields
    #: have no defaults, such as :class:`rnnjax.TimeSharded`, sets it to ``False``).
    named: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.__dict__.get("named", True):
            BY_NAME[cls.name] = cls  # every method value, wherever it is defined

    def takes_guess(self) -> bool:
        """Whether :meth:`run` starts from ``seqs.guess`` (states after every step), as Newton does."""
        return False

    def splits_time(self, cell: Cell | None = None) -> bool:
        """Whether this method's engine solves ``cell`` (any cell when ``None``) with the time axis
        split over devices (it reads ``seqs.time_sharding``): what :class:`TimeSharded` needs."""
        return False

    def check(self, cell: Cell) -> None:  # noqa: B027 (a hook: by default every cell is accepted)
        """Raise ``ValueError`` if this method cannot run ``cell``, naming the methods that can."""

    def resolve(self, cell: Cell, steps: int, backend: str | None = None) -> Method:
        """The concrete method to run for ``cell`` over ``steps`` steps (itself, but for Auto)."""
        del cell, steps, backend
        return self

    @abc.abstractmethod
    def run(self, cell: Cell, params: Any, seqs: TimeMajor):
        """``(ys_tm, final_carry, info)`` for the checked sequences ``seqs`` (the canonical
        :class:`rnnjax.sequence.TimeMajor` form; it also carries the ``guess`` and
        ``time_sharding`` a front door set). ``info`` is ``None`` or the engine's report."""


def methods_for(cell: Cell) -> str:
    """The methods that can run ``cell``, for error messages."""
    if isinstance(cell, MatrixStateCell):
        return "rj.Chunked(), rj.Sequential(), rj.Auto()"
    names = ["rj.Sequential()", "rj.Newton()", "rj.Auto()"]
    if runs_associatively(cell):
        names[1:1] = ["rj.Associative()", "rj.Chunked()"]
    return ", ".join(names)


def as_method(method: Any) -> Method:
    """A method value from a value or one of the names in :data:`BY_NAME`."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str) and method in BY_NAME:
        return BY_NAME[method]()
    raise ValueError(
        f"unknown method {method!r}; expected a method value such as rj.Sequential() or one of {sorted(BY_NAME)}"
    )
