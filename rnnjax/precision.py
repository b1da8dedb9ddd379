"""Mixed precision: a cell's parameters and products in a narrow dtype, its carry kept in a wider one."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cell import Cell, PyTree, check_float_input, frozen

#: The dtypes ``compute_dtype``, ``carry_dtype`` and ``output_dtype`` may name.
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")

#: The values of ``Mixed(carry_mode=...)``.
CARRY_MODES = ("keep", "round")


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
    r"""Run ``cell`` with its parameters and matrix products in ``compute_dtype`` while its
    parameters keep their own dtype and its carry is stored -- and, by default, updated --
    in ``carry_dtype``.

    With :math:`\rho_c` the rounding to ``compute_dtype``, :math:`\theta` the parameters (in
    whatever dtype ``init`` gave them, float32 by default), :math:`h_t` the carry, stored in
    ``carry_dtype`` (float32 by default), and :math:`F` the wrapped cell's step:

    - ``carry_mode="keep"`` (default): the step gets :math:`\rho_c(\theta)` and the carry and
      input as they are,

      .. math::

          (h_{t+1}, y_t) = F(\rho_c(\theta), h_t, x_t),

      where every product of an activation :math:`a` (input, carry, gated carry) with a
      16-bit weight :math:`W` is :math:`\rho_c(a)\,W` on ``compute_dtype`` operands,
      accumulated and returned in float32 (:func:`rnnjax.ops.matmul`,
      :func:`rnnjax.ops.conv`: the speed point of 16-bit weights on accelerators), and
      everything elementwise -- gates, activations, the state update (LSTM
      :math:`c_t = f_t \odot c_{t-1} + i_t \odot g_t`, GRU :math:`(1 - z_t) \odot n_t + z_t
      \odot h_{t-1}`, minGRU's interpolation, IndRNN's :math:`u \odot h_{t-1}`) -- runs in
      float32 / ``carry_dtype`` by type promotion, on 16-bit parameters. A carry leaf the
      step returns in another dtype is cast to ``carry_dtype``.
    - ``carry_mode="round"``: the whole step in ``compute_dtype``, carry included:

      .. math::

          (\tilde h_{t+1}, y_t) &= F(\rho_c(\theta), \rho_c(h_t), \rho_c(x_t))
              \quad \text{(every operation in compute\_dtype)} \\
          h_{t+1} &= h_t + (\tilde h_{t+1} - \rho_c(h_t)) \quad \text{(in carry\_dtype)}

      The increment is added to the stored carry, but :math:`\tilde h_{t+1}` is already
      rounded to ``compute_dtype``: from a zero carry, :math:`\rho_c(h_t) = h_t` at every
      step and this is the 16-bit cell with its carry stored in float32 (up to the excess
      precision XLA may keep inside a fused step). Its elementwise work, and the
      activations the backward pass stores, are 16-bit.

    ``y_t`` is returned in ``output_dtype`` (default: ``compute_dtype``; ask for
    ``jnp.float32`` to get float32 outputs).

    ``"keep"`` is the default because it drifts less from float32 over long sequences (measured
    by ``python -m benchmarks.lab.precision_drift``, see ``benchmarks/lab/DECISIONS.md``). What
    remains is the rounding of the parameters and of the products' operands: about the unit
    roundoff of ``compute_dtype`` (bfloat16 3.9e-3, float16 4.9e-4) times a small factor, not
    growing with T for cells that contract.

    - Casts touch real floating leaves only. Integer and boolean leaves are left alone.
      Complex leaves (the :class:`rnnjax.LRU` state) go to the complex dtype whose parts
      hold ``compute_dtype`` -- complex64 for bfloat16, float16 and float32, complex128
      for float64 -- because XLA has no complex bfloat16 or float16; an LRU under
      ``Mixed(bfloat16)`` therefore rounds its real parameters to bfloat16 and keeps its
      complex state arithmetic in complex64 in both modes.
    - The autocast applies to bfloat16 and float16 weights (a product of two 16-bit
      operands, or of float32 and float64, is the plain promoted product), and only in cells
      whose products go through :func:`rnnjax.ops.matmul` / :func:`rnnjax.ops.conv`, as
      rnnjax's own do. In ``"keep"`` mode a cell of yours that writes ``h @ w`` computes that
      product in float32 instead (promotion), with the same numbers otherwise.
      ``Mixed(cell, jnp.float32, carry_dtype=jnp.float64)`` in ``"keep"`` mode computes the
      carry's products in float64 by promotion.
    - With ``compute_dtype == carry_dtype`` nothing is cast and nothing accumulated:
      ``Mixed(cell, jnp.float32, jnp.float32)`` computes exactly what ``cell`` computes, in
      either mode.
    - Gradients reach the parameters in their own dtype: the casts are inside the step, so
      ``jax.grad`` with respect to float32 parameters is float32 and is summed over the
      time steps in float32.
    - ``dtype`` arguments of ``init_carry`` (which :func:`rnnjax.scan` passes) are ignored:
      the carry is always ``carry_dtype``, and the final carry :func:`rnnjax.scan` returns
      is ``carry_dtype`` too.

    ``Mixed`` is a cell like any other: :func:`rnnjax.scan` (``rj.Sequential(...)`` with any
    ``remat``/``unroll``, or ``rj.Newton(...)``), :class:`rnnjax.RNN`,
    :class:`rnnjax.Bidirectional`, :class:`rnnjax.Stack`, ``jit``, ``vmap`` and ``grad``
    take it. It is not an :class:`rnnjax.LinearCell`, so ``rj.Associative()`` and
    ``rj.Chunked()`` reject it even around a linear cell (they would not see its rounding).
    With ``rj.Newton()`` give a ``tol`` the compute dtype can meet (about ``1e-2`` for
    bfloat16): the default follows the float32 carry, which a step on bfloat16 operands
    cannot reach, so Newton would run ``max_iters`` iterations and fall back to the
    sequential loop.

    Args:
      cell: the rnnjax cell to run.
      compute_dtype: dtype of the parameters and of the products' operands in the step
        (``"keep"``) or of all its arithmetic (``"round"``): ``bfloat16`` (default),
        ``float16``, ``float32`` or ``float64``.
      carry_dtype: dtype the carry is stored in (default ``float32``), and updated in with
        ``"keep"``.
      output_dtype: dtype of ``y``; ``None`` (default) for ``compute_dtype``.
      carry_mode: ``"keep"`` (default): the step sees the carry in ``carry_dtype``;
        ``"round"``: the carry is rounded to ``compute_dtype`` for the step and the
        increment added to it.

    Raises:
      ValueError: a dtype that is not one of ``bfloat16``, ``float16``, ``float32``,
        ``float64``; a ``carry_mode`` other than ``"keep"`` and ``"round"``.

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
    carry_mode: str = "keep"

    def __post_init__(self):
        if not isinstance(self.cell, Cell):
            raise TypeError(f"Mixed expects an rnnjax cell (e.g. rj.LSTM(64)), got {self.cell!r}")
        # Normalised so that Mixed(cell, "bfloat16") == Mixed(cell, jnp.bfloat16) (one jit cache entry).
        object.__setattr__(self, "compute_dtype", _float_dtype(self.compute_dtype, "compute_dtype"))
        object.__setattr__(self, "carry_dtype", _float_dtype(self.carry_dtype, "carry_dtype"))
        if self.output_dtype is not None:
            object.__setattr__(self, "output_dtype", _float_dtype(self.output_dtype, "output_dtype"))
        if not isinstance(self.carry_mode, str) or self.carry_mode not in CARRY_MODES:
            raise ValueError(f"carry_mode={self.carry_mode!r}; expected one of {list(CARRY_MODES)}")

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

    def fixed_input_size(self) -> int | None:
        return self.cell.fixed_input_size()

    def input_size(self, params: NamedTuple) -> int:
        return self.cell.input_size(params)

    def check_params(self, params: NamedTuple, expected_type: type | None = None) -> None:
        self.cell.check_params(params, expected_type)

    def step(self, params: NamedTuple, carry: PyTree, x: jax.Array) -> tuple[PyTree, jax.Array]:
        check_float_input(x)
        compute = self.compute_dtype
        stored = cast_floating(carry, self.carry_dtype)
        params = cast_floating(params, compute)
        if self.carry_mode == "keep":
            # x and the carry go in as they are: the cell's products round them to the 16-bit
            # weights (rnnjax.ops.matmul, conv) and return float32, and the elementwise update
            # promotes to carry_dtype. Leaves a cell returns in another dtype are cast back.
            new, y = self.cell.step(params, stored, x)
            new = jax.tree.map(lambda s, n: n.astype(s.dtype), stored, new)
        else:
            rounded = cast_floating(stored, compute)
            new, y = self.cell.step(params, rounded, jnp.asarray(x).astype(compute))

            def update(s, r, n):
                if _more_precise(s.dtype, r.dtype):
                    # Add the step's increment to the stored carry instead of replacing it: the
                    # low bits of h_t that rho_c dropped for the step's arithmetic stay in the
                    # carry. (Only where n carries more than compute_dtype's bits, i.e. where
                    # XLA kept excess precision; otherwise this equals n, see the docstring.)
                    return s + (n.astype(s.dtype) - r.astype(s.dtype))
                return n.astype(s.dtype)

            new = jax.tree.map(update, stored, rounded, new)
        return new, y.astype(compute if self.output_dtype is None else self.output_dtype)
