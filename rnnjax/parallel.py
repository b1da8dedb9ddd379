r"""Parallel-in-time drivers: the whole sequence at once, in O(log T) depth.

:func:`rnnjax.scan` dispatches here for every ``method`` but ``"sequential"``:

- ``"associative"``: cells with a linear recurrence :math:`h_t = a_t \odot h_{t-1} + b_t`
  (:class:`rnnjax.LinearCell`: MinGRU, MinLSTM, LRU, or your own) by
  ``jax.lax.associative_scan`` over :math:`(a_t, b_t)` pairs. MinGRU and MinLSTM with
  ``candidate="g"`` run in log space (:func:`linear_scan`).
- ``"chunked"``: the same recurrence, sequential within chunks of ``chunk_size`` steps
  (all chunks at once) and associative across the chunks' summaries.
- ``"newton"``: any cell, by Newton iterations over all states at once (DEER, quasi-DEER,
  ELK; :func:`newton_scan`), falling back to a sequential scan when they do not converge.
- ``"auto"``: one of the above per backend, cell kind and ``T`` (:func:`choose_method`).

All of them give :func:`rnnjax.scan`'s outputs and final carry, with the same meaning of
``lengths``, ``resets`` and ``reverse``, within float rounding: in float32, outputs
within ``1e-5`` (linear methods, moderate ``T``) or within ``tol`` (Newton, for
contractive cells) of the sequential driver's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.cell import Cell, LinearCell, PyTree, carry_batch_shape
from rnnjax.scan import _check_lengths, _check_resets, _check_xs, _scan, flip_valid, resolve_unroll

Array = jax.Array

__all__ = [
    "METHODS",
    "NEWTON_VARIANTS",
    "NewtonInfo",
    "newton_scan",
    "linear_scan",
    "choose_method",
    "cell_kind",
    "default_chunk_size",
    "check_options",
]

METHODS = ("sequential", "associative", "chunked", "newton", "auto")
NEWTON_VARIANTS = ("deer", "quasi-deer", "elk", "quasi-elk")
DEFAULT_NEWTON = "quasi-deer"
DEFAULT_MAX_ITERS = 50
DEFAULT_DAMPING = 1.0
# Convergence threshold on max |s_t - f(s_{t-1}, x_t)| when tol=None, by the state's dtype:
# well above where float32 rounding leaves the residual of a bounded state (2e-7 for a
# GRU over T=4096 after DEER converged), well below the accuracy models need.
DEFAULT_TOL = {2: 2e-2, 4: 1e-5, 8: 1e-10}  # itemsize -> tol (2: bfloat16, float16)

# Which method "auto" runs, per backend and cell kind: ``(min_T, method)`` rows sorted by
# min_T; the last row with min_T <= T wins. "chunk_size" is what "chunked" uses when the
# call gives none ("sqrt": the power of two nearest sqrt(T), clipped to [16, 1024]).
#
# cpu: measured 2026-11-27 on a 2-core x86_64 CPU (jax 0.10.2), batch 8, hidden 64, by
#   .venv/bin/python benchmarks/parallel_sweep.py --preset cpu-auto --out benchmarks/results/cpu_auto
#   .venv/bin/python benchmarks/parallel_sweep.py --auto-table benchmarks/results/cpu_auto.json
# (results in benchmarks/results/cpu_auto.md). The sequential loop was fastest at every T from
# 256 to 65536 for minGRU, LRU and a GRU(16), forward and forward+backward, by 2-7x at long T,
# except two forward+backward points at T=256 where "chunked" led by 7% (minGRU) and 17% (LRU);
# re-measured with 11 repeats the sequential loop led there too (2.31 vs 3.20 ms, 5.22 vs
# 5.36 ms). A CPU runs one step at a time fast; the parallel forms do O(log T) more work.
# gpu: measured 2026-11-27 on one NVIDIA H200 (jax 0.11.2), batch 16, hidden 64, by
#   bash benchmarks/gpu_session.sh   (benchmarks/gpu_parallel.sh with --budget-s 160)
# (results in benchmarks/results/gpu_parallel_20261127T063310Z.md). Linear cells: "associative"
# was fastest at every measured T (1024, 4096, 16384), forward+backward 67x / 135x / 177x the
# sequential loop for minGRU and 91x / 126x / 282x for LRU; chunked was 13-166x. Below T=1024
# nothing was measured; a parallel scan of depth log T has no reason to lose there on a GPU,
# so the row starts at 0. Nonlinear (GRU, hidden 16): quasi-DEER's forward+backward was
# 1.00x / 1.10x / 1.14x the sequential loop and its forward 0.5-0.65x; DEER's
# forward+backward 1.23x / 1.56x (T=1024/4096) and forward 0.37-0.46x; and the sequential
# loop measured there ran without the GPU unroll (rj.scan's default since) that made it
# 2-3x faster. So "auto" keeps nonlinear cells sequential on GPUs. The sweep's own
# suggestion (--auto-table) flipped between sequential and newton on those near-ties.
# tpu: not measured; the GPU rows stand in.
_AUTO_TABLE: dict[str, dict[str, Any]] = {
    "cpu": {
        "log_linear": ((0, "sequential"),),
        "linear": ((0, "sequential"),),
        "nonlinear": ((0, "sequential"),),
        "chunk_size": "sqrt",
    },
    "gpu": {
        "log_linear": ((0, "associative"),),
        "linear": ((0, "associative"),),
        "nonlinear": ((0, "sequential"),),
        "chunk_size": "sqrt",
    },
}
_AUTO_TABLE["tpu"] = _AUTO_TABLE["gpu"]


class NewtonInfo(NamedTuple):
    r"""What a Newton solve did (scalars over the whole batch).

    Attributes:
      iterations: ``()`` int32, Newton steps taken (each one parallel linear solve).
      converged: ``()`` bool, whether ``residual <= tol`` within ``max_iters`` steps.
        ``False`` means the returned values are the sequential driver's (the fallback).
      residual: ``()`` float, :math:`\max_{t,i} |s_{t,i} - f(s_{t-1}, x_t)_i|` at the last
        iterate, over the real-valued flattened carry (complex parts count separately).
    """

    iterations: Array
    converged: Array
    residual: Array


# ---- options, checked the same way for every entry point ----------------------------------


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def check_options(
    cell: Cell,
    method: str,
    *,
    chunk_size: int | None = None,
    tol: float | None = None,
    max_iters: int | None = None,
    newton: str | None = None,
    damping: float | None = None,
) -> None:
    """Raise ``ValueError`` for an unknown ``method``, a linear method asked of a cell with
    no linear form, an option the method does not use, or an option out of range.

    Example:
      >>> import rnnjax as rj
      >>> rj.parallel.check_options(rj.MinGRU(4), "chunked", chunk_size=64)
      >>> rj.parallel.check_options(rj.GRU(4), "associative")
      Traceback (most recent call last):
        ...
      ValueError: method='associative' needs a cell with a linear recurrence (an rj.LinearCell such as MinGRU, MinLSTM, LRU); GRU is not; use method='newton' or 'sequential'
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    if method in ("associative", "chunked") and not isinstance(cell, LinearCell):
        raise ValueError(
            f"method={method!r} needs a cell with a linear recurrence (an rj.LinearCell such as "
            f"MinGRU, MinLSTM, LRU); {type(cell).__name__} is not; use method='newton' or 'sequential'"
        )

    def applies(name: str, methods: tuple[str, ...]) -> None:
        if method not in methods + ("auto",):
            wanted = " or ".join(repr(m) for m in methods)
            raise ValueError(f"{name} applies to method={wanted} (or 'auto'); got method={method!r}")

    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        applies("chunk_size", ("chunked",))
    if tol is not None:
        if not _is_number(tol) or not math.isfinite(tol) or tol <= 0:
            raise ValueError(f"tol must be a positive finite number, got {tol!r}")
        applies("tol", ("newton",))
    if max_iters is not None:
        if isinstance(max_iters, bool) or not isinstance(max_iters, (int, np.integer)) or max_iters < 1:
            raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
        applies("max_iters", ("newton",))
    if newton is not None:
        if not isinstance(newton, str) or newton not in NEWTON_VARIANTS:
            raise ValueError(f"unknown newton variant {newton!r}; expected one of {list(NEWTON_VARIANTS)}")
        applies("newton", ("newton",))
    if damping is not None:
        if not _is_number(damping) or not math.isfinite(damping) or damping <= 0:
            raise ValueError(f"damping must be a positive finite number, got {damping!r}")
        if newton not in ("elk", "quasi-elk"):
            raise ValueError(f"damping applies to newton='elk' or 'quasi-elk'; got newton={newton!r}")


# ---- "auto" --------------------------------------------------------------------------------


def _backend_key(backend: str | None) -> str:
    backend = backend or jax.default_backend()
    if backend in _AUTO_TABLE:
        return backend
    return "cpu" if backend == "cpu" else "gpu"  # cuda, rocm, metal, ...: accelerator rows


def cell_kind(cell: Cell) -> str:
    """``"log_linear"`` (a LinearCell evaluated in log space), ``"linear"`` (another
    LinearCell) or ``"nonlinear"``: the rows of the "auto" table a cell uses."""
    if not isinstance(cell, LinearCell):
        return "nonlinear"
    return "log_linear" if _uses_log_space(cell) else "linear"


def choose_method(cell: Cell, steps: int, backend: str | None = None) -> str:
    """The method ``"auto"`` runs for ``cell`` over ``steps`` time steps on ``backend``
    (``jax.default_backend()`` when ``None``), from measurements kept in this module.

    On CPU a sequential loop is hard to beat, and "auto" mostly runs ``"sequential"``.

    Example:
      >>> import rnnjax as rj
      >>> rj.parallel.choose_method(rj.GRU(8), 1024, backend="cpu")
      'sequential'
      >>> rj.parallel.choose_method(rj.MinGRU(8), 4096, backend="gpu")
      'associative'
    """
    rows = _AUTO_TABLE[_backend_key(backend)][cell_kind(cell)]
    method = rows[0][1]
    for min_steps, name in rows:
        if steps >= min_steps:
            method = name
    return method


def default_chunk_size(steps: int, backend: str | None = None) -> int:
    """The ``chunk_size`` method ``"chunked"`` uses when given none, per backend.

    Example:
      >>> import rnnjax as rj
      >>> rj.parallel.default_chunk_size(4096, backend="cpu") in (64, 128)
      True
    """
    rule = _AUTO_TABLE[_backend_key(backend)]["chunk_size"]
    if rule == "sqrt":
        return int(min(1024, max(16, 2 ** round(math.log2(max(steps, 1)) / 2))))
    return int(rule)


# ---- time order: lengths, resets and reverse as masks in the order steps are processed ----


def _time_order(steps: int, lengths: Array | None, resets_tm: Array | None, reverse: bool):
    """Return ``(valid, resets, flip)``: ``valid`` (T, *batch) is ``t < length`` (the same in
    both orders, ``None`` without lengths), ``resets`` the resets in processing order (a reset
    at position t: zeros replace the carry before the t-th processed step), and ``flip`` the
    involution between original and processing order of a time-major array."""
    valid = None
    if lengths is not None:
        lengths = jnp.clip(lengths, 0, steps)
        time = jnp.arange(steps).reshape((steps,) + (1,) * lengths.ndim)
        valid = time < lengths
    if reverse and resets_tm is not None:
        # As in the sequential driver: the backward pass starts afresh after step t.
        resets_tm = jnp.concatenate([resets_tm[1:], jnp.zeros_like(resets_tm[:1])], axis=0)
        if lengths is not None:
            resets_tm = resets_tm & (time + 1 < lengths)
    if not reverse:
        flip = lambda x: x
    elif lengths is None:
        flip = lambda x: jnp.flip(x, axis=0)
    else:
        flip = lambda x: flip_valid(x, lengths)
    if resets_tm is not None:
        resets_tm = flip(resets_tm)
    return valid, resets_tm, flip


def _compute_dtype(xs: Array, params: PyTree) -> jnp.dtype:
    leaves = [p for p in jax.tree_util.tree_leaves(params) if jnp.issubdtype(p.dtype, jnp.inexact)]
    return jnp.result_type(xs.dtype, *leaves)


def _expand(mask: Array, leaf: Array) -> Array:
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - mask.ndim))


# ---- affine recurrences s_t = A_t s_{t-1} + c_t as monoids ------------------------------------
#
# An element (A, c) is the map s -> A s + c. ``combine(earlier, later)`` composes two maps;
# ``apply`` runs a composed map on a state. Three algebras: elementwise (diagonal A, real
# or complex), full matrices (A of shape (..., n, n)), and log space for positive
# diagonal recurrences, where (log A, log c) stands for s -> exp(log A) s + exp(log c).


class _Monoid(NamedTuple):
    combine: Callable[[Any, Any], Any]
    identity: Callable[[Any], Any]  # an element shaped like the argument, the identity map
    apply: Callable[[Any, Array], Array]


def _diag_combine(e1, e2):
    a1, b1 = e1
    a2, b2 = e2
    return a1 * a2, a2 * b1 + b2


def _mv(m: Array, v: Array) -> Array:
    return jnp.einsum("...ij,...j->...i", m, v)


def _full_combine(e1, e2):
    a1, b1 = e1
    a2, b2 = e2
    return a2 @ a1, _mv(a2, b1) + b2


def _log_combine(e1, e2):
    la1, lb1 = e1
    la2, lb2 = e2
    return la1 + la2, jnp.logaddexp(la2 + lb1, lb2)


DIAG = _Monoid(
    _diag_combine,
    lambda e: (jnp.ones_like(e[0]), jnp.zeros_like(e[1])),
    lambda e, h: e[0] * h + e[1],
)
FULL = _Monoid(
    _full_combine,
    lambda e: (jnp.broadcast_to(jnp.eye(e[0].shape[-1], dtype=e[0].dtype), e[0].shape), jnp.zeros_like(e[1])),
    lambda e, h: _mv(e[0], h) + e[1],
)


def _log_monoid(neg: float) -> _Monoid:
    # ``neg`` stands for log 0: finite, so that logaddexp's derivative gives exactly zero
    # weight to terms a reset or a frozen step removed (with -inf it gives them weight).
    return _Monoid(
        _log_combine,
        lambda e: (jnp.zeros_like(e[0]), jnp.full_like(e[1], neg)),
        lambda e, h: jnp.exp(e[0]) * h + jnp.exp(e[1]),
    )


def _solve_affine(monoid: _Monoid, elems: Any, h0: Array, chunk_size: int | None = None, time_sharding=None) -> Array:
    """All states ``s_t`` (time axis 0) of the recurrence ``elems`` started from ``h0``.

    ``chunk_size=None``: one associative scan over T. Otherwise chunks of ``chunk_size``
    steps: a sequential scan over the C positions of all chunks at once gives each chunk's
    local prefix maps, an associative scan over the chunks' total maps gives each chunk's
    starting state, and one elementwise pass applies the local maps to those starts.
    ``time_sharding`` (a :class:`rnnjax.distributed.SequenceSharding`): the same with one
    chunk per device.
    """
    if time_sharding is not None:
        return time_sharding.solve(monoid, elems, h0)
    steps = jax.tree_util.tree_leaves(elems)[0].shape[0]
    if chunk_size is None or chunk_size >= steps:
        if chunk_size is not None:  # one chunk: a plain sequential scan
            return _sequential_affine(monoid, elems, h0)
        prefix = jax.lax.associative_scan(monoid.combine, elems)
        return monoid.apply(prefix, h0)
    size = chunk_size
    chunks = -(-steps // size)
    pad = chunks * size - steps
    if pad:
        # Identity maps past the end leave the state as it is; the padding is cut off below.
        ident = monoid.identity(jax.tree.map(lambda e: jnp.broadcast_to(e[:1], (pad,) + e.shape[1:]), elems))
        elems = jax.tree.map(lambda e, i: jnp.concatenate([e, i], axis=0), elems, ident)
    # (chunks * C, ...) -> (C, chunks, ...): the sequential scan runs over positions in a chunk.
    elems = jax.tree.map(lambda e: jnp.swapaxes(e.reshape((chunks, size) + e.shape[1:]), 0, 1), elems)

    def body(acc, e):
        acc = monoid.combine(acc, e)
        return acc, acc

    start = monoid.identity(jax.tree.map(lambda e: e[0], elems))
    totals, local = jax.lax.scan(body, start, elems)
    across = jax.lax.associative_scan(monoid.combine, totals)  # (chunks, ...) inclusive
    starts = jnp.concatenate([h0[None], monoid.apply(jax.tree.map(lambda e: e[:-1], across), h0)], axis=0)
    states = monoid.apply(local, starts[None])  # (C, chunks, ...)
    states = jnp.swapaxes(states, 0, 1).reshape((chunks * size,) + states.shape[2:])
    return states[:steps]


def _sequential_affine(monoid: _Monoid, elems: Any, h0: Array) -> Array:
    def body(h, e):
        h = monoid.apply(e, h)
        return h, h

    return jax.lax.scan(body, h0, elems)[1]


# ---- linear cells: "associative" and "chunked" ------------------------------------------------


def _uses_log_space(cell: LinearCell) -> bool:
    """Whether ``cell`` has a log-space form (MinGRU and MinLSTM with ``candidate="g"``)."""
    log_coefficients = getattr(cell, "log_coefficients", None)
    if log_coefficients is None:
        return False
    try:
        check = getattr(cell, "_check_log_space", None)
        if check is not None:
            check()
    except ValueError:
        return False
    return True


def linear_scan(
    cell: LinearCell,
    params: Any,
    xs: Array,
    carry: Array | None = None,
    *,
    lengths: Array | None = None,
    resets: Array | None = None,
    reverse: bool = False,
    chunk_size: int | None = None,
) -> tuple[Array, Array]:
    r"""Run a :class:`rnnjax.LinearCell` over time in parallel; :func:`rnnjax.scan` with
    ``method="associative"`` (``chunk_size=None``) or ``"chunked"`` calls this.

    With :math:`(a_t, b_t) =` ``cell.coefficients(params, x_t)``, the states
    :math:`h_t = a_t \odot h_{t-1} + b_t` are the prefix compositions of the maps
    :math:`h \mapsto a_t h + b_t` (``jax.lax.associative_scan``). A step past a length is
    the identity map :math:`(1, 0)`; a reset before step :math:`t` sets :math:`a_t = 0`.
    Cells with ``log_coefficients`` (MinGRU, MinLSTM with ``candidate="g"``) compose
    :math:`(\log a, \log b)` with :math:`\log b_{12} = \mathrm{logaddexp}(\log a_2 +
    \log b_1, \log b_2)`, which keeps decays near 1 exact where :math:`1 - z` rounds to 1.
    The scan runs in at least float32. Gradients are autodiff through the same scans
    (parallel too: no sequential loop in the backward pass of ``"associative"``).

    Args:
      cell, params, xs, carry, lengths, resets, reverse: as :func:`rnnjax.scan`.
      chunk_size: ``None`` for one associative scan over T; else ``C``: sequential over the
        C positions of all chunks at once, associative across the ``ceil(T / C)`` chunks.

    Returns:
      ``(ys, final_carry)`` as :func:`rnnjax.scan`; float32 values within about ``1e-5``
      of the sequential driver's for ``T`` up to a few thousand (rounding differs: the
      order of the products differs).

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.MinGRU(hidden_size=8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jax.random.normal(jax.random.key(1), (2, 50, 3))
      >>> ys, h = rj.parallel.linear_scan(cell, params, xs, lengths=jnp.array([50, 20]))
      >>> ys_ref, h_ref = rj.scan(cell, params, xs, lengths=jnp.array([50, 20]))
      >>> bool(jnp.allclose(ys, ys_ref, atol=1e-5)), bool(jnp.allclose(h, h_ref, atol=1e-5))
      (True, True)
    """
    xs, carry, lengths, resets = _validate(cell, params, xs, carry, lengths, resets)
    check_options(cell, "chunked" if chunk_size is not None else "associative", chunk_size=chunk_size)
    if xs.shape[-2] == 0:  # nothing to scan in parallel
        return _scan(cell, params, xs, carry, lengths, resets, reverse=bool(reverse), unroll=1, remat="none")
    return _linear_jit(
        cell, params, xs, carry, lengths, resets,
        reverse=bool(reverse), chunk_size=None if chunk_size is None else int(chunk_size),
    )


def _validate(cell, params, xs, carry, lengths, resets):
    """rj.scan's checks, so every method rejects bad input with the same message."""
    xs = _check_xs(cell, params, xs)
    k = cell.input_ndim
    batch_shape = xs.shape[: -(k + 1)]
    steps = xs.shape[-(k + 1)]
    if carry is not None:
        cell.check_carry(carry, jax.ShapeDtypeStruct((*batch_shape, *xs.shape[-k:]), xs.dtype))
    if lengths is not None:
        lengths = _check_lengths(lengths, batch_shape, steps)
    if resets is not None:
        resets = _check_resets(resets, batch_shape, steps)
    return xs, carry, lengths, resets


def _output_dtype(cell, params, xs_tm, carry):
    """The dtype of ``y`` the sequential driver produces."""
    return jax.eval_shape(lambda c, x: cell.step(params, c, x)[1], carry, xs_tm[0]).dtype


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("reverse", "chunk_size", "time_sharding"))
def _linear_jit(cell, params, xs, carry, lengths, resets, *, reverse, chunk_size, time_sharding=None):
    steps = xs.shape[-2]
    xs_tm = jnp.moveaxis(xs, -2, 0)  # (T, *batch, D)
    batch_shape = xs_tm.shape[1:-1]
    dtype = _compute_dtype(xs, params)
    if carry is None:
        carry = cell.init_carry(batch_shape, dtype)
    y_dtype = _output_dtype(cell, params, xs_tm, carry)
    resets_tm = None if resets is None else jnp.moveaxis(resets, -1, 0)
    valid, resets_p, flip = _time_order(steps, lengths, resets_tm, reverse)
    x_p = flip(xs_tm)
    if time_sharding is not None:
        x_p = time_sharding.constrain(x_p)
    if _uses_log_space(cell):
        la, lb = cell.log_coefficients(params, x_p)
        real = jnp.promote_types(jnp.result_type(la, lb), jnp.float32)
        la, lb = (c.astype(real) for c in jnp.broadcast_arrays(la, lb))
        # log 0, small enough that T of them still sum to a finite number.
        neg = float(jnp.finfo(real).min) / (2 * steps)
        if resets_p is not None:
            la = jnp.where(_expand(resets_p, la), neg, la)
        if valid is not None:
            la = jnp.where(_expand(valid, la), la, 0.0)
            lb = jnp.where(_expand(valid, lb), lb, neg)
        monoid, elems = _log_monoid(neg), (la, lb)
        h0 = carry.astype(real)
    else:
        a, b = cell.coefficients(params, x_p)
        work = jnp.promote_types(jnp.result_type(a, b, carry), jnp.float32)
        # A user's cell may return an ``a`` shared by all steps, e.g. (N,): the scan needs T.
        a, b = (c.astype(work) for c in jnp.broadcast_arrays(a, b))
        if resets_p is not None:
            a = jnp.where(_expand(resets_p, a), jnp.zeros((), work), a)
        if valid is not None:
            a = jnp.where(_expand(valid, a), a, jnp.ones((), work))
            b = jnp.where(_expand(valid, b), b, jnp.zeros((), work))
        monoid, elems = DIAG, (a, b)
        h0 = carry.astype(work)
    hs_p = _solve_affine(monoid, elems, h0, chunk_size, time_sharding)  # (T, *batch, N), processing order
    final = hs_p[-1].astype(carry.dtype)
    hs = flip(hs_p)
    ys = cell.readout(params, hs, xs_tm).astype(y_dtype)
    if valid is not None:
        ys = jnp.where(_expand(valid, ys), ys, jnp.zeros((), ys.dtype))
    return jnp.moveaxis(ys, 0, -2), final


# ---- Newton: DEER, quasi-DEER, ELK -----------------------------------------------------------


class _Layout:
    """One sequence's carry pytree <-> one real vector of ``n`` numbers (complex leaves as
    real parts then imaginary parts)."""

    def __init__(self, template: PyTree):
        leaves, self.treedef = jax.tree_util.tree_flatten(template)
        self.shapes = [tuple(leaf.shape) for leaf in leaves]
        self.dtypes = [jnp.dtype(leaf.dtype) for leaf in leaves]
        self.complex = [jnp.issubdtype(d, jnp.complexfloating) for d in self.dtypes]
        reals = [jnp.finfo(d).dtype for d in self.dtypes]
        self.real = jnp.result_type(*reals) if reals else jnp.float32
        self.sizes = [math.prod(s) * (2 if c else 1) for s, c in zip(self.shapes, self.complex)]
        self.n = sum(self.sizes)

    def flatten(self, carry: PyTree) -> Array:
        parts = []
        for leaf, dtype, is_complex in zip(jax.tree_util.tree_leaves(carry), self.dtypes, self.complex):
            leaf = jnp.asarray(leaf).astype(dtype).reshape(-1)
            if is_complex:
                parts += [jnp.real(leaf), jnp.imag(leaf)]
            else:
                parts.append(leaf)
        return jnp.concatenate([p.astype(self.real) for p in parts])

    def unflatten(self, vector: Array) -> PyTree:
        leaves, start = [], 0
        for shape, dtype, is_complex, size in zip(self.shapes, self.dtypes, self.complex, self.sizes):
            part = vector[start : start + size]
            start += size
            if is_complex:
                half = size // 2
                leaf = jax.lax.complex(part[:half], part[half:]).astype(dtype)
            else:
                leaf = part.astype(dtype)
            leaves.append(leaf.reshape(shape))
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def newton_scan(
    cell: Cell,
    params: Any,
    xs: Array,
    carry: PyTree | None = None,
    *,
    lengths: Array | None = None,
    resets: Array | None = None,
    reverse: bool = False,
    newton: str | None = None,
    tol: float | None = None,
    max_iters: int | None = None,
    damping: float | None = None,
    unroll: int | bool | str = "auto",
) -> tuple[Array, PyTree, NewtonInfo]:
    r"""Run any cell over time by Newton's method on all states at once; return
    ``(ys, final_carry, info)``. :func:`rnnjax.scan` with ``method="newton"`` calls this
    and drops ``info``.

    The states :math:`s_{1..T}` (each carry flattened to a real vector of size ``n``) are
    the fixed point of :math:`s_t = f(s_{t-1}, x_t)`, :math:`s_0` the initial carry. From
    :math:`s^{(0)} = 0`, each iteration linearises every step around the current guess,
    :math:`J_t = \partial f / \partial s\,(s^{(k)}_{t-1}, x_t)`, and solves the linear
    recurrence

    .. math::

        s_t = J_t s_{t-1} + f(s^{(k)}_{t-1}, x_t) - J_t s^{(k)}_{t-1}

    with an associative scan (Lim et al. 2023, DEER). Variants (``newton``):

    - ``"deer"``: full ``n x n`` Jacobians, quadratic convergence; memory ``T n^2`` and
      ``n^3`` work per combine, for small ``n``.
    - ``"quasi-deer"`` (default): only the diagonal of :math:`J_t`; elementwise scans,
      linear convergence (Gonzalez et al. 2024).
    - ``"elk"``, ``"quasi-elk"``: Levenberg-Marquardt steps (Gonzalez et al. 2024, ELK):
      the candidate minimises :math:`\sum_t \|s_t - J_t s_{t-1} - u_t\|^2 + \lambda
      \sum_t \|s_t - s^{(k)}_t\|^2` (:math:`u_t` the constant terms above), computed as ELK
      does by a parallel Kalman filter and smoother (Sarkka and Garcia-Fernandez 2021) with
      unit process noise and observations :math:`s^{(k)}_t` of variance :math:`1/\lambda`.
      :math:`\lambda` starts at ``damping`` and adapts as a trust region: a candidate that
      lowers :math:`\sum_t \|s_t - f(s_{t-1}, x_t)\|^2` is taken and :math:`\lambda` divided
      by 10; otherwise the guess stays and :math:`\lambda` is multiplied by 10 (rejected
      candidates count as iterations). :math:`\lambda \to 0` is DEER.

    Lengths, resets and reverse enter the step function (a frozen step is :math:`s_t =
    s_{t-1}`, a reset replaces :math:`s_{t-1}` by zeros), so they mean what they mean in
    :func:`rnnjax.scan`. The iteration stops when :math:`\max_{t,i}|s^{(k)}_{t,i} -
    f(s^{(k)}_{t-1}, x_t)_i| \le` ``tol`` (absolute, over the whole batch) and returns
    :math:`f(s^{(k)}_{t-1}, x_t)`; if that does not happen within ``max_iters`` steps (or
    the iterate is not finite), the result comes from a sequential scan instead, never a
    non-converged iterate (``info.converged`` is then ``False``). ``jax.lax.cond`` picks
    the branch, so only one runs, except under ``jax.vmap`` of this function, where both do.

    Gradients come from the implicit function theorem at the solution, not from the
    iterations: the adjoint :math:`\lambda_t = \bar s_t + J_{t+1}^\top \lambda_{t+1}` is a
    reverse linear recurrence, solved by a reverse associative scan with full Jacobians
    (``"deer"``, ``"elk"``) or by quasi-Newton iterations with their diagonals
    (``"quasi-deer"``, ``"quasi-elk"``; same ``tol`` relative to ``1 + max|lambda|``, same
    ``max_iters``, sequential fallback), then one vector-Jacobian product of the step over
    all ``t`` gives the parameter and input gradients.

    Args:
      cell, params, xs, carry, lengths, resets, reverse: as :func:`rnnjax.scan`.
      newton: ``"deer"``, ``"quasi-deer"`` (``None``), ``"elk"`` or ``"quasi-elk"``.
      tol: positive; ``None``: ``1e-5`` for float32 states, ``1e-10`` for float64.
      max_iters: positive int, Newton steps before falling back; ``None``: 50.
      damping: ELK's initial :math:`\lambda > 0`, only for ``"elk"``/``"quasi-elk"``;
        ``None``: 1.
      unroll: unroll of the sequential fallback's loop (``"auto"``: as :func:`rnnjax.scan`).

    Returns:
      ``ys``, ``final_carry`` as :func:`rnnjax.scan` (float32: within about ``tol /
      (1 - rho)`` of the sequential values for a cell contracting at rate ``rho``; exactly
      the sequential driver's arithmetic when it fell back) and a :class:`NewtonInfo`.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.GRU(hidden_size=4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jax.random.normal(jax.random.key(1), (2, 40, 3))
      >>> ys, h, info = rj.parallel.newton_scan(cell, params, xs, newton="deer")
      >>> bool(info.converged), bool(jnp.allclose(ys, rj.scan(cell, params, xs)[0], atol=1e-5))
      (True, True)
    """
    xs, carry, lengths, resets = _validate(cell, params, xs, carry, lengths, resets)
    check_options(cell, "newton", tol=tol, max_iters=max_iters, newton=newton, damping=damping)
    unroll = resolve_unroll(unroll)
    variant = newton or DEFAULT_NEWTON
    if variant in ("elk", "quasi-elk") and damping is None:
        damping = DEFAULT_DAMPING
    if xs.shape[-(cell.input_ndim + 1)] == 0:  # nothing to solve
        ys, final = _scan(cell, params, xs, carry, lengths, resets, reverse=bool(reverse), unroll=1, remat="none")
        return ys, final, NewtonInfo(jnp.int32(0), jnp.bool_(True), jnp.zeros((), jnp.float32))
    return _newton_jit(
        cell, params, xs, carry, lengths, resets,
        reverse=bool(reverse), variant=variant, tol=None if tol is None else float(tol),
        max_iters=int(max_iters or DEFAULT_MAX_ITERS),
        damping=None if damping is None else float(damping), unroll=unroll,
    )


@functools.partial(
    jax.jit, static_argnums=(0,),
    static_argnames=("reverse", "variant", "tol", "max_iters", "damping", "unroll", "time_sharding"),
)
def _newton_jit(
    cell, params, xs, carry, lengths, resets, *, reverse, variant, tol, max_iters, damping, unroll, time_sharding=None
):
    k = cell.input_ndim
    steps = xs.shape[-(k + 1)]
    xs_tm = jnp.moveaxis(xs, -(k + 1), 0)  # (T, *batch, *features)
    batch_shape = xs_tm.shape[1 : -k]
    batch = math.prod(batch_shape)
    features = xs_tm.shape[-k:]
    dtype = _compute_dtype(xs, params)
    if carry is None:
        carry = cell.init_carry(carry_batch_shape(xs_tm.shape[1:]), dtype)
    # One sequence's carry: its leaves without the batch axes (ConvLSTM keeps (H, W)).
    nb = len(batch_shape)
    template = jax.tree.map(lambda c: jax.ShapeDtypeStruct(c.shape[nb:], c.dtype), carry)
    layout = _Layout(template)
    if tol is None:
        tol = DEFAULT_TOL.get(jnp.dtype(layout.real).itemsize, 1e-5)

    resets_tm = None if resets is None else jnp.moveaxis(resets, -1, 0)
    valid, resets_p, flip = _time_order(steps, lengths, resets_tm, reverse)
    x_p = flip(xs_tm).reshape((steps, batch) + features)
    r_p = jnp.zeros((steps, batch), bool) if resets_p is None else resets_p.reshape(steps, batch)
    v_p = jnp.ones((steps, batch), bool) if valid is None else valid.reshape(steps, batch)
    if time_sharding is not None:
        x_p, r_p, v_p = (time_sharding.constrain(a) for a in (x_p, r_p, v_p))
    carry_b = jax.tree.map(lambda c: c.reshape((batch,) + c.shape[nb:]), carry)
    h0 = jax.vmap(layout.flatten)(carry_b)  # (B, n)

    step = _step_fn(cell, layout)
    solve = _newton_solver(cell, layout, variant, tol, max_iters, damping, unroll, time_sharding)
    states, iterations, converged, residual = solve(params, x_p, h0, r_p, v_p)
    prev = jnp.concatenate([h0[None], states[:-1]], axis=0)
    new, ys = jax.vmap(jax.vmap(step, (None, 0, 0, 0, 0)), (None, 0, 0, 0, 0))(params, prev, x_p, r_p, v_p)
    final = jax.vmap(layout.unflatten)(new[-1])
    final = jax.tree.map(lambda f, c: f.reshape(c.shape), final, carry)
    ys = flip(ys.reshape((steps,) + batch_shape + ys.shape[2:]))
    ys = jnp.moveaxis(ys, 0, nb)
    return ys, final, NewtonInfo(iterations, converged, residual)


def _step_fn(cell: Cell, layout: _Layout):
    """The step on flattened states, with resets and lengths folded in:
    ``(params, s_prev (n,), x, reset (), valid ()) -> (s (n,), y)``."""

    def step(params, s_prev, x, reset, valid):
        # Zeros are the flattened cell.init_carry. (Built here: a traced array closed over
        # by the custom_vjp below would leak.)
        s_in = jnp.where(reset, jnp.zeros_like(s_prev), s_prev)
        new, y = cell.step(params, layout.unflatten(s_in), x)
        s = layout.flatten(new)
        s = jnp.where(valid, s, s_prev)
        y = jnp.where(valid, y, jnp.zeros((), y.dtype))
        return s, y

    return step


def _newton_solver(cell, layout, variant, tol, max_iters, damping, unroll, time_sharding=None):
    """``solve(params, X, h0, R, V) -> (S, iterations, converged, residual)`` with ``S``
    (T, B, n) the states after each step, differentiable by the implicit function theorem."""
    full = variant in ("deer", "elk")
    elk = variant in ("elk", "quasi-elk")
    step = _step_fn(cell, layout)
    batched = (None, 0, 0, 0, 0)

    def values(params, prev, X, R, V):
        return jax.vmap(jax.vmap(lambda *a: step(*a)[0], batched), batched)(params, prev, X, R, V)

    def jacobians(params, prev, X, R, V):
        """``(J, F)``: J (T, B, n, n) or its diagonal (T, B, n), and F = f(prev)."""

        def one(p, s, x, r, v):
            out = lambda s: (step(p, s, x, r, v)[0],) * 2
            jac, val = jax.jacfwd(out, has_aux=True)(s)
            return (jac if full else jnp.diagonal(jac)), val

        return jax.vmap(jax.vmap(one, batched), batched)(params, prev, X, R, V)

    def shift(S, h0):
        return jnp.concatenate([h0[None], S[:-1]], axis=0)

    def sequential(params, X, h0, R, V):
        one = jax.vmap(lambda p, s, x, r, v: step(p, s, x, r, v)[0], (None, 0, 0, 0, 0))

        def body(s, inputs):
            s = one(params, s, *inputs)
            return s, s

        return jax.lax.scan(body, h0, (X, R, V), unroll=unroll)[1]

    def forward(params, X, h0, R, V):
        S = jnp.zeros(X.shape[:2] + (layout.n,), layout.real)
        F = values(params, shift(S, h0), X, R, V)
        lam = jnp.asarray(damping if elk else 0.0, layout.real)
        init = (jnp.int32(0), S, F, jnp.max(jnp.abs(S - F)), lam, jnp.sum(jnp.square(S - F)))

        def cond(state):
            k, _, _, r, _, _ = state
            return (k < max_iters) & (r > tol) & jnp.isfinite(r)

        def body(state):
            k, S, F, r, lam, merit = state
            prev = shift(S, h0)
            J, F = jacobians(params, prev, X, R, V)
            u = F - (_mv(J, prev) if full else J * prev)
            if not elk:
                S_new = _solve_affine(FULL if full else DIAG, (J, u), h0, None, time_sharding)
                F_new = values(params, shift(S_new, h0), X, R, V)
                return k + 1, S_new, F_new, jnp.max(jnp.abs(S_new - F_new)), lam, merit
            S_new = _elk_step(J, u, F, S, lam, full)
            F_new = values(params, shift(S_new, h0), X, R, V)
            merit_new = jnp.sum(jnp.square(S_new - F_new))
            # Levenberg-Marquardt: keep a step that lowers the merit and trust the model more
            # next time; otherwise stay and damp ten times harder.
            accept = merit_new < merit
            pick = lambda new, old: jnp.where(accept, new, old)
            lam = jnp.clip(jnp.where(accept, lam / 10, lam * 10), 1e-12, 1e12).astype(lam.dtype)
            r_new = jnp.max(jnp.abs(S_new - F_new))
            return k + 1, pick(S_new, S), pick(F_new, F), pick(r_new, r), lam, pick(merit_new, merit)

        k, S, F, residual, _, _ = jax.lax.while_loop(cond, body, init)
        converged = residual <= tol
        S = jax.lax.cond(converged, lambda: F, lambda: sequential(params, X, h0, R, V))
        return S, k, converged, residual

    @jax.custom_vjp
    def solve(params, X, h0, R, V):
        return forward(params, X, h0, R, V)

    def solve_fwd(params, X, h0, R, V):
        out = forward(params, X, h0, R, V)
        return out, (params, X, h0, R, V, out[0])

    def solve_bwd(res, cts):
        params, X, h0, R, V, S = res
        S_bar = cts[0]
        prev = shift(S, h0)
        if full:
            J, _ = jacobians(params, prev, X, R, V)
            lam = _adjoint_full(J, S_bar, time_sharding)
        else:
            lam = _adjoint_quasi(lambda: jacobians(params, prev, X, R, V)[0], params, prev, X, R, V, S_bar)
        _, vjp = jax.vjp(lambda p, x, s: values(p, s, x, R, V), params, X, prev)
        p_bar, x_bar, prev_bar = vjp(lam)
        return p_bar, x_bar, prev_bar[0], None, None

    def _adjoint_quasi(diag_fn, params, prev, X, R, V, S_bar):
        """lambda_t = S_bar_t + J_{t+1}^T lambda_{t+1}, by iterations whose linear part keeps
        only diag(J): lambda <- reverse-solve(D, S_bar + shift(J^T lambda - D lambda))."""
        D = diag_fn()
        D_next = jnp.concatenate([D[1:], jnp.zeros_like(D[:1])], axis=0)
        _, vjp_s = jax.vjp(lambda s: values(params, s, X, R, V), prev)

        def jt(lam):  # (J_{t+1}^T lambda_{t+1}) at t; zero at the last step
            q = vjp_s(lam)[0]
            return jnp.concatenate([q[1:], jnp.zeros_like(q[:1])], axis=0)

        def reverse_solve(rhs):
            elems = (jnp.flip(D_next, 0), jnp.flip(rhs, 0))
            return jnp.flip(_solve_affine(DIAG, elems, jnp.zeros_like(rhs[0]), None, time_sharding), 0)

        lam = reverse_solve(S_bar)
        q = jt(lam)
        scale = lambda lam: 1.0 + jnp.max(jnp.abs(lam))
        r = jnp.max(jnp.abs(lam - S_bar - q))

        def cond(state):
            k, lam, _, r = state
            return (k < max_iters) & (r > tol * scale(lam)) & jnp.isfinite(r)

        def body(state):
            k, lam, q, _ = state
            lam = reverse_solve(S_bar + q - D_next * jnp.concatenate([lam[1:], jnp.zeros_like(lam[:1])], axis=0))
            q = jt(lam)
            return k + 1, lam, q, jnp.max(jnp.abs(lam - S_bar - q))

        _, lam, _, r = jax.lax.while_loop(cond, body, (jnp.int32(0), lam, q, r))
        ok = r <= tol * scale(lam)
        return jax.lax.cond(ok, lambda: lam, lambda: _adjoint_sequential(params, prev, X, R, V, S_bar))

    def _adjoint_sequential(params, prev, X, R, V, S_bar):
        one = jax.vmap(lambda p, s, x, r, v: step(p, s, x, r, v)[0], (None, 0, 0, 0, 0))
        nxt = lambda a: jnp.concatenate([a[1:], a[-1:]], axis=0)
        has_next = jnp.arange(S_bar.shape[0]) < S_bar.shape[0] - 1

        def body(lam_next, inputs):
            s_bar, s, x, r, v, more = inputs
            _, vjp = jax.vjp(lambda s: one(params, s, x, r, v), s)
            lam = s_bar + jnp.where(more, vjp(lam_next)[0], 0.0)
            return lam, lam

        inputs = (S_bar, nxt(prev), nxt(X), nxt(R), nxt(V), has_next)
        return jax.lax.scan(body, jnp.zeros_like(S_bar[0]), inputs, reverse=True, unroll=unroll)[1]

    solve.defvjp(solve_fwd, solve_bwd)
    return solve


def _adjoint_full(J: Array, S_bar: Array, time_sharding=None) -> Array:
    """lambda_t = S_bar_t + J_{t+1}^T lambda_{t+1}, lambda_T = S_bar_T, by a reverse scan."""
    M = jnp.concatenate([jnp.swapaxes(J[1:], -1, -2), jnp.zeros_like(J[:1])], axis=0)
    lam = _solve_affine(FULL, (jnp.flip(M, 0), jnp.flip(S_bar, 0)), jnp.zeros_like(S_bar[0]), None, time_sharding)
    return jnp.flip(lam, 0)


# ---- ELK: one Levenberg-Marquardt step as a parallel Kalman smoother ------------------------


class _Ops(NamedTuple):
    mm: Callable  # matrix product
    mv: Callable  # matrix-vector product
    t: Callable  # transpose
    solve: Callable  # solve(A, B) = A^{-1} B (B a matrix)
    solve_v: Callable  # solve(A, b) = A^{-1} b (b a vector)
    eye: Callable  # identity like a matrix


def _solve_small(a: Array, b: Array) -> Array:
    """``a^{-1} b`` for a batch of small matrices ``a`` (..., n, n) and ``b`` (..., n, m), by
    Gauss-Jordan elimination with partial pivoting in a ``fori_loop`` over the n columns.

    Not ``jnp.linalg.solve``: on CPU its batched LAPACK LU waits on XLA's intra-op thread
    pool from inside that pool, and two of them running at once deadlocked (jaxlib 0.10.2,
    2 cores, batches of a few thousand matrices).
    """
    n = a.shape[-1]
    batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    ab = jnp.concatenate([jnp.broadcast_to(a, batch + a.shape[-2:]), jnp.broadcast_to(b, batch + b.shape[-2:])], axis=-1)
    rows = jnp.arange(n)

    def column(k, ab):
        col = jnp.abs(jax.lax.dynamic_index_in_dim(ab, k, axis=ab.ndim - 1, keepdims=False))  # (..., n)
        p = jnp.argmax(jnp.where(rows >= k, col, -1.0), axis=-1)  # pivot row, (...)
        row_k = jax.lax.dynamic_index_in_dim(ab, k, axis=ab.ndim - 2, keepdims=True)  # (..., 1, n+m)
        row_p = jnp.take_along_axis(ab, p[..., None, None], axis=-2)  # (..., 1, n+m)
        is_k = (rows == k)[:, None]
        is_p = rows[:, None] == p[..., None, None]
        ab = jnp.where(is_k, row_p, jnp.where(is_p, row_k, ab))  # swap rows k and p
        pivot_row = row_p / jax.lax.dynamic_index_in_dim(row_p, k, axis=ab.ndim - 1, keepdims=True)
        factor = jax.lax.dynamic_index_in_dim(ab, k, axis=ab.ndim - 1, keepdims=True)  # (..., n, 1)
        return jnp.where(is_k, pivot_row, ab - factor * pivot_row)

    ab = jax.lax.fori_loop(0, n, column, ab)
    return ab[..., n:]


_FULL_OPS = _Ops(
    mm=lambda a, b: a @ b,
    mv=_mv,
    t=lambda a: jnp.swapaxes(a, -1, -2),
    solve=_solve_small,
    solve_v=lambda a, b: _solve_small(a, b[..., None])[..., 0],
    eye=lambda a: jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape),
)
_DIAG_OPS = _Ops(
    mm=lambda a, b: a * b,
    mv=lambda a, b: a * b,
    t=lambda a: a,
    solve=lambda a, b: b / a,
    solve_v=lambda a, b: b / a,
    eye=jnp.ones_like,
)


def _filter_combine(ops: _Ops):
    """Sarkka and Garcia-Fernandez (2021), eq. (13): the parallel Kalman filter's operator on
    elements (A, b, C, eta, J), earlier element i, later j."""

    def combine(ei, ej):
        Ai, bi, Ci, etai, Ji = ei
        Aj, bj, Cj, etaj, Jj = ej
        X = ops.eye(Ci) + ops.mm(Ci, Jj)  # I + C_i J_j; (I + J_j C_i) = X^T as C, J are symmetric
        Xt = ops.t(X)
        A = ops.mm(Aj, ops.solve(X, Ai))
        b = ops.mv(Aj, ops.solve_v(X, bi + ops.mv(Ci, etaj))) + bj
        C = ops.mm(ops.mm(Aj, ops.solve(X, Ci)), ops.t(Aj)) + Cj
        eta = ops.mv(ops.t(Ai), ops.solve_v(Xt, etaj - ops.mv(Jj, bi))) + etai
        Jn = ops.mm(ops.mm(ops.t(Ai), ops.solve(Xt, Jj)), Ai) + Ji
        return A, b, C, eta, Jn

    return combine


def _elk_step(J: Array, u: Array, F: Array, S: Array, damping: float, full: bool) -> Array:
    """argmin_s sum_t |s_t - J_t s_{t-1} - u_t|^2 + damping sum_t |s_t - S_t|^2 with s_0
    fixed (u_1 already holds J_1 s_0, so the first predicted mean is F_1 = J_1 s_0 + u_1).

    A linear-Gaussian smoother: process noise I, observations S_t with noise I / damping.
    """
    ops = _FULL_OPS if full else _DIAG_OPS
    gain = damping / (1.0 + damping)  # Kalman gain K = Q (Q + R)^{-1} with Q = I, R = I / damping
    keep = 1.0 / (1.0 + damping)  # I - K
    eye = ops.eye(J)
    A = (keep * J).at[0].set(0.0)
    b = (keep * u + gain * S).at[0].set(keep * F[0] + gain * S[0])
    C = keep * eye
    Jt = ops.t(J)
    eta = (gain * ops.mv(Jt, S - u)).at[0].set(0.0)
    Jm = (gain * ops.mm(Jt, J)).at[0].set(0.0)
    _, m, P, _, _ = jax.lax.associative_scan(_filter_combine(ops), (A, b, C, eta, Jm))
    # Rauch-Tung-Striebel smoother in the same form: x_t = E_t x_{t+1} + g_t.
    J_next, u_next = J[1:], u[1:]
    P_, m_ = P[:-1], m[:-1]
    G = ops.mm(ops.mm(J_next, P_), ops.t(J_next)) + ops.eye(P_)
    E = ops.t(ops.solve(G, ops.mm(J_next, P_)))  # P J^T G^{-1}, G and P symmetric
    g = m_ - ops.mv(E, ops.mv(J_next, m_) + u_next)
    E = jnp.concatenate([E, jnp.zeros_like(E[:1])], axis=0)
    g = jnp.concatenate([g, m[-1:]], axis=0)
    monoid = FULL if full else DIAG
    x = _solve_affine(monoid, (jnp.flip(E, 0), jnp.flip(g, 0)), jnp.zeros_like(g[0]))
    return jnp.flip(x, 0)
