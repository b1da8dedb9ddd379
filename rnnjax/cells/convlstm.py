"""Convolutional LSTM over 2-D feature maps."""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import Cell, frozen
from rnnjax.checks import check_float_input, check_positive_int, is_int
from rnnjax.ops import Activation, Initializer, conv, glorot_uniform, orthogonal, resolve_activation

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


class ConvLSTMParams(NamedTuple):
    w_x: jax.Array  # (kh, kw, input_channels, 4 * filters), gates i, f, g, o
    w_h: jax.Array  # (kh, kw, filters, 4 * filters), gates i, f, g, o
    b: jax.Array | None  # (4 * filters,), gates i, f, g, o; None when use_bias=False


class ConvLSTMState(NamedTuple):
    h: jax.Array  # (*batch, H, W, filters): the output
    c: jax.Array  # (*batch, H, W, filters): the cell state


def _stacked_kernel(init: Initializer, key: jax.Array, shape: tuple[int, ...], gates: int, dtype: Any) -> jax.Array:
    """``gates`` kernels of ``shape`` (HWIO) drawn independently, concatenated on O."""
    keys = jax.random.split(key, gates)
    return jnp.concatenate([init(k, shape, dtype) for k in keys], axis=-1)


@frozen
class ConvLSTM(Cell):
    r"""Convolutional LSTM (Shi et al. 2015): an LSTM whose matrix products are 2-D
    convolutions, so that states are feature maps.

    A step's input is ``x`` of shape ``(*batch, H, W, C)`` (channels last); ``*`` below is
    a convolution with stride 1 and ``SAME`` padding, so ``H`` and ``W`` are kept. Gate
    order in ``w_x``, ``w_h`` and ``b`` is ``i, f, g, o`` (as in :class:`rnnjax.LSTM`):

    .. math::

        i_t &= \sigma(W_{xi} * x_t + W_{hi} * h_{t-1} + b_i) \\
        f_t &= \sigma(W_{xf} * x_t + W_{hf} * h_{t-1} + b_f) \\
        g_t &= \tanh(W_{xg} * x_t + W_{hg} * h_{t-1} + b_g) \\
        o_t &= \sigma(W_{xo} * x_t + W_{ho} * h_{t-1} + b_o) \\
        c_t &= f_t \odot c_{t-1} + i_t \odot g_t \\
        h_t &= o_t \odot \tanh(c_t), \qquad y_t = h_t

    ``sigma`` is ``gate_activation`` and ``tanh`` is ``activation``. The peephole terms
    of Shi et al. (``W_c \odot c``) are left out, as in Keras' ``ConvLSTM2D``.

    Initialisation: ``w_x`` Glorot-uniform and ``w_h`` orthogonal, both per gate; ``b``
    zeros except the forget gate's, which is ``forget_bias`` (1.0).

    Args:
      hidden_size: ``F``, the number of filters (channels of ``h`` and ``c``).
      kernel_size: ``(kh, kw)``, or one int for a square kernel; stored as a pair.
      use_bias: whether ``b`` exists.
      forget_bias: initial bias of the forget gate.
      activation: the candidate's and the cell output's nonlinearity.
      gate_activation: the gates' nonlinearity.

    Carry: ``ConvLSTMState(h, c)``, each of shape ``(*batch, H, W, hidden_size)``. Like
    every carry its leading shape is the step input's without its last axis, so build it
    with ``cell.init_carry((*batch, H, W))``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.ConvLSTM(hidden_size=4, kernel_size=3)
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> params.w_x.shape
      (3, 3, 2, 16)
      >>> state, y = cell.step(params, cell.init_carry((5, 8, 8)), jnp.ones((5, 8, 8, 2)))
      >>> y.shape
      (5, 8, 8, 4)
    """

    params_type = ConvLSTMParams
    input_ndim = 3

    hidden_size: int
    kernel_size: int | tuple[int, int] = (3, 3)
    use_bias: bool = True
    forget_bias: float = 1.0
    activation: Activation = "tanh"
    gate_activation: Activation = "sigmoid"
    kernel_init: Initializer = field(default=glorot_uniform, repr=False)
    recurrent_kernel_init: Initializer = field(default=orthogonal, repr=False)

    def __post_init__(self):
        check_positive_int(self.hidden_size, "hidden_size")
        k = self.kernel_size
        if is_int(k):
            k = (k, k)
        if not isinstance(k, (tuple, list)) or len(k) != 2:
            raise ValueError(f"kernel_size must be a positive int or a pair of them, got {self.kernel_size!r}")
        for v in k:
            check_positive_int(v, "kernel_size")
        # Normalised so that ConvLSTM(F, kernel_size=3) == ConvLSTM(F, kernel_size=(3, 3)).
        object.__setattr__(self, "kernel_size", (int(k[0]), int(k[1])))
        resolve_activation(self.activation)
        resolve_activation(self.gate_activation, "gate_activation")

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> ConvLSTMParams:
        check_positive_int(input_size, "input_size")
        kx, kh = jax.random.split(key)
        f = self.hidden_size
        b = None
        if self.use_bias:
            b = jnp.zeros((4 * f,), dtype).at[f : 2 * f].set(self.forget_bias)
        return ConvLSTMParams(
            # kernel_size is a pair after __post_init__
            w_x=_stacked_kernel(self.kernel_init, kx, (*self.kernel_size, input_size, f), 4, dtype),  # type: ignore[misc]
            w_h=_stacked_kernel(self.recurrent_kernel_init, kh, (*self.kernel_size, f, f), 4, dtype),  # type: ignore[misc]
            b=b,
        )

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> ConvLSTMState:
        """Zeros of shape ``(*batch_shape, hidden_size)``; ``batch_shape`` ends in ``(H, W)``."""
        shape = (*batch_shape, self.hidden_size)
        return ConvLSTMState(h=jnp.zeros(shape, dtype), c=jnp.zeros(shape, dtype))

    def output_size(self, input_size: int) -> int:
        return self.hidden_size

    def input_size(self, params: ConvLSTMParams) -> int:
        return params.w_x.shape[2]

    def step(self, params: ConvLSTMParams, carry: ConvLSTMState, x: jax.Array) -> tuple[ConvLSTMState, jax.Array]:
        check_float_input(x)
        if x.ndim < 3:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; ConvLSTM expects one step of feature maps, "
                f"(*batch, H, W, C) with at least 3 axes (add the missing ones, e.g. x[None])"
            )
        self.check_params(params)
        self.check_input(params, x)
        h_prev, c_prev = carry
        expected = (*x.shape[:-1], self.hidden_size)
        for name, leaf in (("h", h_prev), ("c", c_prev)):
            if tuple(jnp.shape(leaf)) != expected:
                raise ValueError(
                    f"carry.{name} has shape {tuple(jnp.shape(leaf))}; expected {expected} for x of "
                    f"shape {tuple(x.shape)} (build it with cell.init_carry({tuple(x.shape[:-1])}))"
                )
        act = resolve_activation(self.activation)
        gate = resolve_activation(self.gate_activation)
        dtype = jnp.result_type(x, h_prev, c_prev, *(p for p in params if p is not None))
        lead, spatial = x.shape[:-3], x.shape[-3:-1]
        # One convolution over [x, h] with the kernels stacked on the input-channel axis
        # equals the sum of the two; the conv wants exactly one batch axis.
        xh = jnp.concatenate([x.astype(dtype), h_prev.astype(dtype)], axis=-1)
        xh = xh.reshape((math.prod(lead), *spatial, xh.shape[-1]))
        # In ``dtype`` (promoted), or in the kernel's 16-bit dtype under rj.Mixed (autocast).
        z = conv(xh, jnp.concatenate([params.w_x, params.w_h], axis=2), _DIMENSION_NUMBERS)
        z = z.reshape((*lead, *spatial, z.shape[-1]))
        if params.b is not None:
            z = z + params.b
        zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
        c = gate(zf) * c_prev.astype(dtype) + gate(zi) * act(zg)
        h = gate(zo) * act(c)
        return ConvLSTMState(h, c), h
