r"""``gla`` and ``mlstm``: the matrix-state recurrences on already-projected tensors.

Layout: ``q, k: (*batch, T, heads, d_k)``, ``v: (*batch, T, heads, d_v)``, gates
``(*batch, T, heads)`` (or ``(*batch, T, heads, d_k)``), state ``(*batch, heads, d_k, d_v)``;
any number of batch axes, none included. Each op is a :class:`rnnjax.cells.matrix_state.MatrixStateCell`
without parameters run by :func:`rnnjax.scan.evaluate`, the evaluation behind ``rj.scan``, so
``lengths``, ``resets`` and ``reverse`` mean exactly what they mean there and every method value
that runs a matrix-state cell runs the op: ``rj.Chunked()`` (the default) and ``rj.Sequential()``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.cell import frozen
from rnnjax.cells.matrix_state import GatedInputs, MatrixStateCell, MLSTMInputs, MLSTMState
from rnnjax.checks import check_positive_number
from rnnjax.methods import Chunked, Method, as_method
from rnnjax.scan import evaluate
from rnnjax.sequence import check_reverse, validate

Array = jax.Array
GATES = ("none", "head", "key")


class _ProjectedOp(MatrixStateCell):
    """What the ops' cells share: no parameters, a step input that is the per-step tensors
    concatenated and flattened (cut apart by :meth:`widths`), an output ``o`` flattened over
    the heads. Subclasses set ``heads``, ``key_size``, ``value_size``, ``scale`` and :meth:`mix`."""

    heads: int
    key_size: int
    value_size: int
    scale: float

    def widths(self) -> tuple[int, ...]:
        """The per-step tensors' widths in the concatenated input, in order."""
        raise NotImplementedError

    def state_sizes(self, params: Any = None) -> tuple[int, int, int]:
        return self.heads, self.key_size, self.value_size

    def query_scale(self) -> float:
        return self.scale

    def init(self, key, input_size, dtype=jnp.float32):
        return None

    def input_size(self, params: Any) -> int:
        return sum(self.widths())

    def output_size(self, input_size: int) -> int:
        return self.heads * self.value_size

    def split(self, params, x):
        return None, x

    def readout(self, params, o, conv_out, x):
        return o.reshape(*o.shape[:-2], o.shape[-2] * o.shape[-1])


@frozen
class GatedOuterProduct(_ProjectedOp):
    """Gated linear attention as a cell whose step input is ``q, k, v`` and the log decay of one
    step, concatenated and flattened (what :func:`gla` builds)."""

    recurrence: ClassVar[str] = "gla"
    heads: int
    key_size: int
    value_size: int
    gate: str  # "none", "head" (one decay per head) or "key" (one per key dimension)
    scale: float

    def widths(self) -> tuple[int, ...]:
        h, dk, dv = self.heads, self.key_size, self.value_size
        return (h * dk, h * dk, h * dv, _decay_width(self.gate, h, dk))

    def decays_per_key(self) -> bool:
        return self.gate == "key"

    def mix(self, params, conv_out, x):
        q, k, v, g = _unflatten(x, self.widths(), self.heads)
        return GatedInputs(q, k, v, _decay_of(self.gate, g))


@frozen
class MLSTMOp(_ProjectedOp):
    """xLSTM's mLSTM as a cell whose step input is ``q, k, v`` and the two gate
    pre-activations of one step, concatenated and flattened (what :func:`mlstm` builds)."""

    recurrence: ClassVar[str] = "mlstm"
    heads: int
    key_size: int
    value_size: int
    scale: float
    eps: float = 1e-6

    def widths(self) -> tuple[int, ...]:
        h, dk, dv = self.heads, self.key_size, self.value_size
        return (h * dk, h * dk, h * dv, h, h)

    def mix(self, params, conv_out, x):
        q, k, v, i, f = _unflatten(x, self.widths(), self.heads)
        return MLSTMInputs(q, k, v, i[..., 0], f[..., 0])


def _unflatten(x: Array, widths: tuple[int, ...], heads: int) -> list[Array | None]:
    """The per-step inputs ``(..., heads, width / heads)`` from their concatenation ``x``."""
    parts = _split_columns(x, widths)
    return [p.reshape(*x.shape[:-1], heads, w // heads) if w else None for p, w in zip(parts, widths)]


def _decay_width(gate: str, heads: int, d_k: int) -> int:
    """Columns a step's log decay takes in the concatenated input: ``gate`` is ``"none"``,
    ``"head"`` (one per head) or ``"key"`` (one per key dimension)."""
    return {"none": 0, "head": heads, "key": heads * d_k}[gate]


def _decay_of(gate: str, g: Array | None) -> Array | None:
    """The log decay as the recurrence takes it from its ``(..., heads, width)`` block."""
    if gate == "none" or g is None:
        return None
    return g[..., 0] if gate == "head" else g


def _decay_part(log_decay: Any, q: Array) -> tuple[str, list[Array]]:
    """``(gate, parts)``: the kind of ``log_decay`` (``None``, ``(*batch, T, heads)`` or
    ``(*batch, T, heads, d_k)``, checked against ``q``) and the block it adds to the input."""
    if log_decay is None:
        return "none", []
    log_decay = jnp.asarray(log_decay)
    if log_decay.shape == q.shape[:-1]:
        return "head", [log_decay[..., None]]
    want = f"(*batch, T, heads) = {q.shape[:-1]} or (*batch, T, heads, d_k) = {q.shape}"
    return "key", [_check("log_decay", log_decay, q.shape, want)]


def _check_state(state: Any, batch: Any, heads: int, d_k: int, d_v: int) -> None:
    if state is not None:
        _check("state", state, (*batch, heads, d_k, d_v), "(*batch, heads, d_k, d_v)")


def _split_columns(x: Array, widths: tuple[int, ...]) -> list[Array]:
    """``x``'s last axis cut into blocks of ``widths``. ``jnp.split`` (JAX's ``split``
    primitive) transposes to one concatenation of the blocks' cotangents: autodiff of slices
    would pad each block to the full width and add them up, which measured 20% of the chunkwise
    gla's fwd+bwd (``benchmarks/linear_attention.py``). Unlike a ``custom_vjp``, it keeps
    forward mode (``jax.jvp``)."""
    return jnp.split(x, np.cumsum(widths)[:-1].tolist(), axis=-1)


def _check(name: str, a: Any, shape: tuple[int | None, ...], what: str) -> Array:
    """``a`` as a float array of ``shape`` (``None`` entries: any size)."""
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name} has dtype {a.dtype}; expected a floating dtype")
    if a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape)):
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} has shape {tuple(a.shape)}; expected {want}, {what}")
    return a


def _check_qkv(q: Any, k: Any, v: Any, query: str = "q") -> tuple[Array, Array, Array]:
    """``q, k, v`` checked against each other; ``query`` is the query's name in errors."""
    q = jnp.asarray(q)
    if q.ndim < 3:
        raise ValueError(f"{query} has shape {tuple(q.shape)}; expected (*batch, T, heads, d_k)")
    k = _check("k", k, q.shape, f"the shape of {query}: (*batch, T, heads, d_k)")
    _check(query, q, q.shape, "")
    want = f"(*batch, T, heads, d_v) with (*batch, T, heads) = {q.shape[:-1]} of {query}"
    return q, k, _check("v", v, (*q.shape[:-1], None), want)


def _method(method: Method | str | None) -> Method:
    return Chunked() if method is None else as_method(method)


def _scale(scale: float | None, d_k: int) -> float:
    if scale is None:
        return float(d_k) ** -0.5
    check_positive_number(scale, "scale")
    return float(scale)


def _run(cell: MatrixStateCell, parts: list[Array], state, lengths, resets, reverse, method, o_shape):
    """Flatten the per-step inputs into one ``xs`` and evaluate ``cell`` over it."""
    dtype = jnp.result_type(*parts)
    flat = [p.reshape(*p.shape[:-2], p.shape[-2] * p.shape[-1]).astype(dtype) for p in parts]  # (*batch, T, w)
    # Concatenated time-major and handed over transposed: evaluate's move of the time axis to the
    # front cancels that transpose, so under jit XLA slices each part from its own array and never
    # materialises the concatenation (benchmarks/lab/chunked_overhead.py).
    xs = jnp.moveaxis(jnp.concatenate([jnp.moveaxis(p, -2, 0) for p in flat], axis=-1), 0, -2)
    reverse = check_reverse(reverse)
    xs, state, lengths, resets = validate(cell, None, xs, state, lengths, resets)
    o, final, _ = evaluate(cell, None, xs, state, lengths, resets, reverse, _method(method))
    return o.reshape(o_shape), final


def gla(
    q: Array,
    k: Array,
    v: Array,
    log_decay: Array | None = None,
    *,
    scale: float | None = None,
    state: Array | None = None,
    lengths: Array | None = None,
    resets: Array | None = None,
    reverse: bool = False,
    method: Method | str | None = None,
) -> tuple[Array, Array]:
    r"""Gated linear attention: :math:`S_t = \mathrm{diag}(e^{g_t}) S_{t-1} + k_t v_t^\top`,
    :math:`o_t = S_t^\top (s\, q_t)`, per head.

    Args:
      q, k: ``(*batch, T, heads, d_k)``; v: ``(*batch, T, heads, d_v)``.
      log_decay: :math:`g_t \le 0`. ``None``: plain linear attention (no decay); ``(*batch, T,
        heads)``: one decay per head and step (RetNet with a constant, Mamba2's SSD with
        ``g = dt * A``, "simple GLA"); ``(*batch, T, heads, d_k)``: one per key dimension (GLA,
        HGRN2).
      scale: :math:`s`; ``None``: ``d_k ** -0.5``.
      state: ``(*batch, heads, d_k, d_v)`` before the first step; zeros when ``None``.
      lengths, resets, reverse: as in :func:`rnnjax.scan`: steps at or past a length keep the
        state and output zeros; ``resets[..., t]`` zeroes the state before step ``t`` (packed
        documents, fla's ``cu_seqlens``); ``reverse`` runs each sequence backwards.
      method: ``rj.Chunked(size)`` (default: the chunkwise form, chunk size from
        :mod:`rnnjax.tuning`) or ``rj.Sequential()`` (the step recurrence).

    Returns:
      ``(o, final_state)``: ``(*batch, T, heads, d_v)`` and ``(*batch, heads, d_k, d_v)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> q = k = jnp.ones((2, 10, 4, 8)); v = jnp.ones((2, 10, 4, 16))
      >>> g = jnp.full((2, 10, 4), -0.1)
      >>> o, S = rj.linear_attention.gla(q, k, v, g)
      >>> o.shape, S.shape
      ((2, 10, 4, 16), (2, 4, 8, 16))
    """
    q, k, v = _check_qkv(q, k, v)
    *batch, steps, heads, d_k = q.shape
    gate, decay = _decay_part(log_decay, q)
    cell = GatedOuterProduct(heads, d_k, v.shape[-1], gate, _scale(scale, d_k))
    _check_state(state, batch, heads, d_k, v.shape[-1])
    return _run(cell, [q, k, v, *decay], state, lengths, resets, reverse, method, v.shape)


def mlstm(
    q: Array,
    k: Array,
    v: Array,
    input_gate: Array,
    forget_gate: Array,
    *,
    scale: float | None = None,
    state: MLSTMState | None = None,
    eps: float = 1e-6,
    lengths: Array | None = None,
    resets: Array | None = None,
    reverse: bool = False,
    method: Method | str | None = None,
) -> tuple[Array, MLSTMState]:
    r"""xLSTM's mLSTM (Beck et al. 2024) with its stabilised exponential input gate, per head:

    .. math::

        m_t &= \max(\log\sigma(f_t) + m_{t-1},\ i_t), \quad
        f'_t = e^{\log\sigma(f_t) + m_{t-1} - m_t}, \quad i'_t = e^{i_t - m_t} \\
        C_t &= f'_t C_{t-1} + i'_t k_t v_t^\top, \quad n_t = f'_t n_{t-1} + i'_t k_t \\
        h_t &= C_t^\top \tilde q_t \,/\, (\max(|n_t^\top \tilde q_t|, e^{-m_t}) + \epsilon),
        \qquad \tilde q_t = s\, q_t

    Args:
      q, k: ``(*batch, T, heads, d_k)``; v: ``(*batch, T, heads, d_v)``.
      input_gate, forget_gate: pre-activations :math:`i_t, f_t`, ``(*batch, T, heads)``.
      scale: :math:`s`; ``None``: ``d_k ** -0.5``.
      state: :class:`MLSTMState` ``(C (*batch, heads, d_k, d_v), n (*batch, heads, d_k),
        m (*batch, heads))``; zeros when ``None``.
      eps: :math:`\epsilon`.
      lengths, resets, reverse, method: as in :func:`gla`.

    Returns:
      ``(h, final_state)``: ``(*batch, T, heads, d_v)`` and the final :class:`MLSTMState`.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> q = k = jnp.ones((10, 2, 8)); v = jnp.ones((10, 2, 4))
      >>> h, (C, n, m) = rj.linear_attention.mlstm(q, k, v, jnp.zeros((10, 2)), jnp.full((10, 2), 3.0))
      >>> h.shape, C.shape, m.shape
      ((10, 2, 4), (2, 8, 4), (2,))
    """
    q, k, v = _check_qkv(q, k, v)
    *batch, steps, heads, d_k = q.shape
    gates = [
        _check(n, g, q.shape[:-1], "(*batch, T, heads)")
        for n, g in (("input_gate", input_gate), ("forget_gate", forget_gate))
    ]
    check_positive_number(eps, "eps")
    cell = MLSTMOp(heads, d_k, v.shape[-1], _scale(scale, d_k), float(eps))
    if state is not None:
        if not isinstance(state, tuple) or len(state) != 3:
            raise TypeError(f"state must be an MLSTMState (C, n, m), got {type(state).__name__}")
        state = MLSTMState(
            _check("state.C", state[0], (*batch, heads, d_k, v.shape[-1]), "(*batch, heads, d_k, d_v)"),
            _check("state.n", state[1], (*batch, heads, d_k), "(*batch, heads, d_k)"),
            _check("state.m", state[2], (*batch, heads), "(*batch, heads)"),
        )
    parts = [q, k, v, gates[0][..., None], gates[1][..., None]]
    return _run(cell, parts, state, lengths, resets, reverse, method, v.shape)
