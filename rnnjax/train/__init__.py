"""Training with Optax: masked sequence losses, train steps, truncated BPTT, ``fit``, checkpoints.

- :mod:`~rnnjax.train.losses`: losses over ``(*batch, T, ...)`` sequences that respect
  ``lengths`` (``(*batch,)`` ints, as in :func:`rnnjax.scan`), averaged over the real steps.
- :class:`TrainState` is ``(step, params, opt_state)``. :func:`make_train_step` and
  :func:`make_tbptt_step` build jitted steps from a loss function and any
  ``optax.GradientTransformation``; the state is donated (the state passed in is deleted;
  use the returned one).
- :func:`fit` runs a step over batches with a progress line and an evaluation hook.
- :func:`save_checkpoint` / :func:`restore_checkpoint` store states with orbax.

Example:
  >>> import jax, jax.numpy as jnp, optax, rnnjax as rj
  >>> cell = rj.GRU(4)
  >>> params = {"rnn": cell.init(jax.random.key(0), 2), "out": jnp.zeros((4, 3))}
  >>> def loss_fn(p, batch):
  ...     ys, _ = rj.scan(cell, p["rnn"], batch["x"], lengths=batch["lengths"])
  ...     return rj.train.softmax_cross_entropy(ys @ p["out"], batch["y"], batch["lengths"])
  >>> step = rj.train.make_train_step(loss_fn, optax.adam(1e-2), clip_norm=1.0)
  >>> state = rj.train.TrainState.create(params, optax.adam(1e-2))
  >>> batch = {"x": jnp.ones((2, 5, 2)), "y": jnp.zeros((2, 5), jnp.int32),
  ...          "lengths": jnp.array([5, 3])}
  >>> state, metrics = step(state, batch)
  >>> int(state.step), sorted(metrics)
  (1, ['grad_norm', 'loss'])
"""

from rnnjax.train.checkpoint import CorruptCheckpointError, checkpoint_steps, restore_checkpoint, save_checkpoint
from rnnjax.train.fit import fit
from rnnjax.train.losses import (
    last_step,
    last_step_cross_entropy,
    mean_squared_error,
    sequence_mask,
    softmax_cross_entropy,
)
from rnnjax.train.state import TrainState
from rnnjax.train.step import make_train_step
from rnnjax.train.tbptt import make_tbptt_step

__all__ = [
    "CorruptCheckpointError",
    "TrainState",
    "checkpoint_steps",
    "fit",
    "last_step",
    "last_step_cross_entropy",
    "make_tbptt_step",
    "make_train_step",
    "mean_squared_error",
    "restore_checkpoint",
    "save_checkpoint",
    "sequence_mask",
    "softmax_cross_entropy",
]
