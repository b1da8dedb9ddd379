r"""The chunkwise form of the matrix-state recurrences (:mod:`rnnjax.cells.matrix_state`).

The steps are cut into chunks of ``C``. Within a chunk, with ``b`` the cumulative log decay
from the chunk's start, the outputs of gated linear attention are

.. math:: O = (Q \odot e^{b}) S_{in} + ((Q K^\top) \odot \Gamma) V, \qquad
          \Gamma_{ij} = e^{b_i - b_j} [i \ge j]

and the state passes to the next chunk as
:math:`S_{out} = e^{b_C} S_{in} + (K \odot e^{b_C - b})^\top V`: matrix products, one
sequential step per chunk (with one decay per head, every chunk's incoming state at once:
:func:`chunk_states`). Every exponent is ``<= 0`` (decays are ``<= 1``). Per-key decays
(GLA) compute :math:`\Gamma` by secondary chunks (as fla does): off-diagonal blocks through a
reference point between them, diagonal blocks exactly in log space. The mLSTM's chunks use the
same products with its stabiliser :math:`m` in closed form,
:math:`m_t = \max(m_0 + b_t,\ \max_{j \le t}(i_j + b_t - b_j))`.

Resets (a zero state before step ``t``) are segment masks: a pair ``(i, j)`` interacts only if
no reset lies in ``(j, i]``, and the incoming state reaches step ``i`` only if none lies in
``[0, i]``; no decay is ever set to zero, so no ``inf - inf`` arises.

Arrays here are ``(B, H, N, C, ...)`` (batch, heads, chunks, steps); :mod:`rnnjax.engines.matrix`
brings time-major sequences into this form. Derivatives are JAX's; each chunk's pairwise
factors are recomputed in the backward pass (``jax.checkpoint``), so memory grows as
``T (d_k + d_v)`` plus one state per chunk.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.matrix_state import MLSTMState

Array = jax.Array
# The largest in-chunk decay span (log) whose scores are one product: its factors lie in e^{+-60};
# a causal pair's two factors multiply to <= 1, masked pairs (up to e^{span}) are selected away,
# and e^{88 - 60} leaves 1e12 for the magnitudes of q, k and the cotangents before float32
# overflows (DECISIONS.md, "Per-key decays: separable when bounded").
SEPARABLE_SPAN = 120.0
KEY_GROUP = 2  # chunks whose per-key intra-chunk products are computed at once
STATE_PRODUCT_CHUNKS = 128  # the most chunks whose states are one product (DECISIONS.md, "Chunk states by one product")
SUB_CHUNK = 8  # secondary chunk of per-key decays: the (sub, sub, d_k) factor (DECISIONS.md)
# Log decays are raised to this floor before the cumulative sums: a decay of exactly 0
# (log_decay = -inf) would make b_i - b_j = -inf - (-inf) = nan. exp(-104) underflows to 0 in
# float32 and is 1e-45 in float64, far below either's rounding; the floor also bounds |b|, whose
# rounding is what b_i - b_j loses to cancellation.
LOG_DECAY_FLOOR = -104.0


class Segments(NamedTuple):
    """Where resets cut each chunk; every array broadcasts against ``(B, H, N, C, ...)``."""

    same: Array  # (B, 1, N, C, C) bool: j <= i and no reset in (j, i]
    open: Array  # (B, 1, N, C) bool: no reset in [0, i]: the incoming state reaches step i
    start: Array  # (B, 1, N, C) int32: where i's segment starts (0 when open)


def segments(resets: Array | None, batch: int, chunks: int, size: int) -> Segments:
    """:class:`Segments` from ``resets`` of shape ``(B, N, C)`` (``None``: no resets)."""
    i = jnp.arange(size)
    causal = i[:, None] >= i[None, :]
    if resets is None:
        same = jnp.broadcast_to(causal, (batch, 1, chunks, size, size))
        return Segments(same, jnp.ones((batch, 1, chunks, size), bool), jnp.zeros((batch, 1, chunks, size), jnp.int32))
    resets = resets[:, None]
    seg = jnp.cumsum(resets, axis=-1)
    same = causal & (seg[..., :, None] == seg[..., None, :])
    start = jax.lax.cummax(jnp.where(resets, i, 0), axis=resets.ndim - 1)
    return Segments(same, seg == 0, start.astype(jnp.int32))


def _masked_exp(x: Array, mask: Array) -> Array:
    """``exp(x)`` where ``mask``, else 0; the unselected ``x`` never reaches ``exp`` (no overflow)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0)), 0)


def _key_gated_scores(
    q: Array, k: Array, b: Array, causal_size: int, b_rows: Array | None = None, strict: bool = False
) -> Array:
    r"""``A_ij = sum_d q_id k_jd e^{b'_id - b_jd}`` for ``j <= i`` (``j < i`` when ``strict``),
    else 0, ``(..., C, C)``, from ``q, k, b`` of shape ``(..., C, d_k)`` with ``b``
    non-increasing along ``C``; ``b' = b_rows`` (default ``b``) with ``b'_i <= b_{i-1}``
    (``b_rows = b - g`` is the decay before step ``i``, as the DPLR recurrence reads it).

    Blocks of ``sub`` steps: a block below the diagonal goes through the cumulative decay
    ``r`` at the end of the block before row block ``I``, :math:`(q_i e^{b'_i - r})
    (k_j e^{r - b_j})` (both exponents ``<= 0``); a diagonal block is computed exactly, as a
    ``(sub, sub, d_k)`` factor.
    """
    size, d_k = q.shape[-2], q.shape[-1]
    sub = min(SUB_CHUNK, causal_size)
    while size % sub:
        sub -= 1
    n = size // sub
    lead = q.shape[:-2]
    b_rows = b if b_rows is None else b_rows
    qs, ks, bs, rs = (a.reshape(*lead, n, sub, d_k) for a in (q, k, b, b_rows))
    tri = jnp.tril(jnp.ones((sub, sub), bool), -1 if strict else 0)
    diag = jnp.einsum(
        "...nid,...njd,...nijd->...nij", qs, ks, _masked_exp(rs[..., :, None, :] - bs[..., None, :, :], tri[..., None])
    )
    ref = jnp.concatenate([jnp.zeros_like(bs[..., :1, 0, :]), bs[..., :-1, -1, :]], axis=-2)  # (..., n, d_k)
    q_ref = qs * jnp.exp(rs - ref[..., :, None, :])
    earlier = (jnp.arange(size)[None, :] < (jnp.arange(n) * sub)[:, None])[..., None]  # (n, C, 1)
    k_ref = k[..., None, :, :] * _masked_exp(ref[..., :, None, :] - b[..., None, :, :], earlier)  # (..., n, C, d_k)
    off = jnp.einsum("...nid,...njd->...nij", q_ref, k_ref)  # (..., n, sub, C)
    blocks = (
        off.reshape(*lead, n, sub, n, sub) + diag[..., :, :, None, :] * jnp.eye(n, dtype=diag.dtype)[:, None, :, None]
    )
    return blocks.reshape(*lead, size, size)


def _by_chunk_groups(fn, group: int, *args):
    """``fn(*args)`` on ``(B, H, N, C, ...)`` arrays (its outputs a pytree of ``(B, H, N, ...)``
    arrays), ``group`` chunks at a time (``lax.map``): the temporaries of one group exist at
    once, not those of all ``N`` chunks."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    chunks = leaves[0].shape[2]
    if group >= chunks:
        return fn(*args)
    pad = -chunks % group
    grouped = []
    for a in leaves:  # (B, X, N, ...) -> (N / group, B, X, group, ...); padding chunks are cut below
        a = jnp.concatenate([a, jnp.zeros((*a.shape[:2], pad, *a.shape[3:]), a.dtype)], axis=2) if pad else a
        a = a.reshape(*a.shape[:2], a.shape[2] // group, group, *a.shape[3:])
        grouped.append(jnp.moveaxis(a, 2, 0))
    out = jax.lax.map(lambda xs: fn(*jax.tree_util.tree_unflatten(tree, xs)), grouped)

    def ungroup(a):
        a = jnp.moveaxis(a, 0, 2)
        return a.reshape(*a.shape[:2], a.shape[2] * a.shape[3], *a.shape[4:])[:, :, :chunks]

    return jax.tree.map(ungroup, out)


def checkpointed_cond(pred: Array, on_true, on_false, *args):
    """``lax.cond(pred, on_true, on_false, *args)`` with each branch checkpointed. A cond's
    backward keeps the residuals of both branches (the untaken one's zero-filled); checkpointed
    branches have their operands as residuals, and the backward recomputes the branch taken
    (DECISIONS.md, "Checkpointed cond branches")."""
    ckpt = lambda f: jax.checkpoint(f, prevent_cse=False)
    return jax.lax.cond(pred, ckpt(on_true), ckpt(on_false), *args)


def _separable_intra(q: Array, k: Array, v: Array, b: Array, seg: Segments) -> Array:
    """``((Q K^T) * Gamma) V`` with per-key decays as one product per chunk, through the midrange
    ``r`` of each chunk's cumulative decay: every factor lies in ``e^{+-span/2}``."""
    r = (b[..., :1, :] + b[..., -1:, :]) / 2
    scores = jnp.einsum("...id,...jd->...ij", q * jnp.exp(b - r), k * jnp.exp(r - b))
    return jnp.einsum("...ij,...je->...ie", jnp.where(seg.same, scores, 0), v)


def _intra_gla(q: Array, k: Array, v: Array, b: Array | None, seg: Segments) -> Array:
    """``((Q K^T) * Gamma) V`` of every chunk: ``(B, H, N, C, d_v)``."""
    if b is None:
        scores = jnp.einsum("...id,...jd->...ij", q, k)
        return jnp.einsum("...ij,...je->...ie", jnp.where(seg.same, scores, 0), v)
    if b.ndim == q.ndim - 1:  # one decay per head
        gamma = _masked_exp(b[..., :, None] - b[..., None, :], seg.same)
        return jnp.einsum("...ij,...je->...ie", jnp.einsum("...id,...jd->...ij", q, k) * gamma, v)
    scores = _key_gated_scores(q, k, b, q.shape[-2])
    return jnp.einsum("...ij,...je->...ie", jnp.where(seg.same, scores, 0), v)


def decay_factors(b: Array | None, seg: Segments, like: Array) -> tuple[Array, Array, Array]:
    """``(start, out, total)``: ``e^{b}`` where the incoming state reaches a step,
    ``e^{b_C - b}`` where a step is in the chunk's last segment (both multiply ``(..., C, d_k)``
    rows), and ``e^{b_C}`` if the chunk has no reset (``(..., d_k)`` or ``(..., 1)``)."""
    last_open = seg.open[..., -1][..., None]
    open_, in_last = seg.open[..., None], seg.same[..., -1, :]
    if b is None:
        return open_.astype(like.dtype), in_last[..., None].astype(like.dtype), last_open.astype(like.dtype)
    if b.ndim == like.ndim:  # per key
        bl = b[..., -1:, :]
        return jnp.exp(b) * open_, _masked_exp(bl - b, in_last[..., None]), jnp.exp(bl[..., 0, :]) * last_open
    bl = b[..., -1:]
    return (jnp.exp(b) * seg.open)[..., None], _masked_exp(bl - b, in_last)[..., None], jnp.exp(bl) * last_open


def gla(q: Array, k: Array, v: Array, g: Array | None, state: Array, seg: Segments, scale: float):
    """Gated linear attention over chunks.

    Args:
      q, k: ``(B, H, N, C, d_k)``; v: ``(B, H, N, C, d_v)``.
      g: ``None``, ``(B, H, N, C)`` or ``(B, H, N, C, d_k)``: log decays ``<= 0`` (0 on padding).
      state: ``(B, H, d_k, d_v)``, the state before the first chunk.
      seg: :class:`Segments` of the resets.

    Returns:
      ``(o, final)``: ``(B, H, N, C, d_v)`` and ``(B, H, d_k, d_v)``.
    """
    q = q * jnp.asarray(scale, q.dtype)
    b = None if g is None else jnp.cumsum(jnp.maximum(g, LOG_DECAY_FLOOR), axis=3)
    if b is not None and b.ndim == q.ndim:
        # Per-key decays: one product (Q e^{b - r}) (K e^{r - b})^T when every chunk's decays span
        # at most SEPARABLE_SPAN (no factor over- or underflows), else secondary chunks, whose
        # (sub, sub, d_k) factors are computed KEY_GROUP chunks at a time and recomputed in the
        # backward pass (DECISIONS.md, "Per-key decays: separable when bounded").
        span = jnp.max(b[..., 0, :] - b[..., -1, :], initial=0.0)
        safe = lambda q, k, v, b: _by_chunk_groups(
            jax.checkpoint(_intra_gla, prevent_cse=False), KEY_GROUP, q, k, v, b, seg
        )
        separable = functools.partial(_separable_intra, seg=seg)
        intra = checkpointed_cond(span <= SEPARABLE_SPAN, separable, safe, q, k, v, b)
    else:  # the scalar form keeps its (C, C) factors for the backward pass (T * C per head)
        intra = _intra_gla(q, k, v, b, seg)
    start, out, _ = decay_factors(b, seg, q)
    local = jnp.einsum("...jd,...je->...de", k * out, v)  # (B, H, N, d_k, d_v)
    # Each chunk's log decay: (B, H, N), or (B, H, N, d_k) per key.
    log_decay = jnp.zeros(q.shape[:3], q.dtype) if b is None else b[:, :, :, -1]
    keep = jnp.broadcast_to(seg.open[..., -1], q.shape[:3])
    incoming, final = chunk_states(log_decay, keep, local, state)
    o = intra + jnp.einsum("...id,...de->...ie", q * start, incoming)
    return o, final


def _segment_sums(x: Array) -> Array:
    """``E[..., n, m] = sum_{l=m+1}^{n-1} x_l`` for ``m < n`` (0 elsewhere), ``(..., N + 1, N)``
    from ``x`` of shape ``(..., N)``: each entry sums its own terms (a cumulative sum down
    the columns), so no difference of large prefix sums cancels."""
    size = x.shape[-1]
    n, m = jnp.arange(size + 1)[:, None], jnp.arange(size)[None, :]
    before = jnp.concatenate([jnp.zeros_like(x[..., :1]), x], axis=-1)  # before[n] = x[n - 1]
    return jnp.cumsum(jnp.where(m < n - 1, before[..., :, None], 0), axis=-2)


def _closed_chunk_states(log_decay: Array, keep: Array, local: Array):
    """:func:`chunk_states` of one decay per head from a zero state, ``(incoming, final,
    reach)``, with ``reach (..., N + 1)`` the factor by which the state before the first
    chunk reaches each chunk (and, last, the end)."""
    chunks = log_decay.shape[-1]
    log_decay = jnp.where(keep, log_decay, 0)
    cuts = (~keep).astype(jnp.int32)
    # weights[n, m]: how chunk m's own contribution reaches the state before chunk n (n = N: the end).
    later = jnp.arange(chunks) < jnp.arange(chunks + 1)[:, None]
    weights = _masked_exp(_segment_sums(log_decay), later & (_segment_sums(cuts) == 0))
    zero = jnp.zeros_like(log_decay[..., :1])
    reach = _masked_exp(
        jnp.concatenate([zero, jnp.cumsum(log_decay, axis=-1)], axis=-1),
        jnp.concatenate([zero.astype(jnp.int32), jnp.cumsum(cuts, axis=-1)], axis=-1) == 0,
    )
    incoming = jnp.einsum("...nm,...mde->...nde", weights[..., :-1, :], local)
    final = jnp.einsum("...m,...mde->...de", weights[..., -1, :], local)
    return incoming, final, reach


def chunk_states(log_decay: Array, keep: Array, local: Array, state: Array) -> tuple[Array, Array]:
    r"""The state before each chunk and after the last of :math:`S_n = a_n S_{n-1} + L_n`
    (``a_n = e^{log_decay_n}`` per head or per key; ``0`` where ``keep`` is false, a chunk
    with a reset). With one decay per head and at most :data:`STATE_PRODUCT_CHUNKS` chunks,
    without a loop: :math:`S_{n-1} = \sum_{m<n} (\prod_{m<l<n} a_l) L_m + (\prod_{l<n} a_l)
    S_{-1}`, one ``(N, N) x (N, d_k d_v)`` product per head, which needs no stacked loop
    buffers (DECISIONS.md, "Chunk states by one product"); otherwise by a loop over the chunks.

    Args:
      log_decay: ``(..., N)`` or ``(..., N, d_k)``, finite and ``<= 0``.
      keep: ``(..., N)`` bool. local: ``(..., N, d_k, d_v)``. state: ``(..., d_k, d_v)``.

    Returns:
      ``(incoming, final)``: ``(..., N, d_k, d_v)`` and ``(..., d_k, d_v)``.
    """
    per_key = log_decay.ndim == local.ndim - 1
    if not per_key and local.shape[-3] <= STATE_PRODUCT_CHUNKS:
        incoming, final, reach = _closed_chunk_states(log_decay, keep, local)
        # An outer product (not a broadcast): its transpose for reach is a product, where a
        # broadcast of the state over the chunks would be materialised (8 MiB at T = 4096).
        incoming = incoming + jnp.einsum("...n,...de->...nde", reach[..., :-1], state)
        return incoming, final + reach[..., -1, None, None] * state
    decay = jnp.where(keep[..., None] if per_key else keep, jnp.exp(log_decay), 0)
    decay = decay[..., None] if per_key else decay[..., None, None]
    incoming, final = affine_scan(jnp.multiply, jnp.moveaxis(decay, -3, 0), jnp.moveaxis(local, -3, 0), state)
    return jnp.moveaxis(incoming, 0, -3), final


def affine_loop(apply, A: Array, L: Array, state: Array) -> tuple[Array, Array]:
    r"""``(incoming, final)`` of :math:`S_n = A_n \circ S_{n-1} + L_n` from ``S_{-1} = state``:
    the state before each step, stacked on axis 0, and after the last (``lax.scan``).
    ``apply(A_n, S)``, bilinear, broadcasts over leading axes (``jnp.multiply``: a decay;
    a matrix product: the delta rule's transition). Differentiate :func:`affine_scan`."""

    def step(S, chunk):
        A_n, L_n = chunk
        return apply(A_n, S) + L_n, S

    final, incoming = jax.lax.scan(step, state, (A, L))
    return incoming, final


affine_scan = jax.custom_jvp(affine_loop, nondiff_argnums=(0,))
affine_scan.__doc__ = r""":func:`affine_loop` with its derivative as the same recurrence,
:math:`dS_n = A_n \circ dS_{n-1} + (dA_n \circ S_{n-1} + dL_n)`, reading the forward's
``incoming``: autodiff of the loop would stack ``S_{n-1}`` a second time for its backward pass
(DECISIONS.md, "Chunk-state loops keep one stack of states")."""


@affine_scan.defjvp
def _affine_scan_jvp(apply, primals, tangents):
    (A, L, state), (dA, dL, d_state) = primals, tangents
    incoming, final = affine_scan(apply, A, L, state)
    return (incoming, final), affine_scan(apply, A, dL + apply(dA, incoming), d_state)


def _intra_mlstm(q: Array, k: Array, v: Array, i: Array, b: Array, seg: Segments, base: Array):
    """Per chunk, everything that does not depend on the incoming state:
    ``(log_w, m_local, num, den)``: the pairwise log weights ``i_j + b_i - b_j``
    ``(B, H, N, C, C)``, the local stabiliser ``(B, H, N, C)`` and the unnormalised local
    numerator and denominator at that stabiliser."""
    log_w = jnp.where(seg.same, i[..., None, :] + b[..., :, None] - b[..., None, :], -jnp.inf)
    m_local = jnp.maximum(jnp.max(log_w, axis=-1), jnp.where(seg.open, -jnp.inf, base))
    finite_m = jnp.where(jnp.isfinite(m_local), m_local, 0)
    w = jnp.exp(log_w - finite_m[..., None]) * jnp.einsum("...id,...jd->...ij", q, k)
    return m_local, jnp.einsum("...ij,...je->...ie", w, v), jnp.sum(w, axis=-1)


def mlstm(q, k, v, i, log_f, state: MLSTMState, seg: Segments, scale: float, eps: float):
    """The stabilised mLSTM over chunks.

    Args:
      q, k: ``(B, H, N, C, d_k)``; v: ``(B, H, N, C, d_v)``.
      i: ``(B, H, N, C)`` input-gate pre-activations, ``-inf`` on padding.
      log_f: ``(B, H, N, C)``: ``log sigmoid(f)``, 0 on padding.
      state: :class:`MLSTMState` before the first chunk (``(B, H, ...)`` leaves).
      seg: :class:`Segments` of the resets.

    Returns:
      ``(h, final)``: ``(B, H, N, C, d_v)`` and the final :class:`MLSTMState`.
    """
    q = q * jnp.asarray(scale, q.dtype)
    b = jnp.cumsum(log_f, axis=3)
    # A step after a reset starts from m = 0: its base is the decay summed since the reset.
    before = jnp.take_along_axis(b - log_f, jnp.broadcast_to(seg.start, b.shape), axis=3)
    base = b - before
    m_local, num, den = jax.checkpoint(_intra_mlstm, prevent_cse=False)(q, k, v, i, b, seg, base)
    # Each chunk's contribution to its end state, at the local stabiliser of its last step.
    m_last = m_local[..., -1]
    finite_last = jnp.where(jnp.isfinite(m_last), m_last, 0)
    in_last = seg.same[..., -1, :]
    w_last = _masked_exp(i + b[..., -1:] - b - finite_last[..., None], in_last & jnp.isfinite(i))
    k_w = k * w_last[..., None]
    local_C = jnp.einsum("...jd,...je->...de", k_w, v)
    local_n = jnp.sum(k_w, axis=-2)
    open_last = jnp.broadcast_to(seg.open[..., -1], m_last.shape)
    decay_last = jnp.where(open_last, b[..., -1], -jnp.inf)  # log decay of the incoming state

    def step(carry, chunk):
        return fold_mlstm(carry, *chunk), carry

    chunked = (local_C, local_n, m_last, decay_last)
    final, (C_in, n_in, m_in) = jax.lax.scan(step, state, tuple(jnp.moveaxis(a, 2, 0) for a in chunked))
    C_in, n_in, m_in = jnp.moveaxis(C_in, 0, 2), jnp.moveaxis(n_in, 0, 2), jnp.moveaxis(m_in, 0, 2)
    # m_in is -inf only for a state that has seen nothing (a shard's summary in sequence parallelism).
    from_in = jnp.where(seg.open, m_in[..., None] + b, -jnp.inf)
    m = jnp.maximum(m_local, from_in)
    safe_m = jnp.where(jnp.isfinite(m), m, 0)
    a_loc = _masked_exp(m_local - safe_m, jnp.isfinite(m_local))
    a_in = _masked_exp(from_in - safe_m, jnp.isfinite(from_in))
    num = a_loc[..., None] * num + a_in[..., None] * jnp.einsum("...id,...de->...ie", q, C_in)
    den = a_loc * den + a_in * jnp.einsum("...id,...d->...i", q, n_in)
    h = num / (jnp.maximum(jnp.abs(den), jnp.exp(-safe_m)) + eps)[..., None]
    return h, final


def fold_mlstm(state: MLSTMState, C: Array, n: Array, m: Array, log_decay: Array) -> MLSTMState:
    r"""The mLSTM state after a stretch of steps summarised by ``(C, n, m, log_decay)``: its own
    contribution ``(C, n)`` at stabiliser ``m`` and the log decay of the incoming state
    (``-inf`` across a reset), :math:`m' = \max(m_{in} + \delta, m)`,
    :math:`C' = e^{m_{in} + \delta - m'} C_{in} + e^{m - m'} C`. A stabiliser of ``-inf``
    (nothing seen) contributes nothing."""
    carried = state.m + log_decay
    m_new = jnp.maximum(carried, m)
    safe = jnp.where(jnp.isfinite(m_new), m_new, 0)
    a_in, a_loc = _masked_exp(carried - safe, jnp.isfinite(carried)), _masked_exp(m - safe, jnp.isfinite(m))
    return MLSTMState(
        a_in[..., None, None] * state.C + a_loc[..., None, None] * C,
        a_in[..., None] * state.n + a_loc[..., None] * n,
        m_new,
    )
