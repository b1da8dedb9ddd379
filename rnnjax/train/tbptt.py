"""Truncated backpropagation through time: one optimizer update per chunk of a long sequence."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rnnjax.cell import PyTree
from rnnjax.checks import check_nonnegative_int, check_optimizer, check_positive_int, check_positive_number
from rnnjax.train.checks import as_array, check_aux, check_loss
from rnnjax.train.state import TrainState, apply_gradients, check_state
from rnnjax.train.step import jit_for_mesh

__all__ = ["make_tbptt_step"]


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _path_str(path: tuple) -> str:
    return "batch" + "".join(
        f"[{k.key!r}]"
        if isinstance(k, jax.tree_util.DictKey)
        else f".{k.name}"
        if isinstance(k, jax.tree_util.GetAttrKey)
        else f"[{k.idx}]"
        if isinstance(k, jax.tree_util.SequenceKey)
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
    mesh: Mesh | str | None = None,
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
    check_optimizer(optimizer)
    check_positive_number(clip_norm, "clip_norm", finite=False, optional=True)
    check_positive_int(chunk_size, "chunk_size", note="steps per chunk")
    check_nonnegative_int(
        time_axis, "time_axis", note="the time axis of every array in the batch, counted from the front"
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
        aux = check_aux(out[2]) if has_aux else {}
        check_loss(loss)
        _check_carry(carry, new_carry)
        return loss, (new_carry, aux)

    value_and_grad = jax.value_and_grad(objective, has_aux=True)

    def chunk_update(state, carry, chunk, real_steps):
        """One chunk: update unless ``real_steps`` (None: unknown) is 0."""
        carry = jax.lax.stop_gradient(carry)
        (loss, (new_carry, aux)), grads = value_and_grad(state.params, carry, chunk)
        new_state, grad_norm = apply_gradients(state, grads, optimizer, clip_norm)
        if real_steps is not None:
            keep = real_steps > 0
            new_state = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_state, state)
        return new_state, new_carry, loss, grad_norm, aux

    def tbptt_step(state, carry, batch):
        check_state(state, optimizer)
        _check_carry_leaves(carry)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
        lengths_path = None
        if isinstance(batch, Mapping) and lengths_key in batch:
            lengths_path = (jax.tree_util.DictKey(lengths_key),)
        cut = [(path, leaf) for path, leaf in leaves if not _is_key(leaf) and tuple(path) != lengths_path]
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
            lengths = as_array(batch[lengths_key])
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

    return jit_for_mesh(tbptt_step, mesh, data_axis, model_axis, donate, ("carry", "batch"))


def _check_carry_leaves(carry: PyTree) -> None:
    leaves = jax.tree.leaves(carry)
    if not leaves:
        raise ValueError("carry is empty; expected the model's initial carry, e.g. layer.init_carry((batch_size,))")


def _check_carry(carry: PyTree, new_carry: PyTree) -> None:
    got, expected = jax.tree.structure(new_carry), jax.tree.structure(carry)
    if got != expected:  # type: ignore[operator]  # jax's PyTreeDef is opaque to mypy
        raise ValueError(f"loss_fn returned a carry of structure {got}; expected {expected}, the carry it was given")
    for new, old in zip(jax.tree.leaves(new_carry), jax.tree.leaves(carry)):
        if jnp.shape(new) != jnp.shape(old) or jnp.result_type(new) != jnp.result_type(old):
            raise ValueError(
                f"loss_fn returned a carry leaf {jnp.result_type(new)}{list(jnp.shape(new))}; expected "
                f"{jnp.result_type(old)}{list(jnp.shape(old))}, as in the carry it was given"
            )
