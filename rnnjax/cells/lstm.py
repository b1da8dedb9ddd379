"""Long short-term memory, with optional peepholes and output projection."""

from __future__ import annotations

from dataclasses import field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import DenseCell, check_positive_int, frozen
from rnnjax.ops import (
    Activation,
    Initializer,
    glorot_uniform,
    matmul,
    orthogonal,
    resolve_activation,
    stacked_init,
    zeros,
)


class LSTMParams(NamedTuple):
    w_x: jax.Array  # (input_size, 4 * hidden), gates i, f, g, o
    w_h: jax.Array  # (out, 4 * hidden); out = proj_size or hidden
    b: jax.Array | None  # (4 * hidden,), None when use_bias=False
    w_peep: jax.Array | None  # (3, hidden): peepholes of i, f, o; None unless peephole=True
    w_proj: jax.Array | None  # (hidden, proj_size); None unless proj_size is set


class LSTMState(NamedTuple):
    h: jax.Array  # (*batch, out): the output, projected when proj_size is set
    c: jax.Array  # (*batch, hidden): the cell state


@frozen
class LSTM(DenseCell):
    r"""Long short-term memory (Hochreiter & Schmidhuber 1997), as PyTorch's ``nn.LSTM``.

    Gate order in ``w_x``, ``w_h`` and ``b`` is ``i, f, g, o`` (PyTorch and Keras alike):

    .. math::

        i_t &= \sigma(x_t W_{xi} + h_{t-1} W_{hi} + p_i \odot c_{t-1} + b_i) \\
        f_t &= \sigma(x_t W_{xf} + h_{t-1} W_{hf} + p_f \odot c_{t-1} + b_f) \\
        g_t &= \tanh(x_t W_{xg} + h_{t-1} W_{hg} + b_g) \\
        c_t &= f_t \odot c_{t-1} + i_t \odot g_t \\
        o_t &= \sigma(x_t W_{xo} + h_{t-1} W_{ho} + p_o \odot c_t + b_o) \\
        h_t &= (o_t \odot \tanh(c_t)) \, W_{proj}, \qquad y_t = h_t

    The peephole terms ``p`` exist only with ``peephole=True`` (Gers & Schmidhuber 2000)
    and the projection ``W_proj`` only with ``proj_size`` (Sak et al. 2014; PyTorch's
    ``proj_size``). ``sigma`` is ``gate_activation`` and ``tanh`` is ``activation``.

    Initialisation: ``w_x`` Glorot-uniform and ``w_h`` orthogonal, both per gate; ``b``
    zeros except the forget gate's, which is ``forget_bias`` (1.0, Jozefowicz et al. 2015;
    Keras' ``unit_forget_bias``); peepholes zeros; ``w_proj`` Glorot-uniform.

    Carry: ``LSTMState(h, c)``, ``h`` of shape ``(*batch, proj_size or hidden_size)`` and
    ``c`` of shape ``(*batch, hidden_size)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.LSTM(hidden_size=8, proj_size=4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> state, y = cell.step(params, cell.init_carry((2,)), jnp.ones((2, 3)))
      >>> y.shape, state.c.shape
      ((2, 4), (2, 8))
    """

    params_type = LSTMParams

    hidden_size: int
    proj_size: int | None = None
    peephole: bool = False
    use_bias: bool = True
    forget_bias: float = 1.0
    activation: Activation = "tanh"
    gate_activation: Activation = "sigmoid"
    kernel_init: Initializer = field(default=glorot_uniform, repr=False)
    recurrent_kernel_init: Initializer = field(default=orthogonal, repr=False)

    def __post_init__(self):
        check_positive_int(self.hidden_size, "hidden_size")
        if self.proj_size is not None:
            check_positive_int(self.proj_size, "proj_size")
            if self.proj_size >= self.hidden_size:
                # As PyTorch: a projection is a reduction (and a square one adds nothing).
                raise ValueError(
                    f"proj_size={self.proj_size} must be smaller than hidden_size={self.hidden_size} "
                    f"(or None for no projection)"
                )
        resolve_activation(self.activation)
        resolve_activation(self.gate_activation, "gate_activation")

    @property
    def out_size(self) -> int:
        return self.proj_size or self.hidden_size

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> LSTMParams:
        check_positive_int(input_size, "input_size")
        kx, kh, kp = jax.random.split(key, 3)
        h = self.hidden_size
        b = None
        if self.use_bias:
            b = jnp.zeros((4 * h,), dtype).at[h : 2 * h].set(self.forget_bias)
        return LSTMParams(
            w_x=stacked_init(self.kernel_init, kx, input_size, h, 4, dtype),
            w_h=stacked_init(self.recurrent_kernel_init, kh, self.out_size, h, 4, dtype),
            b=b,
            w_peep=zeros(kp, (3, h), dtype) if self.peephole else None,
            w_proj=glorot_uniform(kp, (h, self.proj_size), dtype) if self.proj_size else None,
        )

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> LSTMState:
        return LSTMState(
            h=jnp.zeros((*batch_shape, self.out_size), dtype),
            c=jnp.zeros((*batch_shape, self.hidden_size), dtype),
        )

    def output_size(self, input_size: int) -> int:
        return self.out_size

    def input_size(self, params: LSTMParams) -> int:
        return params.w_x.shape[0]

    def summed_columns(self, width: int) -> int:  # update reads zx + zh only
        return width

    def recurrent_input(self, carry: LSTMState) -> jax.Array:
        return carry.h

    def update(self, params: LSTMParams, carry: LSTMState, zx: jax.Array, zh: jax.Array) -> tuple[LSTMState, jax.Array]:
        act = resolve_activation(self.activation)
        gate = resolve_activation(self.gate_activation)
        c_prev = carry.c
        z = zx + zh
        if params.b is not None:
            z = z + params.b
        zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
        if params.w_peep is not None:
            zi = zi + params.w_peep[0] * c_prev
            zf = zf + params.w_peep[1] * c_prev
        c = gate(zf) * c_prev + gate(zi) * act(zg)
        if params.w_peep is not None:
            zo = zo + params.w_peep[2] * c
        h = gate(zo) * act(c)
        if params.w_proj is not None:
            h = matmul(h, params.w_proj)
        return LSTMState(h, c), h
