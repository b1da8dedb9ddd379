"""xLSTM's sLSTM: exponential input gates with a log-space stabiliser, a normaliser state and
a head-wise block-diagonal recurrent matrix (Beck et al. 2024)."""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import DenseCell, check_positive_int, frozen
from rnnjax.ops import Initializer, matmul, zeros


def small_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Normal with standard deviation ``sqrt(2 / (5 * shape[0]))`` (fan-in ``shape[0]``): xLSTM's
    ``small_init_init_`` (``xlstm/components/init.py``, Nguyen & Salazar 2019), drawn in at least
    float32 and rounded to ``dtype``."""
    work = jnp.promote_types(dtype, jnp.float32)
    return (math.sqrt(2.0 / (5 * shape[0])) * jax.random.normal(key, shape, work)).astype(dtype)


def powerlaw_forget_bias(head_dim: int, dtype: Any = jnp.float32) -> jax.Array:
    """``(head_dim,)``: ``5 - 12 * linspace(0, 1, head_dim) ** 0.3``, from +5 down to -7: xLSTM's
    ``"powerlaw_blockdependent"`` forget-gate bias of one head (``sLSTMCellBase.reset_parameters``)
    for a single block (its exponent ``0.3 + 1.3 * block_idx / (num_blocks - 1)`` is 0.3 then).
    For ``head_dim == 1`` it is ``[5.0]`` (the reference divides by ``head_dim - 1`` there)."""
    work = jnp.promote_types(dtype, jnp.float32)
    return (5.0 - 12.0 * jnp.linspace(0.0, 1.0, head_dim, dtype=work) ** 0.3).astype(dtype)


class SLSTMParams(NamedTuple):
    w_x: jax.Array  # (input_size, 4 * hidden); columns gate-major i, f, z, o, then head, then unit
    w_h: jax.Array  # (head_dim, 4 * hidden); w_h[k, g * hidden + n * head_dim + j]: head n's unit k -> gate g's unit j
    b: jax.Array  # (4 * hidden,), columns as w_x's


class SLSTMState(NamedTuple):
    h: jax.Array  # (*batch, hidden): the output
    c: jax.Array  # (*batch, hidden): the cell state, scaled by exp(-m)
    n: jax.Array  # (*batch, hidden): the normaliser, scaled by exp(-m)
    m: jax.Array  # (*batch, hidden): the stabiliser (log-scale of c and n)


def head_product(h: jax.Array, w_h: jax.Array, heads: int) -> jax.Array:
    """``(*batch, 4 * hidden)``: ``h @ R`` for the block-diagonal ``R`` whose head blocks ``w_h``
    holds (:class:`SLSTMParams`); for one head, ``h @ w_h``."""
    if heads == 1:
        return matmul(h, w_h)
    dh = w_h.shape[0]
    lead = h.shape[:-1]
    per_head = w_h.reshape(dh, 4, heads, dh).transpose(2, 0, 1, 3).reshape(heads, dh, 4 * dh)
    z = matmul(h.reshape(*lead, heads, 1, dh), per_head)  # (*batch, heads, 1, 4 * dh)
    return jnp.swapaxes(z.reshape(*lead, heads, 4, dh), -3, -2).reshape(*lead, 4 * heads * dh)


@frozen
class SLSTM(DenseCell):
    r"""xLSTM's sLSTM cell (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory"), as
    NX-AI's ``xlstm`` package computes it (``xlstm/blocks/slstm/src/vanilla/slstm.py``,
    ``slstm_forward_pointwise``; checked against ``sLSTMCell(backend="vanilla")`` of xlstm 2.0.6).

    Pre-activations, gate order ``i, f, z, o`` (the reference's; the paper lists ``z, i, f, o``),
    with ``R`` block-diagonal over ``num_heads`` heads (units mix only inside a head):

    .. math::

        (\tilde\imath_t, \tilde f_t, \tilde z_t, \tilde o_t) &= x_t W_x + h_{t-1} R + b \\
        m_t &= \max(\log\sigma(\tilde f_t) + m_{t-1},\ \tilde\imath_t)
              \quad (\tilde\imath_t \text{ where } n_{t-1} = 0) \\
        i'_t &= \exp(\tilde\imath_t - m_t), \qquad
        f'_t = \min(\exp(\log\sigma(\tilde f_t) + m_{t-1} - m_t),\ 1) \\
        c_t &= f'_t c_{t-1} + i'_t \tanh(\tilde z_t), \qquad n_t = f'_t n_{t-1} + i'_t \\
        h_t &= \sigma(\tilde o_t)\, c_t / n_t, \qquad y_t = h_t

    The forget gate is a sigmoid (the reference's default, taken as ``log_sigmoid``); the input
    gate is exponential. The reference sets :math:`m_t = \tilde\imath_t` when ``n`` is zero in
    the whole batch (the zero state: it acts as :math:`m_{t-1} = -\infty`); here that holds per
    unit, so that a batch row's result does not depend on the others (``rj.scan``'s ``resets``
    give such rows). :math:`h_t` does not depend on which ``m`` is used; ``m``, ``c`` and ``n``
    do. The reference also clamps :math:`i'_t` at 1, which :math:`m_t \ge \tilde\imath_t` makes
    a no-op.

    Parameters (:class:`SLSTMParams`): ``w_x`` ``(input_size, 4 * hidden)``, ``w_h``
    ``(head_dim, 4 * hidden)`` holding ``R``'s head blocks (for one head, ``R`` itself), ``b``
    ``(4 * hidden,)``; columns gate-major, then head, then unit (the reference's ``"BSGNH"``
    input layout). The reference's ``recurrent_kernel`` ``(heads, head_dim, 4, head_dim)`` is
    ``w_h.reshape(head_dim, 4, heads, head_dim).transpose(2, 0, 1, 3)``, its ``bias``
    ``(heads, 4, head_dim)`` is ``b.reshape(4, heads, head_dim).transpose(1, 0, 2)``.

    Initialisation, the reference's defaults (``sLSTMCellBase.reset_parameters``): ``w_h``
    zeros (``recurrent_weight_init="zeros"``); ``b`` zeros but the forget gate's, which is
    :func:`powerlaw_forget_bias` in every head (``bias_init="powerlaw_blockdependent"``). The
    reference cell receives ``x_t W_x`` already projected; its ``sLSTMLayer`` projects head-wise
    (and ``i``, ``f`` from a causal convolution of ``x``); ``w_x`` here is dense, drawn by
    :func:`small_init` as that layer's ``small_init_init_`` draws its projections.

    Carry: ``SLSTMState(h, c, n, m)``, each ``(*batch, hidden_size)``; zeros by default.

    Capabilities: a :class:`rnnjax.cell.DenseCell`. With one head ``R`` is a dense ``w_h`` and
    ``rj.Sequential()`` takes the fused sequence-level gradient (``fusable``); with more, the
    step's product is per head, which the fused engine's single ``h @ w_h`` is not, so it runs
    on JAX's autodiff of the loop. Its Jacobian blocks (``step_with_jacobian``, ``L = 4``
    leaves) are exact when every head has one unit (``jacobian_kind == "exact"``: ``rj.Newton``
    is DEER), else the unit-diagonal part (``"unit-diagonal"``, for ``"quasi-deer"``).

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.SLSTM(hidden_size=8, num_heads=2)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> params.w_h.shape, cell.jacobian_kind
      ((4, 32), 'unit-diagonal')
      >>> state, y = cell.step(params, cell.init_carry((2,)), jnp.ones((2, 3)))
      >>> y.shape, state.m.shape
      ((2, 8), (2, 8))
    """

    params_type = SLSTMParams

    hidden_size: int
    num_heads: int = 4
    kernel_init: Initializer = field(default=small_init, repr=False)
    recurrent_kernel_init: Initializer = field(default=zeros, repr=False)

    def __post_init__(self):
        check_positive_int(self.hidden_size, "hidden_size")
        check_positive_int(self.num_heads, "num_heads")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}; "
                f"expected num_heads to divide hidden_size"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> SLSTMParams:
        check_positive_int(input_size, "input_size")
        kx, kh = jax.random.split(key)
        h = self.hidden_size
        forget = jnp.tile(powerlaw_forget_bias(self.head_dim, dtype), self.num_heads)
        return SLSTMParams(
            w_x=self.kernel_init(kx, (input_size, 4 * h), dtype),
            w_h=self.recurrent_kernel_init(kh, (self.head_dim, 4 * h), dtype),
            b=jnp.zeros((4 * h,), dtype).at[h : 2 * h].set(forget),
        )

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> SLSTMState:
        return SLSTMState(*(jnp.zeros((*batch_shape, self.hidden_size), dtype) for _ in range(4)))

    def output_size(self, input_size: int) -> int:
        return self.hidden_size

    def input_size(self, params: SLSTMParams) -> int:
        return params.w_x.shape[0]

    @property
    def fusable(self) -> bool:
        """One head only: then ``R`` is the dense ``w_h`` the fused engine multiplies by."""
        return self.num_heads == 1

    @property
    def jacobian_kind(self) -> str:
        return "exact" if self.head_dim == 1 else "unit-diagonal"

    def summed_columns(self, width: int) -> int:  # update reads zx + zh only
        return width

    def recurrent_input(self, carry: SLSTMState) -> jax.Array:
        return carry.h

    def update(
        self, params: SLSTMParams, carry: SLSTMState, zx: jax.Array, zh: jax.Array
    ) -> tuple[SLSTMState, jax.Array]:
        zi, zf, zz, zo = jnp.split(zx + zh + params.b, 4, axis=-1)
        log_f_m = jax.nn.log_sigmoid(zf) + carry.m
        m = jnp.where(carry.n == 0, zi, jnp.maximum(log_f_m, zi))
        i = jnp.exp(zi - m)
        # The clamp matters only where n == 0 (m = zi may lie below log f + m_{t-1}): there the
        # unclamped exponential can overflow, and inf * 0 would be NaN.
        f = jnp.exp(jnp.minimum(log_f_m - m, 0.0))
        c = f * carry.c + i * jnp.tanh(zz)
        n = f * carry.n + i
        h = jax.nn.sigmoid(zo) * c / n
        return SLSTMState(h, c, n, m), h

    def step(self, params: SLSTMParams, carry: SLSTMState, x: jax.Array) -> tuple[SLSTMState, jax.Array]:
        self.check_params(params)
        self.check_input(params, x)
        zh = head_product(carry.h, params.w_h, self.num_heads)
        return self.update(params, carry, matmul(x, params.w_x), zh)

    def step_with_jacobian(
        self, params: SLSTMParams, carry: SLSTMState, x: jax.Array
    ) -> tuple[tuple[SLSTMState, jax.Array], jax.Array]:
        """The unit blocks of the Jacobian through ``update``: unit ``u`` (unit ``j`` of head
        ``n``) reaches its own columns ``g * hidden + u`` of ``zh`` through ``R``'s diagonal
        entry ``w_h[j, g * hidden + u]``; the paths through the head's other units are left out
        (there are none when ``head_dim == 1``: then the blocks are the Jacobian)."""
        self.check_params(params)
        self.check_input(params, x)
        cols = jnp.arange(4 * self.hidden_size)
        own = params.w_h[cols % self.head_dim, cols]
        zx = matmul(x, params.w_x)

        def step(leaves):
            c = SLSTMState(*leaves)
            fixed = jax.lax.stop_gradient(c.h)
            # Value h @ R (the added term is zero); tangent only through each unit's own columns.
            zh = head_product(fixed, params.w_h, self.num_heads) + jnp.tile(c.h - fixed, 4) * own
            new, y = self.update(params, c, zx, zh)
            return list(new), y

        leaves = list(carry)
        (new, y), tangent = jax.linearize(step, leaves)
        # Column m of each unit's block: the tangent of "ones on leaf m" (the map is unit-local).
        columns = []
        for m in range(4):
            basis = [jnp.full_like(leaf, 1.0 if k == m else 0.0) for k, leaf in enumerate(leaves)]
            columns.append(jnp.stack(tangent(basis)[0], axis=-1))
        return (SLSTMState(*new), y), jnp.stack(columns, axis=-1)
