"""Elman network (simple RNN)."""

from __future__ import annotations

from dataclasses import field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import DenseCell, HiddenStateCell, check_positive_int, frozen
from rnnjax.ops import Activation, Initializer, glorot_uniform, orthogonal, resolve_activation, zeros


class ElmanParams(NamedTuple):
    w_x: jax.Array  # (input_size, hidden)
    w_h: jax.Array  # (hidden, hidden)
    b: jax.Array | None  # (hidden,), None when use_bias=False


@frozen
class Elman(HiddenStateCell, DenseCell):
    r"""Elman network, the simple RNN of PyTorch's ``nn.RNN`` and Keras' ``SimpleRNN``.

    .. math::

        h_t = f(x_t W_x + h_{t-1} W_h + b), \qquad y_t = h_t

    Initialisation: ``w_x`` Glorot-uniform, ``w_h`` orthogonal, ``b`` zeros (each
    replaceable through the ``*_init`` fields, ``jax.nn.initializers`` style).

    Args:
      hidden_size: features of ``h``.
      activation: ``f``, a name (``"tanh"``, ``"relu"``, ...) or any callable.
      use_bias: whether ``b`` exists.

    Carry: ``h`` of shape ``(*batch, hidden_size)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.Elman(hidden_size=8, activation="relu")
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> h, y = cell.step(params, cell.init_carry((2,)), jnp.ones((2, 3)))
      >>> y.shape
      (2, 8)
    """

    params_type = ElmanParams

    hidden_size: int
    activation: Activation = "tanh"
    use_bias: bool = True
    kernel_init: Initializer = field(default=glorot_uniform, repr=False)
    recurrent_kernel_init: Initializer = field(default=orthogonal, repr=False)
    bias_init: Initializer = field(default=zeros, repr=False)

    def __post_init__(self):
        check_positive_int(self.hidden_size, "hidden_size")
        resolve_activation(self.activation)

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> ElmanParams:
        check_positive_int(input_size, "input_size")
        kx, kh, kb = jax.random.split(key, 3)
        h = self.hidden_size
        return ElmanParams(
            w_x=self.kernel_init(kx, (input_size, h), dtype),
            w_h=self.recurrent_kernel_init(kh, (h, h), dtype),
            b=self.bias_init(kb, (h,), dtype) if self.use_bias else None,
        )

    def summed_columns(self, width: int) -> int:  # update reads zx + zh only
        return width

    def update(
        self, params: ElmanParams, carry: jax.Array, zx: jax.Array, zh: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        pre = zx + zh
        if params.b is not None:
            pre = pre + params.b
        h = resolve_activation(self.activation)(pre)
        return h, h
