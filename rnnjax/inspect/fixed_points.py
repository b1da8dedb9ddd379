r"""Fixed points :math:`F(h^*, x) = h^*` of a cell's map under a constant input, with their
Jacobians and stability (Sussillo & Barak 2013)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnnjax.carry import CarryLayout
from rnnjax.cell import Cell
from rnnjax.checks import (
    check_float_input,
    check_nonnegative_int,
    check_nonnegative_number,
    check_optimizer,
    check_positive_number,
)
from rnnjax.inspect.sequences import step_map, template
from rnnjax.sequence import compute_dtype

STABILITY_CLASSES = ("stable", "unstable", "saddle", "marginal")


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


def _on_one_device(tree: Any) -> Any:
    """``tree`` with its concrete arrays on one device when they span several (traced leaves as they are).

    Params trained with ``mesh="local"`` are replicated over every CPU device, so the fixed-point
    search would run once per device; on jax 0.10.2 two such concurrent XLA:CPU runs of its
    2000-step loop wedged (every thread idle) in 3 of 6 runs, on one device in none
    (``benchmarks/lab/two_device_hang.py``).
    """

    def concrete(leaf):
        return isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)

    devices = {d for leaf in jax.tree_util.tree_leaves(tree) if concrete(leaf) for d in leaf.devices()}
    if len(devices) <= 1:
        return tree
    first = min(devices, key=lambda device: device.id)
    return jax.tree_util.tree_map(lambda leaf: jax.device_put(leaf, first) if concrete(leaf) else leaf, tree)


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
    like = template(cell.carry_for(x_const, compute_dtype(x_const, params)))
    layout = CarryLayout(like)
    n = layout.n
    leaf_shapes = [("K", *leaf.shape) for leaf in jax.tree_util.tree_leaves(like)]
    expected = (
        f"expected (K, {n}) state vectors of {cell!r} (the flattened carry; see rj.inspect.state_vector), "
        f"or a carry batched as cell.init_carry((K,)) with leaves of shapes {leaf_shapes}"
    )
    is_array = hasattr(initial_states, "shape") and hasattr(initial_states, "dtype")
    if is_array and not jnp.issubdtype(initial_states.dtype, jnp.complexfloating) and initial_states.ndim == 2:
        if initial_states.shape[1] != n or initial_states.shape[0] == 0:
            raise ValueError(f"initial_states has shape {tuple(initial_states.shape)}; {expected}")
        check_float_input(initial_states, "initial_states")
        return x_const, like, jnp.asarray(initial_states, layout.real)
    # Otherwise a carry batched over K.
    got_def = jax.tree_util.tree_structure(initial_states)
    exp_def = jax.tree_util.tree_structure(like)
    if got_def != exp_def:  # type: ignore[operator]  # jax's PyTreeDef is opaque to mypy
        what = f"shape {tuple(initial_states.shape)}" if is_array else f"structure {got_def}"
        raise ValueError(f"initial_states has {what}; {expected}")
    leaves = jax.tree_util.tree_leaves(initial_states)
    counts = {leaf.shape[0] if jnp.ndim(leaf) else None for leaf in leaves}
    for leaf, ref in zip(leaves, jax.tree_util.tree_leaves(like)):
        if (
            jnp.ndim(leaf) != len(ref.shape) + 1
            or tuple(leaf.shape[1:]) != tuple(ref.shape)
            or len(counts) != 1
            or leaf.shape[0] == 0
        ):
            what = (
                f"shape {tuple(initial_states.shape)}"
                if is_array
                else f"leaves of shapes {[tuple(jnp.shape(x)) for x in leaves]}"
            )
            raise ValueError(f"initial_states has {what}; {expected}")
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(f"initial_states has a leaf of dtype {jnp.result_type(leaf)}; expected a floating dtype")
    return x_const, like, jax.vmap(layout.flatten)(initial_states)


def fixed_point_candidates(
    cell: Cell,
    params: Any,
    x_const: jax.Array,
    initial_states: Any,
    *,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 2000,
    learning_rate: float = 0.1,
    newton_steps: int = 5,
) -> tuple[jax.Array, jax.Array]:
    r"""Minimise :math:`q(h) = \tfrac12 \|F(h, x) - h\|^2` from every initial state: the
    jit-able, vmapped part of :func:`fixed_points`.

    Each initial state runs its own optimiser (``vmap`` over states of a ``lax.scan`` over
    ``steps`` updates), then ``newton_steps`` safeguarded Newton steps on
    :math:`F(h) - h = 0`,

    .. math::

        h \leftarrow h - (J - I)^{-1} (F(h) - h), \qquad J = \partial F / \partial h,

    each kept only if it lowers ``q``: near an eigenvalue of ``J`` close to 1, ``q``'s
    curvature :math:`(1 - \lambda)^2` stalls gradient descent, and Newton's method takes the
    candidates to float precision. All of it is one compiled call. Local minima with
    ``q > 0`` are slow points, not fixed points; :func:`fixed_points` filters them.

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
    params, x_const, states = _on_one_device((params, x_const, states))
    check_nonnegative_int(steps, "steps")
    check_nonnegative_int(newton_steps, "newton_steps")
    if optimizer is None:
        optimizer = _default_optimizer(float(learning_rate), max(int(steps), 1))
    else:
        check_optimizer(optimizer, example="optax.adam(1e-2)")
    return _candidates_jit(cell, params, x_const, states, _Static(like), optimizer, int(steps), int(newton_steps))


class _Static:
    """Hashable wrapper for a pytree of ShapeDtypeStructs (a jit static argument)."""

    def __init__(self, tree):
        self.tree = tree
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        self._key = (treedef, tuple((tuple(leaf.shape), jnp.dtype(leaf.dtype)) for leaf in leaves))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key == other._key


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _candidates_jit(cell, params, x_const, states, like, optimizer, steps, newton_steps):
    step = step_map(cell, params, like.tree)
    f = lambda v: step(v, x_const)[0]
    q = lambda v: 0.5 * jnp.sum(jnp.square(f(v) - v))
    value_and_grad = jax.value_and_grad(q)

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
    step = step_map(cell, params, like.tree)
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
    check_nonnegative_number(tol, "tol")
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


def fixed_points(
    cell: Cell,
    params: Any,
    x_const: jax.Array,
    initial_states: Any,
    *,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 2000,
    learning_rate: float = 0.1,
    newton_steps: int = 5,
    q_tol: float = 1e-8,
    merge_tol: float = 1e-2,
    marginal_tol: float = 1e-6,
) -> FixedPoints:
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
    check_positive_number(q_tol, "q_tol", finite=False)
    check_positive_number(merge_tol, "merge_tol", finite=False)
    x_const, like, states = _fixed_point_setup(cell, params, x_const, initial_states)
    params, x_const, states = _on_one_device((params, x_const, states))
    candidates, losses = fixed_point_candidates(
        cell,
        params,
        x_const,
        states,
        optimizer=optimizer,
        steps=steps,
        learning_rate=learning_rate,
        newton_steps=newton_steps,
    )
    points, q = np.asarray(candidates), np.asarray(losses)
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
        eigenvalues: np.ndarray = np.linalg.eigvals(jacobians.astype(np.float64))
        eigenvalues = np.take_along_axis(eigenvalues, np.argsort(-np.abs(eigenvalues), axis=-1, kind="stable"), -1)
        stability = classify_stability(eigenvalues, marginal_tol)
    else:
        jacobians = np.zeros((0, n, n), points.dtype)
        eigenvalues = np.zeros((0, n), np.complex128)
        stability = np.zeros((0,), str)
    return FixedPoints(
        points,
        q,
        jacobians,
        eigenvalues,
        stability,
        num_candidates=int(states.shape[0]),
        num_dropped=int((~converged).sum()),
        num_merged=int(converged.sum()) - len(kept),
    )
