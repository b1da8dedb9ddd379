"""Losses over ``(*batch, T, ...)`` sequences that respect ``lengths``.

``lengths`` are ``(*batch,)`` ints in ``[0, T]``, as in :func:`rnnjax.scan`: only steps
``t < length`` count, and a mean is over those real steps (0 when there are none). What
lies past a length (logits, predictions, labels, targets) never enters the arithmetic, so
the loss and its gradients are the same whatever the padding holds, NaN and Inf included.
Losses are computed in float32 at least (bfloat16 logits give a float32 loss).

Integer labels at real steps must be class indices in ``[0, C)``. Given concretely (outside
``jit``), one that is not raises a ``ValueError``. Traced (inside ``jit``, as in a train
step) it cannot raise: its step's term is NaN, so the loss (and the ``"loss"`` a train
step reports) is NaN, never the loss of a wrong class; that term gives no gradient, so the
gradients stay finite.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnnjax import sequence
from rnnjax.checks import check_nonnegative_int
from rnnjax.train.checks import as_array

__all__ = ["last_step", "last_step_cross_entropy", "mean_squared_error", "sequence_mask", "softmax_cross_entropy"]


def sequence_mask(lengths: jax.Array, steps: int) -> jax.Array:
    """``(*batch,)`` integer lengths -> ``(*batch, steps)`` bools, True at steps ``t < length``.

    Example:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> rj.train.sequence_mask(jnp.array([3, 1]), 4).astype(int)
      Array([[1, 1, 1, 0],
             [1, 0, 0, 0]], dtype=int32)
    """
    check_nonnegative_int(steps, "steps")
    lengths = as_array(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"lengths has dtype {lengths.dtype}; expected an integer dtype")
    return sequence.sequence_mask(lengths, steps)


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
      A scalar (float32 at least); 0 when no step is real. NaN, under ``jit``, when an
      integer label at a real step is not in ``[0, C)``.

    Raises:
      ValueError: bad shapes; outside ``jit``, an integer label at a real step not in
        ``[0, C)``.

    Example:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> logits = jnp.zeros((2, 3, 4))  # uniform over 4 classes: log(4) per step
      >>> labels = jnp.array([[1, 2, -1], [0, -1, -1]])
      >>> float(rj.train.softmax_cross_entropy(logits, labels, jnp.array([2, 1])))  # doctest: +ELLIPSIS
      1.386...
    """
    logits = _check_float(logits, "logits", 2, "(*batch, T, C)")
    batch_shape, steps = logits.shape[:-2], logits.shape[-2]
    lengths = _check_lengths(lengths, batch_shape, steps, f"logits of shape {tuple(logits.shape)}")
    logits = logits.astype(_loss_dtype(logits))
    valid = None if lengths is None else sequence.sequence_mask(lengths, steps)
    per_step = _cross_entropy(logits, as_array(labels), valid, logits.shape, "(*batch, T)")
    return _masked_mean(per_step, lengths)


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
    ys = as_array(ys)
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
        step and are left out of the mean (their labels may hold anything).

    Returns:
      The mean over the batch, a scalar (0 when every length is 0). NaN, under ``jit``,
      when an integer label of a sequence with a last step is not in ``[0, C)``.

    Raises:
      ValueError: bad shapes; outside ``jit``, an integer label not in ``[0, C)``.

    Example:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> logits = jnp.zeros((2, 4, 3)).at[0, 1, 2].set(10.0)
      >>> loss = rj.train.last_step_cross_entropy(logits, jnp.array([2, 0]), jnp.array([2, 4]))
      >>> round(float(loss), 4)  # (~0 + log 3) / 2
      0.5494
    """
    logits = _check_float(logits, "logits", 2, "(*batch, T, C)")
    batch_shape, steps = logits.shape[:-2], logits.shape[-2]
    if steps == 0:
        raise ValueError(f"logits has shape {tuple(logits.shape)}; expected (*batch, T, C) with T >= 1")
    lengths = _check_lengths(lengths, batch_shape, steps, f"logits of shape {tuple(logits.shape)}")
    last = last_step(logits, lengths).astype(_loss_dtype(logits))
    valid = None if lengths is None else lengths > 0
    per_seq = _cross_entropy(last, as_array(labels), valid, logits.shape, "(*batch,)")
    if valid is None:
        return jnp.mean(per_seq)
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
    targets = as_array(targets)
    if not jnp.issubdtype(targets.dtype, jnp.floating):
        raise TypeError(f"targets has dtype {targets.dtype}; expected a floating dtype like preds ({preds.dtype})")
    if tuple(targets.shape) != tuple(preds.shape):
        raise ValueError(f"targets has shape {tuple(targets.shape)}; expected {tuple(preds.shape)}, the shape of preds")
    lengths = _check_lengths(lengths, preds.shape[:-2], preds.shape[-2], f"preds of shape {tuple(preds.shape)}")
    dtype = jnp.promote_types(_loss_dtype(preds), targets.dtype)
    preds, targets = preds.astype(dtype), jnp.asarray(targets).astype(dtype)
    if lengths is not None:
        valid = sequence.sequence_mask(lengths, preds.shape[-2])[..., None]
        preds, targets = _real(preds, valid), _real(targets, valid)
    per_step = jnp.mean(jnp.square(preds - targets), axis=-1)
    return _masked_mean(per_step, lengths)


# ---- checks and reductions shared by the losses ------------------------------------------


def _check_float(x: Any, name: str, min_ndim: int, layout: str) -> jax.Array:
    x = as_array(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} has dtype {x.dtype}; expected a floating dtype (float32, bfloat16, ...)")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {layout}")
    return jnp.asarray(x)


def _check_lengths(lengths: Any, batch_shape: tuple[int, ...], steps: int, of: str) -> jax.Array | None:
    """``lengths`` checked as :func:`rnnjax.scan` checks them, against the batch shape of ``of``."""
    return None if lengths is None else sequence.check_lengths(lengths, batch_shape, steps, of)


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


def _real(values: jax.Array, valid: jax.Array) -> jax.Array:
    """``values`` where ``valid``, zeros elsewhere. Padding is replaced before any arithmetic:
    multiplying by a mask would leave ``0 * NaN = NaN`` in the backward pass."""
    return jnp.where(valid, values, jnp.zeros((), values.dtype))


def _masked_mean(values: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """Mean of ``values`` (``(*batch, T)``) over the steps ``t < lengths``; 0 when there are none."""
    if lengths is None:
        return jnp.mean(values)
    mask = sequence.sequence_mask(lengths, values.shape[-1])
    total = jnp.sum(jnp.where(mask, values, jnp.zeros((), values.dtype)))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(values.dtype)


def _loss_dtype(x: jax.Array) -> Any:
    return jnp.promote_types(x.dtype, jnp.float32)  # bfloat16 logits: the loss in float32


def _cross_entropy(
    logits: jax.Array, labels: Any, valid: jax.Array | None, shape: tuple[int, ...], layout: str
) -> jax.Array:
    """Softmax cross-entropy of ``logits`` ``(*lead, C)`` against ``(*lead,)`` integer class
    indices or ``(*lead, C)`` float probabilities. Where ``valid`` (``(*lead,)`` bools) is
    false, logits and labels may hold anything (the result there is finite and unused).
    An integer label not in ``[0, C)`` where ``valid`` raises when concrete and gives NaN
    when traced. ``shape``, ``layout``: the user's logits' shape and the labels' layout
    without ``C`` (``"(*batch, T)"``), for errors."""
    lead, classes = tuple(logits.shape[:-1]), logits.shape[-1]
    if jnp.issubdtype(labels.dtype, jnp.integer) and labels.dtype != jnp.bool_:
        if tuple(labels.shape) != lead:
            raise ValueError(_label_shape_message(labels, lead, classes, shape, layout))
        _check_class_labels(labels, classes, valid)
        labels = jnp.asarray(labels)
        in_range = (labels >= 0) & (labels < classes)
        bad = ~in_range if valid is None else valid & ~in_range
        if valid is not None:
            logits = _real(logits, valid[..., None])
        # An index out of range would be gathered as the last class (-1) or as NaN (C):
        # compute with class 0 and report the step as NaN instead.
        per_step = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(in_range, labels, 0))
        return jnp.where(bad, jnp.full((), jnp.nan, per_step.dtype), per_step)
    if jnp.issubdtype(labels.dtype, jnp.floating):
        if tuple(labels.shape) != (*lead, classes):
            raise ValueError(_label_shape_message(labels, lead, classes, shape, layout))
        labels = jnp.asarray(labels).astype(logits.dtype)
        if valid is not None:
            logits, labels = _real(logits, valid[..., None]), _real(labels, valid[..., None])
        return optax.softmax_cross_entropy(logits, labels)
    raise TypeError(
        f"labels has dtype {labels.dtype}; expected integer class indices or floating probabilities (one-hot)"
    )


def _label_shape_message(labels: Any, lead: tuple[int, ...], classes: int, shape: tuple[int, ...], layout: str) -> str:
    """What is wrong with the labels' shape, for their dtype's kind of labels."""
    indices = f"class indices of shape {layout} = {lead}"
    probs = f"class probabilities of shape {layout[:-1].rstrip(',')}, C) = {(*lead, classes)}"
    start = f"labels has dtype {labels.dtype} and shape {tuple(labels.shape)}; "
    of = f" for logits of shape {tuple(shape)}"
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return f"{start}integer labels are {indices}{of} (float labels are {probs})"
    if tuple(labels.shape) == lead:
        return f"{start}float labels are {probs}{of}; for {indices}, cast them: labels.astype(jnp.int32)"
    return f"{start}float labels are {probs}{of} (integer labels are {indices})"
