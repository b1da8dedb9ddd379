"""ParaRNN's cells: a GRU and a CIFG LSTM whose recurrence is diagonal, so that each unit's
state depends on the previous step only through its own state (an exact, unit-local Jacobian)."""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import HiddenStateCell, StructuredJacobian, check_positive_int, frozen
from rnnjax.ops import Activation, Initializer, glorot_uniform, matmul, resolve_activation, stacked_init


def xlstm_normal(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Normal with standard deviation ``2 / sqrt(5 * shape[-1])``: ParaRNN's ``"xlstm"`` init of
    the diagonal weights, whose fan-in is the state size (the last axis)."""
    work = jnp.promote_types(dtype, jnp.float32)  # the same draw in every dtype, then rounded
    std = 2.0 / math.sqrt(5 * shape[-1])
    return (std * jax.random.normal(key, shape, work)).astype(dtype)


def minus_linspace_first_row(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Zeros of ``shape = (gates, hidden)`` but row 0, which is ``-linspace(0, 1, hidden)``:
    ParaRNN's ``"bias_minus_linspace"`` (the first gate's bias spread over ``[-1, 0]``)."""
    del key
    bias = jnp.zeros(shape, jnp.promote_types(dtype, jnp.float32))
    return bias.at[0].set(-jnp.linspace(0.0, 1.0, shape[-1], dtype=bias.dtype)).astype(dtype)


class ParaGRUParams(NamedTuple):
    w_x: jax.Array  # (input_size, 3 * hidden), gates z, r, h
    a: jax.Array  # (3, hidden): diagonal recurrent weights, rows z, r, h
    b: jax.Array | None  # (3 * hidden,), gates z, r, h; None when use_bias=False


class ParaLSTMParams(NamedTuple):
    w_x: jax.Array  # (input_size, 3 * hidden), gates f, o, c
    a: jax.Array  # (3, hidden): diagonal recurrent weights, rows f, o, c
    p: jax.Array  # (2, hidden): diagonal peepholes, rows f (on c_{t-1}) and o (on c_t)
    b: jax.Array | None  # (3 * hidden,), gates f, o, c; None when use_bias=False


class ParaLSTMState(NamedTuple):
    h: jax.Array  # (*batch, hidden): the output
    c: jax.Array  # (*batch, hidden): the cell state


class _ParaCell(HiddenStateCell, StructuredJacobian):
    """What both cells share: config checks, ``w_x``/``a``/``b`` init, the input projection.
    The default :meth:`StructuredJacobian.step_with_jacobian` is exact for them."""

    hidden_size: int
    use_bias: bool
    activation: Activation
    gate_activation: Activation
    kernel_init: Initializer
    recurrent_init: Initializer
    bias_init: Initializer

    def __post_init__(self):
        check_positive_int(self.hidden_size, "hidden_size")
        resolve_activation(self.activation)
        resolve_activation(self.gate_activation, "gate_activation")

    def _init_common(
        self, key: jax.Array, input_size: int, dtype: Any
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """``(w_x, a, b)``."""
        check_positive_int(input_size, "input_size")
        kx, ka, kb = jax.random.split(key, 3)
        h = self.hidden_size
        w_x = stacked_init(self.kernel_init, kx, input_size, h, 3, dtype)
        a = self.recurrent_init(ka, (3, h), dtype)
        b = self.bias_init(kb, (3, h), dtype).reshape(3 * h) if self.use_bias else None
        return w_x, a, b

    def _gate_inputs(self, params: Any, x: jax.Array) -> list[jax.Array]:
        """``x W + b`` split into its three gates, each ``(*batch, hidden)``."""
        z = matmul(x, params.w_x)
        if params.b is not None:
            z = z + params.b
        return jnp.split(z, 3, axis=-1)


@frozen
class ParaGRU(_ParaCell):
    r"""GRU with diagonal recurrence (ParaRNN's ``GRUDiagMH``; Danieli et al. 2025).

    Each gate sees the previous state through one weight per unit (rows of ``a``), so the
    state Jacobian is diagonal by construction and ``jacobian_kind == "exact"``. Gate order
    in ``w_x``, ``a`` and ``b`` is ``z, r, h``:

    .. math::

        z_t &= \sigma(a_z \odot h_{t-1} + x_t W_z + b_z) \\
        r_t &= \sigma(a_r \odot h_{t-1} + x_t W_r + b_r) \\
        n_t &= \tanh(a_h \odot (r_t \odot h_{t-1}) + x_t W_h + b_h) \\
        h_t &= z_t \odot n_t + (1 - z_t) \odot h_{t-1}, \qquad y_t = h_t

    As in ParaRNN, ``z`` weights the *candidate* ``n`` (``rj.GRU``'s ``z`` weights the old
    state). ``sigma`` is ``gate_activation`` and ``tanh`` is ``activation``. ParaRNN's
    ``num_heads`` (a block-diagonal ``W``) is not offered: ``w_x`` is dense (one head).

    Initialisation (ParaRNN's defaults): ``w_x`` Glorot-uniform per gate, bound
    ``sqrt(6 / (input_size + hidden_size))``; ``a`` normal with standard deviation
    ``2 / sqrt(5 * hidden_size)`` (:func:`xlstm_normal`); ``b`` zeros but ``b_z``, which is
    ``-linspace(0, 1, hidden_size)`` (:func:`minus_linspace_first_row`). Each is replaceable
    through ``kernel_init``, ``recurrent_init`` (called with shape ``(3, hidden_size)``) and
    ``bias_init`` (shape ``(3, hidden_size)``), ``jax.nn.initializers`` style.

    Args:
      hidden_size: features of ``h``.
      use_bias: whether ``b`` exists.
      activation: the candidate's ``tanh`` (a name or any callable).
      gate_activation: ``sigma`` of ``z`` and ``r``.

    Carry: ``h`` of shape ``(*batch, hidden_size)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.ParaGRU(hidden_size=8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> params.a.shape, cell.jacobian_kind
      ((3, 8), 'exact')
      >>> (h, y), blocks = cell.step_with_jacobian(params, cell.init_carry((2,)), jnp.ones((2, 3)))
      >>> y.shape, blocks.shape
      ((2, 8), (2, 8, 1, 1))

    References: F. Danieli et al., "ParaRNN: Unlocking Parallel Training of Nonlinear RNNs for
    Large Language Models", arXiv:2510.21450 (2025); code: github.com/apple/ml-pararnn.
    """

    params_type = ParaGRUParams

    hidden_size: int
    use_bias: bool = True
    activation: Activation = "tanh"
    gate_activation: Activation = "sigmoid"
    kernel_init: Initializer = field(default=glorot_uniform, repr=False)
    recurrent_init: Initializer = field(default=xlstm_normal, repr=False)
    bias_init: Initializer = field(default=minus_linspace_first_row, repr=False)

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> ParaGRUParams:
        w_x, a, b = self._init_common(key, input_size, dtype)
        return ParaGRUParams(w_x=w_x, a=a, b=b)

    def step(self, params: ParaGRUParams, carry: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        self.check_params(params)
        self.check_input(params, x)
        act = resolve_activation(self.activation)
        gate = resolve_activation(self.gate_activation)
        xz, xr, xh = self._gate_inputs(params, x)
        a_z, a_r, a_h = params.a
        z = gate(a_z * carry + xz)
        r = gate(a_r * carry + xr)
        n = act(a_h * (r * carry) + xh)
        h = z * n + (1.0 - z) * carry
        return h, h


@frozen
class ParaLSTM(_ParaCell):
    r"""CIFG LSTM with diagonal recurrence and diagonal peepholes (ParaRNN's
    ``LSTMCIFGDiagMH``; Danieli et al. 2025).

    The input gate is coupled to the forget gate (``1 - f``, Greff et al. 2017) and every
    recurrent weight is one number per unit, so the Jacobian of ``(h, c)`` is ``2 x 2``-block
    diagonal by construction and ``jacobian_kind == "exact"``. Gate order in ``w_x``, ``a``
    and ``b`` is ``f, o, c``; the rows of ``p`` are ``f, o``:

    .. math::

        f_t &= \sigma(a_f \odot h_{t-1} + x_t W_f + p_f \odot c_{t-1} + b_f) \\
        \tilde c_t &= \tanh(a_c \odot h_{t-1} + x_t W_c + b_c) \\
        c_t &= f_t \odot c_{t-1} + (1 - f_t) \odot \tilde c_t \\
        o_t &= \sigma(a_o \odot h_{t-1} + x_t W_o + p_o \odot c_t + b_o) \\
        h_t &= o_t \odot \tanh(c_t), \qquad y_t = h_t

    ``sigma`` is ``gate_activation`` and both ``tanh`` are ``activation``. ParaRNN's
    ``num_heads`` (a block-diagonal ``W``) is not offered: ``w_x`` is dense (one head).

    Initialisation (ParaRNN's defaults): ``w_x`` Glorot-uniform per gate, bound
    ``sqrt(6 / (input_size + hidden_size))``; ``a`` and ``p`` normal with standard deviation
    ``2 / sqrt(5 * hidden_size)`` (:func:`xlstm_normal`, ParaRNN's init of its ``A`` and
    ``C``); ``b`` zeros but ``b_f``, which is ``-linspace(0, 1, hidden_size)``
    (:func:`minus_linspace_first_row`). Each is replaceable through ``kernel_init``,
    ``recurrent_init`` (shape ``(3, hidden_size)``), ``peephole_init`` (``(2, hidden_size)``)
    and ``bias_init`` (``(3, hidden_size)``), ``jax.nn.initializers`` style.

    Args:
      hidden_size: features of ``h`` and ``c``.
      use_bias: whether ``b`` exists.
      activation: the candidate's and the output's ``tanh`` (a name or any callable).
      gate_activation: ``sigma`` of ``f`` and ``o``.

    Carry: ``ParaLSTMState(h, c)``, each of shape ``(*batch, hidden_size)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.ParaLSTM(hidden_size=8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> params.p.shape
      (2, 8)
      >>> (state, y), blocks = cell.step_with_jacobian(params, cell.init_carry((2,)), jnp.ones((2, 3)))
      >>> y.shape, state.c.shape, blocks.shape
      ((2, 8), (2, 8), (2, 8, 2, 2))

    References: F. Danieli et al., "ParaRNN: Unlocking Parallel Training of Nonlinear RNNs for
    Large Language Models", arXiv:2510.21450 (2025); code: github.com/apple/ml-pararnn.
    K. Greff et al., "LSTM: A Search Space Odyssey", IEEE TNNLS (2017).
    """

    params_type = ParaLSTMParams

    hidden_size: int
    use_bias: bool = True
    activation: Activation = "tanh"
    gate_activation: Activation = "sigmoid"
    kernel_init: Initializer = field(default=glorot_uniform, repr=False)
    recurrent_init: Initializer = field(default=xlstm_normal, repr=False)
    peephole_init: Initializer = field(default=xlstm_normal, repr=False)
    bias_init: Initializer = field(default=minus_linspace_first_row, repr=False)

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> ParaLSTMParams:
        key, kp = jax.random.split(key)
        w_x, a, b = self._init_common(key, input_size, dtype)
        return ParaLSTMParams(w_x=w_x, a=a, p=self.peephole_init(kp, (2, self.hidden_size), dtype), b=b)

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> ParaLSTMState:
        zeros = jnp.zeros((*batch_shape, self.hidden_size), dtype)
        return ParaLSTMState(h=zeros, c=zeros)

    def step(self, params: ParaLSTMParams, carry: ParaLSTMState, x: jax.Array) -> tuple[ParaLSTMState, jax.Array]:
        self.check_params(params)
        self.check_input(params, x)
        act = resolve_activation(self.activation)
        gate = resolve_activation(self.gate_activation)
        xf, xo, xc = self._gate_inputs(params, x)
        a_f, a_o, a_c = params.a
        p_f, p_o = params.p
        h_prev, c_prev = carry
        f = gate(a_f * h_prev + xf + p_f * c_prev)
        c = f * c_prev + (1.0 - f) * act(a_c * h_prev + xc)
        o = gate(a_o * h_prev + xo + p_o * c)
        h = o * act(c)
        return ParaLSTMState(h, c), h
