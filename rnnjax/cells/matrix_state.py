r"""The matrix-state capability: cells whose state is a ``(d_k, d_v)`` matrix per head, updated
by a gated outer product, and the one-step recurrences they share.

Four recurrences, all in the layout ``q, k: (*batch, heads, d_k)``, ``v: (*batch, heads, d_v)``:

- gated linear attention (:func:`gla_step`; linear attention, RetNet, Mamba2's SSD, GLA):

  .. math:: S_t = \mathrm{diag}(e^{g_t}) S_{t-1} + k_t v_t^\top, \qquad o_t = S_t^\top (s\, q_t)

- xLSTM's stabilised mLSTM (:func:`mlstm_step`):

  .. math::

      m_t &= \max(\log\sigma(f_t) + m_{t-1},\ i_t), \quad
      f'_t = e^{\log\sigma(f_t) + m_{t-1} - m_t}, \quad i'_t = e^{i_t - m_t} \\
      C_t &= f'_t C_{t-1} + i'_t k_t v_t^\top, \quad n_t = f'_t n_{t-1} + i'_t k_t, \quad
      h_t = \frac{C_t^\top \tilde q_t}{\max(|n_t^\top \tilde q_t|, e^{-m_t}) + \epsilon}

- the gated delta rule (:func:`delta_step`; DeltaNet, Gated DeltaNet, KDA), the decay applied
  before the prediction :math:`(D_t S_{t-1})^\top k_t`:

  .. math:: S_t = (I - \beta_t k_t k_t^\top) D_t S_{t-1} + \beta_t k_t v_t^\top, \qquad
            D_t = \mathrm{diag}(e^{g_t})

- the diagonal-plus-low-rank recurrence (:func:`dplr_step`; RWKV-7, fla's generalised delta
  rule), :math:`a_t` reading the state and :math:`b_t` writing it:

  .. math:: S_t = (\mathrm{diag}(e^{w_t}) + b_t a_t^\top) S_{t-1} + k_t v_t^\top

A :class:`MatrixStateCell` splits its step into per-step pieces that need no state (input
projections, an optional short causal convolution, the output), so a chunkwise engine
(:mod:`rnnjax.engines.matrix`) computes them for all steps at once and runs only the
recurrence chunk by chunk; ``step`` composes the same pieces for one token.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import Cell

Array = jax.Array
RECURRENCES = ("gla", "mlstm", "delta", "dplr")


class GatedInputs(NamedTuple):
    """One step (or, time-major, all steps) of gated linear attention."""

    q: Array  # (*batch, heads, d_k)
    k: Array  # (*batch, heads, d_k)
    v: Array  # (*batch, heads, d_v)
    log_decay: Array | None  # None, (*batch, heads) or (*batch, heads, d_k); values <= 0


class MLSTMInputs(NamedTuple):
    """One step (or, time-major, all steps) of the mLSTM; gates are pre-activations."""

    q: Array  # (*batch, heads, d_k)
    k: Array  # (*batch, heads, d_k)
    v: Array  # (*batch, heads, d_v)
    input_gate: Array  # (*batch, heads): i_t
    forget_gate: Array  # (*batch, heads): f_t (log sigma(f_t) is the log decay)


class DeltaInputs(NamedTuple):
    """One step (or, time-major, all steps) of the gated delta rule."""

    q: Array  # (*batch, heads, d_k)
    k: Array  # (*batch, heads, d_k); the cells L2-normalise it, the recurrence does not
    v: Array  # (*batch, heads, d_v)
    beta: Array  # (*batch, heads): the write strength, in [0, 2] (above 1: negative eigenvalues)
    log_decay: Array | None  # None, (*batch, heads) or (*batch, heads, d_k); values <= 0


class DPLRInputs(NamedTuple):
    """One step (or, time-major, all steps) of the diagonal-plus-low-rank recurrence."""

    q: Array  # (*batch, heads, d_k): RWKV-7's receptance r
    k: Array  # (*batch, heads, d_k)
    v: Array  # (*batch, heads, d_v)
    a: Array  # (*batch, heads, d_k): reads the state (a^T S)
    b: Array  # (*batch, heads, d_k): writes what a read
    log_decay: Array  # (*batch, heads, d_k): RWKV-7's log w, values <= 0


class MLSTMState(NamedTuple):
    """The mLSTM's stabilised state."""

    C: Array  # (*batch, heads, d_k, d_v): the matrix memory, scaled by exp(-m)
    n: Array  # (*batch, heads, d_k): the normaliser, scaled by exp(-m)
    m: Array  # (*batch, heads): the log-scale stabiliser


Inputs = GatedInputs | MLSTMInputs | DeltaInputs | DPLRInputs


def _decayed(state: Array, g: Array | None, q: Array) -> Array:
    """``diag(e^g) S`` for ``g`` per head (``q.ndim - 1`` axes) or per key (``q.ndim``)."""
    if g is None:
        return state
    decay = jnp.exp(g)
    return state * (decay[..., None, None] if g.ndim == q.ndim - 1 else decay[..., None])


def gla_step(state: Array, inputs: GatedInputs, scale: float) -> tuple[Array, Array]:
    """``(S_t, o_t)`` from ``S_{t-1}`` (``(*batch, heads, d_k, d_v)``) and one step's inputs."""
    q, k, v, g = inputs
    state = _decayed(state, g, q) + k[..., :, None] * v[..., None, :]
    return state, jnp.einsum("...d,...de->...e", q * scale, state)


def mlstm_step(state: MLSTMState, inputs: MLSTMInputs, scale: float, eps: float) -> tuple[MLSTMState, Array]:
    """``((C_t, n_t, m_t), h_t)`` from the previous state and one step's inputs."""
    q, k, v, i, f = inputs
    log_f = jax.nn.log_sigmoid(f)
    m = jnp.maximum(log_f + state.m, i)
    f_act, i_act = jnp.exp(log_f + state.m - m), jnp.exp(i - m)
    C = f_act[..., None, None] * state.C + i_act[..., None, None] * (k[..., :, None] * v[..., None, :])
    n = f_act[..., None] * state.n + i_act[..., None] * k
    q = q * scale
    num = jnp.einsum("...d,...de->...e", q, C)
    den = jnp.maximum(jnp.abs(jnp.einsum("...d,...d->...", q, n)), jnp.exp(-m)) + eps
    return MLSTMState(C, n, m), num / den[..., None]


def delta_step(state: Array, inputs: DeltaInputs, scale: float) -> tuple[Array, Array]:
    """``(S_t, o_t)`` of the gated delta rule from ``S_{t-1}`` (``(*batch, heads, d_k, d_v)``)."""
    q, k, v, beta, g = inputs
    state = _decayed(state, g, q)
    error = v - jnp.einsum("...d,...de->...e", k, state)  # what S predicts for k, subtracted from v
    state = state + (beta[..., None] * k)[..., :, None] * error[..., None, :]
    return state, jnp.einsum("...d,...de->...e", q * scale, state)


def dplr_step(state: Array, inputs: DPLRInputs, scale: float) -> tuple[Array, Array]:
    """``(S_t, o_t)`` of the diagonal-plus-low-rank recurrence from ``S_{t-1}``."""
    q, k, v, a, b, w = inputs
    read = jnp.einsum("...d,...de->...e", a, state)  # a^T S_{t-1}, before the decay
    state = _decayed(state, w, q) + b[..., :, None] * read[..., None, :] + k[..., :, None] * v[..., None, :]
    return state, jnp.einsum("...d,...de->...e", q * scale, state)


def zero_state(recurrence: str, batch_shape: tuple[int, ...], heads: int, d_k: int, d_v: int, dtype: Any) -> Any:
    """The zero state of ``recurrence`` (``"mlstm"``: :class:`MLSTMState`; the others: ``S``)."""
    S = jnp.zeros((*batch_shape, heads, d_k, d_v), dtype)
    if recurrence != "mlstm":
        return S
    return MLSTMState(S, jnp.zeros((*batch_shape, heads, d_k), dtype), jnp.zeros((*batch_shape, heads), dtype))


class MatrixCarry(NamedTuple):
    """The carry of a matrix-state cell with a short convolution."""

    conv: Array  # (*batch, conv_width - 1, conv_channels): the last inputs of the convolution
    state: Any  # the recurrence's state: S (*batch, heads, d_k, d_v) or an MLSTMState


class MatrixStateCell(Cell):
    """Capability: a cell whose recurrence is :func:`gla_step`, :func:`mlstm_step`,
    :func:`delta_step` or :func:`dplr_step` on inputs computed per step, so
    :class:`rnnjax.Chunked` runs it chunkwise (matrix products within a chunk, the state passed
    between chunks).

    A step is ``split -> [causal convolution] -> mix -> recurrence -> readout``:

    - :meth:`split` ``(params, x) -> (conv_in, rest)``: what enters the convolution
      (``(*batch, conv_channels)``, or ``None`` when ``conv_width == 0``) and anything else the
      later pieces need (a pytree of ``(*batch, ...)`` arrays).
    - :meth:`convolve` ``(params, window) -> conv_out``: the convolution output of one step from
      its window ``(*batch, conv_width, conv_channels)`` (oldest input first).
    - :meth:`mix` ``(params, conv_out, rest)``: the recurrence's inputs (:class:`GatedInputs`,
      :class:`MLSTMInputs`, :class:`DeltaInputs` or :class:`DPLRInputs`).
    - :meth:`readout` ``(params, o, conv_out, rest) -> y``: the output from the recurrence's
      ``o`` (``(*batch, heads, d_v)``).

    Every piece is applied to one step's arrays; engines apply them to all steps at once
    (time-major), so they must treat leading axes as batch axes. The carry is the recurrence's
    state when ``conv_width == 0``, else :class:`MatrixCarry`.
    """

    recurrence: ClassVar[str]  # one of RECURRENCES
    conv_width: int = 0  # a subclass with a convolution makes this a field
    eps: float = 1e-6  # the mLSTM denominator's epsilon (a field of mLSTM subclasses)

    @abc.abstractmethod
    def state_sizes(self, params: Any = None) -> tuple[int, int, int]:
        """``(heads, d_k, d_v)`` of the state."""

    def decays_per_key(self) -> bool:
        """Whether the log decay has one value per key dimension (GLA) rather than per head; the
        chunk-size table has a row for each (:func:`rnnjax.tuning.matrix_chunk_size`)."""
        return False

    def query_scale(self) -> float:
        """The factor on ``q`` (``d_k ** -0.5`` unless a cell says otherwise)."""
        return float(self.state_sizes()[1]) ** -0.5

    @abc.abstractmethod
    def split(self, params: Any, x: Array) -> tuple[Array | None, Any]: ...

    def convolve(self, params: Any, window: Array) -> Array:
        raise NotImplementedError(f"{type(self).__name__} has no convolution (conv_width=0)")

    @abc.abstractmethod
    def mix(self, params: Any, conv_out: Array | None, rest: Any) -> Inputs: ...

    @abc.abstractmethod
    def readout(self, params: Any, o: Array, conv_out: Array | None, rest: Any) -> Array: ...

    def conv_channels(self, params: Any = None) -> int:
        return 0

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> Any:
        heads, d_k, d_v = self.state_sizes()
        state = zero_state(self.recurrence, tuple(batch_shape), heads, d_k, d_v, dtype)
        if not self.conv_width:
            return state
        window = jnp.zeros((*batch_shape, self.conv_width - 1, self.conv_channels()), dtype)
        return MatrixCarry(window, state)

    def recur(self, state: Any, inputs: Inputs) -> tuple[Any, Array]:
        """One step of the recurrence."""
        if self.recurrence == "mlstm":
            return mlstm_step(state, inputs, self.query_scale(), self.eps)  # type: ignore[arg-type]
        step = {"gla": gla_step, "delta": delta_step, "dplr": dplr_step}[self.recurrence]
        return step(state, inputs, self.query_scale())  # type: ignore[operator]

    def step(self, params: Any, carry: Any, x: Array) -> tuple[Any, Array]:
        self.check_input(params, x)
        conv_in, rest = self.split(params, x)
        conv_out, state = None, carry
        if self.conv_width:
            assert conv_in is not None, f"{type(self).__name__}.split gave no convolution input"
            window = jnp.concatenate([carry.conv, conv_in[..., None, :].astype(carry.conv.dtype)], axis=-2)
            conv_out, state = self.convolve(params, window), carry.state
        state, o = self.recur(state, self.mix(params, conv_out, rest))
        y = self.readout(params, o, conv_out, rest)
        return (MatrixCarry(window[..., 1:, :], state) if self.conv_width else state), y
