r"""The chunkwise form of the delta rule and the diagonal-plus-low-rank (DPLR) recurrence
(:func:`rnnjax.cells.matrix_state.delta_step`, :func:`~rnnjax.cells.matrix_state.dplr_step`)
by the WY/UT representation (Yang et al. 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length"; fla's ``chunk_delta_rule`` and ``chunk_dplr``).

Within a chunk of ``C`` steps, with :math:`\Gamma_i = e^{b_i}` the cumulative decay from the
chunk's start, the state is :math:`S_i = \Gamma_i S_0 + \sum_{j \le i} (\Gamma_i / \Gamma_j)
k_j u_j^\top` for pseudo-values :math:`u_j` that solve one unit-lower-triangular system,
:math:`(I + A) U = \mathrm{diag}(\beta) (V - (K \odot \Gamma) S_0)` with
:math:`A_{jl} = \beta_j \sum_d k_{jd} k_{ld} e^{b_{jd} - b_{ld}}` (:math:`l < j`). Everything is
affine in the incoming state, so each chunk reduces to four arrays (matrix products and the
inverse :math:`T = (I + A)^{-1}`), computed for a group of chunks at once (:func:`chunk_group`):

.. math:: O = Q' S_0 + O_0, \qquad S_C = M S_0 + B

(``Q'``: ``(C, d_k)``, ``O_0``: ``(C, d_v)``, ``M``: ``(d_k, d_k)``, ``B``: ``(d_k, d_v)``), and
one ``d_k x d_k`` by ``d_k x d_v`` product per chunk passes the state along, in a loop over
the groups that carries it. The DPLR recurrence :math:`S_t = D_t S_{t-1} + b_t (a_t^\top
S_{t-1}) + k_t v_t^\top` reads :math:`u_j = S_{j-1}^\top a_j` the same way, with
:math:`(I - A^{ab}) U = (A \odot \Gamma_{j-1}) S_0 + A^{ak} V`.

Resets, padding and the array layout ``(B, H, N, C, ...)`` are those of
:mod:`rnnjax.engines.chunkwise`; every exponent is ``<= 0``. Inside, the arrays run chunk-major,
``(N, B, H, C, ...)``, so a group of chunks is a reshape (DECISIONS.md, "The chunkwise delta rule
carries its state through groups of chunks"). Each group is recomputed in the backward pass
(``jax.checkpoint``), so memory grows as ``T (d_k + d_v)`` plus one state per group; per-key
decays also keep ``Q'``, ``M`` and the incoming state of every chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rnnjax.engines.chunkwise import (
    LOG_DECAY_FLOOR,
    SEPARABLE_SPAN,
    Segments,
    _key_gated_scores,
    _masked_exp,
    checkpointed_cond,
    decay_factors,
)

Array = jax.Array
INVERSE_BLOCK = 16  # forward substitution on diagonal blocks of this size, then merged (as fla does)
# Steps whose per-chunk arrays are computed at once, in one step of the loop that carries the
# state: their temporaries and cotangents exist for one group at a time (DECISIONS.md, "The
# chunkwise delta rule carries its state through groups of chunks").
GROUP_STEPS = 256


def chunk_group(size: int) -> int:
    """Chunks of ``size`` steps per group: :data:`GROUP_STEPS` worth, 1 to 8 (measured fastest
    at T = 4096: 4 chunks of 64, 8 of 32; 16 of 16 was slower than 8)."""
    return max(1, min(8, GROUP_STEPS // size))


def _forward_substitution(A: Array) -> Array:
    """``(I + A)^{-1}`` for strictly lower ``A`` (``(..., s, s)``), row by row:
    :math:`T_i = e_i - \\sum_{l < i} A_{il} T_l`."""
    size = A.shape[-1]
    T = jnp.broadcast_to(jnp.eye(size, dtype=A.dtype), A.shape)
    for i in range(1, size):
        T = T.at[..., i, :].add(-jnp.einsum("...l,...le->...e", A[..., i, :], T))
    return T


@jax.custom_jvp
def unit_lower_inverse(A: Array) -> Array:
    r"""``(I + A)^{-1}`` for strictly lower ``A`` (``(..., C, C)``): diagonal blocks of
    :data:`INVERSE_BLOCK` by forward substitution, merged pairwise by
    ``[[T1, 0], [-T2 A21 T1, T2]]``. Its derivative is :math:`dT = -T\, dA\, T` (two products;
    JAX transposes it for reverse mode): autodiff of the row updates cost 7x the forward
    (``benchmarks/lab/delta_rule_parts.py``)."""
    size = A.shape[-1]
    base = min(INVERSE_BLOCK, size)
    padded = base
    while padded < size:
        padded *= 2
    if padded != size:  # the padding's block of the inverse is the identity; cut below
        A = jnp.pad(A, [(0, 0)] * (A.ndim - 2) + [(0, padded - size)] * 2)

    def invert(A: Array) -> Array:
        n = A.shape[-1]
        if n <= base:
            return _forward_substitution(A)
        h = n // 2
        T1, T2 = invert(jnp.stack([A[..., :h, :h], A[..., h:, h:]]))
        T21 = -jnp.einsum("...ij,...jk,...kl->...il", T2, A[..., h:, :h], T1)
        top = jnp.concatenate([T1, jnp.zeros_like(T1)], axis=-1)
        return jnp.concatenate([top, jnp.concatenate([T21, T2], axis=-1)], axis=-2)

    return invert(A)[..., :size, :size]


@unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
    (A,), (dA,) = primals, tangents
    T = unit_lower_inverse(A)
    dA = jnp.tril(dA, -1)  # only the strictly lower part of A is read
    return T, -jnp.einsum("...ij,...jk,...kl->...il", T, dA, T)


def _scores(
    x: Array,
    y: Array,
    b: Array | None,
    same: Array,
    strict: bool = False,
    b_rows: Array | None = None,
    separable: bool = False,
) -> Array:
    r"""``sum_d x_id y_jd e^{b'_id - b_jd}`` where ``same`` (and ``j < i`` when ``strict``),
    else 0, ``(B, H, N, C, C)``; ``b``: ``None``, per head ``(..., C)`` or per key
    ``(..., C, d_k)``; ``b'``: ``b_rows`` (default ``b``). Per key, ``separable`` computes one
    product through each chunk's midrange ``r``, :math:`(x e^{b' - r}) (y e^{r - b})^\top`
    (when the span ``b'_0 - b_C`` is bounded), else secondary chunks, exact in log space."""
    mask = same & ~jnp.eye(x.shape[-2], dtype=bool) if strict else same
    if b is None:
        return jnp.where(mask, jnp.einsum("...id,...jd->...ij", x, y), 0)
    b_rows = b if b_rows is None else b_rows
    if b.ndim == x.ndim - 1:
        return jnp.einsum("...id,...jd->...ij", x, y) * _masked_exp(b_rows[..., :, None] - b[..., None, :], mask)
    if separable:
        r = (b_rows[..., :1, :] + b[..., -1:, :]) / 2
        return jnp.where(mask, jnp.einsum("...id,...jd->...ij", x * jnp.exp(b_rows - r), y * jnp.exp(r - b)), 0)
    return jnp.where(mask, _key_gated_scores(x, y, b, x.shape[-2], b_rows, strict), 0)


def _chunk_major(a: Array) -> Array:
    """``(B, X, N, ...)`` -> ``(N, B, X, ...)``: a group of chunks is then a reshape."""
    return jnp.moveaxis(a, 2, 0)


def _per_group(chunks, per_key: bool, span):
    """``chunks`` (``(*arrays, separable)``) for one group of chunks. Per-key decays choose the
    separable scores when every chunk's decay ``span(*arrays)`` is at most ``SEPARABLE_SPAN``
    (no factor over- or underflows; the choice of :func:`rnnjax.engines.chunkwise.gla`), each
    branch checkpointed. Without per-key decays, ``chunks`` itself: :func:`_solve` checkpoints
    the whole loop step."""
    if not per_key:
        return functools.partial(chunks, separable=False)
    separable, exact = functools.partial(chunks, separable=True), functools.partial(chunks, separable=False)
    return lambda *arrays: checkpointed_cond(span(*arrays) <= SEPARABLE_SPAN, separable, exact, *arrays)


def _solve(chunks, state: Array, *args, per_key: bool) -> tuple[Array, Array]:
    """``(O, S_final)`` over chunk-major ``args`` (``(N, ...)``): a loop over groups of
    :func:`chunk_group` chunks carries the state; each step computes its chunks' arrays
    ``(Q', O_0, M, B) = chunks(*group)`` at once, then passes the state through them,
    ``S_{n+1} = M_n S_n + B_n``, ``O_n = Q'_n S_n + O_{0,n}``. Nothing per chunk is stacked
    but ``O``, ``(B, H, N, C, d_v)``: the step is checkpointed, or, ``per_key``, the cond in
    ``chunks`` checkpoints its branches (a cond inside a checkpoint keeps both branches'
    residuals) (DECISIONS.md, "The chunkwise delta rule carries its state through groups of
    chunks")."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    count = leaves[0].shape[0]
    group = min(chunk_group(args[0].shape[-2]), count)
    pad = -count % group  # padding chunks leave the state as it is and are cut from O
    padded = [jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a for a in leaves]
    grouped = [a.reshape(-1, group, *a.shape[1:]) for a in padded]
    real = (jnp.arange(count + pad) < count).reshape(-1, group)

    def step(S: Array, xs) -> tuple[Array, Array]:
        real, arrays = xs
        Qp, O0, M, B = chunks(*jax.tree_util.tree_unflatten(tree, arrays))
        incoming = []
        for n in range(group):
            incoming.append(S)
            S = jnp.matmul(M[n], S) + B[n] if not pad else jnp.where(real[n], jnp.matmul(M[n], S) + B[n], S)
        return S, O0 + jnp.einsum("...id,...de->...ie", Qp, jnp.stack(incoming))

    final, out = jax.lax.scan(step if per_key else jax.checkpoint(step, prevent_cse=False), state, (real, grouped))
    return jnp.moveaxis(out.reshape(-1, *out.shape[2:])[:count], 0, 2), final


def _delta_chunks(q, k, v, beta, b, seg: Segments, separable: bool):
    """``(Q', O_0, M, B)`` of every chunk of the gated delta rule."""
    start, out, total = decay_factors(b, seg, k)
    if b is not None and b.ndim == q.ndim - 1:  # per head: one (C, C) decay factor serves both scores
        gamma = _masked_exp(b[..., :, None] - b[..., None, :], seg.same)
        strict = ~jnp.eye(q.shape[-2], dtype=bool)
        kk = jnp.where(strict, jnp.einsum("...id,...jd->...ij", k, k) * gamma, 0)
        qk = jnp.einsum("...id,...jd->...ij", q, k) * gamma
    else:
        kk = _scores(k, k, b, seg.same, strict=True, separable=separable)
        qk = _scores(q, k, b, seg.same, separable=separable)
    A = beta[..., :, None] * kk
    T = unit_lower_inverse(A)
    d_k = k.shape[-1]
    rhs = jnp.concatenate([k * (beta[..., None] * start), v * beta[..., None]], axis=-1)
    WU = jnp.einsum("...ij,...je->...ie", T, rhs)  # [W | U0]: the pseudo-values are U0 - W S_0
    PWU = jnp.einsum("...ij,...je->...ie", qk, WU)
    MB = jnp.einsum("...jd,...je->...de", k * out, WU)
    # Cut by jnp.split, whose transpose is one concatenate (slices transpose to pads and adds).
    (PW, PU), (MW, MU) = (jnp.split(a, [d_k], axis=-1) for a in (PWU, MB))
    return q * start - PW, PU, _diag(total, d_k) - MW, MU


def _dplr_chunks(q, k, v, a, b_vec, c, c_prev, seg: Segments, separable: bool):
    """``(Q', O_0, M, B)`` of every chunk of the DPLR recurrence; ``c``: cumulative log decay
    through step ``i``, ``c_prev`` before it."""
    start, out, total = decay_factors(c, seg, k)
    read_start = jnp.exp(c_prev) * seg.open[..., None]  # a_j reads S_0 decayed to step j - 1
    scores = functools.partial(_scores, b=c, same=seg.same, separable=separable)
    T = unit_lower_inverse(-scores(a, b_vec, strict=True, b_rows=c_prev))
    A_ak = scores(a, k, strict=True, b_rows=c_prev)
    d_k = k.shape[-1]
    rhs = jnp.concatenate([a * read_start, jnp.einsum("...ij,...je->...ie", A_ak, v)], axis=-1)
    WU = jnp.einsum("...ij,...je->...ie", T, rhs)  # [W | U0]: u_j = S_{j-1}^T a_j = rows of W S_0 + U0
    PWU = jnp.einsum("...ij,...je->...ie", scores(q, b_vec), WU)
    BWU = jnp.einsum("...jd,...je->...de", b_vec * out, WU)
    (PW, PU), (BW, BU) = (jnp.split(a, [d_k], axis=-1) for a in (PWU, BWU))
    Qp = q * start + PW
    O0 = jnp.einsum("...ij,...je->...ie", scores(q, k), v) + PU
    B = jnp.einsum("...jd,...je->...de", k * out, v) + BU
    return Qp, O0, _diag(total, d_k) + BW, B


def _diag(total: Array, size: int) -> Array:
    """``(..., size, size)`` diagonal matrices of ``total`` (``(..., size)`` or ``(..., 1)``)."""
    return total[..., :, None] * jnp.eye(size, dtype=total.dtype)


def delta_rule(q, k, v, beta, g, state: Array, seg: Segments, scale: float):
    """The gated delta rule over chunks.

    Args:
      q, k: ``(B, H, N, C, d_k)``; v: ``(B, H, N, C, d_v)``; beta: ``(B, H, N, C)`` (0 on padding).
      g: ``None``, ``(B, H, N, C)`` or ``(B, H, N, C, d_k)``: log decays ``<= 0`` (0 on padding).
      state: ``(B, H, d_k, d_v)`` before the first chunk; seg: :class:`Segments` of the resets.

    Returns:
      ``(o, final)``: ``(B, H, N, C, d_v)`` and ``(B, H, d_k, d_v)``.
    """
    q = q * jnp.asarray(scale, q.dtype)
    b = None if g is None else jnp.cumsum(jnp.maximum(g, LOG_DECAY_FLOOR), axis=3)
    span = lambda q, k, v, beta, b, seg: jnp.max(b[..., 0, :] - b[..., -1, :], initial=0.0)
    per_key = b is not None and b.ndim == q.ndim
    chunks = _per_group(_delta_chunks, per_key, span)
    return _solve(chunks, state, *jax.tree.map(_chunk_major, (q, k, v, beta, b, seg)), per_key=per_key)


def dplr(q, k, v, a, b, w, state: Array, seg: Segments, scale: float):
    """The diagonal-plus-low-rank recurrence over chunks.

    Args:
      q, k, a, b: ``(B, H, N, C, d_k)`` (0 on padding for ``k``, ``a``, ``b``); v:
        ``(B, H, N, C, d_v)``; w: ``(B, H, N, C, d_k)``, log decays ``<= 0`` (0 on padding).
      state, seg: as in :func:`delta_rule`.

    Returns:
      ``(o, final)``: ``(B, H, N, C, d_v)`` and ``(B, H, d_k, d_v)``.
    """
    q = q * jnp.asarray(scale, q.dtype)
    w = jnp.maximum(w, LOG_DECAY_FLOOR)
    c = jnp.cumsum(w, axis=3)
    span = lambda q, k, v, a, b, c, c_prev, seg: jnp.max(c_prev[..., 0, :] - c[..., -1, :], initial=0.0)
    chunks = _per_group(_dplr_chunks, True, span)
    return _solve(chunks, state, *jax.tree.map(_chunk_major, (q, k, v, a, b, c, c - w, seg)), per_key=True)
