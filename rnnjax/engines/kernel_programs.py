"""The Pallas programs of ``rj.Kernel()`` (:mod:`rnnjax.engines.kernel`) and their launches: one
forward and one reverse program per direction, each looping over the steps with the carry on
chip, the cell's ``update`` traced in, and ``W_h`` streamed one column tile at a time or held.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rnnjax.engines import blocked
from rnnjax.engines.blocked import Blocks
from rnnjax.ops import matmul
from rnnjax.sequence import mask_step, reset_carry


def dot_precision(precision: str, interpret: bool, dtype: Any) -> Any:
    """What a float32 product in the kernel runs as: on a GPU, TF32 (``"default"``) or three
    TF32 passes (``"highest"``: float32 accuracy on tensor cores; Triton's exact float32 product
    runs on the FMA units and was 50x slower: ``benchmarks/lab/DECISIONS.md``);
    interpreted, XLA's own precisions. 16-bit operands use their own tensor-core product."""
    if jnp.dtype(dtype) != jnp.float32:
        return None
    if interpret:
        return jax.lax.Precision.HIGHEST if precision == "highest" else jax.lax.Precision.DEFAULT
    if precision == "highest":
        return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return jax.lax.DotAlgorithmPreset.TF32_TF32_F32


class Config(NamedTuple):
    """The static choices of one kernel run (hashable: the ``custom_vjp``'s static argument)."""

    block_batch: int
    precision: str
    interpret: bool
    num_warps: int
    weights: str
    backwards: bool
    has_resets: bool
    has_valid: bool


# ---- one step, as the kernels trace it ------------------------------------------------------


def local_step(cell, rest, c_prev, zx, zh, reset, valid, zero):
    """One step without its two large products: reset, ``update``, the length mask."""
    new, y = cell.update(rest, reset_carry(c_prev, reset, zero), zx, zh)
    return mask_step(new, y, c_prev, valid)


def recurrent_input(cell, c_prev, reset, zero):
    return cell.recurrent_input(reset_carry(c_prev, reset, zero))


def _width(w: int, h_in: int, g: int) -> tuple[int, int]:
    return h_in // w, g // w


class _Weights:
    """``W_h`` as ``w x w`` tiles, each read from the ref where it is used (``"stream"``: from
    L2 every step, so no more than one tile is live on chip at a time) or read once before the
    loop and held (``"hold"``)."""

    def __init__(self, ref, w, h_in, g, hold):
        self.ref, self.w, self.rows, self.cols = ref, w, h_in // w, g // w
        self.held = [[self._read(j, k) for k in range(self.cols)] for j in range(self.rows)] if hold else None

    def _read(self, j, k):
        return self.ref[pl.ds(j * self.w, self.w), pl.ds(k * self.w, self.w)]

    def tile(self, j, k):
        return self.held[j][k] if self.held is not None else self._read(j, k)


def _parts(a):
    return list(a.parts) if isinstance(a, Blocks) else [a]


def _wrap(parts):
    return parts[0] if len(parts) == 1 else Blocks(parts)


def _accumulator(a, weights: _Weights):
    """Zeros ``(rows, w)`` in the dtype the products of ``a`` with ``W_h`` sum in (16-bit: float32)."""
    dtype = jnp.promote_types(jnp.promote_types(a.dtype, weights.ref.dtype), jnp.float32)
    return jnp.zeros((a.shape[0], weights.w), dtype)


def _recurrent_product(h, weights: _Weights, precision):
    """``h @ W_h`` by tiles: ``h`` ``(rows, h_in)`` plain or blocked, result blocked.

    Streamed, the column tiles are a loop, not unrolled: unrolled, Triton converts every
    tile's operand to registers before the first product (all of ``W_h``: 512 float32
    registers a thread for LSTM(128) on 4 warps), and the spills made the float32 kernel
    30x slower (measured by ``benchmarks/lab/kernel_report.py``, see
    ``benchmarks/lab/DECISIONS.md``)."""
    h_parts = _parts(h)

    def column(k):
        acc = None
        for j, part in enumerate(h_parts):
            p = matmul(part, weights.tile(j, k), precision)
            p = p.astype(jnp.promote_types(p.dtype, jnp.float32))  # 16-bit products sum in float32
            acc = p if acc is None else acc + p
        return acc

    if weights.held is not None or weights.cols == 1:
        return _wrap([column(k) for k in range(weights.cols)])

    def body(k, out):  # a static list of blocks cannot be indexed by k: select into each
        p = column(k)
        return [jnp.where(k == i, p.astype(o.dtype), o) for i, o in enumerate(out)]

    zeros = [_accumulator(h_parts[0], weights)] * weights.cols
    return _wrap(jax.lax.fori_loop(0, weights.cols, body, zeros))


def _recurrent_product_t(dz, weights: _Weights, precision):
    """``dz @ W_h^T`` by tiles: ``dz`` ``(rows, g)`` blocked, result ``(rows, h_in)``; streamed,
    the column tiles are a loop as in :func:`_recurrent_product`."""
    dz_parts = _parts(dz)
    dims = (((1,), (1,)), ((), ()))

    def term(j, k, part):
        tile = weights.tile(j, k)
        part = part.astype(tile.dtype) if tile.dtype.itemsize < part.dtype.itemsize else part
        acc_dtype = jnp.promote_types(part.dtype, jnp.float32)
        return jax.lax.dot_general(part, tile, dims, precision=precision, preferred_element_type=acc_dtype)

    out = []
    for j in range(weights.rows):
        if weights.held is not None or len(dz_parts) == 1:
            acc = None
            for k, part in enumerate(dz_parts):
                p = term(j, k, part)
                acc = p if acc is None else acc + p
        else:

            def body(k, acc, j=j):
                part = dz_parts[0]
                for i in range(1, len(dz_parts)):
                    part = jnp.where(k == i, dz_parts[i], part)
                return acc + term(j, k, part).astype(acc.dtype)

            acc = jax.lax.fori_loop(0, len(dz_parts), body, _accumulator(dz_parts[0], weights))
        out.append(acc)
    return _wrap(out)


def _load(ref, index, w):
    """``ref[index]`` with its last axis as column blocks where it is wider than ``w``."""
    width = ref.shape[-1] if ref.shape else 0
    if width <= w:
        return ref[(*index, slice(None))] if ref.shape else ref[...]
    return Blocks([ref[(*index, pl.ds(k * w, w))] for k in range(width // w)])


def _store(ref, index, value, w):
    for k, part in enumerate(_parts(value)):
        ref[(*index, pl.ds(k * w, part.shape[-1]))] = part.astype(ref.dtype)


def _step_index(config: Config, s, steps):
    return steps - 1 - s if config.backwards else s


def _masks(config, refs, t, rows):
    resets_ref, valid_ref = refs
    reset = resets_ref[t, rows, :] != 0 if config.has_resets else None
    valid = valid_ref[t, rows, :] != 0 if config.has_valid else None
    return reset, valid


# ---- the kernels ----------------------------------------------------------------------------


class _Layout(NamedTuple):
    """Shapes the kernels are traced for."""

    steps: int
    w: int
    h_in: int
    g: int
    carry_def: Any
    rest_def: Any
    n_carry: int
    n_rest: int


def _layout(w_h, rest, carry, steps) -> _Layout:
    carry_leaves, carry_def = jax.tree.flatten(carry)
    rest_leaves, rest_def = jax.tree.flatten(rest)
    h_in, g = w_h.shape
    w = blocked.block_width(g, h_in, *(c.shape[-1] for c in carry_leaves))
    return _Layout(steps, w, h_in, g, carry_def, rest_def, len(carry_leaves), len(rest_leaves))


def _split_refs(refs, counts):
    out, at = [], 0
    for n in counts:
        out.append(refs[at : at + n])
        at += n
    return out


def _forward_kernel(cell, config, lay: _Layout, keep_carries, *refs):
    n_masks = 2
    zx_ref, wh_ref, carry_refs, zero_refs, mask_refs, rest_refs, ys_ref, final_refs, prev_refs = _split_refs(
        refs,
        (1, 1, lay.n_carry, lay.n_carry, n_masks, lay.n_rest, 1, lay.n_carry, lay.n_carry if keep_carries else 0),
    )
    (zx_ref,), (wh_ref,), (ys_ref,) = zx_ref, wh_ref, ys_ref
    w, bb = lay.w, config.block_batch
    rows = pl.ds(pl.program_id(0) * bb, bb)
    unflat_carry = functools.partial(jax.tree.unflatten, lay.carry_def)
    carry = unflat_carry([_load(r, (rows,), w) for r in carry_refs])
    zero = unflat_carry([_load(r, (rows,), w) for r in zero_refs])
    rest = jax.tree.unflatten(lay.rest_def, [_load(r, (slice(None),) * (len(r.shape) - 1), w) for r in rest_refs])
    precision = dot_precision(config.precision, config.interpret, wh_ref.dtype)
    weights = _Weights(wh_ref, w, lay.h_in, lay.g, config.weights == "hold")

    def body(s, c):
        t = _step_index(config, s, lay.steps)
        reset, valid = _masks(config, mask_refs, t, rows)
        h = blocked.evaluate(functools.partial(recurrent_input, cell), w, c, reset, zero)
        zh = _recurrent_product(h, weights, precision)
        zx = _load(zx_ref, (t, rows), w)
        new, y = blocked.evaluate(functools.partial(local_step, cell), w, rest, c, zx, zh, reset, valid, zero)
        _store(ys_ref, (t, rows), y, w)
        for ref, leaf in zip(prev_refs, jax.tree.leaves(c, is_leaf=_is_blocks)):
            _store(ref, (t, rows), leaf, w)
        return new

    final = jax.lax.fori_loop(0, lay.steps, body, carry)
    for ref, leaf in zip(final_refs, jax.tree.leaves(final, is_leaf=_is_blocks)):
        _store(ref, (rows,), leaf, w)


def _backward_kernel(cell, config, lay: _Layout, *refs):
    zx_ref, wh_ref, prev_refs, dys_ref, d_final_refs, zero_refs, mask_refs, rest_refs, gs_refs, d_carry_refs = (
        _split_refs(refs, (1, 1, lay.n_carry, 1, lay.n_carry, lay.n_carry, 2, lay.n_rest, lay.n_carry, lay.n_carry))
    )
    (zx_ref,), (wh_ref,), (dys_ref,) = zx_ref, wh_ref, dys_ref
    w, bb = lay.w, config.block_batch
    rows = pl.ds(pl.program_id(0) * bb, bb)
    unflat_carry = functools.partial(jax.tree.unflatten, lay.carry_def)
    zero = unflat_carry([_load(r, (rows,), w) for r in zero_refs])
    rest = jax.tree.unflatten(lay.rest_def, [_load(r, (slice(None),) * (len(r.shape) - 1), w) for r in rest_refs])
    d_final = unflat_carry([_load(r, (rows,), w) for r in d_final_refs])
    precision = dot_precision(config.precision, config.interpret, wh_ref.dtype)
    weights = _Weights(wh_ref, w, lay.h_in, lay.g, config.weights == "hold")

    def step_vjp(rest, c_prev, zx, zh, reset, valid, zero, g, dy):
        _, vjp = jax.vjp(lambda c, b: local_step(cell, rest, c, zx, b, reset, valid, zero), c_prev, zh)
        return vjp((g, dy))

    def rec_in_vjp(c_prev, reset, zero, dh):
        _, vjp = jax.vjp(lambda c: recurrent_input(cell, c, reset, zero), c_prev)
        return vjp(dh)[0]

    def body(s, g):
        t = _step_index(config, lay.steps - 1 - s, lay.steps)
        for ref, leaf in zip(gs_refs, jax.tree.leaves(g, is_leaf=_is_blocks)):
            _store(ref, (t, rows), leaf, w)
        reset, valid = _masks(config, mask_refs, t, rows)
        c_prev = unflat_carry([_load(r, (t, rows), w) for r in prev_refs])
        h = blocked.evaluate(functools.partial(recurrent_input, cell), w, c_prev, reset, zero)
        zh = _recurrent_product(h, weights, precision)
        zx = _load(zx_ref, (t, rows), w)
        dy = _load(dys_ref, (t, rows), w)
        dc, dzh = blocked.evaluate(step_vjp, w, rest, c_prev, zx, zh, reset, valid, zero, g, dy)
        dh = _recurrent_product_t(dzh, weights, precision)
        h_dtype = jax.tree.leaves(h)[0].dtype
        dh = jax.tree.map(lambda a: a.astype(h_dtype), dh)
        dc_in = blocked.evaluate(rec_in_vjp, w, c_prev, reset, zero, dh)
        return jax.tree.map(jnp.add, dc, dc_in)

    d_carry = jax.lax.fori_loop(0, lay.steps, body, d_final)
    for ref, leaf in zip(d_carry_refs, jax.tree.leaves(d_carry, is_leaf=_is_blocks)):
        _store(ref, (rows,), leaf, w)


def _is_blocks(a):
    return isinstance(a, Blocks)


def _call(kernel, config, out_shape, args):
    grid = (args[0].shape[1] // config.block_batch,)
    extra = {}
    if not config.interpret:
        from jax.experimental.pallas import triton as plgpu  # GPU-only; not needed to interpret

        extra["compiler_params"] = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1)
    flat = [a for a in args if a is not None]
    call = pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=config.interpret, **extra)
    return _empty_axis_safe(lambda *a: list(call(*a)), list(out_shape))(*flat)


def _empty_axis_safe(fn, out_shape):
    """``fn`` (arrays in, arrays of ``out_shape`` out), batched by ``jax.vmap`` as Pallas
    batches it, except over an empty axis: there it returns empty arrays without running
    ``fn``, because Pallas' interpreter (JAX 0.10) fails on an empty batch axis (it slices a
    block of 1 from it)."""
    guarded = jax.custom_batching.custom_vmap(fn)

    @guarded.def_vmap
    def rule(axis_size, in_batched, *args):
        batched = [True] * len(out_shape)
        if axis_size == 0:
            return [jnp.zeros((0, *s.shape), s.dtype) for s in out_shape], batched
        vmapped = jax.vmap(fn, in_axes=[0 if b else None for b in in_batched])
        shapes = [jax.ShapeDtypeStruct((axis_size, *s.shape), s.dtype) for s in out_shape]
        return _empty_axis_safe(vmapped, shapes)(*args), batched  # a vmap around this one may be empty

    return guarded


def xla_precision(precision: str) -> Any:
    """The precision of the products XLA computes outside the kernels."""
    return jax.lax.Precision.HIGHEST if precision == "highest" else jax.lax.Precision.DEFAULT


def _masks_args(resets, valid):
    # Absent masks travel as 1-element placeholders so the kernels' ref layout is fixed.
    dummy = jnp.zeros((1, 1, 1), jnp.int32)
    return [dummy if resets is None else resets, dummy if valid is None else valid]


def forward_call(cell, config, zx, w_h, rest, carry, zero, resets, valid, keep_carries):
    """The forward kernel: ``(ys, final, prevs)``, ``prevs`` the carry before each step (when
    ``keep_carries``; else ``None``)."""
    lay = _layout(w_h, rest, carry, zx.shape[0])
    carry_leaves = jax.tree.leaves(carry)
    ys_shape = jax.eval_shape(lambda: local_step(cell, rest, carry, zx[0], zx[0], None, None, zero))[1]
    steps = lay.steps
    out_shape = [jax.ShapeDtypeStruct((steps, *ys_shape.shape), ys_shape.dtype)]
    out_shape += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in carry_leaves]
    if keep_carries:
        out_shape += [jax.ShapeDtypeStruct((steps, *c.shape), c.dtype) for c in carry_leaves]
    args = [zx, w_h, *carry_leaves, *jax.tree.leaves(zero), *_masks_args(resets, valid), *jax.tree.leaves(rest)]
    kernel = functools.partial(_forward_kernel, cell, config, lay, keep_carries)
    outs = _call(kernel, config, out_shape, args)
    ys, final = outs[0], jax.tree.unflatten(lay.carry_def, outs[1 : 1 + lay.n_carry])
    prevs = jax.tree.unflatten(lay.carry_def, outs[1 + lay.n_carry :]) if keep_carries else None
    return ys, final, prevs


def backward_call(cell, config, zx, w_h, rest, prevs, zero, resets, valid, d_ys, d_final):
    """The backward kernel: ``(gs, d_carry)``, ``gs`` the cotangent of the carry after each
    step, ``d_carry`` that of the initial carry."""
    prev_leaves = jax.tree.leaves(prevs)
    lay = _layout(w_h, rest, jax.tree.map(lambda a: a[0], prevs), zx.shape[0])
    out_shape = [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in prev_leaves]
    out_shape += [jax.ShapeDtypeStruct(c.shape[1:], c.dtype) for c in prev_leaves]
    args = [zx, w_h, *prev_leaves, d_ys, *jax.tree.leaves(d_final), *jax.tree.leaves(zero)]
    args += [*_masks_args(resets, valid), *jax.tree.leaves(rest)]
    kernel = functools.partial(_backward_kernel, cell, config, lay)
    outs = _call(kernel, config, out_shape, args)
    gs = jax.tree.unflatten(lay.carry_def, outs[: lay.n_carry])
    return gs, jax.tree.unflatten(lay.carry_def, outs[lay.n_carry :])
