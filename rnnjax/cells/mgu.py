"""Minimal gated unit: a GRU with a single gate."""

from __future__ import annotations

from dataclasses import field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import HiddenStateCell, check_positive_int, frozen
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


class MGUParams(NamedTuple):
    w_x: jax.Array  # (input_size, 2 * hidden), gates f, n
    w_h: jax.Array  # (hidden, 2 * hidden), gates f, n
    b: jax.Array | None  # (2 * hidden,), gates f, n; None when use_bias=False


@frozen
class MGU(HiddenStateCell):
    r"""Minimal gated unit (Zhou et al. 2016): one forget gate does the work of the GRU's
    reset and update gates.

    Gate order in ``w_x``, ``w_h`` and ``b`` is ``f, n``:

    .. math::

        f_t &= \sigma(x_t W_{xf} + h_{t-1} W_{hf} + b_f) \\
        n_t &= \tanh(x_t W_{xn} + (f_t \odot h_{t-1}) W_{hn} + b_n) \\
        h_t &= (1 - f_t) \odot h_{t-1} + f_t \odot n_t, \qquad y_t = h_t

    ``sigma`` is ``gate_activation`` and ``tanh`` is ``activation``.

    Initialisation: ``w_x`` Glorot-uniform and ``w_h`` orthogonal, both per gate; ``b``
    zeros (each replaceable through the ``*_init`` fields, ``jax.nn.initializers`` style).

    Args:
      hidden_size: features of ``h``.
      use_bias: whether ``b`` exists.
      activation: the candidate's nonlinearity, a name or any callable.
      gate_activation: the gate's nonlinearity, a name or any callable.

    Carry: ``h`` of shape ``(*batch, hidden_size)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.MGU(hidden_size=8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> params.w_h.shape
      (8, 16)
      >>> h, y = cell.step(params, cell.init_carry((2,)), jnp.ones((2, 3)))
      >>> y.shape
      (2, 8)
    """

    params_type = MGUParams

    hidden_size: int
    use_bias: bool = True
    activation: Activation = "tanh"
    gate_activation: Activation = "sigmoid"
    kernel_init: Initializer = field(default=glorot_uniform, repr=False)
    recurrent_kernel_init: Initializer = field(default=orthogonal, repr=False)
    bias_init: Initializer = field(default=zeros, repr=False)

    def __post_init__(self):
        check_positive_int(self.hidden_size, "hidden_size")
        resolve_activation(self.activation)
        resolve_activation(self.gate_activation, "gate_activation")

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> MGUParams:
        check_positive_int(input_size, "input_size")
        kx, kh, kb = jax.random.split(key, 3)
        h = self.hidden_size
        return MGUParams(
            w_x=stacked_init(self.kernel_init, kx, input_size, h, 2, dtype),
            w_h=stacked_init(self.recurrent_kernel_init, kh, h, h, 2, dtype),
            b=self.bias_init(kb, (2 * h,), dtype) if self.use_bias else None,
        )

    def step(self, params: MGUParams, carry: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        self.check_params(params)
        self.check_input(params, x)
        act = resolve_activation(self.activation)
        gate = resolve_activation(self.gate_activation)
        h_prev = carry
        hid = self.hidden_size
        gx = matmul(x, params.w_x)
        if params.b is not None:
            gx = gx + params.b
        xf, xn = jnp.split(gx, 2, axis=-1)
        f = gate(xf + matmul(h_prev, params.w_h[:, :hid]))
        n = act(xn + matmul(f * h_prev, params.w_h[:, hid:]))
        h = (1.0 - f) * h_prev + f * n
        return h, h
