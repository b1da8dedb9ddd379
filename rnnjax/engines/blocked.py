"""Evaluate a function with its wide arrays held as column blocks.

GPU kernel languages hold arrays in registers and cannot slice them: Pallas' Triton
backend has no ``slice`` of a value, splits only into a power of two of equal parts, and
needs every array's size to be a power of two. A dense cell's ``update`` slices its
products freely (GRU: the first ``2 * hidden`` columns are gates, the rest the candidate)
and its products can be ``3 * hidden`` wide. :func:`evaluate` runs such a function on
arrays whose last axis is a multiple of a block width ``w`` by keeping every array wider
than ``w`` on its last axis as a :class:`Blocks` of ``w``-wide parts: slices, splits,
concatenations and pads along that axis become selections of parts, elementwise operations
run part by part, reductions over it combine the parts. Everything else is bound as it is.
The kernel engine (:mod:`rnnjax.engines.kernel`) loads and stores the parts itself, so
the cell's own ``update`` (and its derivative) runs inside the kernel unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex

Array = jax.Array

# Parameters that name axes: a primitive carrying one is not elementwise.
_AXIS_PARAMS = ("axis", "axes", "dimension", "dimensions", "reverse", "dimension_numbers")
# Call-like primitives whose inner jaxpr is evaluated with blocks too.
_INNER_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


@jax.tree_util.register_pytree_node_class
class Blocks:
    """An array of shape ``(*lead, n * w)`` held as ``n`` arrays of shape ``(*lead, w)`` (a
    pytree of its parts, so it can be a loop's carry)."""

    def __init__(self, parts: Sequence[Array]):
        self.parts = tuple(parts)

    @property
    def width(self) -> int:
        return sum(p.shape[-1] for p in self.parts)

    def tree_flatten(self):
        return self.parts, None

    @classmethod
    def tree_unflatten(cls, aux, parts):
        return cls(parts)

    def join(self) -> Array:
        """The whole array (outside a kernel, or in tests)."""
        return jnp.concatenate(self.parts, axis=-1) if len(self.parts) > 1 else self.parts[0]


def split(a: Array, w: int) -> Blocks | Array:
    """``a`` as :class:`Blocks` of width ``w`` if its last axis is wider than ``w``."""
    if a.ndim == 0 or a.shape[-1] <= w:
        return a
    return Blocks([a[..., k : k + w] for k in range(0, a.shape[-1], w)])


def block_width(*widths: int) -> int:
    """The block width for products and carries of these widths: their greatest common divisor."""
    return math.gcd(*widths)


def evaluate(fn: Callable[..., Any], w: int, *args: Any) -> Any:
    """``fn(*args)`` where leaves of ``args`` may be :class:`Blocks` of width ``w``; returns
    ``fn``'s output pytree with every leaf wider than ``w`` on its last axis as ``Blocks``.

    Raises ``NotImplementedError`` naming the primitive when a blocked array meets an
    operation across its last axis that this module does not know (a matrix product
    contracting it, say)."""
    leaves, tree = jax.tree.flatten(args, is_leaf=lambda a: isinstance(a, Blocks))
    specs = [_spec(a) for a in leaves]
    closed, out_shape = jax.make_jaxpr(lambda *flat: fn(*jax.tree.unflatten(tree, flat)), return_shape=True)(*specs)
    leaves = [a if isinstance(a, Blocks) else split(jnp.asarray(a), w) for a in leaves]
    outs = _eval_jaxpr(closed.jaxpr, closed.consts, leaves, w)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def _spec(a: Any) -> jax.ShapeDtypeStruct:
    if isinstance(a, Blocks):
        p = a.parts[0]
        return jax.ShapeDtypeStruct((*p.shape[:-1], a.width), p.dtype)
    a = jnp.asarray(a)
    return jax.ShapeDtypeStruct(a.shape, a.dtype)


def _eval_jaxpr(jaxpr: jex.Jaxpr, consts: Sequence[Any], args: Sequence[Any], w: int) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jex.Literal) else env[v]

    for v, val in zip(jaxpr.constvars, consts):
        env[v] = split(jnp.asarray(val), w)
    for v, val in zip(jaxpr.invars, args):
        env[v] = val
    for eqn in jaxpr.eqns:
        outs = _eval_eqn(eqn, [read(v) for v in eqn.invars], w)
        for v, val in zip(eqn.outvars, outs):
            if not isinstance(v, jex.DropVar):
                env[v] = val
    return [read(v) for v in jaxpr.outvars]


def _bind(eqn: jex.JaxprEqn, invals: Sequence[Any], **changed: Any) -> list[Any]:
    """``eqn``'s primitive applied to ``invals``, with the parameters in ``changed`` replaced."""
    params = eqn.primitive.get_bind_params({**eqn.params, **changed})
    # Older JAX returned (subfuns, params); newer returns params alone.
    subfuns, params = params if isinstance(params, tuple) else ((), params)
    out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _eval_eqn(eqn: jex.JaxprEqn, invals: list[Any], w: int) -> list[Any]:
    name = eqn.primitive.name
    inner = next((eqn.params[k] for k in _INNER_JAXPR_PARAMS if k in eqn.params), None)
    blocked = any(isinstance(v, Blocks) for v in invals)
    if inner is not None and (blocked or _wide_outputs(eqn, w)):
        closed = inner if isinstance(inner, jex.ClosedJaxpr) else jex.ClosedJaxpr(inner, ())
        return _eval_jaxpr(closed.jaxpr, closed.consts, invals, w)
    if not blocked and not _wide_outputs(eqn, w):
        return _bind(eqn, invals)
    rule = _RULES.get(name)
    if rule is not None:
        return rule(eqn, invals, w)
    if not any(k in eqn.params for k in _AXIS_PARAMS) and _elementwise_shapes(eqn):
        return _elementwise(eqn, invals, w)
    raise NotImplementedError(
        f"{name} on arrays wider than the kernel's block width {w} (shapes "
        f"{[tuple(_shape(v)) for v in eqn.invars]}): the kernel engine cannot run this cell's update; "
        "use rj.Sequential()"
    )


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(getattr(v.aval, "shape", ()))


def _wide_outputs(eqn: jex.JaxprEqn, w: int) -> bool:
    return any(getattr(v.aval, "ndim", 0) and _shape(v)[-1] > w for v in eqn.outvars)


def _elementwise_shapes(eqn: jex.JaxprEqn) -> bool:
    """Inputs of the output's rank (or scalars) whose sizes equal the output's or are 1."""
    out = _shape(eqn.outvars[0])
    for v in eqn.invars:
        shape = _shape(v)
        if shape and (len(shape) != len(out) or any(s not in (o, 1) for s, o in zip(shape, out))):
            return False
    return all(_shape(v) == out for v in eqn.outvars)


def _parts(val: Any, n: int, w: int) -> list[Any]:
    """``n`` parts of an operand: a ``Blocks``' parts, or the operand itself for each part
    when it broadcasts along the last axis (scalar or size 1)."""
    if isinstance(val, Blocks):
        if len(val.parts) != n:
            raise NotImplementedError(f"operands split into {len(val.parts)} and {n} blocks of width {w}")
        return list(val.parts)
    if jnp.ndim(val) == 0 or jnp.shape(val)[-1] == 1:
        return [val] * n
    raise NotImplementedError(f"an operand of shape {jnp.shape(val)} next to a blocked one (block width {w})")


def _part_count(eqn: jex.JaxprEqn, invals: Sequence[Any], w: int) -> int:
    for v in invals:
        if isinstance(v, Blocks):
            return len(v.parts)
    return _shape(eqn.outvars[0])[-1] // w


def _elementwise(eqn, invals, w):
    n = _part_count(eqn, invals, w)
    per_operand = [_parts(v, n, w) for v in invals]
    results = [_bind(eqn, [ops[k] for ops in per_operand]) for k in range(n)]
    return [Blocks([r[i] for r in results]) for i in range(len(eqn.outvars))]


def _blocks_of(val: Any, w: int) -> list[Any]:
    """The parts of an operand whose last axis is a multiple of ``w`` (a plain one is one part)."""
    if isinstance(val, Blocks):
        return list(val.parts)
    if jnp.shape(val)[-1] != w:
        raise NotImplementedError(f"an operand of width {jnp.shape(val)[-1]} where blocks of width {w} are needed")
    return [val]


def _wrap(parts: list[Any]) -> Any:
    return parts[0] if len(parts) == 1 else Blocks(parts)


def _aligned(start: int, stop: int, w: int, what: str) -> tuple[int, int]:
    if start % w or stop % w:
        raise NotImplementedError(f"{what} at columns {start}:{stop}, not on the block width {w}")
    return start // w, stop // w


def _slice(eqn, invals, w):
    (x,) = invals
    start, limit, strides = eqn.params["start_indices"], eqn.params["limit_indices"], eqn.params["strides"]
    if strides is not None and strides[-1] != 1:
        raise NotImplementedError(f"a strided slice of the last axis (block width {w})")
    lo, hi = _aligned(start[-1], limit[-1], w, "a slice")
    parts = _blocks_of(x, w)[lo:hi]
    shape = _shape(eqn.invars[0])
    if any(a != 0 or b != n for a, b, n in zip(start[:-1], limit[:-1], shape[:-1])) or (
        strides is not None and any(st != 1 for st in strides[:-1])
    ):
        # The leading axes are sliced too (Triton cannot; the interpreter can).
        lead = tuple(slice(a, b, None if strides is None else s) for a, b, s in zip(start, limit, strides or start))
        parts = [p[lead[:-1]] for p in parts]
    return [_wrap(parts)]


def _split(eqn, invals, w):
    (x,) = invals
    axis, sizes = eqn.params["axis"], eqn.params["sizes"]
    if axis != eqn.invars[0].aval.ndim - 1:
        results = [_bind(eqn, [p]) for p in _blocks_of(x, w)]
        return [Blocks([r[i] for r in results]) for i in range(len(sizes))]
    parts, out, at = _blocks_of(x, w), [], 0
    for size in sizes:
        lo, hi = _aligned(at, at + int(size), w, "a split")
        out.append(_wrap(parts[lo:hi]))
        at += int(size)
    return out


def _concatenate(eqn, invals, w):
    if eqn.params["dimension"] != eqn.outvars[0].aval.ndim - 1:
        n = _part_count(eqn, invals, w)
        per_operand = [_blocks_of(v, w) for v in invals]
        if any(len(p) != n for p in per_operand):
            raise NotImplementedError("a concatenation of differently blocked arrays")
        return [Blocks([_bind(eqn, [p[k] for p in per_operand])[0] for k in range(n)])]
    return [_wrap([p for v in invals for p in _blocks_of(v, w)])]


def _pad(eqn, invals, w):
    x, value = invals
    config = eqn.params["padding_config"]
    lo, hi, interior = config[-1]
    if interior or lo % w or hi % w:
        raise NotImplementedError(f"a pad of the last axis by {config[-1]} (block width {w})")
    lead = tuple(config[:-1]) + ((0, 0, 0),)
    parts = _blocks_of(x, w)
    if any(any(c) for c in lead):  # no pad of the parts when only the last axis is padded
        parts = [_bind(eqn, [p, value], padding_config=lead)[0] for p in parts]
    zero = jnp.full(parts[0].shape, value, parts[0].dtype)
    return [_wrap([zero] * (int(lo) // w) + parts + [zero] * (int(hi) // w))]


def _broadcast_in_dim(eqn, invals, w):
    x = invals[0]
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    out_last = len(shape) - 1
    part_shape = (*shape[:-1], w)
    if isinstance(x, Blocks):
        if not dims or dims[-1] != out_last:
            raise NotImplementedError("a broadcast that moves the blocked last axis")
        return [Blocks([_bind(eqn, [p, *invals[1:]], shape=part_shape)[0] for p in x.parts])]
    # A narrow operand broadcast to a wide result: every part is the same broadcast.
    if dims and dims[-1] == out_last and jnp.shape(x)[-1] != 1:
        raise NotImplementedError(f"a broadcast of shape {jnp.shape(x)} to {shape} (block width {w})")
    part = _bind(eqn, invals, shape=part_shape)[0]
    return [Blocks([part] * (shape[-1] // w))]


def _reduce(combine):
    def rule(eqn, invals, w):
        (x,) = invals
        axes = tuple(eqn.params["axes"])
        ndim = eqn.invars[0].aval.ndim
        if ndim - 1 not in axes:
            return [Blocks([_bind(eqn, [p])[0] for p in x.parts])]
        out = None
        for p in _blocks_of(x, w):
            r = _bind(eqn, [p])[0]
            out = r if out is None else combine(out, r)
        return [out]

    return rule


def _reshape(eqn, invals, w):
    (x,) = invals
    new = tuple(eqn.params["new_sizes"])
    old = _shape(eqn.invars[0])
    if not new or new[-1] != old[-1]:
        raise NotImplementedError(f"a reshape from {old} to {new} that changes the blocked last axis")
    return [Blocks([_bind(eqn, [p], new_sizes=(*new[:-1], w))[0] for p in x.parts])]


def _transpose(eqn, invals, w):
    (x,) = invals
    perm = tuple(eqn.params["permutation"])
    if perm[-1] != len(perm) - 1:
        raise NotImplementedError("a transpose that moves the blocked last axis")
    return [Blocks([_bind(eqn, [p])[0] for p in x.parts])]


def _squeeze(eqn, invals, w):
    (x,) = invals
    dims = tuple(eqn.params["dimensions"])
    if eqn.invars[0].aval.ndim - 1 in dims:
        raise NotImplementedError("a squeeze of the blocked last axis")
    return [Blocks([_bind(eqn, [p])[0] for p in x.parts])]


def _dot_general(eqn, invals, w):
    lhs, rhs = invals
    (lc, rc), batch = eqn.params["dimension_numbers"]
    if batch != ((), ()) or len(lc) != 1:
        raise NotImplementedError(
            f"a matrix product with dimension numbers {eqn.params['dimension_numbers']} on blocks"
        )
    if not isinstance(lhs, Blocks) and not isinstance(rhs, Blocks):
        return [split(_bind(eqn, invals)[0], w)]  # narrow operands, a wide product
    if isinstance(lhs, Blocks) and isinstance(rhs, Blocks):
        # Both wide (an LSTM projection wider than w: blocked activations times a blocked weight).
        lhs_last, rhs_last = lc[0] == lhs.parts[0].ndim - 1, rc[0] == rhs.parts[0].ndim - 1
        if lhs_last and rhs_last:  # both contract their blocked axis: a sum over the blocks
            out = None
            for r in (_bind(eqn, [a, b])[0] for a, b in zip(lhs.parts, _parts(rhs, len(lhs.parts), w))):
                out = r if out is None else out + r
            return [split(out, w)]
        if not rhs_last:  # rhs's blocked axis is the output's last: one product per rhs block
            return [_wrap([_dot_general(eqn, [lhs, part], w)[0] for part in rhs.parts])]
        raise NotImplementedError(
            f"a matrix product with dimension numbers {eqn.params['dimension_numbers']} on two blocked operands"
        )
    blocked_lhs = isinstance(lhs, Blocks)
    parts = (lhs if blocked_lhs else rhs).parts
    other, other_axis = (rhs, rc[0]) if blocked_lhs else (lhs, lc[0])
    if (lc if blocked_lhs else rc)[0] == parts[0].ndim - 1:
        # Contracting the blocked axis: a sum of per-block products with the other operand's
        # matching slices.
        out = None
        for k, part in enumerate(parts):
            index = [slice(None)] * jnp.ndim(other)
            index[other_axis] = slice(k * w, (k + 1) * w)
            pair = [part, other[tuple(index)]] if blocked_lhs else [other[tuple(index)], part]
            r = _bind(eqn, pair)[0]
            out = r if out is None else out + r
        return [split(out, w)]
    # The blocked axis is a free axis: per-part products side by side along the output axis
    # it becomes (the last of lhs's free axes, or the output's last for rhs).
    products = [_bind(eqn, [p, rhs] if blocked_lhs else [lhs, p])[0] for p in parts]
    if not blocked_lhs:
        return [Blocks(products)]
    return [split(jnp.concatenate(products, axis=parts[0].ndim - 2), w)]


_RULES: dict[str, Callable[..., list[Any]]] = {
    "slice": _slice,
    "split": _split,
    "concatenate": _concatenate,
    "pad": _pad,
    "broadcast_in_dim": _broadcast_in_dim,
    "reduce_sum": _reduce(jnp.add),
    "reduce_max": _reduce(jnp.maximum),
    "reduce_min": _reduce(jnp.minimum),
    "reshape": _reshape,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "dot_general": _dot_general,
}
