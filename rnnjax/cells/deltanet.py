"""DeltaNet (Yang et al. 2024) and Gated DeltaNet (Yang et al. 2025): the layers' token mixers as
matrix-state cells on the (gated) delta rule."""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import frozen
from rnnjax.cells.mamba2 import DT_FLOOR
from rnnjax.cells.matrix_state import DeltaInputs, MatrixStateCell
from rnnjax.checks import check_nonnegative_int, check_positive_int, check_positive_number
from rnnjax.ops import Initializer, causal_conv_step, conv_uniform, glorot_uniform, matmul, rms_norm

L2_EPS = 1e-6  # fla's l2norm: x / sqrt(sum(x^2) + 1e-6), applied to q and k inside its kernels


class DeltaNetParams(NamedTuple):
    w_in: (
        jax.Array
    )  # (input_size, 2 * heads * key_size + heads * value_size [+ heads * value_size]), blocks q, k, v [, g]
    w_beta: jax.Array  # (input_size, heads): the write strength's projection
    conv: jax.Array | None  # (conv_width, 2 * heads * key_size + heads * value_size), channels q, k, v; or None
    norm: jax.Array  # (value_size,): the output RMSNorm's weight, shared by the heads
    w_out: jax.Array  # (heads * value_size, input_size)


class GatedDeltaNetParams(NamedTuple):
    w_in: (
        jax.Array
    )  # (input_size, 2 * heads * key_size + heads * value_size [+ heads * value_size]), blocks q, k, v [, g]
    w_beta: jax.Array  # (input_size, heads)
    w_a: jax.Array  # (input_size, heads): the decay's step pre-activation (fla's a_proj)
    a_log: jax.Array  # (heads,): A = -exp(a_log)
    dt_bias: jax.Array  # (heads,)
    conv: jax.Array | None  # (conv_width, 2 * heads * key_size + heads * value_size), channels q, k, v; or None
    norm: jax.Array  # (value_size,)
    w_out: jax.Array  # (heads * value_size, input_size)


def l2_normalize(x: jax.Array, eps: float = L2_EPS) -> jax.Array:
    """``x / sqrt(sum(x^2) + eps)`` over the last axis (fla's ``l2norm``), reduced in at least float32."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (x32 * jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)


@frozen
class DeltaNet(MatrixStateCell):
    r"""The token mixer of a DeltaNet layer (Schlag et al. 2021, "Linear Transformers Are Secretly
    Fast Weight Programmers"; Yang et al. 2024, "Parallelizing Linear Transformers with the Delta
    Rule over Sequence Length"), as fla's ``DeltaNet`` (``fla/layers/delta_net.py``;
    ``qk_activation="silu"``, ``qk_norm="l2"``, ``use_beta=True``, no convolution bias). Per head:

    .. math::

        q_t, k_t, v_t &= \mathrm{SiLU}(\phi(x_t W_q)),\ \mathrm{SiLU}(\phi(x_t W_k)),\
        \mathrm{SiLU}(\phi(x_t W_v)), \qquad
        \hat q_t = \frac{q_t}{\sqrt{\lVert q_t\rVert^2 + \epsilon}}, \quad
        \hat k_t = \frac{k_t}{\sqrt{\lVert k_t\rVert^2 + \epsilon}} \\
        \beta_t &= c\, \sigma(x_t W_\beta) \qquad (c = 2 \text{ with ``allow_neg_eigval``, else } 1) \\
        S_t &= (I - \beta_t \hat k_t \hat k_t^\top) S_{t-1} + \beta_t \hat k_t v_t^\top, \qquad
        o_t = S_t^\top \hat q_t / \sqrt{d_k} \\
        y_t &= \big[\mathrm{RMSNorm}(o_t)\ [\odot\ \mathrm{SiLU}(x_t W_g)]\big]_{\text{heads}} W_o

    where :math:`\phi` is the identity, or with ``conv_width = K > 0`` a depthwise causal
    convolution over the last ``K`` steps (no bias) per channel of ``q, k, v`` (fla's
    ``ShortConvolution``); :math:`\epsilon = 10^{-6}`. RMSNorm (weight ``norm``, epsilon
    ``norm_eps``) acts on each head's ``d_v`` features; the gate ``SiLU(x W_g)`` is there with
    ``use_gate`` (fla's ``FusedRMSNormGated``). The output has ``input_size`` features.

    Parameters (:class:`DeltaNetParams`): ``w_in`` blocks ``q, k, v`` and, with ``use_gate``,
    ``g``, heads major within each block; ``w_beta`` ``(input_size, heads)``; ``conv``
    ``(conv_width, channels)`` with ``conv[-1]`` on the newest step; ``norm`` ``(value_size,)``;
    ``w_out`` ``(heads * value_size, input_size)``.

    Initialisation: ``w_in``, ``w_beta``, ``w_out`` by ``kernel_init`` (Glorot uniform per block;
    fla's models draw ``N(0, 0.02)``), ``conv`` ``U(-1/sqrt(K), 1/sqrt(K))`` (PyTorch's
    ``Conv1d`` default), ``norm`` ones.

    Args:
      heads: number of heads.
      key_size: :math:`d_k` per head.
      value_size: :math:`d_v` per head.
      conv_width: ``K`` (fla's ``conv_size``, 4); 0 (``use_short_conv=False``) for none.
      use_gate: the output gate (fla's ``use_gate``, off for DeltaNet).
      allow_neg_eigval: :math:`\beta \in (0, 2)`, so :math:`I - \beta k k^\top` can have a
        negative eigenvalue (Grazzi et al. 2025).
      norm_eps: the output RMSNorm's epsilon.
      kernel_init: initializer of the projections.

    Carry: :class:`rnnjax.cells.matrix_state.MatrixCarry` ``(conv (*batch, conv_width - 1,
    channels), S (*batch, heads, key_size, value_size))``, or ``S`` alone when ``conv_width = 0``.
    ``S`` is fla's ``recurrent_state`` in its ``(d_k, d_v)`` layout. ``step`` decodes a token from
    the carry a scan returned.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.DeltaNet(heads=2, key_size=8, value_size=16)
      >>> params = cell.init(jax.random.key(0), input_size=32)
      >>> ys, carry = rj.scan(cell, params, jnp.ones((3, 10, 32)), method=rj.Sequential())
      >>> ys.shape, carry.state.shape
      ((3, 10, 32), (3, 2, 8, 16))
      >>> carry, y = jax.jit(cell.step)(params, carry, jnp.ones((3, 32)))
      >>> y.shape
      (3, 32)
    """

    recurrence = "delta"
    params_type = DeltaNetParams

    heads: int
    key_size: int
    value_size: int
    conv_width: int = 4
    use_gate: bool = False
    allow_neg_eigval: bool = False
    norm_eps: float = 1e-5
    kernel_init: Initializer = field(default=glorot_uniform, repr=False)

    def __post_init__(self):
        for name in ("heads", "key_size", "value_size"):
            check_positive_int(getattr(self, name), name)
        check_nonnegative_int(self.conv_width, "conv_width", note="0 for no convolution")
        check_positive_number(self.norm_eps, "norm_eps")

    def state_sizes(self, params: Any = None) -> tuple[int, int, int]:
        return self.heads, self.key_size, self.value_size

    def conv_channels(self, params: Any = None) -> int:
        return self.heads * (2 * self.key_size + self.value_size)

    def _shared_init(self, key: jax.Array, input_size: int, dtype: Any) -> dict[str, Any]:
        check_positive_int(input_size, "input_size")
        kq, kk, kv, kg, kb, kc, ko = jax.random.split(key, 7)
        hk, hv = self.heads * self.key_size, self.heads * self.value_size
        blocks = ((kq, hk), (kk, hk), (kv, hv)) + (((kg, hv),) if self.use_gate else ())
        return dict(
            w_in=jnp.concatenate([self.kernel_init(k, (input_size, n), dtype) for k, n in blocks], axis=-1),
            w_beta=self.kernel_init(kb, (input_size, self.heads), dtype),
            conv=conv_uniform(kc, (self.conv_width, self.conv_channels()), self.conv_width, dtype)
            if self.conv_width
            else None,
            norm=jnp.ones((self.value_size,), dtype),
            w_out=self.kernel_init(ko, (hv, input_size), dtype),
        )

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> DeltaNetParams:
        return DeltaNetParams(**self._shared_init(key, input_size, dtype))

    def input_size(self, params: Any) -> int:
        return params.w_in.shape[0]

    def output_size(self, input_size: int) -> int:
        return input_size

    def _gates(self, params: Any, x: jax.Array) -> jax.Array:
        """The per-head gate pre-activations: ``x W_beta`` ``(*batch, heads)``."""
        return matmul(x, params.w_beta)

    def split(self, params: Any, x: jax.Array) -> tuple[jax.Array | None, Any]:
        """``(qkv, (None, gates, g))`` with a convolution, else ``(None, (qkv, gates, g))``:
        ``gates`` the per-head gate pre-activations, ``g`` the output gate's (or ``None``)."""
        self.check_params(params)
        z = matmul(x, params.w_in)
        qkv = z[..., : self.conv_channels()]
        g = z[..., self.conv_channels() :] if self.use_gate else None
        if self.conv_width:
            return qkv, (None, self._gates(params, x), g)
        return None, (qkv, self._gates(params, x), g)

    def convolve(self, params: Any, window: jax.Array) -> jax.Array:
        return jax.nn.silu(causal_conv_step(window, params.conv))

    def _qkv(self, conv_out: jax.Array | None, rest: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``q, k`` L2-normalised and ``v``, per head, from the (convolved) projections."""
        qkv = jax.nn.silu(rest[0]) if conv_out is None else conv_out
        h, dk, dv = self.heads, self.key_size, self.value_size
        q, k, v = jnp.split(qkv, [h * dk, 2 * h * dk], axis=-1)
        lead = qkv.shape[:-1]
        return l2_normalize(q.reshape(*lead, h, dk)), l2_normalize(k.reshape(*lead, h, dk)), v.reshape(*lead, h, dv)

    def _beta(self, gates: jax.Array) -> jax.Array:
        beta = jax.nn.sigmoid(gates[..., : self.heads])
        return 2 * beta if self.allow_neg_eigval else beta

    def mix(self, params: Any, conv_out: jax.Array | None, rest: Any) -> DeltaInputs:
        q, k, v = self._qkv(conv_out, rest)
        return DeltaInputs(q, k, v, self._beta(rest[1]), None)

    def readout(self, params: Any, o: jax.Array, conv_out: jax.Array | None, rest: Any) -> jax.Array:
        y = rms_norm(o, params.norm, self.norm_eps)
        if self.use_gate:
            y = y * jax.nn.silu(rest[2].reshape(o.shape))
        return matmul(y.reshape(*o.shape[:-2], o.shape[-2] * o.shape[-1]), params.w_out)


@frozen
class GatedDeltaNet(DeltaNet):
    r"""The token mixer of a Gated DeltaNet layer (Yang et al. 2025, "Gated Delta Networks:
    Improving Mamba2 with Delta Rule"), as fla's ``GatedDeltaNet``
    (``fla/layers/gated_deltanet.py``; no grouped value heads, no convolution bias): DeltaNet's
    projections, convolution, normalised ``q, k`` and :math:`\beta_t` (:class:`DeltaNet`), and a
    decay per head and step applied before the delta rule's prediction:

    .. math::

        g_t &= -e^{A^{\log}} \,\mathrm{softplus}(x_t W_a + b^{\Delta}) \qquad (\text{per head}) \\
        S_t &= (I - \beta_t \hat k_t \hat k_t^\top)\, e^{g_t} S_{t-1} + \beta_t \hat k_t v_t^\top,
        \qquad o_t = S_t^\top \hat q_t / \sqrt{d_k} \\
        y_t &= \big[\mathrm{RMSNorm}(o_t) \odot \mathrm{SiLU}(x_t W_g)\big]_{\text{heads}} W_o

    (the gate with ``use_gate``, fla's default; without it RMSNorm alone).

    Parameters (:class:`GatedDeltaNetParams`): :class:`DeltaNetParams`' and ``w_a``
    ``(input_size, heads)``, ``a_log`` and ``dt_bias`` ``(heads,)``.

    Initialisation, fla's for ``a_log`` and ``dt_bias``: :math:`A \sim U(0, 16)`, ``a_log`` =
    :math:`\log A`; ``dt_bias`` the inverse softplus of :math:`\Delta_0`,
    :math:`\log \Delta_0 \sim U(\log 10^{-3}, \log 0.1)` raised to at least ``1e-4``; the rest
    as :class:`DeltaNet` (``w_a`` by ``kernel_init``).

    Args: as :class:`DeltaNet`, ``use_gate`` on by default.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.GatedDeltaNet(heads=2, key_size=8, value_size=16)
      >>> params = cell.init(jax.random.key(0), input_size=32)
      >>> ys, carry = rj.scan(cell, params, jnp.ones((3, 10, 32)), method=rj.Sequential())
      >>> carry, y = jax.jit(cell.step)(params, carry, jnp.ones((3, 32)))
      >>> ys.shape, carry.state.shape, y.shape
      ((3, 10, 32), (3, 2, 8, 16), (3, 32))
    """

    # A class attribute, not a field (an annotation would put it in __dataclass_fields__).
    params_type = GatedDeltaNetParams  # type: ignore[assignment]

    use_gate: bool = True

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> GatedDeltaNetParams:
        shared = self._shared_init(key, input_size, dtype)
        ka, kA, kt = jax.random.split(jax.random.fold_in(key, 1), 3)
        work = jnp.promote_types(dtype, jnp.float32)
        a = jax.random.uniform(kA, (self.heads,), work, 0.0, 16.0)
        dt = jnp.exp(jax.random.uniform(kt, (self.heads,), work, math.log(1e-3), math.log(0.1)))
        dt = jnp.maximum(dt, DT_FLOOR)
        return GatedDeltaNetParams(
            w_a=self.kernel_init(ka, (input_size, self.heads), dtype),
            a_log=jnp.log(a).astype(dtype),
            dt_bias=(dt + jnp.log(-jnp.expm1(-dt))).astype(dtype),  # softplus(dt_bias) = dt
            **shared,
        )

    def _gates(self, params: Any, x: jax.Array) -> jax.Array:
        """``x [W_beta, W_a]`` ``(*batch, 2 heads)``: the write strength's and the decay's."""
        return jnp.concatenate([matmul(x, params.w_beta), matmul(x, params.w_a)], axis=-1)

    def mix(self, params: Any, conv_out: jax.Array | None, rest: Any) -> DeltaInputs:
        q, k, v = self._qkv(conv_out, rest)
        gates = rest[1]
        log_decay = -jnp.exp(params.a_log) * jax.nn.softplus(gates[..., self.heads :] + params.dt_bias)
        return DeltaInputs(q, k, v, self._beta(gates), log_decay)
