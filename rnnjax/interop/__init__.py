"""Weights in and out of PyTorch (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``: :mod:`rnnjax.interop.torch`)
and in from Keras (``SimpleRNN``, ``LSTM``, ``GRU``, ``Bidirectional``: :mod:`rnnjax.interop.keras`).

Neither torch nor keras is imported here: the ``from_*`` functions read attributes,
``state_dict()``, ``get_config()`` and ``get_weights()``, and :func:`to_torch_state_dict`
imports torch only when asked for tensors. The layers built take batch-first inputs
``(*batch, T, D)`` and hold matrices ``(in, out)``; ``lengths`` in ``apply`` stands for
packed sequences and padding masks.
"""

from rnnjax.interop.keras import from_keras, from_keras_config
from rnnjax.interop.torch import from_torch, from_torch_state_dict, to_torch_state_dict, torch_final_state

__all__ = [
    "from_torch",
    "from_torch_state_dict",
    "torch_final_state",
    "to_torch_state_dict",
    "from_keras",
    "from_keras_config",
]
