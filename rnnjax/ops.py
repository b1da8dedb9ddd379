"""The numerical pieces cells are built from: activations by name, initializers, and the
products with weights (autocast to 16-bit weights)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Activation = str | Callable[[Array], Array]


def _hard_sigmoid(x: Array) -> Array:
    # Keras 3 definition: relu6(x + 3) / 6.
    return jax.nn.relu6(x + 3.0) / 6.0


def _gelu_exact(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def _mish(x: Array) -> Array:
    return x * jnp.tanh(jax.nn.softplus(x))


def _identity(x: Array) -> Array:
    return x


# Names follow Keras 3 and PyTorch: "gelu" is the exact (erf) form, "gelu_tanh" the approximation.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "hard_sigmoid": _hard_sigmoid,
    "hard_tanh": jax.nn.hard_tanh,
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "gelu": _gelu_exact,
    "gelu_tanh": jax.nn.gelu,
    "silu": jax.nn.silu,
    "hard_silu": jax.nn.hard_silu,
    "mish": _mish,
    "relu6": jax.nn.relu6,
    "softplus": jax.nn.softplus,
    "softsign": jax.nn.soft_sign,
    "exponential": jnp.exp,
    "linear": _identity,
    "identity": _identity,
}


# The activations that are a clip, f(x) = min(max(x, lo), hi): a cell whose step applies one to
# an affine function of its state can be evaluated by an associative scan
# (rnnjax.cell.ClippedLinearCell).
CLIP_RANGES: dict[Callable[[Array], Array], tuple[float, float]] = {
    jax.nn.relu: (0.0, float("inf")),
    jax.nn.relu6: (0.0, 6.0),
    jax.nn.hard_tanh: (-1.0, 1.0),
    _identity: (float("-inf"), float("inf")),
}


def clip_range(activation: Activation) -> tuple[float, float] | None:
    """``(lo, hi)`` when ``activation`` (a name or a callable) is ``x -> min(max(x, lo), hi)``:
    ``"relu"``, ``"relu6"``, ``"hard_tanh"``, ``"identity"``/``"linear"`` and their functions;
    else ``None``.

    Example:
      >>> from rnnjax.ops import clip_range
      >>> clip_range("relu"), clip_range("tanh")
      ((0.0, inf), None)
    """
    return CLIP_RANGES.get(resolve_activation(activation))


def resolve_activation(activation: Activation, name: str = "activation") -> Callable[[Array], Array]:
    """Return the function for an activation given by name or as a callable."""
    if callable(activation):
        return activation
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return ACTIVATIONS[activation]
    raise ValueError(f"unknown {name} {activation!r}; expected a callable or one of {sorted(ACTIVATIONS)}")


# -- initializers ------------------------------------------------------------------------

Initializer = Callable[..., Array]


def stacked_init(init: Initializer, key: Array, rows: int, hidden: int, gates: int, dtype: Any) -> Array:
    """``gates`` blocks of shape ``(rows, hidden)`` drawn independently and concatenated on
    the last axis, so that e.g. an orthogonal initializer makes each gate's block orthogonal."""
    keys = jax.random.split(key, gates)
    return jnp.concatenate([init(k, (rows, hidden), dtype) for k in keys], axis=-1)


def _drawn_in_float32(init: Initializer, name: str) -> Initializer:
    """``init`` drawn in at least float32 and rounded to ``dtype``: the same key gives a
    bfloat16 or float16 init that is the float32 init rounded (and the orthogonal init
    works at all: XLA:CPU has no bfloat16/float16 QR). float32 and float64 draws are
    ``init``'s own, bit for bit."""

    def drawn(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float_) -> Array:
        work = jnp.promote_types(dtype, jnp.float32)
        return init(key, shape, work).astype(dtype)

    drawn.__name__ = drawn.__qualname__ = name
    return drawn


glorot_uniform = _drawn_in_float32(jax.nn.initializers.glorot_uniform(), "glorot_uniform")
orthogonal = _drawn_in_float32(jax.nn.initializers.orthogonal(), "orthogonal")
zeros = jax.nn.initializers.zeros


def conv_uniform(key: Array, shape: tuple[int, ...], width: int, dtype: Any = jnp.float32) -> Array:
    """``U(-1/sqrt(width), 1/sqrt(width))`` of ``shape``: PyTorch's default init of the weight
    and the bias of a depthwise ``Conv1d`` of ``width`` taps (its fan-in), drawn in at least
    float32 and rounded to ``dtype``."""
    bound = width**-0.5
    return jax.random.uniform(key, shape, jnp.promote_types(dtype, jnp.float32), -bound, bound).astype(dtype)


# -- products with weights: autocast to 16-bit weights ----------------------------------

_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _autocast_dtype(a: Array, w: Array) -> jnp.dtype | None:
    """``w``'s dtype when ``w`` is bfloat16/float16 and ``a`` a wider real float, else None."""
    a_dtype, w_dtype = jnp.result_type(a), jnp.result_type(w)
    if w_dtype in _HALF and jnp.issubdtype(a_dtype, jnp.floating) and a_dtype.itemsize > w_dtype.itemsize:
        return w_dtype
    return None


def matmul(a: Array, w: Array, precision: Any = None) -> Array:
    """``a @ w`` for activations ``a`` (input, carry) and weights ``w``, autocast to 16-bit
    weights: the product every cell's step uses.

    If ``w`` is bfloat16 or float16 and ``a`` a wider float (a float32 carry or input under
    ``rj.Mixed(carry_mode="keep")``, or 16-bit params with float32 inputs), ``a`` is rounded
    to ``w``'s dtype, the product runs on 16-bit operands (the speed point of 16-bit weights
    on accelerators) and accumulates and returns in float32
    (``preferred_element_type``): what follows, gates and the carry's update, is float32.
    (Measured by ``python -m benchmarks.lab.precision_drift --round-products``, see
    ``benchmarks/lab/DECISIONS.md``.)
    In every other case this is exactly ``a @ w``: float32, float64 and all-16-bit products
    are untouched. ``precision`` is ``jnp.matmul``'s (``None``: the backend's default)."""
    narrow = _autocast_dtype(a, w)
    if narrow is None:
        return jnp.matmul(a, w, precision=precision)
    return jnp.matmul(a.astype(narrow), w, precision=precision, preferred_element_type=jnp.float32)


def conv(a: Array, w: Array, dimension_numbers: tuple[str, str, str]) -> Array:
    """Stride-1 ``SAME`` convolution of ``a`` with kernel ``w``, autocast like :func:`matmul`
    (16-bit kernel, wider ``a``: 16-bit operands, float32 result); otherwise both operands
    are cast to their promoted dtype (``lax`` does not promote)."""
    narrow = _autocast_dtype(a, w)
    dtype = jnp.result_type(a, w) if narrow is None else narrow
    return jax.lax.conv_general_dilated(
        a.astype(dtype),
        w.astype(dtype),
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=dimension_numbers,
        preferred_element_type=None if narrow is None else jnp.float32,
    )


def rms_norm(x: Array, weight: Array | None, eps: float = 1e-6) -> Array:
    r"""Root-mean-square normalisation over the last axis, :math:`x / \sqrt{\mathrm{mean}(x^2) + \epsilon} \odot w`
    (per head when ``x`` is ``(..., heads, d)`` and ``weight`` is ``(d,)`` or ``(heads, d)``)."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    y = y.astype(x.dtype)
    return y if weight is None else y * weight


def causal_conv_step(window: Array, weight: Array, bias: Array | None = None) -> Array:
    """One step of a depthwise causal convolution: ``window`` ``(..., K, C)`` (oldest input
    first), ``weight`` ``(K, C)`` (``weight[-1]`` multiplies the newest input), ``bias`` ``(C,)``."""
    y = jnp.einsum("...kc,kc->...c", window, weight.astype(window.dtype))
    return y if bias is None else y + bias
