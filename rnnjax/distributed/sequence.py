"""Sequence parallelism: one long sequence split over a mesh axis along time."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from rnnjax.cell import Cell, PyTree
from rnnjax.methods import Method, TimeSharded, as_method
from rnnjax.scan import evaluate
from rnnjax.sequence import validate
from rnnjax.sharding.mesh import SequenceSharding, automatic_axes, check_mesh_axis, require_shard_map


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
    method: Method | str = "auto",
    guess: PyTree | None = None,
) -> tuple[jax.Array, PyTree]:
    r""":func:`rnnjax.scan` with the time axis split over ``mesh``'s ``axis``.

    ``method=rj.Associative()`` (linear cells, :class:`rnnjax.LinearCell`, and those linear up
    to a clip, :class:`rnnjax.cell.ClippedLinearCell`): each device composes its shard's maps
    :math:`h \mapsto a_t h + b_t` (or their clipped form) into one; the devices
    exchange these summaries (one ``all_gather``) and each runs its shard from the state its
    predecessors produce (:class:`rnnjax.sharding.mesh.SequenceSharding`).
    ``method=rj.Newton("deer" | "quasi-deer" | "auto")`` (any cell): Newton's method with the
    cell evaluated on every device's shard and each linear solve split as above; gradients by
    the implicit function theorem, solved the same way. ``"auto"``: associative for the cells
    it can run, ``rj.Newton()`` otherwise (:data:`rnnjax.tuning.TIME_SHARDED`). The method runs
    as ``rj.TimeSharded(method, sharding)`` through the same evaluation as :func:`rnnjax.scan`;
    ``guess`` is Newton's first iterate, as there.

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
    require_shard_map()
    n = check_mesh_axis(mesh, axis)
    xs, carry, lengths, resets = validate(cell, params, xs, carry, lengths, resets)
    steps = xs.shape[-(cell.input_ndim + 1)]
    if steps < n:
        raise ValueError(
            f"xs has {steps} time steps (shape {xs.shape}), fewer than the {n} devices of mesh axis "
            f"{axis!r}: every device needs at least one step; use a smaller mesh axis or rj.scan"
        )
    sharded = TimeSharded(as_method(method), SequenceSharding(automatic_axes(mesh), axis))
    ys, final, _ = evaluate(cell, params, xs, carry, lengths, resets, reverse, sharded, guess)
    return ys, final
