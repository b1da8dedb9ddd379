"""Integrated gradients (Sundararajan et al. 2017): attributions of an output to every input
step along the straight path from a baseline."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.cell import check_float_input, check_positive_int


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


def integrated_gradients(
    fn: Callable[[jax.Array], jax.Array],
    xs: jax.Array,
    baseline: jax.Array | None = None,
    *,
    steps: int = 64,
    rule: str = "trapezoid",
    time_axis: int = -2,
) -> Attribution:
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
    check_positive_int(steps, "steps")
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
                f"baseline has shape {tuple(baseline.shape)}; expected a shape broadcastable to xs's {tuple(xs.shape)}"
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
