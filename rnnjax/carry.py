"""A carry as one real vector, and back: the state space of parallel solvers and of
:mod:`rnnjax.inspect`.

One sequence's carry (a pytree without batch axes) maps to a vector of ``n`` real numbers:
the leaves in tree order, each raveled, a complex leaf as its real parts then its
imaginary parts. ``n`` is ``hidden_size`` for Elman or GRU, ``2 * hidden_size`` for
LSTM (``h`` then ``c``) and for LRU (real then imaginary parts).

Example:
  >>> import jax.numpy as jnp, rnnjax as rj
  >>> from rnnjax.carry import CarryLayout
  >>> layout = CarryLayout(rj.LRU(hidden_size=3).init_carry())
  >>> layout.n, layout.unflatten(jnp.arange(6.0))
  (6, Array([0.+3.j, 1.+4.j, 2.+5.j], dtype=complex64))
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


class CarryLayout:
    """The vector layout of carries shaped and typed like ``template`` (one unbatched carry,
    arrays or ``jax.ShapeDtypeStruct``).

    Attributes:
      n: the vector's size.
      real: its dtype, the widest real dtype of the leaves.
    """

    def __init__(self, template: PyTree):
        leaves, self.treedef = jax.tree_util.tree_flatten(template)
        self.shapes = [tuple(leaf.shape) for leaf in leaves]
        self.dtypes = [jnp.dtype(leaf.dtype) for leaf in leaves]
        self.complex = [jnp.issubdtype(d, jnp.complexfloating) for d in self.dtypes]
        reals = [jnp.finfo(d).dtype for d in self.dtypes]
        self.real = jnp.result_type(*reals) if reals else jnp.dtype(jnp.float32)
        self.sizes = [math.prod(s) * (2 if c else 1) for s, c in zip(self.shapes, self.complex)]
        self.n = sum(self.sizes)

    def flatten(self, carry: PyTree) -> jax.Array:
        """One carry -> its vector ``(n,)`` of dtype :attr:`real`."""
        parts = []
        for leaf, dtype, is_complex in zip(jax.tree_util.tree_leaves(carry), self.dtypes, self.complex):
            leaf = jnp.asarray(leaf).astype(dtype).reshape(-1)
            parts += [jnp.real(leaf), jnp.imag(leaf)] if is_complex else [leaf]
        return jnp.concatenate([p.astype(self.real) for p in parts])

    def unflatten(self, vector: jax.Array) -> PyTree:
        """A vector ``(n,)`` -> one carry shaped and typed as the template."""
        leaves, start = [], 0
        for shape, dtype, is_complex, size in zip(self.shapes, self.dtypes, self.complex, self.sizes):
            part = vector[start : start + size]
            start += size
            if is_complex:
                real = jnp.finfo(dtype).dtype
                half = size // 2
                leaf = jax.lax.complex(part[:half].astype(real), part[half:].astype(real))
            leaves.append((leaf if is_complex else part).astype(dtype).reshape(shape))
        return jax.tree_util.tree_unflatten(self.treedef, leaves)
