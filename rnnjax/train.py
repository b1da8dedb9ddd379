"""Training with Optax: masked sequence losses, train steps, truncated BPTT, ``fit``.

- Losses over ``(*batch, T, ...)`` sequences that respect ``lengths`` (``(*batch,)``
  ints, as in :func:`rnnjax.scan`): only steps ``t < length`` count, and the mean is
  over those real steps.
- :class:`TrainState` holds ``(step, params, opt_state)``. :func:`make_train_step`
  and :func:`make_tbptt_step` build jitted steps from a loss function and any
  ``optax.GradientTransformation``; the state is donated, so the state passed in is
  deleted and the returned one replaces it.
- :func:`fit` runs a step over batches with a progress line and an evaluation hook.
- :func:`save_checkpoint` / :func:`restore_checkpoint` (from :mod:`rnnjax.checkpoint`)
  store states with orbax.

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

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from rnnjax import distributed
from rnnjax.checkpoint import checkpoint_steps, restore_checkpoint, save_checkpoint
from rnnjax.scan import _check_lengths as _check_scan_lengths

PyTree = Any

__all__ = [
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


# ---- input checks ---------------------------------------------------------------------


def _as_array(x: Any) -> Any:
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


def _check_float(x: Any, name: str, min_ndim: int, layout: str) -> jax.Array:
    x = _as_array(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} has dtype {x.dtype}; expected a floating dtype (float32, bfloat16, ...)")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {layout}")
    return jnp.asarray(x)


def _check_lengths(lengths: Any, batch_shape: tuple[int, ...], steps: int, of: str) -> jax.Array | None:
    """``lengths`` checked as :func:`rnnjax.scan` checks them, against the batch shape of ``of``."""
    return None if lengths is None else _check_scan_lengths(lengths, batch_shape, steps, of)


def _check_class_labels(labels: jax.Array, num_classes: int, valid: jax.Array | None) -> None:
    """Concrete integer labels at real steps must be class indices in [0, C)."""
    if isinstance(labels, jax.core.Tracer) or (valid is not None and isinstance(valid, jax.core.Tracer)):
        return
    values = np.asarray(labels)
    if valid is not None:
        values = values[np.asarray(valid)]
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise ValueError(
            f"labels has the value {bad.ravel()[0]} at a real step; expected class indices in "
            f"[0, C={num_classes}) (steps past a length may hold anything)"
        )


def _masked_mean(values: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """Mean of ``values`` (``(*batch, T)``) over the steps ``t < lengths``; 0 when there are none."""
    if lengths is None:
        return jnp.mean(values)
    mask = sequence_mask(lengths, values.shape[-1])
    total = jnp.sum(jnp.where(mask, values, jnp.zeros((), values.dtype)))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(values.dtype)


def _loss_dtype(x: jax.Array) -> Any:
    return jnp.promote_types(x.dtype, jnp.float32)  # bfloat16 logits: the loss in float32


# ---- losses ---------------------------------------------------------------------------


def sequence_mask(lengths: jax.Array, steps: int) -> jax.Array:
    """``(*batch,)`` integer lengths -> ``(*batch, steps)`` bools, True at steps ``t < length``.

    Example:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> rj.train.sequence_mask(jnp.array([3, 1]), 4).astype(int)
      Array([[1, 1, 1, 0],
             [1, 0, 0, 0]], dtype=int32)
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    lengths = _as_array(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"lengths has dtype {lengths.dtype}; expected an integer dtype")
    return jnp.arange(steps) < jnp.asarray(lengths)[..., None]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    r"""Per-step softmax cross-entropy, averaged over the real steps of every sequence.

    .. math::

        \frac{1}{\sum_b L_b} \sum_b \sum_{t < L_b} -\log \mathrm{softmax}(z_{b,t})_{y_{b,t}}

    Args:
      logits: ``(*batch, T, C)`` floats.
      labels: ``(*batch, T)`` integer class indices, or ``(*batch, T, C)`` floats (one-hot
        or probabilities). Labels at steps past a length are ignored (padding such as -1
        is fine).
      lengths: ``(*batch,)`` integers in ``[0, T]``; ``None`` means every step is real.

    Returns:
      A scalar (float32 at least); 0 when no step is real.

    Example:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> logits = jnp.zeros((2, 3, 4))  # uniform over 4 classes: log(4) per step
      >>> labels = jnp.array([[1, 2, -1], [0, -1, -1]])
      >>> float(rj.train.softmax_cross_entropy(logits, labels, jnp.array([2, 1])))  # doctest: +ELLIPSIS
      1.386...
    """
    logits = _check_float(logits, "logits", 2, "(*batch, T, C)")
    batch_shape, steps, classes = logits.shape[:-2], logits.shape[-2], logits.shape[-1]
    lengths = _check_lengths(lengths, batch_shape, steps, f"logits of shape {tuple(logits.shape)}")
    labels = _as_array(labels)
    logits = logits.astype(_loss_dtype(logits))
    if jnp.issubdtype(labels.dtype, jnp.integer) and labels.dtype != jnp.bool_:
        if tuple(labels.shape) != tuple(logits.shape[:-1]):
            raise ValueError(_label_shape_message(labels, logits, "T"))
        valid = None if lengths is None else sequence_mask(lengths, steps)
        _check_class_labels(labels, classes, valid)
        labels = jnp.asarray(labels)
        if valid is not None:
            labels = jnp.where(valid, labels, 0)
        per_step = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        if tuple(labels.shape) != tuple(logits.shape):
            raise ValueError(_label_shape_message(labels, logits, "T"))
        per_step = optax.softmax_cross_entropy(logits, jnp.asarray(labels).astype(logits.dtype))
    else:
        raise TypeError(
            f"labels has dtype {labels.dtype}; expected integer class indices or floating "
            f"probabilities (one-hot)"
        )
    return _masked_mean(per_step, lengths)


def _label_shape_message(labels: Any, logits: jax.Array, per: str) -> str:
    lead = tuple(logits.shape[:-1]) if per == "T" else tuple(logits.shape[:-2])
    return (
        f"labels has shape {tuple(labels.shape)}; expected {lead} (integer class indices) or "
        f"{(*lead, logits.shape[-1])} (class probabilities) for logits of shape {tuple(logits.shape)}"
    )


def last_step(ys: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """The output at each sequence's last real step: ``(*batch, T, F) -> (*batch, F)``.

    Step ``lengths - 1`` of each sequence (step ``T - 1`` when ``lengths`` is ``None``);
    zeros for a sequence of length 0.

    Example:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> ys = jnp.arange(12.0).reshape(2, 3, 2)
      >>> rj.train.last_step(ys, jnp.array([2, 3]))
      Array([[ 2.,  3.],
             [10., 11.]], dtype=float32)
    """
    ys = _as_array(ys)
    if ys.ndim < 2 or ys.shape[-2] == 0:
        raise ValueError(f"ys has shape {tuple(ys.shape)}; expected (*batch, T, F) with T >= 1")
    ys = jnp.asarray(ys)
    steps = ys.shape[-2]
    lengths = _check_lengths(lengths, ys.shape[:-2], steps, f"ys of shape {tuple(ys.shape)}")
    if lengths is None:
        return ys[..., -1, :]
    index = jnp.clip(lengths - 1, 0, steps - 1)[..., None, None]
    out = jnp.take_along_axis(ys, index, axis=-2)[..., 0, :]
    return jnp.where((lengths > 0)[..., None], out, jnp.zeros((), ys.dtype))


def last_step_cross_entropy(logits: jax.Array, labels: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """Softmax cross-entropy of the logits at each sequence's last real step (classification).

    Args:
      logits: ``(*batch, T, C)`` floats; the logits at step ``lengths - 1`` are used
        (step ``T - 1`` when ``lengths`` is ``None``).
      labels: ``(*batch,)`` integer class indices, or ``(*batch, C)`` floats (one-hot or
        probabilities).
      lengths: ``(*batch,)`` integers in ``[0, T]``. Sequences of length 0 have no last
        step and are left out of the mean.

    Returns:
      The mean over the batch, a scalar (0 when every length is 0).

    Example:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> logits = jnp.zeros((2, 4, 3)).at[0, 1, 2].set(10.0)
      >>> loss = rj.train.last_step_cross_entropy(logits, jnp.array([2, 0]), jnp.array([2, 4]))
      >>> round(float(loss), 4)  # (~0 + log 3) / 2
      0.5494
    """
    logits = _check_float(logits, "logits", 2, "(*batch, T, C)")
    batch_shape, steps, classes = logits.shape[:-2], logits.shape[-2], logits.shape[-1]
    if steps == 0:
        raise ValueError(f"logits has shape {tuple(logits.shape)}; expected (*batch, T, C) with T >= 1")
    lengths = _check_lengths(lengths, batch_shape, steps, f"logits of shape {tuple(logits.shape)}")
    labels = _as_array(labels)
    last = last_step(logits, lengths).astype(_loss_dtype(logits))
    if jnp.issubdtype(labels.dtype, jnp.integer) and labels.dtype != jnp.bool_:
        if tuple(labels.shape) != tuple(batch_shape):
            raise ValueError(_label_shape_message(labels, logits, "sequence"))
        valid = None if lengths is None else lengths > 0
        _check_class_labels(labels, classes, valid)
        labels = jnp.asarray(labels)
        if valid is not None:
            labels = jnp.where(valid, labels, 0)
        per_seq = optax.softmax_cross_entropy_with_integer_labels(last, labels)
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        if tuple(labels.shape) != (*batch_shape, classes):
            raise ValueError(_label_shape_message(labels, logits, "sequence"))
        per_seq = optax.softmax_cross_entropy(last, jnp.asarray(labels).astype(last.dtype))
    else:
        raise TypeError(
            f"labels has dtype {labels.dtype}; expected integer class indices or floating "
            f"probabilities (one-hot)"
        )
    if lengths is None:
        return jnp.mean(per_seq)
    valid = lengths > 0
    total = jnp.sum(jnp.where(valid, per_seq, jnp.zeros((), per_seq.dtype)))
    return total / jnp.maximum(jnp.sum(valid), 1).astype(per_seq.dtype)


def mean_squared_error(preds: jax.Array, targets: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """Squared error averaged over the real steps and the features.

    Args:
      preds, targets: ``(*batch, T, F)`` floats of the same shape.
      lengths: ``(*batch,)`` integers in ``[0, T]``; ``None`` means every step is real.

    Returns:
      ``sum over real steps and features of (preds - targets)**2 / (real steps * F)``, a
      scalar; 0 when no step is real.

    Example:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> preds = jnp.ones((1, 3, 2)).at[0, 2].set(100.0)  # step 2 is padding
      >>> float(rj.train.mean_squared_error(preds, jnp.zeros((1, 3, 2)), jnp.array([2])))
      1.0
    """
    preds = _check_float(preds, "preds", 2, "(*batch, T, F)")
    targets = _as_array(targets)
    if not jnp.issubdtype(targets.dtype, jnp.floating):
        raise TypeError(f"targets has dtype {targets.dtype}; expected a floating dtype like preds ({preds.dtype})")
    if tuple(targets.shape) != tuple(preds.shape):
        raise ValueError(
            f"targets has shape {tuple(targets.shape)}; expected {tuple(preds.shape)}, the shape of preds"
        )
    lengths = _check_lengths(lengths, preds.shape[:-2], preds.shape[-2], f"preds of shape {tuple(preds.shape)}")
    dtype = jnp.promote_types(_loss_dtype(preds), targets.dtype)
    per_step = jnp.mean(jnp.square(preds.astype(dtype) - jnp.asarray(targets).astype(dtype)), axis=-1)
    return _masked_mean(per_step, lengths)


# ---- train state and steps ------------------------------------------------------------


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
        _check_optimizer(optimizer)
        copy = lambda x: jnp.array(x, copy=True)
        params = jax.tree.map(copy, params)
        return cls(jnp.zeros((), jnp.int32), params, jax.tree.map(copy, optimizer.init(params)))


def _check_optimizer(optimizer: Any) -> None:
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"optimizer must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), got {optimizer!r}")


def _check_clip_norm(clip_norm: Any) -> None:
    if clip_norm is None:
        return
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float, np.number)) or not clip_norm > 0:
        raise ValueError(f"clip_norm must be a positive number or None, got {clip_norm!r}")


def _check_state(state: Any, optimizer: optax.GradientTransformation) -> None:
    if not isinstance(state, TrainState):
        raise TypeError(
            f"state is a {type(state).__name__}; expected rj.train.TrainState "
            f"(rj.train.TrainState.create(params, optimizer))"
        )
    expected = jax.tree.structure(jax.eval_shape(optimizer.init, state.params))
    got = jax.tree.structure(state.opt_state)
    if expected != got:
        raise ValueError(
            f"state.opt_state has structure {got}; expected {expected} from optimizer.init(params) "
            f"(build the state with TrainState.create(params, optimizer) with the step's optimizer)"
        )


def _check_loss(loss: Any) -> None:
    shape = tuple(jnp.shape(loss))
    if shape != ():
        raise ValueError(f"loss_fn returned a loss of shape {shape}; expected a scalar (average over the batch)")
    dtype = jnp.result_type(loss)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"loss_fn returned a loss of dtype {dtype}; expected a floating scalar")


def _check_aux(aux: Any) -> dict:
    if not isinstance(aux, Mapping):
        raise TypeError(f"with has_aux=True, loss_fn's aux must be a dict of metrics, got {type(aux).__name__}")
    clash = sorted({"loss", "grad_norm"} & set(aux))
    if clash:
        raise ValueError(f"loss_fn's aux has the key {clash[0]!r}, which the step's metrics use; rename it")
    return dict(aux)


# optax >= 0.2.5 has optax.tree.norm; optax.global_norm (deprecated there) before.
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def _apply_gradients(state: TrainState, grads: PyTree, optimizer, clip_norm) -> tuple[TrainState, jax.Array]:
    """One optimizer update; returns the new state and the gradients' global norm before clipping."""
    grad_norm = _global_norm(grads)
    if clip_norm is not None:
        grads, _ = optax.clip_by_global_norm(clip_norm).update(grads, optax.EmptyState())
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), grad_norm


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    clip_norm: float | None = None,
    has_aux: bool = False,
    donate: bool = True,
    mesh: Mesh | None = None,
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
        use the returned one).
      mesh: a ``jax.sharding.Mesh``: data parallelism over its ``data_axis``. Every array
        of the batch with an axis is split along its leading (batch) axis; the state is
        replicated, or with ``model_axis`` the last axis of its matrices (hidden units)
        is split over that second axis. The loss is the global batch's, so the step
        equals the single-device step up to float rounding; the recurrence runs per
        shard (:func:`rnnjax.distributed.data_parallel`) and XLA reduces the gradients.
        A batch whose leading axis does not divide over ``data_axis``, or an axis the
        mesh lacks, is an error before anything compiles.
      data_axis, model_axis: mesh axis names (``model_axis`` optional).

    Returns:
      ``step(state, batch) -> (new_state, metrics)`` with ``metrics = {"loss", "grad_norm",
      **aux}`` as device scalars; ``grad_norm`` is the global norm before clipping.
      Compiled once per batch shape.

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
    _check_optimizer(optimizer)
    _check_clip_norm(clip_norm)

    def objective(params, batch):
        out = loss_fn(params, batch)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("with has_aux=True, loss_fn must return (loss, aux_dict)")
            loss, aux = out
            aux = _check_aux(aux)
        else:
            if isinstance(out, tuple):
                raise TypeError(
                    f"loss_fn returned a tuple of {len(out)}; expected a scalar loss "
                    f"(pass has_aux=True if it returns (loss, aux_dict))"
                )
            loss, aux = out, {}
        _check_loss(loss)
        return loss, aux

    value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def train_step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict]:
        _check_state(state, optimizer)
        (loss, aux), grads = value_and_grad(state.params, batch)
        new_state, grad_norm = _apply_gradients(state, grads, optimizer, clip_norm)
        return new_state, {"loss": loss, "grad_norm": grad_norm, **aux}

    if mesh is not None:
        return _mesh_jit(train_step, mesh, data_axis, model_axis, donate, ("batch",))
    return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def _mesh_jit(step: Callable, mesh: Mesh, data_axis: str, model_axis: str | None, donate: bool,
              names: tuple[str, ...]) -> Callable:
    """``step(state, *batch_like)`` jitted over ``mesh``: every ``batch_like`` argument split
    along its leading axis over ``data_axis``, the state replicated (or split over
    ``model_axis``), the recurrence run per shard. Shapes are checked before compiling."""
    distributed.check_mesh_axis(mesh, data_axis, "data_axis")
    if model_axis is not None:
        distributed.check_mesh_axis(mesh, model_axis, "model_axis")
        if model_axis == data_axis:
            raise ValueError(f"model_axis and data_axis must be different mesh axes, both are {data_axis!r}")
    mesh = distributed._auto(mesh)

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

    step_over_mesh.lower = lambda state, *rest: jitted.lower(state, *rest)
    return step_over_mesh


# ---- truncated backpropagation through time -------------------------------------------


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _path_str(path: tuple) -> str:
    return "batch" + "".join(
        f"[{k.key!r}]" if isinstance(k, jax.tree_util.DictKey)
        else f".{k.name}" if isinstance(k, jax.tree_util.GetAttrKey)
        else f"[{k.idx}]" if isinstance(k, jax.tree_util.SequenceKey)
        else str(k)
        for k in path
    )


def make_tbptt_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    chunk_size: int,
    *,
    clip_norm: float | None = None,
    has_aux: bool = False,
    pad: bool = False,
    time_axis: int = 1,
    lengths_key: str = "lengths",
    donate: bool = True,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    model_axis: str | None = None,
) -> Callable[[TrainState, PyTree, PyTree], tuple[TrainState, PyTree, dict]]:
    """A jitted truncated-BPTT step: one optimizer update per chunk of ``chunk_size`` steps.

    The batch's sequences are cut along ``time_axis`` into ``n = ceil(T / K)`` chunks of
    ``K = chunk_size`` steps, run in order under ``jax.lax.scan`` (the program does not
    grow with ``T``). For chunk ``k``, gradients of ``loss_fn(params, carry, chunk_k)``
    are taken with the carry held constant (``jax.lax.stop_gradient``: gradients stop at
    chunk boundaries), the params are updated, and the returned carry is handed to chunk
    ``k + 1``. With ``K >= T`` there is one chunk and the step equals
    :func:`make_train_step` on the whole sequence.

    How the batch (any pytree) is cut:

    - every array is cut along ``time_axis`` (all must have the same length ``T`` there);
    - ``batch[lengths_key]`` (when the batch is a dict holding it), ``(*batch,)`` ints,
      becomes each chunk's lengths ``clip(lengths - k * K, 0, K)``; a chunk with no real
      step in the whole batch makes no update (and does not count in ``state.step``);
    - typed PRNG keys (``jax.random.key``) are not cut: chunk 0 gets the key,
      chunk ``k > 0`` gets ``jax.random.fold_in(key, k)``.

    Args:
      loss_fn: ``loss_fn(params, carry, chunk) -> (loss, new_carry)``; with ``has_aux``
        ``-> (loss, new_carry, aux_dict)``. ``new_carry`` has the structure, shapes and
        dtypes of ``carry``.
      optimizer: any ``optax.GradientTransformation``.
      chunk_size: ``K``, a positive int. If ``K < T`` it must divide ``T`` unless ``pad``.
      clip_norm: clip each chunk's gradients to this global norm (as in
        :func:`make_train_step`).
      has_aux: see ``loss_fn``.
      pad: pad ``T`` up to a multiple of ``K`` with zeros at masked steps. The padded
        steps are masked through ``batch[lengths_key]``, which is added (all ``T``) when
        the batch is a dict without it; ``loss_fn`` must respect it.
      time_axis: the time axis of every array in the batch, counted from the front
        (1 for ``(B, T, ...)``; 0 for a single ``(T, ...)`` sequence).
      lengths_key: the name of the lengths entry of a dict batch.
      donate: donate the state's buffers (not the carry's).
      mesh, data_axis, model_axis: data parallelism, as in :func:`make_train_step`; the
        carry is split along its leading (batch) axis like the batch.

    Returns:
      ``step(state, carry, batch) -> (new_state, new_carry, metrics)``. ``state.step``
      grows by the number of updates. ``metrics["loss"]`` is the chunks' losses averaged
      with weights = their real steps (each chunk's step count without lengths), which
      is the whole sequence's masked mean when the loss is one; aux metrics are averaged
      the same way; ``metrics["grad_norm"]`` is the mean over the chunks that updated.

    Example:
      >>> import jax, jax.numpy as jnp, optax, rnnjax as rj
      >>> cell = rj.GRU(4)
      >>> def loss_fn(p, carry, chunk):
      ...     ys, carry = rj.scan(cell, p, chunk["x"], carry, lengths=chunk["lengths"])
      ...     return rj.train.mean_squared_error(ys, chunk["y"], chunk["lengths"]), carry
      >>> step = rj.train.make_tbptt_step(loss_fn, optax.adam(1e-2), chunk_size=4, pad=True)
      >>> state = rj.train.TrainState.create(cell.init(jax.random.key(0), 2), optax.adam(1e-2))
      >>> batch = {"x": jnp.ones((3, 10, 2)), "y": jnp.zeros((3, 10, 4))}  # T=10: 3 chunks
      >>> state, carry, metrics = step(state, cell.init_carry((3,)), batch)
      >>> int(state.step), carry.shape
      (3, (3, 4))
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(params, carry, chunk), got {loss_fn!r}")
    _check_optimizer(optimizer)
    _check_clip_norm(clip_norm)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (steps per chunk), got {chunk_size!r}")
    if isinstance(time_axis, bool) or not isinstance(time_axis, (int, np.integer)) or time_axis < 0:
        raise ValueError(
            f"time_axis must be a non-negative int (the time axis of every array in the batch, "
            f"counted from the front), got {time_axis!r}"
        )
    chunk_size, time_axis = int(chunk_size), int(time_axis)

    def objective(params, carry, chunk):
        out = loss_fn(params, carry, chunk)
        n_out = 3 if has_aux else 2
        if not (isinstance(out, tuple) and len(out) == n_out):
            expected = "(loss, new_carry, aux_dict)" if has_aux else "(loss, new_carry)"
            hint = "" if has_aux else " (pass has_aux=True for (loss, new_carry, aux_dict))"
            raise TypeError(f"loss_fn must return {expected}{hint}")
        loss, new_carry = out[0], out[1]
        aux = _check_aux(out[2]) if has_aux else {}
        _check_loss(loss)
        _check_carry(carry, new_carry)
        return loss, (new_carry, aux)

    value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def chunk_update(state, carry, chunk, real_steps):
        """One chunk: update unless ``real_steps`` (None: unknown) is 0."""
        carry = jax.lax.stop_gradient(carry)
        (loss, (new_carry, aux)), grads = value_and_grad(state.params, carry, chunk)
        new_state, grad_norm = _apply_gradients(state, grads, optimizer, clip_norm)
        if real_steps is not None:
            keep = real_steps > 0
            new_state = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_state, state)
        return new_state, new_carry, loss, grad_norm, aux

    def tbptt_step(state, carry, batch):
        _check_state(state, optimizer)
        _check_carry_leaves(carry)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
        lengths_path = None
        if isinstance(batch, Mapping) and lengths_key in batch:
            lengths_path = (jax.tree_util.DictKey(lengths_key),)
        cut = [
            (path, leaf) for path, leaf in leaves
            if not _is_key(leaf) and tuple(path) != lengths_path
        ]
        if not cut:
            raise ValueError("the batch has no array to cut along the time axis")
        first_path, first = cut[0]
        for path, leaf in cut:
            shape = tuple(jnp.shape(leaf))
            if len(shape) <= time_axis:
                raise ValueError(
                    f"{_path_str(path)} has shape {shape}; expected a time axis at time_axis={time_axis} "
                    f"(every array of the batch is cut along it, except batch[{lengths_key!r}] of a dict "
                    f"batch and typed PRNG keys from jax.random.key)"
                )
            if shape[time_axis] != jnp.shape(first)[time_axis]:
                raise ValueError(
                    f"{_path_str(path)} has shape {shape}; expected T={jnp.shape(first)[time_axis]} "
                    f"along time_axis={time_axis}, as {_path_str(first_path)} {tuple(jnp.shape(first))}"
                )
        if lengths_path is not None:
            lengths = _as_array(batch[lengths_key])
            if not jnp.issubdtype(lengths.dtype, jnp.integer):
                raise TypeError(f"{_path_str(lengths_path)} has dtype {lengths.dtype}; expected an integer dtype")
        steps = jnp.shape(first)[time_axis]
        batch_shape = tuple(jnp.shape(first)[:time_axis])
        if chunk_size >= steps:
            n_chunks, size = 1, steps
        else:
            if steps % chunk_size and not pad:
                padded = -(-steps // chunk_size) * chunk_size
                raise ValueError(
                    f"the sequence length T={steps} is not a multiple of chunk_size={chunk_size}; "
                    f"pass pad=True to pad it to {padded} with masked steps, or choose a chunk_size "
                    f"that divides {steps}"
                )
            n_chunks, size = -(-steps // chunk_size), chunk_size
        total = n_chunks * size

        lengths = None
        if lengths_path is not None:
            lengths = jnp.asarray(batch[lengths_key])
        elif total > steps:
            if not isinstance(batch, Mapping):
                raise ValueError(
                    f"pad=True pads T={steps} to {total} steps, which must be masked: pass the batch as a "
                    f"dict (a {lengths_key!r} entry is added for the loss to use)"
                )
            lengths = jnp.full(batch_shape, steps, jnp.int32)
            batch = {**batch, lengths_key: lengths}
            leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
            lengths_path = (jax.tree_util.DictKey(lengths_key),)

        if n_chunks == 1:  # the whole sequence: exactly make_train_step's computation
            real = None if lengths is None else jnp.sum(lengths)
            state, carry, loss, grad_norm, aux = chunk_update(state, carry, batch, real)
            return state, carry, {"loss": loss, "grad_norm": grad_norm, **aux}

        def cut_leaf(path, leaf):
            if tuple(path) == lengths_path:
                starts = jnp.arange(n_chunks).reshape((n_chunks,) + (1,) * leaf.ndim) * size
                return jnp.clip(leaf[None] - starts, 0, size).astype(leaf.dtype)
            if _is_key(leaf):
                return leaf  # folded with the chunk index inside the loop
            leaf = jnp.asarray(leaf)
            if total > steps:
                widths = [(0, 0)] * leaf.ndim
                widths[time_axis] = (0, total - steps)
                leaf = jnp.pad(leaf, widths)
            shape = leaf.shape[:time_axis] + (n_chunks, size) + leaf.shape[time_axis + 1 :]
            return jnp.moveaxis(leaf.reshape(shape), time_axis, 0)

        is_cut = [not _is_key(leaf) for _, leaf in leaves]
        chunked = [cut_leaf(path, leaf) for path, leaf in leaves]
        keys = [leaf for cut_it, leaf in zip(is_cut, chunked) if not cut_it]
        sliced = [leaf for cut_it, leaf in zip(is_cut, chunked) if cut_it]

        def body(loop_carry, inputs):
            state, carry = loop_carry
            k, xs = inputs
            xs = iter(xs)
            ks = iter(keys)
            chunk_leaves = []
            for cut_it in is_cut:
                if cut_it:
                    chunk_leaves.append(next(xs))
                else:
                    key = next(ks)
                    data = jnp.where(k == 0, jax.random.key_data(key), jax.random.key_data(jax.random.fold_in(key, k)))
                    chunk_leaves.append(jax.random.wrap_key_data(data, impl=jax.random.key_impl(key)))
            chunk = jax.tree_util.tree_unflatten(treedef, chunk_leaves)
            if lengths is not None:
                real = jnp.sum(chunk[lengths_key])
                weight = real.astype(jnp.float32)
            else:
                real, weight = None, jnp.ones((), jnp.float32)
            state, carry, loss, grad_norm, aux = chunk_update(state, carry, chunk, real)
            return (state, carry), (loss, grad_norm, aux, weight)

        (state, carry), (losses, norms, auxes, weights) = jax.lax.scan(
            body, (state, carry), (jnp.arange(n_chunks), sliced)
        )
        denom = jnp.maximum(jnp.sum(weights), 1.0)

        def mean(values):  # over chunks, weighted by their real steps
            w = weights.astype(values.dtype).reshape((-1,) + (1,) * (values.ndim - 1))
            return jnp.sum(values * w, axis=0) / denom.astype(values.dtype)

        updated = (weights > 0).astype(norms.dtype)
        metrics = {
            "loss": mean(losses),
            "grad_norm": jnp.sum(norms * updated) / jnp.maximum(jnp.sum(updated), 1),
            **{name: mean(value) for name, value in auxes.items()},
        }
        return state, carry, metrics

    if mesh is not None:
        return _mesh_jit(tbptt_step, mesh, data_axis, model_axis, donate, ("carry", "batch"))
    return jax.jit(tbptt_step, donate_argnums=(0,) if donate else ())


def _check_carry_leaves(carry: PyTree) -> None:
    leaves = jax.tree.leaves(carry)
    if not leaves:
        raise ValueError(
            "carry is empty; expected the model's initial carry, e.g. layer.init_carry((batch_size,))"
        )


def _check_carry(carry: PyTree, new_carry: PyTree) -> None:
    got, expected = jax.tree.structure(new_carry), jax.tree.structure(carry)
    if got != expected:
        raise ValueError(f"loss_fn returned a carry of structure {got}; expected {expected}, the carry it was given")
    for new, old in zip(jax.tree.leaves(new_carry), jax.tree.leaves(carry)):
        if jnp.shape(new) != jnp.shape(old) or jnp.result_type(new) != jnp.result_type(old):
            raise ValueError(
                f"loss_fn returned a carry leaf {jnp.result_type(new)}{list(jnp.shape(new))}; expected "
                f"{jnp.result_type(old)}{list(jnp.shape(old))}, as in the carry it was given"
            )


# ---- fit ------------------------------------------------------------------------------


class _Progress:
    """One progress line: rewritten in place on terminals and in notebooks, throttled
    plain lines elsewhere (log files, CI)."""

    def __init__(self, enabled: bool, file: Any, total: int | None):
        self.enabled = enabled
        self.file = file
        self.total = total
        self.width = 0
        self.last_plain = -math.inf
        isatty = getattr(file, "isatty", None)
        interactive = bool(isatty()) if callable(isatty) else False
        self.interactive = interactive or "ipykernel" in type(file).__module__

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        if self.interactive:
            self.file.write("\r" + text + " " * max(0, self.width - len(text)))
            self.width = len(text)
        elif force or time.perf_counter() - self.last_plain >= 10.0:
            self.file.write(text + "\n")
            self.last_plain = time.perf_counter()
        self.file.flush()

    def line(self, text: str) -> None:
        """A line that stays (evaluation results, the summary)."""
        if not self.enabled:
            return
        if self.interactive and self.width:
            self.file.write("\r" + " " * self.width + "\r")
            self.width = 0
        self.file.write(text + "\n")
        self.file.flush()


def _format_metrics(values: Mapping[str, Any]) -> str:
    """Scalar metrics as ``name value`` pairs, the loss first."""
    names = sorted(values, key=lambda name: (name != "loss", name != "grad_norm", name))
    return "  ".join(f"{name} {float(values[name]):#.4g}" for name in names if np.ndim(values[name]) == 0)


def fit(
    step_fn: Callable[..., Any],
    state: PyTree,
    batches: Iterable[PyTree] | Callable[[int], PyTree],
    *,
    steps: int | None = None,
    eval_fn: Callable[[PyTree], Any] | None = None,
    eval_every: int = 100,
    progress: bool = True,
    log_every: int = 10,
    carry: PyTree | None = None,
    on_log: Callable[[dict], None] | None = None,
    first_step: int | None = None,
    file: Any = None,
) -> tuple[PyTree, dict[str, list]]:
    """Run ``step_fn`` over ``batches``; return the final state and the history.

    Args:
      step_fn: ``step(state, batch) -> (state, metrics)`` as from :func:`make_train_step`;
        with ``carry``, ``step(state, carry, batch) -> (state, carry, metrics)`` as from
        :func:`make_tbptt_step`. ``metrics`` is a dict of scalars.
      state: the initial state (donated steps delete it: use the returned one).
      batches: an iterable of batches, or a callable ``i -> batch`` (then ``steps`` is
        required). ``i`` is the global step index, starting at ``first_step``.
      steps: the number of steps; by default until ``batches`` is exhausted.
      eval_fn: ``eval_fn(state) -> float or dict of floats``, called every ``eval_every``
        steps and after the last step.
      eval_every: steps between evaluations.
      progress: show a progress line (steps, loss, steps/s, evaluations) and a final
        summary line on ``file``. ``False`` prints nothing.
      log_every: steps between reading metrics back from the device (and updating the
        progress line); also after the first step and the last.
      carry: the initial carry of a TBPTT step; each batch continues from the carry the
        previous batch returned (consecutive windows of long streams). The final carry
        is ``history["carry"]``.
      on_log: called at every log point with a dict: ``step``, the mean of each metric
        since the previous log point, ``seconds`` since the start and ``steps_per_second``.
      first_step: the index of the first step; ``int(state.step)`` by default (0 when the
        state has no ``step``), so a resumed run continues the numbering.
      file: where the progress goes; ``sys.stderr`` by default.

    Returns:
      ``(state, history)``: ``history["step"]`` and one list per metric with every
      step's value; ``history["eval_step"]`` and ``history["eval_<name>"]`` (``"eval"``
      for a scalar ``eval_fn``). Interrupting (Ctrl-C) stops after the current step and
      returns what was done.

    Example:
      >>> import jax.numpy as jnp, optax, rnnjax as rj
      >>> loss_fn = lambda p, x: jnp.mean((x * p - 1.0) ** 2)
      >>> step = rj.train.make_train_step(loss_fn, optax.sgd(0.1))
      >>> state = rj.train.TrainState.create(jnp.zeros(2), optax.sgd(0.1))
      >>> state, history = rj.train.fit(step, state, [jnp.ones(2)] * 20, progress=False)
      >>> len(history["loss"]), history["loss"][-1] < history["loss"][0]
      (20, True)
    """
    if not callable(step_fn):
        raise TypeError(f"step_fn must be callable, got {step_fn!r}")
    for name, value in (("eval_every", eval_every), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0):
        raise ValueError(f"steps must be a non-negative int or None, got {steps!r}")
    if callable(batches) and not isinstance(batches, Iterable):
        if steps is None:
            raise ValueError("steps is required when batches is a callable i -> batch")
        iterator = None
    else:
        iterator = iter(batches)
    total = steps
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    if first_step is None:
        step_attr = getattr(state, "step", None)
        first_step = int(step_attr) if step_attr is not None else 0

    bar = _Progress(bool(progress), sys.stderr if file is None else file, total)
    history: dict[str, Any] = {"step": []}
    pending: list[tuple[int, Any]] = []
    last_eval: dict[str, float] = {}
    start = time.perf_counter()
    mark = (start, 0)  # time and step count at the previous log point
    done = 0
    first_loss = last_loss = None
    interrupted = False

    def flush() -> dict:
        nonlocal pending, mark, first_loss, last_loss
        if not pending:
            return {}
        values = jax.device_get([m for _, m in pending])
        for (index, _), metrics in zip(pending, values):
            history["step"].append(index)
            for name, value in metrics.items():
                value = float(value) if np.ndim(value) == 0 else np.asarray(value)
                history.setdefault(name, []).append(value)
        means = {
            name: float(np.mean([m[name] for m in values]))
            for name in values[-1] if np.ndim(values[-1][name]) == 0
        }
        if first_loss is None and "loss" in values[0]:
            first_loss = float(values[0]["loss"])
        if "loss" in values[-1]:
            last_loss = float(values[-1]["loss"])
        now = time.perf_counter()
        rate = (done - mark[1]) / max(now - mark[0], 1e-9)
        record = {"step": pending[-1][0], **means, "seconds": now - start, "steps_per_second": rate}
        speed = f"{rate:.1f} steps/s" if mark[1] else "(first step)"
        mark = (now, done)
        pending = []
        count = f"{done}/{total}" if total is not None else f"{done}"
        bar.update(
            f"step {count}  {_format_metrics(means)}  {speed}  {now - start:.0f} s"
            + (f"  | {_format_metrics(last_eval)}" if last_eval else ""),
            force=done == 1,
        )
        if on_log is not None:
            on_log(record)
        return record

    def evaluate(index: int) -> None:
        nonlocal mark
        result = eval_fn(state)
        if not isinstance(result, Mapping):
            result = {"eval": result}
        else:
            result = {f"eval_{name}": value for name, value in result.items()}
        result = jax.device_get(dict(result))
        history.setdefault("eval_step", []).append(index)
        for name, value in result.items():
            value = float(value) if np.ndim(value) == 0 else np.asarray(value)
            history.setdefault(name, []).append(value)
            last_eval[name] = value
        bar.line(f"step {index}: {_format_metrics(last_eval)}")
        mark = (time.perf_counter(), mark[1])  # evaluation time is not training time

    last_eval_done = 0
    try:
        while steps is None or done < steps:
            index = first_step + done
            if iterator is None:
                batch = batches(index)
            else:
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
            if carry is None:
                state, metrics = step_fn(state, batch)
            else:
                state, carry, metrics = step_fn(state, carry, batch)
            if not isinstance(metrics, Mapping):
                raise TypeError(f"step_fn must return a dict of metrics last, got {type(metrics).__name__}")
            done += 1
            pending.append((index + 1, metrics))
            if done == 1 or done % log_every == 0 or done == total:
                flush()
            if eval_fn is not None and done % eval_every == 0:
                flush()
                evaluate(first_step + done)
                last_eval_done = done
    except KeyboardInterrupt:
        interrupted = True
    flush()
    if eval_fn is not None and done > last_eval_done and not interrupted:
        evaluate(first_step + done)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    if carry is not None:
        history["carry"] = carry
    summary = f"fit: {done} steps in {seconds:.1f} s ({done / max(seconds, 1e-9):.1f} steps/s)"
    if first_loss is not None:
        summary += f", loss {first_loss:#.4g} -> {last_loss:#.4g}"
    if last_eval:
        summary += f", {_format_metrics(last_eval)}"
    if interrupted:
        summary += " (interrupted)"
    bar.line(summary)
    return state, history
