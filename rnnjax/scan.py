"""The front door: :func:`scan` runs any cell over the time axis with a method value.

It validates once (:func:`rnnjax.sequence.validate`), then :func:`evaluate` brings the
inputs into the canonical time-major form (:func:`rnnjax.sequence.canonical`), hands them to
the method's ``run`` and restores the user's layout, all inside one ``jit`` keyed on the cell,
the method and ``reverse``. :func:`evaluate` is the one evaluation every front door goes
through (``rj.scan``, ``rj.RNN``, ``rj.parallel``, ``rj.distributed.sequence_scan``). Inside
:func:`rnnjax.distributed.data_parallel` the same runs per batch shard.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from rnnjax import sequence
from rnnjax.cell import Cell, PyTree
from rnnjax.methods import Method, Sequential, method_for
from rnnjax.sharding.data import current_data_parallel, split_batch

# Options that were keywords of rj.scan before method values, and what replaced them.
_REPLACED = {
    "unroll": "method=rj.Sequential(unroll=...)",
    "remat": "method=rj.Sequential(remat=None | 'step' | 'sqrt')",
    "vjp": "method=rj.Sequential(gradient='fused')",
    "chunk_size": "method=rj.Chunked(size=...)",
    "tol": "method=rj.Newton(tol=...)",
    "max_iters": "method=rj.Newton(max_iters=...)",
    "newton": "method=rj.Newton('deer' | 'quasi-deer' | 'elk' | 'quasi-elk')",
    "damping": "method=rj.Newton('elk', damping=...)",
}


def check_no_replaced_options(options: dict[str, Any], where: str) -> None:
    """Raise a ``TypeError`` naming the method value that replaced each old keyword."""
    if not options:
        return
    unknown = [k for k in options if k not in _REPLACED]
    if unknown:
        raise TypeError(f"{where} got unexpected keyword arguments {unknown}")
    hints = "; ".join(f"{k}= is now {_REPLACED[k]}" for k in options)
    raise TypeError(f"{where} takes its options as a method value: {hints}")


def scan(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    carry: PyTree | None = None,
    *,
    lengths: jax.Array | None = None,
    resets: jax.Array | None = None,
    reverse: bool = False,
    method: Method | str | None = None,
    guess: PyTree | None = None,
    **replaced: Any,
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
        pass re-initialises after step ``t``. Resets at or past a length are ignored.
      reverse: run each sequence backwards over its own valid part: step ``lengths - 1``
        first, step ``0`` last. Outputs stay aligned with their inputs and padding stays
        at the end, so a reversed pass over padded data equals one over unpadded data.
      method: how to evaluate the recurrence (:mod:`rnnjax.methods`): ``None`` (default): the
        cell's default, ``rj.Chunked()`` for matrix-state cells (``rj.GLA``, ``rj.Mamba2``,
        ``rj.MLSTM``, :mod:`rnnjax.linear_attention`), ``rj.Sequential()`` for every other cell;
        or ``rj.Sequential()``, ``rj.Associative()``, ``rj.Chunked()``, ``rj.Newton()``,
        ``rj.Auto()``, or one of their names as a string for the default value. A method that cannot
        run ``cell`` raises ``ValueError`` naming the ones that can.
      guess: only for a method that iterates (``rj.Newton()``): its first iterate, the carry
        after every step (each carry leaf ``(*batch, T, ...)``, as ``rj.parallel.newton_scan``
        returns in ``info.states``), e.g. the states of the previous training step.

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
      >>> ys_lean, _ = rj.scan(cell, params, xs, method=rj.Sequential(remat="sqrt"))
    """
    check_no_replaced_options(replaced, "rj.scan")
    method, reverse = method_for(cell, method), sequence.check_reverse(reverse)
    xs, carry, lengths, resets = sequence.validate(cell, params, xs, carry, lengths, resets)
    split = current_data_parallel()
    if split is not None:  # inside rj.distributed.data_parallel: one loop per batch shard
        if guess is not None:
            raise ValueError(
                "guess= is not split over rj.distributed.data_parallel's batch shards; call rj.scan with a "
                "guess outside the data_parallel context"
            )
        run = lambda params, xs, carry, lengths, resets: evaluate(
            cell, params, xs, carry, lengths, resets, reverse, method
        )[:2]
        return split_batch(run, cell, params, xs, carry, lengths, resets, split)
    return evaluate(cell, params, xs, carry, lengths, resets, reverse, method, guess)[:2]


def evaluate(
    cell: Cell,
    params: Any,
    xs: jax.Array,
    carry: PyTree | None,
    lengths: jax.Array | None,
    resets: jax.Array | None,
    reverse: bool,
    method: Method | str | None,
    guess: PyTree | None = None,
) -> tuple[jax.Array, PyTree, Any]:
    """:func:`scan` on checked inputs (:func:`rnnjax.sequence.validate`), returning the
    engine's report too: ``(ys, final_carry, info)`` (``info`` is ``None`` but for Newton,
    whose ``info.states``, when asked for, come in the user's layout). The method is checked
    against ``cell`` and resolved (``rj.Auto()``, Newton's ``"auto"`` variant) here; ``guess``
    (carries after every step, leaves ``(*batch, T, ...)``) goes to methods that iterate. It
    ignores :func:`rnnjax.distributed.data_parallel`."""
    steps = xs.shape[-(cell.input_ndim + 1)]
    method = method_for(cell, method).resolve(cell, steps)
    method.check(cell)
    if guess is not None:
        if not method.takes_guess():
            raise ValueError(f"guess= is the first iterate of an iterative method (rj.Newton()); {method!r} takes none")
        sequence.check_guess(cell, guess, xs)
    if not steps and not isinstance(method, Sequential):  # nothing to solve: the loop's empty result
        method, guess = Sequential(), None
    return _run(cell, method, bool(reverse), params, xs, carry, lengths, resets, guess)


def _run(cell: Cell, method: Method, reverse: bool, *arrays: Any) -> tuple[jax.Array, PyTree, Any]:
    """:func:`_evaluate`, with JAX's bare error for forward mode through a ``custom_vjp``
    (the fused gradient, Newton's implicit one) turned into one that names the fix."""
    try:
        return _evaluate(cell, method, reverse, *arrays)
    except TypeError as err:
        if "forward-mode" not in str(err):
            raise
        raise TypeError(
            f"method={method!r} computes its gradient with a jax.custom_vjp, which has no forward mode: "
            f"jax.jvp, jax.jacfwd and jax.linearize cannot go through it (jax.grad and jax.hessian can); "
            f"use method=rj.Sequential() for forward-mode derivatives"
        ) from err


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _evaluate(cell, method, reverse, params, xs, carry, lengths, resets, guess):
    seqs = sequence.canonical(cell, params, xs, carry, lengths, resets, reverse, guess)
    ys, final, info = method.run(cell, params, seqs)
    if getattr(info, "states", None) is not None:  # carries after every step, as ys
        info = info._replace(states=jax.tree.map(lambda s: sequence.restore(seqs, s), info.states))
    return sequence.restore(seqs, ys), final, info


def compiled_count() -> int:
    """How many programs :func:`scan` has compiled in this process (a testing hook: a second
    call with the same shapes, cell and method must not add one)."""
    return _evaluate._cache_size()  # type: ignore[attr-defined]  # jax.jit's (untyped) cache hook
