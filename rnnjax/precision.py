"""Mixed precision: a cell computed in a narrow dtype, its carry kept in a wider one."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import Cell, PyTree, check_float_input, frozen

#: The dtypes ``compute_dtype``, ``carry_dtype`` and ``output_dtype`` may name.
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


def _float_dtype(value: Any, name: str) -> jnp.dtype:
    try:
        dtype = jnp.dtype(value)
    except (TypeError, ValueError):
        dtype = None
    if value is None or isinstance(value, bool) or dtype is None or dtype.name not in FLOAT_DTYPES:
        raise ValueError(
            f"{name}={value!r} is not a supported floating dtype; expected one of {list(FLOAT_DTYPES)} "
            f"(e.g. jnp.bfloat16)"
        )
    return dtype


def _complex_of(dtype: Any) -> jnp.dtype:
    """The complex dtype whose parts hold ``dtype``: complex64, complex128 for float64.
    XLA has no complex bfloat16 or float16."""
    return jnp.result_type(dtype, jnp.complex64)


def cast_floating(tree: PyTree, dtype: Any) -> PyTree:
    """Cast the real floating leaves of ``tree`` to ``dtype`` and its complex leaves to
    :func:`_complex_of` ``(dtype)``; integer, boolean and ``None`` leaves are kept."""

    def cast(leaf):
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            return leaf.astype(_complex_of(dtype))
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(dtype)
        return leaf

    return jax.tree.map(cast, tree)


def _more_precise(wide: jnp.dtype, narrow: jnp.dtype) -> bool:
    """Whether ``wide`` has more significand bits than ``narrow`` (complex: per part)."""
    return jnp.finfo(wide).nmant > jnp.finfo(narrow).nmant


@frozen
class Mixed(Cell):
    r"""Run ``cell`` in ``compute_dtype`` while its parameters keep their own dtype and its
    carry is stored in ``carry_dtype``.

    With :math:`\rho_c` the cast to ``compute_dtype``, :math:`F_c` the wrapped cell's step
    evaluated on ``compute_dtype`` operands, :math:`\theta` the parameters (in whatever
    dtype ``init`` gave them, float32 by default) and :math:`h_t` the carry, stored in
    ``carry_dtype``:

    .. math::

        (\tilde h_{t+1}, y_t) &= F_c(\rho_c(\theta), \rho_c(h_t), \rho_c(x_t)) \\
        h_{t+1} &= h_t + (\tilde h_{t+1} - \rho_c(h_t))
            \quad \text{(``accumulate=True``; the difference in ``carry_dtype``)} \\
        h_{t+1} &= \tilde h_{t+1} \quad \text{(``accumulate=False``; cast to ``carry_dtype``)}

    and ``y_t`` is returned in ``output_dtype`` (default: ``compute_dtype``, what the step
    produced; ask for ``jnp.float32`` to get float32 outputs).

    - Casts touch real floating leaves only. Integer and boolean leaves are left alone.
      Complex leaves (the :class:`rnnjax.LRU` state) go to the complex dtype whose parts
      hold ``compute_dtype`` -- complex64 for bfloat16, float16 and float32, complex128
      for float64 -- because XLA has no complex bfloat16 or float16; an LRU under
      ``Mixed(bfloat16)`` therefore rounds its real parameters and inputs to bfloat16 and
      keeps its complex state arithmetic in complex64.
    - The accumulation applies to a carry leaf only when its stored dtype has more
      significand bits than the dtype it is computed in; otherwise (``compute_dtype ==
      carry_dtype``, complex64 leaves) ``h_{t+1}`` is the step's own result, so
      ``Mixed(cell, jnp.float32, jnp.float32)`` computes exactly what ``cell`` computes.
    - Gradients reach the parameters in their own dtype: the casts are inside the step, so
      ``jax.grad`` with respect to float32 parameters is float32 and is summed over the
      time steps in float32.
    - ``dtype`` arguments of ``init_carry`` (which :func:`rnnjax.scan` passes) are ignored:
      the carry is always ``carry_dtype``, and the final carry :func:`rnnjax.scan` returns
      is ``carry_dtype`` too.

    What ``accumulate`` can and cannot do: :math:`\tilde h_{t+1}` comes out of the step
    rounded to ``compute_dtype``, so an increment below that dtype's resolution is lost
    inside the step either way. If every result is rounded and the carry starts
    representable in ``compute_dtype`` (zeros), the two updates are the same numbers:
    :math:`\rho_c(h_t) = h_t` at every step and :math:`h_t + (\tilde h_{t+1} - h_t) =
    \tilde h_{t+1}` (float32 forms that difference and sum of two bfloat16 or float16
    numbers exactly). They differ where XLA keeps a step's result in more precision than
    ``compute_dtype`` (``--xla_allow_excess_precision``, on by default; XLA:CPU does so for
    bfloat16): then accumulating keeps the carry's low bits, and the error a step adds is
    :math:`(J - I)\,\delta` instead of :math:`J\,\delta` for the rounding
    :math:`\delta = \rho_c(h_t) - h_t` and the step's Jacobian :math:`J` -- smaller for
    slowly changing states (:math:`J \approx I`), larger for fast ones (:math:`J \approx
    0`). ``benchmarks/precision_drift.py`` (T = 10 000, CPU, bfloat16, 3 seeds) measured
    the mean output error with ``accumulate`` at 0.98-0.995 times the plain update's for
    LSTM, GRU, MGU, minGRU, minLSTM and ConvLSTM, 1.04 times for Elman, equal for IndRNN
    and LRU; float16 runs were identical. A small but consistent gain: the default is
    ``accumulate=True``.

    ``Mixed`` is a cell like any other: :func:`rnnjax.scan` (``method="sequential"`` or
    ``"newton"``, every ``remat``/``unroll``), :class:`rnnjax.RNN`,
    :class:`rnnjax.Bidirectional`, :class:`rnnjax.Stack`, ``jit``, ``vmap`` and ``grad``
    take it. It is not an :class:`rnnjax.LinearCell`, so ``method="associative"`` and
    ``"chunked"`` reject it even around a linear cell (they would not see its rounding).
    With ``method="newton"`` give a ``tol`` the compute dtype can meet (about ``1e-2`` for
    bfloat16): the default follows the float32 carry, which a bfloat16 step cannot reach,
    so Newton would run ``max_iters`` iterations and fall back to the sequential loop.

    Args:
      cell: the rnnjax cell to run.
      compute_dtype: dtype of the step's arithmetic: ``bfloat16`` (default), ``float16``,
        ``float32`` or ``float64``.
      carry_dtype: dtype the carry is stored and accumulated in (default ``float32``).
      output_dtype: dtype of ``y``; ``None`` (default) for ``compute_dtype``.
      accumulate: add the step's increment to the stored carry (default) rather than
        replacing the carry by the step's rounded result.

    Raises:
      ValueError: a dtype that is not one of ``bfloat16``, ``float16``, ``float32``,
        ``float64``.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.Mixed(rj.LSTM(8), compute_dtype=jnp.bfloat16)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> params.w_x.dtype
      dtype('float32')
      >>> ys, (h, c) = rj.scan(cell, params, jnp.ones((2, 5, 3)))
      >>> ys.dtype, h.dtype, c.dtype
      (dtype(bfloat16), dtype('float32'), dtype('float32'))
      >>> grads = jax.grad(lambda p: rj.scan(cell, p, jnp.ones((5, 3)))[0].astype(jnp.float32).sum())(params)
      >>> grads.w_h.dtype
      dtype('float32')
    """

    cell: Cell
    compute_dtype: Any = jnp.bfloat16
    carry_dtype: Any = jnp.float32
    output_dtype: Any = None
    accumulate: bool = True

    def __post_init__(self):
        if not isinstance(self.cell, Cell):
            raise TypeError(f"Mixed expects an rnnjax cell (e.g. rj.LSTM(64)), got {self.cell!r}")
        # Normalised so that Mixed(cell, "bfloat16") == Mixed(cell, jnp.bfloat16) (one jit cache entry).
        object.__setattr__(self, "compute_dtype", _float_dtype(self.compute_dtype, "compute_dtype"))
        object.__setattr__(self, "carry_dtype", _float_dtype(self.carry_dtype, "carry_dtype"))
        if self.output_dtype is not None:
            object.__setattr__(self, "output_dtype", _float_dtype(self.output_dtype, "output_dtype"))
        if not isinstance(self.accumulate, bool):
            raise TypeError(f"accumulate must be True or False, got {self.accumulate!r}")

    # The wrapped cell's class attributes, per instance.
    @property
    def input_ndim(self) -> int:  # type: ignore[override]
        return self.cell.input_ndim

    @property
    def params_type(self) -> type | None:  # type: ignore[override]
        return self.cell.params_type

    def init(self, key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> NamedTuple:
        """The wrapped cell's parameters, in ``dtype`` (they stay in it; steps cast them)."""
        return self.cell.init(key, input_size, dtype)

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = None) -> PyTree:
        """The wrapped cell's zero carry in ``carry_dtype``; ``dtype`` is ignored."""
        del dtype
        return self.cell.init_carry(batch_shape, self.carry_dtype)

    def output_size(self, input_size: int) -> int:
        return self.cell.output_size(input_size)

    def input_size(self, params: NamedTuple) -> int:
        return self.cell.input_size(params)

    def check_params(self, params: NamedTuple, expected_type: type | None = None) -> None:
        self.cell.check_params(params, expected_type)

    def step(self, params: NamedTuple, carry: PyTree, x: jax.Array) -> tuple[PyTree, jax.Array]:
        check_float_input(x)
        compute = self.compute_dtype
        stored = cast_floating(carry, self.carry_dtype)
        rounded = cast_floating(stored, compute)
        new, y = self.cell.step(cast_floating(params, compute), rounded, jnp.asarray(x).astype(compute))

        def update(s, r, n):
            if self.accumulate and _more_precise(s.dtype, r.dtype):
                # Add the step's increment to the stored carry instead of replacing it: the
                # low bits of h_t that rho_c dropped for the step's arithmetic stay in the
                # carry. (Only where n carries more than compute_dtype's bits, i.e. where
                # XLA kept excess precision; otherwise this equals n, see the docstring.)
                return s + (n.astype(s.dtype) - r.astype(s.dtype))
            return n.astype(s.dtype)

        new = jax.tree.map(update, stored, rounded, new)
        return new, y.astype(compute if self.output_dtype is None else self.output_dtype)
