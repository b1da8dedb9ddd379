r"""The Newton engine: any cell's states solved over the whole sequence at once (DEER,
quasi-DEER, ELK), with a sequential fallback when the iteration does not converge.

The states :math:`s_{1..T}` (each carry flattened to a real vector of size ``n``,
:class:`rnnjax.carry.CarryLayout`) are the fixed point of :math:`s_t = f(s_{t-1}, x_t)`. From
:math:`s^{(0)} = 0`, each iteration linearises every step around the current guess,
:math:`J_t = \partial f / \partial s\,(s^{(k)}_{t-1}, x_t)`, and solves the linear recurrence

.. math::

    s_t = J_t s_{t-1} + f(s^{(k)}_{t-1}, x_t) - J_t s^{(k)}_{t-1}

with an associative scan (Lim et al. 2023), or on CPU by default a sequential scan of that
cheap linear recurrence (``rj.Newton(solve=...)``). ``"deer"`` uses full Jacobians, ``"quasi-deer"``
their diagonals (Gonzalez et al. 2024), ``"elk"``/``"quasi-elk"`` damped steps
(:mod:`rnnjax.engines.elk`). Gradients come from the implicit function theorem at the
solution: the adjoint :math:`\lambda_t = \bar s_t + J_{t+1}^\top \lambda_{t+1}` is a reverse
linear recurrence solved the same way. Second derivatives (``jax.hessian``, ``jax.grad`` of
``jax.grad``) are exact too: the solve and the quasi variants' adjoint iterations differentiate
as their solutions do (``jax.custom_jvp`` rules with the exact Jacobians' linear recurrences),
not as their iterations, which follow approximate Jacobians.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.carry import CarryLayout
from rnnjax.cell import Cell, StructuredJacobian
from rnnjax.checks import check_positive_int, check_positive_number
from rnnjax.engines.affine import DIAG, solve_affine
from rnnjax.engines.elk import elk_step
from rnnjax.engines.jacobians import Structure, jacobian_fn, structure_for
from rnnjax.sequence import TimeMajor
from rnnjax.sharding.mesh import SequenceSharding

Array = jax.Array

VARIANTS = ("deer", "quasi-deer", "elk", "quasi-elk")
INITS = ("zero", "step")
SOLVES = ("associative", "sequential")
DEFAULT_DAMPING = 1.0  # ELK's initial Levenberg-Marquardt damping
MAX_ITERS = 2**31 - 1  # the iteration counter is an int32
# Convergence threshold on max |s_t - f(s_{t-1}, x_t)| when tol="auto", by the state's dtype:
# well above where float32 rounding leaves the residual of a bounded state (2e-7 for a
# GRU over T=4096 after DEER converged), well below the accuracy models need.
DEFAULT_TOL = {2: 2e-2, 4: 1e-5, 8: 1e-10}  # itemsize -> tol (2: bfloat16, float16)


class NewtonInfo(NamedTuple):
    r"""What a Newton solve did (scalars over the whole batch, but ``states``).

    Attributes:
      iterations: ``()`` int32, Newton steps taken (each one parallel linear solve).
      converged: ``()`` bool, whether ``residual <= tol`` (with ``tol=None``: the dtype's
        default tolerance, reported only). In the converging mode ``False`` means the returned
        values are the sequential driver's (the fallback).
      residual: ``()`` float, :math:`\max_{t,i} |s_{t,i} - f(s_{t-1}, x_t)_i|` at the last
        iterate, over the real-valued flattened carry (complex parts count separately).
      states: the carry after every step, each leaf ``(*batch, T, ...)`` aligned with the
        inputs (what ``guess=`` of :func:`rnnjax.parallel.newton_scan` takes), or ``None``
        (``rj.scan`` does not keep them).
    """

    iterations: Array
    converged: Array
    residual: Array
    states: Any = None


def check_options(variant: Any, tol: Any, max_iters: Any, damping: Any, init: Any, keep_states: Any) -> None:
    """Raise ``ValueError`` naming the first bad option of ``rj.Newton(...)``."""
    if variant != "auto" and variant not in VARIANTS:
        raise ValueError(f"unknown Newton variant {variant!r}; expected 'auto' or one of {list(VARIANTS)}")
    if isinstance(tol, str):
        if tol != "auto":
            raise ValueError(f'tol must be a positive number, "auto" or None, got {tol!r}')
    elif tol is not None:
        check_positive_number(tol, "tol")
    check_positive_int(max_iters, "max_iters")
    if max_iters > MAX_ITERS:
        raise ValueError(f"max_iters must be at most 2**31 - 1 = {MAX_ITERS}, got {max_iters}")
    if damping is not None:
        check_positive_number(damping, "damping")
        if variant not in ("elk", "quasi-elk"):
            raise ValueError(f"damping applies to the variants 'elk' and 'quasi-elk'; got {variant!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
    if keep_states not in (True, False):
        raise ValueError(f"keep_states must be True or False, got {keep_states!r}")


def best_variant(cell: Cell) -> str:
    """What ``rj.Newton(variant="auto")`` runs: ``"deer"`` where the cell gives its exact
    Jacobian blocks (:class:`rnnjax.cell.StructuredJacobian` with ``jacobian_kind == "exact"``:
    exact Newton at quasi-DEER's cost, e.g. 3 iterations where quasi-DEER needed 10 on
    ``rj.ParaLSTM`` at T = 4096), else ``"quasi-deer"`` (full ``jax.jacfwd`` Jacobians cost
    ``n`` tangents per step and ``T n^2`` memory)."""
    exact = isinstance(cell, StructuredJacobian) and cell.jacobian_kind == "exact"
    return "deer" if exact else "quasi-deer"


def default_tol(dtype: Any) -> float:
    """The ``tol="auto"`` threshold for states of real dtype ``dtype``."""
    return DEFAULT_TOL.get(jnp.dtype(dtype).itemsize, 1e-5)


def run(
    cell: Cell,
    params: Any,
    seqs: TimeMajor,
    *,
    variant: str,
    tol: float | str | None,
    max_iters: int,
    damping: float | None,
    unroll: int | bool,
    init: str = "zero",
    guess: Any = None,
    keep_states: bool = False,
    time_sharding: SequenceSharding | None = None,
    solve: str = "associative",
):
    """``(ys_tm, final, info)`` by Newton's method (``variant`` one of :data:`VARIANTS`);
    ``T >= 1``. ``tol``: a threshold, ``"auto"`` (:func:`default_tol`) or ``None`` (exactly
    ``max_iters`` iterations, no check, no fallback). ``init``: the first iterate, zeros or
    one step of the cell from zero states (:data:`INITS`); ``guess``: states to start from
    instead, leaves ``(T, *batch, ...)`` in ``seqs``' time order; ``keep_states``: return
    the carries after every step in that layout as ``info.states``; ``solve``:
    ``"associative"`` or ``"sequential"``, how the (DEER and quasi-DEER) linear recurrences
    and the adjoint's are solved (``time_sharding`` solves them across devices instead)."""
    fwd, back = seqs.forwards()
    steps = fwd.steps
    batch_shape = fwd.batch_shape
    nb = len(batch_shape)
    batch = math.prod(batch_shape)
    features = fwd.xs.shape[1 + nb :]
    carry = fwd.carry
    # One sequence's carry: its leaves without the batch axes (ConvLSTM keeps (H, W)).
    layout = CarryLayout(jax.tree.map(lambda c: jax.ShapeDtypeStruct(c.shape[nb:], c.dtype), carry))
    if isinstance(tol, str):
        tol = default_tol(layout.real)
    x_p = fwd.xs.reshape((steps, batch) + features)
    r_p = jnp.zeros((steps, batch), bool) if fwd.resets is None else fwd.resets.reshape(steps, batch)
    v_p = jnp.ones((steps, batch), bool) if fwd.valid is None else fwd.valid.reshape(steps, batch)
    if time_sharding is not None:
        x_p, r_p, v_p = (time_sharding.constrain(a) for a in (x_p, r_p, v_p))
    carry_b = jax.tree.map(lambda c: c.reshape((batch,) + c.shape[nb:]), carry)
    h0 = jax.vmap(layout.flatten)(carry_b)  # (B, n)
    s0 = None
    if guess is not None:
        guess = jax.tree.map(lambda g: back(g).reshape((steps, batch) + g.shape[1 + nb :]), guess)
        s0 = jax.vmap(jax.vmap(layout.flatten))(guess)

    if solve not in SOLVES:
        raise ValueError(f"solve must be one of {list(SOLVES)}, got {solve!r}")
    structure = structure_for(cell, layout, variant)
    options = _Options(variant, tol, max_iters, damping, unroll, init, structure, solve == "sequential")
    solver = _newton_solver(cell, layout, options, time_sharding)
    states, ys, iterations, converged, residual = solver(params, x_p, h0, r_p, v_p, s0)
    final = jax.vmap(layout.unflatten)(states[-1])
    final = jax.tree.map(lambda f, c: f.reshape(c.shape), final, carry)
    carries = None
    if keep_states:
        carries = jax.vmap(jax.vmap(layout.unflatten))(states)
        carries = jax.tree.map(lambda s, c: back(s.reshape((steps,) + c.shape)), carries, carry)
    ys = back(ys.reshape((steps,) + batch_shape + ys.shape[2:]))
    return ys, final, NewtonInfo(iterations, converged, residual, carries)


class _Options(NamedTuple):
    variant: str
    tol: float | None
    max_iters: int
    damping: float | None
    unroll: int | bool
    init: str
    structure: Structure
    sequential_solve: bool


def _step_fn(cell: Cell, layout: CarryLayout):
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


def _newton_solver(cell, layout, options: _Options, time_sharding=None):
    """``solve(params, X, h0, R, V, S0) -> (S, Y, iterations, converged, residual)`` with ``S``
    (T, B, n) the states after each step and ``Y`` (T, B, ...) the outputs, both from one
    evaluation of the step at the last iterate and differentiable by the implicit function
    theorem; ``S0`` the first iterate or ``None``."""
    variant, tol, max_iters, damping, unroll, init, structure, sequential_solve = options
    fixed = tol is None
    report_tol = default_tol(layout.real) if fixed else tol
    elk = variant in ("elk", "quasi-elk")
    step = _step_fn(cell, layout)
    batched = (None, 0, 0, 0, 0)
    one_jacobian = jacobian_fn(cell, layout, structure, step)

    def values(params, prev, X, R, V):
        return jax.vmap(jax.vmap(lambda *a: step(*a)[0], batched), batched)(params, prev, X, R, V)

    def outputs(params, prev, X, R, V):
        return jax.vmap(jax.vmap(step, batched), batched)(params, prev, X, R, V)

    def jacobians(params, prev, X, R, V):
        """``(J, F, Y)``: J (T, B, ...) in ``structure``'s form, F = f(prev) and the outputs Y."""
        return jax.vmap(jax.vmap(one_jacobian, batched), batched)(params, prev, X, R, V)

    def shift(S, h0):
        return jnp.concatenate([h0[None], S[:-1]], axis=0)

    def sequential(params, X, h0, R, V):
        one = jax.vmap(step, (None, 0, 0, 0, 0))

        def body(s, inputs):
            s, y = one(params, s, *inputs)
            return s, (s, y)

        return jax.lax.scan(body, h0, (X, R, V), unroll=unroll)[1]

    @jax.custom_jvp
    def forward(params, X, h0, R, V, S0):
        if S0 is None:
            S0 = jnp.zeros(X.shape[:2] + (layout.n,), layout.real)
            if init == "step":  # one step of the cell from zero states, all steps at once
                S0 = values(params, S0, X, R, V)
        S = S0.astype(layout.real)
        # Each iteration linearises at the states it produced, so the cell runs once per
        # iteration: F (for the residual and the next right-hand side) and the outputs Y come
        # with J, and the returned states and outputs are that evaluation's (no extra one).
        J, F, Y = jacobians(params, shift(S, h0), X, R, V)
        lam = jnp.asarray(damping if elk else 0.0, layout.real)
        init_state = (jnp.int32(0), S, F, Y, J, _max_abs(S - F), lam, jnp.sum(jnp.square(S - F)))

        def cond(state):
            k, _, _, _, _, r, _, _ = state
            return (k < max_iters) & (r > tol) & jnp.isfinite(r)

        def body(state):
            k, S, F, Y, J, r, lam, merit = state
            u = F - structure.matvec(J, shift(S, h0))
            if not elk:
                S_new = structure.solve(J, u, h0, time_sharding, sequential_solve)
                J_new, F_new, Y_new = jacobians(params, shift(S_new, h0), X, R, V)
                return k + 1, S_new, F_new, Y_new, J_new, _max_abs(S_new - F_new), lam, merit
            S_new = elk_step(J, u, F, S, lam, structure.kind == "full")
            J_new, F_new, Y_new = jacobians(params, shift(S_new, h0), X, R, V)
            merit_new = jnp.sum(jnp.square(S_new - F_new))
            # Levenberg-Marquardt: keep a step that lowers the merit and trust the model more
            # next time; otherwise stay and damp ten times harder.
            accept = merit_new < merit
            pick = lambda new, old: jnp.where(accept, new, old)
            lam = jnp.clip(jnp.where(accept, lam / 10, lam * 10), 1e-12, 1e12).astype(lam.dtype)
            r_new = _max_abs(S_new - F_new)
            kept = (pick(S_new, S), pick(F_new, F), pick(Y_new, Y), pick(J_new, J), pick(r_new, r))
            return k + 1, *kept, lam, pick(merit_new, merit)

        if fixed:  # ParaRNN's training mode: a fixed count, no data-dependent loop or branch
            k, _, F, Y, _, residual, _, _ = jax.lax.fori_loop(0, max_iters, lambda _, state: body(state), init_state)
            return F, Y, k, residual <= report_tol, residual
        k, _, F, Y, _, residual, _, _ = jax.lax.while_loop(cond, body, init_state)
        converged = residual <= tol
        S, Y = jax.lax.cond(converged, lambda: (F, Y), lambda: sequential(params, X, h0, R, V))
        return S, Y, k, converged, residual

    @forward.defjvp
    def forward_jvp(primals, tangents):
        # The returned states solve S = f(shift(S)) (to tol), so their tangent is the implicit
        # function theorem's: dS_t = J_t dS_{t-1} + the step's tangent at fixed states, with the
        # exact J_t. Autodiff through the iteration would follow the Jacobians it iterated with
        # instead (diagonals; a DenseCell's step_with_jacobian has the step's values but only
        # their unit-diagonal state tangents). jax.hessian takes this path, forward mode over
        # the custom_vjp's residuals.
        params, X, h0, R, V, _ = primals
        d_params, d_X, d_h0 = tangents[:3]
        out = forward(*primals)
        prev = shift(out[0], h0)
        if structure.exact:
            _, (d_F, _) = jax.jvp(lambda p, x: outputs(p, prev, x, R, V), (params, X), (d_params, d_X))
            J = jacobians(params, prev, X, R, V)[0]
            d_S = structure.solve(J, d_F, d_h0, time_sharding, sequential_solve)
        else:  # no exact Jacobians at hand: the step's own tangent map, step by step
            d_S = sequential_tangent(params, prev, X, R, V, d_params, d_X, d_h0)
        tangent = lambda p, x, s: outputs(p, s, x, R, V)
        _, (d_S, d_Y) = jax.jvp(tangent, (params, X, prev), (d_params, d_X, shift(d_S, d_h0)))
        no_tangent = [np.zeros(jnp.shape(a), jax.dtypes.float0) for a in out[2:4]]
        return out, (d_S, d_Y, *no_tangent, jnp.zeros_like(out[4]))

    def sequential_tangent(params, prev, X, R, V, d_params, d_X, d_h0):
        """dS_t = J_t dS_{t-1} + (the step's tangent in params and x_t), from dS_0 = d_h0."""
        one = jax.vmap(lambda p, s, x, r, v: step(p, s, x, r, v)[0], (None, 0, 0, 0, 0))

        def body(d_s, inputs):
            s, x, r, v, d_x = inputs
            d_s = jax.jvp(lambda p, s, x: one(p, s, x, r, v), (params, s, x), (d_params, d_s, d_x))[1]
            return d_s, d_s

        return jax.lax.scan(body, d_h0, (prev, X, R, V, d_X), unroll=unroll)[1]

    @jax.custom_vjp
    def solve(params, X, h0, R, V, S0):
        return forward(params, X, h0, R, V, S0)

    def solve_fwd(params, X, h0, R, V, S0):
        out = forward(params, X, h0, R, V, S0)
        return out, (params, X, h0, R, V, out[0])

    def solve_bwd(res, cts):
        params, X, h0, R, V, S = res
        S_bar, Y_bar = cts[0], cts[1]
        prev = shift(S, h0)
        # (S_t, Y_t) = step(S_{t-1}, x_t): Y_t's cotangent reaches the states through S_{t-1}
        # (joining S's own cotangent before the adjoint solve), and the parameters, inputs and
        # h0 in the one product with the step's transpose below.
        _, vjp_y = jax.vjp(lambda s: outputs(params, s, X, R, V)[1], prev)
        prev_bar_y = vjp_y(Y_bar)[0]
        S_bar = S_bar + jnp.concatenate([prev_bar_y[1:], jnp.zeros_like(prev_bar_y[:1])], axis=0)
        if structure.exact:  # one reverse linear solve with the Jacobians themselves
            J = jacobians(params, prev, X, R, V)[0]
            lam = _adjoint_exact(structure, J, S_bar, time_sharding, sequential_solve)
        else:
            lam = adjoint_quasi(params, prev, X, R, V, S_bar)
        _, vjp = jax.vjp(lambda p, x, s: outputs(p, s, x, R, V), params, X, prev)
        p_bar, x_bar, prev_bar = vjp((lam, Y_bar))
        return p_bar, x_bar, prev_bar[0], None, None, None

    @jax.custom_jvp
    def adjoint_quasi(params, prev, X, R, V, S_bar):
        """lambda_t = S_bar_t + J_{t+1}^T lambda_{t+1}, by iterations whose linear part keeps
        only diag(J): lambda <- reverse-solve(D, S_bar + shift(J^T lambda - D lambda))."""
        D = jacobians(params, prev, X, R, V)[0]
        D_next = jnp.concatenate([D[1:], jnp.zeros_like(D[:1])], axis=0)
        _, vjp_s = jax.vjp(lambda s: values(params, s, X, R, V), prev)

        def jt(lam):  # (J_{t+1}^T lambda_{t+1}) at t; zero at the last step
            q = vjp_s(lam)[0]
            return jnp.concatenate([q[1:], jnp.zeros_like(q[:1])], axis=0)

        def reverse_solve(rhs):
            elems = (jnp.flip(D_next, 0), jnp.flip(rhs, 0))
            chunk = rhs.shape[0] if sequential_solve else None  # one chunk of all steps: sequential
            return jnp.flip(solve_affine(DIAG, elems, jnp.zeros_like(rhs[0]), chunk, time_sharding), 0)

        lam = reverse_solve(S_bar)
        q = jt(lam)
        scale = lambda lam: 1.0 + _max_abs(lam)
        r = _max_abs(lam - S_bar - q)

        def cond(state):
            k, lam, _, r = state
            return (k < max_iters) & (r > tol * scale(lam)) & jnp.isfinite(r)

        def body(state):
            k, lam, q, _ = state
            lam = reverse_solve(S_bar + q - D_next * jnp.concatenate([lam[1:], jnp.zeros_like(lam[:1])], axis=0))
            q = jt(lam)
            return k + 1, lam, q, _max_abs(lam - S_bar - q)

        if fixed:
            return jax.lax.fori_loop(0, max_iters, lambda _, state: body(state), (jnp.int32(0), lam, q, r))[1]
        _, lam, _, r = jax.lax.while_loop(cond, body, (jnp.int32(0), lam, q, r))
        ok = r <= tol * scale(lam)
        return jax.lax.cond(ok, lambda: lam, lambda: _adjoint_sequential(params, prev, X, R, V, S_bar))

    @adjoint_quasi.defjvp
    def adjoint_quasi_jvp(primals, tangents):
        # The tangent of the solution, not of the iterations (which lags their values): the same
        # recurrence with the tangent of its right-hand side, dS_bar_t + d(J_{t+1}^T) lambda_{t+1},
        # solved by a reverse scan that is linear in the tangents, so reverse mode can transpose
        # it too (jax.grad of jax.grad).
        params, prev, X, R, V, S_bar = primals
        d_params, d_prev, d_X, _, _, d_S_bar = tangents
        lam = adjoint_quasi(*primals)
        jt_lam = lambda p, s, x: jax.vjp(lambda s: values(p, s, x, R, V), s)[1](lam)[0]
        d_q = jax.jvp(jt_lam, (params, prev, X), (d_params, d_prev, d_X))[1]
        rhs = d_S_bar + jnp.concatenate([d_q[1:], jnp.zeros_like(d_q[:1])], axis=0)
        return lam, _adjoint_sequential(params, prev, X, R, V, rhs)

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


def _max_abs(a: Array) -> Array:
    """``max |a|``; 0 for an empty ``a`` (a batch of no sequences)."""
    return jnp.max(jnp.abs(a), initial=0.0)


def _adjoint_exact(structure: Structure, J: Array, S_bar: Array, time_sharding=None, sequential=False) -> Array:
    """lambda_t = S_bar_t + J_{t+1}^T lambda_{t+1}, lambda_T = S_bar_T, by a reverse scan."""
    M = jnp.concatenate([structure.transpose(J[1:]), jnp.zeros_like(J[:1])], axis=0)
    lam = structure.solve(jnp.flip(M, 0), jnp.flip(S_bar, 0), jnp.zeros_like(S_bar[0]), time_sharding, sequential)
    return jnp.flip(lam, 0)
