"""Gated recurrent unit, in its reset-after (PyTorch) and reset-before (Cho et al.) forms."""

from __future__ import annotations

from dataclasses import field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import DenseCell, HiddenStateCell, check_positive_int, frozen
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


class GRUParams(NamedTuple):
    w_x: jax.Array  # (input_size, 3 * hidden), gates r, z, n
    w_h: jax.Array  # (hidden, 3 * hidden), gates r, z, n
    b_x: jax.Array | None  # (3 * hidden,) input bias; None when use_bias=False
    b_h: jax.Array | None  # (3 * hidden,) recurrent bias; only with reset_after and use_bias


@frozen
class GRU(HiddenStateCell, DenseCell):
    r"""Gated recurrent unit (Cho et al. 2014).

    Gate order in ``w_x``, ``w_h``, ``b_x`` and ``b_h`` is ``r, z, n`` (PyTorch's; Keras
    stores ``z, r, h`` and :mod:`rnnjax.interop` reorders). With ``reset_after=True``
    (PyTorch ``nn.GRU``; Keras ``reset_after=True``, cuDNN):

    .. math::

        r_t &= \sigma(x_t W_{xr} + b_{xr} + h_{t-1} W_{hr} + b_{hr}) \\
        z_t &= \sigma(x_t W_{xz} + b_{xz} + h_{t-1} W_{hz} + b_{hz}) \\
        n_t &= \tanh(x_t W_{xn} + b_{xn} + r_t \odot (h_{t-1} W_{hn} + b_{hn})) \\
        h_t &= (1 - z_t) \odot n_t + z_t \odot h_{t-1}, \qquad y_t = h_t

    With ``reset_after=False`` (Cho et al. 2014; Keras ``reset_after=False``) the reset
    gate acts before the product, and there is no recurrent bias ``b_h``:

    .. math::

        n_t = \tanh(x_t W_{xn} + b_{xn} + (r_t \odot h_{t-1}) W_{hn})

    ``sigma`` is ``gate_activation`` and ``tanh`` is ``activation``.

    Initialisation: ``w_x`` Glorot-uniform and ``w_h`` orthogonal, both per gate; biases
    zeros.

    Carry: ``h`` of shape ``(*batch, hidden_size)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.GRU(hidden_size=8, reset_after=False)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> params.b_h is None
      True
      >>> h, y = cell.step(params, cell.init_carry(), jnp.ones(3))
      >>> y.shape
      (8,)
    """

    params_type = GRUParams

    hidden_size: int
    reset_after: bool = True
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

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> GRUParams:
        check_positive_int(input_size, "input_size")
        kx, kh, kbx, kbh = jax.random.split(key, 4)
        h = self.hidden_size
        with_b_h = self.use_bias and self.reset_after
        return GRUParams(
            w_x=stacked_init(self.kernel_init, kx, input_size, h, 3, dtype),
            w_h=stacked_init(self.recurrent_kernel_init, kh, h, h, 3, dtype),
            b_x=self.bias_init(kbx, (3 * h,), dtype) if self.use_bias else None,
            b_h=self.bias_init(kbh, (3 * h,), dtype) if with_b_h else None,
        )

    @property
    def fusable(self) -> bool:
        # reset_after=False multiplies (r * h) by w_h's candidate block: a third product.
        return self.reset_after

    def step(self, params: GRUParams, carry: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.reset_after:
            return super().step(params, carry, x)  # DenseCell: update(x @ w_x, h @ w_h)
        self.check_params(params)
        self.check_input(params, x)
        act = resolve_activation(self.activation)
        gate = resolve_activation(self.gate_activation)
        h_prev = carry
        hid = self.hidden_size
        gx = matmul(x, params.w_x)
        if params.b_x is not None:
            gx = gx + params.b_x
        xr, xz, xn = jnp.split(gx, 3, axis=-1)
        hr, hz = jnp.split(matmul(h_prev, params.w_h[:, : 2 * hid]), 2, axis=-1)
        r = gate(xr + hr)
        z = gate(xz + hz)
        n = act(xn + matmul(r * h_prev, params.w_h[:, 2 * hid :]))
        h = (1.0 - z) * n + z * h_prev
        return h, h

    def summed_columns(self, width: int) -> int:  # r and z read zx + zh; the candidate does not
        return 2 * self.hidden_size

    def _preactivations(self, params: GRUParams, zx: jax.Array, zh: jax.Array):
        """``(pre, xn, hn)``: the gates' pre-activation ``(..., 2H)`` (r then z) and the
        candidate's input and recurrent parts ``(..., H)``, biases added."""
        hid = self.hidden_size
        # The gates' pre-activation sums the products first and the biases after, so it is
        # a function of zx + zh alone (summed_columns); the candidate keeps them apart.
        # jnp.split rather than slices: the transposes are concatenates, not per-step zero pads.
        (gx, xn), (gh, hn) = (jnp.split(a, [2 * hid], axis=-1) for a in (zx, zh))
        pre = gx + gh
        if params.b_x is not None:
            b_gx, b_xn = jnp.split(params.b_x, [2 * hid])
            pre, xn = pre + b_gx, xn + b_xn
        if params.b_h is not None:
            b_gh, b_hn = jnp.split(params.b_h, [2 * hid])
            pre, hn = pre + b_gh, hn + b_hn
        return pre, xn, hn

    def update(self, params: GRUParams, carry: jax.Array, zx: jax.Array, zh: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``reset_after=True`` only (see ``fusable``)."""
        act = resolve_activation(self.activation)
        gate = resolve_activation(self.gate_activation)
        pre, xn, hn = self._preactivations(params, zx, zh)
        r, z = jnp.split(gate(pre), 2, axis=-1)
        n = act(xn + r * hn)
        h = (1.0 - z) * n + z * carry
        return h, h

    def step_with_jacobian(self, params: GRUParams, carry: jax.Array, x: jax.Array):
        r"""The step and the unit diagonal of its Jacobian (``reset_after=True``), written out:
        with :math:`d_g = \sigma'(\cdot)\, W_{hg}[u, u]` for the gates,

        .. math::

            \frac{\partial h_{t,u}}{\partial h_{t-1,u}} = d_z (h_{t-1} - n) + (1 - z)\,
            \tanh'(\cdot) \big(d_r (h_{t-1} W_{hn} + b_{hn}) + r\, W_{hn}[u, u]\big) + z,

        the same numbers as the generic linearisation at about half its cost
        (``benchmarks/lab/DECISIONS.md``, quasi-DEER entry)."""
        if not self.reset_after:
            return super().step_with_jacobian(params, carry, x)  # raises: no unit structure
        self.check_params(params)
        self.check_input(params, x)
        hid = self.hidden_size
        pre, xn, hn = self._preactivations(params, matmul(x, params.w_x), matmul(carry, params.w_h))
        # Values and elementwise derivatives of the activations in one pass each.
        gates, d_gates = jax.jvp(resolve_activation(self.gate_activation), (pre,), (jnp.ones_like(pre),))
        (r, z), (d_r, d_z) = jnp.split(gates, 2, axis=-1), jnp.split(d_gates, 2, axis=-1)
        n_pre = xn + r * hn
        n, d_n = jax.jvp(resolve_activation(self.activation), (n_pre,), (jnp.ones_like(n_pre),))
        h = (1.0 - z) * n + z * carry
        own_r, own_z, own_n = jnp.diagonal(params.w_h.reshape(hid, 3, hid), axis1=0, axis2=2)  # w_h[u, g*H + u]
        diagonal = d_z * own_z * (carry - n) + (1.0 - z) * d_n * (d_r * own_r * hn + r * own_n) + z
        return (h, h), diagonal[..., None, None]
