"""xLSTM's mLSTM layer (Beck et al. 2025, xLSTM 7B): projections, exponential gates, the
matrix memory, a per-head norm, an output gate and the projection back to the input width."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import check_positive_int, frozen
from rnnjax.cells.matrix_state import MatrixStateCell, MLSTMInputs
from rnnjax.checks import check_positive_number
from rnnjax.ops import matmul, rms_norm

HEAD_NORMS = ("layer", "rms")
INPUT_GATE_BIAS = -10.0  # xLSTM 7B's input-gate bias init
FORGET_GATE_BIAS = (3.0, 6.0)  # its forget-gate biases: evenly spaced over the heads


class MLSTMParams(NamedTuple):
    w: jax.Array  # (input_size, heads * (2 * qk_head_size + 2 * v_head_size)), blocks q, k, v, o
    w_gates: jax.Array  # (input_size, 2 * heads), blocks i, f (one input and one forget gate per head)
    b_gates: jax.Array  # (2 * heads,), blocks i, f
    norm: jax.Array  # (heads, v_head_size): the per-head norm's weight
    w_out: jax.Array  # (heads * v_head_size, input_size)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)``; ``x`` itself when ``cap`` is ``None``."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def layer_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Layer normalisation over the last axis without a bias, reduced in at least float32."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight


@frozen
class MLSTM(MatrixStateCell):
    r"""xLSTM's mLSTM layer as in xLSTM 7B (Beck et al. 2025, "xLSTM 7B: A Recurrent LLM for Fast
    and Efficient Inference"; code: ``NX-AI/xlstm``, ``xlstm/xlstm_large/model.py``,
    ``mLSTMLayer``, and its training twin ``NX-AI/xlstm-jax``,
    ``xlstm_jax/models/xlstm_parallel/blocks/mlstm/layer_v1.py``).

    Per head (:math:`s = d_{qk}^{-1/2}`, gates per head, capped by
    :math:`\mathrm{cap}(a) = c \tanh(a / c)`):

    .. math::

        q_t, k_t, v_t, \hat o_t &= x_t W_q,\ x_t W_k,\ x_t W_v,\ x_t W_o, \qquad
        i_t = \mathrm{cap}(x_t W_i + b_i), \quad f_t = \mathrm{cap}(x_t W_f + b_f) \\
        m_t &= \max(\log\sigma(f_t) + m_{t-1},\ i_t), \quad
        f'_t = e^{\log\sigma(f_t) + m_{t-1} - m_t}, \quad i'_t = e^{i_t - m_t} \\
        C_t &= f'_t C_{t-1} + i'_t k_t v_t^\top, \quad n_t = f'_t n_{t-1} + i'_t k_t, \quad
        h_t = \frac{C_t^\top (s q_t)}{\max(|n_t^\top (s q_t)|,\ e^{-m_t}) + \epsilon} \\
        y_t &= \big(\sigma(\hat o_t) \odot \mathrm{concat}_\text{heads}\,
        \mathrm{Norm}(h_t)\big)\, W_\text{out}

    ``Norm`` is the reference's per-head ``MultiHeadLayerNorm``: a layer norm over each head's
    ``v_head_size`` features with a weight and no bias, reduced in float32
    (``head_norm="rms"``: an RMS norm instead). The paper's RMSNorm replaces the block's
    pre-norms, which are outside this layer (as is the feed-forward part of the block).

    This is the 7B layer, not the original xLSTM paper's mLSTM block (Beck et al. 2024: an
    up-projection, a causal convolution before ``q, k``, block-diagonal ``q, k, v`` projections
    and a learnable skip): 7B's is the mLSTM whose trained weights are published, and its paper
    drops that block's convolution and skip for speed. So ``conv_width == 0``.

    The cap bounds :math:`i_t` and so :math:`m_t \ge i_t \ge -c`; without it (``None``) an input
    gate below about -88 (float32) overflows :math:`e^{-m_t}` and the gradients become NaN.

    Parameters (:class:`MLSTMParams`): ``w`` ``(input_size, heads * (2 qk_head_size +
    2 v_head_size))`` with blocks ``q, k, v, o``; ``w_gates`` ``(input_size, 2 heads)`` and
    ``b_gates`` ``(2 heads,)`` with blocks ``i, f``; ``norm`` ``(heads, v_head_size)``;
    ``w_out`` ``(heads * v_head_size, input_size)``. No other biases (the reference's
    ``use_bias=False``).

    Initialisation (xlstm-jax's, with which xLSTM 7B was trained): ``W_q, W_k, W_v`` normal with
    standard deviation :math:`\sqrt{2 / (5 D)}` (``D = input_size``; Nguyen & Salazar's "small
    init"); ``W_o``, ``W_i``, ``W_f`` zeros; ``b_i = -10``; ``b_f`` evenly spaced from 3 to 6
    over the heads (forget gates start open, :math:`\sigma(3) = 0.95` to
    :math:`\sigma(6) = 0.998`); ``norm`` ones; ``W_out`` normal with standard deviation
    :math:`2 / \sqrt{\mathrm{heads}\cdot d_v}` (Wang's init for one block; the reference divides
    by the number of blocks of the model: scale ``w_out`` for a stack).

    Args:
      heads: number of heads.
      qk_head_size: :math:`d_{qk}`, features of ``q`` and ``k`` per head.
      v_head_size: :math:`d_v`, features of ``v`` (and of ``h``) per head.
      gate_soft_cap: :math:`c` (15 in xLSTM 7B); ``None``: no cap.
      eps: :math:`\epsilon` of the denominator of :math:`h_t`.
      norm_eps: the per-head norm's epsilon.
      head_norm: ``"layer"`` (the reference's) or ``"rms"``.

    Carry: :class:`rnnjax.cells.matrix_state.MLSTMState` ``(C, n, m)`` of shapes
    ``(*batch, heads, qk_head_size, v_head_size)``, ``(*batch, heads, qk_head_size)``,
    ``(*batch, heads)``. Outputs have ``input_size`` features. ``rj.scan`` runs the layer with
    ``rj.Chunked()`` by default; ``step`` decodes one token from the carry it returns.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.MLSTM(heads=2, qk_head_size=4, v_head_size=8)
      >>> params = cell.init(jax.random.key(0), input_size=16)
      >>> ys, carry = rj.scan(cell, params, jnp.ones((2, 10, 16)))  # chunkwise prefill
      >>> carry, y = jax.jit(cell.step)(params, carry, jnp.ones((2, 16)))  # decode the next token
      >>> ys.shape, carry.C.shape, y.shape
      ((2, 10, 16), (2, 2, 4, 8), (2, 16))
    """

    params_type = MLSTMParams
    recurrence = "mlstm"

    heads: int
    qk_head_size: int
    v_head_size: int
    gate_soft_cap: float | None = 15.0
    eps: float = 1e-6
    norm_eps: float = 1e-6
    head_norm: str = "layer"

    def __post_init__(self):
        for name in ("heads", "qk_head_size", "v_head_size"):
            check_positive_int(getattr(self, name), name)
        check_positive_number(self.gate_soft_cap, "gate_soft_cap", optional=True)
        check_positive_number(self.eps, "eps")
        check_positive_number(self.norm_eps, "norm_eps")
        if self.head_norm not in HEAD_NORMS:
            raise ValueError(f"unknown head_norm {self.head_norm!r}; expected one of {list(HEAD_NORMS)}")

    def state_sizes(self, params: Any = None) -> tuple[int, int, int]:
        return self.heads, self.qk_head_size, self.v_head_size

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> MLSTMParams:
        check_positive_int(input_size, "input_size")
        h, dqk, dv = self.heads, self.qk_head_size, self.v_head_size
        work = jnp.promote_types(dtype, jnp.float32)  # the same key gives rounded bfloat16 params
        k_qkv, k_out = jax.random.split(key)
        qkv = jax.random.normal(k_qkv, (input_size, h * (2 * dqk + dv)), work) * (2 / (5 * input_size)) ** 0.5
        w = jnp.concatenate([qkv, jnp.zeros((input_size, h * dv), work)], axis=-1)
        b_f = jnp.linspace(*FORGET_GATE_BIAS, h, dtype=work)
        return MLSTMParams(
            w=w.astype(dtype),
            w_gates=jnp.zeros((input_size, 2 * h), dtype),
            b_gates=jnp.concatenate([jnp.full((h,), INPUT_GATE_BIAS, work), b_f]).astype(dtype),
            norm=jnp.ones((h, dv), dtype),
            w_out=(jax.random.normal(k_out, (h * dv, input_size), work) * 2 / (h * dv) ** 0.5).astype(dtype),
        )

    def input_size(self, params: MLSTMParams) -> int:
        return params.w.shape[0]

    def output_size(self, input_size: int) -> int:
        return input_size

    def step(self, params: MLSTMParams, carry: Any, x: jax.Array) -> tuple[Any, jax.Array]:
        self.check_params(params)
        return super().step(params, carry, x)

    def split(self, params: MLSTMParams, x: jax.Array) -> tuple[None, tuple[jax.Array, jax.Array]]:
        """``(None, (x W, capped gate pre-activations))``: all of a step's products with ``x``."""
        gates = soft_cap(matmul(x, params.w_gates) + params.b_gates, self.gate_soft_cap)
        return None, (matmul(x, params.w), gates)

    def mix(self, params: MLSTMParams, conv_out: None, rest: tuple[jax.Array, jax.Array]) -> MLSTMInputs:
        q, k, v, _ = self._blocks(rest[0])
        gates = rest[1]
        return MLSTMInputs(q, k, v, gates[..., : self.heads], gates[..., self.heads :])

    def readout(
        self, params: MLSTMParams, o: jax.Array, conv_out: None, rest: tuple[jax.Array, jax.Array]
    ) -> jax.Array:
        """``(sigmoid(x W_o) * Norm(h)) W_out`` from the recurrence's ``h`` (here ``o``,
        ``(*batch, heads, v_head_size)``)."""
        norm = layer_norm if self.head_norm == "layer" else rms_norm
        h = norm(o, params.norm, self.norm_eps)
        out_gate = jax.nn.sigmoid(self._blocks(rest[0])[3])
        return matmul(out_gate * h.reshape(*h.shape[:-2], h.shape[-2] * h.shape[-1]), params.w_out)

    def _blocks(self, proj: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``q, k, v`` per head (``(*batch, heads, d)``) and the output gate's pre-activation
        ``(*batch, heads * v_head_size)`` from ``x W``."""
        h, dqk, dv = self.heads, self.qk_head_size, self.v_head_size
        q, k, v, o = jnp.split(proj, [h * dqk, 2 * h * dqk, h * (2 * dqk + dv)], axis=-1)
        return q.reshape(*q.shape[:-1], h, dqk), k.reshape(*k.shape[:-1], h, dqk), v.reshape(*v.shape[:-1], h, dv), o
