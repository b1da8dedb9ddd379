"""RWKV-7 "Goose" (Peng et al. 2025): the time-mixing block as a matrix-state cell on the
diagonal-plus-low-rank recurrence."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import frozen
from rnnjax.cells.matrix_state import DPLRInputs, MatrixStateCell
from rnnjax.cells.mlstm import layer_norm
from rnnjax.checks import check_positive_int, check_positive_number
from rnnjax.ops import matmul, orthogonal

DECAY_SCALE = math.exp(-0.5)  # log w = -e^{-0.5} sigmoid(.): the reference's soft clamp of w to (e^{-e^{-0.5}}, 1)
MIXES = ("r", "w", "k", "v", "a", "g")  # the rows of RWKV7Params.mix, in the reference's order


class RWKV7Params(NamedTuple):
    mix: jax.Array  # (6, hidden_size): the token shift's lerp weights, rows r, w, k, v, a, g
    w_in: jax.Array  # (hidden_size, 2 * heads * head_size + heads * value_size), blocks r, k, v
    w_decay_a: jax.Array  # (hidden_size, decay_rank): the decay's low-rank projection, first factor
    w_decay_b: jax.Array  # (decay_rank, heads * head_size)
    b_decay: jax.Array  # (heads * head_size,): w_0
    w_rate_a: jax.Array  # (hidden_size, a_rank): the in-context learning rate a's projection
    w_rate_b: jax.Array  # (a_rank, heads * head_size)
    b_rate: jax.Array  # (heads * head_size,): a_0
    w_gate_a: jax.Array  # (hidden_size, gate_rank): the output gate's projection (no bias)
    w_gate_b: jax.Array  # (gate_rank, heads * value_size)
    k_k: jax.Array  # (heads * head_size,): the removal key's scale
    k_a: jax.Array  # (heads * head_size,): how much a scales the written key
    r_k: jax.Array  # (heads, head_size): the bonus term's weight
    norm: jax.Array  # (heads * value_size,): the per-head GroupNorm's weight
    norm_bias: jax.Array  # (heads * value_size,)
    w_out: jax.Array  # (heads * value_size, hidden_size)


def default_rank(scale: float, hidden_size: int, factor: float = 1.0) -> int:
    """fla's default low-rank width: ``max(32, round(scale * sqrt(hidden_size) * factor / 32) * 32)``."""
    return max(32, int(round(scale * hidden_size**0.5 * factor / 32) * 32))


@frozen
class RWKV7(MatrixStateCell):
    r"""RWKV-7's time-mixing block (Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State
    Evolution"), as ``RWKV_Tmix_x070`` of the official ``BlinkDL/RWKV-LM`` (``RWKV-v7``) and fla's
    ``RWKV7Attention`` (``fla/layers/rwkv7.py``) of the first layer. Per head, with
    :math:`\mathrm{lerp}_\mu(x_t) = x_t + (x_{t-1} - x_t) \odot \mu` (the token shift;
    :math:`x_0 = 0`) and :math:`\hat u = u / \max(\lVert u\rVert, 10^{-12})`:

    .. math::

        r_t, k'_t, v_t &= \mathrm{lerp}_{\mu_r}(x_t) W_r,\ \mathrm{lerp}_{\mu_k}(x_t) W_k,\
        \mathrm{lerp}_{\mu_v}(x_t) W_v \\
        \log w_t &= -e^{-1/2}\, \sigma\big(w_0 + \tanh(\mathrm{lerp}_{\mu_w}(x_t) W^w_1) W^w_2\big), \qquad
        a_t = \sigma\big(a_0 + \mathrm{lerp}_{\mu_a}(x_t) W^a_1 W^a_2\big) \\
        g_t &= \sigma(\mathrm{lerp}_{\mu_g}(x_t) W^g_1) W^g_2, \qquad
        \kappa_t = \widehat{k'_t \odot k_k}, \qquad k_t = k'_t \odot (1 + (a_t - 1) \odot k_a) \\
        S_t &= \mathrm{diag}(w_t) S_{t-1} - (\kappa_t \odot a_t)(\kappa_t^\top S_{t-1})
        + k_t v_t^\top, \qquad o_t = S_t^\top r_t \\
        y_t &= \Big[\big(\mathrm{GroupNorm}(o_t) + (r_t^\top (k_t \odot r_k))\, v_t\big)
        \odot g_t\Big]_{\text{heads}} W_o

    in rnnjax's ``(d_k, d_v)`` layout of the state (the reference's is the transpose): the
    recurrence :func:`rnnjax.cells.matrix_state.dplr_step` with ``q = r``, ``a = -kappa``,
    ``b = kappa * a_t`` and query scale 1. GroupNorm
    normalises each head's ``d_v`` features (biased variance, epsilon ``norm_eps``), then scales
    by ``norm`` and shifts by ``norm_bias``. The log decay is the official
    :math:`-e^{w}` with :math:`w = -\mathrm{softplus}(-(w_0 + \dots)) - 1/2`, written as fla does.

    Left out: the value residual (layers after the first lerp ``v`` towards the first layer's
    ``v``; it crosses layers, so a stack passes it, not a cell): this is every layer as the first
    one. The block's pre-norm and the channel mix are outside the time mix.

    ``x_{t-1}`` comes from the convolution window (``conv_width = 2``, channels the input's), so
    lengths, resets (``x_{t-1} = 0`` after one, as fla's ``cu_seqlens``) and decoding carry it.
    :meth:`convolve` computes every projection (each reads ``x_{t-1}``); :meth:`mix` and
    :meth:`readout` share them.

    Parameters: :class:`RWKV7Params`; ``mix`` rows ``r, w, k, v, a, g`` (the official
    ``time_maa_*``, fla's ``x_*``); ``w_in`` blocks ``r, k, v`` (``receptance, key, value``);
    ``b_decay`` (``time_decay``, fla's ``w_lora`` bias), ``b_rate`` (``time_aaaaa``), ``k_k``
    (``time_misc_kkk``), ``k_a`` (``time_misc_a``), ``r_k`` (``time_faaaa``), ``norm`` and
    ``norm_bias`` (``ln_x``).

    Initialisation, fla's (the official's) for layer ``layer`` of ``layers``, with
    :math:`\rho_0 = \ell / (L - 1)`, :math:`\rho_1 = 1 - \ell / L`, ``n`` the channel index:
    ``mix`` :math:`1 - (n / C)^{p \rho_1}` with ``p = 0.2, 0.9, 0.7, 0.7, 0.9, 0.2``; over the
    key channels (``K`` of them), ``lin = n / (K - 1) - 1/2`` and ``zig`` the signed square of
    the position within the head scaled to ``[-1, 1]``: ``b_decay``
    :math:`= -6 + 6 (n / (K - 1))^{1 + \rho_0^{0.3}} + 1/2 + 2.5\,\mathrm{zig}`, ``b_rate`` ``=
    -0.19 + 0.3 zig + 0.4 lin``, ``k_k = 0.71 - 0.1 lin``, ``k_a = 1.02``, ``r_k = -0.04``;
    the low-rank first factors zeros, the second orthogonal with gain 0.1 (times
    :math:`\sqrt{\mathrm{rank}/\mathrm{out}}` when the rank is larger); ``W_r, W_v``
    orthogonal, ``W_k`` orthogonal with gain 0.1, ``w_out`` zeros (the block starts as the
    identity); ``norm`` :math:`((\ell + 1) / L)^{0.7}`, ``norm_bias`` zeros.

    Args:
      hidden_size: ``C``, the input's (and output's) features, carried by the token shift.
      heads: number of heads.
      head_size: :math:`d_k` per head (64 in the reference).
      value_size: :math:`d_v` per head; ``None``: ``head_size``.
      decay_rank, a_rank, gate_rank: the low-rank widths; ``None``: fla's defaults from
        ``hidden_size`` (:func:`default_rank`: 2.5, 2.5 and 5 times :math:`\sqrt{C}`, the first
        two times ``head_size / 64``).
      norm_eps: the GroupNorm's epsilon (the official ``1e-5 * 8**2``; fla's ``head_dim * 1e-5``).
      layer, layers: the layer index and count the initialisation is for.

    Carry: :class:`rnnjax.cells.matrix_state.MatrixCarry` ``(conv (*batch, 1, hidden_size): the
    previous input, S (*batch, heads, head_size, value_size))``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.RWKV7(hidden_size=32, heads=2, head_size=16)
      >>> params = cell.init(jax.random.key(0), input_size=32)
      >>> ys, carry = rj.scan(cell, params, jnp.ones((3, 10, 32)), method=rj.Sequential())
      >>> carry, y = jax.jit(cell.step)(params, carry, jnp.ones((3, 32)))
      >>> ys.shape, carry.conv.shape, carry.state.shape, y.shape
      ((3, 10, 32), (3, 1, 32), (3, 2, 16, 16), (3, 32))
    """

    recurrence = "dplr"
    params_type = RWKV7Params
    conv_width = 2  # the token shift: the window holds x_{t-1} and x_t

    hidden_size: int
    heads: int
    head_size: int = 64
    value_size: int | None = None
    decay_rank: int | None = None
    a_rank: int | None = None
    gate_rank: int | None = None
    norm_eps: float = 64e-5
    layer: int = 0
    layers: int = 1

    def __post_init__(self):
        for name in ("hidden_size", "heads", "head_size", "layers"):
            check_positive_int(getattr(self, name), name)
        for name in ("value_size", "decay_rank", "a_rank", "gate_rank"):
            check_positive_int(getattr(self, name), name, optional=True)
        check_positive_number(self.norm_eps, "norm_eps")
        if not (isinstance(self.layer, int) and 0 <= self.layer < self.layers):
            raise ValueError(f"layer={self.layer!r} must be an int in [0, layers={self.layers})")

    @property
    def d_v(self) -> int:
        return self.head_size if self.value_size is None else self.value_size

    def ranks(self) -> tuple[int, int, int]:
        """``(decay_rank, a_rank, gate_rank)``, fla's defaults where ``None``."""
        factor, c = self.head_size / 64, self.hidden_size
        return (
            default_rank(2.5, c, factor) if self.decay_rank is None else self.decay_rank,
            default_rank(2.5, c, factor) if self.a_rank is None else self.a_rank,
            default_rank(5.0, c) if self.gate_rank is None else self.gate_rank,
        )

    def state_sizes(self, params: Any = None) -> tuple[int, int, int]:
        return self.heads, self.head_size, self.d_v

    def decays_per_key(self) -> bool:
        return True

    def query_scale(self) -> float:
        return 1.0

    def conv_channels(self, params: Any = None) -> int:
        return self.hidden_size

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> RWKV7Params:
        check_positive_int(input_size, "input_size")
        if input_size != self.hidden_size:
            raise ValueError(
                f"input_size={input_size}; expected hidden_size={self.hidden_size} for {self!r} "
                f"(the token shift carries the previous input)"
            )
        work = jnp.promote_types(dtype, jnp.float32)
        c, hk, hv = self.hidden_size, self.heads * self.head_size, self.heads * self.d_v
        rank_w, rank_a, rank_g = self.ranks()
        r0 = self.layer / (self.layers - 1) if self.layers > 1 else 0.0
        r1 = 1.0 - self.layer / self.layers
        ddd = jnp.arange(c, dtype=work) / c
        mix = jnp.stack([1.0 - ddd ** (p * r1) for p in (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)])
        n = jnp.arange(hk, dtype=work)
        lin = n / max(hk - 1, 1) - 0.5
        half = max(self.head_size - 1, 1) / 2
        zig = ((n % self.head_size) - (self.head_size - 1) / 2) / half
        zig = zig * jnp.abs(zig)
        www = -6.0 + 6.0 * (n / max(hk - 1, 1)) ** (1.0 + r0**0.3)
        kr, kk, kv, kw, ka, kg = jax.random.split(key, 6)

        def lora_b(k, rank, out):  # fla's LoRA: orthogonal with gain 0.1 (more when rank > out)
            return orthogonal(k, (rank, out), work) * (0.1 * (math.sqrt(rank / out) if rank > out else 1.0))

        w_in = jnp.concatenate(
            [orthogonal(kr, (c, hk), work), 0.1 * orthogonal(kk, (c, hk), work), orthogonal(kv, (c, hv), work)], -1
        )
        params = RWKV7Params(
            mix=mix,
            w_in=w_in,
            w_decay_a=jnp.zeros((c, rank_w), work),
            w_decay_b=lora_b(kw, rank_w, hk),
            b_decay=www + 0.5 + 2.5 * zig,
            w_rate_a=jnp.zeros((c, rank_a), work),
            w_rate_b=lora_b(ka, rank_a, hk),
            b_rate=-0.19 + 0.3 * zig + 0.4 * lin,
            w_gate_a=jnp.zeros((c, rank_g), work),
            w_gate_b=lora_b(kg, rank_g, hv),
            k_k=0.71 - 0.1 * lin,
            k_a=jnp.full((hk,), 1.02, work),
            r_k=jnp.full((self.heads, self.head_size), -0.04, work),
            norm=jnp.full((hv,), ((self.layer + 1) / self.layers) ** 0.7, work),
            norm_bias=jnp.zeros((hv,), work),
            w_out=jnp.zeros((hv, c), work),
        )
        return RWKV7Params(*(p.astype(dtype) for p in params))

    def fixed_input_size(self) -> int:
        return self.hidden_size

    def input_size(self, params: RWKV7Params) -> int:
        return params.w_in.shape[0]

    def output_size(self, input_size: int) -> int:
        return input_size

    def split(self, params: RWKV7Params, x: jax.Array) -> tuple[jax.Array, None]:
        """``(x, None)``: the input enters the token shift's window; nothing is computed before it."""
        self.check_params(params)
        return x, None

    def convolve(self, params: RWKV7Params, window: jax.Array) -> jax.Array:
        """The token shift's lerps and every projection of one step from its window
        ``(*batch, 2, hidden_size)`` (``x_{t-1}, x_t``): ``r, log w, k', v, a, g`` concatenated on
        the last axis (``k'`` before the update by ``a``)."""
        prev, x = window[..., 0, :], window[..., 1, :]
        xr, xw, xk, xv, xa, xg = (x + (prev - x) * params.mix[i] for i in range(len(MIXES)))
        hk = self.heads * self.head_size
        r, k, v = (
            matmul(xr, params.w_in[:, :hk]),
            matmul(xk, params.w_in[:, hk : 2 * hk]),
            matmul(xv, params.w_in[:, 2 * hk :]),
        )
        decay = params.b_decay + matmul(jnp.tanh(matmul(xw, params.w_decay_a)), params.w_decay_b)
        log_w = -DECAY_SCALE * jax.nn.sigmoid(decay)
        a = jax.nn.sigmoid(params.b_rate + matmul(matmul(xa, params.w_rate_a), params.w_rate_b))
        g = matmul(jax.nn.sigmoid(matmul(xg, params.w_gate_a)), params.w_gate_b)
        return jnp.concatenate([r, log_w, k, v, a, g], axis=-1)

    def _pieces(self, params: RWKV7Params, conv_out: jax.Array) -> dict[str, jax.Array]:
        """``r, log_w, k`` (updated by ``a``), ``kk`` (normalised), ``v, a`` per head and ``g``
        ``(*batch, heads * value_size)`` from :meth:`convolve`'s output."""
        h, dk, dv = self.heads, self.head_size, self.d_v
        r, log_w, k, v, a, g = jnp.split(
            conv_out, [h * dk, 2 * h * dk, 3 * h * dk, 3 * h * dk + h * dv, 4 * h * dk + h * dv], -1
        )
        lead = conv_out.shape[:-1]
        heads = lambda u, d=dk: u.reshape(*lead, h, d)
        kk = heads(k * params.k_k)
        # F.normalize: kk / max(|kk|, 1e-12), as sqrt(max(|kk|^2, 1e-24)) so that the gradient at
        # kk = 0 (a zero input and previous input, as padding) is 0, not the norm's 0/0.
        kk = kk * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(kk), axis=-1, keepdims=True), 1e-24))
        k = k * (1 + (a - 1) * params.k_a)
        return dict(r=heads(r), log_w=heads(log_w), k=heads(k), kk=kk, v=heads(v, dv), a=heads(a), g=g)

    def mix(self, params: RWKV7Params, conv_out: jax.Array, rest: None) -> DPLRInputs:
        p = self._pieces(params, conv_out)
        return DPLRInputs(q=p["r"], k=p["k"], v=p["v"], a=-p["kk"], b=p["kk"] * p["a"], log_decay=p["log_w"])

    def readout(self, params: RWKV7Params, o: jax.Array, conv_out: jax.Array, rest: None) -> jax.Array:
        p = self._pieces(params, conv_out)
        h, dv = self.heads, self.d_v
        y = layer_norm(o, params.norm.reshape(h, dv), self.norm_eps) + params.norm_bias.reshape(h, dv)
        y = y + jnp.sum(p["r"] * p["k"] * params.r_k, axis=-1, keepdims=True) * p["v"]
        return matmul(y.reshape(*o.shape[:-2], h * dv) * p["g"], params.w_out)
