"""Mamba2 (Dao & Gu 2024): the Mamba2 layer's mixer, its SSD recurrence as gated linear attention."""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import frozen
from rnnjax.cells.matrix_state import GatedInputs, MatrixStateCell
from rnnjax.checks import check_positive_int, check_positive_number
from rnnjax.ops import Initializer, causal_conv_step, conv_uniform, glorot_uniform, matmul, rms_norm

DT_FLOOR = 1e-4  # the reference's dt_init_floor: initial steps below it are raised to it


class Mamba2Params(NamedTuple):
    w_in: jax.Array  # (input_size, 2 * heads * head_size + 2 * groups * state_size + heads), blocks z, x, B, C, dt
    conv: jax.Array  # (conv_width, heads * head_size + 2 * groups * state_size), channels x, B, C
    conv_bias: jax.Array  # (heads * head_size + 2 * groups * state_size,)
    dt_bias: jax.Array  # (heads,)
    a_log: jax.Array  # (heads,): A = -exp(a_log)
    d: jax.Array  # (heads,): the skip connection
    norm: jax.Array  # (heads * head_size,): the gated RMSNorm's weight
    w_out: jax.Array  # (heads * head_size, input_size)


@frozen
class Mamba2(MatrixStateCell):
    r"""The mixer of a Mamba2 layer (Dao & Gu 2024, "Transformers are SSMs: Generalized Models
    and Efficient Algorithms Through Structured State Space Duality"), as ``Mamba2`` of
    ``state-spaces/mamba`` (``mamba_ssm/modules/mamba2.py``; ``d_ssm = d_inner``,
    ``rmsnorm=True``, ``norm_before_gate=False``, scalar ``D`` per head, no ``dt_limit``).
    With ``P = head_size``, ``N = state_size``, ``G = groups``, head ``h`` in group
    ``g = h // (heads / G)``:

    .. math::

        (z_t, \xi_t, \delta_t) &= x_t W_{in}, \qquad
        (\bar x_t, B_t, C_t) = \mathrm{SiLU}(\mathrm{conv}(\xi)_t) \\
        \Delta_{t,h} &= \mathrm{softplus}(\delta_{t,h} + b^{\Delta}_h), \qquad
        A_h = -e^{A^{\log}_h} \\
        S_{t,h} &= e^{\Delta_{t,h} A_h} S_{t-1,h} + B_{t,g} (\Delta_{t,h} \bar x_{t,h})^\top,
        \qquad o_{t,h} = S_{t,h}^\top C_{t,g} \\
        y_t &= \big[\mathrm{RMSNorm}_G\big((o_t + D \odot \bar x_t) \odot \mathrm{SiLU}(z_t)\big)\big] W_{out}

    where ``conv`` is a depthwise causal convolution of ``conv_width`` taps with bias, and
    :math:`\mathrm{RMSNorm}_G` normalises each group's ``heads * P / G`` features (epsilon
    ``norm_eps``) and multiplies by ``norm``. This is gated linear attention with
    :math:`q = C`, :math:`k = B`, :math:`v = \Delta \bar x`, one log decay :math:`\Delta A`
    per head and query scale 1. The output has ``input_size`` features.

    State layout: rnnjax's state is ``(d_k, d_v) = (state_size, head_size)`` per head, the
    transpose of mamba's ``ssm_state`` ``(headdim, d_state)``.

    Parameters (:class:`Mamba2Params`): ``w_in`` blocks ``z, x, B, C, dt`` (mamba's ``in_proj``
    order), ``conv`` ``(conv_width, channels)`` with ``conv[-1]`` on the newest step, channels
    ``x, B, C`` (mamba's ``conv1d.weight[:, 0].T``).

    Initialisation, the reference's but for the projections: ``dt_bias`` the inverse softplus of
    :math:`\Delta_0`, :math:`\log \Delta_0 \sim U(\log \mathrm{dt\_min}, \log \mathrm{dt\_max})`
    (raised to at least ``1e-4``); ``a_log`` :math:`= \log U(a_{min}, a_{max})`; ``d`` ones;
    ``norm`` ones; ``conv`` and ``conv_bias`` ``U(-1/sqrt(K), 1/sqrt(K))`` (PyTorch's
    ``Conv1d`` default); ``w_in``, ``w_out`` by ``kernel_init`` (Glorot uniform per block;
    mamba's ``nn.Linear`` default is ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``).

    Args:
      heads: number of heads (mamba's ``nheads``).
      head_size: ``P`` (``headdim``), the value size :math:`d_v` of each head's state.
      state_size: ``N`` (``d_state``), the key size :math:`d_k`.
      groups: ``G`` (``ngroups``), the heads sharing one ``B`` and ``C``; divides ``heads``.
      conv_width: the convolution's taps (``d_conv``), at least 1.
      dt_min, dt_max: the range of the initial :math:`\Delta`.
      a_min, a_max: the range of the initial :math:`-A` (``A_init_range``).
      norm_eps: the gated RMSNorm's epsilon.
      kernel_init: initializer of ``w_in`` and ``w_out``.

    Carry: a :class:`rnnjax.cells.matrix_state.MatrixCarry` ``(conv (*batch, conv_width - 1,
    heads * head_size + 2 * groups * state_size), S (*batch, heads, state_size, head_size))``.
    ``rj.scan`` runs it by ``rj.Chunked()`` by default; ``step`` decodes a token from the carry
    a scan returned.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.Mamba2(heads=4, head_size=8, state_size=16)
      >>> params = cell.init(jax.random.key(0), input_size=16)
      >>> ys, carry = rj.scan(cell, params, jnp.ones((2, 10, 16)))
      >>> ys.shape, carry.conv.shape, carry.state.shape
      ((2, 10, 16), (2, 3, 64), (2, 4, 16, 8))
      >>> carry, y = jax.jit(cell.step)(params, carry, jnp.ones((2, 16)))
      >>> y.shape
      (2, 16)
    """

    recurrence = "gla"
    params_type = Mamba2Params

    heads: int
    head_size: int
    state_size: int
    groups: int = 1
    conv_width: int = 4
    dt_min: float = 1e-3
    dt_max: float = 0.1
    a_min: float = 1.0
    a_max: float = 16.0
    norm_eps: float = 1e-5
    kernel_init: Initializer = field(default=glorot_uniform, repr=False)

    def __post_init__(self):
        for name in ("heads", "head_size", "state_size", "groups", "conv_width"):
            check_positive_int(getattr(self, name), name)
        if self.heads % self.groups:
            raise ValueError(f"groups={self.groups} must divide heads={self.heads}")
        for name in ("dt_min", "dt_max", "a_min", "a_max", "norm_eps"):
            check_positive_number(getattr(self, name), name)
        if self.dt_min > self.dt_max or self.a_min > self.a_max:
            raise ValueError(
                f"expected dt_min <= dt_max and a_min <= a_max, got dt_min={self.dt_min!r}, dt_max={self.dt_max!r}, "
                f"a_min={self.a_min!r}, a_max={self.a_max!r}"
            )

    def state_sizes(self, params: Any = None) -> tuple[int, int, int]:
        return self.heads, self.state_size, self.head_size

    def query_scale(self) -> float:
        return 1.0

    def conv_channels(self, params: Any = None) -> int:
        return self.heads * self.head_size + 2 * self.groups * self.state_size

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> Mamba2Params:
        check_positive_int(input_size, "input_size")
        kz, kx, kb, kc, kdt, kw, kwb, kt, ka, ko = jax.random.split(key, 10)
        hp, gn, h = self.heads * self.head_size, self.groups * self.state_size, self.heads
        blocks = ((kz, hp), (kx, hp), (kb, gn), (kc, gn), (kdt, h))
        w_in = jnp.concatenate([self.kernel_init(k, (input_size, n), dtype) for k, n in blocks], axis=-1)
        work = jnp.promote_types(dtype, jnp.float32)
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = jnp.maximum(jnp.exp(jax.random.uniform(kt, (h,), work, lo, hi)), DT_FLOOR)
        dt_bias = dt + jnp.log(-jnp.expm1(-dt))  # softplus(dt_bias) = dt
        a = jax.random.uniform(ka, (h,), work, self.a_min, self.a_max)
        channels, width = self.conv_channels(), self.conv_width
        return Mamba2Params(
            w_in=w_in,
            conv=conv_uniform(kw, (width, channels), width, dtype),
            conv_bias=conv_uniform(kwb, (channels,), width, dtype),
            dt_bias=dt_bias.astype(dtype),
            a_log=jnp.log(a).astype(dtype),
            d=jnp.ones((h,), dtype),
            norm=jnp.ones((hp,), dtype),
            w_out=self.kernel_init(ko, (hp, input_size), dtype),
        )

    def input_size(self, params: Mamba2Params) -> int:
        return params.w_in.shape[0]

    def output_size(self, input_size: int) -> int:
        return input_size

    def split(self, params: Mamba2Params, x: jax.Array) -> tuple[jax.Array, Any]:
        """``(xBC, (z, dt))``: the convolution's input and the gate and step pre-activations."""
        self.check_params(params)
        zxbcdt = matmul(x, params.w_in)
        hp, channels = self.heads * self.head_size, self.conv_channels()
        return zxbcdt[..., hp : hp + channels], (zxbcdt[..., :hp], zxbcdt[..., hp + channels :])

    def convolve(self, params: Mamba2Params, window: jax.Array) -> jax.Array:
        return jax.nn.silu(causal_conv_step(window, params.conv, params.conv_bias))

    def _x(self, conv_out: jax.Array) -> jax.Array:
        """``x`` of the convolution's output, ``(*batch, heads, head_size)``."""
        return conv_out[..., : self.heads * self.head_size].reshape(*conv_out.shape[:-1], self.heads, self.head_size)

    def mix(self, params: Mamba2Params, conv_out: jax.Array, rest: Any) -> GatedInputs:
        lead, hp, gn = conv_out.shape[:-1], self.heads * self.head_size, self.groups * self.state_size
        # Group g's B and C serve heads/G consecutive heads (mamba's "(g h)" order).
        per_group = lambda a: jnp.repeat(a.reshape(*lead, self.groups, self.state_size), self.heads // self.groups, -2)
        b, c = per_group(conv_out[..., hp : hp + gn]), per_group(conv_out[..., hp + gn :])
        dt = jax.nn.softplus(rest[1] + params.dt_bias)
        a = -jnp.exp(params.a_log)
        return GatedInputs(q=c, k=b, v=self._x(conv_out) * dt[..., None], log_decay=dt * a)

    def readout(self, params: Mamba2Params, o: jax.Array, conv_out: jax.Array, rest: Any) -> jax.Array:
        y = o + params.d[:, None] * self._x(conv_out)
        y = y.reshape(*o.shape[:-2], o.shape[-2] * o.shape[-1]) * jax.nn.silu(rest[0])
        grouped = (*y.shape[:-1], self.groups, y.shape[-1] // self.groups)
        y = rms_norm(y.reshape(grouped), params.norm.reshape(self.groups, -1), self.norm_eps)
        return matmul(y.reshape(*o.shape[:-2], o.shape[-2] * o.shape[-1]), params.w_out)
