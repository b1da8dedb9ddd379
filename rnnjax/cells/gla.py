"""Gated Linear Attention (Yang et al. 2024): the GLA layer's token mixer as a matrix-state cell."""

from __future__ import annotations

from dataclasses import field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import frozen
from rnnjax.cells.matrix_state import GatedInputs, MatrixStateCell
from rnnjax.checks import check_nonnegative_int, check_positive_int, check_positive_number
from rnnjax.ops import Initializer, causal_conv_step, conv_uniform, glorot_uniform, matmul, rms_norm


class GLAParams(NamedTuple):
    w_in: jax.Array  # (input_size, 2 * heads * key_size + 2 * heads * value_size), blocks q, k, v, g
    w_gate_a: jax.Array  # (input_size, gate_rank): first factor of the forget gate's projection
    w_gate_b: jax.Array  # (gate_rank, heads * key_size): second factor
    b_gate: jax.Array  # (heads * key_size,): the forget gate's bias
    conv: (
        jax.Array | None
    )  # (conv_width, 2 * heads * key_size + heads * value_size), channels q, k, v; None when conv_width=0
    norm: jax.Array  # (value_size,): the output norm's weight, shared by the heads
    w_out: jax.Array  # (heads * value_size, input_size)


@frozen
class GLA(MatrixStateCell):
    r"""The token mixer of a Gated Linear Attention layer (Yang et al. 2024, "Gated Linear
    Attention Transformers with Hardware-Efficient Training"), as fla's
    ``GatedLinearAttention`` (``fla/layers/gla.py``, ``use_output_gate=True``,
    ``fuse_norm=True``, no key/value head sharing, no feature map). Per head:

    .. math::

        q_t, k_t, v_t &= \phi(x_t W_q),\ \phi(x_t W_k),\ \phi(x_t W_v), \qquad
        g^o_t = x_t W_g \\
        \alpha_t &= \log\sigma(x_t W_a W_b + b) \,/\, \nu \qquad (\text{per key dimension}) \\
        S_t &= \mathrm{diag}(e^{\alpha_t}) S_{t-1} + k_t v_t^\top, \qquad
        o_t = S_t^\top q_t / \sqrt{d_k} \\
        y_t &= \big[\mathrm{RMSNorm}(o_t) \odot \mathrm{swish}(g^o_t)\big]_{\text{heads}} W_o

    where :math:`\phi` is the identity, or with ``conv_width = K > 0`` a depthwise causal
    convolution over the last ``K`` steps (no bias) followed by SiLU, per channel of ``q``,
    ``k``, ``v`` (fla's ``ShortConvolution``). RMSNorm has weight ``norm`` and epsilon
    ``norm_eps`` and acts on each head's ``d_v`` features; ``swish(g) = g * sigmoid(g)``. The
    output has ``input_size`` features.

    Parameters (:class:`GLAParams`): ``w_in`` blocks ``q, k, v, g`` (``W_q, W_k, W_v, W_g``),
    heads major within each block; ``w_gate_a`` ``(input_size, gate_rank)`` and ``w_gate_b``
    ``(gate_rank, heads * key_size)`` with bias ``b_gate``; ``conv`` ``(conv_width, channels)``
    with ``conv[-1]`` on the newest step; ``norm`` ``(value_size,)``; ``w_out``.

    Initialisation: ``w_in``, ``w_gate_a``, ``w_gate_b``, ``w_out`` by ``kernel_init`` (Glorot
    uniform per block; fla's models draw ``N(0, 0.02)``), ``b_gate`` zeros, ``conv``
    ``U(-1/sqrt(K), 1/sqrt(K))`` (PyTorch's ``Conv1d`` default), ``norm`` ones.

    Args:
      heads: number of heads.
      key_size: :math:`d_k` per head.
      value_size: :math:`d_v` per head.
      conv_width: ``K``; 0 (fla's ``use_short_conv=False``) for none.
      gate_rank: rank of the forget gate's projection (fla's ``gate_low_rank_dim``).
      gate_normalizer: :math:`\nu` (fla's ``gate_logit_normalizer``).
      norm_eps: the output RMSNorm's epsilon.
      kernel_init: initializer of the projections.

    Carry: the state ``S`` ``(*batch, heads, key_size, value_size)``; with ``conv_width > 0`` a
    :class:`rnnjax.cells.matrix_state.MatrixCarry` ``(conv (*batch, conv_width - 1, 2 * heads *
    key_size + heads * value_size), S)``, the convolution's last inputs. ``rj.scan`` runs it by
    ``rj.Chunked()`` by default; ``step`` decodes a token from the carry a scan returned.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.GLA(heads=2, key_size=8, value_size=16, conv_width=4)
      >>> params = cell.init(jax.random.key(0), input_size=32)
      >>> xs = jnp.ones((3, 10, 32))
      >>> ys, carry = rj.scan(cell, params, xs)
      >>> ys.shape, carry.state.shape
      ((3, 10, 32), (3, 2, 8, 16))
      >>> carry, y = jax.jit(cell.step)(params, carry, jnp.ones((3, 32)))
      >>> y.shape
      (3, 32)
    """

    recurrence = "gla"
    params_type = GLAParams

    heads: int
    key_size: int
    value_size: int
    conv_width: int = 0
    gate_rank: int = 16
    gate_normalizer: float = 16.0
    norm_eps: float = 1e-5
    kernel_init: Initializer = field(default=glorot_uniform, repr=False)

    def __post_init__(self):
        for name in ("heads", "key_size", "value_size", "gate_rank"):
            check_positive_int(getattr(self, name), name)
        check_nonnegative_int(self.conv_width, "conv_width", note="0 for no convolution")
        check_positive_number(self.gate_normalizer, "gate_normalizer")
        check_positive_number(self.norm_eps, "norm_eps")

    def state_sizes(self, params: Any = None) -> tuple[int, int, int]:
        return self.heads, self.key_size, self.value_size

    def decays_per_key(self) -> bool:
        return True

    def conv_channels(self, params: Any = None) -> int:
        return self.heads * (2 * self.key_size + self.value_size)

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> GLAParams:
        check_positive_int(input_size, "input_size")
        kq, kk, kv, kg, ka, kb, kc, ko = jax.random.split(key, 8)
        hk, hv = self.heads * self.key_size, self.heads * self.value_size
        blocks = ((kq, hk), (kk, hk), (kv, hv), (kg, hv))
        w_in = jnp.concatenate([self.kernel_init(k, (input_size, n), dtype) for k, n in blocks], axis=-1)
        return GLAParams(
            w_in=w_in,
            w_gate_a=self.kernel_init(ka, (input_size, self.gate_rank), dtype),
            w_gate_b=self.kernel_init(kb, (self.gate_rank, hk), dtype),
            b_gate=jnp.zeros((hk,), dtype),
            conv=conv_uniform(kc, (self.conv_width, self.conv_channels()), self.conv_width, dtype)
            if self.conv_width
            else None,
            norm=jnp.ones((self.value_size,), dtype),
            w_out=self.kernel_init(ko, (hv, input_size), dtype),
        )

    def input_size(self, params: GLAParams) -> int:
        return params.w_in.shape[0]

    def output_size(self, input_size: int) -> int:
        return input_size

    def split(self, params: GLAParams, x: jax.Array) -> tuple[jax.Array | None, Any]:
        """``(qkv, (None, gate, g))`` with a convolution, else ``(None, (qkv, gate, g))``:
        ``gate`` the forget gate's pre-activation, ``g`` the output gate's."""
        self.check_params(params)
        z = matmul(x, params.w_in)
        qkv, g = z[..., : self.conv_channels()], z[..., self.conv_channels() :]
        gate = matmul(matmul(x, params.w_gate_a), params.w_gate_b) + params.b_gate
        if self.conv_width:
            return qkv, (None, gate, g)
        return None, (qkv, gate, g)

    def convolve(self, params: GLAParams, window: jax.Array) -> jax.Array:
        # conv is None only with conv_width=0, when no engine calls convolve (check_params).
        return jax.nn.silu(causal_conv_step(window, params.conv))  # type: ignore[arg-type]

    def mix(self, params: GLAParams, conv_out: jax.Array | None, rest: Any) -> GatedInputs:
        qkv = rest[0] if conv_out is None else conv_out
        gate = rest[1]
        h, dk, dv = self.heads, self.key_size, self.value_size
        lead = qkv.shape[:-1]
        q = qkv[..., : h * dk].reshape(*lead, h, dk)
        k = qkv[..., h * dk : 2 * h * dk].reshape(*lead, h, dk)
        v = qkv[..., 2 * h * dk :].reshape(*lead, h, dv)
        log_decay = jax.nn.log_sigmoid(gate).reshape(*lead, h, dk) / self.gate_normalizer
        return GatedInputs(q, k, v, log_decay)

    def readout(self, params: GLAParams, o: jax.Array, conv_out: jax.Array | None, rest: Any) -> jax.Array:
        g = rest[2].reshape(o.shape)
        y = rms_norm(o, params.norm, self.norm_eps) * jax.nn.silu(g)
        return matmul(y.reshape(*o.shape[:-2], o.shape[-2] * o.shape[-1]), params.w_out)
