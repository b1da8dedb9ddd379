"""Measured per-backend choices: the loop unroll of ``rj.Sequential(unroll="auto")``, the
method ``rj.Auto()`` picks, the chunk size of ``rj.Chunked()`` and how ``rj.Newton()`` solves
its linear recurrences.

Each table comes from a benchmark whose command and figures are recorded in
``benchmarks/lab/DECISIONS.md``; change a row only with a new measurement.
Backends other than ``"cpu"`` use the ``"gpu"`` rows (TPU is not measured).
"""

from __future__ import annotations

import math
from typing import Any

import jax

from rnnjax.cell import Cell, LinearCell, StructuredJacobian, runs_associatively
from rnnjax.cells.matrix_state import MatrixStateCell
from rnnjax.checks import is_int
from rnnjax.engines.newton import SOLVES

# Steps per loop iteration for unroll="auto" (DECISIONS.md, "Unroll per backend").
AUTO_UNROLL = {"cpu": 1, "gpu": 16}

# What rj.Auto() runs, per backend and cell kind: ``(min_T, method name)`` rows sorted by
# min_T, the last row with min_T <= T wins; "chunk_size" is rj.Chunked()'s default rule
# ("sqrt": the power of two nearest sqrt(T), clipped to [16, 1024]). Rows not measured on a
# backend keep the sequential loop (DECISIONS.md: "The 'auto' method table", "A relu IndRNN is
# solved by one clipped scan", "Newton returns its last evaluation's outputs").
AUTO_TABLE: dict[str, dict[str, Any]] = {
    "cpu": {
        "log_linear": ((0, "sequential"),),
        "linear": ((0, "sequential"),),
        "clipped_linear": ((0, "sequential"),),
        "exact_jacobian": ((0, "sequential"),),
        "nonlinear": ((0, "sequential"),),
        "matrix_state": ((0, "chunked"),),
        "chunk_size": "sqrt",
    },
    "gpu": {
        "log_linear": ((0, "associative"),),
        "linear": ((0, "associative"),),
        "clipped_linear": ((0, "sequential"),),
        "exact_jacobian": ((0, "sequential"),),
        "nonlinear": ((0, "sequential"),),
        "matrix_state": ((0, "chunked"),),
        "chunk_size": "sqrt",
    },
}
CELL_KINDS = ("log_linear", "linear", "clipped_linear", "exact_jacobian", "nonlinear", "matrix_state")

# What rj.Auto() runs with the time axis split over devices (rj.distributed.sequence_scan, any
# backend): one associative scan for the cells it solves exactly, Newton's method for the others
# (the only two methods whose engines split time).
TIME_SHARDED = {
    "log_linear": "associative",
    "linear": "associative",
    "clipped_linear": "associative",
    "exact_jacobian": "newton",
    "nonlinear": "newton",
    "matrix_state": "chunked",
}

# rj.Chunked()'s chunk size for matrix-state recurrences, per backend and recurrence ("gla" and
# "delta" with no or one decay per head, "gla_key"/"delta_key" with per-key decays, "mlstm",
# "dplr") (DECISIONS.md, "Chunk sizes of the matrix-state recurrences" and "... of the delta rule
# and RWKV-7"). GPU rows are unmeasured: fla's sizes (16 for its RWKV-7 kernels).
MATRIX_CHUNK = {
    "cpu": {"gla": 64, "gla_key": 64, "mlstm": 64, "delta": 32, "delta_key": 64, "dplr": 32},
    "gpu": {"gla": 64, "gla_key": 64, "mlstm": 64, "delta": 64, "delta_key": 64, "dplr": 16},
}


# How rj.Newton(solve="auto") solves each iteration's linear recurrence (DECISIONS.md,
# "Newton's linear solves are sequential on CPU").
AUTO_NEWTON_SOLVE = {"cpu": "sequential", "gpu": "associative"}
NEWTON_SOLVES = ("auto", *SOLVES)


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


def check_unroll(unroll: Any) -> None:
    """Raise ``ValueError`` unless ``unroll`` is a positive int, ``True`` or ``"auto"`` (without
    asking JAX for its backend, which would start it: method values are built at import)."""
    if not ((isinstance(unroll, str) and unroll == "auto") or unroll is True or (is_int(unroll) and unroll >= 1)):
        raise ValueError(f'unroll must be a positive int, True or "auto", got {unroll!r}')


def resolve_unroll(unroll: int | bool | str, backend: str | None = None) -> int | bool:
    """``unroll`` with ``"auto"`` replaced by :data:`AUTO_UNROLL`'s value for ``backend`` (1 on
    CPU, 16 on GPU), decided when traced; a bad value raises ``ValueError``."""
    check_unroll(unroll)
    return auto_unroll(backend) if isinstance(unroll, str) else unroll


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
    Jacobian: ParaGRU, ParaLSTM, a tanh IndRNN), ``"matrix_state"`` (a
    :class:`rnnjax.cells.matrix_state.MatrixStateCell`) or ``"nonlinear"`` (any other cell)."""
    if isinstance(cell, MatrixStateCell):
        return "matrix_state"
    if isinstance(cell, LinearCell):
        return "log_linear" if cell.log_space else "linear"
    if runs_associatively(cell):
        return "clipped_linear"
    if isinstance(cell, StructuredJacobian) and cell.jacobian_kind == "exact":
        return "exact_jacobian"
    return "nonlinear"


def choose_method(cell: Cell, steps: int, backend: str | None = None, time_sharded: bool = False) -> str:
    """The name of the method ``rj.Auto()`` runs for ``cell`` over ``steps`` time steps
    (``time_sharded``: with the time axis split over devices, :data:`TIME_SHARDED`).

    Example:
      >>> import rnnjax as rj
      >>> choose_method(rj.GRU(8), 1024, backend="cpu")
      'sequential'
      >>> choose_method(rj.MinGRU(8), 4096, backend="gpu")
      'associative'
      >>> choose_method(rj.GRU(8), 4096, time_sharded=True)
      'newton'
    """
    if time_sharded:
        return TIME_SHARDED[cell_kind(cell)]
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


def matrix_chunk_size(cell: MatrixStateCell, backend: str | None = None) -> int:
    """The chunk size ``rj.Chunked()`` uses for a matrix-state cell when given none
    (:data:`MATRIX_CHUNK`), by its recurrence and whether it decays per key."""
    per_key = cell.recurrence in ("gla", "delta") and cell.decays_per_key()
    kind = cell.recurrence + ("_key" if per_key else "")
    return MATRIX_CHUNK[backend_key(backend)][kind]
