r"""``delta_rule`` and ``rwkv7``: the recurrences that write to their state (the transition is
the identity, or a diagonal, plus a rank-one term), on already-projected tensors. Layout and
keyword arguments as :mod:`rnnjax.linear_attention.ops`; the chunkwise form is
:mod:`rnnjax.engines.chunkwise_delta`.
"""

from __future__ import annotations

from typing import ClassVar

import jax

from rnnjax.cell import frozen
from rnnjax.cells.matrix_state import DeltaInputs, DPLRInputs
from rnnjax.linear_attention.ops import (
    _check,
    _check_qkv,
    _check_state,
    _decay_of,
    _decay_part,
    _decay_width,
    _ProjectedOp,
    _run,
    _scale,
    _unflatten,
)
from rnnjax.methods import Method

Array = jax.Array


@frozen
class DeltaOp(_ProjectedOp):
    """The gated delta rule as a cell whose step input is ``q, k, v``, ``beta`` and the log
    decay of one step, concatenated and flattened (what :func:`delta_rule` builds)."""

    recurrence: ClassVar[str] = "delta"
    heads: int
    key_size: int
    value_size: int
    gate: str  # "none", "head" (one decay per head) or "key" (one per key dimension)
    scale: float

    def widths(self) -> tuple[int, ...]:
        h, dk, dv = self.heads, self.key_size, self.value_size
        return (h * dk, h * dk, h * dv, h, _decay_width(self.gate, h, dk))

    def decays_per_key(self) -> bool:
        return self.gate == "key"

    def mix(self, params, conv_out, x):
        q, k, v, beta, g = _unflatten(x, self.widths(), self.heads)
        return DeltaInputs(q, k, v, beta[..., 0], _decay_of(self.gate, g))


@frozen
class DPLROp(_ProjectedOp):
    """The diagonal-plus-low-rank recurrence as a cell whose step input is ``r, k, v, a, b`` and
    the log decay ``w`` of one step, concatenated and flattened (what :func:`rwkv7` builds)."""

    recurrence: ClassVar[str] = "dplr"
    heads: int
    key_size: int
    value_size: int
    scale: float

    def widths(self) -> tuple[int, ...]:
        h, dk, dv = self.heads, self.key_size, self.value_size
        return (h * dk, h * dk, h * dv, h * dk, h * dk, h * dk)

    def decays_per_key(self) -> bool:
        return True

    def mix(self, params, conv_out, x):
        return DPLRInputs(*_unflatten(x, self.widths(), self.heads))


def delta_rule(
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    log_decay: Array | None = None,
    *,
    scale: float | None = None,
    state: Array | None = None,
    lengths: Array | None = None,
    resets: Array | None = None,
    reverse: bool = False,
    method: Method | str | None = None,
) -> tuple[Array, Array]:
    r"""The (gated) delta rule, per head: the decay applies before the prediction
    :math:`(D_t S_{t-1})^\top k_t`, which the write corrects towards :math:`v_t`,

    .. math::

        S_t = (I - \beta_t k_t k_t^\top)\, D_t S_{t-1} + \beta_t k_t v_t^\top
            = D_t S_{t-1} + \beta_t k_t (v_t - (D_t S_{t-1})^\top k_t)^\top, \qquad
        o_t = S_t^\top (s\, q_t),

    with :math:`D_t = \mathrm{diag}(e^{g_t})`. ``k`` is used as given: DeltaNet and Gated
    DeltaNet L2-normalise it per head first (``rj.DeltaNet`` does), which keeps
    :math:`I - \beta k k^\top` a contraction for :math:`\beta \in [0, 2]` (above 1: negative
    eigenvalues, Grazzi et al. 2024).

    Args:
      q, k: ``(*batch, T, heads, d_k)``; v: ``(*batch, T, heads, d_v)``.
      beta: :math:`\beta_t`, ``(*batch, T, heads)``, in ``[0, 2]``.
      log_decay: :math:`g_t \le 0`. ``None``: DeltaNet (Yang et al. 2024); ``(*batch, T, heads)``:
        Gated DeltaNet (Yang et al. 2025); ``(*batch, T, heads, d_k)``: one per key dimension
        (Kimi Delta Attention).
      scale: :math:`s`; ``None``: ``d_k ** -0.5``.
      state: ``(*batch, heads, d_k, d_v)`` before the first step; zeros when ``None``.
      lengths, resets, reverse: as in :func:`rnnjax.linear_attention.gla`.
      method: ``rj.Chunked(size)`` (default: the WY/UT chunkwise form,
        :mod:`rnnjax.engines.chunkwise_delta`) or ``rj.Sequential()`` (the step recurrence).

    Returns:
      ``(o, final_state)``: ``(*batch, T, heads, d_v)`` and ``(*batch, heads, d_k, d_v)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> k = jax.nn.one_hot(jnp.arange(10) % 8, 8)[None, :, None, :]  # unit keys, (1, 10, 1, 8)
      >>> v = jnp.ones((1, 10, 1, 4)); beta = jnp.ones((1, 10, 1))
      >>> o, S = rj.linear_attention.delta_rule(k, k, v, beta)
      >>> S.shape, float(S[0, 0, 0, 0])  # beta = 1 replaces the value stored under key 0
      ((1, 1, 8, 4), 1.0)
    """
    q, k, v = _check_qkv(q, k, v)
    *batch, steps, heads, d_k = q.shape
    beta = _check("beta", beta, q.shape[:-1], "(*batch, T, heads)")
    gate, decay = _decay_part(log_decay, q)
    _check_state(state, batch, heads, d_k, v.shape[-1])
    cell = DeltaOp(heads, d_k, v.shape[-1], gate, _scale(scale, d_k))
    return _run(cell, [q, k, v, beta[..., None], *decay], state, lengths, resets, reverse, method, v.shape)


def rwkv7(
    r: Array,
    w: Array,
    k: Array,
    v: Array,
    a: Array,
    b: Array,
    *,
    scale: float = 1.0,
    state: Array | None = None,
    lengths: Array | None = None,
    resets: Array | None = None,
    reverse: bool = False,
    method: Method | str | None = None,
) -> tuple[Array, Array]:
    r"""RWKV-7's recurrence (Peng et al. 2025), the diagonal-plus-low-rank transition of fla's
    generalised delta rule (``chunk_dplr_delta_rule``), per head, in the state layout
    ``(d_k, d_v)``:

    .. math::

        S_t = (\mathrm{diag}(e^{w_t}) + b_t a_t^\top)\, S_{t-1} + k_t v_t^\top, \qquad
        o_t = S_t^\top (s\, r_t).

    ``a`` reads the previous, undecayed state (:math:`a_t^\top S_{t-1}`) and ``b`` writes what
    it read; ``w`` is the *log* decay. RWKV-7's own layout is the transpose (``(d_v, d_k)``,
    :math:`S_t = S_{t-1} (\mathrm{diag}(w_t) + a_t b_t^\top) + v_t k_t^\top` with its ``a``,
    ``b`` named as here), and its time-mixing block passes ``a = -\hat\kappa``,
    ``b = \hat\kappa \odot a_{gate}`` (``rj.RWKV7`` builds them).

    Args:
      r, w, k, a, b: ``(*batch, T, heads, d_k)``; ``w <= 0``. v: ``(*batch, T, heads, d_v)``.
      scale: :math:`s` (RWKV-7 uses 1).
      state: ``(*batch, heads, d_k, d_v)`` before the first step; zeros when ``None``.
      lengths, resets, reverse, method: as in :func:`delta_rule`.

    Returns:
      ``(o, final_state)``: ``(*batch, T, heads, d_v)`` and ``(*batch, heads, d_k, d_v)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> r = k = a = b = jnp.zeros((2, 10, 4, 8)); w = jnp.full((2, 10, 4, 8), -0.5)
      >>> o, S = rj.linear_attention.rwkv7(r, w, k, jnp.ones((2, 10, 4, 16)), a, b)
      >>> o.shape, S.shape
      ((2, 10, 4, 16), (2, 4, 8, 16))
    """
    r, k, v = _check_qkv(r, k, v, query="r")
    *batch, steps, heads, d_k = r.shape
    what = "(*batch, T, heads, d_k), the shape of r"
    parts = [r, k, v, *(_check(n, x, r.shape, what) for n, x in (("a", a), ("b", b), ("w", w)))]
    _check_state(state, batch, heads, d_k, v.shape[-1])
    cell = DPLROp(heads, d_k, v.shape[-1], _scale(scale, d_k))
    return _run(cell, parts, state, lengths, resets, reverse, method, v.shape)
