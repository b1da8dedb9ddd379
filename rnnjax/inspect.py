r"""Dynamical-systems tools for any rnnjax cell: why did the RNN do that?

A cell's step ``(params, carry, x) -> (carry, y)`` is a map :math:`h_t = F(h_{t-1}, x_t)`
of its state. This module looks at that map with JAX's transformations:

- :func:`jacobian_horizon`: how strongly the final state depends on the state at every
  earlier step, :math:`\|\partial h_{T-1} / \partial h_t\|`, and the per-step saliency
  :math:`\|\partial y_{T-1} / \partial x_t\|` (Bengio et al. 1994; Pascanu et al. 2013),
  all steps from one forward and one (seed-batched) reverse pass.
- :func:`integrated_gradients`: attributions of an output to every input step along the
  straight path from a baseline (Sundararajan et al. 2017); they sum to the output
  difference (completeness).
- :func:`fixed_points`: points with :math:`F(h^*, x) = h^*` for a constant input, found
  by minimising :math:`q(h) = \tfrac12 \|F(h, x) - h\|^2` from many initial states with
  an Optax optimiser and a few Newton steps (Sussillo & Barak 2013), with their Jacobians,
  eigenvalues and stability (:func:`classify_stability`). :func:`fixed_point_candidates`
  is the jit-able optimisation alone.
- :func:`lyapunov_exponents`: the ``k`` largest Lyapunov exponents along a trajectory by
  the QR method (Benettin et al. 1980; Dieci et al. 1997).
- :func:`state_trajectory`: the state after every step, for PCA plots and for sampling
  initial states.
- Plots (matplotlib, imported only when called): :func:`plot_pca_trajectories`,
  :func:`plot_horizons`.

**The state vector.** Carries may be pytrees (LSTM's ``(h, c)``) and complex (LRU). Every
tool here works on the *state vector* of one sequence: the carry's leaves in tree order,
each raveled, a complex leaf contributing its real parts and then its imaginary parts
(:func:`state_vector`, :func:`carry_from_vector`). Its size ``n`` is the state size:
``hidden_size`` for Elman, GRU, MGU, IndRNN, minGRU and minLSTM; ``2 * hidden_size`` for
LSTM (``h`` then ``c``; ``proj_size + hidden_size`` with a projection) and for LRU (real
then imaginary parts). Jacobians, fixed points and Lyapunov exponents live in that space;
for the LRU a complex eigenvalue :math:`\lambda` of the recurrence shows up as the pair
:math:`\lambda, \bar\lambda` of a real 2x2 block.

Example:
  >>> import jax, jax.numpy as jnp, rnnjax as rj
  >>> cell = rj.GRU(hidden_size=8)
  >>> params = cell.init(jax.random.key(0), input_size=3)
  >>> xs = jax.random.normal(jax.random.key(1), (2, 20, 3))
  >>> horizon = rj.inspect.jacobian_horizon(cell, params, xs)
  >>> horizon.state.shape, horizon.saliency.shape
  ((2, 20), (2, 20))
  >>> rj.inspect.lyapunov_exponents(cell, params, xs, k=3).shape
  (2, 3)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnnjax.cell import Cell, PyTree, check_float_input
from rnnjax.scan import _check_lengths, _check_xs

__all__ = [
    "STABILITY_CLASSES",
    "Attribution",
    "FixedPoints",
    "Horizon",
    "carry_from_vector",
    "classify_stability",
    "fixed_point_candidates",
    "fixed_points",
    "integrated_gradients",
    "jacobian_horizon",
    "lyapunov_exponents",
    "plot_horizons",
    "plot_pca_trajectories",
    "state_trajectory",
    "state_vector",
]

STABILITY_CLASSES = ("stable", "unstable", "saddle", "marginal")


# ---- the state vector ------------------------------------------------------------------


def _ravel(carry: PyTree) -> jax.Array:
    """One (unbatched) carry -> its real state vector ``(n,)``."""
    parts = []
    for leaf in jax.tree_util.tree_leaves(carry):
        leaf = jnp.ravel(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            parts += [jnp.real(leaf), jnp.imag(leaf)]
        else:
            parts.append(leaf)
    dtype = jnp.result_type(*parts)
    return jnp.concatenate([p.astype(dtype) for p in parts])


def _unravel(vector: jax.Array, like: PyTree) -> PyTree:
    """The inverse of :func:`_ravel`: ``(n,)`` -> a carry shaped and typed as ``like``."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out, start = [], 0
    for leaf in leaves:
        size = math.prod(leaf.shape)
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            re = vector[start : start + size]
            im = vector[start + size : start + 2 * size]
            real_dtype = jnp.finfo(leaf.dtype).dtype
            value = jax.lax.complex(re.astype(real_dtype), im.astype(real_dtype))
            start += 2 * size
        else:
            value = vector[start : start + size]
            start += size
        out.append(value.astype(leaf.dtype).reshape(leaf.shape))
    return jax.tree_util.tree_unflatten(treedef, out)


def _size(like: PyTree) -> int:
    return sum(
        math.prod(leaf.shape) * (2 if jnp.issubdtype(leaf.dtype, jnp.complexfloating) else 1)
        for leaf in jax.tree_util.tree_leaves(like)
    )


def state_vector(cell: Cell, carry: PyTree) -> jax.Array:
    """A carry of ``cell`` as real state vectors: ``(*batch, n)``.

    Each leaf's per-sequence part (its last ``cell.input_ndim`` axes: ``(features,)``, or
    ``(H, W, features)`` for ConvLSTM) is raveled; leaves are concatenated in tree order,
    a complex leaf as its real parts followed by its imaginary parts.

    Example:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.LSTM(hidden_size=4)
      >>> rj.inspect.state_vector(cell, cell.init_carry((2, 3))).shape  # h then c
      (2, 3, 8)
    """
    leaves = jax.tree_util.tree_leaves(carry)
    if not leaves:
        raise ValueError("carry has no leaves")
    k = cell.input_ndim
    batch_shape = tuple(leaves[0].shape[: leaves[0].ndim - k])
    for leaf in leaves:
        if leaf.ndim < k or tuple(leaf.shape[: leaf.ndim - k]) != batch_shape:
            raise ValueError(
                f"carry has leaves of shapes {[tuple(l.shape) for l in leaves]}; expected "
                f"(*batch, features) with one batch shape, as {type(cell).__name__}.init_carry(batch_shape)"
            )
    flat = jax.tree.map(lambda leaf: leaf.reshape((-1, *leaf.shape[leaf.ndim - k :])), carry)
    vectors = jax.vmap(_ravel)(flat)
    return vectors.reshape((*batch_shape, vectors.shape[-1]))


def carry_from_vector(vector: jax.Array, like: PyTree) -> PyTree:
    """State vectors ``(*batch, n)`` back to a carry: the inverse of :func:`state_vector`.

    ``like`` is one unbatched carry (e.g. ``cell.init_carry()``) giving the leaves' shapes and
    dtypes; the result's leaves have shapes ``(*batch, *leaf.shape)``.

    Example:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.LRU(hidden_size=3)
      >>> h = rj.inspect.carry_from_vector(jnp.arange(6.0), cell.init_carry())  # real, imag
      >>> h
      Array([0.+3.j, 1.+4.j, 2.+5.j], dtype=complex64)
    """
    n = _size(like)
    vector = jnp.asarray(vector)
    if vector.ndim < 1 or vector.shape[-1] != n:
        raise ValueError(f"vector has shape {tuple(vector.shape)}; expected (..., {n}) for a carry like {_shapes(like)}")
    batch_shape = vector.shape[:-1]
    carries = jax.vmap(lambda v: _unravel(v, like))(vector.reshape(-1, n))
    return jax.tree.map(lambda leaf: leaf.reshape((*batch_shape, *leaf.shape[1:])), carries)


def _shapes(tree: PyTree) -> Any:
    return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


# ---- shared checks and set-up -------------------------------------------------------------


def _compute_dtype(x: jax.Array, params: Any) -> Any:
    leaves = [p for p in jax.tree_util.tree_leaves(params) if jnp.issubdtype(jnp.result_type(p), jnp.inexact)]
    return jnp.result_type(x, *leaves)


class _Sequences(NamedTuple):
    """Checked sequence inputs, batch axes flattened to one: ``xs (B, T, *feat)``."""

    xs: jax.Array
    carry: PyTree  # leaves (B, *per-sequence shape)
    lengths: jax.Array  # (B,)
    batch_shape: tuple[int, ...]
    like: PyTree  # one unbatched carry (template)


def _sequences(cell: Cell, params: Any, xs: Any, carry: PyTree | None, lengths: Any) -> _Sequences:
    xs = _check_xs(cell, params, xs)
    k = cell.input_ndim
    batch_shape = tuple(xs.shape[: xs.ndim - k - 1])
    steps = xs.shape[-(k + 1)]
    feat = tuple(xs.shape[xs.ndim - k :])
    dtype = _compute_dtype(xs, params)
    like = cell.carry_for(jax.ShapeDtypeStruct(feat, xs.dtype), dtype)
    like = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), like)
    batch = math.prod(batch_shape)
    x_step = jax.ShapeDtypeStruct((*batch_shape, *feat), xs.dtype)
    if carry is None:
        carry = cell.carry_for(x_step, dtype)
    else:
        cell.check_carry(carry, x_step)
    carry = jax.tree.map(lambda leaf, ref: jnp.asarray(leaf, ref.dtype).reshape((batch, *ref.shape)), carry, like)
    if lengths is None:
        lengths = jnp.full((batch,), steps, jnp.int32)
    else:
        lengths = jnp.clip(_check_lengths(lengths, batch_shape, steps), 0, steps).reshape(batch)
    return _Sequences(xs.reshape((batch, steps, *feat)), carry, lengths, batch_shape, like)


def _step_map(cell: Cell, params: Any, like: PyTree) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """``F(v, x) -> (v_next, y)`` on state vectors of one sequence; ``y`` raveled."""

    def step(v, x):
        new, y = cell.step(params, _unravel(v, like), x)
        new = jax.tree.map(lambda n, ref: n.astype(ref.dtype), new, like)
        return _ravel(new).astype(v.dtype), jnp.ravel(y)

    return step


def _unflatten_batch(value: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
    return value.reshape((*batch_shape, *value.shape[1:]))


# ---- trajectories --------------------------------------------------------------------------


def state_trajectory(cell: Cell, params: Any, xs: jax.Array, carry: PyTree | None = None, *,
                     lengths: jax.Array | None = None) -> jax.Array:
    """The state vector after every step: ``(*batch, T, n)``.

    Entry ``t`` is :func:`state_vector` of the carry after step ``t`` of
    ``rj.scan(cell, params, xs, carry, lengths=lengths)``; past a sequence's length the
    carry is frozen, so entries there repeat the last real state.

    Args:
      cell, params: any rnnjax cell and its parameters.
      xs: ``(*batch, T, D)`` inputs (``(*batch, T, H, W, C)`` for ConvLSTM).
      carry: initial carry as ``cell.init_carry(batch_shape)``; zeros when ``None``.
      lengths: ``(*batch,)`` integers in ``[0, T]``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.LSTM(hidden_size=4)
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> xs = jnp.ones((3, 5, 2))
      >>> states = rj.inspect.state_trajectory(cell, params, xs)
      >>> states.shape
      (3, 5, 8)
      >>> _, last = rj.scan(cell, params, xs)
      >>> bool(jnp.allclose(states[:, -1], rj.inspect.state_vector(cell, last)))
      True
    """
    seq = _sequences(cell, params, xs, carry, lengths)
    return _unflatten_batch(_trajectory_jit(cell, params, seq.xs, seq.carry, seq.lengths), seq.batch_shape)


@functools.partial(jax.jit, static_argnums=(0,))
def _trajectory_jit(cell, params, xs, carry, lengths):
    def one(xs, carry, length):
        like = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), carry)
        step = _step_map(cell, params, like)

        def body(v, inputs):
            t, x = inputs
            new, _ = step(v, x)
            new = jnp.where(t < length, new, v)
            return new, new

        _, vs = jax.lax.scan(body, _ravel(carry), (jnp.arange(xs.shape[0]), xs))
        return vs

    return jax.vmap(one)(xs, carry, lengths)


# ---- Jacobian horizon ------------------------------------------------------------------------


class Horizon(NamedTuple):
    r"""Output of :func:`jacobian_horizon`; both ``(*batch, T)``.

    Attributes:
      state: :math:`\|\partial h_{L-1} / \partial h_t\|`, ``h_t`` the state after step ``t``
        and ``L`` the sequence's length: how much a perturbation of the state after step
        ``t`` still moves the final state. Entry ``L - 1`` is the norm of the identity
        (``sqrt(n)`` for the Frobenius norm, 1 for the spectral norm).
      saliency: :math:`\|\partial y_{L-1} / \partial x_t\|`, the norm over the output's and
        the input's features of the last real output's dependence on input step ``t``.

    Entries at ``t >= L`` are 0.
    """

    state: jax.Array
    saliency: jax.Array


_NORMS = ("fro", 2)


def jacobian_horizon(cell: Cell, params: Any, xs: jax.Array, carry: PyTree | None = None, *,
                     lengths: jax.Array | None = None, ord: str | int = "fro") -> Horizon:
    r"""Norms of :math:`\partial h_{T-1} / \partial h_t` and :math:`\partial y_{T-1} / \partial x_t`
    for every step ``t``, from one forward and one reverse pass.

    With :math:`h_t = F(h_{t-1}, x_t)` the state after step ``t`` (the carry as a state
    vector, see the module docstring) and :math:`J_s = \partial F / \partial h` at step ``s``:

    .. math::

        \frac{\partial h_{T-1}}{\partial h_t} = J_{T-1} J_{T-2} \cdots J_{t+1}, \qquad
        \frac{\partial y_{T-1}}{\partial x_t} = \frac{\partial y_{T-1}}{\partial h_{T-2}}
            J_{T-2} \cdots J_{t+1} \frac{\partial F}{\partial x}\Big|_t \quad (t < T - 1)

    How it is computed: the scan runs once with a zero perturbation :math:`\epsilon_t`
    added to the state after every step; one ``jax.vjp`` of
    :math:`(\epsilon, x) \mapsto (h_{T-1}, y_{T-1})` gives
    :math:`\partial h_{T-1} / \partial \epsilon_t = \partial h_{T-1} / \partial h_t` for
    every ``t`` at once, and its reverse pass is batched (``vmap``) over the ``n + m`` unit
    cotangents (``n`` state, ``m`` output features) to get whole matrices. Cost: one
    forward pass and one reverse pass of width ``n + m``; memory ``(n + m) T (n + D)``
    per sequence.

    Args:
      cell, params: any rnnjax cell and its parameters.
      xs: ``(*batch, T, D)`` (``(*batch, T, H, W, C)`` for ConvLSTM). Any batch axes.
      carry: initial carry, as ``cell.init_carry(batch_shape)``; zeros when ``None``.
      lengths: ``(*batch,)`` integers in ``[0, T]``. A sequence's final state and output
        are those of its step ``L - 1``, as in :func:`rnnjax.scan`; entries at ``t >= L``
        are 0 (a sequence of length 0 is all zeros).
      ord: the matrix norm, ``"fro"`` (Frobenius; default) or ``2`` (spectral, the largest
        singular value; an extra SVD per step).

    Returns:
      :class:`Horizon` ``(state, saliency)``, each ``(*batch, T)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.Elman(hidden_size=4)
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> xs = jnp.ones((2, 6, 2))
      >>> horizon = rj.inspect.jacobian_horizon(cell, params, xs, lengths=jnp.array([6, 3]))
      >>> horizon.state.shape
      (2, 6)
      >>> float(horizon.state[1, 2]), [float(v) for v in horizon.state[1, 3:]]  # sqrt(4); past L
      (2.0, [0.0, 0.0, 0.0])
    """
    if ord not in _NORMS:
        raise ValueError(f"ord must be 'fro' (Frobenius) or 2 (spectral), got {ord!r}")
    seq = _sequences(cell, params, xs, carry, lengths)
    state, saliency = _horizon_jit(cell, params, seq.xs, seq.carry, seq.lengths, ord)
    return Horizon(_unflatten_batch(state, seq.batch_shape), _unflatten_batch(saliency, seq.batch_shape))


def _matrix_norm(m: jax.Array, ord: str | int) -> jax.Array:
    """Norm of each ``(..., rows, cols)`` matrix."""
    if ord == "fro":
        return jnp.sqrt(jnp.sum(jnp.square(m), axis=(-2, -1)))
    return jnp.linalg.svd(m, compute_uv=False)[..., 0]


@functools.partial(jax.jit, static_argnums=(0, 5))
def _horizon_jit(cell, params, xs, carry, lengths, ord):
    def one(xs, carry, length):
        like = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), carry)
        step = _step_map(cell, params, like)
        steps = xs.shape[0]
        v0 = _ravel(carry)

        def run(eps, xs):
            def body(v, inputs):
                t, x, e = inputs
                new, y = step(v, x)
                # Past the length the carry is frozen and no perturbation enters.
                return jnp.where(t < length, new + e, v), y

            final, ys = jax.lax.scan(body, v0, (jnp.arange(steps), xs, eps))
            y_last = ys[jnp.clip(length - 1, 0, steps - 1)] * (length > 0).astype(ys.dtype)
            return final, y_last

        eps = jnp.zeros((steps, v0.shape[0]), v0.dtype)
        (final, y_last), pullback = jax.vjp(run, eps, xs)
        n, m = final.shape[0], y_last.shape[0]
        seeds = (
            jnp.concatenate([jnp.eye(n, dtype=final.dtype), jnp.zeros((m, n), final.dtype)]),
            jnp.concatenate([jnp.zeros((n, m), y_last.dtype), jnp.eye(m, dtype=y_last.dtype)]),
        )
        d_eps, d_xs = jax.vmap(pullback)(seeds)  # (n + m, T, n), (n + m, T, *feat)
        state = jnp.moveaxis(d_eps[:n], 1, 0)  # (T, n, n): [t, i, j] = d h_final[i] / d h_t[j]
        saliency = jnp.moveaxis(d_xs[n:].reshape(m, steps, -1), 1, 0)  # (T, m, D)
        return _matrix_norm(state, ord), _matrix_norm(saliency, ord)

    return jax.vmap(one)(xs, carry, lengths)


# ---- integrated gradients ----------------------------------------------------------------------


class Attribution(NamedTuple):
    """Output of :func:`integrated_gradients`.

    Attributes:
      values: the attributions, shaped as ``xs``.
      per_step: ``values`` summed over each step's features: ``(*out, T)``.
      difference: ``fn(xs) - fn(baseline)``, shaped as ``fn``'s output ``(*out,)``.
      error: ``sum(values) - difference`` per output element, ``(*out,)``: the
        completeness error of the quadrature (0 for the exact integral).
    """

    values: jax.Array
    per_step: jax.Array
    difference: jax.Array
    error: jax.Array


_RULES = ("trapezoid", "midpoint", "left", "right")


def _quadrature(rule: str, steps: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Nodes ``alpha`` in [0, 1] and weights summing to 1."""
    if rule == "trapezoid":
        alphas = jnp.linspace(0.0, 1.0, steps + 1, dtype=dtype)
        weights = jnp.full((steps + 1,), 1.0 / steps, dtype).at[0].mul(0.5).at[-1].mul(0.5)
        return alphas, weights
    offset = {"midpoint": 0.5, "left": 0.0, "right": 1.0}[rule]
    alphas = (jnp.arange(steps, dtype=dtype) + offset) / steps
    return alphas, jnp.full((steps,), 1.0 / steps, dtype)


def integrated_gradients(fn: Callable[[jax.Array], jax.Array], xs: jax.Array, baseline: jax.Array | None = None,
                         *, steps: int = 64, rule: str = "trapezoid", time_axis: int = -2) -> Attribution:
    r"""Integrated gradients (Sundararajan et al. 2017) of ``fn`` over the steps of ``xs``.

    .. math::

        A(x) = (x - x') \odot \int_0^1 \nabla f\big(x' + \alpha (x - x')\big)\, d\alpha,
        \qquad \sum A(x) = f(x) - f(x')  \ \text{(completeness)}

    The integral is a quadrature over ``steps`` intervals: ``"trapezoid"`` (default,
    ``steps + 1`` gradient evaluations, error O(1/steps^2)), ``"midpoint"`` (``steps``
    evaluations, O(1/steps^2)), or the left / right Riemann sums (O(1/steps)). The
    evaluations run one after another (``lax.scan``), so memory is that of one gradient.

    Args:
      fn: ``xs -> outputs``. Either a scalar, or one value per sequence of shape
        ``xs.shape[:b]`` (the first ``b`` axes of ``xs`` are batch axes, each output
        depending on its own sequence only): the gradient of ``sum(fn(xs))`` then gives
        every sequence's attributions at once. E.g. for a cell,
        ``fn = lambda xs: rj.scan(cell, params, xs)[0][..., -1, 0]``.
      xs: the inputs, ``(*batch, T, *features)``.
      baseline: the reference input :math:`x'`, broadcastable to ``xs``; zeros if ``None``.
      steps: intervals of the quadrature, a positive int.
      rule: ``"trapezoid"``, ``"midpoint"``, ``"left"`` or ``"right"``.
      time_axis: the time axis of ``xs`` (-2 for ``(..., T, D)``; -4 for ConvLSTM frames).

    Returns:
      :class:`Attribution` ``(values, per_step, difference, error)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.GRU(hidden_size=4)
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> xs = jax.random.normal(jax.random.key(1), (3, 10, 2))
      >>> fn = lambda xs: rj.scan(cell, params, xs)[0][..., -1, 0]  # one value per sequence
      >>> ig = rj.inspect.integrated_gradients(fn, xs, steps=128)
      >>> ig.values.shape, ig.per_step.shape, ig.difference.shape
      ((3, 10, 2), (3, 10), (3,))
      >>> bool(jnp.all(jnp.abs(ig.error) < 1e-3))
      True
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(xs), got {fn!r}")
    if not hasattr(xs, "shape"):
        xs = jnp.asarray(xs)
    check_float_input(xs, "xs")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if rule not in _RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {list(_RULES)}")
    if not isinstance(time_axis, (int, np.integer)) or not -xs.ndim <= time_axis < xs.ndim:
        raise ValueError(f"time_axis={time_axis!r} is not an axis of xs of shape {tuple(xs.shape)}")
    time_axis = int(time_axis) % xs.ndim
    if baseline is None:
        baseline = jnp.zeros_like(xs)
    else:
        baseline = jnp.asarray(baseline)
        try:
            shape = jnp.broadcast_shapes(baseline.shape, xs.shape)
        except ValueError:
            shape = None
        if shape != tuple(xs.shape):
            raise ValueError(
                f"baseline has shape {tuple(baseline.shape)}; expected a shape broadcastable to xs's "
                f"{tuple(xs.shape)}"
            )
        baseline = jnp.broadcast_to(baseline, xs.shape).astype(xs.dtype)
    out = jax.eval_shape(fn, xs)
    if not hasattr(out, "shape") or not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"fn returned {out}; expected a floating array")
    if out.ndim > time_axis or tuple(xs.shape[: out.ndim]) != tuple(out.shape):
        raise ValueError(
            f"fn returned shape {tuple(out.shape)}; expected a scalar or one value per sequence, "
            f"shape xs.shape[:b] with b <= {time_axis} (the axes before time_axis={time_axis}) "
            f"for xs of shape {tuple(xs.shape)}"
        )
    return _integrated_gradients_jit(fn, xs, baseline, int(steps), rule, time_axis, out.ndim)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _integrated_gradients_jit(fn, xs, baseline, steps, rule, time_axis, out_ndim):
    alphas, weights = _quadrature(rule, steps, xs.dtype)
    delta = xs - baseline
    grad = jax.grad(lambda z: jnp.sum(fn(z)))

    def body(acc, node):
        alpha, weight = node
        return acc + weight * grad(baseline + alpha * delta), None

    mean_grad, _ = jax.lax.scan(body, jnp.zeros_like(xs), (alphas, weights))
    values = delta * mean_grad
    per_step = jnp.sum(values, axis=tuple(range(time_axis + 1, xs.ndim)))
    difference = fn(xs) - fn(baseline)
    total = jnp.sum(values, axis=tuple(range(out_ndim, xs.ndim)))
    return Attribution(values, per_step, difference, total - difference)


# ---- fixed points ------------------------------------------------------------------------------


class FixedPoints(NamedTuple):
    r"""Output of :func:`fixed_points`: ``P`` distinct points, NumPy arrays, lowest ``q`` first.

    Attributes:
      points: ``(P, n)`` state vectors with :math:`F(h^*, x) \approx h^*`
        (:func:`carry_from_vector` turns them into carries).
      q: ``(P,)`` :math:`\tfrac12 \|F(h^*, x) - h^*\|^2` at each point.
      jacobians: ``(P, n, n)`` :math:`\partial F / \partial h` at each point.
      eigenvalues: ``(P, n)`` complex eigenvalues of each Jacobian, largest modulus first.
      stability: ``(P,)`` strings, one of :data:`STABILITY_CLASSES`
        (:func:`classify_stability`).
      num_candidates: initial states optimised.
      num_dropped: candidates whose final ``q`` was not below ``q_tol`` (slow points or
        unconverged), left out.
      num_merged: converged candidates within ``merge_tol`` of a kept point, merged into it.
    """

    points: np.ndarray
    q: np.ndarray
    jacobians: np.ndarray
    eigenvalues: np.ndarray
    stability: np.ndarray
    num_candidates: int
    num_dropped: int
    num_merged: int

    def counts(self) -> dict[str, int]:
        """Number of points of each stability class, e.g. ``{"stable": 8, "saddle": 12, ...}``."""
        return {name: int(np.sum(self.stability == name)) for name in STABILITY_CLASSES}


@functools.lru_cache(maxsize=32)
def _default_optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
    # A cosine decay lets Adam settle to q ~ float rounding instead of hovering at a lr-sized orbit.
    return optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=1e-3))


def _fixed_point_setup(cell: Cell, params: Any, x_const: Any, initial_states: Any):
    """Checked ``x_const``, the carry template and ``initial_states`` as ``(K, n)`` vectors."""
    if cell.params_type is not None:
        cell.check_params(params)
    if not hasattr(x_const, "shape"):
        x_const = jnp.asarray(x_const)
    check_float_input(x_const, "x_const")
    k = cell.input_ndim
    expected_in = cell.input_size(params)
    if x_const.ndim != k or x_const.shape[-1] != expected_in:
        lead = "(H, W, " if k == 3 else "("
        raise ValueError(
            f"x_const has shape {tuple(x_const.shape)}; expected {lead}{expected_in},) for input_size="
            f"{expected_in} of {type(cell).__name__} (one step's input, no batch or time axis)"
        )
    dtype = _compute_dtype(x_const, params)
    like = cell.carry_for(x_const, dtype)
    like = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), like)
    n = _size(like)
    real_dtype = jnp.finfo(jnp.result_type(*[l.dtype for l in jax.tree_util.tree_leaves(like)])).dtype
    leaf_shapes = [("K", *l.shape) for l in jax.tree_util.tree_leaves(like)]
    expected = (
        f"expected (K, {n}) state vectors of {cell!r} (the flattened carry; see rj.inspect.state_vector), "
        f"or a carry batched as cell.init_carry((K,)) with leaves of shapes {leaf_shapes}"
    )
    is_array = hasattr(initial_states, "shape") and hasattr(initial_states, "dtype")
    if is_array and not jnp.issubdtype(initial_states.dtype, jnp.complexfloating) and initial_states.ndim == 2:
        if initial_states.shape[1] != n or initial_states.shape[0] == 0:
            raise ValueError(f"initial_states has shape {tuple(initial_states.shape)}; {expected}")
        check_float_input(initial_states, "initial_states")
        return x_const, like, jnp.asarray(initial_states, real_dtype)
    # Otherwise a carry batched over K.
    got_def = jax.tree_util.tree_structure(initial_states)
    exp_def = jax.tree_util.tree_structure(like)
    if got_def != exp_def:
        what = f"shape {tuple(initial_states.shape)}" if is_array else f"structure {got_def}"
        raise ValueError(f"initial_states has {what}; {expected}")
    leaves = jax.tree_util.tree_leaves(initial_states)
    counts = {leaf.shape[0] if jnp.ndim(leaf) else None for leaf in leaves}
    for leaf, ref in zip(leaves, jax.tree_util.tree_leaves(like)):
        if jnp.ndim(leaf) != len(ref.shape) + 1 or tuple(leaf.shape[1:]) != tuple(ref.shape) or len(counts) != 1 \
                or leaf.shape[0] == 0:
            what = f"shape {tuple(initial_states.shape)}" if is_array else f"leaves of shapes {[tuple(jnp.shape(l)) for l in leaves]}"
            raise ValueError(f"initial_states has {what}; {expected}")
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(f"initial_states has a leaf of dtype {jnp.result_type(leaf)}; expected a floating dtype")
    carry = jax.tree.map(lambda leaf, ref: jnp.asarray(leaf).astype(ref.dtype), initial_states, like)
    return x_const, like, jax.vmap(_ravel)(carry).astype(real_dtype)


def fixed_point_candidates(cell: Cell, params: Any, x_const: jax.Array, initial_states: Any, *,
                           optimizer: optax.GradientTransformation | None = None, steps: int = 2000,
                           learning_rate: float = 0.1, newton_steps: int = 5) -> tuple[jax.Array, jax.Array]:
    r"""Minimise :math:`q(h) = \tfrac12 \|F(h, x) - h\|^2` from every initial state: the
    jit-able, vmapped part of :func:`fixed_points`.

    Each initial state runs its own optimiser (``vmap`` over states of a ``lax.scan`` over
    ``steps`` updates), then ``newton_steps`` safeguarded Newton steps on
    :math:`F(h) - h = 0`,

    .. math::

        h \leftarrow h - (J - I)^{-1} (F(h) - h), \qquad J = \partial F / \partial h,

    each kept only if it lowers ``q``. Gradient descent on ``q`` slows down near a fixed
    point whose Jacobian has an eigenvalue close to 1 (``q``'s curvature there is
    :math:`(1 - \lambda)^2`); Newton's method converges quadratically there and takes the
    optimiser's candidates to float precision in a few steps. All of it is one compiled
    call. Local minima with ``q > 0`` are slow points, not fixed points (Newton steps are
    rejected there); :func:`fixed_points` filters them.

    Args:
      cell, params: any rnnjax cell and its parameters.
      x_const: ``(D,)`` the constant input (``(H, W, C)`` for ConvLSTM).
      initial_states: ``(K, n)`` state vectors, or a carry batched as ``cell.init_carry((K,))``.
      optimizer: an ``optax.GradientTransformation``; default Adam at ``learning_rate``
        with a cosine decay to ``learning_rate / 1000`` over ``steps``.
      steps: optimiser updates, a non-negative int.
      learning_rate: the default optimiser's initial learning rate.
      newton_steps: Newton steps after the optimiser, a non-negative int (0: none). Each
        forms the ``(n, n)`` Jacobian and solves with it.

    Returns:
      ``(points, q)``: ``(K, n)`` final state vectors and ``(K,)`` their ``q``.
    """
    x_const, like, states = _fixed_point_setup(cell, params, x_const, initial_states)
    for name, value in (("steps", steps), ("newton_steps", newton_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if optimizer is None:
        optimizer = _default_optimizer(float(learning_rate), max(int(steps), 1))
    elif not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"optimizer must be an optax.GradientTransformation (e.g. optax.adam(1e-2)), got {optimizer!r}")
    return _candidates_jit(cell, params, x_const, states, _Static(like), optimizer, int(steps), int(newton_steps))


class _Static:
    """Hashable wrapper for a pytree of ShapeDtypeStructs (a jit static argument)."""

    def __init__(self, tree):
        self.tree = tree
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        self._key = (treedef, tuple((tuple(l.shape), jnp.dtype(l.dtype)) for l in leaves))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key == other._key


def _speed(cell, params, like, x_const):
    step = _step_map(cell, params, like)

    def q(v):
        return 0.5 * jnp.sum(jnp.square(step(v, x_const)[0] - v))

    return q


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _candidates_jit(cell, params, x_const, states, like, optimizer, steps, newton_steps):
    q = _speed(cell, params, like.tree, x_const)
    value_and_grad = jax.value_and_grad(q)
    step = _step_map(cell, params, like.tree)
    f = lambda v: step(v, x_const)[0]

    def optimise(v):
        def body(carry, _):
            v, opt_state = carry
            _, g = value_and_grad(v)
            updates, opt_state = optimizer.update(g, opt_state, v)
            return (optax.apply_updates(v, updates), opt_state), None

        def newton(v, _):
            jacobian = jax.jacfwd(f)(v)
            candidate = v - jnp.linalg.solve(jacobian - jnp.eye(v.shape[0], dtype=v.dtype), f(v) - v)
            # A singular J - I (slow points) gives inf/NaN, which fails the comparison.
            return jnp.where(q(candidate) < q(v), candidate, v), None

        (v, _), _ = jax.lax.scan(body, (v, optimizer.init(v)), None, length=steps)
        v, _ = jax.lax.scan(newton, v, None, length=newton_steps)
        return v, q(v)

    return jax.vmap(optimise)(states)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _jacobians_jit(cell, params, x_const, points, like):
    step = _step_map(cell, params, like.tree)
    return jax.vmap(jax.jacfwd(lambda v: step(v, x_const)[0]))(points)


def classify_stability(eigenvalues: Any, tol: float = 1e-6) -> np.ndarray:
    r"""Stability of fixed points of a discrete map from the eigenvalues of its Jacobians.

    For eigenvalues ``(..., n)`` (a point's last axis): ``"stable"`` when every
    :math:`|\lambda| < 1 - tol` (an attractor), ``"unstable"`` when every
    :math:`|\lambda| > 1 + tol` (a repeller), ``"saddle"`` when some are below
    ``1 - tol`` and some above ``1 + tol``, and ``"marginal"`` otherwise (some
    :math:`|\lambda|` within ``tol`` of the unit circle, where the linearisation does not
    decide). Returns a NumPy array of strings of shape ``(...)``.

    Example:
      >>> import numpy as np, rnnjax as rj
      >>> rj.inspect.classify_stability(np.array([[0.5, -0.9j], [2.0, 0.1], [1.5, -3.0], [1.0, 0.2]])).tolist()
      ['stable', 'saddle', 'unstable', 'marginal']
    """
    if not (isinstance(tol, (int, float, np.floating)) and not isinstance(tol, bool) and tol >= 0):
        raise ValueError(f"tol must be a non-negative number, got {tol!r}")
    modulus = np.abs(np.asarray(eigenvalues))
    if modulus.ndim < 1 or modulus.shape[-1] == 0:
        raise ValueError(f"eigenvalues has shape {modulus.shape}; expected (..., n) with n >= 1")
    below = np.all(modulus < 1 - tol, axis=-1)
    above = np.all(modulus > 1 + tol, axis=-1)
    mixed = np.any(modulus < 1 - tol, axis=-1) & np.any(modulus > 1 + tol, axis=-1)
    out = np.full(modulus.shape[:-1], "marginal", dtype=object)
    out[below] = "stable"
    out[above] = "unstable"
    out[mixed] = "saddle"
    return out.astype(str)


def fixed_points(cell: Cell, params: Any, x_const: jax.Array, initial_states: Any, *,
                 optimizer: optax.GradientTransformation | None = None, steps: int = 2000,
                 learning_rate: float = 0.1, newton_steps: int = 5, q_tol: float = 1e-8,
                 merge_tol: float = 1e-2, marginal_tol: float = 1e-6) -> FixedPoints:
    r"""Fixed points of a cell's map under a constant input, with their stability
    (Sussillo & Barak 2013, "Opening the black box").

    .. math::

        q(h) = \tfrac12 \|F(h, x) - h\|^2, \qquad h^* = \arg\min q, \qquad
        J = \frac{\partial F}{\partial h}\Big|_{h^*}

    1. :func:`fixed_point_candidates` minimises ``q`` from every initial state (one jit,
       vmapped over states; Adam by default, then a few safeguarded Newton steps).
    2. Candidates with ``q >= q_tol`` are dropped (slow points, unconverged runs).
    3. The rest, lowest ``q`` first, are merged greedily: a candidate within Euclidean
       distance ``merge_tol`` of a kept point is a duplicate.
    4. Each point's Jacobian comes from ``jax.jacfwd``; its eigenvalues are computed on the
       host with ``numpy.linalg.eigvals`` in float64 (XLA has no general eigensolver on
       every backend) and classified by :func:`classify_stability` with ``marginal_tol``.

    The number of points is data-dependent, so this function runs eagerly (steps 2-4 on the
    host) and returns NumPy arrays; the optimisation itself is one compiled call.

    Args:
      cell, params: any rnnjax cell and its parameters.
      x_const: ``(D,)`` the constant input (often zeros: the autonomous dynamics).
      initial_states: ``(K, n)`` state vectors (e.g. sampled from
        :func:`state_trajectory` of real inputs, plus a little noise), or a carry batched as
        ``cell.init_carry((K,))``.
      optimizer, steps, learning_rate, newton_steps: as in :func:`fixed_point_candidates`.
      q_tol: largest ``q`` accepted as a fixed point.
      merge_tol: distance below which two points are one.
      marginal_tol: eigenvalue moduli within this of 1 count as marginal.

    Returns:
      :class:`FixedPoints`.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.Elman(hidden_size=2, use_bias=False)
      >>> params = rj.Elman(2).init(jax.random.key(0), 1)._replace(w_h=2.0 * jnp.eye(2), b=None)
      >>> starts = jax.random.uniform(jax.random.key(1), (200, 2), minval=-1.2, maxval=1.2)
      >>> fp = rj.inspect.fixed_points(cell, params, jnp.zeros(1), starts)
      >>> fp.counts()  # tanh(2h) = h per unit: 0 (unstable) and +-0.9575 (stable)
      {'stable': 4, 'unstable': 1, 'saddle': 4, 'marginal': 0}
    """
    for name, value in (("q_tol", q_tol), ("merge_tol", merge_tol)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    x_const, like, states = _fixed_point_setup(cell, params, x_const, initial_states)
    points, q = fixed_point_candidates(cell, params, x_const, states, optimizer=optimizer, steps=steps,
                                       learning_rate=learning_rate, newton_steps=newton_steps)
    points, q = np.asarray(points), np.asarray(q)
    converged = np.isfinite(q) & (q < q_tol)
    order = np.argsort(np.where(converged, q, np.inf), kind="stable")[: int(converged.sum())]
    kept: list[int] = []
    for i in order:
        if not kept or np.min(np.linalg.norm(points[kept] - points[i], axis=-1)) >= merge_tol:
            kept.append(int(i))
    points, q = points[kept], q[kept]
    n = states.shape[1]
    if kept:
        jacobians = np.asarray(_jacobians_jit(cell, params, x_const, jnp.asarray(points), _Static(like)))
        eigenvalues = np.linalg.eigvals(jacobians.astype(np.float64))
        eigenvalues = np.take_along_axis(eigenvalues, np.argsort(-np.abs(eigenvalues), axis=-1, kind="stable"), -1)
        stability = classify_stability(eigenvalues, marginal_tol)
    else:
        jacobians = np.zeros((0, n, n), points.dtype)
        eigenvalues = np.zeros((0, n), np.complex128)
        stability = np.zeros((0,), str)
    return FixedPoints(points, q, jacobians, eigenvalues, stability, num_candidates=int(states.shape[0]),
                       num_dropped=int((~converged).sum()), num_merged=int(converged.sum()) - len(kept))


# ---- Lyapunov exponents --------------------------------------------------------------------------


def lyapunov_exponents(cell: Cell, params: Any, xs: jax.Array, k: int, carry: PyTree | None = None, *,
                       lengths: jax.Array | None = None, burn_in: int = 0, key: jax.Array | None = None) -> jax.Array:
    r"""The ``k`` largest Lyapunov exponents of the state dynamics along a trajectory, by the
    QR method (Benettin et al. 1980; Dieci, Russell & Van Vleck 1997).

    With :math:`J_t = \partial F / \partial h` at step ``t`` of the trajectory driven by
    ``xs`` and :math:`Q_0` a random ``(n, k)`` orthonormal frame:

    .. math::

        J_t Q_{t-1} = Q_t R_t \ (\text{QR}), \qquad
        \lambda_i = \frac{1}{L - b} \sum_{t=b}^{L-1} \log |(R_t)_{ii}|

    over the steps ``t >= burn_in`` (``b``) of each sequence's length ``L``. Exponents are
    per step, natural log, sorted in decreasing order. For a linear recurrence
    :math:`h_t = A h_{t-1} + B x_t` they converge to :math:`\log|\mathrm{eig}(A)|`. The
    products :math:`J_t Q` are ``k`` forward-mode derivatives (``jax.linearize``), so the
    full Jacobian is never formed. A unit that stops responding (e.g. a dead ReLU) gives
    :math:`-\infty`.

    Args:
      cell, params: any rnnjax cell and its parameters.
      xs: ``(*batch, T, D)`` inputs driving the trajectory.
      k: how many exponents, ``1 <= k <= n`` (``n`` the state size, see the module docstring).
      carry: initial carry as ``cell.init_carry(batch_shape)``; zeros when ``None``.
      lengths: ``(*batch,)`` integers in ``[0, T]``; steps past a length are left out. A
        sequence with no step at or past ``burn_in`` gets NaN.
      burn_in: steps whose ``log |R_ii|`` are left out of the average (the frame aligning
        with the leading directions), ``0 <= burn_in < T``.
      key: a ``jax.random`` key for :math:`Q_0`; ``None`` uses ``jax.random.key(0)``.

    Returns:
      ``(*batch, k)`` exponents, largest first.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.LRU(hidden_size=2, r_min=0.5, r_max=0.9)
      >>> params = cell.init(jax.random.key(0), input_size=1)
      >>> exps = rj.inspect.lyapunov_exponents(cell, params, jnp.zeros((200, 1)), k=4, burn_in=50)
      >>> expected = jnp.sort(jnp.repeat(jnp.log(jnp.abs(cell.eigenvalues(params))), 2))[::-1]
      >>> bool(jnp.allclose(exps, expected, atol=1e-4))
      True
    """
    seq = _sequences(cell, params, xs, carry, lengths)
    n = _size(seq.like)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > n:
        raise ValueError(
            f"k={k} exceeds the state size {n} of {cell!r} (the flattened carry; see the rnnjax.inspect "
            f"docstring); choose k <= {n}"
        )
    steps = seq.xs.shape[1]
    if isinstance(burn_in, bool) or not isinstance(burn_in, (int, np.integer)) or not 0 <= burn_in < max(steps, 1):
        raise ValueError(f"burn_in={burn_in!r} must be an int in [0, T) for T={steps}")
    if key is None:
        key = jax.random.key(0)
    dtype = _ravel(jax.tree.map(lambda l: jnp.zeros(l.shape, l.dtype), seq.like)).dtype
    frame, _ = jnp.linalg.qr(jax.random.normal(key, (n, int(k)), dtype))
    exps = _lyapunov_jit(cell, params, seq.xs, seq.carry, seq.lengths, frame, int(burn_in))
    return _unflatten_batch(exps, seq.batch_shape)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _lyapunov_jit(cell, params, xs, carry, lengths, frame, burn_in):
    def one(xs, carry, length):
        like = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), carry)
        step = _step_map(cell, params, like)

        def body(state, inputs):
            v, q, total = state
            t, x = inputs
            new, push = jax.linearize(lambda u: step(u, x)[0], v)
            q_new, r = jnp.linalg.qr(jax.vmap(push, in_axes=1, out_axes=1)(q))
            valid = t < length
            count = valid & (t >= burn_in)
            total = total + jnp.where(count, jnp.log(jnp.abs(jnp.diagonal(r))), 0.0)
            return (jnp.where(valid, new, v), jnp.where(valid, q_new, q), total), None

        init = (_ravel(carry), frame, jnp.zeros(frame.shape[1], frame.dtype))
        (_, _, total), _ = jax.lax.scan(body, init, (jnp.arange(xs.shape[0]), xs))
        counted = length - burn_in
        exps = jnp.where(counted > 0, total / jnp.maximum(counted, 1).astype(total.dtype), jnp.nan)
        return -jnp.sort(-exps)

    return jax.vmap(one)(xs, carry, lengths)


# ---- plots (matplotlib is imported only here) -------------------------------------------------------

_STYLE = {
    "stable": {"marker": "o", "color": "black", "s": 60, "zorder": 5},
    "unstable": {"marker": "X", "color": "tab:red", "s": 60, "zorder": 5},
    "saddle": {"marker": "o", "facecolors": "none", "edgecolors": "tab:red", "s": 60, "linewidths": 1.5, "zorder": 5},
    "marginal": {"marker": "D", "color": "tab:gray", "s": 40, "zorder": 5},
}


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("rnnjax.inspect's plots need matplotlib: pip install 'rnnjax[plot]'") from error
    return plt


def plot_pca_trajectories(states: Any, fixed_points: FixedPoints | None = None, ax: Any = None, *,
                          n_components: int = 2, max_trajectories: int = 50, **line_kwargs: Any) -> Any:
    """Hidden-state trajectories in their top principal components, fixed points marked.

    Args:
      states: ``(T, n)`` or ``(B, T, n)`` state vectors (:func:`state_trajectory`).
      fixed_points: a :class:`FixedPoints` in the same state space; its points are projected
        on the same components and marked by stability (stable: black dot, unstable: red
        cross, saddle: open red circle, marginal: grey diamond).
      ax: a matplotlib Axes (3D for ``n_components=3``); a new figure when ``None``.
      n_components: 2 or 3.
      max_trajectories: at most this many trajectories are drawn (the PCA uses them all).
      **line_kwargs: passed to ``ax.plot`` for the trajectories.

    Returns:
      The Axes.
    """
    if n_components not in (2, 3):
        raise ValueError(f"n_components must be 2 or 3, got {n_components!r}")
    states = np.asarray(states, dtype=np.float64)
    if states.ndim == 2:
        states = states[None]
    if states.ndim != 3:
        raise ValueError(f"states has shape {states.shape}; expected (T, n) or (B, T, n) state vectors")
    n = states.shape[-1]
    if fixed_points is not None and fixed_points.points.size and fixed_points.points.shape[-1] != n:
        raise ValueError(f"fixed_points have {fixed_points.points.shape[-1]} coordinates; the states have {n}")
    plt = _pyplot()
    flat = states.reshape(-1, n)
    mean = flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    components = vt[:n_components].T  # (n, c)
    if components.shape[1] < n_components:
        components = np.pad(components, ((0, 0), (0, n_components - components.shape[1])))
    if ax is None:
        fig = plt.figure(figsize=(5, 4.5))
        ax = fig.add_subplot(projection="3d" if n_components == 3 else None)
    style = {"lw": 0.8, "alpha": 0.6, "color": "tab:blue"}
    style.update(line_kwargs)
    for trajectory in states[:max_trajectories]:
        projected = (trajectory - mean) @ components
        ax.plot(*projected.T, **style)
    if fixed_points is not None:
        for name in STABILITY_CLASSES:
            mask = fixed_points.stability == name
            if mask.any():
                projected = (np.asarray(fixed_points.points, np.float64)[mask] - mean) @ components
                ax.scatter(*projected.T, label=f"{name} ({int(mask.sum())})", **_STYLE[name])
        ax.legend(fontsize=8)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    if n_components == 3:
        ax.set_zlabel("PC 3")
    return ax


def plot_horizons(horizons: Mapping[str, Any], ax: Any = None, *, normalize: bool = True, **line_kwargs: Any) -> Any:
    """Horizon curves (e.g. ``jacobian_horizon(...).state``) against distance from the end.

    Args:
      horizons: ``{name: array}``, each ``(T,)`` or ``(..., T)`` (the mean over the leading
        axes is drawn), plotted on a log scale against the distance ``T - 1 - t``.
      ax: a matplotlib Axes; a new figure when ``None``.
      normalize: divide each curve by its value at distance 0 (``sqrt(n)`` for the state's
        Frobenius norm), so cells with different state sizes compare.
      **line_kwargs: passed to ``ax.semilogy``.

    Returns:
      The Axes.
    """
    if not isinstance(horizons, Mapping) or not horizons:
        raise ValueError("horizons must be a non-empty dict {name: (..., T) array}")
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in horizons.items():
        values = np.asarray(values, dtype=np.float64)
        if values.ndim < 1 or values.shape[-1] == 0:
            raise ValueError(f"horizons[{name!r}] has shape {values.shape}; expected (..., T) with T >= 1")
        curve = values.reshape(-1, values.shape[-1]).mean(axis=0)[::-1]  # index = distance
        if normalize and curve[0] > 0:
            curve = curve / curve[0]
        ax.semilogy(np.arange(curve.shape[0]), curve, label=name, **line_kwargs)
    ax.set_xlabel("distance from the end, T - 1 - t")
    ax.set_ylabel("norm" + (" (relative to distance 0)" if normalize else ""))
    ax.legend(fontsize=8)
    return ax
