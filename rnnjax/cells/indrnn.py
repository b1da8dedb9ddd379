"""Independently recurrent neural network: a diagonal recurrent weight."""

from __future__ import annotations

from dataclasses import field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import ClippedLinearCell, HiddenStateCell, StructuredJacobian, frozen
from rnnjax.checks import check_positive_int, check_positive_number
from rnnjax.ops import Activation, Initializer, clip_range, glorot_uniform, matmul, resolve_activation, zeros


class IndRNNParams(NamedTuple):
    w_x: jax.Array  # (input_size, hidden)
    u: jax.Array  # (hidden,): one recurrent weight per unit
    b: jax.Array | None  # (hidden,), None when use_bias=False


@frozen
class IndRNN(HiddenStateCell, StructuredJacobian, ClippedLinearCell):
    r"""Independently recurrent neural network (Li et al. 2018).

    Each unit sees only its own past, through a scalar weight ``u``:

    .. math::

        h_t = f(x_t W + u' \odot h_{t-1} + b), \qquad y_t = h_t

    with ``u' = clip(u, -m, m)`` when ``recurrent_max_abs = m`` is set and ``u' = u``
    otherwise. Li et al. bound the
    recurrent weights so that gradients neither explode nor vanish over ``T`` steps; with
    ReLU their code uses ``|u| <= 2 ** (1 / T)``, i.e. ``recurrent_max_abs=2 ** (1 / T)``.
    The clip acts in the step, so ``u`` itself may leave the range during training (its
    gradient is zero outside it); clip the parameter after each update to keep it inside.

    Each unit's new state depends on the previous step only through its own state, so the
    state Jacobian is diagonal, ``u' * f'(pre)``: ``jacobian_kind == "exact"`` and
    ``step_with_jacobian`` gives it as blocks of shape ``(*batch, hidden_size, 1, 1)``.

    With a clip for ``f`` (``"relu"``, the default, ``"relu6"``, ``"hard_tanh"``, ``"identity"``)
    the step is ``clip(u' * h + (x W + b), lo, hi)``: a :class:`rnnjax.cell.ClippedLinearCell`,
    which ``rj.Associative()`` and ``rj.Chunked()`` evaluate exactly in parallel
    (``clip_range`` is ``None`` for other activations, e.g. ``"tanh"``: use ``rj.Newton()``).

    Initialisation: ``w_x`` Glorot-uniform, ``u`` uniform in ``[0, 1)``, ``b`` zeros
    (each replaceable through the ``*_init`` fields, ``jax.nn.initializers`` style).

    Args:
      hidden_size: features of ``h``.
      activation: ``f`` (default ``"relu"``), a name or any callable.
      use_bias: whether ``b`` exists.
      recurrent_max_abs: bound ``m > 0`` on ``|u|`` applied in the step, or ``None``.

    Carry: ``h`` of shape ``(*batch, hidden_size)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.IndRNN(hidden_size=8, recurrent_max_abs=2 ** (1 / 100))
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> params.u.shape
      (8,)
      >>> h, y = cell.step(params, cell.init_carry((2,)), jnp.ones((2, 3)))
      >>> y.shape
      (2, 8)
    """

    params_type = IndRNNParams

    hidden_size: int
    activation: Activation = "relu"
    use_bias: bool = True
    recurrent_max_abs: float | None = None
    kernel_init: Initializer = field(default=glorot_uniform, repr=False)
    recurrent_init: Initializer = field(default=jax.nn.initializers.uniform(1.0), repr=False)
    bias_init: Initializer = field(default=zeros, repr=False)

    def __post_init__(self):
        check_positive_int(self.hidden_size, "hidden_size")
        resolve_activation(self.activation)
        check_positive_number(self.recurrent_max_abs, "recurrent_max_abs", optional=True)

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> IndRNNParams:
        check_positive_int(input_size, "input_size")
        kx, ku, kb = jax.random.split(key, 3)
        h = self.hidden_size
        return IndRNNParams(
            w_x=self.kernel_init(kx, (input_size, h), dtype),
            u=self.recurrent_init(ku, (h,), dtype),
            b=self.bias_init(kb, (h,), dtype) if self.use_bias else None,
        )

    def step(self, params: IndRNNParams, carry: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        self.check_params(params)
        self.check_input(params, x)
        u, drive = self.clipped_coefficients(params, x)
        h = resolve_activation(self.activation)(u * carry + drive)
        return h, h

    @property
    def clip_range(self) -> tuple[float, float] | None:
        return clip_range(self.activation)

    def clipped_coefficients(self, params: IndRNNParams, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(u', x W + b)``: shapes ``(hidden,)`` and ``(*batch, hidden)``."""
        u = params.u
        if self.recurrent_max_abs is not None:
            u = jnp.clip(u, -self.recurrent_max_abs, self.recurrent_max_abs)
        drive = matmul(x, params.w_x)
        if params.b is not None:
            drive = drive + params.b
        return u, drive
