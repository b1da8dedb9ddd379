"""The Cell protocol shared by every rnnjax cell, and its capabilities.

A cell is a frozen, hashable dataclass holding static configuration only. It has
three methods, all pure:

- ``init(key, input_size, dtype=jnp.float32) -> params``: a NamedTuple of arrays.
- ``init_carry(batch_shape=(), dtype=jnp.float32) -> carry``: zeros by default.
  Every leaf of the carry has shape ``(*batch_shape, features)``; for ConvLSTM the
  ``batch_shape`` includes the frame's ``(H, W)``.
- ``step(params, carry, x) -> (carry, y)``: one time step. ``x`` has shape
  ``(*batch, input_size)`` and ``y`` has shape ``(*batch, cell.output_size(input_size))``;
  for ConvLSTM ``x`` is ``(*batch, H, W, C)`` and ``y`` is ``(*batch, H, W, hidden_size)``.

Because a carry's leading shape is always the step input's shape without its last
axis, a driver can build the carry of any cell from the input alone
(:func:`carry_batch_shape`). Cells whose recurrence is linear in the carry,
``h_t = a_t * h_{t-1} + b_t``, also subclass :class:`LinearCell` so parallel-in-time
drivers can evaluate them; those linear up to a clip (:class:`ClippedLinearCell`) too.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, TypeVar

import jax
import jax.numpy as jnp

# Re-exported: cells and user code import these checks from here.
from rnnjax.checks import check_float_input, check_positive_int  # noqa: F401
from rnnjax.ops import matmul

Array = jax.Array
PyTree = Any
_T = TypeVar("_T")

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # Python 3.10: the marker only informs type checkers, so a no-op will do.

    def dataclass_transform(**kwargs: Any) -> Callable[[_T], _T]:
        return lambda decorator: decorator


def carry_batch_shape(x_step_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Leading shape of every carry leaf for a step input of shape ``x_step_shape``."""
    return tuple(x_step_shape[:-1])


def compute_dtype(x: Array, params: PyTree) -> jnp.dtype:
    """The dtype a step (and a whole recurrence) computes in: ``x``'s promoted with the
    parameters' floating leaves."""
    leaves = [p for p in jax.tree_util.tree_leaves(params) if jnp.issubdtype(jnp.result_type(p), jnp.inexact)]
    return jnp.result_type(x, *leaves)


class Cell(abc.ABC):
    """Protocol of a recurrent cell. Subclasses are ``@dataclasses.dataclass(frozen=True)``.

    Attributes:
      input_ndim: number of trailing axes of one step's input that are features
        (1 for vector cells, 3 for ConvLSTM's ``(H, W, C)``). The time axis of a
        sequence sits just before them.
    """

    input_ndim: ClassVar[int] = 1
    params_type: ClassVar[type[Any] | None] = None  # the NamedTuple class ``init`` returns

    @abc.abstractmethod
    def init(self, key: Array, input_size: int, dtype: Any = jnp.float32) -> NamedTuple:
        """Initialise the parameters for inputs with ``input_size`` features."""

    @abc.abstractmethod
    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> PyTree:
        """The initial carry: zeros of shape ``(*batch_shape, features)``."""

    @abc.abstractmethod
    def step(self, params: NamedTuple, carry: PyTree, x: Array) -> tuple[PyTree, Array]:
        """One time step: ``(params, carry, x) -> (carry, y)``."""

    @abc.abstractmethod
    def output_size(self, input_size: int) -> int:
        """Features of ``y`` for inputs with ``input_size`` features."""

    def fixed_input_size(self) -> int | None:
        """The only input size this configuration takes, or ``None`` (any). A field fixes it
        when the carry holds inputs (``rj.RWKV7``'s token shift) or the cell maps a width to
        itself (``rj.RGLRU``); wrappers read it to build the parameter tree without an input."""
        return None

    @abc.abstractmethod
    def input_size(self, params: NamedTuple) -> int:
        """Features of ``x`` that ``params`` were initialised for."""

    # -- checks shared by every cell ------------------------------------------------

    def carry_for(self, x_step: Array | jax.ShapeDtypeStruct, dtype: Any = None) -> PyTree:
        """The zero carry matching a step input ``x_step`` (any leading batch shape)."""
        return self.init_carry(carry_batch_shape(x_step.shape), dtype or jnp.float32)

    def check_input(self, params: NamedTuple, x: Array, name: str = "x") -> None:
        """Raise if ``x`` is not a float array of shape ``(..., input_size)``."""
        check_float_input(x, name)
        expected = self.input_size(params)
        if x.ndim < self.input_ndim or x.shape[-1] != expected:
            lead = "(..., H, W, " if self.input_ndim == 3 else "(..., "
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; expected {lead}{expected}) for "
                f"input_size={expected} of {type(self).__name__}"
            )

    def check_carry(self, carry: PyTree, x_step: Array | jax.ShapeDtypeStruct, name: str = "carry") -> None:
        """Raise if ``carry`` does not have the structure and shapes of this cell's carry."""
        expected = jax.eval_shape(lambda: self.carry_for(x_step))
        exp_def = jax.tree_util.tree_structure(expected)
        got_def = jax.tree_util.tree_structure(carry)
        if exp_def != got_def:  # type: ignore[operator]  # jax's PyTreeDef is opaque to mypy
            raise ValueError(
                f"{name} has structure {got_def}; expected {exp_def} for {type(self).__name__} "
                f"(build it with cell.init_carry(batch_shape))"
            )
        for got, exp in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(expected)):
            if not jnp.issubdtype(jnp.result_type(got), jnp.inexact):
                # An integer carry would truncate the state at every step.
                raise TypeError(
                    f"{name} has a leaf of dtype {jnp.result_type(got)}; expected a floating dtype "
                    f"such as {exp.dtype} for {type(self).__name__} (build it with cell.init_carry(batch_shape))"
                )
            if jnp.issubdtype(exp.dtype, jnp.complexfloating) and not jnp.issubdtype(
                jnp.result_type(got), jnp.complexfloating
            ):
                raise TypeError(
                    f"{name} has a leaf of dtype {jnp.result_type(got)}; expected a complex dtype for "
                    f"{type(self).__name__} (build it with cell.init_carry(batch_shape))"
                )
            if tuple(jnp.shape(got)) != tuple(exp.shape):
                raise ValueError(
                    f"{name} has a leaf of shape {tuple(jnp.shape(got))}; expected {tuple(exp.shape)} "
                    f"for inputs of shape {tuple(x_step.shape)} "
                    f"(build it with cell.init_carry({carry_batch_shape(x_step.shape)}))"
                )

    def check_params(self, params: NamedTuple, expected_type: type[Any] | None = None) -> None:
        """Raise if ``params`` is not an ``expected_type`` (default ``params_type``) with
        the shapes ``init`` gives."""
        expected_type = expected_type or self.params_type
        if expected_type is None:
            raise TypeError(f"{type(self).__name__} has no params_type; pass expected_type to check_params")
        if not isinstance(params, expected_type):
            raise TypeError(
                f"params is a {type(params).__name__}; expected {expected_type.__name__} "
                f"(from {type(self).__name__}.init)"
            )
        expected = _param_shapes(self, self.input_size(params))
        for field, got, exp in zip(expected_type._fields, params, expected):
            if got is not None and not jnp.issubdtype(jnp.result_type(got), jnp.inexact):
                raise TypeError(
                    f"params.{field} has dtype {jnp.result_type(got)}; expected a floating dtype such "
                    f"as {exp.dtype} (from {type(self).__name__}.init)"
                )
            got_shape = None if got is None else tuple(jnp.shape(got))
            exp_shape = None if exp is None else tuple(exp.shape)
            if got_shape != exp_shape:
                raise ValueError(
                    f"params.{field} has shape {got_shape}; expected {exp_shape} for {self!r} "
                    f"with input_size={self.input_size(params)}"
                )


class HiddenStateCell(Cell):
    """A cell whose carry is a single array ``h`` of shape ``(*batch, hidden_size)`` that is
    also its output, and whose params' first field is the input kernel ``(input_size, ...)``.
    Subclasses have a ``hidden_size`` field."""

    hidden_size: int

    def init_carry(self, batch_shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> Array:
        return jnp.zeros((*batch_shape, self.hidden_size), dtype)

    def output_size(self, input_size: int) -> int:
        return self.hidden_size

    def input_size(self, params: NamedTuple) -> int:
        return params[0].shape[0]


@functools.lru_cache(maxsize=256)
def _param_shapes(cell: Cell, input_size: int) -> NamedTuple:
    return jax.eval_shape(lambda: cell.init(jax.random.key(0), input_size))


class LinearCell(Cell):
    """A cell whose carry follows the diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t``.

    ``a_t`` and ``b_t`` depend on the input ``x_t`` only, so a parallel driver can compute
    them for all steps at once and combine them with an associative scan. The carry is
    the array ``h`` itself and the output is ``readout(params, h_t, x_t)``.
    """

    @abc.abstractmethod
    def coefficients(self, params: NamedTuple, x: Array) -> tuple[Array, Array]:
        """``(a_t, b_t)`` for inputs ``x`` of shape ``(*batch, input_size)``; each ``(*batch, N)``."""

    @property
    def log_space(self) -> bool:
        """Whether this configuration provides ``log_coefficients(params, x) -> (log a_t,
        log b_t)`` (positive ``a_t`` and ``b_t``), which parallel methods then compose in
        log space. True when the cell defines ``log_coefficients``; MinGRU and MinLSTM say
        so only for ``candidate="g"``."""
        return callable(getattr(self, "log_coefficients", None))

    def readout(self, params: NamedTuple, h: Array, x: Array) -> Array:
        """The output ``y_t`` from the new state ``h_t`` and the input ``x_t``."""
        del params, x
        return h

    def step(self, params: NamedTuple, carry: Array, x: Array) -> tuple[Array, Array]:
        self.check_params(params)
        self.check_input(params, x)
        a, b = self.coefficients(params, x)
        h = a * carry + b
        return h, self.readout(params, h, x)


class ClippedLinearCell(Cell):
    r"""Capability: for some configurations the carry follows an elementwise recurrence that
    is linear up to a clip,

    .. math::

        h_t = \min(\max(a_t \odot h_{t-1} + b_t,\ lo),\ hi),

    with :math:`(a_t, b_t)` depending on :math:`x_t` only (``rj.IndRNN`` with a ``"relu"``,
    ``"relu6"``, ``"hard_tanh"`` or identity activation). Maps
    :math:`h \mapsto \mathrm{clip}(a h + b, lo, hi)` are closed under composition, so
    ``rj.Associative()`` and ``rj.Chunked()`` give the states exactly, in parallel, with no
    Newton iterations (:mod:`rnnjax.engines.clipped`); derivatives come from the cell's own
    ``step`` at those states. The carry is the array ``h`` itself.
    """

    @property
    @abc.abstractmethod
    def clip_range(self) -> tuple[float, float] | None:
        """``(lo, hi)`` (``-inf``/``inf`` where unbounded) when this configuration's step is the
        clipped recurrence above, else ``None`` (then only the methods for any cell run it)."""

    @abc.abstractmethod
    def clipped_coefficients(self, params: NamedTuple, x: Array) -> tuple[Array, Array]:
        """``(a_t, b_t)`` for inputs ``x`` of shape ``(*batch, input_size)``; each ``(*batch, N)``
        or broadcastable to it."""


def runs_associatively(cell: Cell) -> bool:
    """Whether ``rj.Associative()`` and ``rj.Chunked()`` can run ``cell``: a :class:`LinearCell`,
    or a :class:`ClippedLinearCell` whose configuration has a ``clip_range``."""
    return isinstance(cell, LinearCell) or (isinstance(cell, ClippedLinearCell) and cell.clip_range is not None)


JACOBIAN_KINDS = ("exact", "unit-diagonal")


class StructuredJacobian(Cell):
    r"""Capability: the cell gives the per-unit blocks of its state Jacobian cheaply.

    Every leaf of the carry has shape ``(*batch, U)`` (``U`` units), and unit ``u``'s state is
    the ``L`` numbers ``leaf_0[u], ..., leaf_{L-1}[u]`` (``L`` carry leaves). Its block is the
    ``L x L`` matrix

    .. math::

        B_t[u]_{lm} = \partial\, \mathrm{leaf}_l[u]_t \,/\, \partial\, \mathrm{leaf}_m[u]_{t-1}.

    :attr:`jacobian_kind` says what the blocks are:

    - ``"exact"``: each unit's state depends on the previous step only through that unit's
      own state, so the blocks *are* the Jacobian (``rj.ParaGRU``, ``rj.ParaLSTM``,
      ``rj.IndRNN``). Newton's method with them is exact Newton (DEER) at the cost of
      quasi-DEER: one elementwise (``L = 1``) or ``L x L``-block associative scan.
    - ``"unit-diagonal"``: the blocks are the unit-diagonal part of a denser Jacobian (dense
      cells mix units through ``W_h``); ``rj.Newton("quasi-deer")`` uses their diagonal
      instead of a full ``jax.jacfwd``.
    - ``None``: this configuration has no such structure (e.g. ``rj.LSTM(proj_size=...)``).

    The default :meth:`step_with_jacobian` is one ``jax.linearize`` of ``step`` applied to the
    ``L`` tangents "ones on leaf ``m``": exact whenever ``jacobian_kind == "exact"``.
    """

    @property
    def jacobian_kind(self) -> str | None:
        return "exact"

    def step_with_jacobian(self, params: NamedTuple, carry: PyTree, x: Array) -> tuple[tuple[PyTree, Array], Array]:
        """``((new_carry, y), blocks)``: :meth:`step` and the unit blocks, ``blocks`` of shape
        ``(*batch, U, L, L)``."""
        leaves, treedef = jax.tree_util.tree_flatten(carry)

        def step(leaves):
            new, y = self.step(params, jax.tree_util.tree_unflatten(treedef, leaves), x)
            return jax.tree_util.tree_leaves(new), y

        (new, y), tangent = jax.linearize(step, leaves)
        blocks = _blocks_from_tangents(tangent, leaves)
        return (jax.tree_util.tree_unflatten(treedef, new), y), blocks


def _blocks_from_tangents(tangent: Callable[..., Any], leaves: list[Array]) -> Array:
    """``(*batch, U, L, L)`` from a linear map of ``L`` carry leaves (to new leaves, y) whose
    Jacobian is unit-local: column ``m`` is its image of "ones on leaf ``m``"."""
    columns = []
    for m in range(len(leaves)):
        basis = [jnp.full_like(leaf, 1.0 if i == m else 0.0) for i, leaf in enumerate(leaves)]
        new_tangents = tangent(basis)[0]
        columns.append(jnp.stack(new_tangents, axis=-1))  # (*batch, U, L): d new_l / d leaf_m
    return jnp.stack(columns, axis=-1)


def unit_width(cell: Cell) -> int | None:
    """``U`` when every leaf of ``cell``'s carry is real with one feature axis of the same width
    ``U``; else ``None``."""
    leaves = jax.tree_util.tree_leaves(jax.eval_shape(lambda: cell.init_carry(())))
    widths = {leaf.shape for leaf in leaves}
    if len(widths) != 1 or any(jnp.issubdtype(leaf.dtype, jnp.complexfloating) for leaf in leaves):
        return None
    (shape,) = widths
    return shape[0] if len(shape) == 1 else None


class DenseCell(StructuredJacobian):
    r"""A cell whose step is a function of two matrix products of its parameters
    ``w_x`` and ``w_h``:

    .. math::

        (c_t, y_t) = \mathrm{update}(\theta, c_{t-1}, x_t W_x, h_{t-1} W_h),
        \qquad h_{t-1} = \mathrm{recurrent\_input}(c_{t-1}),

    with ``update`` using no other product of ``w_x`` or ``w_h``. That lets ``rj.Sequential()``
    (:mod:`rnnjax.engines.fused`, ``gradient="auto"`` or ``"fused"``) form the derivatives of
    ``w_x``, ``w_h`` and the inputs as single products over all steps. Elman, LSTM and GRU
    (``reset_after=True``) are dense cells; ``fusable`` says whether a configuration is.
    """

    @property
    def fusable(self) -> bool:
        return True

    def summed_columns(self, width: int) -> int:
        """How many leading columns of the ``width``-column products ``update`` reads only
        through their sum ``zx + zh``: all for Elman and LSTM, the reset and update gates'
        ``2 * hidden_size`` for GRU (its candidate scales ``zh`` by the reset gate), 0 by
        default. The fused gradient keeps those columns once per pass instead of twice. A
        subclass must give the same result when those columns arrive summed in ``zx`` and
        zeroed in ``zh``."""
        return 0

    def recurrent_input(self, carry: PyTree) -> Array:
        """The array multiplied by ``w_h``: the carry itself unless a subclass says otherwise."""
        return carry

    @property
    def jacobian_kind(self) -> str | None:
        """``"unit-diagonal"`` when the carry's leaves and the recurrent input all have the
        same width ``U`` (so ``w_h``'s columns are gate blocks of ``U`` units), else ``None``."""
        width = unit_width(self)
        if width is None or not self.fusable:  # not fusable: step does not go through update
            return None
        recurrent = jax.eval_shape(lambda: self.recurrent_input(self.init_carry(())))
        return "unit-diagonal" if tuple(recurrent.shape) == (width,) else None

    def step_with_jacobian(self, params: NamedTuple, carry: PyTree, x: Array) -> tuple[tuple[PyTree, Array], Array]:
        """The unit blocks of the Jacobian through ``update``: unit ``u`` reaches its own
        columns ``u, U + u, 2U + u, ...`` of ``zh`` through ``w_h[u, k]`` (gate-major columns,
        as every built-in dense cell lays them out); the other units' paths are left out."""
        if self.jacobian_kind is None:
            raise ValueError(
                f"{self!r} has no unit structure in its Jacobian (its carry leaves and recurrent input "
                "differ in width); use rj.Newton('deer') or a cell without a projection"
            )
        self.check_params(params)
        self.check_input(params, x)
        w_h = params.w_h  # type: ignore[attr-defined]
        zx = matmul(x, params.w_x)  # type: ignore[attr-defined]
        units = w_h.shape[0]
        # w_h[k mod U, k]: the weight from unit (k mod U)'s recurrent input to column k.
        own = w_h[jnp.arange(w_h.shape[1]) % units, jnp.arange(w_h.shape[1])]
        leaves, treedef = jax.tree_util.tree_flatten(carry)

        def step(leaves):
            c = jax.tree_util.tree_unflatten(treedef, leaves)
            r = self.recurrent_input(c)
            fixed = jax.lax.stop_gradient(r)
            # Value r @ w_h (the added term is zero); tangent only through each unit's own columns.
            zh = matmul(fixed, w_h) + jnp.tile(r - fixed, w_h.shape[1] // units) * own
            new, y = self.update(params, c, zx, zh)
            return jax.tree_util.tree_leaves(new), y

        (new, y), tangent = jax.linearize(step, leaves)
        blocks = _blocks_from_tangents(tangent, leaves)
        return (jax.tree_util.tree_unflatten(treedef, new), y), blocks

    @abc.abstractmethod
    def update(self, params: NamedTuple, carry: PyTree, zx: Array, zh: Array) -> tuple[PyTree, Array]:
        """The step from ``zx = x @ w_x`` and ``zh = recurrent_input(carry) @ w_h`` (no biases
        added); must not read ``params.w_x`` or ``params.w_h`` (they are ``None`` there)."""

    def step(self, params: NamedTuple, carry: PyTree, x: Array) -> tuple[PyTree, Array]:
        self.check_params(params)
        self.check_input(params, x)
        # A DenseCell's params_type has w_x and w_h (the NamedTuple annotation cannot say so).
        zx = matmul(x, params.w_x)  # type: ignore[attr-defined]
        zh = matmul(self.recurrent_input(carry), params.w_h)  # type: ignore[attr-defined]
        return self.update(params, carry, zx, zh)


@dataclass_transform(frozen_default=True)  # type checkers see the fields and __init__
def frozen(cls: type[_T]) -> type[_T]:
    """Decorator: a frozen, hashable dataclass whose config is checked in ``__post_init__``."""
    return dataclasses.dataclass(frozen=True)(cls)
