"""Weights crossing into rnnjax: foreign arrays to numpy and jax, and the gate blocks
each importable cell stacks in its matrices.

Nothing here imports torch or keras: a tensor is recognised by its ``detach`` method.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.cells.elman import Elman
from rnnjax.cells.gru import GRU
from rnnjax.cells.lstm import LSTM

__all__ = ["GATE_BLOCKS", "to_numpy", "to_jax"]

# Gate blocks stacked on the output axis of ``w_x`` and ``w_h``: LSTM i, f, g, o; GRU r, z, n.
GATE_BLOCKS: dict[type, int] = {Elman: 1, LSTM: 4, GRU: 3}


def to_numpy(value: Any, name: str) -> np.ndarray:
    """A floating numpy array from a numpy array, jax array or torch tensor.

    A torch bfloat16 tensor becomes a numpy array of ``jnp.bfloat16`` (numpy has no
    bfloat16; the values pass through float32 exactly). Raises ``TypeError`` naming
    ``name`` for integer or boolean weights.
    """
    if hasattr(value, "detach"):
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            return tensor.float().numpy().astype(jnp.bfloat16)
        value = tensor.numpy()
    array = np.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"{name} has dtype {array.dtype}; expected floating-point weights")
    return array


def to_jax(array: np.ndarray) -> jax.Array:
    """A jax array of ``array``, made C-contiguous first (imported matrices arrive transposed)."""
    return jnp.asarray(np.ascontiguousarray(array))
