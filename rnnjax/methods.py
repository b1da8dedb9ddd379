"""Method values: how :func:`rnnjax.scan` evaluates a recurrence.

Each method is a small frozen, hashable value that checks its options when it is built and
says which cells it can run (:meth:`Method.check`), in the style of optax's gradient
transformations::

    rj.Sequential(unroll="auto", remat=None, gradient="autodiff")   # any cell
    rj.Associative()                  # LinearCell (or clipped): one associative scan, O(log T) depth
    rj.Chunked(size=None)             # the same cells: sequential in chunks, associative across
    rj.Newton("auto", tol="auto", max_iters=50, init="zero")  # any cell, in parallel
    rj.Kernel(block_batch=16)         # a dense cell in one GPU kernel per direction
    rj.Auto()                         # one of the above per backend, cell kind and T
    rj.TimeSharded(method, sharding)  # Associative or Newton with time split over devices

The strings ``"sequential"``, ``"associative"``, ``"chunked"``, ``"newton"``, ``"kernel"``
and ``"auto"`` stand for each method's default value. Every method gives the sequential method's outputs
and final carry, with the same meaning of ``lengths``, ``resets`` and ``reverse``, within
float rounding (linear methods: within ``1e-5`` in float32 for moderate ``T``; Newton:
within about ``tol / (1 - rho)`` for a cell contracting at rate ``rho``).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

from rnnjax import tuning
from rnnjax.cell import Cell, ClippedLinearCell, DenseCell, LinearCell, frozen, runs_associatively
from rnnjax.checks import check_positive_int
from rnnjax.engines import clipped, fused, kernel, linear, newton, sequential
from rnnjax.sequence import TimeMajor
from rnnjax.sharding.mesh import SequenceSharding

REMAT = (None, "step", "sqrt")
GRADIENTS = ("auto", "autodiff", "fused")


class Method(abc.ABC):
    """How to evaluate a recurrence: a frozen, hashable value that holds all of its options and
    runs through one :meth:`run` on the canonical form. A new engine is a subclass here (its
    options as fields, checked in ``__post_init__``), one file in :mod:`rnnjax.engines`, and a
    test; every front door reaches it through :func:`rnnjax.scan.evaluate`."""

    name: ClassVar[str]

    def takes_guess(self) -> bool:
        """Whether :meth:`run` starts from ``seqs.guess`` (states after every step), as Newton does."""
        return False

    def splits_time(self) -> bool:
        """Whether this method's engine solves with the time axis split over devices (it reads
        ``seqs.time_sharding``): what :class:`TimeSharded` needs."""
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


def _methods_for(cell: Cell) -> str:
    names = ["rj.Sequential()", "rj.Newton()", "rj.Auto()"]
    if runs_associatively(cell):
        names[1:1] = ["rj.Associative()", "rj.Chunked()"]
    return ", ".join(names)


def _check_linear(method: Method, cell: Cell) -> None:
    if not runs_associatively(cell):
        what = type(cell).__name__
        if isinstance(cell, ClippedLinearCell):  # one whose configuration is not clipped-linear
            what = f"{cell!r} (its clip_range is None: the activation is not a clip)"
        raise ValueError(
            f"rj.{type(method).__name__}() needs a cell with a linear recurrence (an rj.LinearCell such as "
            f"MinGRU, MinLSTM, LRU, or one linear up to a clip such as rj.IndRNN with 'relu'); {what} is "
            f"not one. Methods that can run it: {_methods_for(cell)}"
        )


def _linear_engine(cell: Cell):
    return linear if isinstance(cell, LinearCell) else clipped


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
        tuning.resolve_unroll(self.unroll)  # raises on a bad value
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
        _check_linear(self, cell)

    def run(self, cell, params, seqs):
        return _linear_engine(cell).run(cell, params, seqs, chunk_size=None, time_sharding=seqs.time_sharding)


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
        _check_linear(self, cell)

    def run(self, cell, params, seqs):
        size = self.size or tuning.default_chunk_size(seqs.steps)
        return _linear_engine(cell).run(cell, params, seqs, chunk_size=int(size))


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

    def splits_time(self) -> bool:
        return self.variant in ("auto", "deer", "quasi-deer")  # ELK's Kalman smoother is not split

    def resolve(self, cell: Cell, steps: int, backend: str | None = None) -> Method:
        """This method with ``variant="auto"`` replaced by the cell's best variant."""
        del steps, backend
        if self.variant != "auto":
            return self
        return dataclasses.replace(self, variant=newton.best_variant(cell))

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


@frozen
class Kernel(Method):
    """A dense cell's whole recurrence in one GPU kernel per direction (Pallas; Triton on
    NVIDIA GPUs): the input products of all steps as one large product, then one kernel
    that loops over the steps with the carry on chip and the cell's own ``update`` traced
    in; its backward is one reverse kernel plus large products (:mod:`rnnjax.engines.kernel`).
    Dense cells: ``rj.Elman``, ``rj.LSTM``, ``rj.GRU`` with ``reset_after=True``, yours
    (:class:`rnnjax.cell.DenseCell`), and those inside ``rj.Mixed(..., carry_mode="keep")``.

    Args:
      block_batch: batch rows per kernel program (programs run in parallel, one per block);
        a power of two, at least 16 on a GPU.
      precision: the float32 products': ``"default"`` (TF32 on the GPU's tensor cores, as
        XLA's default and PyTorch's cuDNN RNNs), ``"highest"`` (full float32), or ``None``:
        what ``jax_default_matmul_precision`` says (unset: ``"default"``), like XLA's products.
      num_warps: Triton warps per program (8: no register spills at width 128; measured by
        ``benchmarks/lab/kernel_report.py``, see ``benchmarks/lab/DECISIONS.md``).
      weights: ``"stream"`` (read ``W_h`` from L2 at every step: any size) or ``"hold"``
        (read it once and keep it on chip: only where it fits in a multiprocessor's
        registers and shared memory, e.g. 16-bit or small ``W_h``).
      interpret: run the kernels in Pallas' interpreter (``None``: where the default backend
        is not a GPU). Interpreted, the engine is exact but slow: it is how the tests check
        it on CPU. ``rj.Auto()`` never picks this method on CPU.

    Gradients equal autodiff's up to float rounding (a ``jax.custom_vjp``); higher derivatives
    (``jax.hessian``, grad of grad) go through a ``lax.scan`` of the same steps; forward mode
    alone (``jax.jvp``) is refused, naming ``rj.Sequential()``. float64 runs in float64
    interpreted and is refused on a GPU, where carry widths must be powers of two.
    """

    name: ClassVar[str] = "kernel"
    block_batch: int = 16
    precision: str | None = None
    num_warps: int = 8
    weights: str = "stream"
    interpret: bool | None = None

    def __post_init__(self):
        kernel.check_options(self.block_batch, self.precision, self.num_warps, self.weights, self.interpret)

    def check(self, cell: Cell) -> None:
        if kernel.dense_cell_of(cell) is None:
            raise ValueError(
                f"rj.Kernel() needs a dense cell (rj.Elman, rj.LSTM, rj.GRU with reset_after=True: "
                f"rnnjax.cell.DenseCell), alone or in rj.Mixed(..., carry_mode='keep'); {type(cell).__name__} "
                f"with this configuration is not one. Methods that can run it: {_methods_for(cell)}"
            )

    def run(self, cell, params, seqs):
        return kernel.run(
            cell,
            params,
            seqs,
            block_batch=int(self.block_batch),
            precision=self.precision,
            interpret=self.interpret,
            num_warps=int(self.num_warps),
            weights=self.weights,
        )


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
    method: Method
    sharding: SequenceSharding

    def __post_init__(self):
        if not isinstance(self.method, Method) or isinstance(self.method, TimeSharded):
            raise TypeError(f"rj.TimeSharded needs a method value such as rj.Associative(), got {self.method!r}")
        if not isinstance(self.sharding, SequenceSharding):
            raise TypeError(f"sharding must be an rnnjax.sharding.mesh.SequenceSharding, got {self.sharding!r}")

    def takes_guess(self) -> bool:
        return self.method.takes_guess()

    def splits_time(self) -> bool:
        return True

    def resolve(self, cell: Cell, steps: int, backend: str | None = None) -> Method:
        inner = self.method
        if isinstance(inner, Auto):
            inner = as_method(tuning.choose_method(cell, steps, backend, time_sharded=True))
        return TimeSharded(inner.resolve(cell, steps, backend), self.sharding)

    def check(self, cell: Cell) -> None:
        if not isinstance(self.method, Auto) and not self.method.splits_time():
            raise ValueError(
                f"{self.method!r} does not split the time axis over devices: sequence parallelism "
                "(rj.distributed.sequence_scan) runs rj.Associative() or rj.Newton() with 'deer', 'quasi-deer' "
                "or 'auto' (or rj.Auto() for either); ELK's Kalman smoother, the sequential loop and the "
                "kernel are not split"
            )
        self.method.check(cell)

    def run(self, cell, params, seqs):
        return self.method.run(cell, params, seqs._replace(time_sharding=self.sharding))


BY_NAME: dict[str, type[Method]] = {m.name: m for m in (Sequential, Associative, Chunked, Newton, Kernel, Auto)}


def as_method(method: Any) -> Method:
    """A method value from a value or one of the names in :data:`BY_NAME`."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str) and method in BY_NAME:
        return BY_NAME[method]()
    raise ValueError(
        f"unknown method {method!r}; expected a method value such as rj.Sequential() or one of {list(BY_NAME)}"
    )
