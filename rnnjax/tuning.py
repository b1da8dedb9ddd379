"""Measured per-backend choices: the loop unroll of ``rj.Sequential(unroll="auto")``, the
method ``rj.Auto()`` picks, the chunk size of ``rj.Chunked()`` and how ``rj.Newton()`` solves
its linear recurrences.

Each table comes from a benchmark whose command and figures are recorded in
``benchmarks/experiments/DECISIONS.md``; change a row only with a new measurement.
Backends other than ``"cpu"`` use the ``"gpu"`` rows (TPU is not measured).
"""

from __future__ import annotations

import math
from typing import Any

import jax

from rnnjax.cell import Cell, LinearCell, StructuredJacobian, runs_associatively

# Steps per loop iteration for unroll="auto". cpu: unroll 8 slowed training 2-3x, 4 was no
# faster than 1; gpu: 16 gave 2.3-3.3x over 1 on an H200 (benchmarks/results/nvidia-h200-unroll).
AUTO_UNROLL = {"cpu": 1, "gpu": 16}

# What rj.Auto() runs, per backend and cell kind: ``(min_T, method name)`` rows sorted by
# min_T, the last row with min_T <= T wins; "chunk_size" is rj.Chunked()'s default rule
# ("sqrt": the power of two nearest sqrt(T), clipped to [16, 1024]).
# cpu: the sequential loop was fastest at every T from 256 to 65536 for minGRU, LRU and a GRU
# (benchmarks/results/cpu_auto.md). gpu: "associative" was 67-282x the sequential loop for
# linear cells at T = 1024-16384; Newton on a GRU was 1.0-1.56x, a near-tie, so nonlinear cells
# stay sequential (benchmarks/results/gpu_parallel_20261127T063310Z.md). "clipped_linear" (a
# relu IndRNN): cpu: the sequential loop was 1.5-3.3x faster than the clipped associative scan
# (benchmarks/results/cpu-clipped-scan.log); gpu: not measured yet, so sequential as before.
# "exact_jacobian" (ParaGRU, ParaLSTM, a tanh IndRNN: exact Newton at quasi-DEER's cost): cpu:
# the sequential loop was 1.3-1.8x faster than 3 exact Newton iterations in training and
# 2.9-3.6x in the forward pass (ParaGRU, B=16, H=64, T=1024-4096;
# benchmarks/results/cpu-newton-timing.md, cpu-newton-outputs.log); gpu: not measured yet.
AUTO_TABLE: dict[str, dict[str, Any]] = {
    "cpu": {
        "log_linear": ((0, "sequential"),),
        "linear": ((0, "sequential"),),
        "clipped_linear": ((0, "sequential"),),
        "exact_jacobian": ((0, "sequential"),),
        "nonlinear": ((0, "sequential"),),
        "chunk_size": "sqrt",
    },
    "gpu": {
        "log_linear": ((0, "associative"),),
        "linear": ((0, "associative"),),
        "clipped_linear": ((0, "sequential"),),
        "exact_jacobian": ((0, "sequential"),),
        "nonlinear": ((0, "sequential"),),
        "chunk_size": "sqrt",
    },
}
CELL_KINDS = ("log_linear", "linear", "clipped_linear", "exact_jacobian", "nonlinear")


# How rj.Newton(solve="auto") solves each iteration's linear recurrence. cpu: a sequential scan
# was 2.4-4x faster than the associative scan on elementwise recurrences (T=1024-4096; the scan's
# extra passes over memory cost more than its parallelism gains on a few cores); gpu: associative
# (benchmarks/experiments/DECISIONS.md, "Newton's linear solves are sequential on CPU").
AUTO_NEWTON_SOLVE = {"cpu": "sequential", "gpu": "associative"}
NEWTON_SOLVES = ("auto", "associative", "sequential")


def backend_key(backend: str | None = None) -> str:
    """``"cpu"`` or ``"gpu"``: the rows a backend (``jax.default_backend()`` when ``None``) uses."""
    backend = backend or jax.default_backend()
    return "cpu" if backend == "cpu" else "gpu"  # cuda, rocm, tpu, metal, ...: accelerator rows


def auto_table(backend: str | None = None) -> dict[str, Any]:
    """A copy of the rows ``rj.Auto()`` reads on ``backend``.

    Example:
      >>> from rnnjax.tuning import auto_table
      >>> auto_table("cpu")["nonlinear"]
      ((0, 'sequential'),)
    """
    return dict(AUTO_TABLE[backend_key(backend)])


def auto_unroll(backend: str | None = None) -> int:
    """The unroll ``"auto"`` means on ``backend``."""
    return AUTO_UNROLL[backend_key(backend)]


def newton_solve(solve: str = "auto", backend: str | None = None) -> str:
    """``"associative"`` or ``"sequential"``: what ``rj.Newton(solve=solve)`` runs on ``backend``.

    Example:
      >>> from rnnjax.tuning import newton_solve
      >>> newton_solve("auto", backend="cpu"), newton_solve("auto", backend="gpu")
      ('sequential', 'associative')
    """
    if solve not in NEWTON_SOLVES:
        raise ValueError(f"solve must be one of {list(NEWTON_SOLVES)}, got {solve!r}")
    return AUTO_NEWTON_SOLVE[backend_key(backend)] if solve == "auto" else solve


def cell_kind(cell: Cell) -> str:
    """The rows of the auto table a cell uses: ``"log_linear"`` (a LinearCell evaluated in log
    space), ``"linear"`` (another LinearCell), ``"clipped_linear"`` (a
    :class:`rnnjax.cell.ClippedLinearCell` in a clipped configuration: a relu IndRNN),
    ``"exact_jacobian"`` (a :class:`rnnjax.cell.StructuredJacobian` whose blocks are its whole
    Jacobian: ParaGRU, ParaLSTM, a tanh IndRNN) or ``"nonlinear"`` (any other cell)."""
    if isinstance(cell, LinearCell):
        return "log_linear" if cell.log_space else "linear"
    if runs_associatively(cell):
        return "clipped_linear"
    if isinstance(cell, StructuredJacobian) and cell.jacobian_kind == "exact":
        return "exact_jacobian"
    return "nonlinear"


def choose_method(cell: Cell, steps: int, backend: str | None = None) -> str:
    """The name of the method ``rj.Auto()`` runs for ``cell`` over ``steps`` time steps.

    Example:
      >>> import rnnjax as rj
      >>> choose_method(rj.GRU(8), 1024, backend="cpu")
      'sequential'
      >>> choose_method(rj.MinGRU(8), 4096, backend="gpu")
      'associative'
    """
    rows = AUTO_TABLE[backend_key(backend)][cell_kind(cell)]
    method = rows[0][1]
    for min_steps, name in rows:
        if steps >= min_steps:
            method = name
    return method


def default_chunk_size(steps: int, backend: str | None = None) -> int:
    """The chunk size ``rj.Chunked()`` uses when given none.

    Example:
      >>> default_chunk_size(4096, backend="cpu") in (64, 128)
      True
    """
    rule = AUTO_TABLE[backend_key(backend)]["chunk_size"]
    if rule == "sqrt":
        return int(min(1024, max(16, 2 ** round(math.log2(max(steps, 1)) / 2))))
    return int(rule)
