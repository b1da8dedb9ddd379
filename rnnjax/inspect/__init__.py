r"""Dynamical-systems tools for any rnnjax cell: why did the RNN do that?

A cell's step ``(params, carry, x) -> (carry, y)`` is a map :math:`h_t = F(h_{t-1}, x_t)`
of its state, looked at with JAX's transformations:

- :func:`jacobian_horizon`: :math:`\|\partial h_{T-1} / \partial h_t\|` and the saliency
  :math:`\|\partial y_{T-1} / \partial x_t\|` for every step ``t``.
- :func:`integrated_gradients`: attributions of an output to every input step.
- :func:`fixed_points`: points with :math:`F(h^*, x) = h^*` for a constant input, their
  Jacobians and stability (:func:`classify_stability`); :func:`fixed_point_candidates`
  is the jit-able optimisation alone.
- :func:`lyapunov_exponents`: the ``k`` largest Lyapunov exponents along a trajectory.
- :func:`state_trajectory`: the state after every step.
- Plots (matplotlib, imported only when called): :func:`plot_pca_trajectories`,
  :func:`plot_horizons`.

**The state vector.** Every tool works on the *state vector* of one sequence: the carry's
leaves in tree order, each raveled, a complex leaf as its real parts and then its imaginary
parts (:func:`state_vector`, :func:`carry_from_vector`). Its size ``n`` is ``hidden_size``
for Elman, GRU, MGU, IndRNN, minGRU and minLSTM; ``2 * hidden_size`` for LSTM (``h`` then
``c``; ``proj_size + hidden_size`` with a projection) and for LRU (real then imaginary
parts), where a complex eigenvalue :math:`\lambda` shows up as the pair
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

from rnnjax.inspect.attribution import Attribution, integrated_gradients
from rnnjax.inspect.fixed_points import (
    STABILITY_CLASSES,
    FixedPoints,
    classify_stability,
    fixed_point_candidates,
    fixed_points,
)
from rnnjax.inspect.horizon import Horizon, jacobian_horizon
from rnnjax.inspect.lyapunov import lyapunov_exponents
from rnnjax.inspect.plot import plot_horizons, plot_pca_trajectories
from rnnjax.inspect.state import carry_from_vector, state_trajectory, state_vector

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
