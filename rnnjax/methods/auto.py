"""Method values over other methods: ``rj.Auto()`` picks one from :mod:`rnnjax.tuning`'s
measured tables; ``rj.TimeSharded(method, sharding)`` runs one with the time axis split over
devices."""

from __future__ import annotations

from typing import ClassVar

from rnnjax import tuning
from rnnjax.cell import Cell, frozen
from rnnjax.methods.base import Method, as_method
from rnnjax.sharding.mesh import SequenceSharding


@frozen
class Auto(Method):
    """One of the methods above, per backend, cell kind and ``T``, from the measured table in
    :mod:`rnnjax.tuning`; on CPU the sequential loop.

    Example:
      >>> import rnnjax as rj
      >>> rj.Auto().resolve(rj.MinGRU(8), 4096, backend="gpu")
      Associative()
    """

    name: ClassVar[str] = "auto"

    def resolve(self, cell: Cell, steps: int, backend: str | None = None) -> Method:
        return as_method(tuning.choose_method(cell, steps, backend))

    def run(self, cell, params, seqs):
        return self.resolve(cell, seqs.steps).run(cell, params, seqs)


@frozen
class TimeSharded(Method):
    """``method`` with the time axis split over ``sharding``'s devices: its engine solves every
    affine recurrence across them (:class:`rnnjax.sharding.mesh.SequenceSharding`).
    ``rj.distributed.sequence_scan`` builds it; ``method`` is ``rj.Associative()``,
    ``rj.Newton("deer" | "quasi-deer" | "auto")`` or ``rj.Auto()`` (:data:`rnnjax.tuning.TIME_SHARDED`).

    Example:
      >>> import jax, rnnjax as rj
      >>> from rnnjax.sharding.mesh import SequenceSharding
      >>> sharded = rj.TimeSharded(rj.Auto(), SequenceSharding(jax.make_mesh((1,), ("seq",)), "seq"))
      >>> sharded.resolve(rj.GRU(8), 1024).method
      Newton(variant='quasi-deer', tol='auto', max_iters=50, damping=None, init='zero', solve='auto', keep_states=False)
    """

    name: ClassVar[str] = "time-sharded"
    named: ClassVar[bool] = False  # it wraps a method: there is no default value to name
    method: Method
    sharding: SequenceSharding

    def __post_init__(self):
        if not isinstance(self.method, Method) or isinstance(self.method, TimeSharded):
            raise TypeError(f"rj.TimeSharded needs a method value such as rj.Associative(), got {self.method!r}")
        if not isinstance(self.sharding, SequenceSharding):
            raise TypeError(f"sharding must be an rnnjax.sharding.mesh.SequenceSharding, got {self.sharding!r}")

    def takes_guess(self) -> bool:
        return self.method.takes_guess()

    def splits_time(self, cell: Cell | None = None) -> bool:
        return True

    def resolve(self, cell: Cell, steps: int, backend: str | None = None) -> Method:
        inner = self.method
        if isinstance(inner, Auto):
            inner = as_method(tuning.choose_method(cell, steps, backend, time_sharded=True))
        return TimeSharded(inner.resolve(cell, steps, backend), self.sharding)

    def check(self, cell: Cell) -> None:
        if not isinstance(self.method, Auto) and not self.method.splits_time(cell):
            raise ValueError(
                f"{self.method!r} does not split the time axis over devices: sequence parallelism "
                "(rj.distributed.sequence_scan) runs rj.Associative() or rj.Newton() with 'deer', 'quasi-deer' "
                "or 'auto' (or rj.Auto() for either), and rj.Chunked() for matrix-state cells; ELK's Kalman "
                "smoother, the sequential loop and the kernel are not split"
            )
        self.method.check(cell)

    def run(self, cell, params, seqs):
        return self.method.run(cell, params, seqs._replace(time_sharding=self.sharding))
