r"""Several devices: data parallelism and sequence parallelism on ``jax.sharding`` meshes.

rnnjax does not bring a distributed engine of its own; it places work on a
:class:`jax.sharding.Mesh` with JAX's ``jit`` shardings and ``jax.shard_map``.

**Data parallelism.** ``rj.train.make_train_step(..., mesh=mesh)`` (or, for your own
``jit``, the :func:`data_parallel` context) splits the batch over a mesh axis. The loss
is traced once for the global batch, so masked means and any other loss mean exactly
what they mean on one device; only the recurrence itself runs per shard: inside the
context, :func:`rnnjax.scan` runs its loop under ``jax.shard_map`` with the parameters
replicated, so the backward pass reduces the parameter gradients with one all-reduce
after the loop. (Plain automatic partitioning of a batch-sharded scan reduces them once
per step inside the loop; measured slower, see ``benchmarks/data_parallel.py``.)

**Sequence parallelism.** :func:`sequence_scan` splits one long sequence over a mesh axis
along time. Each device composes its shard's affine maps :math:`h \mapsto a_t h + b_t`
into one map, the devices exchange these summaries (one ``all_gather`` of a state-sized
pair each), and each device then runs its shard from the state its predecessors produce.
Linear cells use this directly (``method="associative"``); nonlinear cells run Newton's
method (DEER / quasi-DEER) with the time axis sharded, every linear solve of it done this way.

On a multi-core CPU the devices are host devices: start Python with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set before JAX is imported; rnnjax
never sets it). Across hosts, call ``jax.distributed.initialize()`` first; a mesh over
``jax.devices()`` then spans every process and :func:`shard_batch` assembles each process's
local rows into the global batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rnnjax.cell import Cell, LinearCell, carry_batch_shape

PyTree = Any

__all__ = [
    "data_parallel",
    "current_data_parallel",
    "shard_batch",
    "replicate",
    "batch_shardings",
    "state_shardings",
    "check_mesh_axis",
    "check_batch",
    "sequence_scan",
    "SequenceSharding",
]


def _require_shard_map() -> None:
    if not (hasattr(jax, "shard_map") and hasattr(jax.lax, "pcast")):
        raise RuntimeError(
            f"rnnjax.distributed needs jax.shard_map and jax.lax.pcast; JAX {jax.__version__} lacks "
            "them (upgrade JAX)"
        )


def check_mesh_axis(mesh: Any, axis: Any, name: str = "axis") -> int:
    """Return the size of ``mesh``'s axis ``axis``; a clear error if there is none."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((8,), ('data',))), got {type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"{name}={axis!r} is not an axis of the mesh; its axes are {tuple(mesh.axis_names)}")
    return int(mesh.shape[axis])


def _path(path: tuple) -> str:
    return jax.tree_util.keystr(path) if path else ""


def check_batch(batch: PyTree, mesh: Mesh, axis: str, name: str = "batch") -> None:
    """Every array leaf of ``batch`` with an axis must have a leading (batch) axis divisible
    by the size of ``mesh``'s ``axis``; scalars are replicated and pass."""
    n = check_mesh_axis(mesh, axis)
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = jnp.shape(leaf)
        if shape and shape[0] % n:
            raise ValueError(
                f"{name}{_path(path)} has shape {tuple(shape)}: its leading (batch) axis of {shape[0]} "
                f"does not divide over the {n} devices of mesh axis {axis!r}; use a batch size that "
                f"is a multiple of {n}"
            )


def batch_shardings(batch: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
    """``NamedSharding`` per leaf: the leading axis split over ``axis``; scalars replicated."""
    check_mesh_axis(mesh, axis)
    return jax.tree.map(lambda x: NamedSharding(mesh, P(axis) if jnp.ndim(x) else P()), batch)


def state_shardings(tree: PyTree, mesh: Mesh, model_axis: str | None = None) -> PyTree:
    """``NamedSharding`` per leaf of parameters or a training state: replicated, or with
    ``model_axis`` the last axis of every matrix (ndim >= 2) split over it where it divides
    (hidden units of the weight matrices; Adam's moments follow their parameters)."""
    n = 1 if model_axis is None else check_mesh_axis(mesh, model_axis, "model_axis")

    def one(x):
        shape = jnp.shape(x)
        if model_axis is not None and len(shape) >= 2 and shape[-1] % n == 0:
            return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), model_axis))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree)


def shard_batch(batch: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
    """Place ``batch`` with its leading axis split over ``mesh``'s ``axis``.

    With one process the leaves are the global batch. With several (after
    ``jax.distributed.initialize()``) each process passes its own rows, and the result is
    the global batch made of every process's rows in process order
    (``jax.make_array_from_process_local_data``).
    """
    shardings = batch_shardings(batch, mesh, axis)
    if jax.process_count() == 1:
        check_batch(batch, mesh, axis)
        return jax.device_put(batch, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x), batch, shardings)


def replicate(tree: PyTree, mesh: Mesh, model_axis: str | None = None) -> PyTree:
    """Place parameters or a training state on every device of ``mesh`` (see
    :func:`state_shardings` for ``model_axis``)."""
    return jax.device_put(tree, state_shardings(tree, mesh, model_axis))


def _auto(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis automatic. ``jax.make_mesh`` makes explicit axes in recent JAX,
    where arrays carry their sharding in their type; rnnjax's collectives live inside
    ``shard_map`` and its layouts are hints (``with_sharding_constraint``), which is what
    automatic axes are for."""
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None or all(t == axis_type.Auto for t in getattr(mesh, "axis_types", ())):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(axis_type.Auto,) * len(mesh.axis_names))


def _place(tree: PyTree, mesh: Mesh, spec: P) -> PyTree:
    """Ask XLA to lay ``tree`` out as ``spec`` on ``mesh`` (inside a traced function)."""
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


# ---- data parallelism: the recurrence per batch shard ----------------------------------------


@dataclasses.dataclass(frozen=True)
class _DataParallel:
    mesh: Mesh
    axis: str


_CURRENT: contextvars.ContextVar[_DataParallel | None] = contextvars.ContextVar("rnnjax_data_parallel", default=None)


@contextlib.contextmanager
def data_parallel(mesh: Mesh, axis: str = "data") -> Iterator[None]:
    """Within this context, :func:`rnnjax.scan` (and every layer and Flax module built on
    it) runs the recurrence per shard of the leading batch axis over ``mesh``'s ``axis``.

    It acts when a function is traced: enter it around the first call of your ``jit``-ed
    function (or inside the function). Batched inputs must have a leading batch axis
    divisible by the axis size. Outputs are the same numbers as without the context, up to
    float rounding; the gradient of replicated parameters is one all-reduce after the loop.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> mesh = jax.make_mesh((1,), ("data",))
      >>> cell = rj.GRU(8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jnp.ones((4, 5, 3))
      >>> with rj.distributed.data_parallel(mesh, "data"):
      ...     ys, h = jax.jit(lambda p, x: rj.scan(cell, p, x))(params, xs)
      >>> bool(jnp.allclose(ys, rj.scan(cell, params, xs)[0], atol=1e-6))
      True
    """
    _require_shard_map()
    check_mesh_axis(mesh, axis)
    token = _CURRENT.set(_DataParallel(_auto(mesh), axis))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_data_parallel() -> _DataParallel | None:
    """The innermost :func:`data_parallel` context's (mesh, axis), or ``None``."""
    return _CURRENT.get()


def split_batch(
    run: Callable, cell: Cell, params: PyTree, xs: jax.Array, carry: PyTree, lengths, resets, dp: _DataParallel
) -> tuple[jax.Array, PyTree]:
    """``run(params, xs, carry, lengths, resets)`` per shard of the leading batch axis
    (called by :func:`rnnjax.scan` inside a :func:`data_parallel` context)."""
    n = int(dp.mesh.shape[dp.axis])
    batch_ndim = xs.ndim - cell.input_ndim - 1
    if batch_ndim == 0:
        raise ValueError(
            f"xs has shape {xs.shape}: a single sequence has no batch axis to split over mesh axis "
            f"{dp.axis!r}; call rj.scan outside rj.distributed.data_parallel, or use "
            "rj.distributed.sequence_scan to split it along time"
        )
    if xs.shape[0] % n:
        raise ValueError(
            f"xs has shape {xs.shape}: its batch axis of {xs.shape[0]} does not divide over the {n} "
            f"devices of mesh axis {dp.axis!r}; use a batch size that is a multiple of {n}"
        )
    axis = dp.axis
    inexact = [p for p in jax.tree_util.tree_leaves(params) if jnp.issubdtype(p.dtype, jnp.inexact)]
    dtype = jnp.result_type(xs.dtype, *inexact)
    vary = lambda tree: jax.tree.map(lambda a: jax.lax.pcast(a, axis, to="varying"), tree)
    # Only the arrays given are split; None stays None inside.
    present = {k: v for k, v in {"carry": carry, "lengths": lengths, "resets": resets}.items() if v is not None}

    def local(params, xs, present):
        # Replicated parameters marked varying once, before the loop: their cotangent is
        # then one psum where they enter, not a reduction inside every step.
        params = vary(params)
        c = present.get("carry")
        if c is None:
            step_shape = xs.shape[:-(cell.input_ndim + 1)] + xs.shape[-cell.input_ndim:]
            c = vary(cell.init_carry(carry_batch_shape(step_shape), dtype))
        return run(params, xs, c, present.get("lengths"), present.get("resets"))

    return jax.shard_map(
        local, mesh=dp.mesh, in_specs=(P(), P(axis), P(axis)), out_specs=P(axis), axis_names=frozenset({axis}),
    )(_place(params, dp.mesh, P()), _place(xs, dp.mesh, P(axis)), _place(present, dp.mesh, P(axis)))


# ---- sequence parallelism: the time axis split over devices ----------------------------------


@dataclasses.dataclass(frozen=True)
class SequenceSharding:
    """Where the time axis lives: ``mesh``'s ``axis``. Hashable, so it is a static argument
    of the parallel drivers in :mod:`rnnjax.parallel`, which call :meth:`solve` for every
    affine recurrence and :meth:`constrain` on time-major arrays."""

    mesh: Mesh
    axis: str

    @property
    def shards(self) -> int:
        return int(self.mesh.shape[self.axis])

    def constrain(self, x: jax.Array) -> jax.Array:
        """Ask XLA to split a time-major array's axis 0 over the devices (when it divides)."""
        if x.shape[0] % self.shards:
            return x
        return _place(x, self.mesh, P(self.axis))

    def solve(self, monoid, elems: PyTree, h0: jax.Array) -> jax.Array:
        """All states ``s_t`` (time axis 0) of the affine recurrence ``elems`` from ``h0``,
        the time axis split over the devices: local prefix maps on each device, an
        ``all_gather`` of each shard's total map, then each shard runs from the state the
        shards before it produce."""
        steps = jax.tree_util.tree_leaves(elems)[0].shape[0]
        n = self.shards
        pad = -steps % n
        if pad:  # identity maps past the end leave the state as it is; cut off below
            ident = monoid.identity(jax.tree.map(lambda e: jnp.broadcast_to(e[:1], (pad,) + e.shape[1:]), elems))
            elems = jax.tree.map(lambda e, i: jnp.concatenate([e, i], axis=0), elems, ident)
        axis = self.axis

        def local(elems, h0):
            prefix = jax.lax.associative_scan(monoid.combine, elems)  # this shard's prefix maps
            total = jax.tree.map(lambda e: e[-1:], prefix)
            totals = jax.tree.map(lambda e: jax.lax.all_gather(e, axis, axis=0, tiled=True), total)
            upto = jax.lax.associative_scan(monoid.combine, totals)  # (n, ...) inclusive over shards
            i = jax.lax.axis_index(axis)
            before = jax.tree.map(lambda e: e[jnp.maximum(i - 1, 0)], upto)
            start = jnp.where(i == 0, h0, monoid.apply(before, h0))
            return monoid.apply(prefix, start[None])

        states = jax.shard_map(
            local, mesh=self.mesh, in_specs=(P(axis), P()), out_specs=P(axis), axis_names=frozenset({axis}),
        )(_place(elems, self.mesh, P(axis)), _place(h0, self.mesh, P()))
        return states[:steps]


def sequence_scan(
    cell: Cell,
    params: PyTree,
    xs: jax.Array,
    carry: PyTree | None = None,
    *,
    mesh: Mesh,
    axis: str = "seq",
    lengths: jax.Array | None = None,
    resets: jax.Array | None = None,
    reverse: bool = False,
    method: str = "auto",
    newton: str | None = None,
    tol: float | None = None,
    max_iters: int | None = None,
) -> tuple[jax.Array, PyTree]:
    r""":func:`rnnjax.scan` with the time axis split over ``mesh``'s ``axis``.

    ``method="associative"`` (linear cells, :class:`rnnjax.LinearCell`): each device
    solves :math:`h_t = a_t h_{t-1} + b_t` on its shard; shards exchange their composed maps
    (see :class:`SequenceSharding`). ``method="newton"`` (any cell): DEER or quasi-DEER
    (``newton``, as :func:`rnnjax.parallel.newton_scan`) with the cell evaluated on every
    device's shard and each Newton step's linear recurrence solved as above; gradients by
    the implicit function theorem, solved the same way. ``"auto"``: associative for linear
    cells, newton otherwise.

    ``T`` need not divide by the number of devices (the last shard is padded with identity
    steps) but must be at least that number. ``lengths``, ``resets``, ``reverse`` and the
    returned ``(ys, final_carry)`` mean what they mean in :func:`rnnjax.scan`; the numbers
    equal the single-device parallel method's up to float rounding. The result lives on
    the mesh; call it under ``jax.jit`` (it is jit-compiled anyway) with ``xs`` placed by
    ``NamedSharding(mesh, P(None, axis))`` for a batch, or pass any array.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> mesh = jax.make_mesh((1,), ("seq",))
      >>> cell = rj.MinGRU(8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jax.random.normal(jax.random.key(1), (2, 64, 3))
      >>> ys, h = rj.distributed.sequence_scan(cell, params, xs, mesh=mesh, axis="seq")
      >>> bool(jnp.allclose(ys, rj.scan(cell, params, xs)[0], atol=1e-5))
      True
    """
    from rnnjax import parallel  # parallel imports the sequential driver; both sit below this module

    _require_shard_map()
    n = check_mesh_axis(mesh, axis)
    xs, carry, lengths, resets = parallel._validate(cell, params, xs, carry, lengths, resets)
    steps = xs.shape[-(cell.input_ndim + 1)]
    if steps < n:
        raise ValueError(
            f"xs has {steps} time steps (shape {xs.shape}), fewer than the {n} devices of mesh axis "
            f"{axis!r}: every device needs at least one step; use a smaller mesh axis or rj.scan"
        )
    linear = isinstance(cell, LinearCell)
    if method == "auto":
        method = "associative" if linear else "newton"
    if method not in ("associative", "newton"):
        raise ValueError(f'method must be "auto", "associative" or "newton" for sequence_scan, got {method!r}')
    if method == "associative" and not linear:
        raise ValueError(
            f'method="associative" needs a linear cell (rj.LinearCell); {type(cell).__name__} is nonlinear: '
            'use method="newton" (or "auto")'
        )
    sharding = SequenceSharding(_auto(mesh), axis)
    if method == "associative":
        if newton is not None or tol is not None or max_iters is not None:
            raise ValueError('newton, tol and max_iters apply to method="newton" only')
        return parallel._linear_jit(
            cell, params, xs, carry, lengths, resets, reverse=bool(reverse), chunk_size=None, time_sharding=sharding
        )
    variant = newton or parallel.DEFAULT_NEWTON
    if variant not in ("deer", "quasi-deer"):
        raise ValueError(
            f'newton={variant!r}: sequence_scan runs "deer" and "quasi-deer" (ELK\'s Kalman smoother is not '
            "split over devices)"
        )
    parallel.check_options(cell, "newton", tol=tol, max_iters=max_iters, newton=variant)
    ys, final, _ = parallel._newton_jit(
        cell, params, xs, carry, lengths, resets, reverse=bool(reverse), variant=variant,
        tol=None if tol is None else float(tol), max_iters=int(max_iters or parallel.DEFAULT_MAX_ITERS),
        damping=None, unroll=1, time_sharding=sharding,
    )
    return ys, final
