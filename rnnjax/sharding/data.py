"""Data parallelism: the batch split over a mesh axis.

``rj.train.make_train_step(..., mesh=mesh)`` (or, for your own ``jit``, the
:func:`data_parallel` context) splits the batch over a mesh axis. The loss is traced once
for the global batch, so masked means mean what they mean on one device; only the
recurrence runs per shard: inside the context, :func:`rnnjax.scan` runs its loop under
``jax.shard_map`` with the parameters replicated, so the backward pass reduces the
parameter gradients with one all-reduce after the loop (automatic partitioning reduced
them inside the loop, measured slower: ``benchmarks/lab/DECISIONS.md``).
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

from rnnjax.cell import Cell, carry_batch_shape
from rnnjax.sequence import compute_dtype
from rnnjax.sharding.mesh import automatic_axes, check_mesh_axis, place, require_shard_map

PyTree = Any


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


@dataclasses.dataclass(frozen=True)
class DataParallel:
    mesh: Mesh
    axis: str


_CURRENT: contextvars.ContextVar[DataParallel | None] = contextvars.ContextVar("rnnjax_data_parallel", default=None)


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
    require_shard_map()
    check_mesh_axis(mesh, axis)
    token = _CURRENT.set(DataParallel(automatic_axes(mesh), axis))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_data_parallel() -> DataParallel | None:
    """The innermost :func:`data_parallel` context's (mesh, axis), or ``None``."""
    return _CURRENT.get()


def split_batch(
    run: Callable, cell: Cell, params: PyTree, xs: jax.Array, carry: PyTree, lengths, resets, dp: DataParallel
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
    dtype = compute_dtype(xs, params)
    vary = lambda tree: jax.tree.map(lambda a: jax.lax.pcast(a, axis, to="varying"), tree)
    # Only the arrays given are split; None stays None inside.
    present = {k: v for k, v in {"carry": carry, "lengths": lengths, "resets": resets}.items() if v is not None}

    def local(params, xs, present):
        # Replicated parameters marked varying once, before the loop: their cotangent is
        # then one psum where they enter, not a reduction inside every step.
        params = vary(params)
        c = present.get("carry")
        if c is None:
            step_shape = xs.shape[: -(cell.input_ndim + 1)] + xs.shape[-cell.input_ndim :]
            c = vary(cell.init_carry(carry_batch_shape(step_shape), dtype))
        return run(params, xs, c, present.get("lengths"), present.get("resets"))

    return jax.shard_map(
        local,
        mesh=dp.mesh,
        in_specs=(P(), P(axis), P(axis)),
        out_specs=P(axis),
        axis_names=frozenset({axis}),
    )(place(params, dp.mesh, P()), place(xs, dp.mesh, P(axis)), place(present, dp.mesh, P(axis)))
