"""A jitted training step: gradients of a loss function and one optimizer update, on one
device or data-parallel over a mesh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rnnjax import distributed
from rnnjax.cell import PyTree
from rnnjax.checks import check_optimizer, check_positive_number
from rnnjax.sharding.mesh import automatic_axes
from rnnjax.train.checks import check_aux, check_loss, check_not_donated
from rnnjax.train.state import TrainState, apply_gradients, check_state

__all__ = ["jit_over_mesh", "jit_step", "make_train_step"]


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    clip_norm: float | None = None,
    has_aux: bool = False,
    donate: bool = True,
    mesh: Mesh | str | None = None,
    data_axis: str = "data",
    model_axis: str | None = None,
) -> Callable[[TrainState, PyTree], tuple[TrainState, dict]]:
    """A jitted training step: gradients of ``loss_fn``, one ``optimizer`` update.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (a float scalar), or ``-> (loss, aux)``
        with ``has_aux``, ``aux`` a dict of metrics. ``batch`` is any pytree (arrays,
        a dropout key, ...).
      optimizer: any ``optax.GradientTransformation``; the state must come from
        ``TrainState.create(params, optimizer)`` with the same optimizer.
      clip_norm: if given, gradients are scaled down to this global norm before the
        update (``optax.clip_by_global_norm``); the optimizer's state is unaffected.
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      donate: donate the state's buffers to the step (the state passed in is deleted;
        use the returned one). Passing a deleted state again raises a ``ValueError``
        naming the deleted array.
      mesh: a ``jax.sharding.Mesh``: data parallelism over its ``data_axis``. Every array
        of the batch with an axis is split along its leading (batch) axis; the state is
        replicated, or with ``model_axis`` the last axis of its matrices (hidden units)
        is split over that second axis. The loss is the global batch's, so the step
        equals the single-device step up to float rounding; the recurrence runs per
        shard (:func:`rnnjax.distributed.data_parallel`) and XLA reduces the gradients.
        A batch whose leading axis does not divide over ``data_axis``, or an axis the
        mesh lacks, is an error before anything compiles. ``"local"``: the devices of
        this process (the CPU cores exposed by :func:`rnnjax.distributed.use_cpu_cores`,
        or the local GPUs) on one ``data_axis``: the batch is split over the largest
        number of them that divides its leading axis (all of them for a multiple of the
        device count; the plain step for one), compiled once per such number.
      data_axis, model_axis: mesh axis names (``model_axis`` optional).

    Returns:
      ``step(state, batch) -> (new_state, metrics)`` with ``metrics = {"loss", "grad_norm",
      **aux}`` as device scalars; ``grad_norm`` is the global norm before clipping.
      Compiled once per batch shape. With :mod:`~rnnjax.train.losses`, an integer label
      out of range at a real step makes ``metrics["loss"]`` NaN (it cannot raise inside
      ``jit``).

    Example:
      >>> import jax.numpy as jnp, optax, rnnjax as rj
      >>> loss_fn = lambda p, batch: jnp.mean((batch * p["w"] - 1.0) ** 2)
      >>> step = rj.train.make_train_step(loss_fn, optax.sgd(0.1))
      >>> state = rj.train.TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1))
      >>> state, metrics = step(state, jnp.ones(3))
      >>> float(metrics["loss"]), [round(w, 4) for w in state.params["w"].tolist()]  # 0.1 * 2 / 3
      (1.0, [0.0667, 0.0667, 0.0667])
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, batch), got {loss_fn!r}")
    check_optimizer(optimizer)
    check_positive_number(clip_norm, "clip_norm", finite=False, optional=True)

    def objective(params, batch):
        out = loss_fn(params, batch)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("with has_aux=True, loss_fn must return (loss, aux_dict)")
            loss, aux = out
            aux = check_aux(aux)
        else:
            if isinstance(out, tuple):
                raise TypeError(
                    f"loss_fn returned a tuple of {len(out)}; expected a scalar loss "
                    f"(pass has_aux=True if it returns (loss, aux_dict))"
                )
            loss, aux = out, {}
        check_loss(loss)
        return loss, aux

    value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def train_step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict]:
        check_state(state, optimizer)
        (loss, aux), grads = value_and_grad(state.params, batch)
        new_state, grad_norm = apply_gradients(state, grads, optimizer, clip_norm)
        return new_state, {"loss": loss, "grad_norm": grad_norm, **aux}

    return jit_for_mesh(train_step, mesh, data_axis, model_axis, donate, ("batch",))


def jit_for_mesh(
    step: Callable, mesh: Mesh | str | None, data_axis: str, model_axis: str | None, donate: bool, names: tuple
) -> Callable:
    """``step(state, *batch_like)`` jitted: plainly (``mesh=None``), over ``mesh``
    (:func:`jit_over_mesh`), or for ``mesh="local"`` over the largest number of this
    process's devices that divides the batch's leading axis (one compiled step per number)."""
    if mesh is None:
        return jit_step(step, donate)
    if not isinstance(mesh, str):
        return jit_over_mesh(step, mesh, data_axis, model_axis, donate, names)
    check_local_mesh(mesh, data_axis, model_axis)
    devices = jax.local_devices()
    steps: dict[int, Callable] = {}

    def for_batch(rest: tuple) -> Callable:
        sizes = [jnp.shape(leaf)[0] for leaf in jax.tree.leaves(rest) if jnp.ndim(leaf)]
        size = sizes[0] if sizes else 1
        n = max(k for k in range(1, len(devices) + 1) if size % k == 0)
        if n not in steps:
            sub = None if n == 1 else Mesh(devices[:n], (data_axis,))
            steps[n] = (
                jit_step(step, donate) if sub is None else jit_over_mesh(step, sub, data_axis, None, donate, names)
            )
        return steps[n]

    def local_step(state, *rest):
        return for_batch(rest)(state, *rest)

    local_step.lower = lambda state, *rest: for_batch(rest).lower(state, *rest)  # type: ignore[attr-defined]
    return local_step


def check_local_mesh(mesh: str, data_axis: str, model_axis: str | None) -> None:
    """Raise unless ``mesh`` is ``"local"`` and usable in this process."""
    if mesh != "local":
        raise ValueError(f'mesh must be a jax.sharding.Mesh, "local" or None, got {mesh!r}')
    if model_axis is not None:
        raise ValueError('mesh="local" has one axis (data parallelism); pass a Mesh to use model_axis')
    if jax.process_count() > 1:
        raise ValueError(
            f'mesh="local" spans this process\'s devices only, but {jax.process_count()} processes run: '
            f"pass a mesh over jax.devices(), e.g. jax.make_mesh((jax.device_count(),), ({data_axis!r},))"
        )


class _StateChecked:
    """``fn(state, *rest)``, whose failure on a state deleted by an earlier donation raises
    :func:`check_not_donated`'s ``ValueError`` instead; every other attribute (``lower``,
    ``trace``, ...) is ``fn``'s."""

    def __init__(self, fn: Callable):
        self._fn = fn

    def __call__(self, state, *rest):
        try:
            return self._fn(state, *rest)
        except Exception as err:
            # Checked only after a failure: checking every leaf before each call cost
            # ~1 us per leaf, on every step.
            try:
                check_not_donated(state, "state")
            except ValueError as donated:
                raise donated from err
            raise

    def __getattr__(self, name: str) -> Any:
        if name == "_fn":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._fn, name)


def jit_step(step: Callable, donate: bool) -> Callable:
    """``jax.jit(step)`` for ``step(state, *rest)``, the state donated when ``donate``; a
    state whose arrays were donated already raises a ``ValueError`` naming the array."""
    return _StateChecked(jax.jit(step, donate_argnums=(0,) if donate else ()))


def jit_over_mesh(
    step: Callable, mesh: Mesh, data_axis: str, model_axis: str | None, donate: bool, names: tuple[str, ...]
) -> Callable:
    """``step(state, *batch_like)`` jitted over ``mesh``.

    Every ``batch_like`` argument (named ``names`` in errors) is split along its leading
    axis over ``data_axis``, the state is replicated (or split over ``model_axis``), and the
    recurrence runs per shard. Shapes are checked before compiling; a state deleted by an
    earlier donation raises a ``ValueError`` naming the array.
    """
    distributed.check_mesh_axis(mesh, data_axis, "data_axis")
    if model_axis is not None:
        distributed.check_mesh_axis(mesh, model_axis, "model_axis")
        if model_axis == data_axis:
            raise ValueError(f"model_axis and data_axis must be different mesh axes, both are {data_axis!r}")
    mesh = automatic_axes(mesh)

    def traced(state, *rest):
        with distributed.data_parallel(mesh, data_axis):
            out = step(state, *rest)
        new_state = jax.lax.with_sharding_constraint(out[0], distributed.state_shardings(out[0], mesh, model_axis))
        return (new_state, *out[1:])

    jitted = jax.jit(traced, donate_argnums=(0,) if donate else ())

    def step_over_mesh(state, *rest):
        for name, arg in zip(names, rest):
            distributed.check_batch(arg, mesh, data_axis, name)
        state = jax.device_put(state, distributed.state_shardings(state, mesh, model_axis))
        rest = tuple(jax.device_put(arg, distributed.batch_shardings(arg, mesh, data_axis)) for arg in rest)
        return jitted(state, *rest)

    step_over_mesh.lower = lambda state, *rest: jitted.lower(state, *rest)  # type: ignore[attr-defined]
    return _StateChecked(step_over_mesh)
