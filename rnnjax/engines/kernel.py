r"""The kernel engine of a dense cell (``rj.Kernel()``): the whole recurrence in one Pallas
kernel per direction, for GPUs.

For a dense cell (:class:`rnnjax.cell.DenseCell`),
:math:`(c_t, y_t) = \mathrm{update}(\theta, c_{t-1}, x_t W_x, h_{t-1} W_h)`:

- **Forward.** :math:`Z^x = X W_x` for all steps is one large product before the kernel.
  The kernel's programs each own a block of ``block_batch`` batch rows (rows are
  independent, so programs never synchronise) and loop over the ``T`` steps inside, the
  carry held on chip: per step, :math:`z^h_t = h_{t-1} W_h` (``W_h`` read from L2), the
  cell's own ``update`` traced into the kernel, the output and (when differentiating) the
  carry before the step written out.
- **Backward** (a ``jax.custom_vjp``): one reverse kernel carries the carry's cotangent
  :math:`g` back through the steps: per step it recomputes :math:`z^h_t`, takes ``update``'s
  derivative (traced into the kernel), and adds
  :math:`\mathrm{recurrent\_input}^\top(\bar z^h_t W_h^\top)`; it writes each step's
  :math:`g_t`. After it, everything is parallel over all ``T * batch`` rows:
  :math:`Z^h = H_{\mathrm{prev}} W_h`, ``update``'s derivative for all steps at once (giving
  :math:`\bar Z^x, \bar Z^h` and the small parameters' gradients), then
  :math:`\bar W_x = X^\top \bar Z^x`, :math:`\bar W_h = H_{\mathrm{prev}}^\top \bar Z^h`,
  :math:`\bar X = \bar Z^x W_x^\top`.

Inside the kernel, arrays wider than the block width (the greatest common divisor of the
products' and carries' widths) are held as column blocks (:mod:`rnnjax.engines.blocked`),
because Triton can neither slice a value nor hold an array whose size is not a power of two.
On a GPU every carry width, the block width and ``block_batch`` must be powers of two (and
``block_batch`` at least 16, Triton's smallest matrix product); under ``interpret=True`` (how
the tests run it on CPU) any shapes work.

**Derivatives.** Forward mode does not go through the ``custom_vjp``. Differentiating its
backward (second derivatives, reverse or forward over reverse) differentiates the two kernels:
each is a ``jax.custom_jvp`` whose value is the kernel's and whose tangent is that of the same
loop in ``lax.scan`` (so derivatives of any order exist; past the first they run at the
sequential loop's speed).

**Precision.** Products accumulate in float32, or in float64 for float64 operands. Interpreted,
float64 runs in float64 throughout; on a GPU it is refused (Triton's float64 products are
untested here).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cell import DenseCell
from rnnjax.checks import check_positive_int
from rnnjax.engines import kernel_programs as programs
from rnnjax.ops import matmul
from rnnjax.precision import Mixed, cast_floating
from rnnjax.sequence import TimeMajor

PRECISIONS = ("default", "highest")
WEIGHTS = ("stream", "hold")


# jax_default_matmul_precision's values that ask for full float32 products.
_FULL_FLOAT32 = ("highest", "float32")


def check_options(block_batch: Any, precision: Any, num_warps: Any, weights: Any, interpret: Any) -> None:
    """Raise ``ValueError`` naming the first bad option of ``rj.Kernel(...)``."""
    check_positive_int(block_batch, "block_batch")
    check_positive_int(num_warps, "num_warps")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
    if interpret not in (None, True, False):
        raise ValueError(f"interpret must be None, True or False, got {interpret!r}")


def resolve_precision(precision: str | None) -> str:
    """``precision``, or for ``None`` what ``jax_default_matmul_precision`` asks for (Pallas
    does not read that option itself): ``"highest"`` or ``"default"`` (TF32 on GPUs)."""
    if precision is not None:
        return precision
    configured = getattr(jax.config, "jax_default_matmul_precision", None)
    return "highest" if str(configured).lower() in _FULL_FLOAT32 else "default"


def dense_cell_of(cell: Any) -> DenseCell | None:
    """The dense cell the kernels run for ``cell`` (itself, or the one inside an
    ``rj.Mixed(..., carry_mode="keep")``), or ``None``."""
    if isinstance(cell, Mixed) and cell.carry_mode == "keep":
        cell = cell.cell
    return cell if isinstance(cell, DenseCell) and cell.fusable else None


def run(
    cell: Any,
    params: Any,
    seqs: TimeMajor,
    *,
    block_batch: int,
    precision: str | None,
    interpret: bool | None,
    num_warps: int,
    weights: str,
):
    """``(ys_tm, final, None)`` of the sequences ``seqs`` by the kernels described above, for a
    dense cell or one in ``rj.Mixed(..., carry_mode="keep")`` (:func:`dense_cell_of`).
    ``precision=None``: :func:`resolve_precision`; ``interpret=None``: where the default backend
    is not a GPU."""
    if interpret is None:
        interpret = jax.default_backend() not in ("gpu", "cuda", "rocm")
    dense = dense_cell_of(cell)
    if dense is None:
        raise ValueError(f"rj.Kernel() runs dense cells (rnnjax.cell.DenseCell); got {cell!r}")
    if dense is not cell:  # rj.Mixed: 16-bit compute, its own output dtype
        ys, final, info = run(
            dense,
            cast_floating(params, cell.compute_dtype),
            seqs,
            block_batch=block_batch,
            precision=precision,
            interpret=interpret,
            num_warps=num_warps,
            weights=weights,
        )
        return ys.astype(cell.output_dtype or cell.compute_dtype), final, info
    precision = resolve_precision(precision)
    cell.check_params(params)
    if not interpret:
        wide = [name for name, a in (("params", params), ("xs", seqs.xs), ("carry", seqs.carry)) if _has_float64(a)]
        if wide:
            raise ValueError(
                f"rj.Kernel() on a GPU runs float32 and 16-bit arrays; {', '.join(wide)} hold float64. "
                "Use interpret=True (float64 throughout, slow), rj.Sequential(), or float32"
            )
    batch = seqs.batch_shape
    rows = math.prod(batch)
    padded = -(-max(rows, 1) // block_batch) * block_batch
    steps = seqs.steps

    def flat(a, lead):  # (*lead, *batch, n) -> (*lead, padded, n), zero rows appended
        a = a.reshape(*lead, rows, *a.shape[len(lead) + len(batch) :])
        pad = [(0, 0)] * a.ndim
        pad[len(lead)] = (0, padded - rows)
        return jnp.pad(a, pad)

    config = programs.Config(
        block_batch,
        precision,
        interpret,
        num_warps,
        weights,
        seqs.backwards,
        seqs.resets is not None,
        seqs.valid is not None,
    )
    # (T, rows, 1) int32: Triton loads no booleans, and a column broadcasts against the carry
    # inside blocked.evaluate, where a (rows,) vector wider than the block width would be split.
    masks = [None if m is None else flat(m.astype(jnp.int32)[..., None], (steps,)) for m in (seqs.resets, seqs.valid)]
    carry = jax.tree.map(lambda a: flat(a, ()), seqs.carry)
    zero = jax.tree.map(lambda a: flat(a, ()), seqs.zero)
    ys, final = _kernel_scan(cell, config, params, carry, flat(seqs.xs, (steps,)), *masks, zero)
    ys = ys[:, :rows].reshape(steps, *batch, ys.shape[-1])
    final = jax.tree.map(lambda a: a[:rows].reshape(*batch, a.shape[-1]), final)
    return ys, final, None


def _has_float64(tree) -> bool:
    return any(jnp.dtype(a.dtype) == jnp.float64 for a in jax.tree.leaves(tree))


# ---- the kernels' own derivatives (see "Derivatives" above) ---------------------------------


def _bools(resets, valid):
    return [None if m is None else m != 0 for m in (resets, valid)]


def _recurrent_product_xla(cell, config, c, w_h, reset, zero):
    h = programs.recurrent_input(cell, c, reset, zero)
    zh = matmul(h, w_h, programs.xla_precision(config.precision))
    return zh.astype(jnp.promote_types(zh.dtype, jnp.float32))  # as the kernel accumulates


def _forward_reference(cell, config, zx, w_h, rest, carry, zero, resets, valid):
    def step(c, inputs):
        zx_t, reset, ok = inputs
        zh = _recurrent_product_xla(cell, config, c, w_h, reset, zero)
        new, y = programs.local_step(cell, rest, c, zx_t, zh, reset, ok, zero)
        return new, (y, c)

    final, (ys, prevs) = jax.lax.scan(step, carry, (zx, *_bools(resets, valid)), reverse=config.backwards)
    return ys, final, prevs


def _backward_reference(cell, config, zx, w_h, rest, prevs, zero, resets, valid, d_ys, d_final):
    def step(g, inputs):
        zx_t, c_prev, dy, reset, ok = inputs

        def local(c):
            zh = _recurrent_product_xla(cell, config, c, w_h, reset, zero)
            return programs.local_step(cell, rest, c, zx_t, zh, reset, ok, zero)

        _, vjp = jax.vjp(local, c_prev)
        return vjp((g, dy))[0], g

    inputs = (zx, prevs, d_ys, *_bools(resets, valid))
    d_carry, gs = jax.lax.scan(step, d_final, inputs, reverse=not config.backwards)
    return gs, d_carry


def _cast_like(tree, like):
    return jax.tree.map(lambda a, b: a.astype(b.dtype), tree, like)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _forward_pass(cell, config, zx, w_h, rest, carry, zero, resets, valid):
    return programs.forward_call(cell, config, zx, w_h, rest, carry, zero, resets, valid, keep_carries=True)


@_forward_pass.defjvp
def _forward_pass_jvp(cell, config, primals, tangents):
    out = _forward_pass(cell, config, *primals)
    _, d_out = jax.jvp(functools.partial(_forward_reference, cell, config), primals, tangents)
    return out, _cast_like(d_out, out)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _backward_pass(cell, config, zx, w_h, rest, prevs, zero, resets, valid, d_ys, d_final):
    return programs.backward_call(cell, config, zx, w_h, rest, prevs, zero, resets, valid, d_ys, d_final)


@_backward_pass.defjvp
def _backward_pass_jvp(cell, config, primals, tangents):
    out = _backward_pass(cell, config, *primals)
    _, d_out = jax.jvp(functools.partial(_backward_reference, cell, config), primals, tangents)
    return out, _cast_like(d_out, out)


# ---- the sequence's gradient -----------------------------------------------------------------


def _rest(params):
    return params._replace(w_x=None, w_h=None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kernel_scan(cell, config, params, carry, xs, resets, valid, zero):
    zx = matmul(xs, params.w_x, programs.xla_precision(config.precision))
    ys, final, _ = programs.forward_call(
        cell, config, zx, params.w_h, _rest(params), carry, zero, resets, valid, keep_carries=False
    )
    return ys, final


def _kernel_scan_fwd(cell, config, params, carry, xs, resets, valid, zero):
    zx = matmul(xs, params.w_x, programs.xla_precision(config.precision))
    ys, final, prevs = _forward_pass(cell, config, zx, params.w_h, _rest(params), carry, zero, resets, valid)
    return (ys, final), (params, carry, xs, resets, valid, zero, zx, prevs)


def _kernel_scan_bwd(cell, config, res, cts):
    params, carry, xs, resets, valid, zero, zx, c_prevs = res
    d_ys, d_final = cts
    rest = _rest(params)
    d_final = _cast_like(d_final, carry)
    gs, d_carry = _backward_pass(cell, config, zx, params.w_h, rest, c_prevs, zero, resets, valid, d_ys, d_final)

    # Everything else in parallel over all steps and rows: (T, rows) act as batch axes.
    precision = programs.xla_precision(config.precision)
    reset_b, valid_b = _bools(resets, valid)
    h_prevs = programs.recurrent_input(cell, c_prevs, reset_b, zero)
    zh, vjp_h = jax.vjp(lambda w_h: matmul(h_prevs, w_h, precision), params.w_h)
    _, vjp_local = jax.vjp(
        lambda r, a, b: programs.local_step(cell, r, c_prevs, a, b, reset_b, valid_b, zero), rest, zx, zh
    )
    d_rest, dzx, dzh = vjp_local((gs, d_ys))
    # The products' own derivatives (autodiff's, so 16-bit weights round as the forward did).
    _, vjp_x = jax.vjp(lambda x, w_x: matmul(x, w_x, precision), xs, params.w_x)
    d_xs, d_w_x = vjp_x(dzx)
    (d_w_h,) = vjp_h(dzh)
    d_params = d_rest._replace(w_x=d_w_x, w_h=d_w_h)
    return d_params, d_carry, d_xs, None, None, None


_kernel_scan.defvjp(_kernel_scan_fwd, _kernel_scan_bwd)
