"""minGRU and minLSTM (Feng et al. 2024): gated recurrences linear in their state."""

from __future__ import annotations

from dataclasses import field
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import HiddenStateCell, LinearCell, check_positive_int, frozen
from rnnjax.ops import Initializer, glorot_uniform, matmul, stacked_init, zeros

CANDIDATES = ("g", "identity")


def g(x: jax.Array) -> jax.Array:
    r"""Feng et al.'s candidate activation: :math:`g(x) = x + 1/2` for :math:`x \ge 0`, else
    :math:`\sigma(x)`. Continuous, increasing and positive everywhere."""
    return jnp.where(x >= 0, x + 0.5, jax.nn.sigmoid(x))


def log_g(x: jax.Array) -> jax.Array:
    """``log(g(x))``, with finite values and gradients everywhere."""
    # relu keeps the unselected branch's log (and its gradient) finite for x < -0.5.
    return jnp.where(x >= 0, jnp.log(jax.nn.relu(x) + 0.5), jax.nn.log_sigmoid(x))


def _check_candidate(candidate: Any) -> None:
    if not isinstance(candidate, str) or candidate not in CANDIDATES:
        raise ValueError(f"unknown candidate {candidate!r}; expected one of {list(CANDIDATES)}")


class MinGRUParams(NamedTuple):
    w: jax.Array  # (input_size, 2 * hidden), blocks z, h (update gate, candidate)
    b: jax.Array | None  # (2 * hidden,), blocks z, h; None when use_bias=False


class MinLSTMParams(NamedTuple):
    w: jax.Array  # (input_size, 3 * hidden), blocks f, i, h (forget, input, candidate)
    b: jax.Array | None  # (3 * hidden,), blocks f, i, h; None when use_bias=False


class _Minimal(LinearCell, HiddenStateCell):
    """What minGRU and minLSTM share: fused input projection, candidate, carry."""

    _blocks = 0  # blocks of ``hidden_size`` columns in ``w``
    # Declared by both subclasses as dataclass fields; annotations only here.
    params_type: ClassVar[type[Any]]
    candidate: str
    use_bias: bool
    kernel_init: Initializer
    bias_init: Initializer

    def __post_init__(self):
        check_positive_int(self.hidden_size, "hidden_size")
        _check_candidate(self.candidate)

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> NamedTuple:
        check_positive_int(input_size, "input_size")
        kw, kb = jax.random.split(key)
        h, k = self.hidden_size, self._blocks
        return self.params_type(
            w=stacked_init(self.kernel_init, kw, input_size, h, k, dtype),
            b=self.bias_init(kb, (k * h,), dtype) if self.use_bias else None,
        )

    def _preactivations(self, params: MinGRUParams | MinLSTMParams, x: jax.Array) -> list[jax.Array]:
        self.check_params(params)
        self.check_input(params, x)
        pre = matmul(x, params.w)
        if params.b is not None:
            pre = pre + params.b
        return jnp.split(pre, self._blocks, axis=-1)

    def _candidate(self, pre: jax.Array) -> jax.Array:
        return g(pre) if self.candidate == "g" else pre

    @property
    def log_space(self) -> bool:
        return self.candidate == "g"

    def _check_log_space(self) -> None:
        if self.candidate != "g":
            raise ValueError(
                f"log_coefficients needs candidate='g' (a positive candidate, so that log b "
                f"exists); this {type(self).__name__} has candidate={self.candidate!r}"
            )


@frozen
class MinGRU(_Minimal):
    r"""minGRU (Feng et al. 2024, "Were RNNs All We Needed?"): a GRU whose gate and
    candidate depend on the input only, so the state follows a linear recurrence.

    Blocks of ``w`` and ``b`` are ``z, h`` (update gate, candidate):

    .. math::

        z_t &= \sigma(x_t W_z + b_z), \qquad \tilde h_t = g(x_t W_h + b_h) \\
        h_t &= (1 - z_t) \odot h_{t-1} + z_t \odot \tilde h_t, \qquad y_t = h_t

    so ``a_t = 1 - z_t`` and ``b_t = z_t * h~_t`` (:meth:`coefficients`). With
    ``candidate="g"`` (the paper's), :math:`g(x) = x + 1/2` for :math:`x \ge 0` and
    :math:`\sigma(x)` otherwise; it keeps :math:`\tilde h_t > 0`, which the log-space
    parallel form (:meth:`log_coefficients`) needs. ``candidate="identity"`` uses
    :math:`g(x) = x` (the paper's sequential form, no log-space form).

    Initialisation: ``w`` Glorot-uniform per block, ``b`` zeros.

    Args:
      hidden_size: features of ``h``.
      candidate: ``"g"`` or ``"identity"``.
      use_bias: whether ``b`` exists.

    Carry: ``h`` of shape ``(*batch, hidden_size)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.MinGRU(hidden_size=8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> x = jnp.ones((2, 3))
      >>> a, b = cell.coefficients(params, x)
      >>> h, y = cell.step(params, cell.init_carry((2,)), x)
      >>> bool(jnp.allclose(h, b)), y.shape
      (True, (2, 8))
    """

    params_type = MinGRUParams
    _blocks = 2

    hidden_size: int
    candidate: str = "g"
    use_bias: bool = True
    kernel_init: Initializer = field(default=glorot_uniform, repr=False)
    bias_init: Initializer = field(default=zeros, repr=False)

    def coefficients(self, params: MinGRUParams, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(a, b) = (1 - z, z * h~)``, each ``(*batch, hidden_size)``."""
        z_pre, h_pre = self._preactivations(params, x)
        z = jax.nn.sigmoid(z_pre)
        return 1.0 - z, z * self._candidate(h_pre)

    def log_coefficients(self, params: MinGRUParams, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        r"""``(log a, log b)``, computed without forming ``a`` or ``b``:
        :math:`\log a = -\mathrm{softplus}(z)`, :math:`\log b = -\mathrm{softplus}(-z) +
        \log g(h)` for pre-activations ``z``, ``h``. Needs ``candidate="g"``."""
        self._check_log_space()
        z_pre, h_pre = self._preactivations(params, x)
        return -jax.nn.softplus(z_pre), -jax.nn.softplus(-z_pre) + log_g(h_pre)


@frozen
class MinLSTM(_Minimal):
    r"""minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): an LSTM whose gates and
    candidate depend on the input only, with normalised forget and input gates and no
    output gate, so the state follows a linear recurrence.

    Blocks of ``w`` and ``b`` are ``f, i, h`` (forget gate, input gate, candidate):

    .. math::

        f_t &= \sigma(x_t W_f + b_f), \qquad i_t = \sigma(x_t W_i + b_i), \qquad
        \tilde h_t = g(x_t W_h + b_h) \\
        f'_t &= \frac{f_t}{f_t + i_t}, \qquad i'_t = \frac{i_t}{f_t + i_t} \\
        h_t &= f'_t \odot h_{t-1} + i'_t \odot \tilde h_t, \qquad y_t = h_t

    so ``a_t = f'_t`` and ``b_t = i'_t * h~_t`` (:meth:`coefficients`). ``candidate``
    chooses ``g`` as in :class:`MinGRU`: ``"g"`` (the paper's; positive, allows
    :meth:`log_coefficients`) or ``"identity"``.

    Initialisation: ``w`` Glorot-uniform per block, ``b`` zeros.

    Args:
      hidden_size: features of ``h``.
      candidate: ``"g"`` or ``"identity"``.
      use_bias: whether ``b`` exists.

    Carry: ``h`` of shape ``(*batch, hidden_size)``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.MinLSTM(hidden_size=8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> log_a, log_b = cell.log_coefficients(params, jnp.ones(3))
      >>> h, y = cell.step(params, cell.init_carry(), jnp.ones(3))
      >>> bool(jnp.allclose(h, jnp.exp(log_b), atol=1e-6)), y.shape
      (True, (8,))
    """

    params_type = MinLSTMParams
    _blocks = 3

    hidden_size: int
    candidate: str = "g"
    use_bias: bool = True
    kernel_init: Initializer = field(default=glorot_uniform, repr=False)
    bias_init: Initializer = field(default=zeros, repr=False)

    def coefficients(self, params: MinLSTMParams, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        r"""``(a, b) = (f', i' * h~)``, each ``(*batch, hidden_size)``.

        :math:`f' = f / (f + i) = \sigma(-d)` and :math:`i' = \sigma(d)` with
        :math:`d = \log i - \log f`, as in :meth:`log_coefficients`: finite where both gates
        underflow (``f / (f + i)`` would be 0 / 0)."""
        f_pre, i_pre, h_pre = self._preactivations(params, x)
        d = jax.nn.log_sigmoid(i_pre) - jax.nn.log_sigmoid(f_pre)
        return jax.nn.sigmoid(-d), jax.nn.sigmoid(d) * self._candidate(h_pre)

    def log_coefficients(self, params: MinLSTMParams, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        r"""``(log a, log b)``, computed without forming ``a`` or ``b``. With
        :math:`\log f = -\mathrm{softplus}(-f_{pre})` and likewise :math:`\log i`,
        :math:`\log f' = \log f - \mathrm{logaddexp}(\log f, \log i) = -\mathrm{softplus}(d)`
        and :math:`\log i' = -\mathrm{softplus}(-d)` for :math:`d = \log i - \log f`;
        :math:`\log b = \log i' + \log g(h_{pre})`. Needs ``candidate="g"``."""
        self._check_log_space()
        f_pre, i_pre, h_pre = self._preactivations(params, x)
        d = jax.nn.log_sigmoid(i_pre) - jax.nn.log_sigmoid(f_pre)
        return -jax.nn.softplus(d), -jax.nn.softplus(-d) + log_g(h_pre)
