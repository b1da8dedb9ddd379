"""The training state ``(step, params, opt_state)`` and one optimizer update of it."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rnnjax.cell import PyTree
from rnnjax.checks import check_optimizer

__all__ = ["TrainState", "apply_gradients", "check_state"]


class TrainState(NamedTuple):
    """Everything training changes: ``(step, params, opt_state)``, a pytree.

    Attributes:
      step: ``()`` int32, the number of parameter updates applied so far.
      params: the model's parameters (any pytree of arrays).
      opt_state: the optimizer's state for ``params``.

    Example:
      >>> import jax.numpy as jnp, optax, rnnjax as rj
      >>> state = rj.train.TrainState.create({"w": jnp.ones(3)}, optax.sgd(0.1))
      >>> int(state.step)
      0
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree

    @classmethod
    def create(cls, params: PyTree, optimizer: optax.GradientTransformation) -> TrainState:
        """Step 0, ``params`` and ``optimizer.init(params)``.

        The arrays are copies, so donating the state to a train step never deletes the
        caller's ``params``.
        """
        check_optimizer(optimizer)
        copy = lambda x: jnp.array(x, copy=True)
        params = jax.tree.map(copy, params)
        return cls(jnp.zeros((), jnp.int32), params, jax.tree.map(copy, optimizer.init(params)))


def check_state(state: Any, optimizer: optax.GradientTransformation) -> None:
    """``state`` must be a :class:`TrainState` whose ``opt_state`` ``optimizer`` made."""
    if not isinstance(state, TrainState):
        raise TypeError(
            f"state is a {type(state).__name__}; expected rj.train.TrainState "
            f"(rj.train.TrainState.create(params, optimizer))"
        )
    expected = jax.tree.structure(jax.eval_shape(optimizer.init, state.params))
    got = jax.tree.structure(state.opt_state)
    if expected != got:  # type: ignore[operator]  # jax's PyTreeDef is opaque to mypy
        raise ValueError(
            f"state.opt_state has structure {got}; expected {expected} from optimizer.init(params) "
            f"(build the state with TrainState.create(params, optimizer) with the step's optimizer)"
        )


# optax >= 0.2.5 has optax.tree.norm; optax.global_norm (deprecated there) before.
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def apply_gradients(
    state: TrainState, grads: PyTree, optimizer: optax.GradientTransformation, clip_norm: float | None
) -> tuple[TrainState, jax.Array]:
    """One optimizer update; returns the new state and the gradients' global norm before clipping."""
    grad_norm = _global_norm(grads)
    if clip_norm is not None:
        grads, _ = optax.clip_by_global_norm(clip_norm).update(grads, optax.EmptyState())
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), grad_norm
