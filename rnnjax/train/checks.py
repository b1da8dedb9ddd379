"""Checks shared by the training steps: what a loss function returns, its aux, and that a
state was not donated already. Each raises a ``TypeError``/``ValueError`` that names the
fix. Argument checks used beyond training (ints, numbers, the optimizer) are in
:mod:`rnnjax.checks`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["as_array", "check_aux", "check_loss", "check_not_donated"]


def as_array(x: Any) -> Any:
    """``x`` unchanged if it is an array (NumPy, JAX or a tracer), else ``np.asarray(x)``."""
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


def check_loss(loss: Any) -> None:
    """The loss a ``loss_fn`` returned must be a floating scalar."""
    shape = tuple(jnp.shape(loss))
    if shape != ():
        raise ValueError(f"loss_fn returned a loss of shape {shape}; expected a scalar (average over the batch)")
    dtype = jnp.result_type(loss)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"loss_fn returned a loss of dtype {dtype}; expected a floating scalar")


def check_aux(aux: Any) -> dict:
    """The aux of a ``has_aux`` loss as a dict of metrics whose names do not clash with the step's."""
    if not isinstance(aux, Mapping):
        raise TypeError(f"with has_aux=True, loss_fn's aux must be a dict of metrics, got {type(aux).__name__}")
    clash = sorted({"loss", "grad_norm"} & set(aux))
    if clash:
        raise ValueError(f"loss_fn's aux has the key {clash[0]!r}, which the step's metrics use; rename it")
    return dict(aux)


def check_not_donated(tree: Any, name: str = "state") -> None:
    """Every array of ``tree`` must be live: one deleted by donation to a jitted step raises
    a ``ValueError`` naming its path (``state.params['w']``) and the fix, where JAX would say
    "Buffer has been deleted or donated". Tracers and non-arrays pass."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and leaf.is_deleted():
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} has been deleted: it was donated to a train step "
                f"at a previous call (a donating step deletes the state passed in); use the state "
                f"that step (or rj.train.fit) returned, as in state, metrics = step(state, batch)"
            )
