"""Linear recurrent unit (Orvieto et al. 2023): a stable complex diagonal recurrence."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import LinearCell, compute_dtype, frozen
from rnnjax.checks import check_finite_number, check_positive_int


class LRUParams(NamedTuple):
    nu_log: jax.Array  # (hidden,): log(-log|lambda|)
    theta_log: jax.Array  # (hidden,): log(arg lambda)
    gamma_log: jax.Array  # (hidden,): log of the input normalisation
    b_re: jax.Array  # (input_size, hidden): real part of B
    b_im: jax.Array  # (input_size, hidden): imaginary part of B
    c_re: jax.Array  # (hidden, input_size): real part of C
    c_im: jax.Array  # (hidden, input_size): imaginary part of C
    d: jax.Array  # (input_size,): skip connection


def complex_dtype(dtype: Any) -> jnp.dtype:
    """The complex dtype of a carry for real ``dtype``: complex64, or complex128 for float64."""
    return jnp.result_type(dtype, jnp.complex64)


@frozen
class LRU(LinearCell):
    r"""Linear recurrent unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural
    Networks for Long Sequences"), with its exponential parametrisation and
    normalisation.

    .. math::

        \lambda &= \exp(-\exp(\nu^{\log}) + i \exp(\theta^{\log})) \\
        h_t &= \lambda \odot h_{t-1} + \exp(\gamma^{\log}) \odot (x_t B) \\
        y_t &= \mathrm{Re}(h_t C) + D \odot x_t

    with complex ``B = b_re + i b_im`` of shape ``(input_size, hidden_size)`` and
    ``C = c_re + i c_im`` of shape ``(hidden_size, input_size)``, and a real skip ``D`` of
    shape ``(input_size,)``. As in the paper the output has as many features as the
    input (``output_size(input_size) == input_size``); ``hidden_size`` is the state size
    ``N``. The paper's block adds a nonlinearity (MLP/GLU) and normalisation around this
    cell; they are not part of it. Since :math:`|\lambda| < 1` the state stays bounded
    for bounded inputs.

    Initialisation (the paper's): :math:`|\lambda|` uniform on the ring
    ``r_min <= |lambda| <= r_max`` of the complex plane and its phase uniform in
    ``[0, max_phase)``; with :math:`u_1, u_2 \sim U(0, 1)`,
    :math:`\nu^{\log} = \log(-\tfrac12 \log(u_1 (r_{max}^2 - r_{min}^2) + r_{min}^2))`,
    :math:`\theta^{\log} = \log(\mathrm{max\_phase} \cdot u_2)`,
    :math:`\gamma^{\log} = \log \sqrt{1 - |\lambda|^2}`; ``b_re``, ``b_im`` normal with
    variance ``1 / (2 input_size)``; ``c_re``, ``c_im`` normal with variance
    ``1 / hidden_size``; ``d`` standard normal.

    Dtypes: the state is complex, complex64 for real parameters and inputs of up to 32
    bits (bfloat16 included) and complex128 for float64; the output is real, in the
    promoted dtype of ``x`` and the parameters.

    Args:
      hidden_size: ``N``, the size of the complex state.
      r_min: smallest initial ``|lambda|``, ``0 <= r_min < r_max``.
      r_max: largest initial ``|lambda|``, ``r_max <= 1``.
      max_phase: initial phases lie in ``[0, max_phase)``; ``max_phase > 0``.

    Carry: complex ``h`` of shape ``(*batch, hidden_size)``; ``init_carry(batch_shape,
    dtype)`` gives zeros of the complex dtype matching the real ``dtype``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.LRU(hidden_size=16, r_min=0.9, r_max=0.999)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> h, y = cell.step(params, cell.init_carry((2,)), jnp.ones((2, 3)))
      >>> h.shape, h.dtype, y.shape, y.dtype
      ((2, 16), dtype('complex64'), (2, 3), dtype('float32'))
      >>> r = jnp.abs(cell.eigenvalues(params))
      >>> bool((r >= 0.9).all() and (r <= 0.999).all())
      True
    """

    params_type = LRUParams

    hidden_size: int
    r_min: float = 0.0
    r_max: float = 1.0
    max_phase: float = 2 * math.pi

    def __post_init__(self):
        check_positive_int(self.hidden_size, "hidden_size")
        for name in ("r_min", "r_max", "max_phase"):
            check_finite_number(getattr(self, name), name)
        if not 0 <= self.r_min < self.r_max <= 1:
            raise ValueError(f"r_min={self.r_min!r} and r_max={self.r_max!r} must satisfy 0 <= r_min < r_max <= 1")
        if self.max_phase <= 0:
            raise ValueError(f"max_phase must be positive, got {self.max_phase!r}")

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> LRUParams:
        check_positive_int(input_size, "input_size")
        k1, k2, kb_re, kb_im, kc_re, kc_im, kd = jax.random.split(key, 7)
        n, d = self.hidden_size, input_size
        # U(0, 1): an exact 0 would give an infinite nu_log or theta_log.
        tiny = jnp.finfo(dtype).tiny
        u1 = jax.random.uniform(k1, (n,), dtype, minval=tiny)
        u2 = jax.random.uniform(k2, (n,), dtype, minval=tiny)
        r_min2 = self.r_min**2
        nu_log = jnp.log(-0.5 * jnp.log(u1 * (self.r_max**2 - r_min2) + r_min2))
        theta_log = jnp.log(self.max_phase * u2)
        # log sqrt(1 - |lambda|^2) with |lambda|^2 = exp(-2 exp(nu_log)), accurate near |lambda| = 1.
        gamma_log = 0.5 * jnp.log(-jnp.expm1(-2.0 * jnp.exp(nu_log)))
        b_scale = 1.0 / math.sqrt(2 * d)
        c_scale = 1.0 / math.sqrt(n)
        return LRUParams(
            nu_log=nu_log,
            theta_log=theta_log,
            gamma_log=gamma_log,
            b_re=jax.random.normal(kb_re, (d, n), dtype) * jnp.asarray(b_scale, dtype),
            b_im=jax.random.normal(kb_im, (d, n), dtype) * jnp.asarray(b_scale, dtype),
            c_re=jax.random.normal(kc_re, (n, d), dtype) * jnp.asarray(c_scale, dtype),
            c_im=jax.random.normal(kc_im, (n, d), dtype) * jnp.asarray(c_scale, dtype),
            d=jax.random.normal(kd, (d,), dtype),
        )

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> jax.Array:
        return jnp.zeros((*batch_shape, self.hidden_size), complex_dtype(dtype))

    def output_size(self, input_size: int) -> int:
        return input_size

    def input_size(self, params: LRUParams) -> int:
        return params.b_re.shape[0]

    def eigenvalues(self, params: LRUParams) -> jax.Array:
        """The complex diagonal ``lambda`` of the recurrence, shape ``(hidden_size,)``."""
        real = jnp.promote_types(compute_dtype(params.nu_log, params), jnp.float32)
        modulus = jnp.exp(-jnp.exp(params.nu_log.astype(real)))
        phase = jnp.exp(params.theta_log.astype(real))
        return jax.lax.complex(modulus * jnp.cos(phase), modulus * jnp.sin(phase))

    def coefficients(self, params: LRUParams, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Complex ``(a, b) = (lambda, exp(gamma_log) * (x B))``, each ``(*batch, hidden_size)``."""
        self.check_params(params)
        self.check_input(params, x)
        # Complex arithmetic needs float32 or float64 parts (there is no complex bfloat16).
        real = jnp.promote_types(compute_dtype(x, params), jnp.float32)
        x = x.astype(real)
        gamma = jnp.exp(params.gamma_log.astype(real))
        b = jax.lax.complex(
            (x @ params.b_re.astype(real)) * gamma,
            (x @ params.b_im.astype(real)) * gamma,
        )
        a = jnp.broadcast_to(self.eigenvalues(params).astype(b.dtype), b.shape)
        return a, b

    def readout(self, params: LRUParams, h: jax.Array, x: jax.Array) -> jax.Array:
        """``Re(h C) + d * x``, real, in the promoted dtype of ``x`` and the parameters."""
        out = compute_dtype(x, params)
        real = jnp.promote_types(out, jnp.float32)
        h_re, h_im = jnp.real(h).astype(real), jnp.imag(h).astype(real)
        y = h_re @ params.c_re.astype(real) - h_im @ params.c_im.astype(real)
        y = y + params.d.astype(real) * x.astype(real)
        return y.astype(out)
