"""RG-LRU (De et al. 2024): Griffin's real-gated linear recurrent unit."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import LinearCell, compute_dtype, frozen
from rnnjax.checks import check_finite_number, check_positive_int, check_positive_number
from rnnjax.ops import matmul

# RecurrentGemma's bound on the derivative of the input normalisation's square root
# (its sqrt_bound_derivative): finite gradients where a gate saturates and a_t rounds to 1.
MAX_SQRT_GRADIENT = 1000.0


class RGLRUParams(NamedTuple):
    a_param: jax.Array  # (width,): Lambda, log a_t = -c * r_t * softplus(Lambda)
    a_gate_w: jax.Array  # (num_heads, width / num_heads, width / num_heads): W_a, one block per head
    a_gate_b: jax.Array  # (num_heads, width / num_heads): b_a
    input_gate_w: jax.Array  # (num_heads, width / num_heads, width / num_heads): W_x, one block per head
    input_gate_b: jax.Array  # (num_heads, width / num_heads): b_x


@jax.custom_jvp
def sqrt_bounded_derivative(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` whose derivative is that at ``max(x, 1 / (4 * MAX_SQRT_GRADIENT ** 2))``:
    at most ``MAX_SQRT_GRADIENT``, as RecurrentGemma's ``sqrt_bound_derivative``."""
    return jnp.sqrt(x)


@sqrt_bounded_derivative.defjvp
def _sqrt_bounded_derivative_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    floor = 1.0 / (4.0 * MAX_SQRT_GRADIENT**2)
    return jnp.sqrt(x), dx * 0.5 / jnp.sqrt(jnp.maximum(x, floor))


def block_diagonal(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """``x W + b`` for a block-diagonal ``W`` given as ``w`` ``(heads, k, k)`` and ``b``
    ``(heads, k)``: head ``h``'s block maps features ``h k ... (h + 1) k - 1`` of ``x``."""
    heads, k, _ = w.shape
    lead = x.shape[:-1]
    y = matmul(x.reshape(*lead, heads, 1, k), w)
    return y.reshape(*lead, heads * k) + b.reshape(heads * k)


@frozen
class RGLRU(LinearCell):
    r"""Real-gated linear recurrent unit (De et al. 2024, "Griffin: Mixing Gated Linear
    Recurrences with Local Attention for Efficient Language Models"), as the ``RGLRU`` layer
    of RecurrentGemma (``recurrentgemma/jax/layers.py``, ``only_real=True``). It maps
    ``width`` features to ``width``: the input size, the state's and the output's:

    .. math::

        r_t &= \sigma(x_t W_a + b_a), \qquad i_t = \sigma(x_t W_x + b_x) \\
        \log a_t &= -c\, r_t \odot \mathrm{softplus}(\Lambda) \\
        h_t &= a_t \odot h_{t-1} + \sqrt{1 - a_t^2} \odot (i_t \odot x_t), \qquad y_t = h_t

    with ``W_a``, ``W_x`` block-diagonal: ``num_heads`` blocks of
    ``(width / num_heads, width / num_heads)`` (RecurrentGemma's ``BlockDiagonalLinear``).
    :meth:`coefficients` gives ``(a_t, sqrt(1 - a_t^2) i_t x_t)``. The square root's
    derivative is bounded by 1000 as in RecurrentGemma (finite where ``a_t`` rounds to 1).

    **The first token of a document.** RecurrentGemma's layer takes the tokens' positions:
    at position 0 it drops the previous state *and* the normalisation,
    :math:`h_t = i_t \odot x_t`. A step here does not know positions; it follows the
    paper's equation at every step. ``resets`` in :func:`rnnjax.scan` drops the state
    (:math:`h_t = \sqrt{1 - a_t^2} \odot i_t \odot x_t`), and :meth:`start_carry` gives the
    carry from which the next step is RecurrentGemma's position-0 step exactly (a whole
    sequence's start; not a reset inside it). Continuing sequences (positions > 0) agree.

    **Griffin's recurrent block** around this cell: ``gelu(x W_y) * RGLRU(conv(x W_x)) W_out``,
    where ``conv`` is a depthwise causal convolution over time (4 taps). The convolution and
    the GeLU branch are not part of the cell (a convolution window in the carry would make
    it nonlinear in the carry's form): apply the projections and a causal
    ``jax.lax.conv_general_dilated`` (``feature_group_count=width``, ``K - 1`` steps of left
    padding) to the whole sequence, :func:`rnnjax.scan` this cell over the result, and
    multiply by the GeLU branch. Decoding one token at a time keeps the last ``K - 1``
    convolution inputs beside this cell's carry.

    Initialisation (RecurrentGemma's): ``exp(-softplus(a_param)) = sigmoid(-a_param)`` lies
    in ``[min_rad, max_rad]`` with its square uniform (uniform on the ring's area); that is
    ``a_t`` at :math:`c\,r_t = 1`, so :math:`a_t = \mathrm{radius}^{c r_t}` (the paper
    states the range for :math:`a^c`; the released code puts it on :math:`a`, as here).
    ``a_gate_w`` and ``input_gate_w`` normal with variance ``w_init_variance_scale / width``
    (Flax's ``variance_scaling`` fan-in of the stacked blocks); biases zero.

    Args:
      width: features of ``x``, ``h`` and ``y``; ``init`` takes ``input_size=width``.
      num_heads: blocks of the gates' block-diagonal weights; divides ``width``.
      c: the constant ``c`` (8 in Griffin); positive.
      min_rad: smallest initial ``sigmoid(-a_param)``, ``0 <= min_rad < max_rad``.
      max_rad: largest, ``max_rad < 1``.
      w_init_variance_scale: scale of the gate weights' initial variance; positive.

    Carry: ``h`` of shape ``(*batch, width)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.RGLRU(width=8, num_heads=2)
      >>> params = cell.init(jax.random.key(0), input_size=8)
      >>> xs = jnp.ones((3, 5, 8))
      >>> ys, h = rj.scan(cell, params, xs)
      >>> ys2, h2 = rj.scan(cell, params, xs, method=rj.Associative())
      >>> ys.shape, bool(jnp.allclose(ys, ys2, atol=1e-6))
      ((3, 5, 8), True)
    """

    params_type = RGLRUParams

    width: int
    num_heads: int = 1
    c: float = 8.0
    min_rad: float = 0.9
    max_rad: float = 0.999
    w_init_variance_scale: float = 1.0

    def __post_init__(self):
        check_positive_int(self.width, "width")
        check_positive_int(self.num_heads, "num_heads")
        if self.width % self.num_heads:
            raise ValueError(
                f"width={self.width} is not a multiple of num_heads={self.num_heads}; "
                f"the gates' {self.num_heads} diagonal blocks split the width evenly"
            )
        check_positive_number(self.c, "c")
        check_positive_number(self.w_init_variance_scale, "w_init_variance_scale")
        for name in ("min_rad", "max_rad"):
            check_finite_number(getattr(self, name), name)
        if not 0 <= self.min_rad < self.max_rad < 1:
            raise ValueError(
                f"min_rad={self.min_rad!r} and max_rad={self.max_rad!r} must satisfy 0 <= min_rad < max_rad < 1"
            )

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> RGLRUParams:
        check_positive_int(input_size, "input_size")
        if input_size != self.width:
            raise ValueError(
                f"input_size={input_size} for {self!r}; expected input_size=width={self.width} "
                f"(the RG-LRU maps width features to width)"
            )
        ka, kr, ki = jax.random.split(key, 3)
        h, k = self.num_heads, input_size // self.num_heads
        wide = jnp.promote_types(dtype, jnp.float32)
        # U(0, 1) above 0: min_rad = 0 and u = 0 would give log(0).
        u = jax.random.uniform(ka, (input_size,), wide, minval=jnp.finfo(wide).tiny)
        neg_log_radius = -0.5 * jnp.log(u * (self.max_rad**2 - self.min_rad**2) + self.min_rad**2)
        a_param = jnp.log(jnp.expm1(neg_log_radius))  # the inverse of softplus
        std = math.sqrt(self.w_init_variance_scale / input_size)
        return RGLRUParams(
            a_param=a_param.astype(dtype),
            a_gate_w=(jax.random.normal(kr, (h, k, k), wide) * std).astype(dtype),
            a_gate_b=jnp.zeros((h, k), dtype),
            input_gate_w=(jax.random.normal(ki, (h, k, k), wide) * std).astype(dtype),
            input_gate_b=jnp.zeros((h, k), dtype),
        )

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> jax.Array:
        return jnp.zeros((*batch_shape, self.width), dtype)

    def output_size(self, input_size: int) -> int:
        return input_size

    def fixed_input_size(self) -> int:
        return self.width

    def input_size(self, params: RGLRUParams) -> int:
        # The config's, not a_param's length: params of another width then fail check_params,
        # which names the field.
        return self.width

    def _terms(self, params: RGLRUParams, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(log a_t, a_t, i_t * x_t)`` in the compute dtype."""
        self.check_params(params)
        self.check_input(params, x)
        dtype = compute_dtype(x, params)
        x = x.astype(dtype)
        r = jax.nn.sigmoid(block_diagonal(x, params.a_gate_w, params.a_gate_b)).astype(dtype)
        i = jax.nn.sigmoid(block_diagonal(x, params.input_gate_w, params.input_gate_b)).astype(dtype)
        log_a = -self.c * r * jax.nn.softplus(params.a_param.astype(dtype))
        return log_a, jnp.exp(log_a), i * x

    def coefficients(self, params: RGLRUParams, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(a_t, sqrt(1 - a_t^2) * i_t * x_t)``, each ``(*batch, width)``."""
        log_a, a, gated = self._terms(params, x)
        # -expm1(2 log a) is 1 - a^2 without the cancellation of 1 - exp(2 log a) near a = 1.
        return a, sqrt_bounded_derivative(-jnp.expm1(2 * log_a)) * gated

    def start_carry(self, params: RGLRUParams, x: jax.Array) -> jax.Array:
        r"""The carry ``h`` from which a step on ``x`` (the first token, ``(*batch, width)``)
        gives RecurrentGemma's position-0 output :math:`i_0 \odot x_0`:
        :math:`a_0 i_0 x_0 / (1 + \sqrt{1 - a_0^2})`, since then
        :math:`a_0 h + \sqrt{1 - a_0^2}\, i_0 x_0 = i_0 x_0`. Pass it as ``carry`` to
        :func:`rnnjax.scan` of a sequence that starts a document."""
        log_a, a, gated = self._terms(params, x)
        return a * gated / (1 + jnp.sqrt(-jnp.expm1(2 * log_a)))
