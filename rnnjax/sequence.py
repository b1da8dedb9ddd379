r"""The one meaning of ``lengths``, ``resets`` and ``reverse``, and the canonical form every
engine runs on.

A batch of sequences is ``xs`` of shape ``(*batch, T, *features)`` (``features`` is ``(D,)``,
or ``(H, W, C)`` for ConvLSTM). For sequence ``b``:

- ``lengths[b] = L``: steps ``t >= L`` are padding. They leave the carry unchanged and output
  zeros, so the final carry is the carry after step ``L - 1`` (the initial carry for
  ``L = 0``). Values past ``L`` never reach a cell.
- ``resets[b, t]``: a sequence boundary before step ``t``; the carry is replaced by the
  cell's zero carry before step ``t`` runs. Resets at or past a length are ignored.
- ``reverse``: each sequence runs backwards over its own valid part, step ``L - 1`` first.
  Outputs stay aligned with their inputs and padding stays at the end. The boundaries of
  ``resets`` are the same: the backward pass starts afresh after step ``t``.

:func:`canonical` turns the user's arrays into a :class:`TimeMajor` value that engines
consume; :func:`restore` maps an engine's time-major outputs back to the user's layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.cell import Cell, PyTree, carry_batch_shape, check_float_input, compute_dtype  # noqa: F401

Array = jax.Array


# ---- checks -----------------------------------------------------------------------------


def check_xs(cell: Cell, params: Any, xs: Any) -> Array:
    """``xs`` as an array of shape ``(*batch, T, *features)`` matching ``params``; raises a
    ``TypeError``/``ValueError`` naming the expected shape otherwise."""
    if not hasattr(xs, "shape"):
        xs = jnp.asarray(xs)
    check_float_input(xs, "xs")
    if cell.params_type is not None:
        cell.check_params(params)
    k = cell.input_ndim
    expected_in = cell.input_size(params)
    if xs.ndim < k + 1 or xs.shape[-1] != expected_in:
        feat = "H, W, " if k == 3 else ""
        raise ValueError(
            f"xs has shape {tuple(xs.shape)}; expected (..., T, {feat}{expected_in}) for "
            f"input_size={expected_in} of {type(cell).__name__}"
        )
    return xs


def check_lengths(lengths: Any, batch_shape: tuple[int, ...], steps: int, of: str = "xs") -> Array:
    """``lengths`` as an int32 array of shape ``batch_shape`` (the batch shape of ``of``),
    every value in ``[0, steps]`` when concrete.

    int32 whatever the given integer dtype: arithmetic with ``T`` in a narrow or unsigned
    type would wrap (``T = 300`` is 44 in ``uint8``, ``0 - 1`` is 255).
    """
    if not hasattr(lengths, "dtype"):
        lengths = np.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"lengths has dtype {lengths.dtype}; expected an integer dtype")
    if tuple(lengths.shape) != tuple(batch_shape):
        raise ValueError(
            f"lengths has shape {tuple(lengths.shape)}; expected {tuple(batch_shape)}, the batch "
            f"shape of {of} (one length per sequence)"
        )
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        if values.size and (values.min() < 0 or values.max() > steps):
            bad = values[(values < 0) | (values > steps)].ravel()[0]
            raise ValueError(f"lengths has the value {bad}; expected every length in [0, T={steps}]")
    return jnp.asarray(lengths).astype(jnp.int32)


def check_resets(resets: Any, batch_shape: tuple[int, ...], steps: int) -> Array:
    """``resets`` as a bool array of shape ``(*batch_shape, steps)``."""
    if not hasattr(resets, "dtype"):
        resets = np.asarray(resets)
    if resets.dtype != jnp.bool_:
        raise TypeError(f"resets has dtype {resets.dtype}; expected bool")
    if tuple(resets.shape) != (*batch_shape, steps):
        raise ValueError(
            f"resets has shape {tuple(resets.shape)}; expected {(*batch_shape, steps)}, (*batch, T) for xs"
        )
    return jnp.asarray(resets)


def check_reverse(reverse: Any) -> bool:
    if not isinstance(reverse, (bool, np.bool_)):
        raise TypeError(f"reverse must be a bool, got {reverse!r}")
    return bool(reverse)


def validate(cell: Cell, params: Any, xs: Any, carry: PyTree | None, lengths: Any, resets: Any):
    """Every check of a sequence call: ``(xs, carry, lengths, resets)`` checked, arrays."""
    xs = check_xs(cell, params, xs)
    k = cell.input_ndim
    batch_shape = xs.shape[: -(k + 1)]
    steps = xs.shape[-(k + 1)]
    if carry is not None:
        cell.check_carry(carry, jax.ShapeDtypeStruct((*batch_shape, *xs.shape[-k:]), xs.dtype))
    if lengths is not None:
        lengths = check_lengths(lengths, batch_shape, steps)
    if resets is not None:
        resets = check_resets(resets, batch_shape, steps)
    return xs, carry, lengths, resets


# ---- dtypes, masks and time order ------------------------------------------------------------


def expand_to(mask: Array, leaf: Array) -> Array:
    """Broadcast a ``(*batch,)`` mask against a ``(*batch, ...)`` leaf."""
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - mask.ndim))


def sequence_mask(lengths: Array, steps: int) -> Array:
    """``(*batch, T)`` bool: ``True`` at the real steps ``t < lengths``.

    Example:
      >>> import jax.numpy as jnp
      >>> from rnnjax.sequence import sequence_mask
      >>> sequence_mask(jnp.array([3, 1]), 4).astype(int)
      Array([[1, 1, 1, 0],
             [1, 0, 0, 0]], dtype=int32)
    """
    return jnp.arange(steps) < jnp.asarray(lengths)[..., None]


def zero_past(ys: Array, lengths: Array, feature_ndim: int) -> Array:
    """``ys`` (``(*batch, T, *features)``) with the steps at or past ``lengths`` zeroed."""
    valid = sequence_mask(lengths, ys.shape[jnp.ndim(lengths)])
    return jnp.where(valid.reshape(valid.shape + (1,) * feature_ndim), ys, jnp.zeros((), ys.dtype))


def flip_valid(x_tm: Array, lengths: Array) -> Array:
    """Reverse the first ``lengths`` steps of each sequence of a time-major array.

    ``x_tm``: ``(T, *batch, ...)``; ``lengths``: ``(*batch,)``. Step ``t < L`` moves to
    ``L - 1 - t``; padding stays where it is. The map is its own inverse.
    """
    steps = x_tm.shape[0]
    t = jnp.arange(steps).reshape((steps,) + (1,) * lengths.ndim)
    idx = jnp.where(t < lengths, lengths - 1 - t, t)
    idx = idx.reshape(idx.shape + (1,) * (x_tm.ndim - idx.ndim))
    return jnp.take_along_axis(x_tm, idx, axis=0)


def reset_carry(carry: PyTree, reset: Array | None, zero: PyTree) -> PyTree:
    """``carry`` with the sequences where ``reset`` (``(*batch,)``) holds replaced by ``zero``."""
    if reset is None:
        return carry
    return jax.tree.map(lambda z, c: jnp.where(expand_to(reset, c), z, c), zero, carry)


def mask_step(new: PyTree, y: Array, old: PyTree, valid: Array | None) -> tuple[PyTree, Array]:
    """One step's ``(carry, y)`` cast to the carry's dtypes; where ``valid`` (``(*batch,)``) is
    false, the old carry and a zero output instead."""
    new = jax.tree.map(lambda n, c: n.astype(c.dtype), new, old)
    if valid is None:
        return new, y
    new = jax.tree.map(lambda n, c: jnp.where(expand_to(valid, n), n, c), new, old)
    return new, jnp.where(expand_to(valid, y), y, jnp.zeros((), y.dtype))


def check_guess(cell: Cell, guess: PyTree, xs: Array) -> None:
    """Raise ``ValueError`` unless ``guess`` is shaped as the carry after every step of ``xs``:
    each carry leaf with the time axis before its features, ``(*batch, T, ...)``."""
    k = cell.input_ndim
    steps = xs.shape[-(k + 1)]
    x_step = jax.ShapeDtypeStruct(xs.shape[: -(k + 1)] + xs.shape[-k:], xs.dtype)
    expected = jax.eval_shape(lambda: cell.carry_for(x_step))
    axis = len(x_step.shape) - k  # where the time axis sits in a carry leaf
    if jax.tree_util.tree_structure(guess) != jax.tree_util.tree_structure(expected):  # type: ignore[operator]
        raise ValueError(
            f"guess has structure {jax.tree_util.tree_structure(guess)}; expected the carry's "
            f"{jax.tree_util.tree_structure(expected)} with a time axis (info.states of newton_scan)"
        )
    for got, want in zip(jax.tree_util.tree_leaves(guess), jax.tree_util.tree_leaves(expected)):
        shape = want.shape[:axis] + (steps,) + want.shape[axis:]
        if tuple(jnp.shape(got)) != shape:
            raise ValueError(
                f"guess has a leaf of shape {tuple(jnp.shape(got))}; expected {shape}: the carry's "
                "shape with the time axis before its features (info.states of newton_scan)"
            )


# ---- the canonical form -------------------------------------------------------------------


class TimeMajor(NamedTuple):
    """Checked sequences in the form engines run on.

    The arrays are time-major and their steps are processed in order ``0 .. T-1``, or
    ``T-1 .. 0`` when ``backwards`` (``reverse`` without ``lengths``: no copy is made).
    With ``reverse`` and ``lengths``, each sequence's valid part is already flipped
    (:func:`flip_valid`).

    Attributes:
      xs: ``(T, *batch, *features)``.
      carry: the initial carry (zeros when none was given), leaves ``(*batch, ...)``.
      zero: the cell's zero carry in the compute dtype (what a reset puts in).
      resets: ``(T, *batch)`` bool or ``None``: the carry is reset before this step runs.
      valid: ``(T, *batch)`` bool or ``None`` (no lengths): the step is real.
      lengths: ``(*batch,)`` int32 in ``[0, T]``, or ``None``.
      backwards: process from the last step to the first.
      reverse: the user's ``reverse``.
      feature_ndim: ``cell.input_ndim``.
      guess: ``None``, or carries after every step for an iterative method to start from
        (``rj.Newton()``), leaves ``(T, *batch, ...)``, aligned with ``xs``.
      time_sharding: ``None``, or the :class:`rnnjax.sharding.mesh.SequenceSharding` over
        which the time axis is split (set by ``rj.TimeSharded``; read by the parallel engines).
    """

    xs: Array
    carry: PyTree
    zero: PyTree
    resets: Array | None
    valid: Array | None
    lengths: Array | None
    backwards: bool
    reverse: bool
    feature_ndim: int
    guess: PyTree | None = None
    time_sharding: Any = None

    @property
    def steps(self) -> int:
        return self.xs.shape[0]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.xs.shape[1 : self.xs.ndim - self.feature_ndim])

    def forwards(self) -> tuple[TimeMajor, Callable[[Array], Array]]:
        """The same sequences with ``backwards=False`` (arrays flipped in time if needed), and
        the map that brings a time-major result of those back into this order."""
        if not self.backwards:
            return self, lambda a: a
        flip = lambda a: jnp.flip(a, axis=0)
        resets = None if self.resets is None else flip(self.resets)
        guess = None if self.guess is None else jax.tree.map(flip, self.guess)
        return self._replace(xs=flip(self.xs), resets=resets, guess=guess, backwards=False), flip


def canonical(
    cell: Cell,
    params: Any,
    xs: Array,
    carry: PyTree | None,
    lengths: Array | None,
    resets: Array | None,
    reverse: bool,
    guess: PyTree | None = None,
) -> TimeMajor:
    """Checked ``(xs, carry, lengths, resets, reverse)`` (see :func:`validate`) as a
    :class:`TimeMajor` value; ``guess`` (carries after every step, leaves ``(*batch, T, ...)``
    in the user's layout) in the same time-major order. Traceable; call it inside ``jit``."""
    k = cell.input_ndim
    steps = xs.shape[-(k + 1)]
    xs_tm = jnp.moveaxis(xs, -(k + 1), 0)
    dtype = compute_dtype(xs, params)
    zero = cell.init_carry(carry_batch_shape(xs_tm.shape[1:]), dtype)
    carry = zero if carry is None else carry
    valid = None
    time = jnp.arange(steps).reshape((steps,) + (1,) * len(xs_tm.shape[1 : xs_tm.ndim - k]))
    if lengths is not None:
        # int32 before clipping: T must not be cast into a narrow integer type.
        lengths = jnp.clip(lengths.astype(jnp.int32), 0, steps)
        valid = time < lengths
        # Padding never reaches a cell: a NaN there would give 0 * NaN = NaN in the backward
        # pass of the masked step even though the forward pass ignores it.
        xs_tm = jnp.where(valid.reshape(valid.shape + (1,) * k), xs_tm, jnp.zeros((), xs_tm.dtype))
    resets_tm = None if resets is None else jnp.moveaxis(resets, -1, 0)
    if reverse and resets_tm is not None:
        # A boundary before step t means the backward pass starts afresh after step t.
        resets_tm = jnp.concatenate([resets_tm[1:], jnp.zeros_like(resets_tm[:1])], axis=0)
        if lengths is not None:
            resets_tm = resets_tm & (time + 1 < lengths)
    if reverse and lengths is not None:
        xs_tm = flip_valid(xs_tm, lengths)
        resets_tm = None if resets_tm is None else flip_valid(resets_tm, lengths)
    if guess is not None:
        batch_axes = xs_tm.ndim - 1 - k
        guess = jax.tree.map(lambda g: jnp.moveaxis(g, batch_axes, 0), guess)
        if reverse and lengths is not None:
            guess = jax.tree.map(lambda g: flip_valid(g, lengths), guess)
    backwards = bool(reverse and lengths is None)
    return TimeMajor(xs_tm, carry, zero, resets_tm, valid, lengths, backwards, bool(reverse), k, guess)


def restore(seqs: TimeMajor, ys_tm: Array) -> Array:
    """An engine's outputs ``(T, *batch, *out)``, aligned with ``seqs.xs``, in the user's
    layout ``(*batch, T, *out)`` and time order."""
    if seqs.reverse and seqs.lengths is not None:
        ys_tm = flip_valid(ys_tm, seqs.lengths)
    return jnp.moveaxis(ys_tm, 0, len(seqs.batch_shape))
