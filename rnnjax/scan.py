"""The sequential driver: any cell over the time axis with ``jax.lax.scan``; ``method=``
hands the same call to a parallel-in-time driver (:mod:`rnnjax.parallel`)."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import distributed
from rnnjax.cell import Cell, PyTree, carry_batch_shape, check_float_input


def scan(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    carry: PyTree | None = None,
    *,
    lengths: jax.Array | None = None,
    resets: jax.Array | None = None,
    reverse: bool = False,
    unroll: int | bool | str = "auto",
    remat: bool | str = False,
    vjp: str = "autodiff",
    method: str = "sequential",
    chunk_size: int | None = None,
    tol: float | None = None,
    max_iters: int | None = None,
    newton: str | None = None,
    damping: float | None = None,
) -> tuple[jax.Array, PyTree]:
    r"""Run ``cell`` over the time axis of ``xs``; return ``(ys, final_carry)``.

    For every step :math:`t` (in order, or backwards when ``reverse``):

    .. math::

        c_t, y_t = \mathrm{cell.step}(\theta, c_{t-1}, x_t)

    Args:
      cell: any rnnjax cell.
      params: the cell's parameters (``cell.init``).
      xs: ``(*batch, T, D)``; for ConvLSTM ``(*batch, T, H, W, C)``. Any number of batch
        axes, none included. Floating dtype.
      carry: initial carry, as ``cell.init_carry(batch_shape)``; zeros when ``None``.
      lengths: ``(*batch,)`` integers in ``[0, T]``. Steps at or past a sequence's length
        leave its carry unchanged and output zeros, so the final carry is the carry after
        the sequence's last real step (the initial carry for length 0). Values are checked
        when concrete; under ``jit`` they are clipped into ``[0, T]``.
      resets: ``(*batch, T)`` booleans. ``resets[..., t]`` marks a sequence boundary
        before step ``t``: the carry is re-initialised to zeros (``cell.init_carry``)
        before step ``t`` runs. With ``reverse`` the same boundaries hold, so the backward
        pass re-initialises after step ``t`` (before step ``t - 1``). Resets at or past a
        length are ignored.
      reverse: run each sequence backwards over its own valid part: step ``lengths - 1``
        first, step ``0`` last. Outputs stay aligned with their inputs and padding stays
        at the end, so a reversed pass over padded data equals one over unpadded data.
      unroll: steps unrolled per loop iteration (``jax.lax.scan``'s ``unroll``), or
        ``"auto"``: the measured best for the backend (:data:`AUTO_UNROLL`: 1 on CPU, 16 on
        GPU), decided when the call is traced.
      remat: what the backward pass recomputes instead of storing (``jax.checkpoint``).
        ``False`` (or ``"none"``): nothing, every step's activations are kept, O(T) of them.
        ``True`` (or ``"step"``): each step, storing only the carries (still O(T) carries).
        ``"sqrt"``: nested checkpoints, the steps cut into about sqrt(T) blocks of about
        sqrt(T) steps; only the carries at block boundaries are stored and one block's
        activations are live at a time, so activation memory is O(sqrt(T)) for about one
        extra forward pass of compute.
        ``unroll`` and ``remat`` act on the sequential loop only (``method="sequential"``;
        ``unroll`` also on Newton's fallback loop).
      vjp: ``"autodiff"`` (default): the gradient is JAX's transpose of the loop.
        ``"fused"`` (dense cells: Elman, LSTM, GRU with ``reset_after``; sequential loop, no remat): a
        sequence-level backward pass (:mod:`rnnjax.fused`) that keeps only the recurrent
        product in the backward loop and forms the weight and input gradients as three large
        matrix products after it; same gradients up to float rounding, faster where measured
        (``benchmarks/custom_vjp_experiment.py``). It is a ``jax.custom_vjp``: forward-mode
        autodiff (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) of the scan then fails.
      method: how to evaluate the recurrence; every method gives these outputs and final
        carry within float rounding (see :mod:`rnnjax.parallel` for the stated tolerances):

        - ``"sequential"``: ``jax.lax.scan``, T dependent steps. Any cell.
        - ``"associative"``: ``jax.lax.associative_scan`` over the ``(a_t, b_t)`` of an
          :class:`rnnjax.LinearCell` (MinGRU, MinLSTM, LRU, yours), O(log T) depth.
        - ``"chunked"``: sequential within chunks of ``chunk_size`` steps, associative across
          chunks. LinearCells.
        - ``"newton"``: any cell, by Newton iterations over the whole sequence (DEER,
          quasi-DEER, ELK) with a sequential fallback when they do not converge; see
          :func:`rnnjax.parallel.newton_scan`, which also reports iterations and convergence.
        - ``"auto"``: picks one per backend, cell kind and T from measurements kept in the
          library (:func:`rnnjax.parallel.choose_method`); on CPU mostly ``"sequential"``.
      chunk_size: steps per chunk for ``"chunked"``; ``None``: a per-backend default.
      tol, max_iters, newton, damping: Newton's options (:func:`rnnjax.parallel.newton_scan`).
        Options a method does not use raise ``ValueError``, except under ``"auto"``.

    Returns:
      ``ys`` of shape ``(*batch, T, cell.output_size(D))`` (zeros past ``lengths``) and the
      final carry, shaped as the initial one.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.GRU(hidden_size=16)
      >>> params = cell.init(jax.random.key(0), input_size=4)
      >>> xs = jnp.ones((2, 10, 4))
      >>> ys, h = rj.scan(cell, params, xs, lengths=jnp.array([10, 3]))
      >>> ys.shape, h.shape
      ((2, 10, 16), (2, 16))
      >>> bool((ys[1, 3:] == 0).all())
      True
    """
    xs = _check_xs(cell, params, xs)
    k = cell.input_ndim
    batch_shape = xs.shape[: -(k + 1)]
    steps = xs.shape[-(k + 1)]
    x_step = jax.ShapeDtypeStruct((*batch_shape, *xs.shape[-k:]), xs.dtype)
    if carry is not None:
        cell.check_carry(carry, x_step)
    if lengths is not None:
        lengths = _check_lengths(lengths, batch_shape, steps)
    if resets is not None:
        resets = _check_resets(resets, batch_shape, steps)
    unroll = resolve_unroll(unroll)
    remat = remat_policy(remat)
    _check_vjp(cell, vjp, remat, method)
    # rnnjax.parallel builds on this module's checks, so it is imported here, not at the top.
    from rnnjax import parallel

    parallel.check_options(
        cell, method, chunk_size=chunk_size, tol=tol, max_iters=max_iters, newton=newton, damping=damping
    )
    if method == "auto":
        method = parallel.choose_method(cell, steps)

    def run(params, xs, carry, lengths, resets):
        if method == "sequential" or steps == 0:
            return _scan(cell, params, xs, carry, lengths, resets, reverse=bool(reverse), unroll=unroll, remat=remat,
                         vjp=vjp)
        if method in ("associative", "chunked"):
            size = None if method == "associative" else int(chunk_size or parallel.default_chunk_size(steps))
            return parallel._linear_jit(cell, params, xs, carry, lengths, resets, reverse=bool(reverse), chunk_size=size)
        ys, final, _ = parallel.newton_scan(
            cell, params, xs, carry, lengths=lengths, resets=resets, reverse=reverse,
            newton=newton, tol=tol, max_iters=max_iters, damping=damping, unroll=unroll,
        )
        return ys, final

    split = distributed.current_data_parallel()
    if split is not None:  # inside rj.distributed.data_parallel: one loop per batch shard
        return distributed.split_batch(run, cell, params, xs, carry, lengths, resets, split)
    return run(params, xs, carry, lengths, resets)


REMAT_POLICIES = ("none", "step", "sqrt")

# What unroll="auto" means, per backend (jax.default_backend(); other accelerators use "gpu").
# cpu: 1. Measured on the 2-core CPU (DESIGN.md, benchmarks/results/cpu-quick: rnnjax-unroll4
#   ran at about the speed of unroll 1 and unroll=8 slowed training 2-3x).
# gpu: 16. Measured 2026-11-27 on one H200, jax 0.11.2, B=32 D=H=128, by
#   python -m benchmarks.run --preset gpu --cells lstm,gru,elman --lengths 1024 4096 \
#     --systems rnnjax rnnjax-unroll4 rnnjax-unroll16 rnnjax-unroll64 torch
#   (benchmarks/results/nvidia-h200-unroll/results.md). Each loop iteration costs a few
#   microseconds of launch and synchronisation whatever its size, so unrolling pays:
#   LSTM T=4096 forward 63.0 / 32.8 / 25.8 / 24.4 ms and forward+backward 185 / 96.6 / 71.8 /
#   66.5 ms for unroll 1 / 4 / 16 / 64; GRU and Elman alike (2.3-3.3x at 16). 64 gained at
#   most another 13% but compiled in up to 17 s against 1-3 s for 16 (warm).
AUTO_UNROLL = {"cpu": 1, "gpu": 16}


def resolve_unroll(unroll: int | bool | str, backend: str | None = None) -> int | bool:
    """``unroll`` checked, ``"auto"`` replaced by :data:`AUTO_UNROLL`'s value for ``backend``
    (``jax.default_backend()`` when ``None``)."""
    if unroll == "auto" and isinstance(unroll, str):
        backend = backend or jax.default_backend()
        return AUTO_UNROLL.get(backend, AUTO_UNROLL["cpu" if backend == "cpu" else "gpu"])
    if not (unroll is True or (isinstance(unroll, int) and not isinstance(unroll, bool) and unroll >= 1)):
        raise ValueError(f'unroll must be a positive int, True or "auto", got {unroll!r}')
    return unroll


def remat_policy(remat: bool | str) -> str:
    """``remat`` as one of :data:`REMAT_POLICIES` (``False`` -> "none", ``True`` -> "step")."""
    if remat is False or remat is None:
        return "none"
    if remat is True:
        return "step"
    if isinstance(remat, str) and remat in REMAT_POLICIES:
        return remat
    raise ValueError(f"remat must be False, True or one of {REMAT_POLICIES}, got {remat!r}")


def _check_xs(cell: Cell, params: Any, xs: Any) -> jax.Array:
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


def _check_lengths(lengths: Any, batch_shape: tuple[int, ...], steps: int, of: str = "xs") -> jax.Array:
    """``lengths`` as an integer array of shape ``batch_shape`` (the batch shape of ``of``),
    values in ``[0, steps]`` when concrete."""
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
    return jnp.asarray(lengths)


def _check_resets(resets: Any, batch_shape: tuple[int, ...], steps: int) -> jax.Array:
    if not hasattr(resets, "dtype"):
        resets = np.asarray(resets)
    if resets.dtype != jnp.bool_:
        raise TypeError(f"resets has dtype {resets.dtype}; expected bool")
    if tuple(resets.shape) != (*batch_shape, steps):
        raise ValueError(
            f"resets has shape {tuple(resets.shape)}; expected {(*batch_shape, steps)}, "
            f"(*batch, T) for xs"
        )
    return jnp.asarray(resets)


def _expand_to(mask: jax.Array, leaf: jax.Array) -> jax.Array:
    """Broadcast a ``(*batch,)`` mask against a ``(*batch, ...)`` leaf."""
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - mask.ndim))


def flip_valid(x_tm: jax.Array, lengths: jax.Array) -> jax.Array:
    """Reverse the first ``lengths`` steps of each sequence of a time-major array.

    ``x_tm``: ``(T, *batch, ...)``; ``lengths``: ``(*batch,)``. Step ``t < L`` moves to
    ``L - 1 - t``; padding stays where it is. The map is its own inverse.
    """
    steps = x_tm.shape[0]
    t = jnp.arange(steps).reshape((steps,) + (1,) * lengths.ndim)
    idx = jnp.where(t < lengths, lengths - 1 - t, t)
    idx = idx.reshape(idx.shape + (1,) * (x_tm.ndim - idx.ndim))
    return jnp.take_along_axis(x_tm, idx, axis=0)


def _check_vjp(cell: Cell, vjp: str, remat: str, method: str) -> None:
    if vjp == "autodiff":
        return
    if vjp != "fused":
        raise ValueError(f'vjp must be "autodiff" or "fused", got {vjp!r}')
    from rnnjax.cell import DenseCell

    if not (isinstance(cell, DenseCell) and cell.fusable):
        raise ValueError(
            f'vjp="fused" needs a dense cell (rj.Elman, rj.LSTM, rj.GRU with reset_after=True: '
            f'rnnjax.cell.DenseCell); {type(cell).__name__} with this configuration is not one: use vjp="autodiff"'
        )
    if remat != "none":
        raise ValueError(f'vjp="fused" keeps its own residuals; it does not combine with remat={remat!r}')
    if method not in ("sequential", "auto"):
        raise ValueError(f'vjp="fused" is a backward pass of the sequential loop; method={method!r} has its own')


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("reverse", "unroll", "remat", "vjp"))
def _scan(cell, params, xs, carry, lengths, resets, *, reverse, unroll, remat, vjp="autodiff"):
    k = cell.input_ndim
    steps = xs.shape[-(k + 1)]
    xs_tm = jnp.moveaxis(xs, -(k + 1), 0)  # (T, *batch, *features)
    param_leaves = [p for p in jax.tree_util.tree_leaves(params) if jnp.issubdtype(p.dtype, jnp.inexact)]
    dtype = jnp.result_type(xs.dtype, *param_leaves)
    zero_carry = cell.init_carry(carry_batch_shape(xs_tm.shape[1:]), dtype)
    if carry is None:
        carry = zero_carry
    if lengths is not None:
        lengths = jnp.clip(lengths, 0, steps)
    resets_tm = None if resets is None else jnp.moveaxis(resets, -1, 0)  # (T, *batch)

    if reverse and resets_tm is not None:
        # A boundary before step t means the backward pass starts afresh after step t.
        resets_tm = jnp.concatenate([resets_tm[1:], jnp.zeros_like(resets_tm[:1])], axis=0)
        if lengths is not None:
            time = jnp.arange(steps).reshape((steps,) + (1,) * lengths.ndim)
            resets_tm = resets_tm & (time + 1 < lengths)
    if reverse and lengths is not None:
        xs_tm = flip_valid(xs_tm, lengths)
        if resets_tm is not None:
            resets_tm = flip_valid(resets_tm, lengths)

    def body(c, inputs):
        t, x, reset = inputs
        c_in = c
        if reset is not None:
            c_in = jax.tree.map(lambda z, old: jnp.where(_expand_to(reset, old), z, old), zero_carry, c)
        new, y = cell.step(params, c_in, x)
        new = jax.tree.map(lambda n, old: n.astype(old.dtype), new, c)
        if lengths is not None:
            valid = t < lengths
            new = jax.tree.map(lambda n, old: jnp.where(_expand_to(valid, n), n, old), new, c)
            y = jnp.where(_expand_to(valid, y), y, jnp.zeros((), y.dtype))
        return new, y

    inputs = (jnp.arange(steps), xs_tm, resets_tm)
    scan_backwards = reverse and lengths is None
    if vjp == "fused":
        from rnnjax.fused import fused_scan

        final, ys_tm = fused_scan(cell, params, carry, xs_tm, resets_tm, lengths, zero_carry,
                                  reverse=scan_backwards, unroll=unroll)
    elif remat == "sqrt" and steps > 1:
        final, ys_tm = _scan_sqrt_remat(body, carry, inputs, steps, scan_backwards, unroll)
    else:
        if remat == "step":
            body = jax.checkpoint(body, prevent_cse=False)
        final, ys_tm = jax.lax.scan(body, carry, inputs, reverse=scan_backwards, unroll=unroll)
    if reverse and lengths is not None:
        ys_tm = flip_valid(ys_tm, lengths)
    return jnp.moveaxis(ys_tm, 0, -(k + 1)), final


def _scan_sqrt_remat(body, carry, inputs, steps, scan_backwards, unroll):
    """``lax.scan(body, carry, inputs)`` with sqrt(T) nested checkpoints.

    The T steps are padded to ``blocks * block`` (``block = ceil(sqrt(T))``); padded steps
    (``t >= T``) keep the carry and are cut from the outputs. The outer scan over blocks is
    checkpointed, so its backward pass stores one carry per block and recomputes one block
    at a time.
    """
    block = math.ceil(math.sqrt(steps))
    blocks = math.ceil(steps / block)
    pad = blocks * block - steps

    def padded(a):
        a = jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a
        return a.reshape(blocks, block, *a.shape[1:])

    _, xs_tm, resets_tm = inputs
    blocked = (jnp.arange(blocks * block).reshape(blocks, block), padded(xs_tm),
               None if resets_tm is None else padded(resets_tm))

    def masked_body(c, step_inputs):
        new, y = body(c, step_inputs)
        if pad:
            real = step_inputs[0] < steps
            new = jax.tree.map(lambda n, old: jnp.where(real, n, old), new, c)
        return new, y

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def run_block(c, block_inputs):
        return jax.lax.scan(masked_body, c, block_inputs, reverse=scan_backwards, unroll=unroll)

    final, ys = jax.lax.scan(run_block, carry, blocked, reverse=scan_backwards)
    ys = ys.reshape(blocks * block, *ys.shape[2:])
    return final, ys[:steps]
