r"""ELK (Gonzalez et al. 2024): one Levenberg-Marquardt step of Newton's method over all
states, computed as a parallel Kalman filter and smoother (Sarkka and Garcia-Fernandez 2021)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.engines.affine import DIAG, FULL, mv, solve_affine

Array = jax.Array


class _Ops(NamedTuple):
    mm: Callable  # matrix product
    mv: Callable  # matrix-vector product
    t: Callable  # transpose
    solve: Callable  # solve(A, B) = A^{-1} B (B a matrix)
    solve_v: Callable  # solve(A, b) = A^{-1} b (b a vector)
    eye: Callable  # identity like a matrix


def solve_small(a: Array, b: Array) -> Array:
    """``a^{-1} b`` for a batch of small matrices ``a`` (..., n, n) and ``b`` (..., n, m), by
    Gauss-Jordan elimination with partial pivoting in a ``fori_loop`` over the n columns.
    Not ``jnp.linalg.solve``, which deadlocked on CPU (``benchmarks/lab/DECISIONS.md``).
    """
    n = a.shape[-1]
    batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    ab = jnp.concatenate(
        [jnp.broadcast_to(a, batch + a.shape[-2:]), jnp.broadcast_to(b, batch + b.shape[-2:])], axis=-1
    )
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
    mv=mv,
    t=lambda a: jnp.swapaxes(a, -1, -2),
    solve=solve_small,
    solve_v=lambda a, b: solve_small(a, b[..., None])[..., 0],
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


def elk_step(J: Array, u: Array, F: Array, S: Array, damping: float, full: bool) -> Array:
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
    E = jnp.concatenate([E, jnp.zeros_like(J[:1])], axis=0)  # J[:1], not E[:1]: E is empty when T = 1
    g = jnp.concatenate([g, m[-1:]], axis=0)
    monoid = FULL if full else DIAG
    x = solve_affine(monoid, (jnp.flip(E, 0), jnp.flip(g, 0)), jnp.zeros_like(g[0]))
    return jnp.flip(x, 0)
