"""Mesh helpers shared by data and sequence parallelism: axis checks, automatic axes, layout
hints, and the time axis split (:class:`SequenceSharding`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any


def require_shard_map() -> None:
    """Raise if this JAX lacks ``jax.shard_map`` or ``jax.lax.pcast``."""
    if not (hasattr(jax, "shard_map") and hasattr(jax.lax, "pcast")):
        raise RuntimeError(
            f"rnnjax.distributed needs jax.shard_map and jax.lax.pcast; JAX {jax.__version__} lacks them (upgrade JAX)"
        )


def check_mesh_axis(mesh: Any, axis: Any, name: str = "axis") -> int:
    """Return the size of ``mesh``'s axis ``axis``; a clear error if there is none."""
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((8,), ('data',))), got {type(mesh).__name__}"
        )
    if axis not in mesh.axis_names:
        raise ValueError(f"{name}={axis!r} is not an axis of the mesh; its axes are {tuple(mesh.axis_names)}")
    return int(mesh.shape[axis])


def automatic_axes(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis automatic. ``jax.make_mesh`` makes explicit axes in recent JAX,
    where arrays carry their sharding in their type; rnnjax's collectives live inside
    ``shard_map`` and its layouts are hints (``with_sharding_constraint``), which is what
    automatic axes are for."""
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None or all(t == axis_type.Auto for t in getattr(mesh, "axis_types", ())):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(axis_type.Auto,) * len(mesh.axis_names))


def place(tree: PyTree, mesh: Mesh, spec: P) -> PyTree:
    """Ask XLA to lay ``tree`` out as ``spec`` on ``mesh`` (inside a traced function)."""
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


@dataclasses.dataclass(frozen=True)
class SequenceSharding:
    """The time axis split over ``mesh``'s ``axis`` (``rj.distributed.sequence_scan``).

    Hashable, so it is static configuration: :class:`rnnjax.TimeSharded` carries it to the
    parallel engines, which solve every affine recurrence across the devices
    (:func:`rnnjax.engines.affine.solve_affine`) and call :meth:`constrain` on time-major arrays.
    """

    mesh: Mesh
    axis: str

    def __post_init__(self):
        check_mesh_axis(self.mesh, self.axis)
        object.__setattr__(self, "mesh", automatic_axes(self.mesh))  # see automatic_axes

    @property
    def shards(self) -> int:
        """The number of devices along ``axis``."""
        return int(self.mesh.shape[self.axis])

    def constrain(self, x: jax.Array) -> jax.Array:
        """Ask XLA to split a time-major array's axis 0 over the devices (when it divides)."""
        if x.shape[0] % self.shards:
            return x
        return place(x, self.mesh, P(self.axis))
