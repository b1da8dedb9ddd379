"""Plots of state trajectories, fixed points and horizons; matplotlib is imported only when
one is drawn."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from rnnjax.inspect.fixed_points import STABILITY_CLASSES, FixedPoints
from rnnjax.optional import require

_STYLE = {
    "stable": {"marker": "o", "color": "black", "s": 60, "zorder": 5},
    "unstable": {"marker": "X", "color": "tab:red", "s": 60, "zorder": 5},
    "saddle": {"marker": "o", "facecolors": "none", "edgecolors": "tab:red", "s": 60, "linewidths": 1.5, "zorder": 5},
    "marginal": {"marker": "D", "color": "tab:gray", "s": 40, "zorder": 5},
}


def _pyplot():
    require("matplotlib", "rnnjax.inspect's plots")
    return importlib.import_module("matplotlib.pyplot")


def plot_pca_trajectories(
    states: Any,
    fixed_points: FixedPoints | None = None,
    ax: Any = None,
    *,
    n_components: int = 2,
    max_trajectories: int = 50,
    **line_kwargs: Any,
) -> Any:
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
